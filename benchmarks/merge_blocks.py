"""Merge, not only drop, for depth: removed BERT blocks folded into the kept block before them, one-shot, then fine-tuned.

A removed block's work is lost when it is skipped. The fold keeps it where it can: for a run of removed blocks
``r..q`` after the kept block ``p = r - 1``, block ``p``'s FFN output projection is refitted by ridge least squares on
calibration tokens so that block ``p`` outputs what block ``q`` output. BERT is post-LayerNorm
(``h_p = LN_p(W2 g + b2 + a_p)``, ``g`` the FFN activations, ``a_p`` the attention sub-layer's output), so the target
is the last removed block's normalised pre-LayerNorm sum ``n_q``, at block ``p``'s own per-token scale and mean::

    W2', b2' = argmin E || W2' g + b2' + a_p - (sigma_p * n_q + mu_p) ||^2 + ridge,    LN_p <- LN_q (gamma, beta)

(the per-token affine change is invisible through the LayerNorm, which then gives ``h_q`` where the fit is exact).
Runs are folded in order, each from statistics of the model with the earlier runs already folded. A run that starts
at the first block has no kept block before it and is dropped. This is the block analogue of the FFN-neuron fold
(`prune_callbacks.methods.structured.merging`, FLAP's compensation generalised), measured here before it is built
into the Pruner's mask updates.

1. Fine-tune MiniLM on Rotten Tomatoes dense for ``--dense-steps`` (as ``benchmarks/merge_units.py``).
2. Which blocks: the library's own choice (a ``blocks`` Pruner, taylor saliency, ``oneshot`` after ``--calib``
   steps at learning rate 0 on the fine-tuned model), for every ``--blocks`` count.
3. Drop vs fold, from the same dense state and the same removed blocks (paired): test accuracy right away, then after
   ``--finetune`` steps (lr ``--lr``, warm-up + linear decay) of the model with the blocks cut out.

    python benchmarks/merge_blocks.py --threads 1 --seed 0 --out benchmarks/results/merge_blocks_s0.json
    python benchmarks/merge_blocks.py --pool benchmarks/results/merge_blocks_s*.json --out benchmarks/results/merge_blocks.json
    python benchmarks/merge_blocks.py --smoke --out /tmp/merge_blocks.json

``--engine`` folds with the Pruner's own ``merge`` (:mod:`prune_callbacks.methods.structured.block_merging`: the
same fit with the ridge towards the current projection and rows weighted by the normalised scale, statistics from
the lr-0 steps in training mode), which also chooses the blocks (``--select saliency`` or ``fold``); the drop row
removes the same blocks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.merge_units import add_one_shot_arguments, correct, dense_baseline, paired  # noqa: E402


def runs_of(removed: list[int]) -> list[list[int]]:
    """Consecutive runs of removed block indices: ``[1, 3, 4]`` -> ``[[1], [3, 4]]``."""
    runs: list[list[int]] = []
    for b in sorted(removed):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


@torch.no_grad()
def fold_run(model, run: list[int], batches: list[dict], damping: float) -> dict:
    """Refit the kept block before ``run`` so that it outputs what the run's last block output (module docstring)."""
    layers = model.bert.encoder.layer
    p, last = run[0] - 1, run[-1]
    seen: dict = {}
    hooks = [layers[p].output.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("g", a[0])),
             layers[p].output.register_forward_pre_hook(
                 lambda m, a, k: seen.__setitem__("a", a[1] if len(a) > 1 else k["input_tensor"]), with_kwargs=True),
             layers[p].output.LayerNorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("zp", a[0])),
             layers[last].output.LayerNorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("zq", a[0]))]
    dense = layers[p].output.dense
    width = dense.in_features + 1
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, dense.out_features, dtype=torch.float64)
    tokens = 0
    model.eval()
    try:
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            keep = b["attention_mask"].bool()
            g, a, zp, zq = (seen[k][keep].double() for k in ("g", "a", "zp", "zq"))
            nq = (zq - zq.mean(-1, keepdim=True)) / zq.std(-1, unbiased=False, keepdim=True)
            target = zp.std(-1, unbiased=False, keepdim=True) * nq + zp.mean(-1, keepdim=True) - a
            g1 = torch.cat([g, torch.ones(len(g), 1, dtype=g.dtype)], 1)
            gram += g1.T @ g1
            cross += g1.T @ target
            tokens += len(g)
    finally:
        for h in hooks:
            h.remove()
    ridge = damping * gram.diagonal().mean()
    solution = torch.linalg.solve(gram + ridge * torch.eye(width, dtype=gram.dtype), cross)
    dense.weight.copy_(solution[:-1].T.to(dense.weight.dtype))
    dense.bias.copy_(solution[-1].to(dense.bias.dtype))
    layers[p].output.LayerNorm.weight.copy_(layers[last].output.LayerNorm.weight)
    layers[p].output.LayerNorm.bias.copy_(layers[last].output.LayerNorm.bias)
    return {"run": run, "into": p, "tokens": tokens}


