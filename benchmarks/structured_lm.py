"""SmolLM2-135M on KJV: held-out perplexity vs CPU latency after structured pruning while fine-tuning, then slim.

Two steps (separate processes, so each bench job stays short):

* ``--train VARIANT...``: the shared budget of ``benchmarks/causal_lm_peers.py`` (``--steps`` AdamW steps of
  ``--batch-size`` blocks of ``--seq-len`` tokens, warm-up then cosine, the same batches for every variant;
  whole KJV books held out), pruning riding it (taylor saliency, cubic from 10% to 60% of the run,
  ``update_every`` 2, uniform per block), then `slim_pruned`. The slim model is saved with ``save_pretrained``
  to ``--models-dir/<row name>`` (the variant; ``/sN`` for ``--seed N``), reloaded with plain
  ``AutoModelForCausalLM.from_pretrained`` and compared with the in-memory model (max |logit diff| stored);
  held-out perplexity of the reloaded model.
  ``+kd``: distillation (`prune_callbacks.controllers.distillation`, default hardness 0.5, temperature 2.0) from the
  pretrained model (a ``train_begin`` teacher), or with ``--dense-from DIR`` from the dense model fine-tuned in the
  same setting (``--train dense`` saves it to ``--models-dir/dense``, ``dense/sN`` for seed N) at ``--hardness`` /
  ``--hidden-weight``; such rows are named ``.../ft-teacher``. One ``--out`` holds one budget and seed (the seed
  also draws the held-out blocks): a run with another is refused before any compute.
* ``--latency``: every saved variant loaded in one process; one forward per variant per round, variants
  interleaved (rotated order), median over rounds at batch 1 and batch 8, seq ``--seq-len``,
  ``torch.inference_mode``, ``use_cache=False``. Rows of ``--out`` get the timings; a plot is written.

    python benchmarks/structured_lm.py --threads 1 --train dense ffn25 ffn50
    python benchmarks/structured_lm.py --threads 1 --latency
    python benchmarks/structured_lm.py --smoke --train dense ffn50 kv1 --out /tmp/lm.json && \\
        python benchmarks/structured_lm.py --smoke --latency --out /tmp/lm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import causal_lm_peers as peers  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.structured_latency import interleaved_medians  # noqa: E402
from prune_callbacks.core.config import PruningConfig  # noqa: E402

# name -> [(granularity, final_sparsity)]; SmolLM2 has 30 blocks and 3 KV groups (of 3 query heads) per block
VARIANTS = {"dense": [], "ffn25": [("ffn_neurons", 0.25)], "ffn50": [("ffn_neurons", 0.5)],
            "kv1": [("attention_heads", 1 / 3)], "blocks6": [("blocks", 0.2)],
            "ffn50+kv1": [("ffn_neurons", 0.5), ("attention_heads", 1 / 3)]}
SMOKE_VARIANTS = {**VARIANTS, "kv1": [("attention_heads", 0.5)], "blocks6": [("blocks", 0.5)]}  # 2 blocks, 2 KV groups


# levers a variant name may end with (any order, each at most once); +merge folds removed FFN neurons / blocks,
# +select lets the fold choose the units it removes (merge.select='fold')
SUFFIXES = ("+kd", "+self", "+merge", "+select")
DEFAULT_WINDOW = common.DEFAULT_WINDOW


def _kinds(name: str, smoke: bool = False):
    """``(units, set of lever suffixes)`` of a variant name such as ``ffn25+merge+self``."""
    variants = SMOKE_VARIANTS if smoke else VARIANTS
    base, levers = name, set()
    while (suffix := next((x for x in SUFFIXES if base.endswith(x) and x not in levers), None)) is not None:
        levers.add(suffix)
        base = base[: -len(suffix)]
    if base not in variants or {"+kd", "+self"} <= levers:
        raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(variants)}, each also with "
                         f"{', '.join(SUFFIXES)} (+kd and +self exclude each other)")
    if levers and not variants[base]:
        raise SystemExit(f"variant {name!r}: the levers {', '.join(SUFFIXES)} need a pruned variant")
    if "+select" in levers and "+merge" not in levers:
        raise SystemExit(f"variant {name!r}: +select is the fold's choice; it needs +merge")
    return variants[base], levers


def _merge(granularity: str, levers: set):
    """The ``merge`` setting of one granularity of a variant (None: drop)."""
    if "+merge" not in levers or granularity not in ("ffn_neurons", "blocks"):
        return None
    return {"select": "fold"} if "+select" in levers else {}


def label(name: str, args) -> str:
    """The row's name, which is also its saved folder's: the variant, its teacher where ``--dense-from`` gives one,
    its pruning window when that is not the default, ``/rlrX`` with ``--recovery-lr-scale X``, ``/NAME`` with
    ``--saliency NAME`` other than the library's default, and its seed when that is not 0 (``ffn25/s1``, as in
    ``speed_plan_accuracy``), so that seeds sharing a ``--models-dir`` do not overwrite each other's models."""
    window = tuple(args.window)
    kinds, levers = _kinds(name, args.smoke)
    if "+kd" in levers and args.dense_from is not None:
        name = f"{name}/ft-teacher-h{args.hardness:g}" + (f"-hw{args.hidden_weight:g}" if args.hidden_weight else "")
    if window != DEFAULT_WINDOW and kinds:
        name = f"{name}@{window[0]:g}-{window[1]:g}"
    if args.recovery_lr_scale is not None and kinds:
        name = f"{name}/rlr{args.recovery_lr_scale:g}"
    if kinds:
        name += common.saliency_suffix(args)
    return common.with_seed(name, args.seed)


