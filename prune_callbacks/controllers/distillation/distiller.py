"""`Distiller`: puts the distillation term into the student's own ``outputs.loss``.

How the term reaches the loss without a Trainer subclass or a changed loop: the
student's ``forward`` is replaced *on the instance* (the class and any earlier
instance-level forward, such as Accelerate's autocast wrapper, are kept and
called). In training mode, when called with ``labels`` and once a teacher
exists, the patched forward

1. runs the student as before (task loss ``outputs.loss``, ``outputs.logits``);
2. runs the teacher on the same inputs under ``torch.no_grad()``;
3. returns the same outputs with ``loss = hardness * KD + (1 - hardness) * task
   (+ hidden_weight * hidden)``.

Everything that calls ``model(**batch)`` then trains on that loss: the HF
Trainer's ``compute_loss`` (it reads ``outputs["loss"]``; a ``num_items_in_batch``
it passes is used for the KD divisor of token-level logits, exactly like the
causal-LM task loss, so gradient accumulation scales both terms the same), a
hand-written Accelerate loop, DDP (``DistributedDataParallel.forward`` calls the
module, so the patched forward runs inside it; the teacher is a separate frozen
copy in every process, outside DDP's buckets). In eval mode, without labels or
before a ``"before_pruning"`` teacher exists, the forward is the original one.
`detach` restores the original forward.

Figures: running means since the last `figures` call of ``distill/kd_loss``,
``distill/task_loss`` (and ``distill/hidden_loss``), per process, each at the
per-example / per-token mean scale whatever the accumulation.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from prune_callbacks.core.figures import distill_key
from prune_callbacks.core.targets import unwrap_model
from prune_callbacks.controllers.distillation import teacher as teacher_lib
from prune_callbacks.controllers.distillation.config import DistillationConfig
from prune_callbacks.controllers.distillation.losses import hidden_loss, kd_loss, token_mask

logger = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Causal LMs predict token t+1 at position t: their KD mask is shifted like their labels."""
    return type(unwrap_model(model)).__name__.endswith(_CAUSAL_SUFFIXES)


