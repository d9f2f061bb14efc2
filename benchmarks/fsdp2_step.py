"""Step-time ratio with and without pruning under FSDP2 (CPU/gloo): full forward/backward/AdamW steps.

Two copies of one small Llama (built from a config, same seed), each ``fully_shard``-ed per decoder layer and
at the root over the same ranks, each with its own AdamW; the *pruned* copy has a `Pruner` attached
(unstructured, taylor, global scope, masks updated every ``--update-every`` steps from the first timed step to
the last, to ``--sparsity``). Both see the same batches (random tokens, a different stream per rank: data
parallel). Blocks of ``--steps`` steps alternate dense / pruned ``--repeats`` times (the order flips every
repeat) in one process group, after ``--warmup`` untimed steps of each.

A step is ``model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()``, started after a barrier;
its time is the slowest rank's. Reported: medians (``dense_ms``, ``pruned_ms``; the median leaves out the
rare mask-update steps) and means (which include them, amortised) of the per-step times, their ratios, the
median of the mask-update steps alone, and the pruning memory per rank (``bytes_this_rank`` of ``report()``).

Usage: ``python benchmarks/fsdp2_step.py [--world 2] [--repeats 2] [--steps 30] [--out benchmarks/results/fsdp2_step.json]``
(launches ``python -m torch.distributed.run --standalone --nproc_per_node <world>``, one thread per rank);
``--smoke``: a tiny model, 1 repeat of 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import launch_world, write_json  # noqa: E402

#: the model of the measurement: 4 layers, hidden 256 (about 3.7M parameters, 3.1M of them prunable Linear weights)
MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
SMOKE_MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)


def _worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from prune_callbacks import Pruner, PruningConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = SMOKE_MODEL if args.smoke else MODEL

    def build():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(**spec))
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    dense, dense_opt = build()
    pruned, pruned_opt = build()
    timed = args.repeats * args.steps
    total = args.warmup + timed
    config = PruningConfig(final_sparsity=args.sparsity, start_step=args.warmup, end_step=total,
                           update_every=args.update_every)
    pruner = Pruner(pruned, config, total_steps=total).attach(pruned_opt)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    def batch():
        ids = torch.randint(0, spec["vocab_size"], (args.batch, args.seq), generator=gen)
        return {"input_ids": ids, "labels": ids}

    def step(model, opt, data) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    def block(variant: str, n: int, record: bool, times: dict, updates: list) -> None:
        model, opt = (dense, dense_opt) if variant == "dense" else (pruned, pruned_opt)
        for _ in range(n):
            before = pruner.mask_updates
            t = step(model, opt, batch())  # a fresh batch per step; both variants draw from the same stream
            if record:
                times[variant].append(t)
                if variant == "pruned":
                    updates.append(pruner.mask_updates != before)

    times: dict = {"dense": [], "pruned": []}
    updates: list = []
    block("dense", args.warmup, False, times, updates)
    block("pruned", args.warmup, False, times, updates)
    for r in range(args.repeats):
        for variant in (("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")):
            block(variant, args.steps, True, times, updates)
    report = pruner.report()  # collective: every rank
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"times": times, "bytes": [g["bytes_this_rank"] for g in report["groups"]]})
    if rank == 0:
        slowest = {v: [max(r["times"][v][i] for r in per_rank) for i in range(len(times[v]))] for v in times}
        dense_t, pruned_t = slowest["dense"], slowest["pruned"]
        between = [t for t, u in zip(pruned_t, updates) if not u]
        at_update = [t for t, u in zip(pruned_t, updates) if u]
        row = {
            "world_size": world, "params": sum(p.numel() for p in pruned.parameters()),
            "prunable_params": report["prunable_params"], "pruned_params": report["pruned_params"],
            "mask_sparsity": report["mask_sparsity"], "mask_updates": report["mask_updates"],
            "timed_steps_per_variant": len(dense_t), "batch": args.batch, "seq": args.seq, "model": spec,
            "dense_ms": 1e3 * statistics.median(dense_t), "pruned_ms": 1e3 * statistics.median(pruned_t),
            "ratio_median": statistics.median(pruned_t) / statistics.median(dense_t),
            "ratio_mean": statistics.fmean(pruned_t) / statistics.fmean(dense_t),
            "pruned_between_updates_ms": 1e3 * statistics.median(between) if between else None,
            "mask_update_steps": len(at_update),
            "mask_update_step_ms": 1e3 * statistics.median(at_update) if at_update else None,
            "pruning_bytes_per_rank": [sum(r["bytes"]) for r in per_rank],
            "pruning_bytes_per_rank_per_prunable_weight": [sum(r["bytes"]) / report["prunable_params"] for r in per_rank],
            "dense_ms_all": [1e3 * t for t in dense_t], "pruned_ms_all": [1e3 * t for t in pruned_t],
            "update_at": updates,
        }
        Path(args.worker[0]).write_text(json.dumps([row]))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 1 repeat of 3 steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp2_step.json"))
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    if args.smoke:
        args.repeats, args.steps, args.warmup, args.batch, args.seq, args.update_every = 1, 3, 1, 2, 8, 1
    passed = ["--repeats", args.repeats, "--steps", args.steps, "--warmup", args.warmup, "--batch", args.batch,
              "--seq", args.seq, "--sparsity", args.sparsity, "--update-every", args.update_every, "--seed", args.seed,
              *(["--smoke"] if args.smoke else [])]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = launch_world(__file__, args.world, passed, Path(tmp, f"w{args.world}.json"))
    result = {
        "benchmark": "fsdp2_step", "backend": "gloo (CPU)", "cpu_count": os.cpu_count(), "threads_per_rank": 1,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        "command": "python benchmarks/fsdp2_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": "shared machine: other jobs may run at the same time; dense and pruned blocks alternate in one "
        "process group, so their ratio is comparable, absolute times are not", "rows": rows,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
