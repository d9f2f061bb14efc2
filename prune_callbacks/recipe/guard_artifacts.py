"""The accuracy guard's part of a run's artefacts (issue 15): the ``accuracy_guard`` entry of report.json
(one per guarded config: `AccuracyGuard.report`), its section of REPORT.md and its markers on the plot."""

from __future__ import annotations

from typing import Mapping

#: decision -> (matplotlib marker, colour) on the sparsity-over-steps plot
MARKERS = {"baseline": ("s", "tab:green"), "continue": ("o", "tab:blue"), "hold": ("D", "tab:orange"),
           "rollback": ("X", "tab:red"), "stop": ("P", "tab:purple"), "final": ("*", "black")}


def guard_markdown(report: Mapping) -> list[str]:
    """REPORT.md lines: where each guard ended, and its trajectory (empty without a guard)."""
    lines: list[str] = []
    for i, g in enumerate(report.get("accuracy_guard") or []):
        final = g.get("final") or {}
        title = "## Accuracy guard" + (f" (config {i})" if len(report["accuracy_guard"]) > 1 else "")
        lines += [title, ""]
        if final:
            verdict = "within" if final["met"] else "**not** within"
            lines += [f"Ended at sparsity **{final['sparsity']:.1%}** with `{g['metric']}` = {final['metric']:.4f}, "
                      f"measured there after recovery; dense baseline {g['baseline']:.4f}: {verdict} the allowed drop.",
                      ""]
        lines += ["| step | sparsity | metric | decision |", "|---:|---:|---:|---|"]
        lines += [f"| {r['step']} | {r['sparsity']:.1%} | {r['metric']:.4f} | {r['decision']} |" for r in g["trajectory"]]
        lines.append("")
    return lines


def plot_trajectory(ax, trajectory: list[dict], *, label: bool = True) -> None:
    """The guard's decisions as markers at (step, sparsity evaluated at) on ``ax``."""
    for decision, (marker, colour) in MARKERS.items():
        points = [(r["step"], r["sparsity"]) for r in trajectory if r["decision"] == decision]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, s=36, zorder=3,
                       label=f"guard: {decision}" if label else None)
