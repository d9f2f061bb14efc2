"""The selection allocates no buffer the size of all scores: every tensor it creates is a chunk, a histogram or
a bounded stash, except the masks it returns (counted by a dispatch mode that sees every allocation)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prune_callbacks.methods import selection

from benchmarks.selection_reference import global_masks as flat_global_masks  # noqa: E402

SHAPES = [(2048, 1024), (1024, 1600), (1300, 1300)]  # 5.4M scores: 22 MB of float32
LIMIT = len(SHAPES) * 65536 * 8  # a bound on the histograms here (per layer: 3 groups x 65536 bins x 8 bytes)


class Allocations(TorchDispatchMode):
    """Records ``(bytes, dtype, numel)`` of every tensor an op creates (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[int, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((t.untyped_storage().nbytes(), t.dtype, t.numel()))
        return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=g) for s in SHAPES]
    pruned = [torch.rand(s, generator=g) < 0.2 for s in SHAPES]
    return scores, pruned


def _large(fn, *args):
    with Allocations() as seen:
        fn(*args)
    return [c for c in seen.created if c[0] > LIMIT]


@pytest.mark.parametrize("fn", [selection.global_masks, selection.per_layer_masks])
def test_only_the_masks_are_full_size(fn):
    scores, pruned = _inputs()
    large = _large(fn, scores, pruned, 0.6)
    numels = sorted(s.numel() for s in scores)
    assert all(dtype == torch.bool for _, dtype, _ in large), large
    assert min(numels) > LIMIT  # so every mask is seen
    assert sorted(n for _, _, n in large) == numels, large  # one mask per target, nothing else


def test_the_flat_selection_is_caught():
    # the instrument sees the old selection's flat float32 copy of every score (this test can fail)
    scores, pruned = _inputs()
    large = _large(flat_global_masks, scores, pruned, 0.6)
    assert (4 * sum(s.numel() for s in scores), torch.float32, sum(s.numel() for s in scores)) in large
