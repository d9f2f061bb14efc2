"""The exact k smallest scores over many tensors, found in passes over them in place.

No flat copy of the scores is made: every float32 score maps to an order-
preserving int32 *key* (NaN as 0, already-pruned as ``-inf``, ``-0.0`` as
``+0.0``, so key order is ``<`` on the cleaned floats), computed a chunk at a
time with arithmetic ops only. A radix select then fixes the threshold key 16
bits at a time. Pass 0 counts every key's top 16 bits in one histogram per
group (an ``index_add_`` per chunk); the histograms are summed through the
reducer (across processes for sharded tensors) and the bin holding the k-th
key is found. Pass 1 writes the keys below that bin into the masks and counts
the low 16 bits of the keys inside it, keeping those candidates (a small
fraction of the scores) with their positions. After the second sum the
threshold, the count below it and the count equal to it are exact, and the
masks are finished from the candidates. The threshold's ties are spread the
way the flat selection always did: of ``t`` tied keys ordered by global
position, those at tie index ``linspace(0, t - 1, missing).round()`` (see
:class:`TiePicks`).

Transient memory is O(chunk + histogram + candidates), not O(scores): the
masks returned (1 byte per weight) are the only full-size allocation.
Candidates beyond :data:`STASH_MAX` are not kept; the masks are then finished
by one more read of the keys (and one more for the chosen ties). The same ops
run on any device; chunks are larger off CPU.

Global position order, which decides ties: targets in group order, then rank,
then flat index in the local tensor. FSDP2 shards dim 0 into contiguous row
blocks in rank order, so this is the flat index of the unsharded target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

INT32_MAX = (1 << 31) - 1
_LOW31 = 0x7FFFFFFF
#: float32 values per chunk on CPU (fits L2; measured faster than 2**18 and 2**20) and on accelerators
CHUNK_CPU = 1 << 16
CHUNK_DEVICE = 1 << 24
#: above this many tied keys to choose, ``torch.linspace`` is replaced by exact integer arithmetic (see TiePicks)
LINSPACE_MAX = 1 << 22
#: groups whose 65536-bin histograms are summed in one all-reduce (16 x 256 KiB of int32 counts)
GROUPS_PER_BATCH = 16
#: groups smaller than this count in int32 histograms (half the bytes summed across ranks), others in int64
INT32_COUNTS_BELOW = 1 << 31
#: candidate keys (in the threshold's top bin) kept with their positions to finish the masks without a third read
STASH_MAX = 1 << 22


def _keys_in_place(clean: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys of float32 ``clean`` (no NaN; overwritten), into int32 ``out`` if given.

    ``-0.0`` becomes ``+0.0`` first, so they share key 0; negative floats get their magnitude bits flipped,
    so a larger magnitude gives a smaller (negative) key.
    """
    bits = clean.add_(0.0).view(torch.int32)  # IEEE: -0.0 + 0.0 == +0.0
    sign = bits >> 31 if out is None else torch.bitwise_right_shift(bits, 31, out=out)
    return sign.bitwise_and_(_LOW31).bitwise_xor_(bits)


