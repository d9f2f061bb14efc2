"""Does ``analyze``'s suggested.yaml beat the recipe it was made from? Side by side, one JSON.

The two runs are ordinary ``prune-callbacks finetune`` calls with the same ``--max-steps`` and ``--set``
overrides (so the same steps, tokens, seed and parameter budget; only the pruning section differs);
this script reads their report.json files and writes one comparison. Commands: BENCHMARKS.md,
"Redundancy analysis".

    python benchmarks/suggestion.py --default outputs/val_rt_default --suggested outputs/val_rt_suggested \
        --command "..." --out benchmarks/results/suggestion_rt.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _row(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    s = report["sparsity"]
    return {"output_dir": str(folder), "metric": report["metric"], "dense_metrics": report["dense_metrics"],
            "pruned_metrics": report["pruned_metrics"], "target_sparsity": s["target_sparsity"],
            "target_params": s["target_params"], "target_params_pruned": s["target_params_pruned"],
            "global_step": report["training"]["global_step"], "train_examples": report["training"]["train_examples"],
            "eval_examples": report["training"]["eval_examples"], "timing": report["timing"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--default", required=True, type=Path, help="finetune output of the recipe analysed")
    p.add_argument("--suggested", required=True, type=Path, help="finetune output of suggested.yaml")
    p.add_argument("--command", default="", help="the finetune command line(s), recorded in the JSON")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    rows = {"default": _row(args.default), "suggested": _row(args.suggested)}
    metric = rows["default"]["metric"]
    higher = metric not in ("perplexity", "loss")
    d, s = rows["default"]["pruned_metrics"][metric], rows["suggested"]["pruned_metrics"][metric]
    for key in ("global_step", "target_params_pruned"):
        if rows["default"][key] != rows["suggested"][key]:
            print(f"warning: {key} differs: {rows['default'][key]} vs {rows['suggested'][key]}")
    out = {"metric": metric, "higher_is_better": higher, "rows": rows, "default": d, "suggested": s,
           "suggested_better": (s > d) if higher else (s < d), "command": args.command,
           "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{metric}: default {d:.4f}, suggested {s:.4f} ({'better' if out['suggested_better'] else 'not better'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
