"""Contract suite: every registered granularity x every way to run it x what must hold, in one table.

`CASES` is the single place that says what is covered: one row (a dict) per granularity x path x check,
with ``where`` naming the test that proves the cell: ``"here"`` (a parametrised test of this module),
another test (``tests/<file>.py::<test>``) that already covers it, or ``None`` with ``why`` it is not run.
A new granularity adds a row to `GRANULARITIES` (a test fails until it does); a docs page can render
`CASES` as a support matrix.

Paths: ``plain`` (a torch loop with ``Pruner.attach``), ``trainer`` (``make_callbacks`` + HF ``Trainer``),
``accelerate`` (``AcceleratePruningHook`` in a single-process loop), ``recipe`` (``prune-callbacks finetune``
on a local tiny model), ``fsdp2`` (a plain torch loop under FSDP2 ``fully_shard``, torchrun + gloo: every cell
points to ``tests/test_fsdp2.py``, which compares the sharded pruner with a single process, or says why it is
not run; Accelerate's and the Trainer's FSDP plugins are refused by those adapters, see
docs/sharded-training.md). Checks:

* ``exact_count``: the weights that are exactly zero after the last step are the count the granularity
  promises, derived here from the config and the shapes alone (not from the engine). ``low_rank`` removes
  parameters, not weights: its count is measured from the weights' numerical ranks (a ``[m, n]`` weight of
  rank ``r < mn/(m+n)`` is ``m*n - r*(m+n)`` removed parameters, else none) and must meet the budget
  ``round(final_sparsity * targeted)`` and exceed it by less than one rank step (``max(m + n)``);
* ``zeros_stay_zero``: a weight that is zero after an optimizer step stays zero after every later one
  (AdamW's momentum and weight decay would otherwise move it). For ``low_rank`` the invariant is the
  subspace: a weight's numerical rank never grows after an optimizer step (a removed singular direction
  stays removed while AdamW keeps training the weight);
* ``resume_exact``: a run interrupted mid-schedule and resumed from its checkpoint (fresh objects)
  ends with the straight run's masks and weights, bitwise;
* ``report``: ``report()`` (the recipe's report.json) states those counts;
* ``export``: structured granularities slim (the cut model computes what the masked one did, its config
  says the new width, and it reloads with plain ``from_pretrained``); element-wise ones save and reload
  with every zero kept and the same outputs; ``low_rank`` factorises (``export_pruned``: two thin Linears
  computing what the rank-r model did, holding exactly the measured count fewer parameters), round-trips
  through ``save_low_rank`` / ``load_low_rank`` bitwise and ``densify`` gives a plain
  ``from_pretrained`` folder with the same outputs;
* ``ddp_identical_masks``: two processes (torchrun, gloo) hold the same masks at every update although
  their data and (on rank 1) their saliency differ. One launch runs every granularity; this module is
  its script (``__main__``).

Every model is a tiny Llama built from a config (4 blocks, 4 query heads in 2 KV groups, FFN width 48).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import digest, end_world, rank_results, reset_accelerate_state, run_torchrun, tiny_llama_lm  # noqa: E402

from prune_callbacks import Pruner, PruningConfig  # noqa: E402

LLAMA = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
STEPS, INTERRUPT_AT = 8, 4  # optimizer steps; the resumed runs stop after INTERRUPT_AT and continue
SCHEDULE = dict(start_step=1, end_step=6, update_every=1)

#: one row per granularity; ``registered``: the registry name it instantiates (``N:M`` for ``2:4``)
GRANULARITIES: list[dict[str, Any]] = [
    dict(granularity="unstructured", registered="unstructured", config=dict(final_sparsity=0.5), slim=False),
    dict(granularity="2:4", registered="N:M", config=dict(), slim=False),
    dict(granularity="ffn_neurons", registered="ffn_neurons", config=dict(final_sparsity=0.5), slim=True),
    dict(granularity="attention_heads", registered="attention_heads", config=dict(final_sparsity=0.5), slim=True),
    dict(granularity="blocks", registered="blocks", config=dict(final_sparsity=0.5), slim=True),
    dict(granularity="low_rank", registered="low_rank", config=dict(final_sparsity=0.5), slim=False),
    # SR-STE: pruned weights return while masks are revisited (start_step .. end_step); zeros are fixed after that
    dict(granularity="2:4-srste", registered="N:M-srste", config=dict(granularity_settings={"decay": 0.01}),
         slim=False, revisits=True),
]
PATHS = ("plain", "trainer", "accelerate", "recipe", "fsdp2")
CHECKS = ("exact_count", "zeros_stay_zero", "resume_exact", "report", "export", "ddp_identical_masks")

_TRAINER_DDP = "tests/test_trainer_ddp.py::test_ddp_ranks_hold_identical_masks"
_SLIM_DDP = "tests/test_slim_ddp.py::test_ddp_ranks_end_with_identical_slimmed_weights"
_ACCELERATE_DDP = "tests/test_accelerate_multiprocess.py::test_two_processes_hold_identical_masks_at_every_update"
_RECIPE_RESUME = "tests/test_lifecycle.py::test_ctrl_c_keeps_the_checkpoints_and_resume_continues_exactly"
_ADAPTERS_ADD_NO_MASK_LOGIC = ("the masks are chosen and broadcast by the Pruner alone (proven per granularity by the "
                               "plain ddp row); this adapter only calls it")
_F = "tests/test_fsdp2.py::"
_F_SAME = _F + "test_masks_bitwise_equal_to_single_process"
_F_FFN = _F + "test_ffn_neurons_sharded_then_slimmed_from_the_full_state_dict"
_F_FOUR = _F + "test_four_ranks_and_resume_resharded_from_two"
_F_REFUSED = _F + "test_unsupported_sharding_refused_with_its_reason"
_F_ZEROS = ("not run sharded for this granularity: the zeros are the same local-row write after each step as "
            "unstructured's (its fsdp2 cell)")
_F_RESUME = "DCP resume is tested with unstructured masks (the unstructured fsdp2 cell); not run for this granularity"
_F_EXPORT = ("not run sharded: finalize + gathered full state dict are tested with unstructured (its fsdp2 cell), "
             "the same path")
_F_LOW_RANK = ("refused under FSDP2 (tests/test_fsdp2.py::test_unsupported_sharding_refused_with_its_reason): the SVD "
               "needs the whole weight and each rank holds rows")
#: the ``fsdp2`` path: cells proven by tests/test_fsdp2.py (2 and 4 CPU ranks against a single process), or why not
_FSDP2: dict[str, dict[str, tuple[Optional[str], str]]] = {
    "unstructured": {
        "exact_count": (_F + "test_pruned_count_exact_and_memory_per_rank",
                        "global scope, 2 ranks: pruned count = round(sparsity x prunable) on every rank"),
        "zeros_stay_zero": (_F + "test_attach_loop_keeps_pruned_weights_zero",
                            "AdamW loop through attach(): masked local rows are zero after every step"),
        "resume_exact": (_F_SAME, "case resume: DCP save at step 4, fresh pruner, masks bitwise a single process's; "
                                  "and a 2-rank checkpoint resumed by 4 ranks"),
        "report": (_F_SAME, "report() on every rank equals the single-process report (global figures)"),
        "export": (_F + "test_finalize_full_state_dict_loads_with_vanilla_from_pretrained",
                   "finalize, gathered full state dict, vanilla from_pretrained with every zero; save_sparse round trip"),
        "ddp_identical_masks": (_F_SAME, "every rank's rows equal the single-process masks at every update"),
    },
    "2:4": {
        "exact_count": (_F_SAME, "case nm: masks bitwise a single process's (the plain row proves its count)"),
        "zeros_stay_zero": (None, _F_ZEROS),
        "resume_exact": (None, _F_RESUME),
        "report": (_F_SAME, "case nm: report() on every rank equals the single-process report"),
        "export": (None, _F_EXPORT),
        "ddp_identical_masks": (_F_SAME, "case nm: every rank's rows equal the single-process masks at every update"),
    },
    "ffn_neurons": {
        "exact_count": (_F_FFN, "48 of 96 neurons kept per block, unit masks equal a single process's"),
        "zeros_stay_zero": (None, _F_ZEROS),
        "resume_exact": (None, _F_RESUME),
        "report": (_F_FFN, "report() on every rank equals the single-process report"),
        "export": (_F_FFN, "slimmed on rank 0 from the gathered full state dict, same logits"),
        "ddp_identical_masks": (_F_FFN, "unit masks equal on every rank and to a single process's at every update"),
    },
    "attention_heads": {
        "exact_count": (_F_FOUR, "case heads, 4 ranks: 1 of 2 KV groups kept per block, masks a single process's"),
        "zeros_stay_zero": (None, _F_ZEROS),
        "resume_exact": (None, _F_RESUME),
        "report": (_F_FOUR, "case heads: report() on every rank equals the single-process report"),
        "export": (None, "not run sharded: slimming from the gathered state is tested with ffn_neurons (its fsdp2 "
                         "cell), the same path"),
        "ddp_identical_masks": (_F_FOUR, "case heads: KV groups straddling two ranks, masks equal at every update"),
    },
    "blocks": {check: (_F_REFUSED, "refused: NotImplementedError when the Pruner is built (the forward-skip hook "
                                   "is untested beside FSDP2's hooks)") for check in CHECKS},
    "low_rank": {check: (None, _F_LOW_RANK) for check in CHECKS},
    "2:4-srste": {check: (_F_REFUSED, "refused: NotImplementedError when the Pruner is built (its dense shadow "
                                      "copies of local rows are untested beside FSDP2)") for check in CHECKS},
}
#: cells proven by another test, or not run (``None`` with the reason); every other cell is tested here
ELSEWHERE: dict[tuple[str, str, str], tuple[Optional[str], str]] = {
    ("unstructured", "trainer", "ddp_identical_masks"): (_TRAINER_DDP, "BERT, 2 ranks, masks after every update"),
    ("ffn_neurons", "trainer", "ddp_identical_masks"): (_SLIM_DDP, "ffn_neurons + blocks in one run, slimmed"),
    ("blocks", "trainer", "ddp_identical_masks"): (_SLIM_DDP, "ffn_neurons + blocks in one run, slimmed"),
    ("2:4", "trainer", "ddp_identical_masks"): (None, _ADAPTERS_ADD_NO_MASK_LOGIC),
    ("2:4-srste", "trainer", "ddp_identical_masks"): (None, _ADAPTERS_ADD_NO_MASK_LOGIC),
    ("attention_heads", "trainer", "ddp_identical_masks"): (None, _ADAPTERS_ADD_NO_MASK_LOGIC),
    ("unstructured", "accelerate", "ddp_identical_masks"): (_ACCELERATE_DDP, "accelerate launch, 2 CPU ranks"),
    **{(g["granularity"], "accelerate", "ddp_identical_masks"): (None, _ADAPTERS_ADD_NO_MASK_LOGIC)
       for g in GRANULARITIES if g["granularity"] != "unstructured"},
    ("unstructured", "recipe", "resume_exact"): (_RECIPE_RESUME, "tiny BERT, interrupted by Ctrl-C, --resume"),
    **{(g["granularity"], "recipe", "resume_exact"): (
        None, "the recipe resumes through the Trainer's checkpoints (the trainer row of this granularity)")
       for g in GRANULARITIES if g["granularity"] != "unstructured"},
    **{(g["granularity"], "recipe", "ddp_identical_masks"): (
        None, "the CLI under torchrun trains through the Trainer callbacks (the trainer row)") for g in GRANULARITIES},
    ("low_rank", "trainer", "ddp_identical_masks"): (None, _ADAPTERS_ADD_NO_MASK_LOGIC),
    ("low_rank", "trainer", "resume_exact"): (
        "tests/test_low_rank.py::test_trainer_checkpoint_resume_is_exact",
        "tiny Llama through the Trainer callbacks, checkpoint holds the bases, weights bitwise"),
    ("low_rank", "recipe", "export"): (
        "tests/test_low_rank_adapters.py::test_recipe_slim_writes_a_low_rank_checkpoint_equal_to_the_projected_model",
        "output.slim: true factorises and writes model.low_rank.safetensors; load_low_rank gives equal logits"),
    **{(g["granularity"], "fsdp2", check): cell for g in GRANULARITIES for check, cell in _FSDP2[g["granularity"]].items()},
}

CASES: list[dict[str, Any]] = [
    {"granularity": g["granularity"], "registered": g["registered"], "path": path, "check": check,
     **({"where": ELSEWHERE[(g["granularity"], path, check)][0], "why": ELSEWHERE[(g["granularity"], path, check)][1]}
        if (g["granularity"], path, check) in ELSEWHERE else {"where": "here"})}
    for g in GRANULARITIES for path in PATHS for check in CHECKS
]


def _row(granularity: str) -> dict:
    return next(g for g in GRANULARITIES if g["granularity"] == granularity)


def _config(granularity: str) -> PruningConfig:
    row = _row(granularity)
    return PruningConfig(granularity=row["granularity"], **row["config"], **SCHEDULE)


#: cells that fail today because of a known defect of the engine (strict: they fail loudly once it is fixed)
KNOWN_DEFECTS: dict[tuple[str, str, str], str] = {}


def _here(check: str) -> list:
    cells = [(c["granularity"], c["path"]) for c in CASES if c["check"] == check and c["where"] == "here"]
    return [pytest.param(g, p, id=f"{g}-{p}", marks=[pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[g, p, check])]
                         if (g, p, check) in KNOWN_DEFECTS else [])
            for g, p in cells if p != "recipe" or check != "ddp_identical_masks"]


# ------------------------------------------------------------ what each granularity promises (shapes only)
def _blocks(model) -> list:
    return list(model.model.layers)


def _target_weights(model, granularity: str) -> dict[str, torch.Tensor]:
    """The 2-D weights a granularity prunes (the default targets: every Linear inside the blocks)."""
    out = {}
    for i, block in enumerate(_blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"model.layers.{i}.{name}"] = module.weight
    return out


def expected_pruned(granularity: str, cfg) -> int:
    """Weights zero at the end, from the config of the (dense) model and the granularity's rule."""
    s = _row(granularity)["config"].get("final_sparsity")
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    block = attn + 3 * h * inter
    if granularity == "unstructured":
        return round(s * layers * block)
    if granularity in ("2:4", "2:4-srste"):
        return layers * block // 2
    if granularity == "ffn_neurons":
        return layers * round(s * inter) * 3 * h
    if granularity == "attention_heads":
        per_group = (heads // kv) * hd * h * 2 + 2 * hd * h  # q rows + o columns, k and v rows
        return layers * round(s * kv) * per_group
    if granularity == "blocks":
        return round(s * layers) * block
    raise AssertionError(f"no expected count for {granularity!r}: add it with its row")


def _low_rank(granularity: str) -> bool:
    return _row(granularity)["registered"] == "low_rank"


def expected_range(granularity: str, cfg) -> tuple[int, int]:
    """``(lowest, highest)`` count the granularity may end with: one number, except for ``low_rank``, which meets
    its budget by whole rank steps (it may exceed it by less than one step, ``m + n`` parameters of one target)."""
    if not _low_rank(granularity):
        return (expected_pruned(granularity, cfg),) * 2
    shapes = [tuple(w.shape) for w in _target_weights(_model(), granularity).values()]
    budget = round(_row(granularity)["config"]["final_sparsity"] * sum(m * n for m, n in shapes))
    return budget, budget + max(m + n for m, n in shapes) - 1


#: a singular value below this fraction of the largest counts as zero: a rank-r projection in float32 leaves at
#: most ~2e-7 in the removed directions (measured on this table's plain run), while an untouched square weight
#: can have a small natural singular value (4e-5 seen on a trained 32 x 32 o_proj; 1.2e-4 the smallest kept)
RANK_RTOL = 2e-6


def removed(weights: dict[str, torch.Tensor], granularity: str) -> tuple[int, dict[str, torch.Tensor]]:
    """``(count removed, per weight: what is removed as bools)``, measured from the weights alone: the zeros, or for
    ``low_rank`` the singular directions beyond each weight's numerical rank (a suffix of ``min(m, n)`` bools) and
    the parameters a factorisation at that rank saves (none at or above break-even)."""
    if not _low_rank(granularity):
        zeros = {n: (w.detach() == 0).clone() for n, w in weights.items()}
        return sum(int(z.sum()) for z in zeros.values()), zeros
    count, gone = 0, {}
    for n, w in weights.items():
        m, k = w.shape
        sigma = torch.linalg.svdvals(w.detach().float())
        r = int((sigma > RANK_RTOL * sigma[0]).sum())
        count += m * k - r * (m + k) if r * (m + k) < m * k else 0
        gone[n] = torch.arange(min(m, k)) >= r
    return count, gone


# ------------------------------------------------------------ one run, observed after every optimizer step
@dataclass
class Outcome:
    zero_counts: list = field(default_factory=list)  # zeros in the targets after each optimizer step
    revived: int = 0  # zero weights that were nonzero again after a later step
    revived_at: list = field(default_factory=list)  # (optimizer step, zero weights nonzero again at that step)
    report: Optional[dict] = None  # the pruner's report after the last step
    masked_logits: Optional[torch.Tensor] = None  # the masked model's output after the last step
    export: dict = field(default_factory=dict)
    final_masks: list = field(default_factory=list)
    final_state: dict = field(default_factory=dict)
    dense_config: Any = None


class Observer:
    """Called after every optimizer step: zeros only ever grow; the last step's report and outputs."""

    def __init__(self, granularity: str, outcome: Outcome, probe: torch.Tensor):
        self.granularity, self.outcome, self.probe = granularity, outcome, probe
        self.previous: Optional[dict] = None

    def __call__(self, model, pruner, step: int) -> None:
        count, now = removed(_target_weights(model, self.granularity), self.granularity)
        if self.previous is not None:
            back = sum(int((self.previous[n] & ~now[n]).sum()) for n in now)
            self.outcome.revived += back
            self.outcome.revived_at.append((step, back))
        self.previous = now
        self.outcome.zero_counts.append(count)
        if step == STEPS:
            self.outcome.report = pruner.report()
            self.outcome.masked_logits = _logits(model, self.probe)


def _logits(model, ids) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits.clone()
    model.train(was)
    return out


def _batches(n: int, seed: int = 1, batch: int = 4, seq: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (batch, seq), generator=g) for _ in range(n)]


