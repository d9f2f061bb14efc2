"""Units: importance of each attention head and FFN neuron (saliency summed over the weights that
belong to it), near-duplicate heads (cosine similarity of their contributions to the residual
stream on calibration tokens), and near-duplicate weight matrices / rows across layers."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from prune_callbacks.core.report import group_name
from prune_callbacks.core.targets import is_transposed as _transposed
from prune_callbacks.analysis.architecture import ModelMap


def head_importance(mm: ModelMap, modules: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor]) -> dict:
    """``{attention name: [importance of query head 0, 1, ...]}``: the saliency summed over the slices of the
    tensors one head spans (`unit_map`'s KV groups, split per query head; a K/V head's score is shared by the
    query heads that read it)."""
    out = {}
    rep = mm.num_heads // max(1, mm.num_kv_heads)
    for group in mm.heads:
        values = torch.zeros(group.n_units, rep, dtype=torch.float64)
        for span in group.spans:
            if span.param_name != "weight" or span.module not in scores:
                continue
            for seg, view in span.segment_views(scores[span.module].double(), group.n_units):
                per = view.sum(-1)  # [kv, size]
                if seg.heads > 1:
                    values += per.reshape(group.n_units, seg.heads, -1).sum(-1)
                else:
                    values += per.sum(-1, keepdim=True) / rep
        out[mm.attention_name(group)] = [float(v) for v in values.reshape(-1)]
    return out


def neuron_importance(mm: ModelMap, modules: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor]) -> dict:
    """``{block name: tensor of per-neuron importance}``: the saliency summed over the slices of the tensors one
    FFN neuron spans (`unit_map`: input-projection rows, both halves of a fused one, output-projection columns)."""
    out = {}
    for group in mm.ffn:
        total = None
        for span in group.spans:
            if span.param_name == "weight" and span.module in scores:
                s = span.unit_view(scores[span.module], group.n_units).sum(1)
                total = s if total is None else total + s
        if total is not None:
            out[group.block] = total
    return out


class HeadOutputs:
    """Forward pre-hooks on each output projection; accumulate the Gram matrix of every head's contribution
    (its slice of the projection input times its slice of the projection weight) over the selected tokens."""

    def __init__(self, mm: ModelMap, modules: Mapping[str, nn.Module], max_tokens: int = 256):
        self.mm, self.modules, self.max_tokens = mm, modules, max_tokens
        # (attention name, output projection): the o span of each head group
        self.layers = [(mm.attention_name(g), next(s.module for s in g.spans if s.param_name == "weight"
                                                   and s.dim == (0 if _transposed(modules[s.module]) else 1)
                                                   and s.param.dim() == 2))
                       for g in mm.heads] if mm.num_heads and mm.head_dim else []
        self.names = [f"{name}.head{h}" for name, _ in self.layers for h in range(mm.num_heads)]
        self.gram: Optional[torch.Tensor] = None
        self.tokens = 0
        self._current: dict[str, torch.Tensor] = {}
        self._handles = []
        self.token_index: Optional[torch.Tensor] = None

    def __enter__(self):
        for _, out in self.layers:
            self._handles.append(self.modules[out].register_forward_pre_hook(self._hook(out)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            self._current[name] = x.reshape(-1, x.shape[-1])
        return hook

    def select(self, mask: Optional[torch.Tensor], n_tokens: int) -> None:
        """Tokens of the next forward pass to use: real (unpadded) ones, evenly thinned to max_tokens."""
        index = torch.arange(n_tokens) if mask is None else mask.reshape(-1).nonzero().flatten()
        if index.numel() > self.max_tokens:
            index = index[torch.linspace(0, index.numel() - 1, self.max_tokens).long()]
        self.token_index = index

    def accumulate(self) -> None:
        if not self.layers or not self._current:
            return
        h, d = self.mm.num_heads, self.mm.head_dim
        rows = []
        for _, out in self.layers:
            x = self._current[out]
            index = self.token_index.to(x.device) if self.token_index is not None else None
            x = (x if index is None else x[index]).double()
            w = self.modules[out].weight.detach().double()
            for head in range(h):
                part = x[:, head * d:(head + 1) * d]
                transposed = _transposed(self.modules[out])
                wo = w[head * d:(head + 1) * d, :] if transposed else w[:, head * d:(head + 1) * d].T
                rows.append((part @ wo).flatten())
        stacked = torch.stack(rows)
        g = stacked @ stacked.T
        self.gram = g if self.gram is None else self.gram + g
        self.tokens += int(x.shape[0])
        self._current.clear()

    def similarity(self) -> Optional[torch.Tensor]:
        if self.gram is None:
            return None
        norm = self.gram.diagonal().clamp_min(1e-30).sqrt()
        return (self.gram / norm[:, None] / norm[None, :]).float()


def duplicate_heads(names: list[str], sim: Optional[torch.Tensor], threshold: float = 0.95) -> list[dict]:
    if sim is None:
        return []
    pairs = []
    n = len(names)
    for i in range(n):
        for j in range(i + 1, n):
            if float(sim[i, j]) >= threshold:
                pairs.append({"a": names[i], "b": names[j], "cosine": round(float(sim[i, j]), 4)})
    return sorted(pairs, key=lambda p: -p["cosine"])


def duplicate_weights(weights: Mapping[str, torch.Tensor], threshold: float = 0.95, max_rows: int = 12288) -> dict:
    """Per layer kind: pairs of whole matrices with cosine >= threshold, and the share of rows whose closest
    other row (same kind, any layer, itself excluded) has cosine >= threshold. Above ``max_rows`` rows
    per kind the rows are evenly thinned (stated in the result)."""
    kinds: dict[str, list[str]] = {}
    for name in weights:
        kinds.setdefault(group_name(name), []).append(name)
    out = {}
    for kind, names in kinds.items():
        mats = [weights[n].detach().float() for n in names]
        pairs = []
        same = [i for i in range(len(mats)) if mats[i].shape == mats[0].shape]
        if len(same) > 1:
            flat = torch.stack([mats[i].flatten() for i in same])
            flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = flat @ flat.T
            for a in range(len(same)):
                for b in range(a + 1, len(same)):
                    if float(cos[a, b]) >= threshold:
                        pairs.append({"a": names[same[a]], "b": names[same[b]], "cosine": round(float(cos[a, b]), 4)})
        rows = torch.cat([mats[i] for i in same])
        owner = torch.cat([torch.full((mats[i].shape[0],), k) for k, i in enumerate(same)])
        thinned = rows.shape[0] > max_rows
        if thinned:
            keep = torch.linspace(0, rows.shape[0] - 1, max_rows).long()
            rows, owner = rows[keep], owner[keep]
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        near = cross = 0
        for start in range(0, rows.shape[0], 2048):
            block = rows[start:start + 2048] @ rows.T
            idx = torch.arange(start, start + block.shape[0])
            block[torch.arange(block.shape[0]), idx] = -2.0
            best, where = block.max(dim=1)
            hit = best >= threshold
            near += int(hit.sum())
            cross += int((hit & (owner[where] != owner[idx])).sum())
        out[kind] = {"matrices": len(names), "duplicate_matrices": pairs, "rows_checked": int(rows.shape[0]),
                     "rows_thinned": thinned, "near_duplicate_rows": near, "near_duplicate_rows_across_layers": cross,
                     "near_duplicate_row_share": near / rows.shape[0] if rows.shape[0] else 0.0}
    return out
