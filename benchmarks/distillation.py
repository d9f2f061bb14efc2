"""Pruning with and without knowledge distillation from the dense teacher (same budget).

The loop, data, optimizer and pruning config are those of ``benchmarks/quality.py``
(taylor, global, the grid's pinned ``update_every=10``); a run only adds a
`prune_callbacks.controllers.distillation.Distiller` attached to the model: the loop still calls
``model(**batch).loss``. A ``"self"`` teacher snapshotted ``before_pruning`` is copied in
the step hook after the last optimizer step before the first mask update.
``dense_teacher`` uses the fully fine-tuned dense model of the same run as teacher
(the published oBERT / SparseML setting), which needs the dense run first.

    python benchmarks/distillation.py --setting reduced --runs taylor kd_before kd_before_h0.5 --sparsities 0.9
    python benchmarks/distillation.py --cost          # step-time ratio and teacher memory, interleaved
    python benchmarks/distillation.py --smoke --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, quality  # noqa: E402
from prune_callbacks import Pruner  # noqa: E402
from prune_callbacks.controllers.distillation import DistillationConfig, Distiller, module_bytes  # noqa: E402

# name -> DistillationConfig fields (None: no distillation). teacher "dense" = the dense run's model.
RUNS = {
    "dense": None,
    "taylor": None,
    "kd_before": {"snapshot": "before_pruning", "hardness": 1.0},
    "kd_before_h0.5": {"snapshot": "before_pruning", "hardness": 0.5},
    "kd_begin_h0.5": {"snapshot": "train_begin", "hardness": 0.5},
    "kd_dense_teacher": {"teacher": "dense", "hardness": 1.0},
    "kd_dense_teacher_h0.5": {"teacher": "dense", "hardness": 0.5},
    "kd_before_T4": {"snapshot": "before_pruning", "hardness": 1.0, "temperature": 4.0},
}


def first_update_step(pruner: Pruner) -> int:
    """`Pruner.first_update_step` (one source): first optimizer step whose hook computes masks."""
    return pruner.first_update_step()


def run_one(template, name, sparsity, data, args, setting, dense_model=None) -> dict:
    model = common.fresh_copy(template).to(args.device)
    steps = setting["steps"]
    opt = common.make_optimizer(model, lr=setting["lr"])
    lrs = common.linear_warmup_decay(opt, steps=steps, warmup=int(round(setting["warmup"] * steps)))
    spec = RUNS[name]
    record = {"name": name, "method": "dense" if name == "dense" else "taylor",
              "final_sparsity": 0.0 if name == "dense" else sparsity, "distillation": spec}
    pruner = None
    if name != "dense":
        cfg = quality.pruning_config("taylor", sparsity)
        pruner = Pruner(model, cfg, total_steps=steps).attach(opt)
        record["config"] = cfg.model_dump(mode="json")
    distiller, after_step = None, None
    if spec is not None:
        spec = dict(spec)
        if spec.get("teacher") == "dense":
            if dense_model is None:
                raise RuntimeError(f"{name} needs the dense run first (put 'dense' before it in --runs)")
            spec["teacher"] = dense_model
        distiller = Distiller(DistillationConfig(**spec)).attach(model)
        at = first_update_step(pruner) - 1
        if distiller.teacher is None and at == 0:
            distiller.take_snapshot(0)

        def after_step(step):
            if distiller.teacher is None and step == at:
                distiller.take_snapshot(step)
    kd_trace = []
    if distiller is not None:
        inner = after_step

        def after_step(step):  # noqa: F811 - also sample the KD figures every 16 steps
            inner(step)
            if step % 16 == 0:
                kd_trace.append({"step": step, **distiller.figures()})
    wall = common.train(model, data["batches"], opt, lrs, device=args.device, after_step=after_step)
    if pruner is not None:
        pruner.finalize()
        record["mask_updates"] = pruner.mask_updates
    if distiller is not None:
        record["teacher_step"] = distiller.teacher_step
        record["teacher_bytes"] = distiller.teacher_bytes()
        record["teacher_test_accuracy"] = common.accuracy(distiller.teacher, data["test"], args.device)
        record["kd_trace"] = kd_trace
        distiller.detach()
    record["test_accuracy"] = common.accuracy(model, data["test"], args.device)
    record["validation_accuracy"] = common.accuracy(model, data["validation"], args.device)
    record["train_wall_s"] = round(wall, 2)
    record["step_s"] = round(wall / steps, 4)
    record.update({f"achieved_{k}" if k == "sparsity" else k: v for k, v in common.target_sparsity_stats(model).items()})
    return record, model


def cost(args) -> dict:
    """Step time with / without the distillation term, alternating blocks on one model; teacher bytes."""
    cfg = common.tiny_bert_config() if args.smoke else common.minilm_config()
    model = common.classifier_from_config(cfg, seed=args.seed)
    opt = common.make_optimizer(model, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, cfg.vocab_size, (16, 64), generator=g),
             "attention_mask": torch.ones(16, 64, dtype=torch.long), "labels": torch.randint(0, 2, (16,), generator=g)}
    out = {"batch": [16, 64], "model": "tiny" if args.smoke else "minilm-shape (random init)"}
    rows = {}
    for dtype in (None, "bf16"):
        distiller = Distiller(DistillationConfig(teacher=copy.deepcopy(model), teacher_dtype=dtype))
        distiller.attach(model)  # resolves (and casts) the teacher
        distiller.detach()
        out[f"teacher_bytes_{dtype or 'fp32'}"] = module_bytes(distiller.teacher)
        ratios = []
        for _ in range(args.rounds):
            times = {}
            for variant in ("plain", "kd"):
                if variant == "kd":
                    distiller.attach(model)
                per = []
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    model(**batch).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    per.append(time.perf_counter() - t0)
                distiller.detach()
                times[variant] = statistics.median(per)
            ratios.append(times["kd"] / times["plain"])
        rows[dtype or "fp32"] = {"median_ratio": round(statistics.median(ratios), 3),
                                 "ratios": [round(r, 3) for r in ratios]}
        print(f"[distill cost] teacher {dtype or 'fp32'}: step-time ratio {rows[dtype or 'fp32']['median_ratio']}", flush=True)
    out["step_time_ratio"] = rows
    out["student_bytes"] = module_bytes(model)
    return out


def merge(files: list[Path], out: Path) -> dict:
    """One result file from parallel processes' files (first occurrence of a (name, sparsity) wins)."""
    merged = common.merge_parts(files, out, rows="runs", key=lambda r: (r["name"], r["final_sparsity"]))
    quality._add_retention(merged["runs"])
    common.write_json(out, merged)
    return merged


