"""Nothing silently wrong in the engine (issue 29): non-finite config numbers, frozen weights, a run that did
not prune, rounding to whole units, blocks saved without slimming, corrupted compressed checkpoints."""

from __future__ import annotations

import json
import logging
import math
import struct
import typing
import warnings

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.config import L1Config, PruningConfigError
from prune_callbacks.controllers.distillation.config import DistillationConfig, DistillationConfigError, make_distillation_config
from prune_callbacks.core.guard_config import AccuracyGuardConfig

CFG = dict(final_sparsity=0.5, start_step=1, end_step=4, update_every=1)


# ------------------------------------------------------------------ 1. non-finite numbers
def _float_fields(model) -> list[str]:
    """Every field of ``model`` whose annotation admits a float."""
    out = []
    for name, field in model.model_fields.items():
        text = repr(field.annotation) + repr(typing.get_args(field.annotation))
        if field.annotation is float or "float" in text:
            out.append(name)
    return out


MODELS = {
    "PruningConfig": (PruningConfig, {}),
    "L1Config": (L1Config, {"l1_lambda": 1e-4}),
    "AccuracyGuardConfig": (AccuracyGuardConfig, {}),
    "DistillationConfig": (DistillationConfig, {}),
}
FLOAT_CASES = [(m, f, v) for m, (cls, _) in MODELS.items() for f in _float_fields(cls)
               for v in (math.nan, math.inf, -math.inf)]


def test_the_float_field_table_is_not_empty():
    assert {m for m, _, _ in FLOAT_CASES} == set(MODELS)
    assert ("AccuracyGuardConfig", "max_drop", math.inf) in FLOAT_CASES


@pytest.mark.parametrize("model,field,value", FLOAT_CASES, ids=[f"{m}.{f}={v}" for m, f, v in FLOAT_CASES])
def test_every_float_field_refuses_non_finite_numbers_naming_field_and_value(model, field, value):
    cls, base = MODELS[model]
    data = {**base, field: value}
    if cls is DistillationConfig:
        with pytest.raises(DistillationConfigError) as info:
            make_distillation_config(data)
    elif cls is AccuracyGuardConfig:
        with pytest.raises(PruningConfigError) as info:
            PruningConfig(final_sparsity=0.5, accuracy_guard=data)
    else:
        with pytest.raises(PruningConfigError) as info:
            cls(**data)
    text = str(info.value)
    assert field in text and "finite" in text and repr(value) in text, text


def test_guard_max_drop_nan_from_a_recipe_like_dict_is_refused():
    with pytest.raises(PruningConfigError, match=r"accuracy_guard\.max_drop.*max_drop=nan.*finite"):
        PruningConfig(final_sparsity=0.5, accuracy_guard={"max_drop": float("nan")})


def test_finite_values_are_still_accepted():
    assert PruningConfig(final_sparsity=0.5, l1_lambda=1e-4).l1_lambda == 1e-4
    assert AccuracyGuardConfig(max_drop=0.02).max_drop == 0.02
    assert make_distillation_config(temperature=3).temperature == 3.0


def test_shared_finite_type_is_used_by_every_model():
    """Every plain float field carries `FiniteFloat`'s constraint; step fields (int or fraction) use `check_finite`."""
    from prune_callbacks.core.config_errors import FiniteFloat

    (constraint,) = [m for m in FiniteFloat.__metadata__[0].metadata]
    for cls, _ in MODELS.values():
        for name in _float_fields(cls):
            field = cls.model_fields[name]
            if field.annotation is float:
                assert constraint in field.metadata, f"{cls.__name__}.{name}"


