"""Units: importance of each attention head and FFN neuron (saliency summed over the weights that
belong to it), near-duplicate heads (cosine similarity of their contributions to the residual
stream on calibration tokens), and near-duplicate weight matrices / rows across layers."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..report import group_name
from .architecture import ModelMap, is_conv1d


def _slice_sum(score: torch.Tensor, conv1d: bool, along_out: bool, start: int, stop: int) -> float:
    """Sum of a weight's scores over output units [start, stop) (along_out) or input units."""
    # nn.Linear weight: (out, in); Conv1D: (in, out)
    dim = (1 if conv1d else 0) if along_out else (0 if conv1d else 1)
    return float(score.narrow(dim, start, stop - start).sum())


def head_importance(mm: ModelMap, modules: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor]) -> dict:
    """``{block name: [importance of head 0, 1, ...]}`` from q/k/v rows and output-projection columns."""
    h, kv, d = mm.num_heads, mm.num_kv_heads or mm.num_heads, mm.head_dim
    out = {}
    if not (h and d):
        return out
    for b in mm.blocks:
        if b.attn_out is None:
            continue
        values = [0.0] * h
        for head in range(h):
            kv_head = head // max(1, h // kv)
            share = kv / h  # a kv head's score is shared by the query heads that read it
            for i, name in enumerate(b.attn_in):
                if name not in scores:
                    continue
                conv = is_conv1d(modules[name])
                if len(b.attn_in) == 1:  # fused qkv: q | k | v blocks of h*d outputs
                    for part in range(3):
                        values[head] += _slice_sum(scores[name], conv, True, part * h * d + head * d,
                                                   part * h * d + (head + 1) * d)
                elif i == 0:
                    values[head] += _slice_sum(scores[name], conv, True, head * d, (head + 1) * d)
                else:
                    values[head] += share * _slice_sum(scores[name], conv, True, kv_head * d, (kv_head + 1) * d)
            if b.attn_out in scores:
                values[head] += _slice_sum(scores[b.attn_out], is_conv1d(modules[b.attn_out]), False,
                                           head * d, (head + 1) * d)
        out[b.name] = values
    return out


def neuron_importance(mm: ModelMap, modules: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor]) -> dict:
    """``{block name: tensor of per-neuron importance}`` (input-projection rows + output-projection columns)."""
    out = {}
    for b in mm.blocks:
        if b.ffn_out is None:
            continue
        total = None
        for name in b.ffn_in:
            if name in scores:
                s = scores[name].sum(0 if is_conv1d(modules[name]) else 1)
                total = s if total is None else total + s
        if b.ffn_out in scores:
            s = scores[b.ffn_out].sum(1 if is_conv1d(modules[b.ffn_out]) else 0)
            total = s if total is None else total + s
        if total is not None:
            out[b.name] = total
    return out


class HeadOutputs:
    """Forward pre-hooks on each output projection; accumulate the Gram matrix of every head's contribution
    (its slice of the projection input times its slice of the projection weight) over the selected tokens."""

    def __init__(self, mm: ModelMap, modules: Mapping[str, nn.Module], max_tokens: int = 256):
        self.mm, self.modules, self.max_tokens = mm, modules, max_tokens
        self.layers = [b for b in mm.blocks if b.attn_out is not None] if mm.num_heads and mm.head_dim else []
        self.names = [f"{b.name}.head{h}" for b in self.layers for h in range(mm.num_heads)]
        self.gram: Optional[torch.Tensor] = None
        self.tokens = 0
        self._current: dict[str, torch.Tensor] = {}
        self._handles = []
        self.token_index: Optional[torch.Tensor] = None

    def __enter__(self):
        for b in self.layers:
            self._handles.append(self.modules[b.attn_out].register_forward_pre_hook(self._hook(b.attn_out)))
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
        for b in self.layers:
            x = self._current[b.attn_out]
            index = self.token_index.to(x.device) if self.token_index is not None else None
            x = (x if index is None else x[index]).double()
            w = self.modules[b.attn_out].weight.detach().double()
            for head in range(h):
                part = x[:, head * d:(head + 1) * d]
                wo = w[head * d:(head + 1) * d, :] if is_conv1d(self.modules[b.attn_out]) else w[:, head * d:(head + 1) * d].T
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
