"""Latency probe: how much faster a slimmed model runs, measured, and the depth + width plan chosen by it.

A *plan* removes a fraction of the FFN neurons in every remaining block, a number of whole blocks and, where
the family's config can describe fewer heads (Llama family), KV groups in every remaining attention. The grid
(`FFN_REMOVED` x 0 .. `MAX_BLOCKS` blocks x 0 / 1 KV group) plus the structured strategies the analysis probed
at the parameter budget are each cut out of a copy of the model by :func:`prune_callbacks.export.slim` (the
slimming path ``output.slim: true`` uses; no second one) and timed against the dense model: ``batch`` x ``seq``
random tokens, ``torch.inference_mode``, torch's threads set to ``threads``; one warm-up per model, then
``repeats`` rounds of one forward per model, the order rotated every round, the median per model. Plans are
timed together (one interleaved set) while their copies fit in `COPY_BYTES`; a larger model's plans are timed in
groups that fit, with the dense model in every group, and a plan's speed-up is its group's dense median over its own.

Which units a plan removes and its **predicted quality loss** come from what ``analyze`` already measured: the
blocks with the least influence (1 - cos of their input and output hidden states) go first; in every remaining
block the FFN neurons, and in every remaining attention the KV groups, with the least saliency. The predicted
loss is the share of the calibration saliency (mean |theta * grad| over the targeted weights and every other
tensor of the blocks) that the plan removes: a first-order estimate of the damage on one scale for blocks,
neurons and heads. It ranks plans; it does not predict accuracy after fine-tuning.

`choose` takes, among the plans measured at or above the target speed-up, the one with the **fewest blocks
removed**, and among those the least predicted loss. Depth goes last because a removed block recovers less in
fine-tuning than its saliency share says: on MiniLM / Rotten Tomatoes 2 of 6 blocks (31% of the blocks'
saliency) kept 84% of dense accuracy after 150 steps, 50% of the FFN neurons (23%) 97%, 75% of them (39%) 95%
(BENCHMARKS.md, structured accuracy); the analysis' strategy rule prefers finer units for the same reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.strategies import unit_config
from prune_callbacks.export.slim import slim
from prune_callbacks.methods.structured.units import StructuredUnitsError

FFN_REMOVED = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875)  # fraction of the FFN neurons removed in every remaining block
MAX_BLOCKS = 3  # whole blocks removed: 0 .. min(MAX_BLOCKS, half of the blocks)
COPY_BYTES = 2 * 2**30  # slimmed copies held at once: plans beyond this are timed in another group
DEFAULTS = {"batch": 32, "seq": 128, "threads": 1, "repeats": 3}


@dataclass(frozen=True)
class LatencyOptions:
    """What the probe times. ``target_speedup``: choose the plan (>1), or None to only measure."""

    batch: int = DEFAULTS["batch"]
    seq: Optional[int] = None  # None: DEFAULTS["seq"], or the model's position limit where that is shorter
    threads: int = DEFAULTS["threads"]
    repeats: int = DEFAULTS["repeats"]
    target_speedup: Optional[float] = None

    def __post_init__(self):
        for name in ("batch", "seq", "threads", "repeats"):
            value = getattr(self, name)
            if name == "seq" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"latency {name}={value!r} is not allowed: give a whole number >= 1")
        t = self.target_speedup
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise AnalysisError(f"target_speedup={t!r} is not allowed: give a finite number > 1 (e.g. 2 or 3)")
            if t <= 1:
                raise AnalysisError(f"target_speedup={t!r} is not allowed: a speed-up must be > 1 (1 is the dense "
                                    "model itself)")


def latency_options(goal: str, *, probe: bool = True, target_speedup: Optional[float] = None,
                    batch: Optional[int] = None, seq: Optional[int] = None, threads: Optional[int] = None,
                    repeats: Optional[int] = None) -> Optional[LatencyOptions]:
    """The options for ``goal`` from the command line's values (None: not given), checked before any compute.

    The probe runs by default with ``goal == "speed"``; latency settings with another goal, or with the probe
    turned off, are refused naming the setting."""
    given = {k: v for k, v in (("target_speedup", target_speedup), ("latency_batch", batch), ("latency_seq", seq),
                               ("latency_threads", threads), ("latency_repeats", repeats)) if v is not None}
    if goal != "speed" or not probe:
        if given:
            name, value = next(iter(given.items()))
            where = f"goal={goal!r}" if goal != "speed" else "the latency probe turned off"
            raise AnalysisError(f"{name}={value!r} does not apply with {where}: the latency probe runs only with "
                                "goal 'speed' (--goal speed)")
        return None
    fields = {"batch": batch, "seq": seq, "threads": threads, "repeats": repeats}
    return LatencyOptions(**{k: v for k, v in fields.items() if v is not None}, target_speedup=target_speedup)


@dataclass(frozen=True)
class Plan:
    ffn: float = 0.0  # fraction of the FFN neurons removed in every remaining block
    blocks: int = 0  # whole blocks removed
    kv_groups: int = 0  # KV groups (heads) removed in every remaining attention
    name: str = ""

    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"ffn_neurons {self.ffn:.1%}".replace(".0%", "%")] if self.ffn else []
        parts += [f"blocks {self.blocks}"] if self.blocks else []
        parts += [f"kv_groups {self.kv_groups}"] if self.kv_groups else []
        return " + ".join(parts) or "dense"


def grid(n_blocks: int, n_kv: int = 0) -> list[Plan]:
    """The default plans (the dense model excluded): `FFN_REMOVED` x blocks x (0, 1 KV group where ``n_kv > 1``)."""
    blocks = range(min(MAX_BLOCKS, n_blocks // 2) + 1)
    heads = (0, 1) if n_kv > 1 else (0,)
    return [Plan(f, b, h) for h in heads for b in blocks for f in FFN_REMOVED if (f, b, h) != (0.0, 0, 0)]


def plan_of_configs(configs: Sequence[Mapping], n_blocks: int, n_kv: int, name: str) -> Optional[Plan]:
    """The plan a structured strategy's configs describe (None when one is not ffn_neurons / blocks / heads)."""
    ffn = blocks = heads = 0
    for c in configs:
        g, s = c.get("granularity"), float(c.get("final_sparsity", 0))
        if g == "ffn_neurons":
            ffn = s
        elif g == "blocks":
            blocks = round(s * n_blocks)
        elif g == "attention_heads" and n_kv:
            heads = round(s * n_kv)
        else:
            return None
    return Plan(ffn, blocks, heads, name)