def cut(model, removed: list[int]) -> None:
    """Delete the removed blocks (what ``slim`` does with ``blocks``) so the fine-tune trains the shallow model."""
    enc = model.bert.encoder
    enc.layer = nn.ModuleList([blk for i, blk in enumerate(enc.layer) if i not in set(removed)])
    model.config.num_hidden_layers = len(enc.layer)


def oneshot_blocks(model, data, count: int, args, merge=None):
    """A ``blocks`` Pruner removing ``count`` blocks one-shot after ``--calib`` lr-0 steps (taylor saliency; with
    ``merge``, those steps' forward passes are the fold's statistics), detached; ``(removed blocks, pruner)``."""
    from prune_callbacks import Pruner, PruningConfig

    n = len(model.bert.encoder.layer)
    config = PruningConfig(granularity="blocks", final_sparsity=count / n, schedule="oneshot", start_step=args.calib,
                           merge=merge)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    pruner = Pruner(model, config, total_steps=args.calib).attach(optimizer)
    common.train(model, common.train_batches(data["train"], steps=args.calib, batch_size=16, seed=args.seed + 1),
                 optimizer, scheduler)
    pruner.detach()
    return [i for i, kept in enumerate(pruner.groups[0].granularity.keep()) if not kept], pruner


def library_choice(dense_state, template, data, n_blocks_removed: int, args) -> list[int]:
    """The blocks a ``blocks`` Pruner removes one-shot after ``--calib`` lr-0 steps (taylor saliency)."""
    common.seed_everything(args.seed + 1)
    model = copy.deepcopy(template)
    model.load_state_dict(dense_state)
    return oneshot_blocks(model, data, n_blocks_removed, args)[0]


def engine_fold(model, data, count: int, args) -> tuple[list[int], dict]:
    """The Pruner's own fold (``merge`` with ``blocks``): one-shot after ``--calib`` lr-0 steps in training mode, whose
    forward passes are the statistics; ``--select`` chooses the blocks; then ``slim_pruned`` cuts them."""
    from prune_callbacks.export import slim_pruned

    removed, pruner = oneshot_blocks(model, data, count, args, merge={"calibration_steps": args.calib,
                                                                      "damping": args.damping, "select": args.select})
    report = pruner.report()["groups"][0]["merge"]
    slim_pruned(model, pruner)
    return removed, report