def _load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {}


def _record(teacher: str, config) -> dict:
    """What the row says about its distillation, read from the config that ran."""
    return {"teacher": teacher, "hardness": config.hardness, "hidden_weight": config.hidden_weight}


def _kd_config(model, args):
    """The ``+kd`` distillation and its record: from the pretrained model, or from ``--dense-from`` (the dense row's
    saved model)."""
    from prune_callbacks.controllers.distillation import DistillationConfig

    if args.dense_from is None:
        return DistillationConfig(teacher=copy.deepcopy(model)), "train_begin teacher"
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.dense_from).eval()
    config = DistillationConfig(teacher=teacher, hardness=args.hardness, hidden_weight=args.hidden_weight)
    return config, _record(f"dense fine-tuned in this setting ({args.dense_from})", config)


def train_variant(name: str, make, train, held, args) -> dict:
    from transformers import AutoModelForCausalLM

    from prune_callbacks.controllers.distillation import DistillationConfig, Distiller
    from prune_callbacks.export import slim_pruned

    kinds, levers = _kinds(name, args.smoke)
    torch.manual_seed(args.seed)
    model = make()
    start, end = args.window
    configs = [PruningConfig(granularity=k, final_sparsity=s, start_step=start, end_step=end, update_every=2,
                             merge=_merge(k, levers), **common.saliency_settings(args))
               for k, s in kinds] or None
    if configs and args.recovery_lr_scale is not None:  # the rate after the last config's last mask update
        configs[-1] = configs[-1].model_copy(update={"recovery_lr_scale": args.recovery_lr_scale})
    distiller, distillation = None, None
    if "+kd" in levers:
        kd_config, distillation = _kd_config(model, args)
        distiller = Distiller(kd_config).attach(model)
    in_run = DistillationConfig(teacher="self", snapshot="before_pruning", hardness=args.hardness,
                                hidden_weight=args.hidden_weight) if "+self" in levers else None
    if in_run is not None:
        distillation = _record("self, copied before the first mask update", in_run)
    t0 = time.time()
    pruner = peers.finetune(model, train, args, configs, distillation=in_run)
    train_s = time.time() - t0
    if distiller is not None:
        distiller.detach()
    masked_ppl = peers.held_out_perplexity(model, held)
    summary = slim_pruned(model, pruner) if pruner is not None else {"config": {}}
    folder = Path(args.models_dir) / label(name, args)
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.eval()
    with torch.no_grad():
        diff = (model(input_ids=held[:2]).logits - reloaded(input_ids=held[:2]).logits).abs().max().item()
    return {"variant": label(name, args), "units": [list(k) for k in kinds], "distillation": distillation,
            "merge": "+merge" in levers, "select": "+select" in levers, "window": [start, end],
            "saliency": configs[0].saliency if configs else None, "beta": configs[0].beta if configs else None,
            "recovery_lr_scale": configs[-1].recovery_lr_scale if configs else None,
            "merge_report": [g.get("merge") for g in pruner.report()["groups"]] if pruner is not None else None,
            "perplexity": peers.held_out_perplexity(reloaded, held), "masked_perplexity": masked_ppl,
            "reload_max_abs_logit_diff": diff, "params": sum(p.numel() for p in reloaded.parameters()),
            "config_changes": summary["config"], "train_s": round(train_s, 1), "model_dir": str(folder)}


