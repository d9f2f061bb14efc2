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
    python benchmarks/speed_plan_accuracy.py --frontier results/speed_plan_*.json --steps 1600 \\
        --latency results/structured_latency_x3.json --out results/speed_plan_frontier.json   # table + PNG
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
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


def _shape_name(units) -> str | None:
    """The `structured_latency` variant with the shape ``units`` describe (FFN fraction, blocks of MiniLM's 6)."""
    ffn = next((f for g, f in units if g == "ffn_neurons"), 0.0)
    blocks = round(next((f for g, f in units if g == "blocks"), 0.0) * sa.MINILM_BLOCKS)
    return next((n for n, (f, b) in sa.SHAPES.items() if abs(f - ffn) < 1e-3 and b == blocks), None)


def frontier(files, latency_files, steps: int, include: str | None = None) -> dict:
    """Per plan and lever (a row name without its seed): the batch-32 speed-up of its shape (mean over
    ``latency_files``, `structured_latency.py` results) and its test accuracy as a share of the dense row of the
    same seed and learning rate, per seed, with mean and standard error over seeds. Rows of another ``steps``, and
    plans whose name does not match the regular expression ``include`` (when given), are left out; the first row of
    a name wins (as in ``--merge``)."""
    rows: dict = {}
    for f in files:
        for row in sa.rows_of(json.loads(Path(f).read_text())):
            if row.get("steps") == steps:
                rows.setdefault(row["variant"], row)
    dense = {(r["seed"], r["lr"]): r["test_accuracy"] for r in rows.values() if not r["units"]}
    speed: dict = {}
    for f in latency_files:
        for row in json.loads(Path(f).read_text())["rows"]:
            speed.setdefault(row["variant"], []).append(row["b32_speedup"])
    out: dict = {}
    for row in rows.values():
        if not row["units"] or (row["seed"], row["lr"]) not in dense:
            continue
        base = common.without_seed(row["variant"], row["seed"])
        if include and not re.search(include, base):
            continue
        shape = _shape_name(row["units"])
        entry = out.setdefault(base, {"shape": shape, "speedups": speed.get(shape, []), "seeds": {}})
        entry["seeds"][row["seed"]] = row["test_accuracy"] / dense[row["seed"], row["lr"]]
    for entry in out.values():
        shares = list(entry["seeds"].values())
        entry["speedup"] = statistics.mean(entry["speedups"]) if entry["speedups"] else None
        entry["mean"] = statistics.mean(shares)
        entry["se"] = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) > 1 else None
    return {"steps": steps, "dense": {f"{s}/lr{lr:g}": v for (s, lr), v in dense.items()},
            "files": [str(f) for f in files],
            "latency_files": [str(f) for f in latency_files], "plans": out}


def plot_frontier(data: dict, png: Path) -> Path:
    """Share of dense accuracy against speed-up: one dot per seed, the mean with its standard error, the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.0))
    at = collections.Counter()  # entries at one speed-up (to 0.1) are drawn side by side
    for (x, y), label in (((2.0, 99.0), "target 2x at 99%"), ((3.0, 97.0), "target 3x at 97%")):
        ax.plot([x, x, 4.0], [100.5, y, y], color="grey", ls="--", lw=0.8)
        ax.annotate(label, (x, y), xytext=(3, -10), textcoords="offset points", fontsize=7, color="grey")
    for name, entry in sorted(data["plans"].items()):
        if entry["speedup"] is None:
            continue
        shares = [100 * v for v in entry["seeds"].values()]
        x = entry["speedup"] + 0.04 * at[round(entry["speedup"], 1)]
        at[round(entry["speedup"], 1)] += 1
        points = ax.scatter([x] * len(shares), shares, s=10, alpha=0.5)
        short = name.replace("/blocks@0.33/fold=blocks/fold", ", blocks folded one-shot")
        ax.errorbar(x, 100 * entry["mean"], yerr=100 * (entry["se"] or 0), fmt="o",
                    color=points.get_facecolor()[0][:3], capsize=3,
                    label=f"{short} (n={len(shares)}): {100 * entry['mean']:.1f}%")
    # below the axes: labels beside the points collide where plans share a speed-up
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    ax.set_xlabel("batch-32 speed-up over dense (structured_latency.py, mean of runs)")
    ax.set_ylabel("test accuracy, % of dense (same seed and rate)")
    ax.set_title(f"MiniLM / Rotten Tomatoes, {data['steps']} steps: speed plans per seed (mean ± s.e.)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analysis", type=Path, help="analysis.json of an analyze --goal speed run")
    ap.add_argument("--targets", nargs="+", type=float, default=[3.0, 2.0])
    ap.add_argument("--only", nargs="+", default=None, help="variants to run: dense, x3, x2, ... (default: all)")
    ap.add_argument("--plan", nargs="+", default=[], metavar="NAME=GRANULARITY:FRACTION[,...]",
                    help="extra variants to compare with, e.g. ffn75+blocks2=ffn_neurons:0.75,blocks:0.3333")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=sa.DEFAULT_LR)
    ap.add_argument("--max-eval", type=int, default=None, help="test rows (default: the whole split)")
    ap.add_argument("--threads", type=int, default=1)
    common.add_seed_argument(ap)
    common.add_lever_arguments(ap)
    common.add_cut_arguments(ap)
    ap.add_argument("--save-dense", type=Path, default=None, help="save the dense row's fine-tuned model here")
    ap.add_argument("--dense-from", type=Path, default=None,
                    help="teacher of the +kd variants: a dense model saved by --save-dense in the same setting")
    ap.add_argument("--augment", type=float, default=None, metavar="P",
                    help="half the training rows with each token masked with probability P (for +kd rows: the "
                         "teacher labels them); rows are named /augP")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, default=None)
    ap.add_argument("--frontier", nargs="+", type=Path, default=None, metavar="RESULTS",
                    help="summarise the rows of these results files trained for --steps steps per plan and lever "
                         "(share of dense per seed) against the speed-ups of --latency; writes --out and a PNG "
                         "beside it")
    ap.add_argument("--latency", nargs="+", type=Path, default=[], help="structured_latency.py results for --frontier")
    ap.add_argument("--include", default=None, metavar="REGEX", help="--frontier: only the plans whose name matches")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "speed_plan_accuracy.json")
    args = ap.parse_args(argv)
    common.check_cut_arguments(ap, args)
    if args.merge:
        return sa.merge(args.merge, args.out)
    if args.frontier:
        data = frontier(args.frontier, args.latency, args.steps, args.include)
        common.write_json(args.out, data)
        for name, e in sorted(data["plans"].items(), key=lambda kv: (kv[1]["speedup"] or 0, kv[0])):
            seeds = " / ".join(f"{100 * v:.1f}" for _, v in sorted(e["seeds"].items()))
            print(f"| {name} | {e['speedup'] or float('nan'):.2f}x | {seeds} | {100 * e['mean']:.1f}%"
                  + (f" ± {100 * e['se']:.1f}" if e["se"] else "") + " |")
        print("plot:", plot_frontier(data, args.out.with_suffix(".png")))
        return data
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
                                  blocks_oneshot=args.blocks_oneshot, slim_lr=args.slim_lr, slim_lr_at=args.slim_lr_at,
                                  recovery_lr_scale=args.recovery_lr_scale, saliency=args.saliency, beta=args.beta,
                                  augment=args.augment)
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
