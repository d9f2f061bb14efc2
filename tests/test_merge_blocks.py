"""Merging removed blocks into the kept block before them (prune_callbacks.methods.structured.block_merging).

The invariant: with more FFN neurons than calibration tokens and a tiny ridge, the refit is exact on those tokens, so
at a learning rate of 0 the folded model's logits on the calibration batch equal the unpruned model's; dropping the
same blocks changes them. Over every architecture of the support table (tests/support_matrix.py).
"""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.export import slim_pruned  # noqa: E402
from prune_callbacks.methods.structured import StructuredUnitsError, block_layout  # noqa: E402
from prune_callbacks.methods.structured.block_merging import BlockMerger, blocks_fold_refusal  # noqa: E402
from prune_callbacks.methods.structured.merging import MergeConfig  # noqa: E402

from support_matrix import CASES, batch, build, logits  # noqa: E402

#: the norm over the FFN output before the residual add (post_feedforward_layernorm): no linear fold exists
REFUSED = {"Gemma 2": "normalised before the residual add", "OLMo-2": "normalised before the residual add"}
#: max |logit difference| of the fold on its own calibration tokens. The statistics are float32 sums (float64 solve):
#: a damping below their rounding (1e-9) amplifies it where there are fewer tokens than inputs (4e-4 on an AMD EPYC,
#: under 2e-4 on the Intel machines); 1e-6 is exact to ~1e-6 on both, so the tests use it.
EXACT = 2e-4


def _first_blocks(model) -> list[str]:
    """Regexes excluding the first block of every block list (a run there has no kept block before it)."""
    layout = block_layout(model)
    return [rf"^{re.escape(blocks[0])}\." for _, blocks in layout.stacks]


def _oneshot(model, inputs, merge, sparsity=1 / 3, steps=2, exclude=None):
    """lr 0, eval mode (no dropout): the weights change only by the pruning at step ``steps``."""
    config = PruningConfig(granularity="blocks", final_sparsity=sparsity, schedule="oneshot", start_step=steps,
                           merge=merge, exclude=_first_blocks(model) if exclude is None else exclude)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=steps + 1).attach(optimizer)
    model.eval()
    for _ in range(steps):
        out = model(**inputs)
        (out.logits.float().pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return pruner


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in REFUSED], ids=lambda c: c.name)
def test_fold_is_exact_on_its_calibration_tokens_drop_is_not(case):
    inputs, _ = batch(case, 1)
    model = build(case)
    before = logits(model, inputs)
    pruner = _oneshot(model, inputs, {"damping": 1e-6})
    folded = logits(model, inputs)
    dropped_model = build(case)
    plain = _oneshot(dropped_model, inputs, None)
    dropped = logits(dropped_model, inputs)
    report = pruner.report()["groups"][0]["merge"]
    assert pruner.groups[0].granularity.keep() == plain.groups[0].granularity.keep()  # same blocks either way
    assert report["blocks"] >= 1 and report["dropped"] == []
    folded_err, dropped_err = (folded - before).abs().max(), (dropped - before).abs().max()
    assert folded_err <= EXACT
    assert folded_err < dropped_err / 50
    assert not pruner.groups[0].merger.armed
    assert _hooks(model) == _hooks(build(case))  # the statistics' hooks are gone after the update


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) - \
        sum(1 for m in model.modules() if m._forward_hooks and "skip" in str(list(m._forward_hooks.values())))


@pytest.mark.parametrize("name", list(REFUSED))
def test_fold_refused_where_the_ffn_output_is_normalised(name):
    case = next(c for c in CASES if c.name == name)
    model = build(case)
    with pytest.raises(StructuredUnitsError, match=REFUSED[name]) as exc:
        Pruner(model, PruningConfig(granularity="blocks", final_sparsity=1 / 3, merge=True))
    assert blocks_fold_refusal(model) == str(exc.value)  # what `analyze` records, before any Pruner is built


def test_fold_refused_for_post_ln_opt():
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False)
    model = transformers.OPTForCausalLM(cfg)
    with pytest.raises(StructuredUnitsError, match="do_layer_norm_before=False") as exc:
        Pruner(model, PruningConfig(granularity="blocks", final_sparsity=1 / 3, merge=True))
    assert blocks_fold_refusal(model) == str(exc.value)


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in REFUSED], ids=lambda c: c.name)
def test_blocks_fold_refusal_is_none_where_the_merger_builds(case):
    model = build(case)
    assert blocks_fold_refusal(model) is None
    Pruner(model, PruningConfig(granularity="blocks", final_sparsity=1 / 3, merge=True), total_steps=10)


def test_blocks_fold_refusal_names_a_model_without_a_block_family():
    refusal = blocks_fold_refusal(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))
    assert isinstance(refusal, str) and refusal


