"""The baseline probe of a sequence classifier whose head is random after loading.

Only the head is fitted (logistic regression, LBFGS) on calibration features, so the metrics
``analyze`` quotes (baseline, metric with a block skipped) mean something. Which features: the
pooling the encoder was *trained* for. A sentence-transformers checkpoint (``modules.json`` +
``1_Pooling/config.json`` next to the weights, e.g. all-MiniLM-L6-v2) was trained for the masked
mean of the last hidden state; its [CLS] pooler output is untuned and a probe on it stays near
chance. There the model is wrapped in :class:`MeanPooled` (same module names, so targets, blocks
and reports are unchanged) and analysed through it. Any other model keeps its own head path.

Pure torch: the pooling config is read as JSON from the folder in ``config._name_or_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn


class _Output:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


def classifier_head(model: nn.Module) -> Optional[tuple[str, nn.Linear]]:
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return name, head
    return None


def trained_pooling(model: nn.Module) -> tuple[str, str]:
    """``(pooling, why)``: ``"mean"`` where the checkpoint's sentence-transformers pooling config says mean
    tokens, else ``"model"`` (the model's own head path, e.g. BERT's [CLS] pooler)."""
    folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not folder or not Path(folder).is_dir():
        return "model", "no checkpoint folder to read a pooling config from: the model's own head path"
    try:
        modules = json.loads((Path(folder) / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((Path(folder) / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return "model", "no sentence-transformers pooling config with the checkpoint: the model's own head path"
    if config.get("pooling_mode_mean_tokens") and not config.get("pooling_mode_cls_token"):
        return "mean", ("the checkpoint is a sentence-transformers model trained for mean pooling "
                        f"({pooling['path']}/config.json: pooling_mode_mean_tokens); its [CLS] pooler is untuned")
    return "model", "the checkpoint's sentence-transformers pooling is not mean pooling: the model's own head path"


class MeanPooled(nn.Module):
    """``model``'s encoder, the masked mean of its last hidden state, then ``model``'s head; ``model(**batch)``
    style output (``.loss`` with ``labels``, ``.logits``). Shares every module with ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        found = classifier_head(model)
        prefix = getattr(model, "base_model_prefix", "")
        if found is None or not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
            raise ValueError("MeanPooled needs a model with base_model_prefix and a Linear classifier / score head")
        self._prefix, self._head = prefix, found[0]
        setattr(self, prefix, getattr(model, prefix))
        setattr(self, found[0], found[1])
        self.config = getattr(model, "config", None)

    def forward(self, labels=None, **inputs):
        hidden = getattr(self, self._prefix)(**inputs)[0]
        mask = inputs.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = getattr(self, self._head)(pooled)
        loss = nn.functional.cross_entropy(logits, labels.reshape(-1)) if labels is not None else None
        return _Output(loss, logits)


def fit_head(model: nn.Module, batches: list[dict], steps: int = 200) -> bool:
    """Fit only the classification head (L2-regularised logistic regression on its input features, LBFGS)."""
    found = classifier_head(model)
    if found is None:
        return False
    head = found[1]
    feats, labels = [], []
    handle = head.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
            labels.append(b["labels"])
    handle.remove()
    x, y = torch.cat(feats).reshape(-1, head.in_features), torch.cat(labels).reshape(-1)
    w = head.weight.detach().clone().requires_grad_(True)
    bias = (head.bias.detach().clone() if head.bias is not None else torch.zeros(head.out_features)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + bias, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(w)
        if head.bias is not None:
            head.bias.copy_(bias)
    return True
