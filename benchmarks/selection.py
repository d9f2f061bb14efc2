"""Mask update cost of the selection: the radix select (``prune_callbacks.methods.selection``) against the flat selection
it replaced (one float32 copy of every score, ``kthvalue``; kept verbatim in :mod:`benchmarks.selection_reference`).

One global mask update (``global_masks``, sparsity 0.5, 30 % already pruned, no caps) over synthetic scores:
log-uniform in [1e-8, 1e-2] with 2 % exact zeros (dead weights tie), split into targets like a model's
(10M: 10 x 1M; 85M: BERT-base's 72 encoder matrices; 1B: 100 x 10M, generated target by target). Every
(size, implementation, round) runs in its own subprocess, interleaved old/new, so its peak RSS is its own:
the peak resident set during the updates (reset with ``/proc/self/clear_refs`` after the scores are built)
minus the resident set before them, per prunable weight. Times are the medians over rounds x calls, wall
clock and the process's CPU time (one thread; on a loaded machine the CPU time is the steadier figure).

    python -m benchmarks.selection                      # 10M, 85M (old and new), 1B (new only)
    python -m benchmarks.selection --sizes 10M --rounds 2
    python -m benchmarks.selection --smoke

The old path adds ~6.7 B per weight of peak RSS (measured at 10M and 85M: its 4 B flat copy, the 1 B masks
and boolean temporaries), ~6.7 GB at 1B on top of 5 GB of scores and pruned masks: on a 24 GB machine shared
with other jobs it is skipped above ``--old-max`` (default 100M) and reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS, cpu_model, reset_peak_rss
from .selection_reference import global_masks as flat_global_masks

SIZES = {"10M": 10_000_000, "85M": 84_934_656, "1B": 1_000_000_000, "smoke": 200_000}


# ----------------------------------------------------------------------------- one case (child process)
def shapes(size: str) -> list[tuple[int, int]]:
    if size == "85M":  # BERT-base encoder: 12 x (Q, K, V, O, FFN in, FFN out)
        return [(768, 768)] * 4 * 12 + [(3072, 768), (768, 3072)] * 12
    if size == "1B":
        return [(10_000, 1_000)] * 100
    if size == "smoke":
        return [(200, 250), (500, 300)]
    return [(1000, 1000)] * 10


def build(size: str, seed: int = 0):
    """Scores (log-uniform, 2 % zeros) and 30 % already-pruned masks, one target at a time."""
    g = torch.Generator().manual_seed(seed)
    scores, pruned = [], []
    for shape in shapes(size):
        s = torch.empty(shape).uniform_(-8.0, -2.0, generator=g).mul_(math.log(10.0)).exp_()
        s.masked_fill_(torch.rand(shape, generator=g) < 0.02, 0.0)
        scores.append(s)
        pruned.append(torch.rand(shape, generator=g) < 0.3)
    return scores, pruned


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(impl: str, size: str, calls: int) -> dict:
    from prune_callbacks.methods.selection import global_masks

    torch.set_num_threads(1)
    fn = global_masks if impl == "new" else flat_global_masks
    scores, pruned = build(size)
    n = sum(s.numel() for s in scores)
    _trim()  # hand the generator's freed temporaries back, so the updates cannot hide in them
    before = _rss_kib()
    reset = reset_peak_rss()
    times, cpu_times, counts = [], [], []
    for _ in range(calls):
        start, cpu_start = time.perf_counter(), time.process_time()
        masks = fn(scores, pruned, 0.5)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        counts.append(sum(int(m.sum()) for m in masks))
        del masks
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"impl": impl, "size": size, "scores": n, "targets": len(scores), "times_s": times, "cpu_times_s": cpu_times,
            "pruned": counts[0], "rss_before_kib": before, "peak_rss_kib": peak, "peak_reset": reset,
            "peak_extra_bytes_per_weight": (peak - before) * 1024 / n}


# ----------------------------------------------------------------------------- driver
def run_case(impl: str, size: str, calls: int, timeout: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.selection", "--child", impl, size, str(calls)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {size} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(cases: list[dict]) -> list[dict]:
    rows = []
    for size in dict.fromkeys(c["size"] for c in cases):
        for impl in ("old", "new"):
            mine = [c for c in cases if c["size"] == size and c["impl"] == impl]
            if not mine:
                continue
            rows.append({
                "size": size, "impl": impl, "scores": mine[0]["scores"], "runs": len(mine),
                "time_ms_median": 1e3 * statistics.median(t for c in mine for t in c["times_s"]),
                "cpu_time_ms_median": 1e3 * statistics.median(t for c in mine for t in c["cpu_times_s"]),
                "peak_extra_bytes_per_weight_median": statistics.median(c["peak_extra_bytes_per_weight"] for c in mine),
                "peak_extra_gib_median": statistics.median((c["peak_rss_kib"] - c["rss_before_kib"]) / 2**20 for c in mine),
                "pruned": mine[0]["pruned"],
            })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| scores | selection | mask update, wall (median) | CPU time (median) | peak extra RSS / weight | "
             "peak extra RSS |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['impl']} | {r['time_ms_median']:.0f} ms | {r['cpu_time_ms_median']:.0f} ms | "
                     f"{r['peak_extra_bytes_per_weight_median']:.2f} B | {r['peak_extra_gib_median']:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "85M", "1B"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per (size, implementation)")
    parser.add_argument("--calls", type=int, default=2, help="mask updates timed per subprocess")
    parser.add_argument("--old-max", type=int, default=100_000_000, help="largest size the old path runs at")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "selection_cpu.json"))
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "SIZE", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return {}
    if args.smoke:
        args.sizes, args.rounds, args.calls = ["smoke"], 1, 1
    load_start = os.getloadavg()
    cases, skipped = [], []
    for size in args.sizes:
        impls = ["old", "new"] if SIZES[size] <= args.old_max else ["new"]
        if "old" not in impls:
            skipped.append({"size": size, "impl": "old", "why": f"over --old-max={args.old_max}: ~6.7 B per weight of "
                            "peak RSS (measured at 10M, 85M) on top of the scores, on a shared 24 GB machine"})
        rounds = args.rounds if SIZES[size] < 500_000_000 else 1
        for r in range(rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:  # interleaved, alternating which goes first
                case = run_case(impl, size, args.calls, args.timeout)
                case["round"] = r
                cases.append(case)
                print(f"{size} {impl} round {r}: {[round(t * 1e3) for t in case['times_s']]} ms "
                      f"(CPU {[round(t * 1e3) for t in case['cpu_times_s']]} ms), "
                      f"+{case['peak_extra_bytes_per_weight']:.2f} B/weight", flush=True)
    rows = summarise(cases)
    result = {
        "benchmark": "selection", "command": "python -m benchmarks.selection " + " ".join(argv or sys.argv[1:]),
        "setup": "global_masks, sparsity 0.5, 30% already pruned, no caps; log-uniform scores in [1e-8, 1e-2] "
                 "with 2% exact zeros; 1 thread; one subprocess per case",
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "summary": rows, "skipped": skipped, "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
