"""The exact k smallest scores over many tensors, found in passes over the tensors in place.

No flat copy of the scores is made: every float32 score maps to an
order-preserving int32 *key* (NaN as 0, already-pruned as ``-inf``, ``-0.0``
as ``+0.0``, so key order is ``<`` on the cleaned floats), computed a chunk at
a time. A radix select then fixes the threshold key a digit at a time: each pass
counts, per group, the keys still in play in one small histogram (a
``torch.bincount`` per chunk), the histograms are summed through the reducer
(across processes for sharded tensors), and the digit holding the k-th key
narrows the range. After the last pass the threshold, the count below it and the
count equal to it are exact. A mask pass writes ``key < threshold``; the
threshold's ties are then spread the way the flat selection always did: of
``t`` tied keys ordered by global position, those at tie index
``linspace(0, t - 1, missing).round()`` (see :class:`TiePicks`).

Transient memory is O(chunk + histogram), not O(scores): the masks returned
(1 byte per weight) are the only full-size allocation. Works on any device
(``bincount`` on CUDA too); chunks are larger off CPU.

Global position order, which decides ties: targets in group order, then rank,
then flat index in the local tensor. FSDP2 shards dim 0 into contiguous row
blocks in rank order, so this is the flat index of the unsharded target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
_LOW31 = 0x7FFFFFFF
#: float32 values per chunk on CPU (fits L2; measured fastest of 2**14..2**20) and on accelerators
CHUNK_CPU = 1 << 16
CHUNK_DEVICE = 1 << 24
#: above this many tied keys to choose, ``torch.linspace`` is replaced by exact integer arithmetic (see TiePicks)
LINSPACE_MAX = 1 << 22
#: histogram cells summed per pass at most (groups x bins), which decides the digit widths
_HISTOGRAM_CELLS = 1 << 20


def float_to_key(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of float32 ``values`` (``-0.0`` and ``+0.0`` share key 0; NaN is not mapped)."""
    bits = values.view(torch.int32)
    sign = bits >> 31  # -1 for negative floats, 0 otherwise
    key = sign & _LOW31
    key ^= bits  # negative floats: magnitude bits flipped, so a larger magnitude gives a smaller key
    key -= sign  # shift negatives up by one: -0.0 lands on +0.0's key
    return key


def key_to_float(key: int) -> float:
    """The float32 value of a key (the inverse of :func:`float_to_key`)."""
    bits = ((key - 1) ^ _LOW31) if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


NEG_INF_KEY = int(float_to_key(torch.tensor([float("-inf")]))[0])


@dataclass
class Source:
    """One local score tensor: flat values (any float dtype), flat already-pruned mask or None."""

    values: torch.Tensor
    pruned: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, score: torch.Tensor, pruned: Optional[torch.Tensor] = None) -> "Source":
        flat = score.detach().reshape(-1)
        return cls(flat, None if pruned is None else pruned.detach().reshape(-1))

    @property
    def numel(self) -> int:
        return self.values.numel()

    def chunks(self):
        """``(start, stop, keys)`` over the tensor: NaN -> key of 0.0, pruned -> key of -inf."""
        n = self.numel
        step = CHUNK_CPU if self.values.device.type == "cpu" else CHUNK_DEVICE
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = self.values[start:stop]
            if part.dtype != torch.float32:
                part = part.to(torch.float32)
            key = float_to_key(part)
            key.masked_fill_(torch.isnan(part), 0)
            if self.pruned is not None:
                key.masked_fill_(self.pruned[start:stop], NEG_INF_KEY)
            yield start, stop, key


def _digit_widths(groups: int) -> list[int]:
    """Bits fixed per pass: 2 passes of 16 bits for one group, more, narrower passes for many groups."""
    for widths in ([16, 16], [11, 11, 10], [8, 8, 8, 8]):
        if groups << widths[0] <= _HISTOGRAM_CELLS:
            return widths
    return [4] * 8


@dataclass
class Threshold:
    """A group's k-th smallest key with the global counts below and equal to it."""

    key: int
    less: int
    equal: int


