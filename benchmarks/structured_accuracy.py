"""MiniLM on Rotten Tomatoes: accuracy after a short fine-tune with structured pruning, with and without distillation.

Pruning rides the fine-tune (taylor saliency, cubic from 10% to 60% of the run, uniform per block), then
`prune_callbacks.export.slim_pruned` cuts the units out; the slimmed model's test accuracy is compared
with the masked model's (they must agree). ``+kd`` variants attach a
`prune_callbacks.controllers.distillation.Distiller` whose teacher is the fine-tuned ``dense`` model of the same setting
(the oBERT / SparseML arrangement; ``hardness`` 1.0, temperature 2.0). ``+self`` variants need no earlier run: the
teacher is a copy of the model taken after the last dense step of this same run (``teacher="self"``,
``snapshot="before_pruning"``; ``--hardness`` and ``--hidden-weight`` set its loss), which knows the task when the
pruning window opens late (``--window 0.4 0.8``). Same batches, optimizer, schedule and seed for every variant; rows
are appended to ``--out`` as they finish (``--resume`` skips finished ones).

    python benchmarks/structured_accuracy.py --threads 1 --variants dense --save-dense outputs/dense150
    python benchmarks/structured_accuracy.py --threads 1 --variants ffn50+kd ffn75 --dense-from outputs/dense150
    python benchmarks/structured_accuracy.py --merge A.json B.json --out benchmarks/results/structured_accuracy.json
    python benchmarks/structured_accuracy.py --smoke --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

from benchmarks.structured_latency import VARIANTS as SHAPES  # noqa: E402 - one table of the MiniLM variants

MINILM_BLOCKS = 6
# name -> [(granularity, final_sparsity)], from the latency benchmark's (FFN fraction, blocks removed) so that
# the plot's speed-ups and these accuracies describe the same variants; a "+kd" suffix adds distillation
VARIANTS = {name: ([("ffn_neurons", ffn)] if ffn else []) + ([("blocks", blocks / MINILM_BLOCKS)] if blocks else [])
            for name, (ffn, blocks) in SHAPES.items()}
KD = {"hardness": 1.0, "temperature": 2.0}
DEFAULT_WINDOW = common.DEFAULT_WINDOW
DEFAULT_LR = 5e-5  # the reduced and full settings' learning rate; rows trained with another are named /lrX
MASK_ID = 103  # BERT's [MASK]: --augment replaces tokens with it (MiniLM's vocabulary)
TEACHERS = ("+kd", "+self")  # variant suffixes: the fine-tuned dense model of --dense-from, or an in-run copy


def _kinds(name: str):
    """``(units, teacher suffix or None)`` of a variant name such as ``ffn75+self``."""
    suffix = next((t for t in TEACHERS if name.endswith(t)), None)
    base = name[: -len(suffix)] if suffix else name
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)} (each also with {' or '.join(TEACHERS)})")
    return VARIANTS[base], suffix


def _distillation(suffix, args) -> dict:
    if suffix == "+kd":  # --hidden-weight adds the per-block hidden-state term (a cut is matched once, at its end)
        return dict(KD, teacher=_teacher(args), hidden_weight=getattr(args, "hidden_weight", 0.0))
    return {"teacher": "self", "snapshot": "before_pruning", "temperature": 2.0,
            "hardness": getattr(args, "hardness", 0.5), "hidden_weight": getattr(args, "hidden_weight", 0.0)}


def _setup(args, seed: int):
    if args.smoke:
        model = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=6))
        data = {s: common.synthetic_encoded(64, seed=i) for i, s in enumerate(("train", "validation", "test"))}
        return model, data
    model, tok = common.load_minilm(seed=seed)  # the seed draws the classifier head; the data split stays seed 0's
    return model, common.load_rt_encoded(tok, seed=0, max_train=None, max_eval=args.max_eval, max_len=64)


def _teacher(args):
    from transformers import AutoModelForSequenceClassification

    if args.dense_from is None:
        raise SystemExit("+kd variants need --dense-from DIR (a dense model saved by --save-dense)")
    # a parallel job may still be writing it (saved via a .tmp folder, then renamed)
    if not common.saved_model_ready(args.dense_from, wait_s=1800):
        raise SystemExit(f"--dense-from {args.dense_from}: no saved model there after 30 minutes")
    return AutoModelForSequenceClassification.from_pretrained(args.dense_from).eval()


def label(name: str, args) -> str:
    """The row's name: the variant, its pruning window when that is not the default (``ffn75@0.4-0.8+self``) and its
    training seed when that is not 0 (``x2/s1``); a teacher's hidden-state weight when it is not 0 (``x3+kd/h1``); the
    granularities whose removed units are merged (``x3/fold=blocks``); ``/NAME`` for ``--saliency NAME`` other than
    the library's default, then ``/bX`` for ``--beta X`` other than the library's."""
    window = tuple(getattr(args, "window", None) or DEFAULT_WINDOW)
    seed = getattr(args, "seed", 0)
    hidden = getattr(args, "hidden_weight", 0.0)
    units, suffix = _kinds(name)
    out = name
    if window != DEFAULT_WINDOW and units:
        base = name.removesuffix(suffix) if suffix else name
        out = f"{base}@{window[0]:g}-{window[1]:g}{suffix or ''}"
    if suffix and hidden:
        out += f"/h{hidden:g}"
    oneshot = getattr(args, "blocks_oneshot", None)
    if oneshot is not None and any(k == "blocks" for k, _ in units):
        out += f"/blocks@{oneshot:g}"
    fold = [k for k, _ in units if k in (getattr(args, "fold", None) or ())]
    if fold:
        out += f"/fold={','.join(fold)}"
        if getattr(args, "fold_steps", None):
            out += f"/c{args.fold_steps}"
        if getattr(args, "fold_select", "saliency") != "saliency":
            out += f"/{args.fold_select}"
    if restarts(units, args):
        at = getattr(args, "slim_lr_at", None)
        out += f"/slr{args.slim_lr:g}" + (f"@{at:g}" if at is not None else "")
    if getattr(args, "recovery_lr_scale", None) is not None and units:
        out += f"/rlr{args.recovery_lr_scale:g}"
    if getattr(args, "augment", None):
        out += f"/aug{args.augment:g}"
    if units:
        out += common.saliency_suffix(args)
    return common.with_seed(out + lr_suffix(getattr(args, "lr", DEFAULT_LR)), seed)


def lr_suffix(lr: float) -> str:
    """``/lrX`` for a learning rate other than `DEFAULT_LR` (a row's name, before its seed), else ''."""
    return "" if lr == DEFAULT_LR else f"/lr{lr:g}"


def _merge(args, granularity: str) -> dict:
    """The ``merge`` setting of a ``--fold`` granularity."""
    steps, select = getattr(args, "fold_steps", None), getattr(args, "fold_select", "saliency")
    return {**({"calibration_steps": steps} if steps else {}), **({"select": select} if select != "saliency" else {})}


def restarts(units, args) -> bool:
    """Whether ``--slim-lr`` restarts the rate of a row pruning ``units`` (``(granularity, share)`` pairs): at
    ``--slim-lr-at``, or at the step ``--blocks-oneshot`` cuts its blocks. Decides the row's name and its schedule."""
    if getattr(args, "slim_lr", None) is None or not units:
        return False
    return getattr(args, "slim_lr_at", None) is not None or (
        getattr(args, "blocks_oneshot", None) is not None and any(k == "blocks" for k, _ in units))


def _scheduler(optimizer, pruner, args):
    """The benchmark's warm-up/decay schedule; with ``--slim-lr`` (`restarts`) it restarts at ``--slim-lr-at`` or,
    without it, when the blocks are cut."""
    from prune_callbacks.core.resolution import absolute_step

    steps, at = args.steps, getattr(args, "slim_lr_at", None)
    groups = pruner.groups if pruner else ()
    if not restarts([(g.config.granularity, g.config.final_sparsity) for g in groups], args):
        return common.linear_warmup_decay(optimizer, steps=steps, warmup=steps // 10)
    cut = (absolute_step(at, steps) if at is not None else
           next(g.schedule.first_update_step() for g in groups if g.config.granularity == "blocks"))
    return common.warm_restart(optimizer, steps=steps, warmup=steps // 10, at=cut, peak=args.slim_lr / args.lr)


def run_variant(name: str, args) -> dict:
    from prune_callbacks import Pruner, PruningConfig
    from prune_callbacks.controllers.distillation import DistillationConfig, Distiller
    from prune_callbacks.controllers.distillation.teacher import snapshot_step
    from prune_callbacks.export import slim_pruned

    kinds, suffix = _kinds(name)
    start, end = getattr(args, "window", None) or DEFAULT_WINDOW
    seed = getattr(args, "seed", 0)  # head init, batch order and dropout; the data split and test rows stay fixed
    common.seed_everything(seed)
    model, data = _setup(args, seed)
    steps = args.steps
    optimizer = common.make_optimizer(model, lr=args.lr)
    pruner = distiller = None
    if kinds:
        fold = getattr(args, "fold", None) or ()
        oneshot = getattr(args, "blocks_oneshot", None)
        configs = [PruningConfig(granularity=k, final_sparsity=s, merge=_merge(args, k) if k in fold else None,
                                 **common.saliency_settings(args),
                                 **(dict(schedule="oneshot", start_step=oneshot) if k == "blocks" and oneshot is not None
                                    else dict(start_step=start, end_step=end))) for k, s in kinds]
        recovery = getattr(args, "recovery_lr_scale", None)
        if recovery is not None:  # the library's warm restart after the blocks' cut (else after the last config's)
            i = next((i for i, (k, _) in enumerate(kinds) if k == "blocks"), len(configs) - 1)
            configs[i] = configs[i].model_copy(update={"recovery_lr_scale": recovery})
        pruner = Pruner(model, configs, total_steps=steps).attach(optimizer)
    scheduler = _scheduler(optimizer, pruner, args)
    distillation = _distillation(suffix, args) if suffix else None
    if distillation:
        distiller = Distiller(DistillationConfig(**distillation)).attach(model)
    snapshot_after = snapshot_step(pruner) if suffix == "+self" else None
    if snapshot_after == 0:
        distiller.take_snapshot(0)

    def after_step(st):
        if st == snapshot_after:  # the plain loop's part of snapshot="before_pruning" (the adapters do it themselves)
            distiller.take_snapshot(st)
        if st % 25 == 0:
            print(f"{name}: step {st}/{steps}", flush=True)

    batches = common.train_batches(data["train"], steps=steps, batch_size=16, seed=seed)
    if getattr(args, "augment", None):
        batches = common.masked_copies(batches, args.augment, mask_id=1 if args.smoke else MASK_ID, seed=seed)
    wall = common.train(model, batches, optimizer, scheduler, after_step=after_step)
    if distiller is not None:
        distiller.detach()
    test = common.eval_batches(data["test"])
    masked_acc = common.accuracy(model, test)
    summary = slim_pruned(model, pruner) if pruner is not None else None
    if name == "dense" and args.save_dense:
        model.save_pretrained(str(args.save_dense) + ".tmp")
        Path(str(args.save_dense) + ".tmp").rename(args.save_dense)
    if distillation:
        distillation["teacher"] = "dense fine-tune" if suffix == "+kd" else f"self, copied after step {distiller.teacher_step}"
    return {"variant": label(name, args), "seed": seed, "lr": args.lr, "slim_lr": getattr(args, "slim_lr", None),
            "slim_lr_at": getattr(args, "slim_lr_at", None), "recovery_lr_scale": getattr(args, "recovery_lr_scale", None),
            "units": [list(k) for k in kinds], "saliency": pruner.groups[0].config.saliency if pruner else None,
            "beta": pruner.groups[0].config.beta if pruner else None,
            "distillation": distillation,
            "window": [start, end], "steps": steps, "augment": getattr(args, "augment", None),
            "train_wall_s": round(wall, 1), "test_accuracy": common.accuracy(model, test),
            "masked_test_accuracy": masked_acc, "params": sum(p.numel() for p in model.parameters()),
            "config_changes": summary["config"] if summary else {}, "test_examples": len(data["test"]),
            "merge": [g.get("merge") for g in pruner.report()["groups"]] if pruner is not None and getattr(args, "fold", None)
            else None}


def rows_of(part: dict) -> list[dict]:
    """A results file's rows with their seed and learning rate filled in where they were written before those were
    recorded per row (seed 0; the file's ``lr``), the rate named in the row (`lr_suffix`) when not the default."""
    rows = []
    for row in part["rows"]:
        row = dict(row)
        seed = row.setdefault("seed", 0)
        if "lr" not in row:
            row["lr"] = part.get("lr", DEFAULT_LR)
            row["variant"] = common.with_seed(common.without_seed(row["variant"], seed) + lr_suffix(row["lr"]), seed)
        rows.append(row)
    return rows


def merge(files: list[Path], out: Path) -> dict:
    """One result file from several jobs' files (the first row of each variant wins)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    rows: dict = {}
    for part in parts:
        for row in rows_of(part):
            rows.setdefault(row["variant"], row)
    merged = dict(parts[0], rows=list(rows.values()), merged_from=[str(f) for f in files])
    common.write_json(out, merged)
    return merged


def plot(results: dict, latency: dict, png: Path, latency_name: str) -> None:
    """Accuracy retention vs batch-32 speedup (from the latency results), with / without distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {r["variant"]: r["b32_speedup"] for r in latency["rows"]}
    dense = next(r["test_accuracy"] for r in results["rows"] if r["variant"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.axvline(1.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0.97, color="grey", ls="--", lw=0.8, label="target: >= 1.5x at >= 97% of dense")
    for r in results["rows"]:
        suffix = next((t for t in TEACHERS if r["variant"].endswith(t)), "")
        base = r["variant"].removesuffix(suffix) if suffix else r["variant"]
        if base not in speed:
            continue
        kd = bool(suffix)
        x, y = speed[base], r["test_accuracy"] / dense
        ax.scatter(x, y, color="#3b7dd8" if kd else "k", marker="o" if kd else "s", zorder=3)
        ax.annotate(r["variant"], (x, y), fontsize=8, xytext=(4, -10 if kd else 4), textcoords="offset points")
    ax.set_xlabel(f"CPU inference speedup, batch 32 x 128 tokens, 1 thread ({latency_name})")
    ax.set_ylabel("test accuracy / dense")
    ax.set_title(f"MiniLM / Rotten Tomatoes, {results['rows'][0]['steps']} steps: black no distillation, "
                 "blue distilled from the dense model", fontsize=8)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    ax.fill_between([1.5, x1], 0.97, max(y1, 1.01), color="#dff0d8", zorder=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, max(y1, 1.01))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["dense", "ffn50", "ffn50+kd"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--max-eval", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    common.add_seed_argument(ap)
    ap.add_argument("--save-dense", type=Path, default=None, help="save the dense variant's model here")
    ap.add_argument("--dense-from", type=Path, default=None, help="teacher of the +kd variants")
    common.add_lever_arguments(ap)
    common.add_cut_arguments(ap)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, skip their variants")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "structured_accuracy.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="merge these result files into --out, plot")
    ap.add_argument("--latency", type=Path, default=common.RESULTS / "structured_latency.json")
    args = ap.parse_args(argv)
    common.check_cut_arguments(ap, args)
    if args.merge:
        merged = merge(args.merge, args.out)
        plot(merged, json.loads(args.latency.read_text()), args.out.with_suffix(".png"), args.latency.name)
        return merged
    common.set_threads(args.threads)
    results = {"benchmark": "structured_accuracy", "hardware": common.hardware_info(), "threads": args.threads,
               "lr": args.lr, "batch_size": 16, "max_len": 64, "rows": []}
    if args.resume and args.out.exists():
        results["rows"] = json.loads(args.out.read_text())["rows"]
    done = {r["variant"] for r in results["rows"]}
    for name in args.variants:
        _kinds(name)  # fail before any training on a typo
    for name in args.variants:
        if label(name, args) in done:
            continue
        results["rows"].append(run_variant(name, args))
        print(results["rows"][-1], flush=True)
        common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