def plan_configs(plan: Plan, n_blocks: int, n_kv: int, n_ffn: int) -> list[dict]:
    """The `PruningConfig` dicts (as the strategies write them) that remove what ``plan`` removes."""
    out = []
    if plan.ffn:
        out.append(unit_config("ffn_neurons", round(plan.ffn * n_ffn) / n_ffn))
    if plan.kv_groups:
        out.append(unit_config("attention_heads", plan.kv_groups / n_kv))
    if plan.blocks:
        out.append(unit_config("blocks", plan.blocks / n_blocks))
    return out


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep mask of ``values`` with its ``k`` lowest entries removed (stable order)."""
    keep = torch.ones(values.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(values.detach().double().cpu(), stable=True)[:k]] = False
    return keep


def keep_and_loss(plan: Plan, facts: "Facts") -> tuple[dict, float, list[str]]:
    """``(keep for slim, predicted loss share, names of the removed blocks)``; see the module docstring."""
    order = sorted(range(len(facts.blocks)), key=lambda i: (math.isnan(facts.influence[i]),
                                                            facts.influence[i] if not math.isnan(facts.influence[i]) else 0.0, i))
    gone = set(order[: plan.blocks])
    keep: dict = {}
    lost = sum(facts.block_saliency[i] for i in gone)
    if plan.blocks:
        keep["blocks"] = [i not in gone for i in range(len(facts.blocks))]
    if plan.ffn:
        masks = []
        for i, s in enumerate(facts.neuron_saliency):
            m = _lowest(s, round(plan.ffn * s.numel()))
            masks.append(m)
            if facts.ffn_block[i] not in gone:
                lost += float(s.double()[~m].sum())
        keep["ffn_neurons"] = masks
    if plan.kv_groups:
        masks = []
        for i, s in enumerate(facts.head_saliency):
            m = _lowest(s, plan.kv_groups)
            masks.append(m)
            if facts.head_block[i] not in gone:
                lost += float(s.double()[~m].sum())
        keep["attention_heads"] = masks
    return keep, lost / facts.total if facts.total else 0.0, [facts.blocks[i] for i in sorted(gone)]


@dataclass
class Facts:
    """What the plans are built from (filled by ``analyze`` from its own measurements)."""

    blocks: list[str]
    influence: list[float]  # per block, 1 - cos
    block_saliency: list[float]  # per block, saliency summed over its tensors
    neuron_saliency: list[torch.Tensor]  # per FFN unit group (unit_map order), per neuron
    ffn_block: list[int]  # the block index of each FFN group
    head_saliency: list[torch.Tensor]  # per head unit group, per KV group (empty: heads not sliceable)
    head_block: list[int]
    total: float  # saliency summed over everything a plan can remove from


def default_time_one(model: nn.Module, forward: Callable[[nn.Module], object]) -> float:
    """Seconds of one ``forward(model)`` (a CUDA model is synchronised first and after)."""
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward(model)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved_medians(models: Mapping[str, nn.Module], forward, rounds: int,
                        time_one: Optional[Callable] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Median seconds of ``forward(model)`` per model: one warm-up each, then ``rounds`` rounds of one call per
    model, the order rotated every round, under ``torch.inference_mode``. ``time_one(model, forward)`` times one
    call (tests inject a deterministic one)."""
    time_one = time_one or default_time_one
    names = list(models)
    times: dict = {n: [] for n in names}
    with torch.inference_mode():
        for m in models.values():
            forward(m)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(time_one(models[name], forward))
            if progress:
                progress(r + 1)
    return {n: statistics.median(t) for n, t in times.items()}