# ------------------------------------------------------------------ 2. frozen weights inside the optimizer
def _train(model, pruner, n=6, opt=None, seed=0):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    for ids in random_batches(n, seed=seed):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_frozen_targets_are_excluded_with_one_log_line_never_pruned_first(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    before = model.layers[0].up.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="prune_callbacks"):
        pruner = Pruner(model, PruningConfig(**CFG))
    lines = [r for r in caplog.records if "requires_grad" in r.getMessage()]
    assert len(lines) == 1 and "layers.0.up.weight" in lines[0].getMessage() and "layers.0.down.weight" in \
        lines[0].getMessage()
    assert all(not t.name.startswith("layers.0.") for t in pruner.targets)
    _train(model, pruner)  # AdamW over every parameter, frozen ones included
    assert torch.equal(model.layers[0].up.weight, before)  # not pruned (and not trained)
    report = pruner.report()
    assert report["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(row["sparsity"] > 0.2 for row in report["per_target"].values())


def test_every_target_frozen_is_refused():
    model = TinyLM()
    for p in model.layers.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False.*layers\.0\.up\.weight"):
        Pruner(model, PruningConfig(**CFG))


def test_a_target_frozen_after_the_pruner_was_built_is_refused_at_attach():
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    model.layers[1].down.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False.*layers\.1\.down\.weight"):
        pruner.attach(torch.optim.AdamW(model.parameters()))


def test_a_target_whose_grad_stays_none_is_not_ranked_as_zero_saliency():
    """Decision: a target that requires grad but never received a gradient before a mask update makes that
    update refuse (it would be ranked as zero saliency and pruned first), naming it and the fixes."""

    class Unused(TinyLM):
        def __init__(self):
            super().__init__()
            self.layers[2].unused = torch.nn.Linear(16, 16)  # inside a numbered block, never called

    torch.manual_seed(0)
    model = Unused()
    pruner = Pruner(model, PruningConfig(**CFG))
    assert "layers.2.unused" in [t.name for t in pruner.targets]
    with pytest.raises(RuntimeError, match=r"never received a gradient.*layers\.2\.unused\.weight.*exclude"):
        _train(model, pruner)
    assert int(pruner.groups[0].masks[-1].sum()) == 0


# ------------------------------------------------------------------ 3. finalize below the target
def _finalize_warnings(pruner, caplog):
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.finalize()
    return [str(w.message) for w in caught], [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_finalize_warns_when_every_step_was_skipped(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        model.layers[0].up.weight[0, 0] = float("nan")  # one NaN weight: every gradient is non-finite
    pruner = Pruner(model, PruningConfig(**CFG))
    _train(model, pruner)
    assert pruner.skipped_steps == 6
    messages, logged = _finalize_warnings(pruner, caplog)
    assert any("below final_sparsity=0.5" in m and "6 of 6 optimizer steps were skipped" in m for m in messages), messages
    assert any("below final_sparsity=0.5" in m for m in logged)


def test_finalize_warns_when_the_run_stopped_before_end_step(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.5, start_step=1, end_step=10, update_every=1))
    _train(model, pruner, n=3)
    messages, _ = _finalize_warnings(pruner, caplog)
    assert any("stopped at optimizer step 3 before end_step=10" in m for m in messages), messages


def test_finalize_is_quiet_when_the_schedule_finished(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    _train(model, pruner)
    messages, logged = _finalize_warnings(pruner, caplog)
    assert not [m for m in messages if "final_sparsity" in m] and not logged


# ------------------------------------------------------------------ 4 / 5. structured: rounding, blocks unslimmed
transformers = pytest.importorskip("transformers")


def bert(layers=6):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _train_bert(model, configs, steps=6):
    pruner = Pruner(model, configs, total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    torch.manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 12))
        model(input_ids=ids, labels=ids[:, 0] % 2).loss.backward()
        opt.step()
        opt.zero_grad()
    return pruner


def test_blocks_rounding_is_said_at_target_resolution(caplog):
    with caplog.at_level(logging.INFO, logger="prune_callbacks"):
        pruner = Pruner(bert(), PruningConfig(granularity="blocks", final_sparsity=0.99,
                                              **{k: v for k, v in CFG.items() if k != "final_sparsity"}))
    assert pruner.unit_rounding() == ["granularity='blocks': final_sparsity 0.99 -> 5 of 6 blocks"]
    assert any("final_sparsity 0.99 -> 5 of 6 blocks" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind,value,smallest", [("blocks", 0.05, "1/6"), ("ffn_neurons", 0.005, "1/64")])
def test_a_request_that_rounds_to_zero_units_is_refused(kind, value, smallest):
    steps = {k: v for k, v in CFG.items() if k != "final_sparsity"}
    with pytest.raises(PruningConfigError) as info:
        Pruner(bert(), PruningConfig(granularity=kind, final_sparsity=value, **steps))
    text = str(info.value)
    assert f"final_sparsity={value}" in text and "0 " in text and smallest in text, text


def test_blocks_finalized_without_slim_warn_when_the_unslimmed_model_is_saved(caplog, tmp_path):
    from prune_callbacks.core.config_errors import BLOCKS_WITHOUT_SLIM

    pruner = _train_bert(bert(4), PruningConfig(granularity="blocks", final_sparsity=0.5, start_step=1, end_step=4,
                                                 update_every=1))
    messages, logged = _finalize_warnings(pruner, caplog)
    assert not messages and not logged  # the caller may still slim (the Trainer callbacks finalize first)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"), \
            pytest.warns(UserWarning, match="saved model would not compute what was measured"):
        pruner.model.save_pretrained(tmp_path / "unslimmed")
    assert any(BLOCKS_WITHOUT_SLIM in r.getMessage() for r in caplog.records)
    assert "slim" in BLOCKS_WITHOUT_SLIM
    from prune_callbacks.export import slim_pruned

    slim_pruned(pruner.model, pruner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # slimmed: the saved model is the measured one
        pruner.model.save_pretrained(tmp_path / "slim")


def test_blocks_finalized_for_saving_unslimmed_are_refused_with_the_fix():
    from prune_callbacks.core.config_errors import BLOCKS_WITHOUT_SLIM

    pruner = _train_bert(bert(4), PruningConfig(granularity="blocks", final_sparsity=0.5, start_step=1, end_step=4,
                                                 update_every=1))
    with pytest.raises(PruningConfigError) as info:
        pruner.finalize(slim=False)
    assert BLOCKS_WITHOUT_SLIM in str(info.value)
    assert not pruner.finalized  # nothing made permanent: slim_pruned still works
    from prune_callbacks.export import slim_pruned

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = slim_pruned(pruner.model, pruner)
    assert summary["params_after"] < summary["params_before"]


# ------------------------------------------------------------------ 6. corrupted compressed checkpoints
def _payload_range(path, key):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _sparse_dict():
    torch.manual_seed(0)
    w = torch.randn(16, 16)
    w[torch.rand(16, 16) < 0.8] = 0.0
    return {"a.weight": w, "b.bias": torch.randn(16)}


@pytest.mark.parametrize("key", ["a.weight.__values__", "a.weight.__mask__", "b.bias"])
def test_a_flipped_payload_byte_is_detected_naming_file_and_tensor(tmp_path, key):
    from prune_callbacks.export.sparse_io import SparseCheckpointError
    from prune_callbacks.export.sparse_io.reader import read_sparse_file
    from prune_callbacks.export.sparse_io.writer import write_sparse_file

    path = tmp_path / "model.sparse.safetensors"
    write_sparse_file(_sparse_dict(), path)
    start, end = _payload_range(path, key)
    _flip(path, end - 1)
    with pytest.raises(SparseCheckpointError) as info:
        read_sparse_file(path)
    assert str(path) in str(info.value) and repr(key) in str(info.value) and "checksum" in str(info.value)


def test_checkpoints_written_before_checksums_load_with_a_warning(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prune_callbacks.export.sparse_io.format import METADATA_KEY
    from prune_callbacks.export.sparse_io.reader import read_sparse_file
    from prune_callbacks.export.sparse_io.writer import write_sparse_file

    path = tmp_path / "model.sparse.safetensors"
    state = _sparse_dict()
    write_sparse_file(state, path)
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta[METADATA_KEY])
    header.pop("sha256")
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, METADATA_KEY: json.dumps(header)})
    with pytest.warns(UserWarning, match="no checksums"):
        loaded = read_sparse_file(old)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current file reads without a warning
        assert all(torch.equal(read_sparse_file(path)[k], v) for k, v in state.items())


@pytest.mark.parametrize("reader", ["load_sparse", "densify", "report"])
def test_every_reader_verifies_the_checksums(tmp_path, reader):
    from prune_callbacks.export.sparse_io import SparseCheckpointError, densify, load_sparse, save_sparse
    from prune_callbacks.export.sparse_io.format import WEIGHTS_NAME

    model = bert(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p[torch.rand(p.shape) < 0.9] = 0.0
    save_sparse(model, tmp_path / "sparse")
    path = tmp_path / "sparse" / WEIGHTS_NAME
    start, end = _payload_range(path, "bert.encoder.layer.0.output.dense.weight.__values__")
    _flip(path, (start + end) // 2)
    error = SparseCheckpointError
    if reader == "load_sparse":
        call = lambda: load_sparse(tmp_path / "sparse")  # noqa: E731
    elif reader == "densify":
        call = lambda: densify(tmp_path / "sparse", tmp_path / "dense")  # noqa: E731
    else:
        from prune_callbacks.recipe.weights import WeightsError, load_weights

        call, error = (lambda: load_weights(tmp_path / "sparse")), WeightsError  # noqa: E731
    with pytest.raises(error, match=r"bert\.encoder\.layer\.0\.output\.dense\.weight\.__values__.*checksum"):
        call()


# ------------------------------------------------------------------ 7. one source for each fact (behaviour-neutral)
def test_one_zero_counter_counts_negative_zero_and_the_sparse_file_keeps_its_bits(tmp_path):
    from prune_callbacks.core.report import sparsity_of_tensors, zero_count
    from prune_callbacks.export.sparse_io.reader import read_sparse_file
    from prune_callbacks.export.sparse_io.writer import write_sparse_file

    t = torch.tensor([[0.0, -0.0, 1.0, 0.0]] * 4)
    assert zero_count(t) == 12
    assert sparsity_of_tensors({"w": t})["per_tensor"]["w"]["sparsity"] == 0.75
    write_sparse_file({"w": t}, tmp_path / "f.safetensors")
    back = read_sparse_file(tmp_path / "f.safetensors")["w"]
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))  # -0.0 kept bitwise (storage rule)


@pytest.mark.parametrize("kind", ["cubic", "linear", "oneshot"])
def test_target_sparsity_is_the_schedule_classes_value(kind):
    from prune_callbacks.core.registry import SCHEDULES
    from prune_callbacks.methods.schedule import target_sparsity

    for start, end in [(3, 24), (0, 10), (5, 5)]:
        schedule = SCHEDULES.get(kind)(initial=0.1, final=0.8, start=start, end=end, every=3)
        for step in range(0, 30):
            assert target_sparsity(step, initial=0.1, final=0.8, start=start, end=end, kind=kind) == schedule.value(step)


@pytest.mark.parametrize("start,expected", [(0, 1), (1, 0), (4, 3)])  # start 0: first update at every=2
def test_last_dense_step_is_the_step_before_the_first_update_for_guard_and_teacher(start, expected):
    from prune_callbacks.controllers.distillation.teacher import snapshot_step
    from prune_callbacks.controllers.guard.controller import baseline_step

    pruner = Pruner(TinyLM(), PruningConfig(final_sparsity=0.5, start_step=start, end_step=12, update_every=2))
    assert pruner.last_dense_step() == expected == snapshot_step(pruner)
    assert baseline_step(pruner, AccuracyGuardConfig()) == expected
    assert baseline_step(pruner, AccuracyGuardConfig(baseline="train_begin")) == 0


def test_one_atomic_state_writer_leaves_no_partial_file(tmp_path):
    from prune_callbacks.core.state_io import STATE_FILE, load_state_file, save_state_file, write_atomic

    pruner = Pruner(TinyLM(), PruningConfig(**CFG))
    path = save_state_file(pruner.state_dict(), tmp_path / STATE_FILE)
    good = path.read_bytes()

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(path, fail)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert load_state_file(path)["step"] == 0


def test_distill_keys_come_from_the_figures_schema():
    from prune_callbacks.core import figures
    from prune_callbacks.controllers.distillation import report

    assert report.KEYS is figures.DISTILL_KEYS
    assert [figures.distill_key(k) for k in ("kd_loss", "task_loss", "hidden_loss")] == list(figures.DISTILL_KEYS)
    with pytest.raises(KeyError):
        figures.distill_key("kd")