PROBE = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(7))


def _model(seed: int = 0):
    return tiny_llama_lm(seed=seed, **LLAMA)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _export(model, granularity: str, out: Path, outcome: Outcome, probe: torch.Tensor = PROBE, pruner=None) -> None:
    """Save with plain save_pretrained, reload with plain from_pretrained, record what the checks compare
    (``low_rank`` with its ``pruner``: factorise, save_low_rank / load_low_rank, densify)."""
    from transformers import AutoModelForCausalLM

    if pruner is not None and _low_rank(granularity):
        from prune_callbacks.export.dispatch import export_pruned
        from prune_callbacks.export.low_rank import densify, load_low_rank, save_low_rank

        summary = export_pruned(model, pruner)["factorize_granularities"]
        save_low_rank(model, out)
        loaded = load_low_rank(out)
        mine, theirs = model.state_dict(), loaded.state_dict()
        dense = AutoModelForCausalLM.from_pretrained(densify(out, out.parent / "densified"))
        outcome.export = {
            "logits": _logits(model, probe), "reloaded_logits": _logits(loaded, probe),
            "dense_logits": _logits(dense, probe),
            "state_equal": mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine),
            "params": sum(p.numel() for p in model.parameters()), "summary": summary,
            "dense_params": sum(p.numel() for p in dense.parameters()),
        }
        return
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    outcome.export = {
        "config": {k: getattr(reloaded.config, k) for k in ("num_hidden_layers", "intermediate_size",
                                                             "num_key_value_heads", "num_attention_heads")},
        "logits": _logits(model, probe),
        "reloaded_logits": _logits(reloaded, probe),
        "reloaded_zeros": sum(int((w == 0).sum()) for w in _target_weights(reloaded, granularity).values()),
        "params": sum(p.numel() for p in reloaded.parameters()),
    }