class Distiller:
    """Owns the teacher and the forward patch of one student."""

    def __init__(self, config: DistillationConfig):
        self.config = config
        self.teacher: Optional[nn.Module] = None
        self.teacher_step: Optional[int] = None  # optimizer step a "self" teacher was copied after
        self.model: Optional[nn.Module] = None
        self._own_forward: Any = None  # an instance-level forward that was there before the patch
        self._had_own_forward = False
        self._shift = False
        self._reset_figures()

    # ------------------------------------------------------------ teacher
    def set_teacher(self, teacher: Optional[nn.Module], step: Optional[int] = None) -> None:
        if teacher is not None and self.model is not None:
            teacher_lib.check_compatible(self.model, teacher, hidden=self.config.hidden_weight > 0)
        self.teacher, self.teacher_step = teacher, step

    def take_snapshot(self, step: int) -> nn.Module:
        """Copy the student as it is now into a frozen teacher (``"self"`` teacher)."""
        if self.model is None:
            raise RuntimeError("attach(model) before taking a teacher snapshot")
        self.set_teacher(teacher_lib.snapshot(self.model, self.config.teacher_dtype), step)
        logger.info("prune_callbacks: distillation teacher copied from the model after step %d (%.1f MB)", step,
                    teacher_lib.module_bytes(self.teacher) / 2**20)
        return self.teacher

    def teacher_bytes(self) -> int:
        return teacher_lib.module_bytes(self.teacher) if self.teacher is not None else 0

    # ------------------------------------------------------------ patch
    @property
    def attached(self) -> bool:
        return self.model is not None

    def attach(self, model: nn.Module) -> "Distiller":
        """Patch ``forward`` of the unwrapped ``model``; resolves a path / module / train-begin teacher
        (unless one is set already) and checks it before any compute."""
        bare = unwrap_model(model)
        if self.model is bare:
            return self
        if self.model is not None:
            raise RuntimeError("this Distiller is attached to another model; detach() it first")
        if getattr(bare.__dict__.get("forward"), "_prune_callbacks_distiller", None) is not None:
            raise RuntimeError("this model's forward is already patched by another Distiller")
        if self.teacher is None:
            self.set_teacher(teacher_lib.resolve(self.config, bare), 0 if self.config.self_teacher else None)
        else:
            teacher_lib.check_compatible(bare, self.teacher, hidden=self.config.hidden_weight > 0)
        self._had_own_forward = "forward" in bare.__dict__
        self._own_forward = bare.__dict__.get("forward")
        original = bare.forward  # bound method of the class, or the instance-level wrapper
        self._shift = is_causal_lm(bare)

        def forward(*args, **kwargs):
            return self._forward(original, *args, **kwargs)

        forward._prune_callbacks_distiller = self
        forward.__wrapped__ = original
        bare.forward = forward
        self.model = bare
        return self

    def detach(self) -> None:
        """Restore the student's original forward (the teacher is kept)."""
        bare, self.model = self.model, None
        if bare is None:
            return
        if self._had_own_forward:
            bare.forward = self._own_forward
        else:
            bare.__dict__.pop("forward", None)
        self._own_forward, self._had_own_forward = None, False

    # ------------------------------------------------------------ the loss
    def _forward(self, original, *args, **kwargs):
        labels = kwargs.get("labels")
        if self.teacher is None or labels is None or not self.model.training:
            return original(*args, **kwargs)
        cfg = self.config
        want_hidden = cfg.hidden_weight > 0
        student_kwargs = dict(kwargs)
        if want_hidden:
            student_kwargs["output_hidden_states"] = True
        outputs = original(*args, **student_kwargs)
        task = _get(outputs, "loss", 0)
        logits = _get(outputs, "logits", 1 if task is not None else 0)
        teacher_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}
        if want_hidden:
            teacher_kwargs["output_hidden_states"] = True
        with torch.no_grad():
            t_out = self.teacher(*args, **teacher_kwargs)
        t_logits = _get(t_out, "logits", 0)
        mask = token_mask(logits, labels, kwargs.get("attention_mask"), shift=self._shift)
        items = kwargs.get("num_items_in_batch") if logits.dim() == 3 else None
        kd = kd_loss(logits, t_logits, temperature=cfg.temperature, mask=mask, num_items_in_batch=items)
        loss = cfg.hardness * kd
        if task is not None and cfg.hardness < 1:
            loss = loss + (1 - cfg.hardness) * task
        hid = None
        if want_hidden:
            hid = hidden_loss(_get(outputs, "hidden_states", None), _get(t_out, "hidden_states", None),
                              mask=mask if mask is not None else _attention(kwargs))
            if items is not None and mask is not None:  # share of this micro-batch in the accumulated batch
                hid = hid * (mask.sum() / items)
            loss = loss + cfg.hidden_weight * hid
        self._record(kd, task, hid, local=None if items is None or mask is None else mask.sum() / items)
        return _set_loss(outputs, loss)

    # ------------------------------------------------------------ figures
    def _reset_figures(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    @torch.no_grad()
    def _record(self, kd, task, hid, local) -> None:
        values = {"kd_loss": kd, "task_loss": task, "hidden_loss": hid}
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().float()
            if local is not None and key != "hidden_loss":  # back to the per-token mean of this micro-batch
                value = value / local.clamp_min(1e-12)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1

    def figures(self, reset: bool = True) -> dict[str, float]:
        """``distill/kd_loss``, ``distill/task_loss`` (, ``distill/hidden_loss``): means over the training
        forward passes since the last call (this process). Empty when none ran."""
        if not self._count:
            return {}
        out = {distill_key(k): float(v) / self._count for k, v in self._sums.items()}
        if reset:
            self._reset_figures()
        return out

    # ------------------------------------------------------------ state
    def save(self, path, **meta) -> None:
        """Write the teacher (``"self"`` teacher: it cannot be rebuilt from the pruned student)."""
        teacher_lib.save_teacher(self.teacher, path, meta={"teacher_step": self.teacher_step, **meta})

    def restore(self, student: nn.Module, path) -> None:
        meta = teacher_lib.read_meta(path)
        self.set_teacher(teacher_lib.restore_teacher(student, path), meta.get("teacher_step"))


def _attention(kwargs):
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) else None


def _get(outputs, key: str, index: Optional[int]):
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if key in outputs.keys():
            return outputs[key]
        return None
    if isinstance(outputs, (tuple, list)) and index is not None and index < len(outputs):
        return outputs[index]
    return getattr(outputs, key, None)


def _set_loss(outputs, loss):
    if isinstance(outputs, (tuple, list)):  # return_dict=False: (loss, logits, ...)
        return (loss, *outputs[1:])
    outputs["loss"] = loss
    return outputs
