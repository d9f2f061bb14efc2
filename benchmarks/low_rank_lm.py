"""SmolLM2-135M on KJV: low rank on the query/key projections, during fine-tuning vs SVD / FWSVD after it.

The analysis (`prune-callbacks analyze`) found SmolLM2's ``q_proj`` / ``k_proj`` low-rank; every row here removes
the same fraction ``--sparsity`` of *their* parameters (both factors counted: ``r*(m+n)`` against ``m*n``), with
the shared budget of ``benchmarks/causal_lm_peers.py`` (``--steps`` AdamW steps of ``--batch-size`` blocks of
``--seq-len`` tokens, warm-up then cosine, the same batches for every row; whole KJV books held out):

* ``dense``: the fine-tune alone (reference); ``pretrained``: no fine-tune (perplexity only);
* ``svd_after`` / ``fwsvd_after`` / ``fwsvd_relative_after``: the fine-tuned dense model truncated one-shot (plain
  SVD; Fisher weights from ``--calib`` extra gradient passes over training blocks, no optimizer step; the same with
  ``allocation: relative``);
* ``low_rank_late50`` / ``low_rank_relative_late50``: ``granularity="low_rank"`` during the fine-tune, ranks
  shrinking from 50% to 80% of the run (cubic), the weight projected onto its subspace after every step;
  ``low_rank`` / ``low_rank_relative``: the same with the default window, 10% to 60%; ``low_rank_relative_oneshot80``: all of the
  rank cut at 80% of the run (``schedule: oneshot``), the last 20% fine-tuning the factorised-rank model.

Each pruned row is exported (two thin Linears per target) and its held-out perplexity measured on the factorised
model (``--eval-blocks`` blocks). One process, one torch thread.

    python benchmarks/low_rank_lm.py --threads 1 --steps 40 --sparsity 0.25 0.5
    python benchmarks/low_rank_lm.py --smoke --out /tmp/lrlm.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import causal_lm_peers as peers  # noqa: E402
from benchmarks import common  # noqa: E402

TARGETS = [r"self_attn\.(q_proj|k_proj)$"]
DURING = {"low_rank": ({"importance": "fisher"}, (0.1, 0.6)),
          "low_rank_relative": ({"importance": "fisher", "allocation": "relative"}, (0.1, 0.6)),
          "low_rank_late50": ({"importance": "fisher"}, (0.5, 0.8)),
          "low_rank_relative_late50": ({"importance": "fisher", "allocation": "relative"}, (0.5, 0.8)),
          "low_rank_relative_oneshot80": ({"importance": "fisher", "allocation": "relative"}, (0.8, 0.8))}
AFTER = {"svd_after": {"importance": "none"}, "fwsvd_after": {"importance": "fisher"},
         "fwsvd_relative_after": {"importance": "fisher", "allocation": "relative"}}


def _export(name, model, pruner, held, extra) -> dict:
    row = common.export_low_rank(model, pruner, lambda m: peers.held_out_perplexity(m, held))
    return {"variant": name, "held_out_ppl": row.pop("exported"), "projected_ppl": row.pop("projected"), **row, **extra}


def _config(sparsity, settings, window=(0.1, 0.6)) -> dict:
    return dict(granularity="low_rank", final_sparsity=sparsity, start_step=window[0], end_step=window[1],
                include=TARGETS, granularity_settings=settings)


def run_during(name, make, train, held, args, sparsity):
    from prune_callbacks import PruningConfig

    settings, window = DURING[name]
    torch.manual_seed(args.seed)
    model = make()
    t0 = time.time()
    config = _config(sparsity, settings, window)
    if window[0] == window[1]:  # a cut at one step: no window to end
        config["schedule"] = "oneshot"
        del config["end_step"]
    pruner = peers.finetune(model, train, args, PruningConfig(**config))
    return _export(name, model, pruner, held, {"train_wall_s": round(time.time() - t0, 1), "window": list(window),
                                               "settings": settings})


def run_after(name, dense, train, held, args, sparsity):
    from prune_callbacks import Pruner

    model = copy.deepcopy(dense)
    pruner = Pruner(model, _config(sparsity, AFTER[name]), total_steps=args.steps)
    if AFTER[name]["importance"] == "fisher":  # squared gradients from --calib blocks past the training ones
        model.train()
        start = args.steps * args.batch_size
        for i in range(args.calib):
            ids = train[(torch.arange(args.batch_size) + start + i * args.batch_size) % len(train)]
            model(input_ids=ids, labels=ids).loss.backward()
            pruner.before_optimizer_step()
            model.zero_grad(set_to_none=True)
    pruner.update_masks(sparsity)
    return _export(name, model, pruner, held, {"calibration_batches": args.calib if AFTER[name]["importance"]
                                               == "fisher" else 0})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+",
                    default=["pretrained", "dense", "svd_after", "fwsvd_after", "fwsvd_relative_after",
                             "low_rank_relative_late50"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--calib", type=int, default=8, help="gradient batches for the FWSVD-after rows")
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-cache-dir", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "low_rank_lm.json")
    args = ap.parse_args(argv)
    for name in args.variants:
        if name not in DURING and name not in AFTER and name not in ("dense", "pretrained"):
            raise SystemExit(f"unknown variant {name!r}; valid: pretrained, dense, {', '.join([*AFTER, *DURING])}")
    if args.smoke:
        args.steps, args.calib, args.eval_blocks, args.seq_len = min(args.steps, 10), 2, 8, 32
    common.set_threads(args.threads)
    make, train, held, description, _ = peers.build(args)
    result = {"benchmark": "low_rank_lm", "model": description, "hardware": common.hardware_info(),
              "targets": TARGETS, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "lr": args.lr, "eval_blocks": len(held), "eval_tokens": int(held.numel()), "seed": args.seed,
              "smoke": args.smoke, "rows": []}

    def emit(row):
        result["rows"].append(row)
        print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
        common.write_json(args.out, result)

    if "pretrained" in args.variants:
        emit({"variant": "pretrained", "held_out_ppl": peers.held_out_perplexity(make(), held)})
    dense = None
    if "dense" in args.variants or any(v in AFTER for v in args.variants):
        torch.manual_seed(args.seed)
        dense, t0 = make(), time.time()
        peers.finetune(dense, train, args)
        emit({"variant": "dense", "held_out_ppl": peers.held_out_perplexity(dense, held),
              "train_wall_s": round(time.time() - t0, 1), "params": sum(p.numel() for p in dense.parameters())})
    for sparsity in args.sparsity:  # the cheap one-shot rows first, then the runs
        for name in [v for v in args.variants if v in AFTER] + [v for v in args.variants if v in DURING]:
            started = time.time()
            row = (run_after(name, dense, train, held, args, sparsity) if name in AFTER
                   else run_during(name, make, train, held, args, sparsity))
            row.update(sparsity=sparsity, wall_s=round(time.time() - started, 1))
            emit(row)
    result["load_average_at_end"] = os.getloadavg()
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
