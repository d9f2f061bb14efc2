"""Selection over row shards (2 processes, gloo): every target's rows split across ranks the way FSDP2 shards
dim 0, the local masks concatenated in rank order are bitwise the single-process masks (ties, caps,
already-pruned weights, NaN, a target with fewer rows than ranks, uneven splits, several chunks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

import prune_callbacks.methods.selection_radix as radix
from prune_callbacks.methods import selection

WORLD = 2
SHAPES = [(5, 3), (1, 7), (64, 16), (9,), (3, 40), (0, 4)]  # uneven, fewer rows than ranks, 1-d, empty
KINDS = ["uniform", "pruned_ties", "nan"]
SETTINGS = [(0.3, 0.0, 1.0), (0.5, 0.0, 0.6), (0.97, 0.0, 1.0), (0.6, 0.55, 0.65)]
# name, CHUNK_CPU, STASH_MAX: one chunk per shard; chunks of 8 with a stash that some cases overflow
ENGINE = [("default", None, None), ("chunks_of_8", 8, 40)]


def _case(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(s, generator=g) for s in SHAPES]
    pruned = [torch.zeros(s, dtype=torch.bool) for s in SHAPES]
    if kind in ("ties", "pruned_ties"):
        scores = [(s * 3).floor() for s in scores]
    if kind == "pruned_ties":
        pruned = [torch.rand(s, generator=g) < 0.25 for s in SHAPES]
    if kind == "nan":
        for s in scores:
            s[torch.rand(s.shape, generator=g) < 0.2] = float("nan")
    return scores, pruned


def _rows(rows: int, rank: int, world: int = WORLD) -> slice:
    """FSDP2's dim-0 shard: rank r holds rows [r * ceil(R / W), min(R, (r + 1) * ceil(R / W)))."""
    block = math.ceil(rows / world)
    return slice(min(rows, rank * block), min(rows, (rank + 1) * block))


def _run_all(reducer=None, rank: int = 0, world: int = 1):
    """Every case's masks, local to ``rank`` (the whole tensors on one process)."""
    out = []
    for engine, chunk, stash in ENGINE:
        if chunk is not None:
            radix.CHUNK_CPU, radix.STASH_MAX = chunk, stash
        for c, kind in enumerate(KINDS):
            for s, (sparsity, low, high) in enumerate(SETTINGS):
                scores, pruned = _case(kind, 10 * c + s)
                numels = [t.numel() for t in scores]
                flat = torch.cat([t.reshape(-1) for t in scores])
                total = flat.numel()
                if world > 1:
                    flat = flat[_rows(total, rank, world)]
                    scores = [t[_rows(t.shape[0], rank, world)] for t in scores]
                    pruned = [t[_rows(t.shape[0], rank, world)] for t in pruned]
                kw = dict(reducer=reducer, global_numels=numels) if world > 1 else {}
                out.append(selection.global_masks(scores, pruned, sparsity, low, high, **kw))
                out.append(selection.per_layer_masks(scores, pruned, sparsity, **kw))
                k = round(sparsity * total)
                kw = dict(reducer=reducer, global_numel=total) if world > 1 else {}
                out.append([selection.smallest_k_mask(flat, k, **kw)])
    return out


def _worker(rank: int, init: str, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        reducer = selection.ProcessGroupReducer()
        masks = _run_all(reducer, rank, WORLD)
        try:  # wrong global numels: every rank raises (the sums agree), none waits in a collective
            selection.global_masks([torch.zeros(3)], [torch.zeros(3, dtype=torch.bool)], 0.5, reducer=reducer,
                                   global_numels=[7])
            refused = ""
        except ValueError as e:
            refused = str(e)
        torch.save({"masks": masks, "refused": refused}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_row_shards_give_the_single_process_masks(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_worker, args=(init, str(tmp_path / "result")), nprocs=WORLD, start_method="spawn")
    saved = [torch.load(f"{tmp_path / 'result'}.{r}") for r in range(WORLD)]
    assert all("global_numels=[7]" in s["refused"] and "sum to [6]" in s["refused"] for s in saved)
    single = _run_all()
    assert len(single) == len(saved[0]["masks"]) == len(ENGINE) * len(KINDS) * len(SETTINGS) * 3
    for case, expected in enumerate(single):
        for t, mask in enumerate(expected):
            parts = [s["masks"][case][t] for s in saved]
            joined = torch.cat([p.reshape(-1) for p in parts])
            assert torch.equal(joined, mask.reshape(-1)), (case, t)
            if mask.dim() > 0 and len(expected) > 1:  # each rank's masks have its shard's shape
                assert [tuple(p.shape) for p in parts] == [tuple(mask[_rows(mask.shape[0], r)].shape)
                                                           for r in range(WORLD)]


@pytest.fixture(autouse=True)
def _restore_engine():
    saved = radix.CHUNK_CPU, radix.STASH_MAX
    yield
    radix.CHUNK_CPU, radix.STASH_MAX = saved
