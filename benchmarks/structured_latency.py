"""CPU inference latency and parameter count: dense MiniLM vs slimmed (FFN neurons / blocks cut out).

Widths are chosen by weight magnitude (sum of |w| over every slice a neuron spans, the
same count removed in every block); blocks are removed from the top (the last ones).
No fine-tuning: this measures shapes (latency, parameters), not accuracy (accuracy after a short
fine-tune, with and without distillation: ``benchmarks/structured_accuracy.py``). Each variant
is checked against its masked twin (max |logit difference| printed and stored).
Timings: one forward per variant per round, variants interleaved (order rotated
each round), median over rounds; ``torch.inference_mode``; batch 1 and 32, seq 128.

    python benchmarks/structured_latency.py                 # 1 thread
    python benchmarks/structured_latency.py --runs 6        # six fresh processes: the spread between runs
    python benchmarks/structured_latency.py --smoke --out /tmp/s.json

A speed-up moves 5-10% between runs of the same models on the shared benchmark machine, far more than between
rounds of one run; ``--runs N`` times the variants in N fresh processes, one after another, and reports per
variant the median, the range and each run's speed-up, and the time of each variant against the first non-dense
one timed in the same rounds (a paired ratio, which moves far less).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from prune_callbacks.methods.structured import mask_model, unit_map  # noqa: E402
from prune_callbacks.export import slim
from prune_callbacks.analysis.latency import interleaved_medians as _medians  # noqa: E402

VARIANTS = {  # name: (fraction of FFN neurons removed, blocks removed); structured_accuracy.py reads it too
    "dense": (0.0, 0), "ffn50": (0.5, 0), "ffn75": (0.75, 0),
    "blocks1": (0.0, 1), "blocks2": (0.0, 2), "blocks3": (0.0, 3),
    "ffn50+blocks2": (0.5, 2),
    # what `analyze --set pruning.final_sparsity=0.3333 recipes/quickstart.yaml` suggested first, and the
    # candidates it probes at 0.5: the same parameter budgets (BENCHMARKS.md, "Redundancy analysis")
    "ffn30+blocks1": (0.3001, 1), "ffn60+blocks1": (0.6003, 1), "ffn38+blocks2": (0.375, 2),
    # the 2x and 3x plans of `analyze --goal speed` and the 4-block plans issue 28's eighth pass measured against them
    "ffn87.5": (0.875, 0), "ffn62.5+blocks3": (0.625, 3), "ffn75+blocks2": (0.75, 2), "ffn87.5+blocks2": (0.875, 2),
    # issue 28, ninth pass: between the two 4-block plans
    "ffn81.25+blocks2": (0.8125, 2),
}


def magnitude_keep(model, ffn: float, blocks: int) -> dict:
    keep = {}
    if ffn:
        masks = []
        for group in unit_map(model, "ffn_neurons"):
            score = sum(s.unit_view(s.param.detach().abs(), group.n_units).sum(1) for s in group.spans)
            kept = torch.ones(group.n_units, dtype=torch.bool)
            kept[torch.argsort(score, stable=True)[: round(ffn * group.n_units)]] = False
            masks.append(kept)
        keep["ffn_neurons"] = masks
    if blocks:
        n = len(unit_map(model, "blocks"))
        keep["blocks"] = [i < n - blocks for i in range(n)]
    return keep


def interleaved_medians(models: dict, forward, rounds: int, label: str = "") -> dict:
    """Median seconds of ``forward(model)`` per model: one warm-up each, then ``rounds`` rounds of one call per
    model, the order rotated every round, under ``torch.inference_mode`` (the analysis' latency probe's timer,
    `prune_callbacks.analysis.latency.interleaved_medians`, with a progress line per round)."""
    return _medians(models, forward, rounds, progress=lambda r: print(f"{label}: round {r}/{rounds}", flush=True))


def build(template, ffn, blocks, ids):
    keep = magnitude_keep(template, ffn, blocks)
    masked, slimmed = copy.deepcopy(template), copy.deepcopy(template)
    if not keep:
        return slimmed, 0.0
    mask_model(masked, keep)
    slim(slimmed, keep)
    with torch.inference_mode():
        diff = (masked(input_ids=ids).logits - slimmed(input_ids=ids).logits).abs().max().item()
    return slimmed, diff


def plot(json_path: Path) -> Path:
    """Bar chart of the batch-1 / batch-32 speedups and the parameter ratio (PNG next to the JSON)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.27
    ax.bar([i - width for i in x], [r["b1_speedup"] for r in rows], width, label="speedup, batch 1")
    ax.bar(list(x), [r["b32_speedup"] for r in rows], width, label="speedup, batch 32")
    ax.bar([i + width for i in x], [r["dense_params"] / r["params"] if "dense_params" in r else 1 / r["params_ratio"]
                                    for r in rows], width, label="dense params / params")
    ax.axhline(1.5, color="grey", ls="--", lw=0.8)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("x dense")
    ax.set_title(f"MiniLM CPU inference, seq {data['seq']}, {data['threads']} thread (median, interleaved)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def over_runs(args, argv) -> dict:
    """``--runs N``: this script without ``--runs`` in N fresh processes; per variant the median of the runs'
    speed-ups, their range, and the time relative to the first non-dense variant in the same rounds."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, __file__, *_without_runs(argv), "--out", str(out)]
            print(f"run {i + 1}/{args.runs}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    first = runs[0]
    by_name = [{r["variant"]: r for r in run["rows"]} for run in runs]  # per run: variant -> row
    names = list(by_name[0])
    reference = next((n for n in names if n != "dense"), None)
    rows = []
    for name in names:
        per_run = [run[name] for run in by_name]
        row = dict(per_run[0])
        for b in ("1", "32"):
            speedups = [r[f"b{b}_speedup"] for r in per_run]
            row[f"b{b}_speedup"] = statistics.median(speedups)
            row[f"b{b}_speedup_runs"] = speedups
            row[f"b{b}_median_s"] = statistics.median(r[f"b{b}_median_s"] for r in per_run)
            if reference:
                row[f"b{b}_time_vs_{reference}_runs"] = [
                    r[f"b{b}_median_s"] / run[reference][f"b{b}_median_s"] for r, run in zip(per_run, by_name)]
        rows.append(row)
        times = row.get(f"b32_time_vs_{reference}_runs", [])
        print(f"| {name} | {row['b32_speedup']:.2f}x ({min(row['b32_speedup_runs']):.2f}-"
              f"{max(row['b32_speedup_runs']):.2f}) |" + (f" {statistics.median(times):.3f} "
                                                          f"({min(times):.3f}-{max(times):.3f}) |" if times else ""))
    return {**{k: v for k, v in first.items() if k != "rows"}, "runs": args.runs, "reference": reference, "rows": rows}


def _without_runs(argv) -> list:
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--runs", "--out"):
            skip = True
        elif not a.startswith(("--runs=", "--out=")):
            out.append(a)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds1", type=int, default=30, help="rounds at batch 1")
    ap.add_argument("--rounds32", type=int, default=5, help="rounds at batch 32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="variants to time (dense is always timed: the speed-ups are against it)")
    ap.add_argument("--runs", type=int, default=1, help="time in this many fresh processes, one after another")
    ap.add_argument("--out", default=str(common.RESULTS / "structured_latency.json"))
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs {args.runs}: give 1 or more")
    if args.runs > 1:
        data = over_runs(args, argv)
        common.write_json(Path(args.out), data)
        print("plot:", plot(Path(args.out)))
        return data
    common.set_threads(args.threads)
    if args.smoke:
        template = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=4))
        args.rounds1, args.rounds32, args.seq = 2, 1, 16
    else:
        template, _ = common.load_minilm()
    template.eval()
    vocab = template.config.vocab_size
    ids = torch.randint(0, vocab, (2, args.seq), generator=torch.Generator().manual_seed(0))
    models, diffs, params = {}, {}, {}
    for name in dict.fromkeys(["dense", *args.variants]):
        ffn, blocks = VARIANTS[name]
        models[name], diffs[name] = build(template, ffn, blocks, ids)
        params[name] = sum(p.numel() for p in models[name].parameters())
        print(f"{name}: {params[name] / 1e6:.2f}M params, masked-vs-slim max diff {diffs[name]:.2e}", flush=True)
    timings = {}
    for batch, rounds in ((1, args.rounds1), (32, args.rounds32)):
        x = torch.randint(0, vocab, (batch, args.seq), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(x)
        timings[batch] = interleaved_medians(models, lambda m: m(input_ids=x, attention_mask=mask), rounds,
                                             label=f"batch {batch}")
    rows = []
    for name in models:
        rows.append({
            "variant": name, "ffn_removed": VARIANTS[name][0], "blocks_removed": VARIANTS[name][1],
            "params": params[name], "params_ratio": params[name] / params["dense"],
            "masked_vs_slim_max_abs_diff": diffs[name],
            **{f"b{b}_median_s": timings[b][name] for b in timings},
            **{f"b{b}_speedup": timings[b]["dense"] / timings[b][name] for b in timings},
        })
    for row in rows:
        print(f"| {row['variant']} | {row['params'] / 1e6:.2f}M ({row['params_ratio']:.2f}x) | "
              f"{row['b1_median_s'] * 1e3:.1f} ms ({row['b1_speedup']:.2f}x) | "
              f"{row['b32_median_s'] * 1e3:.0f} ms ({row['b32_speedup']:.2f}x) |")
    common.write_json(Path(args.out), {"hardware": common.hardware_info(), "threads": args.threads, "seq": args.seq,
                                       "rounds": {"1": args.rounds1, "32": args.rounds32}, "rows": rows})
    print("plot:", plot(Path(args.out)))


if __name__ == "__main__":
    main()