def _llama(layers=6, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def test_gradual_schedule_folds_at_every_update_and_slims():
    """Blocks removed over several updates, each run folded from that window's statistics (runs join through blocks
    already removed); the result stays exact on the calibration tokens, and slim keeps it."""
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model = _llama(layers=8)  # 7 blocks in scope: 2, 3, 4 removed at the updates of steps 4, 6, 8
    before = logits(model, {"input_ids": ids})
    config = PruningConfig(granularity="blocks", final_sparsity=0.5, start_step=2, end_step=8, update_every=2,
                           merge={"damping": 1e-6, "calibration_steps": 1}, exclude=_first_blocks(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=12).attach(optimizer)
    model.eval()
    for _ in range(12):
        model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    report = pruner.report()["groups"][0]["merge"]
    assert report["updates"] == 3 and report["blocks"] >= 2 and report["dropped"] == []
    assert sum(not k for k in pruner.groups[0].granularity.keep()) == 4
    masked = logits(model, {"input_ids": ids})
    assert (masked - before).abs().max() <= EXACT
    slim_pruned(model, pruner)
    assert len(model.model.layers) == 4
    assert (logits(model, {"input_ids": ids}) - masked).abs().max() <= 1e-5


def test_padding_tokens_are_left_out_of_the_fit():
    """More tokens than FFN neurons, but fewer real ones: exact on the real tokens only because padding is skipped."""
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 40), generator=g)
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :9], mask[1, :11] = 1, 1  # 20 real tokens < 25 = neurons + bias; 80 rows in all
    inputs = {"input_ids": ids, "attention_mask": mask}
    before = logits(model, inputs)
    _oneshot(model, inputs, {"damping": 1e-6})
    real = mask.bool()
    assert (logits(model, inputs)[real] - before[real]).abs().max() <= EXACT


def test_runs_join_through_removed_blocks_and_stop_at_block_lists():
    case = next(c for c in CASES if c.name == "T5")  # two block lists of 3
    model = build(case)
    pruner = Pruner(model, PruningConfig(granularity="blocks", final_sparsity=1 / 3, merge=True), total_steps=10)
    merger = pruner.groups[0].merger
    assert isinstance(merger, BlockMerger)
    T, F = True, False
    #            encoder    decoder
    was = [F, T, F, F, F, F]
    now = [F, T, T, T, F, T]
    assert merger._runs(was, now) == [(0, 2), (None, 3), (4, 5)]  # 1 already removed: the run 1-2 folds into 0
    assert merger._runs([F] * 6, [F, F, T, F, T, T]) == [(1, 2), (3, 5)]
    assert merger._runs(now, now) == []


def test_update_without_statistics_drops_with_a_warning(caplog):
    model = _llama(layers=3)
    pruner = Pruner(model, PruningConfig(granularity="blocks", final_sparsity=1 / 3, merge=True, start_step=50,
                                         schedule="oneshot"), total_steps=100)
    merger = pruner.groups[0].merger
    assert not merger.armed  # the update is far away: no hooks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING", logger="prune_callbacks.methods.structured.block_merging"):
        merger.fold([torch.zeros(1, dtype=torch.bool)] * 3, [torch.tensor([False]), torch.tensor([True]),
                                                             torch.tensor([False])])
    assert "no calibration statistics" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert merger.report()["merge"]["dropped"] == ["model.layers.1"]


def test_merge_config_accepted_for_blocks():
    config = PruningConfig(granularity="blocks", final_sparsity=0.5, merge=True)
    assert config.merge == MergeConfig()


def test_select_fold_removes_the_blocks_whose_fold_errs_least():
    """merge.select='fold': with more tokens than neurons the fits are not exact; one block out of five is chosen
    with the least fold error of all candidates (exhaustive), never more than the saliency's choice."""
    model = _llama(layers=6, seed=1)
    ids = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))  # 128 rows > 65 inputs
    config = PruningConfig(granularity="blocks", final_sparsity=0.2, schedule="oneshot", start_step=3,
                           merge={"select": "fold"}, exclude=_first_blocks(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=10).attach(optimizer)
    merger = pruner.groups[0].merger
    model.eval()
    for _ in range(2):  # inside the window, before the update at step 3
        model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    masks = [torch.zeros(1, dtype=torch.bool) for _ in merger._scope]
    costs = {}
    for i, block in enumerate(merger._scope):
        trial = [m.clone() for m in masks]
        trial[i][0] = True
        (p, q), = merger._runs(merger._removed(masks), merger._removed(trial))
        costs[i] = merger._cost(p, q, {})
    assert len(set(costs.values())) == len(costs) and all(0 < c < float("inf") for c in costs.values())
    for saliency_choice in costs:
        new = [m.clone() for m in masks]
        new[saliency_choice][0] = True
        chosen = merger.choose(masks, new)
        assert [bool(m) for m in chosen] == [i == min(costs, key=costs.get) for i in costs]

