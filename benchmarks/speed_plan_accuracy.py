"""MiniLM on Rotten Tomatoes: accuracy of the depth + width plans `analyze --goal speed --target-speedup X` chooses.

Reads the latency table of an ``analyze --goal speed`` run (its analysis.json), chooses the plan for every
``--targets`` value with the library's own rule (`prune_callbacks.analysis.latency.choose`: the plan measured at or
above the target with the least predicted loss), and fine-tunes each chosen plan in the reduced setting of
``benchmarks/structured_accuracy.py`` (its `run_variant`: taylor, cubic 10%..60% of the run, uniform per block,
then `slim_pruned`; same seed, batches and optimizer as its ``dense`` row), test accuracy on ``--max-eval`` rows
(default: the whole test split, 1,275 rows). Rows are appended to ``--out`` as they finish (``--resume`` skips done
ones; run several processes on disjoint ``--only`` lists and ``--merge`` them).

    python benchmarks/speed_plan_accuracy.py --analysis benchmarks/results/analysis_minilm_speed3/analysis.json \\
        --targets 3 2 --only dense --out /tmp/a.json
    python benchmarks/speed_plan_accuracy.py --analysis .../analysis.json --targets 3 2 --only x3 x2 --out /tmp/b.json
    python benchmarks/speed_plan_accuracy.py --analysis .../analysis.json --only ffn75+blocks2 \
        --plan ffn75+blocks2=ffn_neurons:0.75,blocks:0.3333 --out /tmp/c.json
    python benchmarks/speed_plan_accuracy.py --merge /tmp/a.json /tmp/b.json --out benchmarks/results/speed_plan_accuracy.json
    python benchmarks/speed_plan_accuracy.py --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks import structured_accuracy as sa  # noqa: E402
from prune_callbacks.analysis.latency import choose  # noqa: E402


def plans(analysis: dict, targets) -> dict:
    """``{variant name: (target, latency row)}`` for every target (``x3``, ``x2``, ...)."""
    rows = analysis["latency"]["rows"]
    out = {}
    for t in targets:
        row, why = choose(rows, t)
        if row is None:
            raise SystemExit(why)
        out[f"x{t:g}"] = (t, row, why)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analysis", type=Path, help="analysis.json of an analyze --goal speed run")
    ap.add_argument("--targets", nargs="+", type=float, default=[3.0, 2.0])
    ap.add_argument("--only", nargs="+", default=None, help="variants to run: dense, x3, x2, ... (default: all)")
    ap.add_argument("--plan", nargs="+", default=[], metavar="NAME=GRANULARITY:FRACTION[,...]",
                    help="extra variants to compare with, e.g. ffn75+blocks2=ffn_neurons:0.75,blocks:0.3333")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-eval", type=int, default=None, help="test rows (default: the whole split)")
    ap.add_argument("--threads", type=int, default=1)
    common.add_seed_argument(ap)
    common.add_lever_arguments(ap)
    ap.add_argument("--save-dense", type=Path, default=None, help="save the dense row's fine-tuned model here")
    ap.add_argument("--dense-from", type=Path, default=None,
                    help="teacher of the +kd variants: a dense model saved by --save-dense in the same setting")
    ap.add_argument("--augment", type=float, default=None, metavar="P",
                    help="half the training rows with each token masked with probability P (for +kd rows: the "
                         "teacher labels them); rows are named /augP")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=common.RESULTS / "speed_plan_accuracy.json")
    args = ap.parse_args(argv)
    if args.merge:
        return sa.merge(args.merge, args.out)
    common.set_threads(args.threads)
    if args.smoke:
        n = 6
        analysis = {"latency": {"rows": [
            {"name": "ffn_neurons 50% + blocks 1", "speedup": 2.1, "predicted_loss": 0.2, "configs": [
                {"granularity": "ffn_neurons", "final_sparsity": 0.5}, {"granularity": "blocks", "final_sparsity": 1 / n}]},
            {"name": "ffn_neurons 75%", "speedup": 3.1, "predicted_loss": 0.1, "configs": [
                {"granularity": "ffn_neurons", "final_sparsity": 0.75}]}]}}
        args.steps = 4
    elif args.analysis is None:  # the dense row needs no analysis
        if (args.only or []) != ["dense"]:
            raise SystemExit("--analysis is needed for the chosen plans (only --only dense runs without it)")
        analysis = {"latency": {"rows": []}}
        args.targets = []
    else:
        analysis = json.loads(args.analysis.read_text())
    chosen = plans(analysis, args.targets)
    for item in args.plan:
        name, _, spec = item.partition("=")
        sa.VARIANTS[name] = [(g, float(f)) for g, _, f in (part.partition(":") for part in spec.split(","))]
    for name, (_, row, _) in chosen.items():  # register them with the structured benchmark's variant table
        sa.VARIANTS[name] = [(c["granularity"], c["final_sparsity"]) for c in row["configs"]]
    wanted = args.only or ["dense", *chosen]
    run_args = argparse.Namespace(seed=args.seed, steps=args.steps, lr=args.lr, max_eval=args.max_eval, smoke=args.smoke,
                                  save_dense=args.save_dense, dense_from=args.dense_from, window=tuple(args.window),
                                  hardness=args.hardness, hidden_weight=args.hidden_weight, fold=args.fold,
                                  fold_steps=args.fold_steps, fold_select=args.fold_select,
                                  blocks_oneshot=args.blocks_oneshot, augment=args.augment)
    results = {"benchmark": "speed_plan_accuracy", "hardware": common.hardware_info(), "threads": args.threads,
               "lr": args.lr, "batch_size": 16, "max_len": 64, "seed": args.seed,
               "latency": {k: v for k, v in analysis["latency"].items() if k != "rows"}, "rows": []}
    if args.resume and args.out.exists():
        results["rows"] = json.loads(args.out.read_text())["rows"]
    done = {r["variant"] for r in results["rows"]}
    for name in wanted:
        if sa.label(name, run_args) in done:
            continue
        row = sa.run_variant(name, run_args)
        _, suffix = sa._kinds(name)
        plan_name = name.removesuffix(suffix) if suffix else name
        if plan_name in chosen:
            target, plan, why = chosen[plan_name]
            row.update(target_speedup=target, plan=plan["name"], probe_speedup=plan["speedup"],
                       predicted_loss=plan["predicted_loss"], why=why)
        results["rows"].append(row)
        print(row, flush=True)
        common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