def float_to_key(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of float ``values`` without NaN (``-0.0`` and ``+0.0`` share key 0)."""
    return _keys_in_place(values.to(torch.float32, copy=True))


def key_to_float(key: int) -> float:
    """The float32 value of a key (the inverse of :func:`float_to_key`)."""
    bits = (key ^ _LOW31) if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


_INF = float("inf")


@dataclass
class Source:
    """One local score tensor: flat values (any float dtype), flat already-pruned mask or None.

    ``clamp_inf``: +-inf scores count as the largest finite float32 values (``nan_to_num``'s default, the
    pruner's cleaning), so already-pruned weights (``-inf``) come strictly first; otherwise infinities stay.
    """

    values: torch.Tensor
    pruned: Optional[torch.Tensor] = None
    clamp_inf: bool = False

    @classmethod
    def of(cls, score: torch.Tensor, pruned: Optional[torch.Tensor] = None, clamp_inf: bool = False) -> "Source":
        flat = score.detach().reshape(-1)
        return cls(flat, None if pruned is None else pruned.detach().reshape(-1), clamp_inf)

    @property
    def numel(self) -> int:
        return self.values.numel()

    def chunks(self):
        """``(start, stop, keys)`` over the tensor: NaN -> key of 0.0, pruned -> key of -inf.

        The keys live in a workspace reused for the next chunk (copy what must outlive it; the consumer may
        overwrite them). Arithmetic only: ``masked_fill`` / ``where`` with a bool mask cost ~10x an
        arithmetic op on CPU. No allocation per chunk: interleaving chunk-sized temporaries with the few
        small tensors that live on (candidates) made glibc's heap grow by a chunk per chunk (measured: +5.6 B
        per weight of peak RSS at 85M scores).
        """
        n = self.numel
        if n == 0:
            return
        step = min(n, CHUNK_CPU if self.values.device.type == "cpu" else CHUNK_DEVICE)
        bounds = {} if self.clamp_inf else {"posinf": _INF, "neginf": -_INF}
        clean = torch.empty(step, dtype=torch.float32, device=self.values.device)
        spare = torch.empty(step, dtype=torch.float32, device=self.values.device)
        for start in range(0, n, step):
            stop = min(n, start + step)
            part, x, y = self.values[start:stop], clean[: stop - start], spare[: stop - start]
            if part.dtype != torch.float32:
                part = x.copy_(part)
            torch.nan_to_num(part, nan=0.0, out=x, **bounds)
            if self.pruned is not None:  # +inf where kept, -inf where pruned: (0.5 - p) / 0
                y.copy_(self.pruned[start:stop]).mul_(-1.0).add_(0.5).div_(0.0)
                torch.minimum(x, y, out=x)
            yield start, stop, _keys_in_place(x, out=y.view(torch.int32))


class _Stash:
    """Candidate positions and keys, source after source, in buffers that grow by doubling (at most ``limit``)."""

    def __init__(self, device: torch.device, limit: int):
        self.device, self.limit = device, limit
        self.positions = torch.empty(0, dtype=torch.int64, device=device)
        self.keys = torch.empty(0, dtype=torch.int32, device=device)
        self.size = 0
        self.ranges: dict[int, tuple[int, int]] = {}
        self.full = False

    def add(self, i: int, positions: torch.Tensor, keys: torch.Tensor) -> None:
        if self.full:
            return
        end = self.size + positions.numel()
        if end > self.limit:  # too many candidates: the caller reads the keys again instead
            self.full = True
            self.positions = self.keys = None  # type: ignore[assignment]
            return
        if end > self.positions.numel():
            capacity = min(self.limit, max(end, 2 * self.positions.numel(), 1 << 16))
            self.positions = torch.cat([self.positions[: self.size], self.positions.new_empty(capacity - self.size)])
            self.keys = torch.cat([self.keys[: self.size], self.keys.new_empty(capacity - self.size)])
        self.positions[self.size:end] = positions
        self.keys[self.size:end] = keys
        self.ranges[i] = (self.ranges.get(i, (self.size, self.size))[0], end)
        self.size = end

    def of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.ranges.get(i, (0, 0))
        return self.positions[start:end], self.keys[start:end]


@dataclass
class Threshold:
    """A group's k-th smallest key with the global counts below and equal to it."""

    key: int
    less: int
    equal: int


class _Batch:
    """Up to :data:`GROUPS_PER_BATCH` groups selected together: one ``[groups, 65536]`` histogram per pass.

    Pass 0 reads every key and counts its top 16 bits. Pass 1 reads every key again, writes ``key < bin``
    (certainly selected) into the masks and counts the low 16 bits of the keys in the chosen top bin; those
    candidates (positions and keys) are kept in a stash of at most :data:`STASH_MAX` entries, so the masks
    and ties are finished from the stash. A batch whose candidates overflow the stash reads the keys once
    more for the masks and once more for the chosen ties.
    """

    def __init__(self, sources, groups, ks, reducer, device, masks=None, numel: int = 1 << 62):
        """``numel``: the largest group's global numel (int32 histograms below 2**31: half the bytes summed)."""
        self.sources, self.groups, self.ks = sources, groups, ks
        self.dtype = torch.int32 if numel < INT32_COUNTS_BELOW else torch.int64
        self.reducer, self.device, self.masks = reducer, device, masks
        self.stash = _Stash(device, STASH_MAX) if masks is not None else None

    def _sum(self, hist: torch.Tensor):
        self.reducer.sum_(hist)
        return hist.cumsum(1).cpu(), hist.cpu()

    def thresholds(self) -> list[Threshold]:
        groups, bins = self.groups, 1 << 16
        hist = torch.zeros(len(groups), bins, dtype=self.dtype, device=self.device)
        for g, members in enumerate(groups):
            for i in members:
                for _, _, key in self.sources[i].chunks():
                    key >>= 16
                    _count(hist[g], key.add_(bins >> 1))
        cumulative, counts = self._sum(hist)
        tops, less, k_left = [], [], []
        for g in range(len(groups)):
            d = int(torch.searchsorted(cumulative[g], self.ks[g]))  # first top bin whose running count reaches k
            below = int(cumulative[g][d - 1]) if d > 0 else 0
            tops.append(d - (bins >> 1))
            less.append(below)
            k_left.append(self.ks[g] - below)

        hist.zero_()
        for g, members in enumerate(groups):
            top = tops[g]
            for i in members:
                mask = None if self.masks is None else self.masks[i]
                for start, stop, key in self.sources[i].chunks():
                    if mask is not None:
                        torch.lt(key, top << 16, out=mask[start:stop])
                    where = torch.nonzero((key >> 16) == top).flatten()
                    if where.numel() == 0:
                        continue
                    low = key[where]
                    _count(hist[g], low & (bins - 1))
                    if self.stash is not None:
                        self.stash.add(i, where.add_(start), low)
        cumulative, counts = self._sum(hist)
        found = []
        for g in range(len(groups)):
            d = int(torch.searchsorted(cumulative[g], k_left[g]))
            below = int(cumulative[g][d - 1]) if d > 0 else 0
            found.append(Threshold((tops[g] << 16) + d, less[g] + below, int(counts[g][d])))
        return found


def _count(histogram: torch.Tensor, digits: torch.Tensor) -> None:
    """``histogram[d] += 1`` for every digit (no bins-sized temporary, unlike ``bincount``)."""
    histogram.index_add_(0, digits, _ones(histogram.device, histogram.dtype).expand(digits.numel()))


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _ones(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if (device, dtype) not in _ONES:
        _ONES[device, dtype] = torch.ones(1, dtype=dtype, device=device)
    return _ONES[device, dtype]


def radix_thresholds(sources: Sequence[Source], groups: Sequence[Sequence[int]], ks: Sequence[int], reducer,
                     device: torch.device, numels: Optional[Sequence[int]] = None) -> list[Threshold]:
    """The k-th smallest key (``1 <= k <= global numel``) of each group of sources (two passes per batch).

    ``numels``: every source's global numel (default: the local numels, right on one process).
    """
    numels = [s.numel for s in sources] if numels is None else numels
    found: list[Threshold] = []
    for b in range(0, len(groups), GROUPS_PER_BATCH):
        batch = groups[b:b + GROUPS_PER_BATCH]
        numel = max(sum(numels[i] for i in members) for members in batch)
        found += _Batch(sources, batch, ks[b:b + GROUPS_PER_BATCH], reducer, device, numel=numel).thresholds()
    return found


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

    ``groups`` are disjoint lists of source indices (positions ordered by group order, then rank, then local
    index); ``ks`` global counts per group; ``numels`` every source's global numel. Every rank calls this
    with the same groups, ks and numels and its own local sources. Sources in no group get ``None`` and a
    count of 0.
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
                masks[i].fill_(True)  # type: ignore[union-attr]
    for b in range(0, len(active), GROUPS_PER_BATCH):
        batch = active[b:b + GROUPS_PER_BATCH]
        _select_batch(sources, [groups[g] for g in batch], [ks[g] for g in batch], reducer, device, masks,
                      max(group_numel[g] for g in batch))
    counts = torch.zeros(len(sources), dtype=torch.int64, device=device)
    for i, mask in enumerate(masks):
        if mask is not None:
            counts[i] = torch.count_nonzero(mask)
    return masks, reducer.sum_(counts).cpu().tolist()  # type: ignore[return-value]


def _select_batch(sources, groups, ks, reducer, device, masks, numel: int) -> None:
    batch = _Batch(sources, groups, ks, reducer, device, masks, numel)
    found = batch.thresholds()
    # Finish the masks below the threshold; find the ties (positions if stashed, counts per chunk if not)
    local_ties = torch.zeros(len(sources), dtype=torch.int64, device=device)
    tie_positions: dict[int, torch.Tensor] = {}
    chunk_ties: dict[int, list[int]] = {}
    with_ties = []
    for members, k, threshold in zip(groups, ks, found):
        missing = k - threshold.less
        all_ties = missing == threshold.equal
        if not all_ties:
            with_ties.append((members, threshold, missing))
        for i in members:
            mask = masks[i]
            if not batch.stash.full:
                positions, keys = batch.stash.of(i)
                mask[positions[keys <= threshold.key if all_ties else keys < threshold.key]] = True
                if not all_ties:
                    tie_positions[i] = positions[keys == threshold.key]
                    local_ties[i] = tie_positions[i].numel()
                continue
            step = CHUNK_CPU if sources[i].values.device.type == "cpu" else CHUNK_DEVICE
            per_chunk = torch.zeros(-(-sources[i].numel // step), dtype=torch.int64, device=device)
            for c, (start, stop, key) in enumerate(sources[i].chunks()):
                out = mask[start:stop]
                if all_ties:
                    torch.le(key, threshold.key, out=out)
                else:
                    torch.lt(key, threshold.key, out=out)
                    per_chunk[c] = torch.eq(key, threshold.key).sum()
            if not all_ties:
                chunk_ties[i] = per_chunk.cpu().tolist()
                local_ties[i] = sum(chunk_ties[i])
    if not with_ties:
        return
    # Ties: ordered by (group order, rank, local index); one all-reduce gives every rank its offsets
    ties = torch.zeros(reducer.world_size, len(sources), dtype=torch.int64, device=device)
    ties[reducer.rank] = local_ties
    ties = reducer.sum_(ties).cpu()
    per_source = ties.sum(0).tolist()
    before_rank = ties[: reducer.rank].sum(0).tolist()
    for members, threshold, missing in with_ties:
        picks = TiePicks(threshold.equal, missing, device)
        offset = 0
        for i in members:
            first_tie = offset + before_rank[i]
            offset += per_source[i]
            here = int(local_ties[i])
            chosen = picks.within(first_tie, first_tie + here, device) - first_tie
            if chosen.numel() == 0:
                continue
            if i in tie_positions:
                masks[i][tie_positions[i][chosen]] = True
            else:
                _mark_ties(sources[i], masks[i], threshold.key, chunk_ties[i], chosen)


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
