"""PNG plots and markdown tables from ``benchmarks/results/*.json``.

    python benchmarks/plot.py                 # every plot whose JSON exists, tables on stdout
    python benchmarks/plot.py --results DIR   # another results folder (e.g. a GPU run)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

LABELS = {
    "magnitude_per_layer": "magnitude (per-layer)",
    "magnitude_global": "magnitude (global)",
    "taylor": "taylor (default)",
    "platon": "platon",
    "movement": "movement",
    "torch_ao": "torch.ao WeightNorm + CubicSL",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(path) -> dict:
    return json.loads(Path(path).read_text())


def plot_quality(path, png) -> None:
    data, plt = _load(path), _plt()
    runs = data["runs"]
    dense = next((r for r in runs if r["method"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label in LABELS.items():
        pts = sorted((r["final_sparsity"], 100 * r["test_accuracy"]) for r in runs if r["name"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense:
        ax.axhline(100 * dense["test_accuracy"], color="k", ls="--", lw=1, label="dense")
        ax.axhline(97 * dense["test_accuracy"], color="grey", ls=":", lw=1, label="97% of dense")
    if data.get("test_majority_accuracy"):
        ax.axhline(100 * data["test_majority_accuracy"], color="r", ls=":", lw=1, label="majority class")
    ax.set_xlim(0.45, 1.0)
    ax.set_xlabel("final sparsity of the encoder Linear weights")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MiniLM on Rotten Tomatoes ({data['setting']}: {data['training']['steps']} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_ablation(path, grid_path, png) -> None:
    data, plt = _load(path), _plt()
    runs = list(data["runs"])
    if grid_path and Path(grid_path).exists():
        grid = _load(grid_path)["runs"]
        runs = [r for r in grid if r["name"] in ("taylor", "magnitude_global") and r["final_sparsity"] == 0.9] + runs
        dense = next((r for r in grid if r["method"] == "dense"), None)
    else:
        dense = None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["name"] for r in runs]
    ax.barh(names, [100 * r["test_accuracy"] for r in runs], color="tab:blue")
    if dense:
        ax.axvline(100 * dense["test_accuracy"], color="k", ls="--", lw=1, label="dense")
        ax.axvline(97 * dense["test_accuracy"], color="grey", ls=":", lw=1, label="97% of dense")
        ax.legend(fontsize=8)
    lo = min(100 * r["test_accuracy"] for r in runs) - 5
    ax.set_xlim(max(0, lo), 100 if not dense else max(100 * dense["test_accuracy"] + 3, lo + 10))
    ax.set_xlabel("test accuracy (%) at 90% sparsity")
    ax.set_title("Ablation of the default (taylor, global) at 90%")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_overhead(path, png) -> None:
    data, plt = _load(path), _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    models = list(data["models"])
    methods = list(dict.fromkeys(k for row in data["models"].values() for k in row["interleaved"]["variants"]))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        v = data["models"][m]["interleaved"]["variants"]
        ax.bar([j + i * width for j in range(len(methods))], [100 * (v[k]["ratio"] - 1) if k in v else float("nan") for k in methods], width, label=m)
    ax.axhline(3, color="r", ls="--", lw=1, label="3% target")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel("added step time (%)")
    ax.set_title(f"Pruner overhead per step ({data['hardware']['device']}, batch {data['settings']['batch']} x {data['settings']['seq']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_size(path, png) -> None:
    data, plt = _load(path), _plt()
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0})
    width = 0.8 / len(dtypes)
    for i, d in enumerate(dtypes):
        dense = next(r for r in rows if r["dtype"] == d and r["kind"] == "dense")["weights_bytes"]
        vals = []
        for s in sparsities:
            r = next((r for r in rows if r["dtype"] == d and r["kind"] == "sparse" and r["sparsity"] == s), None)
            vals.append(r["weights_bytes"] / 2**20 if r and r.get("weights_bytes") else 0)
        xs = [j + i * width for j in range(len(sparsities))]
        ax.bar(xs, vals, width, label=f"{d} sparse")
        ax.hlines(dense / 2**20, xs[0] - width / 2, xs[-1] + width / 2, colors="k", linestyles=":", lw=1)
    ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(sparsities))], [f"{s:.0%}" for s in sparsities])
    ax.set_ylabel("weights file (MiB); dotted: dense / finalized")
    ax.set_title(data["model"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables
def quality_table(path) -> str:
    data = _load(path)
    runs = data["runs"]
    sparsities = sorted({r["final_sparsity"] for r in runs if r["method"] != "dense"})
    dense = next((r for r in runs if r["method"] == "dense"), None)
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---" * (len(sparsities) + 1) + "|"]
    if dense:
        lines.append(f"| dense | {100 * dense['test_accuracy']:.1f} (val {100 * dense['validation_accuracy']:.1f}, "
                     f"{dense['train_wall_s']:.0f} s) |" + " |" * (len(sparsities) - 1))
    for name in LABELS:
        cells = []
        for s in sparsities:
            r = next((r for r in runs if r["name"] == name and r["final_sparsity"] == s), None)
            cells.append("—" if r is None else
                         f"{100 * r['test_accuracy']:.1f} "
                         f"({100 * r['test_accuracy'] / dense['test_accuracy'] if dense else float('nan'):.1f}%)"
                         f" [{100 * r['achieved_sparsity']:.1f}%, {r['train_wall_s']:.0f} s]")
        if any(c != "—" for c in cells):
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(path, grid_path=None) -> str:
    runs = _load(path)["runs"]
    dense = None
    if grid_path and Path(grid_path).exists():
        grid = _load(grid_path)["runs"]
        dense = next((r for r in grid if r["method"] == "dense"), None)
        runs = [r for r in grid if r["name"] in ("taylor", "magnitude_global", "magnitude_per_layer")
                and r["final_sparsity"] == 0.9] + runs
    lines = ["| variant (90%) | changed | test acc | retention | val acc | max layer sparsity | layers > 99% |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        ret = f"{100 * r['test_accuracy'] / dense['test_accuracy']:.1f}%" if dense else "—"
        lines.append(f"| {r['name']} | {r.get('overrides') or '(defaults)'} | {100 * r['test_accuracy']:.1f} | {ret} | "
                     f"{100 * r['validation_accuracy']:.1f} | {r['max_layer_sparsity']:.3f} | {r['layers_above_99pct']} |")
    return "\n".join(lines)


def overhead_table(path) -> str:
    data = _load(path)
    lines = ["| model | prunable | dense ms/step | method | interleaved ratio (median) | + mask updates amortised | "
             "hook pieces ms (theta*grad + finite check + EMA + masking) | pieces / dense step |",
             "|---|---|---|---|---|---|---|---|"]
    for m, row in data["models"].items():
        iv = row["interleaved"]
        dense_ms = iv["dense_step_ms"]
        for v, c in row["components"].items():
            r = iv["variants"].get(v)
            pieces = c["theta_x_grad_and_finite_check"] + c.get("saliency_update", 0.0) + c["apply_masks"]
            lines.append(f"| {m} | {row['prunable_params'] / 1e6:.1f}M | {dense_ms:.0f} | {v} | "
                         + (f"{r['ratio']:.3f} | {r['amortised_ratio']:.3f} | " if r else "— | — | ")
                         + f"{pieces:.0f} = {c['theta_x_grad_only']:.0f} + {c['finite_check_ms']:.0f} + "
                         f"{c.get('saliency_update', 0.0):.0f} + {c['apply_masks']:.0f} | {100 * pieces / dense_ms:.1f}% |")
    lines += ["", "| model | one mask update: global (ms) | global, max_layer_sparsity 0.98 (ms) | per_layer (ms) |", "|---|---|---|---|"]
    for m, row in data["models"].items():
        mu = row["mask_update"]
        lines.append(f"| {m} | {mu['global']['ms']:.0f} | {mu.get('global_cap0.98', {}).get('ms', float('nan')):.0f} | "
                     f"{mu['per_layer']['ms']:.0f} |")
    lines += ["", "| model | method | steady bytes / prunable param (measured) | BYTES_PER_PARAM + 1 (mask) | "
              "transient peak during a global mask update (peak RSS, B/param) |", "|---|---|---|---|---|"]
    for m, row in data["models"].items():
        for v, r in row.get("memory", {}).items():
            lines.append(f"| {m} | {v} | {r['steady_bytes_per_param']:.2f} | {r['documented_BYTES_PER_PARAM_plus_mask']} | "
                         f"{r.get('transient_peak_bytes_per_param_global_mask_update', float('nan')):.1f} |")
    return "\n".join(lines)


def size_table(path) -> str:
    data = _load(path)
    lines = ["| dtype | sparsity | dense (MiB) | finalized (MiB) | sparse (MiB) | sparse / dense |", "|---|---|---|---|---|---|"]
    rows = data["rows"]
    for d in dict.fromkeys(r["dtype"] for r in rows):
        dense = next(r for r in rows if r["dtype"] == d and r["kind"] == "dense")["weights_bytes"]
        for s in sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}):
            fin = next(r for r in rows if r["dtype"] == d and r["sparsity"] == s and r["kind"] == "finalized")
            sp = next(r for r in rows if r["dtype"] == d and r["sparsity"] == s and r["kind"] == "sparse")
            spb = sp.get("weights_bytes")
            lines.append(f"| {d} | {s:.0%} | {dense / 2**20:.2f} | {fin['weights_bytes'] / 2**20:.2f} | "
                         + (f"{spb / 2**20:.2f} | {spb / dense:.3f} |" if spb else "pending | — |"))
    return "\n".join(lines)


LM_TOKEN_VARIANTS = ("dense", "ffn25", "ffn25+merge")


def lm_token_points(results: Path) -> dict:
    """SmolLM2 FFN 25% against its dense model, by training tokens: ``{(seed, variant): {tokens: perplexity}}`` from
    every ``structured_lm*.json`` row of a plain variant (default window, no teacher, no rate after the cut, the
    saliency's choice); where two files hold the same row, the later run's."""
    points, dates = {}, {}
    for path in sorted(results.glob("structured_lm*.json")):
        data = _load(path)
        seed, tokens, date = data["budget"]["seed"], data["budget"]["tokens"], data["hardware"]["date"]
        for row in data["rows"]:
            name = common.without_seed(row["variant"], seed)
            plain = (row.get("window") in (None, list(common.DEFAULT_WINDOW)) and row.get("distillation") is None
                     and row.get("recovery_lr_scale") in (None, 1.0) and not row.get("select"))
            key = (seed, name, tokens)
            if name in LM_TOKEN_VARIANTS and plain and date >= dates.get(key, ""):
                dates[key] = date
                points.setdefault((seed, name), {})[tokens] = row["perplexity"]
    return points


def plot_lm_tokens(results: Path, png) -> str:
    """Perplexity above the dense model of the same seed and tokens, against training tokens (log scale); returns
    the table."""
    points = lm_token_points(results)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens_all = sorted({t for by_tokens in points.values() for t in by_tokens})
    lines = ["| seed | variant | " + " | ".join(f"{t:,} tokens" for t in tokens_all) + " |",
             "| --- | --- | " + " | ".join("---" for _ in tokens_all) + " |"]
    for (seed, name), by_tokens in sorted(points.items()):
        dense = points.get((seed, "dense"), {})
        if name == "dense":
            continue
        xs = [t for t in sorted(by_tokens) if t in dense]
        gaps = [100 * (by_tokens[t] / dense[t] - 1) for t in xs]
        drop = name == "ffn25"
        ax.plot(xs, gaps, marker="o" if drop else "s", ls="-" if drop else "--", color=f"C{seed}",
                label=f"{'drop' if drop else 'merge'}, seed {seed}")
        cells = {t: f"+{g:.1f}%" for t, g in zip(xs, gaps)}
        lines.append(f"| {seed} | {name} | " + " | ".join(cells.get(t, "") for t in tokens_all) + " |")
    ax.axhline(5, color="black", ls=":", label="target: within 5%")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity above dense (%)")
    ax.set_title("SmolLM2-135M, 25% of FFN neurons removed, vs dense fine-tuned on the same tokens")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    r = args.results
    for q in sorted(r.glob("quality_*.json")):
        if q.stem.endswith("_ablation"):
            grid = q.with_name(q.name.replace("_ablation", ""))
            plot_ablation(q, grid, q.with_suffix(".png"))
            print(f"\n## {q.name}\n\n{ablation_table(q, grid)}")
        else:
            plot_quality(q, q.with_suffix(".png"))
            print(f"\n## {q.name}\n\n{quality_table(q)}")
    for o in sorted(r.glob("overhead_*.json")):
        plot_overhead(o, o.with_suffix(".png"))
        print(f"\n## {o.name}\n\n{overhead_table(o)}")
    if list(r.glob("structured_lm_750*.json")):
        png = r / "structured_lm_tokens.png"
        print(f"\n## {png.name}\n\n{plot_lm_tokens(r, png)}")
    s = r / "size.json"
    if s.exists():
        plot_size(s, s.with_suffix(".png"))
        print(f"\n## size.json\n\n{size_table(s)}")


if __name__ == "__main__":
    main()
