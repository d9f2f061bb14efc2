"""The radix selection is bitwise today's flat selection: masks equal to a verbatim copy of the selection as it
was before (commit f992eed: one flat float32 copy of all scores, ``kthvalue`` / ``topk``) over a table of cases
with ties, caps, NaN, infinities, already-pruned weights, empty targets, several chunks, batches of
groups and a full or overflowing candidate stash."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import prune_callbacks.methods.selection_radix as radix
from prune_callbacks.methods import selection

from benchmarks.selection_reference import _clean, global_masks, per_layer_masks, smallest_k_mask  # noqa: E402

# ----------------------------------------------------------------------------- cases
def _make(kind: str, shapes, seed: int):
    """Scores and already-pruned masks of one kind."""
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(s, generator=g) for s in shapes]
    pruned = [torch.zeros(s, dtype=torch.bool) for s in shapes]
    if kind in ("ties", "ties_pruned", "ties_caps"):  # a few distinct values: large tie sets across targets
        scores = [(s * 4).floor() for s in scores]
    if kind == "zeros":
        scores = [torch.zeros(s) for s in shapes]
    if kind in ("pruned", "ties_pruned", "special_pruned"):
        pruned = [torch.rand(s, generator=g) < 0.3 for s in shapes]
        for s, p in zip(scores, pruned):
            s[p] = 100.0  # high scores must not revive pruned weights
    if kind in ("special", "special_pruned"):  # NaN (= 0), -0.0 (= 0.0), +-inf (= +-max), denormals, negatives
        specials = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-45, -1e-45, -3.0,
                                 torch.finfo(torch.float32).max, torch.finfo(torch.float32).min])
        for s in scores:
            flat = s.view(-1)
            if flat.numel() == 0:
                continue
            idx = torch.randint(flat.numel(), (flat.numel() // 2,), generator=g)
            flat[idx] = specials[torch.randint(len(specials), (len(idx),), generator=g)]
    if kind == "tiny_first":  # one target would be emptied without a cap
        scores[0] = scores[0] * 1e-6
    if kind == "half":
        scores = [s.to(torch.bfloat16) for s in scores]  # coarse values: ties, and a dtype conversion
    return scores, pruned


SHAPES = {
    "small": [(8, 16), (16, 8), (5, 7)],
    "with_empty": [(6, 10), (0, 4), (3, 33), (1, 1)],
    "many": [(3 + i % 5, 4 + i % 7) for i in range(40)],
    "rows": [(100, 64), (17, 129), (512, 3)],
}
KINDS = ["uniform", "ties", "zeros", "pruned", "ties_pruned", "special", "special_pruned", "tiny_first", "half",
         "ties_caps"]
SETTINGS = [  # sparsity, min, max
    (0.0, 0.0, 1.0), (0.3, 0.0, 1.0), (0.5, 0.0, 0.7), (0.7, 0.2, 0.9), (0.9, 0.5, 0.95), (0.999, 0.0, 1.0),
    (0.6, 0.55, 0.65),
]


def _equal(new, old, scores=None, pruned=None, expected=None):
    """Bitwise equal; or, where the old float32 ``linspace`` picked one tied position twice (it then pruned
    fewer than asked), the new masks have the exact count and differ only at tied positions."""
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bool
    if all(torch.equal(a, b) for a, b in zip(new, old)):
        return
    assert expected is not None, "masks differ from the flat selection"
    new_count, old_count = sum(int(a.sum()) for a in new), sum(int(b.sum()) for b in old)
    assert old_count < expected == new_count
    differing = torch.cat([_clean(s, p)[(a != b).view(-1)] for s, p, a, b in zip(scores, pruned, new, old)])
    assert bool((differing == differing[0]).all())  # one tied value


def _global_count(scores, pruned, sparsity, low, high):
    numels = [s.numel() for s in scores]
    already = [int(p.sum()) for p in pruned]
    lows = [max(math.ceil(min(low, sparsity) * n), a) for n, a in zip(numels, already)]
    highs = [max(math.floor(high * n), a) for n, a in zip(numels, already)]
    return min(max(round(sparsity * sum(numels)), sum(lows)), sum(highs))


def _set_chunking(name: str, monkeypatch) -> None:
    """One chunk per tensor; or chunks of 96 with a stash of 300 candidates (some cases overflow it)."""
    if name == "chunks_of_96":
        monkeypatch.setattr(radix, "CHUNK_CPU", 96)
        monkeypatch.setattr(radix, "STASH_MAX", 300)


@pytest.fixture(params=["one_chunk", "chunks_of_96"])
def chunking(request, monkeypatch):
    _set_chunking(request.param, monkeypatch)
    return request.param


# "many" (40 targets) in small chunks is covered by test_batches_stash_overflow_and_int64_counts_match
LAYOUTS = [(layout, "one_chunk") for layout in SHAPES] + [(layout, "chunks_of_96") for layout in SHAPES
                                                           if layout != "many"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout, chunks", LAYOUTS)
def test_global_and_per_layer_masks_match_the_flat_selection(kind, layout, chunks, monkeypatch):
    _set_chunking(chunks, monkeypatch)
    for seed, (sparsity, low, high) in enumerate(SETTINGS):
        scores, pruned = _make(kind, SHAPES[layout], seed)
        _equal(selection.global_masks(scores, pruned, sparsity, low, high),
               global_masks(scores, pruned, sparsity, low, high),
               scores, pruned, _global_count(scores, pruned, sparsity, low, high))
        for score, old, new, mask in zip(scores, pruned, selection.per_layer_masks(scores, pruned, sparsity),
                                         per_layer_masks(scores, pruned, sparsity)):
            k = max(round(sparsity * score.numel()), int(old.sum()))
            _equal([new], [mask], [score], [old], k)


@pytest.mark.parametrize("per_batch, stash, int32_below", [(3, 0, 1 << 31), (1, 1 << 22, 0), (16, 0, 0)])
def test_batches_stash_overflow_and_int64_counts_match(per_batch, stash, int32_below, monkeypatch):
    monkeypatch.setattr(radix, "GROUPS_PER_BATCH", per_batch)
    monkeypatch.setattr(radix, "INT32_COUNTS_BELOW", int32_below)
    monkeypatch.setattr(radix, "STASH_MAX", stash)
    monkeypatch.setattr(radix, "CHUNK_CPU", 16)
    for kind in ("uniform", "ties_pruned", "special"):
        scores, pruned = _make(kind, SHAPES["many"], 1)
        _equal(selection.per_layer_masks(scores, pruned, 0.45), per_layer_masks(scores, pruned, 0.45))
        _equal(selection.global_masks(scores, pruned, 0.45, 0.3, 0.6), global_masks(scores, pruned, 0.45, 0.3, 0.6))


@pytest.mark.parametrize("kind", ["ties", "zeros", "special", "infinities"])
@pytest.mark.parametrize("k", [0, 1, 2, 57, 500, 999, 1000, 1001])
def test_smallest_k_mask_matches(kind, k, chunking):
    (score,), (pruned,) = _make("special" if kind == "infinities" else kind, [(1000,)], k)
    # smallest_k_mask takes values as they are: infinities stay (N:M marks non-candidates +inf)
    values = score.nan_to_num(nan=1.0, posinf=float("inf"), neginf=float("-inf")) if kind == "infinities" \
        else _clean(score, pruned)
    _equal([selection.smallest_k_mask(values, k)], [smallest_k_mask(values, k)], [values], [pruned],
           min(max(k, 0), values.numel()))


@pytest.mark.parametrize("kind", ["zeros", "ties"])
def test_large_tie_sets_match(kind):
    # a million tied scores: torch.linspace's float32 rounding decides some picks; the new path uses the same table
    n = (1 << 20) + 4099
    values = torch.rand(n, generator=torch.Generator().manual_seed(5))
    values = torch.zeros(n) if kind == "zeros" else (values * 3).floor()
    for k in (1, 333_333, n // 2 + 17, n - 1):
        nothing = torch.zeros(n, dtype=torch.bool)
        _equal([selection.smallest_k_mask(values, k)], [smallest_k_mask(values, k)], [values], [nothing], k)


def _round_half_even(x: Fraction) -> int:
    q = math.floor(x)
    r = x - q
    return q + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and q % 2) else 0)


@pytest.mark.parametrize("t, m", [(2, 2), (10, 3), (7, 6), (1001, 2), (1001, 1000), (4097, 333), (12, 12), (5, 1)])
def test_exact_tie_picks_are_the_rounded_even_spacing(t, m, monkeypatch):
    monkeypatch.setattr(radix, "LINSPACE_MAX", 0)  # integer arithmetic instead of the float32 linspace table
    picks = radix.TiePicks(t, m, torch.device("cpu"))
    if m >= t:
        expected = list(range(t))
    elif m == 1:
        expected = [0]
    else:
        expected = [_round_half_even(Fraction(i * (t - 1), m - 1)) for i in range(m)]
    assert picks.within(0, t, torch.device("cpu")).tolist() == expected
    # any split of the tie range gives the same picks piece by piece (how shards ask for theirs)
    cuts = sorted({0, t, t // 3, t // 2 + 1, t - 1})
    pieces = [picks.within(a, b, torch.device("cpu")).tolist() for a, b in zip(cuts, cuts[1:])]
    assert sum(pieces, []) == expected


def test_exact_tie_picks_give_exact_counts_through_the_masks(monkeypatch):
    monkeypatch.setattr(radix, "LINSPACE_MAX", 0)
    monkeypatch.setattr(radix, "CHUNK_CPU", 50)
    values = torch.zeros(1234)
    for k in (1, 2, 617, 1233):
        mask = selection.smallest_k_mask(values, k)
        assert int(mask.sum()) == k
        positions = torch.nonzero(mask).flatten().tolist()
        assert positions == [_round_half_even(Fraction(i * 1233, k - 1)) if k > 1 else 0 for i in range(k)]
