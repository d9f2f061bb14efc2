"""Accuracy-guarded sparsity (issue 15) on MiniLM / Rotten Tomatoes: how far does the guard prune for an
allowed drop, and how does that compare with a fixed cubic schedule to the sparsity it found?

Two phases, the reduced quality setting's data, optimizer and batches (``benchmarks/quality.py``):

1. ``--phase dense``: fine-tune MiniLM dense (the reduced setting: 256 steps x 16) and save it. This is
   the model both pruning runs start from, so the guard's baseline (measured before the first step)
   is a fine-tuned accuracy, not the chance level of a fresh classifier head.
2. ``--phase prune --max-drop D``: from that model, a guarded run (``AcceleratePruningHook`` with
   ``register(..., evaluate=fn)``, ``accuracy_guard={"metric": "eval_accuracy", "max_drop": D}``,
   ``final_sparsity`` 0.95 as the upper bound) and then a plain run with the same budget and a fixed
   cubic schedule to the sparsity the guard ended at (no evaluation during training).

Evaluation sets: the guard evaluates on the first ``--guard-rows`` validation rows (the *guard set*);
reported are the rest of the validation split (*held-out validation*, never seen by the guard) and the
whole test split. Evaluation cost = the guard's evaluate calls (count, seconds, share of the wall time).

    python benchmarks/guard.py --phase dense --threads 1
    python benchmarks/guard.py --phase prune --max-drop 0.01 --threads 1
    python benchmarks/guard.py --merge benchmarks/results/guard_rt_*.part.json --out benchmarks/results/guard_rt.json
    python benchmarks/guard.py --smoke --out /tmp/g.json          # tiny BERT, both phases, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, quality  # noqa: E402
from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.controllers.guard import AccuracyGuardConfig  # noqa: E402

PRUNE = dict(saliency="taylor", schedule="cubic", start_step=0, end_step=0.6, update_every=8)
GUARD = dict(metric="eval_accuracy", every=16, patience=2)
UPPER = 0.95


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def prune_run(model, data, setting, args, *, final_sparsity: float, guard: dict | None) -> dict:
    """One pruning run from the dense fine-tuned model through AcceleratePruningHook (guarded or not)."""
    from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

    steps = setting["prune_steps"]
    acc = _accelerator()
    opt = common.make_optimizer(model, lr=setting["prune_lr"])
    lrs = common.linear_warmup_decay(opt, steps=steps, warmup=int(round(setting["warmup"] * steps)))
    model, opt = acc.prepare(model, opt)
    cfg = PruningConfig(final_sparsity=final_sparsity, **PRUNE, **({"accuracy_guard": guard} if guard else {}))
    hook = AcceleratePruningHook(cfg, total_steps=steps, log_every=0)
    cost = {"evaluations": 0, "eval_s": 0.0}

    def evaluate():
        t0 = time.perf_counter()
        value = common.accuracy(model, data["guard"], args.device)
        cost["evaluations"] += 1
        cost["eval_s"] += time.perf_counter() - t0
        return {"eval_accuracy": value}

    hook.register(acc, model, opt, evaluate=evaluate if guard else None)
    t0 = time.perf_counter()
    common.train(model, data["prune_batches"], opt, lrs, device=args.device)
    report = hook.finalize()
    wall = time.perf_counter() - t0  # training + the guard's evaluations + its final check
    record = {"guarded": guard is not None, "final_sparsity_config": final_sparsity,
              "config": cfg.model_dump(mode="json"),
              "steps": steps, "mask_updates": report["mask_updates"], "wall_s": round(wall, 1),
              "test_accuracy": common.accuracy(model, data["test"], args.device),
              "heldout_validation_accuracy": common.accuracy(model, data["heldout"], args.device),
              "guard_set_accuracy": common.accuracy(model, data["guard"], args.device)}
    record.update({f"achieved_{k}" if k == "sparsity" else k: v for k, v in common.target_sparsity_stats(model).items()})
    if guard is not None:
        (g,) = report["accuracy_guard"]
        record.update(guard_final=g["final"], trajectory=g["trajectory"], evaluations=cost["evaluations"],
                      eval_s=round(cost["eval_s"], 1), eval_share=round(cost["eval_s"] / wall, 3),
                      snapshot_bytes=g["snapshot_bytes"])
    return record


def prepare(args, setting):
    template, data = quality.prepare(args, setting)  # train batches of the dense phase, full test
    if args.smoke:
        val = common.synthetic_encoded(2 * args.guard_rows, seed=args.seed + 2)
        tr = common.synthetic_encoded(setting["max_train"], seed=args.seed)
    else:
        from prune_callbacks.assets import load_minilm_for_classification

        _, tokenizer = load_minilm_for_classification(num_labels=2)
        splits = common.load_rt_encoded(tokenizer, seed=args.seed, max_train=setting["max_train"], max_eval=None,
                                        max_len=setting["max_len"])
        val, tr = splits["validation"], splits["train"]
    n = args.guard_rows
    data["guard"] = common.eval_batches(common.Encoded(val.ids[:n], val.labels[:n]))
    data["heldout"] = common.eval_batches(common.Encoded(val.ids[n:], val.labels[n:]))
    data["prune_batches"] = common.train_batches(tr, steps=setting["prune_steps"], batch_size=setting["batch_size"],
                                                 seed=args.seed + 1)
    data["sizes"].update(validation=len(val), guard=n, heldout=len(val) - n)
    return template, data


def dense_phase(template, data, setting, args) -> dict:
    model = common.fresh_copy(template).to(args.device)
    opt = common.make_optimizer(model, lr=setting["lr"])
    lrs = common.linear_warmup_decay(opt, steps=setting["steps"], warmup=int(round(setting["warmup"] * setting["steps"])))
    wall = common.train(model, data["batches"], opt, lrs, device=args.device)
    model.save_pretrained(str(args.dense_dir))
    return {"name": "dense", "steps": setting["steps"], "wall_s": round(wall, 1),
            "test_accuracy": common.accuracy(model, data["test"], args.device),
            "heldout_validation_accuracy": common.accuracy(model, data["heldout"], args.device),
            "guard_set_accuracy": common.accuracy(model, data["guard"], args.device)}


def load_dense(args):
    if args.smoke:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification.from_pretrained(str(args.dense_dir))
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(args.dense_dir), local_files_only=True)


def prune_phase(data, setting, args) -> list[dict]:
    guard = {**GUARD, "max_drop": args.max_drop}
    common.seed_everything(args.seed)
    guarded = prune_run(load_dense(args).to(args.device), data, setting, args, final_sparsity=UPPER, guard=guard)
    guarded["name"] = f"guard_{args.max_drop}"
    print(f"[guard] max_drop={args.max_drop}: sparsity {guarded['achieved_sparsity']:.4f} test "
          f"{guarded['test_accuracy']:.4f} held-out val {guarded['heldout_validation_accuracy']:.4f} "
          f"({guarded['evaluations']} evals, {guarded['eval_s']} s, {guarded['wall_s']} s)", flush=True)
    found = round(guarded["guard_final"]["sparsity"], 4)
    common.seed_everything(args.seed)
    fixed = prune_run(load_dense(args).to(args.device), data, setting, args, final_sparsity=found, guard=None)
    fixed["name"] = f"fixed_cubic_at_{found}"
    print(f"[guard] fixed cubic to {found}: test {fixed['test_accuracy']:.4f} held-out val "
          f"{fixed['heldout_validation_accuracy']:.4f} ({fixed['wall_s']} s)", flush=True)
    return [guarded, fixed]


def plot(results: dict, png: Path) -> None:
    """Per allowed drop: the guard's sparsity over steps with its decisions, and the metric it saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("guarded")]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4), squeeze=False)
    from prune_callbacks.recipe.guard_artifacts import plot_trajectory

    for ax, r in zip(axes[0], runs):
        traj = r["trajectory"]
        ax.step([t["step"] for t in traj], [t["sparsity"] for t in traj], where="post", color="tab:gray", lw=1)
        plot_trajectory(ax, traj)
        ax.set_ylim(0, 1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sparsity evaluated at")
        right = ax.twinx()
        gcfg = AccuracyGuardConfig(**r["config"]["accuracy_guard"])
        right.plot([t["step"] for t in traj], [t["metric"] for t in traj], ":", color="tab:orange", lw=1)
        right.axhline(gcfg.allowed(traj[0]["metric"]), color="tab:red", ls="--", lw=0.8)
        right.set_ylabel(f"{gcfg.metric} on the guard set (dotted); allowed bound (dashed)", fontsize=8)
        ax.set_title(f"max_drop {gcfg.max_drop}{' (relative)' if gcfg.relative else ''}: ends at "
                     f"{r['guard_final']['sparsity']:.1%}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def merge(files: list[Path], out: Path) -> dict:
    merged = common.merge_parts(files, out, rows="runs")
    plot(merged, out.with_suffix(".png"))
    return merged


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["dense", "prune", "both"], default="both")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--prune-steps", type=int, default=192)
    p.add_argument("--prune-lr", type=float, default=5e-5)
    p.add_argument("--guard-rows", type=int, default=400)
    p.add_argument("--dense-dir", type=Path, default=Path("outputs/guard_dense_minilm"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", nargs="+", type=Path, default=None)
    args = p.parse_args(argv)
    args.minilm_dir = args.rt_csv = None  # what quality.prepare reads (assets from prune_callbacks.assets)
    if args.merge:
        return merge(args.merge, args.out)
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    setting = dict(quality.SETTINGS["smoke" if args.smoke else "reduced"], prune_steps=args.prune_steps,
                   prune_lr=args.prune_lr)
    if args.smoke:
        setting.update(prune_steps=min(args.prune_steps, 40), prune_lr=1e-3)
        args.guard_rows = min(args.guard_rows, 16)
        if args.out is not None:
            args.dense_dir = args.out.parent / "guard_dense_smoke"
    template, data = prepare(args, setting)
    results = {"benchmark": "guard", "setting": "smoke" if args.smoke else "reduced", "training": setting,
               "pruning": PRUNE, "guard": GUARD, "upper_bound": UPPER, "sizes": data["sizes"],
               "hardware": common.hardware_info(args.device), "runs": []}
    if args.phase in ("dense", "both"):
        results["runs"].append(dense_phase(template, data, setting, args))
        print(f"[guard] dense: test {results['runs'][-1]['test_accuracy']:.4f}", flush=True)
    if args.phase in ("prune", "both"):
        results["runs"].extend(prune_phase(data, setting, args))
    try:
        import os

        results["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    out = args.out or common.RESULTS / f"guard_rt_{args.phase}{'' if args.phase == 'dense' else f'_{args.max_drop}'}.part.json"
    common.write_json(out, results)
    plot(results, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