def train_main(args) -> dict:
    """Fine-tune, slim and save each variant; rows go into ``--out`` (re-read before each write: parallel jobs)."""
    out = Path(args.out)
    for name in args.train:
        _kinds(name, args.smoke)
    if args.dense_from is not None and not common.saved_model_ready(args.dense_from):
        raise SystemExit(f"--dense-from {args.dense_from}: no saved model there (run --train dense first)")
    budget = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "tokens": args.steps * args.batch_size * args.seq_len, "lr": args.lr, "held_out_split": args.eval_split,
              "seed": args.seed}
    recorded = _load(out).get("budget", {})
    clash = {k: (recorded[k], v) for k, v in budget.items() if k in recorded and recorded[k] != v}
    if clash:  # the seed also draws the training and held-out blocks: rows of two budgets do not compare
        differences = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in clash.items())
        raise SystemExit(f"--out {out} holds rows of another budget ({differences}): give this run its own --out")
    make, train, held, desc, _ = peers.build(args)
    meta = {"benchmark": "structured_lm", "model": desc, "hardware": common.hardware_info(), "threads": args.threads,
            "budget": {**budget, "held_out_blocks": len(held)}}
    if "base_perplexity" not in _load(out):
        meta["base_perplexity"] = peers.held_out_perplexity(make(), held)
        print(f"base held-out perplexity {meta['base_perplexity']:.2f}", flush=True)
    for name in args.train:
        if any(r["variant"] == label(name, args) for r in _load(out).get("rows", [])):
            continue
        print(f"== {name}", flush=True)
        row = train_variant(name, make, train, held, args)
        print(row, flush=True)
        results = {"rows": [], **_load(out), **meta}
        results["rows"] = [r for r in results["rows"] if r["variant"] != row["variant"]] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return _load(out)


def latency_main(args) -> dict:
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    results = _load(out)
    rows = {r["variant"]: r for r in results["rows"] if Path(r["model_dir"]).is_dir()}
    models = {n: AutoModelForCausalLM.from_pretrained(r["model_dir"]).eval() for n, r in rows.items()}
    vocab = next(iter(models.values())).config.vocab_size
    for batch, rounds in ((1, args.rounds1), (8, args.rounds8)):
        x = torch.randint(0, vocab, (batch, args.seq_len), generator=torch.Generator().manual_seed(batch))
        medians = interleaved_medians(models, lambda m: m(input_ids=x, use_cache=False), rounds, label=f"batch {batch}")
        for n, median in medians.items():
            rows[n][f"b{batch}_median_s"] = median
            rows[n][f"b{batch}_speedup"] = medians["dense"] / median if "dense" in medians else None
    results["latency"] = {"seq": args.seq_len, "rounds": {"1": args.rounds1, "8": args.rounds8},
                          "threads": args.threads, "hardware": common.hardware_info()}
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    return results


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("b1_median_s")]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in rows:
        ax.scatter(r["b1_median_s"] * 1e3, r["perplexity"], color="#3b7dd8" if r["distillation"] else "k")
        ax.annotate(r["variant"], (r["b1_median_s"] * 1e3, r["perplexity"]), fontsize=8,
                    xytext=(4, -11 if r["distillation"] else 3), textcoords="offset points")
    ax.axhline(results["base_perplexity"], color="grey", ls=":", lw=1, label="pretrained, not fine-tuned")
    ax.set_xlabel(f"CPU latency, batch 1 x {results['latency']['seq']} tokens (ms, median, "
                  f"{results['latency']['threads']} thread)")
    ax.set_ylabel("held-out KJV perplexity")
    b = results["budget"]
    ax.set_title(f"SmolLM2-135M, structured + slim, {b['steps']} steps x {b['batch_size']} x {b['seq_len']} tokens",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", default=None, help=f"variants to fine-tune: {list(VARIANTS)}, each with any of {SUFFIXES}")
    ap.add_argument("--latency", action="store_true", help="time every saved variant (after --train)")
    ap.add_argument("--smoke", action="store_true", help="tiny LlamaConfig model and random motifs")
    ap.add_argument("--steps", type=int, default=30)
    common.add_lever_arguments(ap)
    common.add_recovery_argument(ap)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--eval-split", choices=("validation", "test"), default="validation",
                    help="held-out books (causal_lm_peers.build reads it)")
    ap.add_argument("--rounds1", type=int, default=15)
    ap.add_argument("--rounds8", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache-dir", default=None, help="float32 copy of SmolLM2 (load_smollm2 cache_dir)")
    ap.add_argument("--models-dir", default="outputs/structured_lm")
    ap.add_argument("--dense-from", type=Path, default=None,
                    help="teacher of the +kd variants: the dense row's saved model (--models-dir/dense) in the same "
                         "setting; default: the pretrained model")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="one result file (--out) from several runs' files (rows side by side; first of a variant wins)")
    ap.add_argument("--out", default=str(common.RESULTS / "structured_lm.json"))
    args = ap.parse_args(argv)
    if args.merge:
        return common.merge_parts(args.merge, Path(args.out), key=lambda r: r["variant"])
    common.check_recovery_argument(ap, args)
    common.set_threads(args.threads)
    if args.train:
        return train_main(args)
    if args.latency:
        return latency_main(args)
    ap.error("give --train VARIANT... or --latency")


if __name__ == "__main__":
    main()
