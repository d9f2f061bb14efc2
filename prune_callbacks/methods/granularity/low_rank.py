"""Low-rank granularity: each targeted Linear keeps only its most important singular directions.

``PruningConfig(granularity="low_rank", final_sparsity=0.5)`` trains the model while the allowed
rank of every targeted ``nn.Linear`` (weight ``[m, n]``) shrinks on the schedule; after training,
:func:`prune_callbacks.export.dispatch.export_pruned` replaces each by two thin Linears (``[r, n]`` then
``[m, r]``, :mod:`prune_callbacks.export.low_rank`).

**Budget.** ``final_sparsity`` is the fraction of the targeted *parameters* removed, counting both
factors: a target at rank ``r`` holds ``r * (m + n)`` parameters instead of ``m * n``. A rank at or
above break-even ``m*n / (m+n)`` saves nothing, so it is never chosen: every target is either
untouched (full rank, dense) or below break-even. The removed count is the budget
``round(s * targeted params)`` exceeded by less than one rank step of one target (``m + n``
parameters): ranks are integers, so this is as exact as it can be. Ranks never go below 1.

**Which directions (the statistic).** Fisher-weighted SVD (FWSVD, Hsu et al. 2022): the row
importance ``I_i`` of output unit ``i`` is an EMA (factor ``beta``) over real optimizer steps of
``sum_j g_ij^2``, the diagonal empirical Fisher information summed over the row, updated from the
unscaled, finite gradients the engine sees each step (`Granularity.observe`; ``m`` float32 per
target). With ``D = diag(sqrt(I))``, truncating the SVD of ``D W`` to rank ``r`` minimises
``sum_i I_i ||w_i - w'_i||^2``, the second-order estimate of the loss increase under a
row-diagonal Fisher, and removing singular direction ``k`` of ``D W`` costs ``sigma_k^2``. Why this
and not plain singular values: plain SVD minimises ``||W - W'||_F``, which weighs a row the task
never reads like one it depends on, and compares layers by the scale of their weights, which
differs from layer to layer; the Fisher puts every direction of every layer on one scale, the
loss, so one global threshold is meaningful. (Squared gradients rather than the engine's Taylor
``|theta * grad|``: truncation *changes* weights by small amounts, which the Fisher prices;
Taylor prices setting a weight to zero.) ``granularity_settings={"importance": "none"}`` uses
``I = 1`` (plain truncated SVD, for comparison). One difference from the paper: Hsu et al. sum the
Fisher over the rows of ``W`` in ``Y = X W``, i.e. per *input* feature; here it is summed per *output*
unit of the ``[m, n]`` torch weight, which makes the truncation the right projection below (the
input-feature grouping would give the left projection ``U_r U_r^T W``); which grouping is better was
not measured.

**Allocation across layers.** One global threshold on the loss per parameter saved,
``sigma_k^2 / (m + n)``: directions are removed cheapest first, across all targets, until the
budget is met; a target that would stay at or above break-even keeps its previous rank (its
removals would save nothing). The second-order estimate only holds for small changes: on MiniLM early
in a run it priced the query/key projections of the first blocks so low that they went to rank 1
(``benchmarks/results/low_rank_rt50.json``). ``allocation: relative`` divides each target's losses
by its own weighted energy (the share of the layer lost, per parameter saved), which compares
spectra rather than loss scales; measured side by side in ``low_rank_rt50_relative.json``.

**Keeping the weight on its subspace.** With ``V_r`` the top-``r`` right singular vectors of
``D W``, the FWSVD truncation ``D^-1 [D W]_r`` equals ``W V_r V_r^T`` (no division by ``D``, so
rows of zero importance are fine): the projection onto the weights whose rows lie in
``span(V_r)``. ``projection="every_step"`` (default) applies it after every optimizer step, so
the run fine-tunes the rank-``r`` model (projected gradient descent; the left factor ``W V_r``
trains freely, the subspace moves at each mask update). Cost per step and target: two matmuls,
``4 m n r`` flops, a transient ``m*r + m*n`` float32; ``projection="at_updates"`` projects only at
mask updates and at finalize (the weight trains at full rank in between; cheaper, and the
truncation at the next update is a one-shot cut). Memory: ``V_r``, ``n * r`` float32 per factorised
target (under half the weight's float32 size, since ``r < mn/(m+n)``), and the ``m`` Fisher floats;
a mask update holds every target's float32 SVD at once (transiently up to ~2x the targeted weights
in float32) and costs one SVD per target (``O(m n min(m, n))``, then ``O(m r_old^2)`` inside the
subspace).
Decompositions run in float32 whatever the weight's dtype (bf16 weights are projected in float32
and rounded once). A later update searches inside the current subspace (SVD of ``D W V_old``,
``m x r_old``), so subspaces are nested and ranks only shrink.

**Masks.** One bool per singular direction (``min(m, n)``), ``True`` = removed; they are always a
suffix (the smallest directions). ``counts()`` reports parameters removed, ``m*n - r*(m+n)``, not
zeros; measured (after finalize), a target counts as rank ``r`` only while its weight still equals
its rank-``r`` projection (relative Frobenius residual within `_tolerance`: the rounding of its dtype
plus that of a float32 projection).

Refused: GPT-2 ``Conv1D`` targets (no exporter yet), a ``final_sparsity`` beyond what rank 1
everywhere removes, a ``saliency`` (this granularity does not read one), and any other granularity
on the same weight (`Granularity.may_share`).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from prune_callbacks.core.registry import register_granularity
from prune_callbacks.methods.granularity.base import Granularity


class LowRankSettings(BaseModel):
    """``granularity_settings`` of ``low_rank``."""

    model_config = ConfigDict(extra="forbid")

    importance: Literal["fisher", "none"] = Field(
        "fisher", description="Row weights of the SVD: 'fisher' (FWSVD: EMA of squared gradients per row), 'none' "
        "(plain truncated SVD).")
    allocation: Literal["loss", "relative"] = Field(
        "loss", description="Ranks across layers: 'loss' (one threshold on the weighted truncation loss per parameter "
        "saved), 'relative' (on each layer's share of its own weighted energy lost per parameter saved).")
    projection: Literal["every_step", "at_updates"] = Field(
        "every_step", description="Project the weight onto its rank-r subspace after every optimizer step, or only "
        "at mask updates (and at finalize).")


#: The measured recommendation for short fine-tunes (docs/low-rank.md; BENCHMARKS.md, "Late cut"): cut all of the
#: rank at 80% of the run, from the Fisher of a model that has learnt the task, with ``relative`` allocation, and
#: fine-tune the rank-r model for the rest (MiniLM / Rotten Tomatoes, 50%, 100 steps: 70.2% against 58.3% for the
#: cubic 10% -> 60% window). ``analyze`` suggests low rank with these settings.
LATE_CUT = {"schedule": "oneshot", "start_step": 0.8,
            "granularity_settings": {"importance": "fisher", "allocation": "relative"}}


def max_rank(m: int, n: int) -> int:
    """The largest rank below break-even: ``r * (m + n) < m * n``."""
    return (m * n - 1) // (m + n)


def _tolerance(weight: torch.Tensor) -> float:
    """Relative residual of a weight re-projected onto its own subspace: its dtype's rounding (4 eps) plus the
    float32 projection's (16 sqrt(n) eps; measured ~1e-6 at n = 64)."""
    return 4 * torch.finfo(weight.dtype).eps + 16 * weight.shape[1] ** 0.5 * torch.finfo(torch.float32).eps


