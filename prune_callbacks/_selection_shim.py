"""TEMPORARY (deleted when the `selection` branch is merged): the reducer API the radix select will
provide, emulated by all-gathering the scores. For tests of the sharded engine only."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import selection as _sel


class LocalReducer:
    rank, world_size = 0, 1

    def sum_(self, tensor):
        return tensor


class ProcessGroupReducer:
    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def _gather(t, reducer):
    sizes = torch.zeros(reducer.world_size, dtype=torch.int64)
    sizes[reducer.rank] = t.numel()
    reducer.sum_(sizes)
    n = int(sizes.max())
    out = [torch.zeros(n, dtype=t.dtype) for _ in range(reducer.world_size)]
    pad = torch.zeros(n, dtype=t.dtype)
    pad[: t.numel()] = t.reshape(-1)
    dist.all_gather(out, pad, group=reducer.group)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def _run(fn, scores, pruned, reducer, *args):
    if reducer is None or reducer.world_size == 1:
        return fn(scores, pruned, *args)
    full_s = [_gather(s.float(), reducer) for s in scores]
    full_p = [_gather(p.to(torch.uint8), reducer).bool() for p in pruned]
    masks = fn(full_s, full_p, *args)
    out = []
    for s, m in zip(scores, masks):
        sizes = torch.zeros(reducer.world_size, dtype=torch.int64)
        sizes[reducer.rank] = s.numel()
        reducer.sum_(sizes)
        start = int(sizes[: reducer.rank].sum())
        out.append(m.reshape(-1)[start:start + s.numel()].view(s.shape).clone())
    return out


def global_masks(scores, pruned, sparsity, min_sparsity=0.0, max_sparsity=1.0, *, reducer=None, numels=None):
    return _run(_sel.global_masks, scores, pruned, reducer, sparsity, min_sparsity, max_sparsity)


def per_layer_masks(scores, pruned, sparsity, *, reducer=None, numels=None):
    return _run(_sel.per_layer_masks, scores, pruned, reducer, sparsity)
