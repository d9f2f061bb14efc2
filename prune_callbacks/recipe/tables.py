"""Compact sparsity tables: tensors of repeated blocks grouped (``layer.*.query.weight``), plus totals."""

from __future__ import annotations

from typing import Mapping, Optional

from prune_callbacks.core.report import group_name


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def group_rows(per_tensor: Mapping[str, Mapping]) -> list[dict]:
    """One row per tensor kind, in first-seen order: count, params, sparsity, min / max tensor sparsity."""
    groups: dict[str, dict] = {}
    for name, row in per_tensor.items():
        g = groups.setdefault(group_name(name), {"group": group_name(name), "tensors": 0, "numel": 0, "zeros": 0,
                                                 "min": 1.0, "max": 0.0})
        g["tensors"] += 1
        g["numel"] += int(row["numel"])
        g["zeros"] += int(row["numel"]) - int(row["nonzero"])
        g["min"] = min(g["min"], float(row["sparsity"]))
        g["max"] = max(g["max"], float(row["sparsity"]))
    for g in groups.values():
        g["sparsity"] = g["zeros"] / g["numel"] if g["numel"] else 0.0
    return list(groups.values())


def format_table(table: Mapping, header: Optional[str] = None) -> str:
    """Text table of a ``sparsity_of_tensors`` result."""
    rows = group_rows(table["per_tensor"])
    width = max([len("tensor (grouped)")] + [len(r["group"]) for r in rows])
    lines = [header] if header else []
    lines.append(f"{'tensor (grouped)':<{width}}  {'n':>3}  {'params':>8}  {'sparsity':>8}  range")
    for r in rows:
        spread = f"{r['min']:.1%}..{r['max']:.1%}" if r["tensors"] > 1 and r["max"] - r["min"] > 5e-4 else ""
        lines.append(f"{r['group']:<{width}}  {r['tensors']:>3}  {human_count(r['numel']):>8}  {r['sparsity']:>8.1%}  {spread}")
    lines.append("")
    lines.append(f"matrices (>= 2-D): {human_count(table['matrix_params'])} params, {table['matrix_sparsity']:.1%} zero")
    lines.append(f"all tensors:       {human_count(table['params'])} params, {human_count(table['nonzero_params'])} nonzero, "
                 f"{table['sparsity']:.1%} zero")
    return "\n".join(lines)


def markdown_table(table: Mapping) -> str:
    """The same grouping as a markdown table."""
    lines = ["| tensor (grouped) | n | params | sparsity | range |", "|---|---:|---:|---:|---|"]
    for r in group_rows(table["per_tensor"]):
        spread = f"{r['min']:.1%} – {r['max']:.1%}" if r["tensors"] > 1 and r["max"] - r["min"] > 5e-4 else ""
        lines.append(f"| `{r['group']}` | {r['tensors']} | {human_count(r['numel'])} | {r['sparsity']:.1%} | {spread} |")
    return "\n".join(lines)