# ------------------------------------------------------------ the paths
def run_plain(granularity: str, tmp: Path, interrupt: bool = False) -> Outcome:
    outcome = Outcome()
    model = _model()
    outcome.dense_config = copy.deepcopy(model.config)
    observe = Observer(granularity, outcome, PROBE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = Pruner(model, _config(granularity)).attach(opt)
    for step, ids in enumerate(_batches(STEPS), start=1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        observe(model, pruner, step)
        if interrupt and step == INTERRUPT_AT:  # fresh objects, other initial weights: all from the saved states
            saved = (_state(model), opt.state_dict(), pruner.state_dict())
            pruner.detach()
            model = _model(seed=1)
            model.load_state_dict(saved[0])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            opt.load_state_dict(saved[1])
            pruner = Pruner(model, _config(granularity))
            pruner.load_state_dict(saved[2])
            pruner.attach(opt)
    outcome.final_masks = [m.clone() for m in pruner.pruned]
    if _row(granularity)["slim"]:
        from prune_callbacks.export import slim_pruned

        slim_pruned(model, pruner)
    else:
        pruner.finalize()
    outcome.final_state = _state(model)
    _export(model, granularity, tmp / "export", outcome, pruner=pruner)
    return outcome


def _rows(n: int) -> list[dict]:
    return [{"input_ids": ids.tolist(), "labels": ids.tolist()} for batch in _batches(n) for ids in batch]


def run_trainer(granularity: str, tmp: Path, interrupt: bool = False) -> Outcome:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from prune_callbacks.integrations.trainer import make_callbacks

    outcome = Outcome()
    observe = Observer(granularity, outcome, PROBE)

    class Observe(TrainerCallback):
        def __init__(self, callbacks, stop_at=None):
            self.callbacks, self.stop_at = callbacks, stop_at

        def on_step_end(self, args, state, control, model=None, **kw):
            observe(model, self.callbacks.pruner, state.global_step)
            if state.global_step == self.stop_at:
                control.should_training_stop = True

    def trainer(out: Path, stop_at=None, seed=0):
        callbacks = make_callbacks(_config(granularity), slim=_row(granularity)["slim"])
        model = _model(seed)
        outcome.dense_config = outcome.dense_config or copy.deepcopy(model.config)
        args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps",
                                 save_steps=INTERRUPT_AT, max_steps=STEPS, per_device_train_batch_size=4,
                                 learning_rate=1e-2, weight_decay=0.1, disable_tqdm=True, seed=0, logging_steps=4)
        t = Trainer(model=model, args=args, train_dataset=_rows(STEPS), callbacks=[*callbacks, Observe(callbacks, stop_at)])
        t.model_accepts_loss_kwargs = False
        return t, callbacks

    if interrupt:
        first, _ = trainer(tmp / "run", stop_at=INTERRUPT_AT)
        first.train()
        outcome.zero_counts.clear()
        observe.previous = None
        t, callbacks = trainer(tmp / "run", seed=1)
        t.train(resume_from_checkpoint=str(tmp / "run" / f"checkpoint-{INTERRUPT_AT}"))
    else:
        t, callbacks = trainer(tmp / "run")
        t.train()
    outcome.final_masks = [m.clone() for m in callbacks.pruner.pruned]
    outcome.final_state = _state(t.model)
    _export(t.model, granularity, tmp / "export", outcome, pruner=callbacks.pruner)
    return outcome


def run_accelerate(granularity: str, tmp: Path, interrupt: bool = False) -> Outcome:
    from accelerate import Accelerator

    from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

    outcome = Outcome()
    observe = Observer(granularity, outcome, PROBE)

    def setup(seed=0):
        reset_accelerate_state()
        acc = Accelerator(cpu=True)
        model = _model(seed)
        outcome.dense_config = outcome.dense_config or copy.deepcopy(model.config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, opt = acc.prepare(model, opt)
        hook = AcceleratePruningHook(_config(granularity), total_steps=STEPS)
        hook.register(acc, model, opt)
        return acc, model, opt, hook

    acc, model, opt, hook = setup()
    try:
        for step, ids in enumerate(_batches(STEPS), start=1):
            with acc.accumulate(model):
                acc.backward(model(input_ids=ids, labels=ids).loss)
                opt.step()
                opt.zero_grad()
            observe(acc.unwrap_model(model), hook.pruner, step)
            if interrupt and step == INTERRUPT_AT:
                acc.save_state(str(tmp / "ckpt"))
                acc, model, opt, hook = setup(seed=1)
                acc.load_state(str(tmp / "ckpt"))
        outcome.final_masks = [m.clone() for m in hook.pruner.pruned]
        hook.finalize(slim=_row(granularity)["slim"])
        bare = acc.unwrap_model(model)
        outcome.final_state = _state(bare)
        _export(bare, granularity, tmp / "export", outcome, pruner=hook.pruner)
    finally:
        reset_accelerate_state()
    return outcome


def run_recipe(granularity: str, tmp: Path, interrupt: bool = False) -> Outcome:
    """``prune-callbacks finetune`` on a local tiny Llama; the Observer reads the saved checkpoints."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prune_callbacks.cli import main
    from test_cli_finetune import WORDS, _tiny_causal_dir

    assert not interrupt, "recipe resume is covered elsewhere (see CASES)"
    outcome = Outcome()
    model_dir = tmp / "tiny-lm"
    _tiny_causal_dir(model_dir)  # its tokenizer; the model replaced by this table's geometry
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def make():
        return tiny_llama_lm(seed=0, vocab_size=vocab, pad_token_id=1, eos_token_id=2, bos_token_id=2, **LLAMA)

    make().save_pretrained(model_dir)
    probe = PROBE % vocab
    outcome.dense_config = AutoModelForCausalLM.from_pretrained(model_dir).config
    text = tmp / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(40)]
    text.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    out = tmp / "out"
    pruning = {"granularity": granularity, **_row(granularity)["config"], **SCHEDULE}
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "causal-lm",
        "model": {"source": "local", "name": str(model_dir)},
        "data": {"source": "local", "files": {"train": str(text)}, "eval_fraction": 0.2, "max_length": 16},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": "1e-2",
                     "logging_steps": 4, "save_strategy": "steps", "save_steps": 2, "seed": 0},
        "pruning": pruning,
        "evaluation": {"during_training": 0, "dense": False},
        "output": {"dir": str(out), "save_sparse": False, "plot": False, "slim": _row(granularity)["slim"]},
    }))
    assert main(["finetune", str(recipe)]) == 0
    report = json.loads((out / "report.json").read_text())
    outcome.report = {"pruned_params": report["sparsity"]["target_params_pruned"],
                      "prunable_params": report["sparsity"]["target_params"],
                      "global_sparsity": report["sparsity"]["target_sparsity"]}
    # zeros after each saved step (the checkpoints keep the model as trained; the last is the unslimmed final)
    previous = None
    for ckpt in sorted(out.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        weights = load_file(str(ckpt / "model.safetensors"))
        count, now = removed({n: weights[f"{n}.weight"] for n in _target_weights(_model(), granularity)}, granularity)
        if previous is not None:
            back = sum(int((previous[n] & ~now[n]).sum()) for n in now)
            outcome.revived += back
            outcome.revived_at.append((int(ckpt.name.split("-")[1]), back))
        previous = now
        outcome.zero_counts.append(count)
        if ckpt.name == f"checkpoint-{STEPS}":
            masked = make()
            masked.load_state_dict(weights, strict=False)
            masked.tie_weights()
            if granularity == "blocks":
                from prune_callbacks.methods.structured.masking import skip_block

                for block in _blocks(masked):
                    if all(bool((p == 0).all()) for p in block.parameters() if p.dim() == 2):
                        skip_block(block)
            outcome.masked_logits = _logits(masked, probe)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    _export(reloaded, granularity, tmp / "export", outcome, probe)
    return outcome


RUNNERS = {"plain": run_plain, "trainer": run_trainer, "accelerate": run_accelerate, "recipe": run_recipe}
_CACHE: dict = {}


def outcome(granularity: str, path: str, tmp_path_factory, interrupt: bool = False) -> Outcome:
    key = (granularity, path, interrupt)
    if key not in _CACHE:
        tmp = tmp_path_factory.mktemp(f"{granularity.replace(':', '-')}-{path}{'-resumed' if interrupt else ''}")
        _CACHE[key] = RUNNERS[path](granularity, tmp, interrupt)
    return _CACHE[key]


@pytest.fixture(scope="module", autouse=True)
def _offline_and_clean():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
    _CACHE.clear()


# ------------------------------------------------------------ the table itself
def test_every_registered_granularity_has_a_row():
    """A granularity registered by the package without a row here is untested: add its row."""
    from prune_callbacks.core.registry import GRANULARITIES as REGISTRY

    registered = dict(zip(REGISTRY.names(), REGISTRY.classes()))
    builtin = {name for name, cls in registered.items() if cls.__module__.startswith("prune_callbacks.")}
    assert builtin == {g["registered"] for g in GRANULARITIES}
    for g in GRANULARITIES:  # each row's spelling instantiates the granularity it claims
        assert REGISTRY.resolve(g["granularity"])[0] is registered[g["registered"]]


def test_cases_table_is_complete_and_points_somewhere_real():
    assert len(CASES) == len(GRANULARITIES) * len(PATHS) * len(CHECKS)
    root = Path(__file__).resolve().parent.parent
    for case in CASES:
        where = case["where"]
        if where is None:
            assert case["why"], case
        elif where != "here":
            file, name = where.split("::")
            assert f"def {name}(" in (root / file).read_text(), where


# ------------------------------------------------------------ the checks
@pytest.mark.parametrize("granularity, path", _here("exact_count"))
def test_exact_count(granularity, path, tmp_path_factory):
    out = outcome(granularity, path, tmp_path_factory)
    lowest, highest = expected_range(granularity, out.dense_config)
    assert lowest <= out.zero_counts[-1] <= highest


@pytest.mark.parametrize("granularity, path", _here("zeros_stay_zero"))
def test_zeros_stay_zero(granularity, path, tmp_path_factory):
    out = outcome(granularity, path, tmp_path_factory)
    if _row(granularity).get("revisits"):  # weights may return at mask updates, never after the last one
        assert all(back == 0 for step, back in out.revived_at if step > SCHEDULE["end_step"]), out.revived_at
    else:
        assert out.revived == 0
    assert out.zero_counts == sorted(out.zero_counts) and out.zero_counts[-1] > 0


@pytest.mark.parametrize("granularity, path", _here("report"))
def test_report_states_the_counts(granularity, path, tmp_path_factory):
    out = outcome(granularity, path, tmp_path_factory)
    want = out.zero_counts[-1] if _low_rank(granularity) else expected_pruned(granularity, out.dense_config)
    assert out.report["pruned_params"] == want  # low_rank: the engine's count is the one measured from the ranks
    assert out.report["global_sparsity"] == want / out.report["prunable_params"]
    if path != "recipe":
        numel = {n: w.numel() for n, w in _target_weights(_model(), granularity).items()}
        rows = out.report["per_target"]
        if _row(granularity)["slim"]:  # structured: one row per spanned weight
            assert set(rows) <= set(numel) and all(rows[n]["numel"] == numel[n] for n in rows)
        else:
            assert {n: r["numel"] for n, r in rows.items()} == numel
        assert out.report["mask_sparsity"] == _config(granularity).final_sparsity


@pytest.mark.parametrize("granularity, path", _here("export"))
def test_export(granularity, path, tmp_path_factory):
    out = outcome(granularity, path, tmp_path_factory)
    export, dense = out.export, out.dense_config
    if _low_rank(granularity):
        assert export["state_equal"] and torch.equal(export["reloaded_logits"], export["logits"])
        torch.testing.assert_close(export["logits"], out.masked_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(export["dense_logits"], export["logits"], rtol=1e-4, atol=1e-5)
        summary = export["summary"]
        assert summary["params_after"] == export["params"]
        assert summary["params_before"] - summary["params_after"] == out.zero_counts[-1]
        assert export["dense_params"] == summary["params_before"]
        return
    assert torch.allclose(export["reloaded_logits"], export["logits"], atol=1e-6)
    assert torch.allclose(export["logits"], out.masked_logits, atol=1e-5)
    s = _row(granularity)["config"].get("final_sparsity")
    want = {"num_hidden_layers": dense.num_hidden_layers, "intermediate_size": dense.intermediate_size,
            "num_key_value_heads": dense.num_key_value_heads, "num_attention_heads": dense.num_attention_heads}
    if granularity == "ffn_neurons":
        want["intermediate_size"] -= round(s * dense.intermediate_size)
    elif granularity == "attention_heads":
        cut = round(s * dense.num_key_value_heads)
        want["num_key_value_heads"] -= cut
        want["num_attention_heads"] -= cut * dense.num_attention_heads // dense.num_key_value_heads
    elif granularity == "blocks":
        want["num_hidden_layers"] -= round(s * dense.num_hidden_layers)
    assert export["config"] == want
    if _row(granularity)["slim"]:
        dense_params = sum(p.numel() for p in _model().parameters())
        assert dense_params - export["params"] >= expected_pruned(granularity, dense)  # (biases / norms go too)
    else:
        assert export["reloaded_zeros"] == expected_pruned(granularity, dense)


@pytest.mark.parametrize("granularity, path", _here("resume_exact"))
def test_resume_exact(granularity, path, tmp_path_factory):
    straight = outcome(granularity, path, tmp_path_factory)
    resumed = outcome(granularity, path, tmp_path_factory, interrupt=True)
    assert len(straight.final_masks) == len(resumed.final_masks) > 0
    for a, b in zip(straight.final_masks, resumed.final_masks):
        assert torch.equal(a, b)
    assert straight.final_state.keys() == resumed.final_state.keys()
    for k in straight.final_state:
        assert torch.equal(straight.final_state[k], resumed.final_state[k]), k


# ------------------------------------------------------------ two processes (this module is the torchrun script)
@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun(Path(__file__), "--ddp", out, timeout=240)
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize("granularity, path", _here("ddp_identical_masks"))
def test_two_processes_hold_identical_masks(granularity, path, ddp_result):
    assert path == "plain"
    r0, r1 = (r[granularity] for r in ddp_result)
    assert len(r0["updates"]) == SCHEDULE["end_step"] - SCHEDULE["start_step"] + 1
    assert r0 == r1
    lowest, highest = expected_range(granularity, _model().config)
    assert lowest <= r0["zeros"] <= highest


def _ddp_main(out: str) -> None:
    """Each rank: a DDP loop per granularity, its own data and (rank 1) perturbed saliency; masks hashed per update."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for row in GRANULARITIES:
        granularity = row["granularity"]
        # DDP broadcasts rank 0's weights; a skipped block's weights get no gradient (find_unused_parameters)
        model = torch.nn.parallel.DistributedDataParallel(_model(seed=rank), find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        pruner = Pruner(model, _config(granularity))
        updates = []
        for step, ids in enumerate(_batches(STEPS, seed=10 + rank), start=1):
            model(input_ids=ids, labels=ids).loss.backward()
            pruner.before_optimizer_step()
            if rank == 1 and pruner.saliency.buffers:
                for buffers in pruner.saliency.buffers.values():
                    for b in buffers:
                        b.copy_(torch.rand_like(b))
            opt.step()
            pruner.after_optimizer_step(opt)
            opt.zero_grad()
            if pruner.schedule.is_update_step(step):
                updates.append(digest(pruner.pruned))
        zeros = removed(_target_weights(model.module, granularity), granularity)[0]
        results[granularity] = {"updates": updates, "zeros": zeros,
                                "weights": digest(p for _, p in sorted(model.module.named_parameters()))}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    end_world()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ddp":
    _ddp_main(sys.argv[2])
