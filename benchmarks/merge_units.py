"""Merge, not only drop: FFN neurons removed one-shot from a fine-tuned MiniLM, with and without the least-squares fold.

1. Fine-tune MiniLM on Rotten Tomatoes dense for ``--dense-steps`` (batch 16, AdamW, warmup + linear decay).
2. Per FFN fraction and merge on/off, from that same dense state: ``--calib`` optimizer steps at learning rate 0
   (the weights do not move; the taylor saliency and, with merge, the Gram statistics of every FFN output
   projection's input are gathered), then the ``oneshot`` schedule removes the fraction of neurons per block after
   step ``--calib`` (the fold, with merge, happens there). Test accuracy right then: *before any fine-tuning*.
3. ``--finetune`` more steps (lr ``--lr``, warmup + decay) with the masks held; test accuracy again, then
   `slim_pruned` and a last check that the slim model scores the same.

merge on/off use identical batches, saliency and therefore identical removed neurons (asserted), so the
difference is the fold alone; the paired standard error over the test rows is reported with it.

    python benchmarks/merge_units.py --threads 1 --out benchmarks/results/merge_units.json
    python benchmarks/merge_units.py --threads 1 --seed 1 --out benchmarks/results/merge_units_seed1.json
    python benchmarks/merge_units.py --pool benchmarks/results/merge_units*.json --out benchmarks/results/merge_pooled.json
    python benchmarks/merge_units.py --smoke --out /tmp/merge_smoke.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


@torch.no_grad()
def correct(model, batches) -> list[int]:
    """Per test row (in the batches' order): 1 if the model's prediction is right."""
    model.eval()
    out = []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out += (logits.argmax(-1) == b["labels"]).int().tolist()
    model.train()
    return out


def paired(a: list[int], b: list[int]) -> dict:
    """Accuracy difference b - a on the same rows and its standard error (paired: per-row differences)."""
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    n = len(d)
    return {"diff": round(float(d.mean()), 4), "se": round(float(d.std(unbiased=True) / math.sqrt(n)), 4)}


def _setup(args, smoke_blocks: int = 2):
    if args.smoke:
        model = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=smoke_blocks))
        data = {s: common.synthetic_encoded(64, seed=i) for i, s in enumerate(("train", "validation", "test"))}
        return model, data
    model, tok = common.load_minilm(seed=args.seed)
    return model, common.load_rt_encoded(tok, seed=0, max_train=None, max_eval=args.max_eval, max_len=64)


def dense_model(model, data, args):
    common.seed_everything(args.seed)
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=args.dense_steps, warmup=args.dense_steps // 10)
    batches = common.train_batches(data["train"], steps=args.dense_steps, batch_size=16, seed=args.seed)
    wall = common.train(model, batches, optimizer, scheduler)
    return wall


def dense_baseline(args, benchmark: str, smoke_blocks: int = 2, **fields):
    """What the one-shot merge benchmarks start from: the untouched model (``template``), the data, the test
    batches, the dense fine-tune's state, and the results header that records it (``fields`` after ``lr``)."""
    model, data = _setup(args, smoke_blocks=smoke_blocks)
    template = copy.deepcopy(model)
    dense_wall = dense_model(model, data, args)
    test = common.eval_batches(data["test"])
    dense_correct = correct(model, test)
    n = len(dense_correct)
    results = {"benchmark": benchmark, "hardware": common.hardware_info(), "threads": args.threads,
               "load_avg_start": list(os.getloadavg()), "model": "smoke" if args.smoke else "MiniLM",
               "seed": args.seed, "dense_steps": args.dense_steps, "lr": args.lr, **fields, "batch_size": 16,
               "max_len": 64, "test_rows": n, "dense_accuracy": sum(dense_correct) / n,
               "dense_train_wall_s": round(dense_wall, 1), "rows": [], "paired": []}
    return template, data, test, copy.deepcopy(model.state_dict()), results


def run_variant(dense_state, template, data, test, fraction: float, merge: bool, args) -> dict:
    from prune_callbacks import Pruner, PruningConfig
    from prune_callbacks.export import slim_pruned

    common.seed_everything(args.seed + 1)
    model = copy.deepcopy(template)
    model.load_state_dict(dense_state)
    calib, steps = args.calib, args.calib + args.finetune
    config = PruningConfig(granularity="ffn_neurons", final_sparsity=fraction, schedule="oneshot", start_step=calib,
                           **({"merge": {"calibration_steps": calib, "damping": args.damping}} if merge else {}))
    optimizer = common.make_optimizer(model, lr=args.lr)
    warmup = max(1, args.finetune // 10)

    def factor(step):  # 0 while calibrating, then warmup + linear decay over the fine-tune
        if step < calib:
            return 0.0
        s = step - calib
        return (s + 1) / warmup if s < warmup else max(0.0, (args.finetune - s) / max(1, args.finetune - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    pruner = Pruner(model, config, total_steps=steps).attach(optimizer)
    # one batch list (another seed than the dense fine-tune's): the calibration steps, then the fine-tune
    batches = common.train_batches(data["train"], steps=steps, batch_size=16, seed=args.seed + 1)
    rows: dict = {}

    def after(step):
        if step == calib:
            rows["oneshot"] = correct(model, test)
            rows["masks"] = [m.clone() for m in pruner.groups[0].masks]

    wall = common.train(model, batches, optimizer, scheduler, after_step=after)
    rows["finetuned"] = correct(model, test)
    report = pruner.report()["groups"][0]
    slim_pruned(model, pruner)
    slim_acc = sum(correct(model, test)) / len(rows["finetuned"])
    return {"ffn_fraction_removed": fraction, "merge": merge, "calib_steps": calib, "finetune_steps": args.finetune,
            "oneshot_accuracy": sum(rows["oneshot"]) / len(rows["oneshot"]),
            "finetuned_accuracy": sum(rows["finetuned"]) / len(rows["finetuned"]),
            "slim_accuracy": slim_acc, "merge_report": report.get("merge"), "wall_s": round(wall, 1),
            "_correct": rows, "params": sum(p.numel() for p in model.parameters())}


def table(results: dict) -> str:
    """The markdown table of a result file (accuracies in %, standard errors in points)."""
    n = results["test_rows"]
    dense = results["dense_accuracy"]

    def pct(acc):
        return f"{100 * acc:.2f} ± {100 * math.sqrt(acc * (1 - acc) / n):.1f}"

    lines = [f"MiniLM / Rotten Tomatoes (seed {results.get('seed', 0)}), {n} test rows, "
             f"dense fine-tuned {results['dense_steps']} steps: "
             f"{pct(dense)} %. One-shot FFN pruning after {results['rows'][0]['calib_steps']} lr-0 calibration "
             f"steps, then {results['rows'][0]['finetune_steps']} fine-tuning steps (batch 16, lr {results['lr']}). "
             "± = binomial standard error; paired = merge minus drop on the same rows, with its paired SE.", "",
             "| FFN removed | merge | one-shot acc % | after fine-tune % | slim % "
             "| removed output energy recovered (mean over blocks) |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        rec = r["merge_report"]["recovered"][0] if r.get("merge_report") and r["merge_report"]["recovered"] else None
        lines.append(f"| {r['ffn_fraction_removed']:.0%} | {'yes' if r['merge'] else 'no'} | "
                     f"{pct(r['oneshot_accuracy'])} | {pct(r['finetuned_accuracy'])} | "
                     f"{100 * r['slim_accuracy']:.2f} | "
                     f"{'' if rec is None else f'{rec:.3f}'} |")
    lines += ["", "| FFN removed | paired one-shot (points) | paired after fine-tune (points) |", "|---|---|---|"]
    for p in results["paired"]:
        a, b = p["oneshot_merge_minus_drop"], p["finetuned_merge_minus_drop"]
        lines.append(f"| {p['ffn_fraction_removed']:.0%} | {100 * a['diff']:+.2f} ± {100 * a['se']:.2f} | "
                     f"{100 * b['diff']:+.2f} ± {100 * b['se']:.2f} |")
    load = [[round(x, 1) for x in v] if v else v
            for v in (results.get("load_avg_start"), results.get("load_avg_end"))]
    lines += ["", f"Loaded shared machine (2 cores, ~8 agents): load average {load[0]} at the start, {load[1]} at the "
              f"end; {results['threads']} thread; total {results.get('total_wall_s')} s."]
    return "\n".join(lines) + "\n"


def pooled(files: list[Path]) -> str:
    """Markdown: per FFN fraction, accuracies per seed and the merge-minus-drop difference pooled over the seeds
    (mean of the per-seed paired differences; SE = sqrt(sum of per-seed SE^2) / seeds)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    lines = [f"Pooled over {len(parts)} seeds ({', '.join(str(p.get('seed', 0)) for p in parts)}); "
             f"{parts[0]['test_rows']} test rows each. Accuracies in %, dense / drop / merge per seed.", "",
             "| FFN removed | stage | per seed: dense, drop -> merge | merge - drop, pooled (points) |",
             "|---|---|---|---|"]
    for fraction in sorted({r["ffn_fraction_removed"] for r in parts[0]["rows"]}):
        for stage, key, pkey in (("one-shot", "oneshot_accuracy", "oneshot_merge_minus_drop"),
                                 ("fine-tuned", "finetuned_accuracy", "finetuned_merge_minus_drop")):
            cells, diffs, ses = [], [], []
            for part in parts:
                rows = {r["merge"]: r for r in part["rows"] if r["ffn_fraction_removed"] == fraction}
                pair = next(p for p in part["paired"] if p["ffn_fraction_removed"] == fraction)
                cells.append(f"{100 * part['dense_accuracy']:.1f}, {100 * rows[False][key]:.1f} -> "
                             f"{100 * rows[True][key]:.1f}")
                diffs.append(pair[pkey]["diff"])
                ses.append(pair[pkey]["se"])
            mean = sum(diffs) / len(diffs)
            se = math.sqrt(sum(x * x for x in ses)) / len(ses)
            lines.append(f"| {fraction:.0%} | {stage} | {'; '.join(cells)} | {100 * mean:+.2f} ± {100 * se:.2f} |")
    return "\n".join(lines) + "\n"


def add_one_shot_arguments(ap, *, calib_help: str, seed_help: str) -> None:
    """The setting shared by the one-shot merge benchmarks (this one and ``merge_blocks.py``): dense fine-tune,
    calibration, fold, fine-tune."""
    ap.add_argument("--dense-steps", type=int, default=150)
    ap.add_argument("--calib", type=int, default=16, help=calib_help)
    ap.add_argument("--finetune", type=int, default=100)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-eval", type=int, default=None, help="rows per eval split (None: the whole test split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--smoke", action="store_true")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.75])
    add_one_shot_arguments(ap, calib_help="lr-0 steps before the one-shot update (statistics)",
                           seed_help="head init + dense batches; the pruned runs use seed + 1")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "merge_units.json")
    ap.add_argument("--table", type=Path, default=None, help="only write the markdown table of this result file")
    ap.add_argument("--pool", nargs="+", type=Path, default=None, help="result files of several seeds: write the "
                    "pooled markdown to --out's .md")
    args = ap.parse_args(argv)
    if args.pool:
        args.out.with_suffix(".md").write_text(pooled(args.pool))
        return None
    if args.table:
        args.table.with_suffix(".md").write_text(table(json.loads(args.table.read_text())))
        return None
    if args.smoke:
        args.dense_steps, args.calib, args.finetune = 4, 2, 2
    common.set_threads(args.threads)
    start = time.perf_counter()
    template, data, test, dense_state, results = dense_baseline(args, "merge_units")
    for fraction in args.fractions:
        pair = {}
        for merge in (False, True):
            row = run_variant(dense_state, template, data, test, fraction, merge, args)
            pair[merge] = row.pop("_correct")
            results["rows"].append(row)
            print({k: v for k, v in row.items()}, flush=True)
            common.write_json(args.out, results)
        same = all(torch.equal(a, b) for a, b in zip(pair[False]["masks"], pair[True]["masks"]))
        if not same:
            raise SystemExit("merge on/off removed different neurons: the comparison would not be paired")
        results["paired"].append({"ffn_fraction_removed": fraction, "same_neurons_removed": same,
                                  "oneshot_merge_minus_drop": paired(pair[False]["oneshot"], pair[True]["oneshot"]),
                                  "finetuned_merge_minus_drop": paired(pair[False]["finetuned"],
                                                                       pair[True]["finetuned"])})
        common.write_json(args.out, results)
    results["load_avg_end"] = list(os.getloadavg())
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    common.write_json(args.out, results)
    args.out.with_suffix(".md").write_text(table(results))
    return results


if __name__ == "__main__":
    main()