def radix_thresholds(sources: Sequence[Source], groups: Sequence[Sequence[int]], ks: Sequence[int], reducer,
                     device: torch.device) -> list[Threshold]:
    """The k-th smallest key (``1 <= k <= global numel``) of each group of sources, in one pass per digit."""
    widths = _digit_widths(len(groups))
    lo = [INT32_MIN] * len(groups)  # every key in [lo, hi] is still in play
    k_left = list(ks)
    less = [0] * len(groups)
    equal = [0] * len(groups)
    shift = 32
    for p, width in enumerate(widths):
        shift -= width
        bins = 1 << width
        hist = torch.zeros(len(groups), bins, dtype=torch.int64, device=device)
        for g, members in enumerate(groups):
            low, high = lo[g], lo[g] + (1 << (shift + width)) - 1
            for i in members:
                for _, _, key in sources[i].chunks():
                    if p == 0:  # the top digit: arithmetic shift, then offset into [0, bins)
                        digits = (key >> shift).add_(bins >> 1)
                    else:
                        digits = key[(key >= low) & (key <= high)]
                        if digits.numel() == 0:
                            continue
                        digits = (digits >> shift) & (bins - 1)
                    hist[g] += torch.bincount(digits, minlength=bins)
        reducer.sum_(hist)
        cumulative = hist.cumsum(1).cpu()
        counts = hist.cpu()
        for g in range(len(groups)):
            d = int(torch.searchsorted(cumulative[g], k_left[g]))  # first digit whose running count reaches k
            below = int(cumulative[g][d - 1]) if d > 0 else 0
            less[g] += below
            k_left[g] -= below
            equal[g] = int(counts[g][d])
            lo[g] = ((d - (bins >> 1)) << shift) if p == 0 else lo[g] + (d << shift)
    return [Threshold(lo[g], less[g], equal[g]) for g in range(len(groups))]


