"""Exact pruned counts, deterministic ties, caps."""

import pytest
import torch

from prune_callbacks.methods.selection import global_masks, kth_smallest, per_layer_masks, smallest_k_mask
from prune_callbacks.methods.selection_radix import float_to_key, key_to_float


@pytest.mark.parametrize("n, k", [(10, 0), (10, 1), (10, 5), (10, 10), (1001, 333), (4096, 4095)])
def test_smallest_k_exact_count_and_membership(n, k):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n + k))
    mask = smallest_k_mask(values, k)
    assert int(mask.sum()) == k
    if 0 < k < n:
        assert values[mask].max() <= values[~mask].min()


def test_ties_spread_over_the_tied_positions():
    values = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    assert smallest_k_mask(values, 2).tolist() == [False, True, False, False, True, False]
    assert smallest_k_mask(values, 5).tolist() == [True, True, True, True, True, False]  # strict order first


def test_all_equal_scores_are_deterministic_and_not_one_block():
    values = torch.zeros(100)
    first = smallest_k_mask(values, 37)
    assert int(first.sum()) == 37
    assert 15 <= int(first[:50].sum()) <= 22  # spread, not the first 37 positions
    assert torch.equal(first, smallest_k_mask(values.clone(), 37))


def test_kth_smallest_matches_sort():
    values = torch.randn(999, generator=torch.Generator().manual_seed(1))
    for k in (1, 500, 999):
        assert kth_smallest(values, k) == values.sort().values[k - 1]


def _scores(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) for s in shapes]


SHAPES = [(8, 16), (16, 8), (5, 7)]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_per_layer_exact_counts(sparsity):
    scores = _scores(SHAPES)
    masks = per_layer_masks(scores, [torch.zeros(s, dtype=torch.bool) for s in SHAPES], sparsity)
    assert [int(m.sum()) for m in masks] == [round(sparsity * torch.Size(s).numel()) for s in SHAPES]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_global_exact_count_and_single_threshold(sparsity):
    scores = _scores(SHAPES)
    masks = global_masks(scores, [torch.zeros(s, dtype=torch.bool) for s in SHAPES], sparsity)
    total = sum(torch.Size(s).numel() for s in SHAPES)
    assert sum(int(m.sum()) for m in masks) == round(sparsity * total)
    pruned = torch.cat([s[m] for s, m in zip(scores, masks)])
    kept = torch.cat([s[~m] for s, m in zip(scores, masks)])
    if len(pruned) and len(kept):
        assert pruned.max() <= kept.min()


def test_global_max_cap_redistributes_and_keeps_total():
    # target 0 has tiny scores: without a cap it would be emptied
    scores = [torch.full((10, 10), 1e-6) + torch.rand(10, 10) * 1e-7, torch.rand(10, 10) + 1, torch.rand(10, 10) + 1]
    pruned = [torch.zeros(10, 10, dtype=torch.bool) for _ in scores]
    uncapped = global_masks(scores, pruned, 0.5)
    assert int(uncapped[0].sum()) == 100
    capped = global_masks(scores, pruned, 0.5, max_sparsity=0.8)
    counts = [int(m.sum()) for m in capped]
    assert counts[0] == 80 and sum(counts) == 150


def test_global_min_cap():
    scores = [torch.rand(10, 10), torch.rand(10, 10) + 5]
    pruned = [torch.zeros(10, 10, dtype=torch.bool) for _ in scores]
    counts = [int(m.sum()) for m in global_masks(scores, pruned, 0.5, min_sparsity=0.3)]
    assert counts == [70, 30]


@pytest.mark.parametrize("fn", [per_layer_masks, global_masks])
def test_already_pruned_stay_pruned(fn):
    scores = _scores(SHAPES, seed=3)
    old = [torch.rand(s, generator=torch.Generator().manual_seed(9)) < 0.4 for s in SHAPES]
    for s, o in zip(scores, old):
        s[o] = 100.0  # high scores must not revive pruned weights
    masks = fn(scores, old, 0.6)
    assert all(bool((m | ~o).all()) for m, o in zip(masks, old))


def test_nan_scores_do_not_break_counts():
    scores = [torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])]
    masks = global_masks(scores, [torch.zeros(2, 2, dtype=torch.bool)], 0.5)
    assert int(masks[0].sum()) == 2


@pytest.mark.parametrize("q", [0.0001, 0.3, 0.9, 0.9999])
@pytest.mark.parametrize("kind", ["uniform", "ties", "pruned"])
def test_large_cpu_path_is_exact(q, kind):
    # above 2**20 scores the CPU path brackets the k-th value with a sample first
    g = torch.Generator().manual_seed(0)
    n = (1 << 20) + 12345
    values = torch.rand(n, generator=g)
    if kind == "ties":
        values = (values * 50).floor()
    elif kind == "pruned":
        values[: int(0.8 * n)] = float("-inf")
    k = max(1, int(q * n))
    assert kth_smallest(values, k) == torch.kthvalue(values, k).values
    mask = smallest_k_mask(values, k)
    assert int(mask.sum()) == k and values[mask].max() <= values[~mask].min()


@pytest.mark.parametrize("values, k", [
    ([0.0, -0.0, 1.0], 1),  # -0.0 and 0.0 are one value
    ([float("-inf"), 3.0, float("inf")], 3),
    ([float("-inf"), 3.0, float("inf")], 1),
    ([-1e-45, 1e-45, -2.5, 7.0], 2),  # denormals keep their order
    ([-1e-45, 1e-45, -2.5, 7.0], 3),
])
def test_kth_smallest_special_values(values, k):
    values = torch.tensor(values)
    assert kth_smallest(values, k) == values.sort().values[k - 1]


def test_keys_order_like_the_floats_and_invert():
    special = [float("-inf"), -3e38, -2.5, -1.0, -1e-38, -1e-45, 0.0, 1e-45, 1e-38, 1.0, 2.5, 3e38, float("inf")]
    values = torch.tensor(special)
    keys = float_to_key(values)
    assert keys.tolist() == sorted(keys.tolist()) and len(set(keys.tolist())) == len(special)
    assert [key_to_float(k) for k in keys.tolist()] == values.tolist()
    assert float_to_key(torch.tensor([-0.0, 0.0])).tolist() == [0, 0]  # one value, one key
