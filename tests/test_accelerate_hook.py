"""AcceleratePruningHook in single-process Accelerate loops (CPU)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import TinyLM, lm_loss, random_batches, reset_accelerate_state

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.tracking import GeneralTracker  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import (  # noqa: E402
    AcceleratePruningHook,
    check_accelerator_supported,
    count_optimizer_steps,
)
from prune_callbacks.methods.schedule import is_update_step, target_sparsity  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _setup(accum=1, seed=0, lr=1e-2, scaler=None, fused=False, **acc_kwargs):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum, **acc_kwargs)
    if scaler is not None:
        acc.scaler = scaler  # what Accelerator(mixed_precision="fp16") does on GPU; fp16 is refused on CPU
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def _train_step(acc, model, opt, sched, ids):
    with acc.accumulate(model):
        acc.backward(lm_loss(model, ids))
        opt.step()
        sched.step()
        opt.zero_grad()


# ---------------------------------------------------------------- accumulation
def test_acts_only_on_real_optimizer_steps_and_follows_schedule():
    accum, epochs = 4, 3
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.cat(random_batches(13, batch=2))  # 26 rows -> 13 batches of 2: last window of each epoch is short
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, opt, loader = acc.prepare(model, opt, loader)
    total = count_optimizer_steps(len(loader), accum, epochs)
    assert total == 12  # ceil(13 / 4) * 3
    cfg = PruningConfig(final_sparsity=0.6, start_step=0.1, end_step=0.75, update_every=2, saliency="taylor")
    hook = AcceleratePruningHook(cfg, total_steps=total)
    pruner = hook.register(acc, model, opt)
    s = pruner.steps

    syncs, micro, seen = 0, 0, []
    for _ in range(epochs):
        for ids in loader:
            with acc.accumulate(model):
                acc.backward(lm_loss(model, ids))
                opt.step()
                opt.zero_grad()
            micro += 1
            if acc.sync_gradients:
                syncs += 1
                seen.append((pruner.step, pruner.report()["global_sparsity"]))
            else:  # a micro-step must not have moved the pruner
                assert pruner.step == syncs
    assert micro == 39 and syncs == total
    assert pruner.step == total and pruner.skipped_steps == 0

    numel = pruner.report()["prunable_params"]
    last_update = 0
    for step, sparsity in seen:
        if is_update_step(step, start=s.start_step, end=s.end_step, every=cfg.update_every):
            last_update = step
        want = target_sparsity(last_update, initial=0.0, final=0.6, start=s.start_step, end=s.end_step) if last_update else 0.0
        assert abs(sparsity - want) <= 1.0 / numel, (step, sparsity, want)
    assert seen[-1][1] == pytest.approx(0.6, abs=1.0 / numel)
    report = hook.finalize()
    for t, pruned in zip(pruner.targets, pruner.pruned):
        assert torch.all(t.param[pruned] == 0)
    assert report["global_sparsity"] == pytest.approx(0.6, abs=1.0 / numel)


def test_bf16_autocast_loop_prunes_on_real_steps():
    acc, model, opt, sched = _setup(accum=3, mixed_precision="bf16")
    assert acc.native_amp and acc.mixed_precision == "bf16"
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6)
    pruner = hook.register(acc, model, opt)
    for ids in random_batches(18):
        _train_step(acc, model, opt, sched, ids)
    report = hook.finalize()
    assert pruner.step == 6 and report["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(torch.all(t.param[m] == 0) for t, m in zip(pruner.targets, pruner.pruned))


def test_count_optimizer_steps():
    assert count_optimizer_steps(8, 4, 2) == 4
    assert count_optimizer_steps(9, 4, 1) == 3
    with pytest.raises(ValueError):
        count_optimizer_steps(8, 0)


def test_register_needs_the_prepared_optimizer():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = acc.prepare(model)
    hook = AcceleratePruningHook(PruningConfig(start_step=1, end_step=4))
    with pytest.raises(TypeError, match="accelerator.prepare"):
        hook.register(acc, model, opt)


def test_fractional_steps_need_total_steps_at_register():
    acc, model, opt, _ = _setup()
    with pytest.raises(ValueError, match="total_steps"):
        AcceleratePruningHook(PruningConfig(start_step=0.1, end_step=0.5)).register(acc, model, opt)
    hook = AcceleratePruningHook(PruningConfig(start_step=0.1, end_step=0.5))
    pruner = hook.register(acc, model, opt, total_steps=20)
    assert (pruner.steps.start_step, pruner.steps.end_step) == (2, 10)


# ---------------------------------------------------------------- skipped steps
CFG = dict(final_sparsity=0.5, start_step=1, end_step=6, update_every=1, saliency="taylor")


def _run_scaled(scaler, steps, accum=2, inf_at=None, fused=False):
    """``steps`` optimizer steps of ``accum`` micro-batches; an inf gradient on optimizer step ``inf_at`` (1-based)."""
    reset_accelerate_state()
    acc, model, opt, sched = _setup(accum=accum, scaler=scaler, fused=fused)
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=max(steps, 8))
    pruner = hook.register(acc, model, opt)
    skipped, history = [], []
    batches = random_batches(steps * accum)
    for i, ids in enumerate(batches):
        with acc.accumulate(model):
            acc.backward(lm_loss(model, ids))
            if acc.sync_gradients and inf_at == (i + 1) // accum:
                pruner.params[0].grad[0, 0] = float("inf")
                before = copy.deepcopy(pruner.state_dict()), [p.detach().clone() for p in model.parameters()]
            opt.step()
            sched.step()
            opt.zero_grad()
        if acc.sync_gradients:
            skipped.append(opt.step_was_skipped)
            history.append(pruner.step)
            if inf_at == (i + 1) // accum:
                state, weights = before
                after = pruner.state_dict()
                assert after["step"] == state["step"]
                for name, m in state["masks"].items():
                    assert torch.equal(after["masks"][name], m)
                for buf, per_target in state["saliency"].items():
                    for name, t in per_target.items():
                        assert torch.equal(after["saliency"][buf][name], t)
                assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    return acc, model, opt, pruner, skipped, history


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_grad_scaler_skipped_step_is_not_a_pruning_step(fused):
    # The accelerate fp16 path: accelerator.backward -> scaler.scale(loss).backward(),
    # AcceleratedOptimizer.step -> scaler.step(inner optimizer) -> scaler.update().
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    acc, model, opt, pruner, skipped, history = _run_scaled(scaler, steps=8, inf_at=3, fused=fused)
    assert scaler.get_scale() == 2.0**11  # the scaler saw the overflow and backed off
    assert pruner.step == 7 and history == [1, 2, 2, 3, 4, 5, 6, 7]
    if fused:
        # a fused optimizer unscales and skips inside its own step, which the scaler calls anyway
        # (so accelerate's step_was_skipped stays False); the pruner sees found_inf and skips the step
        assert pruner.skipped_steps == 1
    else:
        assert skipped == [False, False, True, False, False, False, False, False]
        assert pruner.skipped_steps == 0  # the inner step was never called
    assert pruner.mask_sparsity == 0.5


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_grad_scaler_path_gives_the_saliency_unscaled_gradients(fused):
    _, _, _, plain, _, _ = _run_scaled(None, steps=3, fused=fused)
    _, _, _, scaled, _, _ = _run_scaled(torch.amp.GradScaler("cpu", init_scale=2.0**14), steps=3, fused=fused)
    assert scaled.step == plain.step == 3
    for a, b in zip(plain.saliency.buffers["importance"], scaled.saliency.buffers["importance"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=0), "saliency saw loss-scaled gradients"
    assert all(torch.equal(a, b) for a, b in zip(plain.pruned, scaled.pruned))


def test_non_finite_step_without_scaler_is_skipped_by_the_pruner():
    # bf16 has no scaler: the optimizer steps, the pruner refuses to count or score it.
    reset_accelerate_state()
    acc, model, opt, sched = _setup(accum=2)
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6)
    pruner = hook.register(acc, model, opt)
    for i, ids in enumerate(random_batches(6)):  # NaN on the 3rd (last) optimizer step: it poisons the weights
        with acc.accumulate(model):
            acc.backward(lm_loss(model, ids))
            if i == 5:
                pruner.params[1].grad.fill_(float("nan"))
            opt.step()
            opt.zero_grad()
    assert pruner.skipped_steps == 1 and pruner.step == 2
    assert all(torch.isfinite(b).all() for b in pruner.saliency.buffers["importance"])


# ---------------------------------------------------------------- save_state / load_state
RESUME_CFG = dict(final_sparsity=0.6, start_step=1, end_step=9, update_every=2, saliency="platon", l1_lambda=1e-3)


def _resume_run(project_dir, batches, seed=0):
    reset_accelerate_state()
    acc, model, opt, sched = _setup(accum=2, seed=seed, project_dir=str(project_dir))
    hook = AcceleratePruningHook(PruningConfig(**RESUME_CFG), total_steps=len(batches) // 2)
    hook.register(acc, model, opt)
    return acc, model, opt, sched, hook


def test_save_state_load_state_resumes_exactly(tmp_path):
    n, m = 5, 7  # optimizer steps before / after the checkpoint (accumulation 2)
    batches = random_batches(2 * (n + m), seed=3)

    acc, model, opt, sched, straight = _resume_run(tmp_path / "a", batches)
    for ids in batches:
        _train_step(acc, model, opt, sched, ids)
    want_weights = {k: v.clone() for k, v in model.state_dict().items()}
    want = straight.state_dict()

    acc, model, opt, sched, first = _resume_run(tmp_path / "b", batches)
    for ids in batches[: 2 * n]:
        _train_step(acc, model, opt, sched, ids)
    ckpt = tmp_path / "ckpt"
    acc.save_state(str(ckpt))
    mid = first.state_dict()
    assert 0 < mid["mask_sparsity"] < want["mask_sparsity"]  # the checkpoint falls mid-schedule

    # accelerate 1.15 loads custom objects with weights_only=False; ours must not need pickle
    files = sorted(ckpt.glob("custom_checkpoint_*.pkl"))
    assert len(files) == 1
    on_disk = torch.load(files[0], weights_only=True)
    assert on_disk["step"] == n and torch.equal(on_disk["masks"]["layers.0.up"], mid["masks"]["layers.0.up"])

    # fresh objects, different initial weights: everything must come from the checkpoint
    acc, model, opt, sched, resumed = _resume_run(tmp_path / "c", batches, seed=123)
    acc.load_state(str(ckpt))
    assert resumed.pruner.step == n
    for ids in batches[2 * n:]:
        _train_step(acc, model, opt, sched, ids)
    got = resumed.state_dict()

    assert got["step"] == want["step"] == n + m
    for key in ("mask_sparsity", "mask_updates", "skipped_steps"):
        assert got[key] == want[key], key
    for name in want["masks"]:
        assert torch.equal(got["masks"][name], want["masks"][name]), name
    for buf in want["saliency"]:
        for name in want["saliency"][buf]:
            assert torch.equal(got["saliency"][buf][name], want["saliency"][buf][name]), (buf, name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want_weights[k]), k


# ---------------------------------------------------------------- sharded setups
def _stub(distributed_type, **state):
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(distributed_type=distributed_type, **state))


@pytest.mark.parametrize(
    "accelerator, match",
    [
        (_stub(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=1)), "FSDP"),
        (_stub(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2)),
         r"FSDP plugin \(fsdp_version=2\).*never for MULTI_CPU.*fully_shard"),
        (_stub("FSDP"), "FSDP"),
        (_stub(DistributedType.MULTI_GPU, fsdp_plugin=SimpleNamespace(fsdp_version=2)), "FSDP"),
        (_stub(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3)), "ZeRO stage 3.*shards"),
        (_stub(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=2)), "ZeRO stage 2.*master"),
        (_stub(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=1)), "ZeRO stage 1"),
        (_stub(DistributedType.MEGATRON_LM), "Megatron"),
        (
            SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, state=None,
                            parallelism_config=SimpleNamespace(tp_enabled=True, dp_shard_enabled=False)),
            "tp",
        ),
    ],
    ids=["fsdp1", "fsdp2", "fsdp-str", "fsdp-plugin-only", "zero3", "zero2", "zero1", "megatron", "tp"],
)
def test_sharded_setups_are_refused_at_register(accelerator, match):
    with pytest.raises(NotImplementedError, match=match):
        check_accelerator_supported(accelerator)
    accelerator.register_for_checkpointing = lambda obj: pytest.fail("registered before refusing")
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = AcceleratePruningHook(PruningConfig(start_step=1, end_step=4))
    with pytest.raises(NotImplementedError, match=match):
        hook.register(accelerator, model, opt)
    assert hook.pruner is None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("placement, error, match", [
    ("Shard(1)", NotImplementedError, r"layers\.1\.down\.weight.*tensor parallel"),
    # FSDP2-style Shard(0) is supported, but only for the whole model: one sharded target among whole ones is refused
    ("Shard(0)", ValueError, r"some targets are sharded \(FSDP2\) and some are not"),
])
def test_dtensor_parameters_the_pruner_cannot_follow_are_refused_under_a_plain_distributed_type(placement, error, match):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = TinyLM()
        mesh = init_device_mesh("cpu", (1,))
        weight = model.layers[1].down.weight.detach()
        dim = int(placement[-2])
        model.layers[1].down.weight = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(dim)]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = AcceleratePruningHook(PruningConfig(start_step=1, end_step=4))
        with pytest.raises(error, match=match):
            hook.register(_stub(DistributedType.MULTI_CPU), model, opt)
        assert hook.pruner is None and not opt._optimizer_step_pre_hooks
    finally:
        dist.destroy_process_group()


def test_zero3_style_parameters_are_refused():
    model = TinyLM()
    model.layers[0].up.weight.ds_id = 7  # what DeepSpeed ZeRO-3 attaches to its partitioned parameters
    with pytest.raises(NotImplementedError, match=r"layers\.0\.up\.weight"):
        AcceleratePruningHook(PruningConfig(start_step=1, end_step=4)).register(
            _stub(DistributedType.NO), model, torch.optim.SGD(model.parameters(), lr=0.1)
        )


@pytest.mark.parametrize("distributed_type", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_unsharded_setups_pass_the_check(distributed_type):
    check_accelerator_supported(_stub(distributed_type, fsdp_plugin=None, deepspeed_plugin=None))
    check_accelerator_supported(Accelerator(cpu=True))


# ---------------------------------------------------------------- trackers
class RecordingTracker(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def test_sparsity_reaches_trackers_every_log_every_steps():
    tracker = RecordingTracker()
    acc, model, opt, sched = _setup(accum=2, log_with=[tracker])
    acc.init_trackers("prune")
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=7, log_every=3)
    pruner = hook.register(acc, model, opt)
    for ids in random_batches(14):
        _train_step(acc, model, opt, sched, ids)
    assert [step for step, _ in tracker.logged] == [3, 6]
    report = hook.finalize()
    assert [step for step, _ in tracker.logged] == [3, 6, 7]
    step, values = tracker.logged[-1]
    # the one schema (prune_callbacks.core.figures), the same keys the Trainer callbacks log
    assert values["sparsity/global"] == report["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert values["sparsity/masks_target"] == values["sparsity/scheduled"] == 0.5
    assert values["pruning/mask_updates"] == pruner.mask_updates
    assert values["pruning/skipped_steps"] == 0
    assert values["sparsity/up"] == pytest.approx(report["per_group"]["layers.*.up"]["sparsity"])
    assert all(k.startswith(("sparsity/", "pruning/")) for k in values)
    mid = dict(tracker.logged)[3]
    assert 0 < mid["sparsity/global"] < 0.5  # logged as it happened, not at the end
    assert mid["sparsity/scheduled"] >= mid["sparsity/masks_target"]
    hook.finalize()
    assert len(tracker.logged) == 3  # finalize twice logs once


def test_nothing_is_logged_or_computed_without_trackers(monkeypatch):
    acc, model, opt, sched = _setup(accum=1)
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6, log_every=1)
    hook.register(acc, model, opt)
    monkeypatch.setattr(acc, "log", lambda *a, **k: pytest.fail("logged without trackers"))
    monkeypatch.setattr(hook, "log_values", lambda: pytest.fail("computed figures without trackers"))
    for ids in random_batches(6):
        _train_step(acc, model, opt, sched, ids)
    assert hook.finalize()["step"] == 6


def test_finalize_warns_when_the_schedule_did_not_finish():
    acc, model, opt, sched = _setup()
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6)
    hook.register(acc, model, opt)
    for ids in random_batches(3):
        _train_step(acc, model, opt, sched, ids)
    with pytest.warns(UserWarning, match="below final_sparsity"):
        hook.finalize()
    with pytest.raises(RuntimeError, match="already registered"):
        hook.register(acc, model, opt)


@pytest.mark.parametrize("final", [0.7, 0.95])
def test_finalize_does_not_warn_when_the_schedule_finished(final):
    # the measured sparsity of a finished schedule can come out as 0.6999999999999998 for 0.7 (float sums): that
    # is not "the run was shorter than total_steps"; the warning is for a run stopped before the schedule's end
    import warnings

    acc, model, opt, sched = _setup()
    hook = AcceleratePruningHook(PruningConfig(final_sparsity=final, start_step=1, end_step=3, update_every=1),
                                 total_steps=4)
    hook.register(acc, model, opt)
    for ids in random_batches(4):
        _train_step(acc, model, opt, sched, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hook.finalize()



def test_finalize_can_write_the_compressed_checkpoint(tmp_path):
    from helpers import tiny_llama_lm

    from prune_callbacks.export.sparse_io import load_sparse

    acc = Accelerator(cpu=True)
    model = tiny_llama_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    hook = AcceleratePruningHook(PruningConfig(final_sparsity=0.75, start_step=1, end_step=4, update_every=1), total_steps=5)
    hook.register(acc, model, opt)
    for ids in random_batches(5, vocab=97):
        acc.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    report = hook.finalize(save_sparse_to=tmp_path / "sparse")
    assert report["global_sparsity"] == pytest.approx(0.75, abs=1e-3)
    loaded = load_sparse(tmp_path / "sparse")
    expected = acc.unwrap_model(model).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_log_prefix_is_prepended_to_the_schema_keys():
    acc, model, opt, sched = _setup()
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6, log_prefix="train/")
    hook.register(acc, model, opt)
    assert set(hook.log_values()) >= {"train/sparsity/global", "train/sparsity/scheduled", "train/sparsity/masks_target"}


def test_more_steps_than_total_steps_warn_once_with_the_numbers():
    acc, model, opt, sched = _setup()
    hook = AcceleratePruningHook(PruningConfig(**CFG), total_steps=6, log_every=0)
    hook.register(acc, model, opt)
    with pytest.warns(UserWarning, match=r"optimizer step 7 is beyond total_steps=6") as caught:
        for ids in random_batches(9):
            _train_step(acc, model, opt, sched, ids)
    assert len([w for w in caught if "beyond total_steps" in str(w.message)]) == 1
    assert hook.pruner.step == 9


def test_total_steps_counted_from_the_prepared_dataloader():
    import warnings

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(torch.cat(random_batches(7, batch=2)), batch_size=2)  # 7 batches
    model, opt, loader = acc.prepare(model, opt, loader)
    hook = AcceleratePruningHook(PruningConfig(final_sparsity=0.5, start_step=0.2, end_step=0.8, update_every=1))
    pruner = hook.register(acc, model, opt, train_dataloader=loader, num_epochs=2)
    assert hook.total_steps == 8 == count_optimizer_steps(7, 2, 2)  # ceil(7 / 2) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overrun warning: the count is the real one
        for _ in range(2):
            for ids in loader:
                with acc.accumulate(model):
                    acc.backward(lm_loss(model, ids))
                    opt.step()
                    opt.zero_grad()
    assert pruner.step == 8
    assert hook.finalize()["global_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_list_of_configs_reaches_the_pruner():
    a = PruningConfig(final_sparsity=0.5, include=["up"], start_step=1, end_step=3, update_every=1)
    b = PruningConfig(final_sparsity=0.25, include=["down"], start_step=1, end_step=3, update_every=1)
    hook = AcceleratePruningHook([a, b], total_steps=4)
    assert hook.config == [a, b]
    acc, model, opt, sched = _setup()
    hook.register(acc, model, opt)
    for ids in random_batches(4):
        _train_step(acc, model, opt, sched, ids)
    report = hook.finalize()
    assert [g["mask_sparsity"] for g in report["groups"]] == [0.5, 0.25]
    assert report["per_group"]["layers.*.up"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # one layer kind per config


def test_recovery_lr_scale_on_real_steps_only():
    """recovery_lr_scale under gradient accumulation: the factor follows optimizer steps (cut after step 3 of 7, ramp
    1), the scheduler's rates are untouched, and pruning/lr_factor reaches the trackers."""
    tracker = RecordingTracker()
    acc, model, opt, sched = _setup(accum=2, log_with=[tracker])
    acc.init_trackers("prune")
    hook = AcceleratePruningHook(PruningConfig(final_sparsity=0.5, schedule="oneshot", start_step=3,
                                               recovery_lr_scale=2.0), total_steps=7, log_every=1)
    hook.register(acc, model, opt)
    inner = opt.optimizer
    stepped = []
    inner.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))
    scheduled = []
    for ids in random_batches(14):
        _train_step(acc, model, opt, sched, ids)
        if acc.sync_gradients:
            scheduled.append(inner.param_groups[0]["lr"])
    assert len(stepped) == 7
    base = [1e-2 / (1 + 0.1 * s) for s in range(7)]  # _setup's LambdaLR, one step per optimizer step
    assert stepped == pytest.approx([b * f for b, f in zip(base, [1, 1, 1, 2, 2, 2, 2])])
    assert scheduled == pytest.approx([1e-2 / (1 + 0.1 * s) for s in range(1, 8)])
    assert [values["pruning/lr_factor"] for _, values in tracker.logged] == [1, 1, 1, 2, 2, 2, 2]
