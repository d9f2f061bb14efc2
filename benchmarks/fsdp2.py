"""FSDP2 pruning cost on CPU/gloo: mask-update time, collective bytes per update, per-rank pruning memory,
and the per-step hook time against the optimizer step, at 1 (unsharded) vs 2 vs 4 ranks.

Synthetic model: a stack of ``d x d`` Linear layers (no bias) in a numbered ``layers`` list, every layer
``fully_shard``-ed (world size > 1); the pruner is ``Pruner(model, PruningConfig(...))`` with taylor
saliency and global scope. Gradients are random local tensors (no forward pass: what is measured is the
pruner, not the model). Per size and world size, interleaved within one process group:

* ``update_ms``: median wall time of ``update_masks`` to increasing sparsities (radix select with the
  histograms summed across ranks);
* ``collective_bytes_per_update``: bytes passed to the reducer's all-reduces per update (counted by
  wrapping ``ProcessGroupReducer.sum_``; 0 unsharded);
* ``pruning_bytes_per_rank``: masks + saliency EMA + the reused theta*grad buffer on rank 0
  (``report()["groups"][0]["bytes_this_rank"]``);
* ``hook_ms`` / ``opt_ms``: median of the pruner's per-step work (``before_optimizer_step`` +
  ``after_optimizer_step`` on a non-update step) and of ``optimizer.step()`` (AdamW), measured
  alternately step by step; ``hook_ratio`` = (opt + hook) / opt.

Usage: ``python benchmarks/fsdp2.py [--sizes 1 4 16] [--worlds 1 2 4] [--out benchmarks/results/fsdp2.json]``
(sizes in millions of prunable weights, d = 1024). Each world size runs under
``python -m torch.distributed.run --standalone --nproc_per_node N``; ``--smoke`` runs a tiny size only.
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


def _worker(size_m: list[float], dim: int, updates: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from prune_callbacks import Pruner, PruningConfig
    from prune_callbacks.methods import selection
    from prune_callbacks.methods.sharding import local

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counted = {"bytes": 0}
    original = selection.ProcessGroupReducer.sum_

    def counting(self, tensor):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return original(self, tensor)

    selection.ProcessGroupReducer.sum_ = counting
    rows = []
    for size in size_m:
        layers = max(1, round(size * 1e6 / (dim * dim)))

        class Stack(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))

        torch.manual_seed(0)
        model = Stack()
        if world > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        pruner = Pruner(model, PruningConfig(final_sparsity=0.9, start_step=10**6, end_step=2 * 10**6,
                                             sync_masks=False))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)

        def set_grads(params=tuple(model.parameters())):
            from torch.distributed.tensor import DTensor

            for p in params:
                g = torch.randn(local(p).shape, generator=gen)
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False) if world > 1 else g

        hook, step_t = [], []
        for _ in range(steps):  # interleaved: optimizer step and the pruner's work, each timed, every step
            set_grads()
            t0 = time.perf_counter()
            pruner.before_optimizer_step()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            pruner.after_optimizer_step(opt)
            t3 = time.perf_counter()
            hook.append((t1 - t0) + (t3 - t2))
            step_t.append(t2 - t1)
        times, volumes = [], []
        for i in range(updates):
            set_grads()
            pruner.before_optimizer_step()  # one gradient folded since the last update (not timed)
            dist.barrier()
            counted["bytes"] = 0
            t0 = time.perf_counter()
            pruner.update_masks(0.3 + 0.5 * i / max(updates - 1, 1))
            times.append(time.perf_counter() - t0)
            volumes.append(counted["bytes"])
        report = pruner.report()
        rows.append({
            "world_size": world, "prunable_params": report["prunable_params"], "layers": layers, "dim": dim,
            "update_ms": 1e3 * statistics.median(times), "update_ms_all": [1e3 * t for t in times],
            "collective_bytes_per_update": statistics.median(volumes),
            "pruning_bytes_per_rank": report["groups"][0]["bytes_this_rank"],
            "pruning_bytes_per_rank_per_prunable_weight": report["groups"][0]["bytes_this_rank"] / report["prunable_params"],
            "hook_ms": 1e3 * statistics.median(hook), "opt_ms": 1e3 * statistics.median(step_t),
            "hook_ratio": (statistics.median(step_t) + statistics.median(hook)) / statistics.median(step_t),
            "pruned_params": report["pruned_params"],
        })
        del pruner, opt, model
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16], help="millions of prunable weights")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one tiny size, 1 and 2 ranks")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp2.json"))
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.sizes, args.dim, args.updates, args.steps, args.worker[0])
        return {}
    if args.smoke:
        args.sizes, args.worlds, args.dim, args.updates, args.steps = [0.02], [1, 2], 64, 2, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            rows += launch_world(__file__, world, ["--sizes", *args.sizes, "--dim", args.dim, "--updates", args.updates,
                                                   "--steps", args.steps], Path(tmp, f"w{world}.json"))
    load = os.getloadavg()
    result = {
        "benchmark": "fsdp2", "backend": "gloo (CPU)", "cpu_count": os.cpu_count(), "omp_threads": 1,
        "loadavg_1_5_15": load, "note": "shared machine: other jobs ran at the same time; ratios within one run "
        "are comparable, absolute times are not", "rows": rows,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