def _max_positions(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    return None


def check_model(model: nn.Module, options: LatencyOptions) -> LatencyOptions:
    """``options`` with the sequence length settled: a given one longer than the model's positions is refused
    (before any compute); the default is cut to them."""
    limit = _max_positions(model)
    if options.seq is None:
        seq = DEFAULTS["seq"] if limit is None else min(DEFAULTS["seq"], limit)
        return dataclasses.replace(options, seq=seq)
    if limit is not None and options.seq > limit:
        raise AnalysisError(f"latency seq={options.seq} is longer than the model's {limit} positions: give "
                            f"--latency-seq {limit} or less")
    return options


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model: nn.Module, plans: Sequence[Plan], facts: Facts, options: LatencyOptions,
            time_one: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per plan: what it removes, its predicted loss, parameters, medians and speed-up against dense."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (options.batch, options.seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    def forward(m):
        return m(input_ids=ids, attention_mask=mask)

    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    dense_params = _params(model)
    rows = []
    try:
        torch.set_num_threads(options.threads)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        group = max(1, int(COPY_BYTES // max(1, size)))
        for start in range(0, len(plans), group):
            chunk = plans[start:start + group]
            models: dict = {"dense": model}
            built = []
            for plan in chunk:
                keep, loss, gone = keep_and_loss(plan, facts)
                slimmed = copy.deepcopy(model)
                for p in slimmed.parameters():
                    p.grad = None
                try:
                    slim(slimmed, keep)
                except StructuredUnitsError as exc:
                    raise AnalysisError(f"the latency probe cannot slim {plan.label()} on this model: {exc}") from None
                models[plan.label()] = slimmed
                built.append((plan, loss, gone, _params(slimmed)))
            if log:
                log(f"latency: plans {start + 1}-{start + len(chunk)} of {len(plans)}, batch {options.batch} x seq "
                    f"{options.seq}, {options.threads} thread(s), {options.repeats} rounds")
            medians = interleaved_medians(models, forward, options.repeats, time_one)
            for plan, loss, gone, params in built:
                rows.append({"name": plan.label(), "ffn_removed": plan.ffn, "blocks_removed": plan.blocks,
                             "kv_groups_removed": plan.kv_groups, "blocks": gone, "predicted_loss": loss,
                             "params": params, "params_ratio": params / dense_params,
                             "median_s": medians[plan.label()], "dense_median_s": medians["dense"],
                             "speedup": medians["dense"] / medians[plan.label()]})
            del models
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return rows


#: a plan measured this close below the target (as a share of it) is within the probe's timing noise: the reason
#: names one that removes fewer blocks than the chosen plan, since depth recovers least (on MiniLM the 5-round and
#: 10-round probes put the same plan at 2.95x and 3.00x, and the latency benchmark at 3.4x)
NEAR_TARGET = 0.05


def choose(rows: Sequence[dict], target: float) -> tuple[Optional[dict], str]:
    """``(row, reason)``: among the rows at or above ``target``, the fewest blocks removed, then the least predicted
    loss, then the fastest; ``(None, why)`` when none reaches it. The reason also names the plan that removes fewer
    blocks than the chosen one and measured within `NEAR_TARGET` below the target, if there is one."""
    if not rows:
        return None, "no structured plan could be built on this model, so none was timed"
    fast = [r for r in rows if r["speedup"] >= target]
    if not fast:
        best = max(rows, key=lambda r: r["speedup"])
        return None, (f"no plan reaches the target speed-up {target:g}x: the fastest measured is {best['name']} at "
                      f"{best['speedup']:.2f}x (ANALYSIS.md, 'Latency probe'); lower --target-speedup, or time at "
                      "the batch / sequence length you deploy with")

    def rank(r):
        return r.get("blocks_removed", 0), r["predicted_loss"], -r["speedup"]

    chosen = min(fast, key=rank)
    others = sorted((r for r in fast if r is not chosen), key=rank)[:3]
    depth = chosen.get("blocks_removed", 0)
    near = [r for r in rows if (1 - NEAR_TARGET) * target <= r["speedup"] < target
            and r.get("blocks_removed", 0) < depth]
    near = min(near, key=rank) if near else None
    return chosen, (f"target speed-up {target:g}x: {len(fast)} of {len(rows)} plans measured at or above it; "
                    f"{chosen['name']} ({chosen['speedup']:.2f}x measured): "
                    + (f"the fewest blocks removed ({depth}) at this speed, and among those " if any(
                        r.get("blocks_removed", 0) > depth for r in fast) else "")
                    + f"the least calibration saliency removed ({chosen['predicted_loss']:.1%})"
                    + (" (next: " + ", ".join(
                        f"{r['name']} {r['speedup']:.2f}x, {r['predicted_loss']:.1%}" for r in others) + ")"
                        if others else "")
                    + (f". {near['name']} removes fewer blocks ({near.get('blocks_removed', 0)}) and measured "
                       f"{near['speedup']:.2f}x, within timing noise of the target: time again with more "
                       f"--latency-repeats, or choose it with --target-speedup {near['speedup'] - 0.005:.2f}"
                       if near else ""))


def build_facts(model: nn.Module, mm, scores: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                influence: Sequence[float], heads_ok: bool) -> Facts:
    """`Facts` from ``analyze``'s measurements: ``scores`` (target name -> mean |theta * grad|), ``other`` (the
    blocks' other parameters by name -> the same), ``influence`` (per block of ``mm``)."""
    from prune_callbacks.analysis.units import head_importance, neuron_importance

    modules = dict(model.named_modules())
    names = [b.name for b in mm.blocks]
    every = {**scores, **other}
    block_saliency = [sum(float(s.double().sum()) for n, s in every.items() if n.startswith(f"{b}.")) for b in names]
    neurons = neuron_importance(mm, modules, scores)
    neuron_saliency = [neurons.get(g.block, torch.zeros(g.n_units)) for g in mm.ffn]
    head_saliency, head_block = [], []
    if heads_ok and mm.heads:
        per_query = head_importance(mm, modules, scores)
        for g in mm.heads:
            values = torch.tensor(per_query[mm.attention_name(g)], dtype=torch.float64)
            head_saliency.append(values.reshape(g.n_units, -1).sum(1))
            head_block.append(names.index(g.block))
    return Facts(names, [float(v) for v in influence], block_saliency, neuron_saliency,
                 [names.index(g.block) for g in mm.ffn], head_saliency, head_block, sum(block_saliency))


def plans_for(facts: Facts, strategies: Sequence[dict] = ()) -> list[Plan]:
    """The grid, then every structured strategy probed at the budget that the grid does not already hold."""
    n_kv = int(facts.head_saliency[0].numel()) if facts.head_saliency else 0
    n_ffn = int(facts.neuron_saliency[0].numel()) if facts.neuron_saliency else 0
    plans = grid(len(facts.blocks), n_kv) if n_ffn else [Plan(0.0, b) for b in range(1, min(MAX_BLOCKS, len(facts.blocks) // 2) + 1)]

    def key(p: Plan):
        return round(p.ffn * n_ffn), p.blocks, p.kv_groups

    seen = {key(p) for p in plans}
    for row in strategies:
        if not row.get("applicable") or row.get("kind") in ("unstructured", "N:M", "low_rank"):
            continue
        plan = plan_of_configs(row["configs"], len(facts.blocks), n_kv, row["name"])
        if plan is not None and key(plan) not in seen and (plan.ffn == 0 or n_ffn):
            seen.add(key(plan))
            plans.append(plan)
    return plans


def probe_latency(model: nn.Module, facts: Facts, options: LatencyOptions, strategies: Sequence[dict] = (),
                  time_one: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """The latency section of the analysis: options, rows, seconds, and with a target the chosen plan."""
    started = time.time()
    plans = plans_for(facts, strategies)
    rows = measure(model, plans, facts, options, time_one, log)
    n_kv = int(facts.head_saliency[0].numel()) if facts.head_saliency else 0
    n_ffn = int(facts.neuron_saliency[0].numel()) if facts.neuron_saliency else 0
    for plan, row in zip(plans, rows):
        row["configs"] = plan_configs(plan, len(facts.blocks), n_kv, n_ffn)
    out = {"batch": options.batch, "seq": options.seq, "threads": options.threads, "repeats": options.repeats,
           "target_speedup": options.target_speedup, "rows": rows}
    if options.target_speedup is not None:
        chosen, why = choose(rows, options.target_speedup)
        out["chosen"] = chosen["name"] if chosen else None
        out["why"] = why
    out["seconds"] = time.time() - started
    return out
