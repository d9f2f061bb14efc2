"""Distillation losses: logit KL with T^2 scaling and the per-block normalised hidden-state MSE.

Both are pure functions of tensors. Logits may be

* classification ``[batch, classes]`` (labels ``[batch]``): mean over examples;
* token level ``[batch, seq, vocab]``: mean over the positions that carry a label
  (``labels != -100``; for causal LMs ``shift=True`` compares position ``t`` with the label
  of token ``t + 1``, as the model's own loss does), else over ``attention_mask``, else all.

``num_items_in_batch`` (what the HF Trainer passes to models that normalise their loss over
the whole accumulated batch) turns the token mean into ``sum / num_items_in_batch``, so the
KD term is scaled exactly like the causal-LM task loss it is mixed with.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_mask(logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None, *, shift: bool = False) -> Optional[torch.Tensor]:
    """Bool ``[batch, seq]`` mask of the positions that count (None = every row counts: classification)."""
    if logits.dim() == 2:
        return None
    b, t = logits.shape[:2]
    if labels is not None and labels.dim() == 2 and labels.shape == (b, t):
        if shift:
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            return mask
        return labels != IGNORE_INDEX
    if attention_mask is not None and attention_mask.shape == (b, t):
        mask = attention_mask.bool()
        if shift:
            mask = mask.clone()
            mask[:, :-1] &= attention_mask[:, 1:].bool()
            mask[:, -1] = False
        return mask
    return torch.ones(b, t, dtype=torch.bool, device=logits.device)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0,
            mask: Optional[torch.Tensor] = None,
            num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per example / token, then averaged.

    Computed in float32 whatever the logits' dtype. ``mask`` selects token positions
    (``[batch, seq]``); ``num_items_in_batch`` replaces the count of selected positions as divisor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must have the same vocabulary / number of labels as the student"
        )
    t = float(temperature)
    s = student_logits.float() / t
    q = teacher_logits.detach().float() / t
    log_p_student = F.log_softmax(s, dim=-1)
    log_p_teacher = F.log_softmax(q, dim=-1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # KL per example / token
    if mask is not None:
        per_row = per_row[mask]
    total = per_row.sum()
    count = num_items_in_batch if num_items_in_batch is not None else per_row.numel()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device, total.dtype)
    return total * (t * t) / (count if count is not None and (not isinstance(count, int) or count > 0) else 1)


def hidden_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], *,
                mask: Optional[torch.Tensor] = None, eps: float = 1e-12) -> torch.Tensor:
    """Mean over blocks of ``sum((t - s)^2) / sum(t^2)`` (masked positions only, float32).

    ``student_states`` / ``teacher_states``: the models' ``hidden_states`` tuples (embeddings
    first, then one per block); the embedding output is skipped. Shapes must match.

    Removed blocks (``granularity="blocks"``): a skipped block passes its input on, so the student
    gives the very same tensor at two or more consecutive indices. Such a run is matched once, at
    its last index: the state entering the next kept block (or the final one) is matched to the
    teacher's state there, so the kept block before the cut learns to produce what the removed
    blocks produced (layer-wise distillation of the cut, as TinyBERT maps a shallow student's
    layers onto a deeper teacher's); matching it at every index would pull one tensor towards two
    different targets.
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"hidden-state loss: the student has {len(student_states)} hidden states, the teacher "
                         f"{len(teacher_states)}: hidden_weight needs the same number of blocks")
    n = len(student_states)
    kept = [k for k in range(1, n) if not (k + 1 < n and student_states[k + 1] is student_states[k])]
    pairs = [(student_states[k], teacher_states[k]) for k in kept] or list(zip(student_states, teacher_states))
    losses = []
    for s, t in pairs:
        if s.shape != t.shape:
            raise ValueError(f"hidden-state loss: student state {tuple(s.shape)} vs teacher {tuple(t.shape)}: "
                             "hidden_weight needs the same hidden size")
        s, t = s.float(), t.detach().float()
        if mask is not None and s.dim() == 3 and mask.shape == s.shape[:2]:
            s, t = s[mask], t[mask]
        losses.append(((t - s) ** 2).sum() / ((t ** 2).sum() + eps))
    return torch.stack(losses).mean()