def plot(results: dict, png: Path) -> None:
    """Test accuracy per run, grouped by sparsity; dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["name"] != "dense"]
    dense = next((r for r in results["runs"] if r["name"] == "dense"), None)
    labels = [f"{r['name']}\n{r['final_sparsity']:.0%}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 4))
    colors = ["#888888" if r["distillation"] is None else "#3b7dd8" for r in runs]
    ax.bar(range(len(runs)), [100 * r["test_accuracy"] for r in runs], color=colors)
    for i, r in enumerate(runs):
        ax.text(i, 100 * r["test_accuracy"] + 0.5, f"{100 * r['test_accuracy']:.1f}", ha="center", fontsize=8)
    if dense:
        ax.axhline(100 * dense["test_accuracy"], color="k", ls="--", lw=1, label=f"dense {100 * dense['test_accuracy']:.1f}")
    ax.axhline(100 * 0.578, color="r", ls=":", lw=1, label="majority class 57.8")
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    ax.set_ylim(50, 85)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM / RT reduced: pruning with (blue) / without (grey) distillation")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["reduced", "full"], default="reduced")
    p.add_argument("--runs", nargs="+", default=["taylor", "kd_before"], help=f"subset of {list(RUNS)}, in order")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cost", action="store_true", help="step-time ratio and teacher memory only")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument("--save-dense", type=Path, default=None, help="save the dense run's model here (save_pretrained)")
    p.add_argument("--dense-from", type=Path, default=None,
                   help="teacher of kd_dense_* runs: a dense model saved by --save-dense (instead of running 'dense')")
    p.add_argument("--minilm-dir", default=None)
    p.add_argument("--rt-csv", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", nargs="+", type=Path, default=None, help="merge these result files into --out (+ PNG)")
    args = p.parse_args(argv)
    if args.merge:
        merged = merge(args.merge, args.out)
        plot(merged, args.out.with_suffix(".png"))
        return merged
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    if args.cost:
        out = args.out or common.RESULTS / "distillation_cost.json"
        results = {"benchmark": "distillation_cost", "hardware": common.hardware_info(args.device), **cost(args)}
        common.write_json(out, results)
        return results
    setting_name = "smoke" if args.smoke else args.setting
    setting = dict(quality.SETTINGS[setting_name])
    if args.steps:
        setting["steps"] = args.steps
    out = args.out or common.RESULTS / f"distillation_{setting_name}.json"
    results = {"benchmark": "distillation", "setting": setting_name, "training": setting,
               "hardware": common.hardware_info(args.device), "runs": []}
    if args.resume and out.exists():
        import json

        results["runs"] = json.loads(out.read_text())["runs"]
    done = {(r["name"], r["final_sparsity"]) for r in results["runs"]}
    template, data = quality.prepare(args, setting)
    print(f"[distill] {setting_name}: runs {args.runs} at {args.sparsities}, data {data['sizes']}", flush=True)
    dense_model = None
    if args.dense_from:
        from transformers import AutoModelForSequenceClassification

        if not common.saved_model_ready(args.dense_from, wait_s=3600):  # a parallel --save-dense process writes it
            raise SystemExit(f"--dense-from {args.dense_from}: no saved model there after an hour")
        time.sleep(5)
        dense_model = AutoModelForSequenceClassification.from_pretrained(args.dense_from).to(args.device)
    for name in args.runs:
        for sparsity in ([0.0] if name == "dense" else args.sparsities):
            if (name, sparsity) in done and name != "dense":
                continue
            common.seed_everything(args.seed)
            record, model = run_one(template, name, sparsity, data, args, setting, dense_model)
            if name == "dense":
                dense_model = model
                if args.save_dense:
                    model.save_pretrained(str(args.save_dense) + ".tmp")
                    Path(str(args.save_dense) + ".tmp").rename(args.save_dense)
                if (name, sparsity) in done:
                    continue
            else:
                del model
            results["runs"].append(record)
            quality._add_retention(results["runs"])
            common.write_json(out, results)
            print(f"[distill] {name:18s} s={sparsity:.2f} test={record['test_accuracy']:.4f} "
                  f"val={record['validation_accuracy']:.4f} teacher={record.get('teacher_test_accuracy')} "
                  f"step={record['step_s']}s train={record['train_wall_s']}s", flush=True)
    return results


if __name__ == "__main__":
    main()