class TiePicks:
    """Which of ``t`` tied positions (global tie index ``0..t-1``) take the ``missing`` remaining places.

    The rule is the flat selection's: ``torch.linspace(0, t - 1, missing).round()``, evenly spaced, so
    no block of positions (one early layer) takes them all. Up to :data:`LINSPACE_MAX` picks the table is
    that very ``torch.linspace`` (bitwise today's choice). Above it, or where float32 rounding in
    ``linspace`` would pick one position twice (then fewer than ``missing`` weights were pruned), the
    same points are rounded exactly in integers (half to even, as ``torch.round``), a chunk at a time.
    """

    def __init__(self, t: int, missing: int, device: torch.device):
        self.t, self.m = t, missing
        self.table: Optional[torch.Tensor] = None
        if missing >= t:
            return
        if missing == 1:  # linspace with one step is its start
            self.table = torch.zeros(1, dtype=torch.int64, device=device)
            return
        if missing <= LINSPACE_MAX:
            table = torch.linspace(0, t - 1, missing, device=device).round_()
            table = table.to(torch.int32 if t <= INT32_MAX else torch.int64)
            if missing < 2 or bool((table[1:] > table[:-1]).all()):
                self.table = table
                return
        if missing * missing >= 1 << 63:
            raise ValueError(f"{missing} tied scores to choose among {t}: more than this selection supports")
        self._a, self._b = divmod(t - 1, missing - 1)

    def _pick(self, i: int) -> int:
        q, r = divmod(i * self._b, self.m - 1)
        up = 2 * r > self.m - 1 or (2 * r == self.m - 1 and q % 2 == 1)
        return i * self._a + q + int(up)

    def _first_at_least(self, g: int) -> int:
        """The number of picks below tie index ``g`` (picks are strictly increasing)."""
        if g <= 0:
            return 0
        i = min(self.m, (2 * g - 1) * (self.m - 1) // (2 * (self.t - 1)))
        while i < self.m and self._pick(i) < g:
            i += 1
        while i > 0 and self._pick(i - 1) >= g:
            i -= 1
        return i

    def within(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The picked tie indices in ``[start, stop)``, ascending (int64)."""
        if self.m >= self.t:
            return torch.arange(start, stop, device=device)
        if self.table is not None:
            bounds = torch.searchsorted(self.table, torch.tensor([start, stop], dtype=self.table.dtype,
                                                                   device=self.table.device)).tolist()
            return self.table[bounds[0]:bounds[1]].to(torch.int64)
        i = torch.arange(self._first_at_least(start), self._first_at_least(stop), device=device)
        num = i * self._b
        q, r = num.div(self.m - 1, rounding_mode="floor"), num.remainder(self.m - 1)
        up = (2 * r > self.m - 1) | ((2 * r == self.m - 1) & (q.remainder(2) == 1))
        return i * self._a + q + up.long()


def select_smallest(sources: Sequence[Source], groups: Sequence[Sequence[int]], ks: Sequence[int],
                    numels: Sequence[int], reducer) -> tuple[list[torch.Tensor], list[int]]:
    """Flat bool masks (local) of the ``k`` smallest keys of every group, and every source's global count.

    Sources in no group get ``None`` and a count of 0.

    ``groups`` are disjoint lists of source indices (positions ordered by group order, then rank, then local
    index); ``ks`` global counts per group; ``numels`` every source's global numel. Every rank calls this
    with the same groups, ks and numels and its own local sources.
    """
    device = next((s.values.device for s in sources), torch.device("cpu"))
    masks: list[Optional[torch.Tensor]] = [None] * len(sources)
    for members in groups:
        for i in members:
            masks[i] = torch.zeros(sources[i].numel, dtype=torch.bool, device=sources[i].values.device)
    group_numel = [sum(numels[i] for i in members) for members in groups]
    active = [g for g, members in enumerate(groups) if 0 < ks[g] < group_numel[g]]
    for g, members in enumerate(groups):
        if ks[g] >= group_numel[g] > 0:
            for i in members:
                masks[i].fill_(True)
    found = radix_thresholds(sources, [groups[g] for g in active], [ks[g] for g in active], reducer, device)

    # Mask pass: everything below the threshold (and the ties when all of them are needed)
    local_ties = torch.zeros(len(sources), dtype=torch.int64, device=device)
    chunk_ties: dict[int, list[int]] = {}
    with_ties = []
    for g, threshold in zip(active, found):
        missing = ks[g] - threshold.less
        all_ties = missing == threshold.equal
        if not all_ties:
            with_ties.append((g, threshold, missing))
        for i in groups[g]:
            per_chunk = []
            for start, stop, key in sources[i].chunks():
                out = masks[i][start:stop]
                if all_ties:
                    torch.le(key, threshold.key, out=out)
                else:
                    torch.lt(key, threshold.key, out=out)
                    per_chunk.append(torch.eq(key, threshold.key).sum())
            if per_chunk:
                counts = torch.stack(per_chunk).cpu().tolist()
                chunk_ties[i] = counts
                local_ties[i] = sum(counts)

    # Tie pass: the picked ties by global tie index; one all-reduce gives every rank its offsets
    if with_ties:
        ties = torch.zeros(reducer.world_size, len(sources), dtype=torch.int64, device=device)
        ties[reducer.rank] = local_ties
        ties = reducer.sum_(ties).cpu()
        per_target = ties.sum(0).tolist()
        before_rank = ties[: reducer.rank].sum(0).tolist()
        for g, threshold, missing in with_ties:
            picks = TiePicks(threshold.equal, missing, device)
            offset = 0
            for i in groups[g]:
                start_tie = offset + before_rank[i]
                offset += per_target[i]
                counts = chunk_ties.get(i, [])
                chosen = picks.within(start_tie, start_tie + sum(counts), device) - start_tie
                if chosen.numel() == 0:
                    continue
                _mark_ties(sources[i], masks[i], threshold.key, counts, chosen)
    counts = torch.zeros(len(sources), dtype=torch.int64, device=device)
    for i, mask in enumerate(masks):
        if mask is not None:
            counts[i] = torch.count_nonzero(mask)
    return masks, reducer.sum_(counts).cpu().tolist()  # type: ignore[return-value]


def _mark_ties(source: Source, mask: torch.Tensor, key_value: int, chunk_counts: list[int],
               chosen: torch.Tensor) -> None:
    """Set ``mask`` at the local ties (key == threshold) whose local tie index is in ``chosen`` (ascending)."""
    first = 0  # local tie index of the current chunk's first tie
    bounds = torch.searchsorted(chosen, torch.tensor(_running(chunk_counts), device=chosen.device)).tolist()
    for c, (start, _, key) in enumerate(source.chunks()):
        lo, hi = bounds[c], bounds[c + 1]
        if lo < hi:
            positions = torch.nonzero(key == key_value).flatten()
            mask[start + positions[chosen[lo:hi] - first]] = True
        first += chunk_counts[c]
        if hi == chosen.numel():
            break


def _running(counts: list[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out
