"""PNG plots of an analysis (matplotlib's object API: no global backend state)."""

from __future__ import annotations

from pathlib import Path


def _fig(size=(8, 4.5)):
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def write_plots(a: dict, out: Path) -> list[str]:
    import numpy as np

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(name)

    fig = _fig((12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    for name, s in a["spectra"].items():
        sv = np.array(s["singular_values"])
        if sv.size:
            ax1.semilogy(sv / sv[0], lw=0.7)
            ax2.plot(np.arange(1, sv.size + 1) / sv.size, np.cumsum(sv ** 2) / np.sum(sv ** 2), lw=0.7)
    ax1.set_title("singular values (normalised), every target")
    ax1.set_xlabel("index")
    ax2.set_title("energy held by the top fraction of the rank")
    ax2.set_xlabel("rank / full rank")
    ax2.axhline(0.95, color="gray", ls="--", lw=0.8)
    save(fig, "spectra.png")

    fig = _fig()
    ax = fig.subplots()
    mass = a["saliency_mass"]
    for kind, curve in mass["per_kind"].items():
        ax.plot(list(map(float, curve)), list(curve.values()), marker=".", label=kind)
    ax.axvline(a["budget"], color="gray", ls="--", lw=0.8)
    ax.set_xlabel("fraction of weights (lowest saliency first)")
    ax.set_ylabel("share of |theta * grad| they hold")
    ax.set_title("saliency mass per layer kind")
    ax.legend(fontsize=6)
    save(fig, "saliency_mass.png")

    if a.get("head_similarity"):
        fig = _fig((7, 6))
        ax = fig.subplots()
        image = ax.imshow(np.array(a["head_similarity"]), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title("cosine similarity of head outputs (calibration tokens)")
        ax.set_xlabel("head (layer-major)")
        fig.colorbar(image, ax=ax)
        save(fig, "head_similarity.png")

    fig = _fig()
    ax = fig.subplots()
    blocks = a["blocks"]
    ax.bar(range(len(blocks)), [b["influence"] for b in blocks], color="tab:blue", label="1 - cos(in, out)")
    ax.set_xlabel("block")
    ax.set_ylabel("influence")
    if any("metric_skipped" in b for b in blocks):
        right = ax.twinx()
        right.plot(range(len(blocks)), [b.get("metric_skipped", np.nan) for b in blocks], "o-", color="tab:red",
                   label=f"{a['metric']} with block skipped")
        right.axhline(a["baseline"], color="tab:green", ls="--", label="baseline")
        right.set_ylabel(a["metric"])
        right.legend(fontsize=7, loc="upper right")
    ax.set_title("block influence")
    save(fig, "block_influence.png")

    rows = [r for r in a.get("strategies") or [] if r.get("applicable")]
    if rows:
        fig = _fig((8, 0.5 * len(rows) + 1.8))
        ax = fig.subplots()
        colours = ["tab:gray" if r["kind"] in ("unstructured", "N:M") else "tab:blue" for r in rows]
        values = [r["metric"] for r in rows]
        ax.barh(range(len(rows)), values, color=colours)
        if not a.get("higher_is_better", True) and max(values) > 10 * max(min(values), 1e-12):
            ax.set_xscale("log")  # perplexities of heavily damaged strategies span orders of magnitude
            ax.set_xlim(left=min(min(values), a["baseline"]) * 0.8)
        ax.set_yticks(range(len(rows)), [f"{r['name']} ({r['removed']:.0%})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(a["baseline"], color="tab:green", ls="--", label="dense")
        if a.get("chance") is not None:
            ax.axvline(a["chance"], color="tab:red", ls=":", label="majority class")
        ax.set_xlabel(f"{a['metric']} one-shot (blue: structured, a smaller dense model)")
        ax.set_title(f"strategies removing {a['budget']:.0%} of the targeted weights")
        ax.legend(fontsize=7)
        save(fig, "strategies.png")
    return written
