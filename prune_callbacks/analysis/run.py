"""``analyze(model, batches, ...)``: every measurement in one pass over the calibration batches plus one
evaluation per block on the held-out batches. Pure torch; the weights are never written (gradients
are computed, then the parameters' ``.grad`` are restored to what they were)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from prune_callbacks.core.report import group_name
from prune_callbacks.core.targets import find_targets, unwrap_model
from prune_callbacks.methods.structured.block_merging import blocks_fold_refusal
from prune_callbacks.analysis.architecture import map_model
from prune_callbacks.analysis.blocks import BlockInfluence, skipped
from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.latency import LatencyOptions, build_facts, check_model, probe_latency
from prune_callbacks.analysis.metrics import HIGHER_IS_BETTER, evaluate
from prune_callbacks.analysis.saliency_mass import bottom_overlap, mass_tables, removable_fraction
from prune_callbacks.analysis.spectra import low_rank_candidates, spectra
from prune_callbacks.analysis.strategies import _heads_supported, candidates, probe
from prune_callbacks.analysis.units import HeadOutputs, duplicate_heads, duplicate_weights, head_importance, neuron_importance


def _rows(batch) -> int:
    if not isinstance(batch, dict) or not batch:
        raise AnalysisError(f"a batch must be a non-empty dict of tensors (model(**batch)), got {type(batch).__name__}")
    first = next(v for v in batch.values())
    return int(first.shape[0]) if hasattr(first, "shape") and first.dim() else 0


def _check_batches(batches, what: str) -> list[dict]:
    if batches is None:
        raise AnalysisError(f"no {what} batches given; pass a list of dicts of tensors")
    batches = list(batches)
    if not batches:
        raise AnalysisError(f"the {what} data is empty (0 batches); give at least one batch")
    if sum(_rows(b) for b in batches) == 0:
        raise AnalysisError(f"the {what} slice has zero rows; give at least one row")
    return batches


def _default_loss(model, batch):
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise AnalysisError("the model returned no loss: batches need 'labels', or pass loss_fn=")
    return loss


def _log(progress, text):
    if progress:
        print(f"[analyze] {text}", file=sys.stderr, flush=True)


def analyze(model: nn.Module, batches: Iterable[dict], eval_batches: Optional[Iterable[dict]] = None, *,
            metric: str = "accuracy", include: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
            budget: float = 0.5, loss_fn: Optional[Callable] = None, skip_blocks: bool = True,
            head_threshold: float = 0.95, weight_threshold: float = 0.95, strategies: bool = True,
            latency: Optional[LatencyOptions] = None, time_one: Optional[Callable] = None,
            progress: bool = True) -> dict:
    """Measure where ``model`` is redundant; returns a JSON-ready dict (see ANALYSIS.md's sections).

    ``batches``: calibration batches (dicts for ``model(**batch)``, with labels) for saliency, head
    outputs and block influence; ``eval_batches``: held-out batches for the baseline metric and the
    metric with each block skipped (left out: no metric figures). ``budget`` (the sparsity you aim for)
    sets the fraction at which saliency figures are quoted and the parameter budget at which every
    strategy is probed one-shot (:mod:`.strategies`; ``strategies=False`` skips that, needs eval_batches).
    ``latency``: also time slimmed depth + width plans against the dense model (:mod:`.latency`; with a
    ``target_speedup`` the plan to suggest is chosen); ``time_one(model, forward)`` replaces the clock (tests).
    """
    started = time.time()
    batches = _check_batches(batches, "calibration")
    if eval_batches is not None:
        eval_batches = _check_batches(eval_batches, "held-out")
    model = unwrap_model(model)
    if latency is not None:
        if not isinstance(latency, LatencyOptions):
            raise AnalysisError(f"latency must be a LatencyOptions or None, got {type(latency).__name__}")
        latency = check_model(model, latency)
    try:
        targets = find_targets(model, include, exclude)
    except ValueError as exc:
        raise AnalysisError(f"the model has nothing to analyse: {exc}") from None
    loss_fn = loss_fn or _default_loss
    modules = dict(model.named_modules())
    mm = map_model(model)
    was_training = model.training
    model.eval()
    grads = {id(p): p.grad for p in model.parameters()}
    result: dict = {"budget": budget, "metric": metric, "calibration_batches": len(batches),
                    "calibration_rows": sum(_rows(b) for b in batches), "targets": [t.name for t in targets]}
    try:
        # ---- baseline
        if eval_batches is not None:
            _log(progress, f"baseline {metric} on {sum(_rows(b) for b in eval_batches)} held-out rows")
            result["baseline"] = evaluate(model, eval_batches, metric)
            result["eval_rows"] = sum(_rows(b) for b in eval_batches)
            if metric in ("accuracy", "f1") and all("labels" in b for b in eval_batches):
                labels = torch.cat([b["labels"].flatten() for b in eval_batches])
                result["chance"] = float(labels.bincount().max()) / labels.numel()  # majority-class share
        # ---- spectra
        _log(progress, f"spectra of {len(targets)} weight matrices")
        weights = {t.name: t.param.detach() for t in targets}
        result["spectra"] = spectra(weights)
        result["low_rank_candidates"] = low_rank_candidates(result["spectra"])
        # ---- saliency, head outputs, block influence: one forward/backward per calibration batch
        halves = [{t.name: torch.zeros_like(t.param, dtype=torch.float32) for t in targets} for _ in range(2)]
        # the other parameters structured units span (biases, in-block tensors): for the strategy probe
        target_ids = {id(t.param) for t in targets}
        extra = {id(p): (p, torch.zeros_like(p, dtype=torch.float32)) for name, p in model.named_parameters()
                 if id(p) not in target_ids and p.requires_grad and any(name.startswith(f"{b.name}.") for b in mm.blocks)}
        blocks = [(b.name, b.module) for b in mm.blocks]
        heads = HeadOutputs(mm, modules)
        influence = BlockInfluence(blocks)
        with heads, influence:
            for i, batch in enumerate(batches):
                _log(progress, f"calibration pass {i + 1}/{len(batches)}")
                mask = batch.get("attention_mask")
                first = next(iter(batch.values()))
                heads.select(mask, int(first.numel()) if first.dim() >= 2 else int(first.shape[0]))
                influence.select(mask)
                for p in model.parameters():
                    p.grad = None
                loss = loss_fn(model, batch)
                loss.backward()
                heads.accumulate()
                influence.accumulate()
                for t in targets:
                    if t.param.grad is not None:
                        halves[i % 2][t.name] += (t.param.detach() * t.param.grad).abs().float()
                for p, acc in extra.values():
                    if p.grad is not None:
                        acc += (p.detach() * p.grad).abs().float()
        scores = {n: (halves[0][n] + halves[1][n]) / len(batches) for n in halves[0]}
        kinds = {n: group_name(n) for n in scores}
        result["saliency_mass"] = mass_tables(scores, kinds)
        result["removable_at_1pct_mass"] = {n: removable_fraction(s, 0.01) for n, s in scores.items()}
        if len(batches) >= 2:
            result["saliency_stability"] = {n: bottom_overlap(halves[0][n], halves[1][n], budget) for n in scores}
        # implied per-layer sparsity of one global threshold at the budget
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(budget * flat.numel())
        threshold = float(flat.kthvalue(k).values) if k > 0 else float("-inf")
        result["global_threshold_sparsity"] = {n: float((s <= threshold).double().mean()) for n, s in scores.items()}
        # ---- units
        _log(progress, "units: heads, FFN neurons, duplicate heads and weights")
        result["head_importance"] = head_importance(mm, modules, scores)
        neurons = neuron_importance(mm, modules, scores)
        result["neuron_importance"] = {n: {"count": int(v.numel()), "mass_of_lowest": {
            str(x): float(v.sort().values[: int(x * v.numel())].sum() / v.sum().clamp_min(1e-30))
            for x in (0.25, 0.5, 0.75)}} for n, v in neurons.items()}
        sim = heads.similarity()
        result["head_names"] = heads.names
        result["head_similarity"] = sim.tolist() if sim is not None else None
        result["head_tokens"] = heads.tokens
        result["duplicate_heads"] = duplicate_heads(heads.names, sim, head_threshold)
        result["duplicate_weights"] = duplicate_weights(weights, weight_threshold)
        # ---- blocks
        result["blocks"] = [{"name": name, "influence": v} for (name, _), v in zip(blocks, influence.influence())]
        result["blocks_fold_refusal"] = blocks_fold_refusal(model)  # None: a suggestion removing blocks folds them
        if eval_batches is not None and skip_blocks:
            for i, (name, module) in enumerate(blocks):
                _log(progress, f"{metric} with block {i + 1}/{len(blocks)} ({name}) skipped")
                with skipped(module):
                    result["blocks"][i]["metric_skipped"] = evaluate(model, eval_batches, metric)
        result["higher_is_better"] = HIGHER_IS_BETTER[metric]
        # ---- strategies at the same parameter budget, one-shot
        if eval_batches is not None and strategies:
            by_id = {id(t.param): scores[t.name] for t in targets}
            by_id.update({i: acc / len(batches) for i, (_, acc) in extra.items()})
            counts = {t.name: t.param.numel() for t in targets}
            rows = []
            for cand in candidates(model, budget, counts):
                _log(progress, f"strategy {len(rows) + 1}: {cand['name']} one-shot")
                rows.append(probe(model, cand, by_id, targets, lambda: evaluate(model, eval_batches, metric),
                                  include, exclude))
            result["strategies"] = rows
    finally:
        for p in model.parameters():
            p.grad = grads.get(id(p))
        model.train(was_training)
    # ---- latency of slimmed depth + width plans (after the gradients are restored: copies hold none)
    if latency is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        other = {names[i]: acc / len(batches) for i, (_, acc) in extra.items()}
        facts = build_facts(model, mm, scores, other, [b["influence"] for b in result["blocks"]],
                            _heads_supported(model))
        result["latency"] = probe_latency(model, facts, latency, result.get("strategies") or [], time_one,
                                          lambda text: _log(progress, text))
        _log(progress, f"latency probe: {len(result['latency']['rows'])} plans in {result['latency']['seconds']:.0f} s")
    result["seconds"] = time.time() - started
    _log(progress, f"done in {result['seconds']:.1f} s")
    return result