def kept_params(m: int, n: int, r: int) -> int:
    """Parameters a target holds at rank ``r``: two factors below break-even, else the dense weight."""
    return r * (m + n) if r * (m + n) < m * n else m * n


@register_granularity("low_rank")
class LowRank(Granularity):
    name = "low_rank"
    elementwise = False
    weight_access = "subspace"
    export_as = "low_rank"  # two thin Linears (prune_callbacks.export.low_rank.factorize.factorize_granularities)
    supports_sharding = False  # its SVD needs whole weights; on FSDP2 row shards it would be wrong: refused
    own_saliency = "magnitude"  # no per-weight buffers: directions are ranked by the Fisher statistic below
    Settings = LowRankSettings

    def __init__(self, config, targets, model=None, *args: str):
        self.config = config
        self.targets = list(targets)
        self.model = model
        self.settings = self.settings_of(config)
        self.check_targets()
        self.params = [t.param for t in self.targets]
        self.masks = [torch.zeros(min(p.shape), dtype=torch.bool, device=p.device) for p in self.params]
        self.fisher = [torch.zeros(p.shape[0], dtype=torch.float32, device=p.device) for p in self.params]
        self.bases: list[Optional[torch.Tensor]] = [None] * len(self.params)  # [n, r] float32, None = full rank
        self.observed = 0  # real steps whose gradients reached `observe`
        self._pending: Optional[tuple[list[int], list]] = None  # (ranks, bases) of the last `select`
        self._project_once = False
        self._versions: list[Optional[int]] = [None] * len(self.params)  # `Tensor._version` after the last projection
        #: no optimizer step since the last projection (a fused optimizer writes weights without bumping
        #: ``Tensor._version``, so the version alone cannot tell; `observe` clears this before every real step)
        self._on_subspace = True

    # ---------------------------------------------------------- config
    @classmethod
    def check_config(cls, config, *args):
        default = type(config).model_fields["saliency"].default
        if "saliency" in config.model_fields_set and config.saliency != default:
            return [f"saliency={config.saliency!r} does not apply to granularity='low_rank' (it ranks singular "
                    "directions by a Fisher-weighted SVD; granularity_settings.importance chooses the weights); "
                    "remove it"]
        return []

    def check_targets(self):
        bad = [t.param_name for t in self.targets if t.transposed or t.param.dim() != 2]
        if bad:
            raise ValueError(f"granularity='low_rank' factorises nn.Linear weights; these are not: {', '.join(bad[:5])}"
                             " (GPT-2 Conv1D is not supported yet); leave them out with exclude=[...]")
        total = sum(t.numel for t in self.targets)
        floor = sum(kept_params(*t.param.shape, 1) for t in self.targets)
        if total and self.config.final_sparsity > 1 - floor / total:
            raise ValueError(f"final_sparsity={self.config.final_sparsity} is out of reach for granularity='low_rank' "
                             f"on these targets: rank 1 everywhere removes {1 - floor / total:.4f} of their "
                             f"parameters (allowed: final_sparsity <= {1 - floor / total:.4f})")

    # ---------------------------------------------------------- facts
    @property
    def ranks(self) -> list[int]:
        return [m.numel() - int(m.sum()) for m in self.masks]

    def _removed(self, ranks) -> int:
        return sum(t.numel - kept_params(*t.param.shape, r) for t, r in zip(self.targets, ranks))

    # ---------------------------------------------------------- gradients
    @torch.no_grad()
    def observe(self, grads, grad_scale=None):
        self.observed += 1
        self._on_subspace = False  # the optimizer step that follows writes the weights
        if self.settings.importance != "fisher":
            return
        beta = self.config.beta
        for fisher, grad in zip(self.fisher, grads):
            row = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square_()
            if grad_scale is not None and grad_scale != 1.0:
                row.div_(float(grad_scale) ** 2)
            fisher.lerp_(row, 1.0 - beta)

    # ---------------------------------------------------------- selection
    def _spectrum(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma^2 of D W, right singular vectors [n, r_old])``, inside the current subspace (float32)."""
        weight = self.params[i].detach().float()
        if self.settings.importance == "fisher":
            weight = weight * self.fisher[i].sqrt().unsqueeze(1)
        basis = self.bases[i]
        if basis is None:
            _, s, vh = torch.linalg.svd(weight, full_matrices=False)
            return s.square(), vh.T
        _, s, qh = torch.linalg.svd(weight @ basis, full_matrices=False)
        return s.square(), basis @ qh.T

    @torch.no_grad()
    def select(self, scores, sparsity):
        if self.settings.importance == "fisher" and self.observed == 0:
            raise RuntimeError(
                "granularity='low_rank' was asked for ranks before any gradient reached it: call "
                "pruner.before_optimizer_step() after backward() (or pruner.attach(optimizer)), or use "
                "granularity_settings={'importance': 'none'} for plain truncated SVD")
        old = self.ranks
        spectra = [self._spectrum(i) for i in range(len(self.params))]
        budget = round(sparsity * sum(t.numel for t in self.targets))
        ranks = list(old)
        removed = self._removed(ranks)
        if removed < budget:
            losses, owner = [], []
            for i, ((energy, _), t) in enumerate(zip(spectra, self.targets)):
                k = torch.arange(old[i] - 1, 0, -1)  # removable directions, smallest first (rank >= 1)
                scale = float(energy.sum()) if self.settings.allocation == "relative" else 1.0
                losses.append(energy[k].cpu() / (sum(t.param.shape) * max(scale, 1e-30)))
                owner.append(torch.full((k.numel(),), i, dtype=torch.long))
            order = torch.argsort(torch.cat(losses), stable=True)
            for i in torch.cat(owner)[order].tolist():
                m, n = self.targets[i].param.shape
                before = kept_params(m, n, ranks[i])
                ranks[i] -= 1
                removed += before - kept_params(m, n, ranks[i])
                if removed >= budget:
                    break
            ranks = [r_old if kept_params(*t.param.shape, r) == t.numel else r
                     for t, r, r_old in zip(self.targets, ranks, old)]  # above break-even saves nothing
        bases = [None if r == min(t.param.shape) else v[:, :r].contiguous()
                 for t, r, (_, v) in zip(self.targets, ranks, spectra)]
        self._pending = (ranks, bases)
        return [torch.arange(mask.numel(), device=mask.device) >= r for mask, r in zip(self.masks, ranks)]

    def set_masks(self, masks):
        super().set_masks(masks)
        ranks = self.ranks
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == ranks:
            self.bases = pending[1]
        else:  # masks from elsewhere (another process): keep the leading directions of the current bases
            for i, r in enumerate(ranks):
                if r < self.masks[i].numel():
                    if self.bases[i] is None or self.bases[i].shape[1] < r:
                        raise RuntimeError(f"low_rank: no basis for rank {r} of {self.targets[i].param_name}")
                    self.bases[i] = self.bases[i][:, :r].contiguous()
        self._project_once = True

    # ---------------------------------------------------------- keeping the weight on its subspace
    @torch.no_grad()
    def _project(self, force: bool) -> None:
        """``W <- (W V) V^T`` for every factorised target; unless ``force``, only weights written since their last
        projection (an optimizer step since, or ``Tensor._version`` moved: a load): the projection is idempotent
        only up to rounding, so projecting an unchanged weight again (a resumed pruner applying its masks) would
        change its last bits."""
        for i, (param, basis) in enumerate(zip(self.params, self.bases)):
            if basis is None or (not force and self._on_subspace and param._version == self._versions[i]):
                continue
            weight = param.detach().float()
            param.copy_((weight @ basis) @ basis.T)
            self._versions[i] = param._version
        self._on_subspace = True

    @torch.no_grad()
    def apply(self) -> None:
        if self.settings.projection == "every_step" or self._project_once:
            self._project(force=self._project_once)
        self._project_once = False

    @torch.no_grad()
    def finalize(self) -> None:
        """Project once more: every weight is exactly its rank-``r`` product (up to its dtype's rounding)."""
        self._project(force=False)

    # ---------------------------------------------------------- state
    def state_dict(self):
        state = {"observed": torch.tensor(self.observed, dtype=torch.int64)}
        for t, fisher, basis in zip(self.targets, self.fisher, self.bases):
            state[f"{t.name}/fisher"] = fisher
            if basis is not None:
                state[f"{t.name}/basis"] = basis
        return state

    def load_state_dict(self, state):
        if "observed" in state:
            self.observed = int(state["observed"])
        for i, (t, fisher) in enumerate(zip(self.targets, self.fisher)):
            if f"{t.name}/fisher" in state:
                fisher.copy_(state[f"{t.name}/fisher"])
            basis = state.get(f"{t.name}/basis")
            rank = self.masks[i].numel() - int(self.masks[i].sum())
            if rank < self.masks[i].numel():
                if basis is None or tuple(basis.shape) != (t.param.shape[1], rank):
                    raise ValueError(f"low_rank state: the basis of {t.name} is missing or not [{t.param.shape[1]}, "
                                     f"{rank}] (the masks say rank {rank})")
                self.bases[i] = basis.to(device=t.param.device, dtype=torch.float32).clone()
            else:
                self.bases[i] = None
        self._pending = None
        # a state is saved after the step's projection: the weights it goes with are already on their subspaces
        self._versions = [p._version for p in self.params]
        self._on_subspace = True

    # ---------------------------------------------------------- counts, report, export
    def counts(self, measured: bool = False):
        rows = []
        for t, r, basis in zip(self.targets, self.ranks, self.bases):
            if measured and basis is not None:
                weight = t.param.detach().float()
                residual = float(torch.linalg.matrix_norm(weight - (weight @ basis) @ basis.T))
                if residual > _tolerance(t.param) * float(torch.linalg.matrix_norm(weight)):
                    r = min(t.param.shape)  # trained off its subspace: not factorisable at that rank
            rows.append((t.name, t.numel, t.numel - kept_params(*t.param.shape, r)))
        return rows

    def report(self):
        return {"importance": self.settings.importance, "projection": self.settings.projection,
                "ranks": {t.name: r for t, r in zip(self.targets, self.ranks)},
                "max_ranks": {t.name: max_rank(*t.param.shape) for t in self.targets}}