def run_variant(dense_state, template, data, test, removed, fold: bool, args) -> dict:
    """``removed``: the blocks (drop, or the script's own fold) or, with ``--engine`` and ``fold``, how many the
    Pruner removes."""
    common.seed_everything(args.seed + 1)
    model = copy.deepcopy(template)
    model.load_state_dict(dense_state)
    calib = common.train_batches(data["train"], steps=args.calib, batch_size=16, seed=args.seed + 1)
    folds = []
    if fold and args.engine:
        removed, report = engine_fold(model, data, removed, args)
        folds.append(report)
    elif fold:
        for run in runs_of(removed):
            if run[0] > 0:
                folds.append(fold_run(model, run, calib, args.damping))
    if not (fold and args.engine):
        cut(model, removed)
    rows = {"oneshot": correct(model, test)}
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=args.finetune, warmup=max(1, args.finetune // 10))
    batches = common.train_batches(data["train"], steps=args.finetune, batch_size=16, seed=args.seed + 2)
    wall = common.train(model, batches, optimizer, scheduler)
    rows["finetuned"] = correct(model, test)
    return {"removed_blocks": removed, "fold": fold, "engine": bool(fold and args.engine), "folds": folds, "calib_steps": args.calib,
            "finetune_steps": args.finetune, "oneshot_accuracy": sum(rows["oneshot"]) / len(rows["oneshot"]),
            "finetuned_accuracy": sum(rows["finetuned"]) / len(rows["finetuned"]), "wall_s": round(wall, 1),
            "params": sum(p.numel() for p in model.parameters()), "_correct": rows}


def pooled(files: list[Path]) -> dict:
    """Per blocks count: accuracies per seed and the fold-minus-drop difference pooled over seeds (mean of the
    per-seed paired differences; SE = sqrt(sum of per-seed SE^2) / seeds)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    out = {"benchmark": "merge_blocks", "seeds": [p["seed"] for p in parts], "files": [str(f) for f in files],
           "hardware": parts[0]["hardware"], "rows": []}
    for count in sorted({r["blocks_removed"] for p in parts for r in p["paired"]}):
        row = {"blocks_removed": count}
        for stage in ("oneshot", "finetuned"):
            pairs = [next(r for r in p["paired"] if r["blocks_removed"] == count)[f"{stage}_fold_minus_drop"]
                     for p in parts]
            row[stage] = {"per_seed": [
                {"seed": p["seed"], "dense": p["dense_accuracy"], "removed": q["removed_blocks"],
                 "drop": next(r[f"{stage}_accuracy"] for r in p["rows"] if r["removed_blocks"] == q["removed_blocks"]
                              and not r["fold"]),
                 "fold": next(r[f"{stage}_accuracy"] for r in p["rows"] if r["removed_blocks"] == q["removed_blocks"]
                              and r["fold"])}
                for p in parts for q in p["paired"] if q["blocks_removed"] == count],
                "fold_minus_drop": round(sum(x["diff"] for x in pairs) / len(pairs), 4),
                "se": round(math.sqrt(sum(x["se"] ** 2 for x in pairs)) / len(pairs), 4)}
        out["rows"].append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 3], help="how many of the 6 blocks to remove")
    ap.add_argument("--removed", nargs="+", default=None, metavar="I,J,...",
                    help="block sets to remove instead of the library's choice, e.g. 1,3,5 (compares which blocks)")
    add_one_shot_arguments(ap, calib_help="batches of statistics (and lr-0 steps of the choice)",
                           seed_help="head init + dense batches; the pruned runs use seed + 1, + 2")
    ap.add_argument("--engine", action="store_true",
                    help="fold with the Pruner's merge (blocks) instead of this script's procedure; it chooses the blocks")
    ap.add_argument("--select", choices=["saliency", "fold"], default="saliency", help="--engine: merge.select")
    ap.add_argument("--pool", nargs="+", type=Path, default=None, help="result files of several seeds -> --out")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "merge_blocks.json")
    args = ap.parse_args(argv)
    if args.pool:
        return common.write_json(args.out, pooled(args.pool))
    if args.smoke:
        args.dense_steps, args.calib, args.finetune, args.blocks = 4, 2, 2, [1, 2]
    common.set_threads(args.threads)
    start = time.perf_counter()
    template, data, test, dense_state, results = dense_baseline(args, "merge_blocks", smoke_blocks=4,
                                                                damping=args.damping)
    given = [[int(i) for i in item.split(",")] for item in args.removed] if args.removed else None
    if given and args.engine:
        raise SystemExit("--engine chooses the blocks itself; leave --removed out")
    results.update(engine=args.engine, select=args.select if args.engine else None)
    for count, removed in ([(len(r), r) for r in given] if given else [(c, None) for c in args.blocks]):
        pair, rows = {}, {}
        if args.engine:  # the Pruner chooses while it folds; drop the same blocks
            rows[True] = run_variant(dense_state, template, data, test, count, True, args)
            removed = rows[True]["removed_blocks"]
        removed = removed or library_choice(dense_state, template, data, count, args)
        for fold in (False, True):
            row = rows.get(fold) or run_variant(dense_state, template, data, test, removed, fold, args)
            pair[fold] = row.pop("_correct")
            results["rows"].append(row)
            print(row, flush=True)
        results["paired"].append({"blocks_removed": count, "removed_blocks": removed,
                                  "chosen_by": "--removed" if given else f"library (merge.select={args.select})" if
                                  args.engine else "library (blocks saliency)",
                                  "oneshot_fold_minus_drop": paired(pair[False]["oneshot"], pair[True]["oneshot"]),
                                  "finetuned_fold_minus_drop": paired(pair[False]["finetuned"], pair[True]["finetuned"])})
        common.write_json(args.out, results)
    results["load_avg_end"] = list(os.getloadavg())
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
