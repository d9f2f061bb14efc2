"""`AcceleratePruningHook`: gradual pruning in a hand-written Accelerate loop.

Add three lines to an ordinary loop; its body does not change::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    hook = AcceleratePruningHook(PruningConfig(final_sparsity=0.5), total_steps=num_optimizer_steps)
    hook.register(accelerator, model, optimizer)       # after prepare, before load_state
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    hook.finalize()                                    # then unwrap_model(model).save_pretrained(...)

How it works. ``register`` builds a core `Pruner` and attaches it as step
hooks of the *torch* optimizer inside the ``AcceleratedOptimizer``. That inner
step runs only when Accelerate really updates the weights:

* on gradient-accumulation micro-steps ``AcceleratedOptimizer.step`` does not
  call it (``gradient_state.sync_gradients`` is False);
* with fp16 and a ``GradScaler`` it is called by ``scaler.step`` after
  ``unscale_``, so the pruner sees unscaled gradients, and not at all on the
  steps the scaler skips for inf/NaN gradients. (Fused optimizers unscale and
  skip inside their own step, which the scaler calls anyway: the pruner reads
  their ``grad_scale``/``found_inf`` and skips those steps too.)

So the schedule (``start_step``, ``end_step``, fractions of ``total_steps``)
counts optimizer steps actually taken. ``accelerator.backward`` divides the
loss by ``gradient_accumulation_steps``: the saliency sees the accumulated
mean gradient, which ranks weights the same way.

Checkpoints: ``register`` calls ``accelerator.register_for_checkpointing(hook)``,
so ``accelerator.save_state()`` stores masks, saliency buffers and counters
(``custom_checkpoint_<i>.pkl``, written by the main process; it holds only
tensors, numbers, strings, lists and dicts, so it also loads with
``torch.load(weights_only=True)``) and ``accelerator.load_state()`` restores
them: a resumed run continues exactly. Call ``register`` before
``load_state``, in the same order relative to other registered objects.

Several processes (DDP, ``accelerate launch --multi_gpu``): gradients are
all-reduced before the inner step and masks are broadcast from rank 0 at every
mask update (``PruningConfig.sync_masks``), so every rank holds the same masks.

Sharded setups:

* FSDP2 that you apply yourself (``torch.distributed.fsdp.fully_shard``, on every
  rank, before building the optimizer): supported with ``Accelerator(cpu=True)`` or
  any backend whose Accelerate state is not ``FSDP``. Pass only the optimizer (and
  dataloader, scheduler) to ``accelerator.prepare``, not the model: Accelerate would
  wrap it in DDP, which fails on DTensor parameters. The pruner works on each rank's
  rows (exact global selection, :mod:`prune_callbacks.methods.sharding`);
  ``report()``, ``finalize()`` and the tracker logging are collective, so every rank
  calls them (the hook computes the figures on every rank at each ``log_every`` step).
  ``accelerator.save_state`` / ``load_state`` write / read the pruning state with
  ``torch.distributed.checkpoint`` in ``<dir>/pruning_dcp`` (every rank its rows;
  `prune_callbacks.engine.sharded_state`); your model and optimizer shards need DCP
  too (``get_state_dict`` / ``set_state_dict``), since ``save_state`` does not know a
  model it did not prepare. ``finalize(slim=...)`` / ``save_sparse_to`` are refused:
  gather the full state dict and export on rank 0 (docs/sharded-training.md).
* Accelerate's FSDP plugin (``DistributedType.FSDP``, either version): refused; it
  is not wired and cannot run on CPU (Accelerate 1.16 enables it for GPU-type
  backends only), see `check_accelerator_supported`. FSDP1 flat parameters, tensor
  parallelism and HSDP meshes are refused by the `Pruner` with their reasons.
* DeepSpeed, every ZeRO stage: refused as well. Stage 3 shards parameters;
  at stages 1 and 2 the DeepSpeed engine steps its own optimizer over
  flattened fp32 master partitions (the ``optimizer.step()`` of the loop is a
  no-op), so masks written into the model's weights would be overwritten by
  the master copy, and the hooks would not see the model's parameters. This
  has not been verified against a DeepSpeed install, so it is not offered.
* Megatron-LM: refused (it owns the optimizer and shards weights).
* Supported: a single process and DDP (``--multi_gpu``), with or without
  gradient accumulation and bf16/fp16 mixed precision, and FSDP2 as above. Tested on CPU: single
  process, 2-process DDP over gloo, bf16 autocast, accelerate's fp16
  GradScaler code path driven by ``torch.amp.GradScaler("cpu")``, and 2 FSDP2 ranks
  over gloo (``tests/test_fsdp2.py``). Not run in this project's tests: CUDA/NCCL,
  fp16 autocast on GPU, XLA/TPU.

Run length: ``total_steps`` is what fractional ``start_step`` / ``end_step``
resolve against. Give it, or give ``register(..., train_dataloader=loader,
num_epochs=n)`` with the *prepared* loader and the hook counts it
(`count_optimizer_steps`: batches per process, accumulation, epochs). If more
optimizer steps happen than ``total_steps``, the hook warns once, with the
numbers (the schedule had ended early).

Accuracy guard (``PruningConfig(accuracy_guard=...)``): pass ``register(..., evaluate=fn)``;
baseline, evaluations and the final check are run by :mod:`.accelerate_guard`.

Trackers: when the user has trackers (``Accelerator(log_with=...)`` and
``init_trackers``), the figures of :mod:`prune_callbacks.core.figures` (the same
keys the Trainer callbacks log: ``sparsity/global``, ``sparsity/scheduled``,
``sparsity/masks_target``, ``sparsity/<layer kind>``, ``pruning/*``) go to
``accelerator.log`` every ``log_every`` optimizer steps and at ``finalize``,
from the main process, with ``step`` = the number of optimizer steps taken.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from prune_callbacks.core import figures as F
from prune_callbacks.engine.pruner import Pruner, _torch_optimizer
from prune_callbacks.integrations.configs import ConfigLike, as_list, make_configs
from prune_callbacks.integrations.accelerate.guard import STATE_KEY, GuardWiring
from prune_callbacks.engine.sharded_state import load_sharded_state, save_sharded_state
from prune_callbacks.integrations.accelerate.support import check_accelerator_supported, count_optimizer_steps

__all__ = ["AcceleratePruningHook", "check_accelerator_supported", "count_optimizer_steps"]


#: the folder of ``accelerator.save_state``'s output where an FSDP2-sharded pruning state goes (DCP)
PRUNING_DCP_DIR = "pruning_dcp"


def _dcp(output_dir: str) -> str:
    import os

    return os.path.join(output_dir, PRUNING_DCP_DIR)


class AcceleratePruningHook:
    """Prunes the model of a hand-written Accelerate loop; the loop body needs no pruning calls.

    Args:
        config: a `PruningConfig`, a dict, a list of them (several configs in one
            run, passed to ``Pruner(model, [...])``) or a YAML file (read like
            ``prune-callbacks validate`` reads it); ``**overrides`` replace fields
            of a single config.
        total_steps: optimizer steps of the whole run (needed when the config
            uses fractional steps); see `count_optimizer_steps`. Can also be
            given to ``register``, or counted there from the prepared dataloader.
        log_every: log sparsity to the accelerator's trackers every this many
            optimizer steps (0 or None: only at ``finalize``). Nothing is
            logged, and nothing computed for it, when there are no trackers.
        log_prefix: prepended to the :mod:`prune_callbacks.core.figures` keys (default none).

    Supported: single process, DDP (``--multi_gpu``, also on CPU), bf16/fp16
    mixed precision, gradient accumulation, ``save_state``/``load_state``
    (register before ``load_state``). The schedule counts optimizer steps
    really taken: accumulation micro-steps and fp16 overflow steps don't count.
    FSDP2 applied by you (``fully_shard``; the model not passed to ``prepare``) is
    supported. Refused at ``register`` with ``NotImplementedError``: Accelerate's FSDP
    plugin, DeepSpeed (all ZeRO stages), Megatron-LM, tensor parallelism, FSDP1 flat
    parameters. See the module docstring.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        total_steps: Optional[int] = None,
        log_every: Optional[int] = 10,
        log_prefix: str = "",
        **overrides,
    ):
        self.config = make_configs(config, overrides)
        self.configs = as_list(self.config)
        if total_steps is not None:
            self._resolve(total_steps)  # fail early, before prepare() work is wasted on a bad schedule
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0):
            raise ValueError(f"log_every={log_every!r} is invalid: give an int >= 0 (0 or None: log only at finalize)")
        self.total_steps = total_steps
        self.log_every = log_every or 0
        self.log_prefix = log_prefix
        self.accelerator: Any = None
        self.pruner: Optional[Pruner] = None
        self._log_handle = None
        self._last_logged = -1
        self._warned_overrun = False
        self._guard = None  # GuardWiring when a config has accuracy_guard

    def _resolve(self, total_steps: int) -> None:
        for config in self.configs:
            resolve = getattr(config, "resolve", None) or config.resolve_ramp  # PruningConfig / L1Config
            resolve(total_steps)

    # ------------------------------------------------------------ wiring
    def register(self, accelerator: Any, model: nn.Module, optimizer: Any, *, total_steps: Optional[int] = None,
                 train_dataloader: Any = None, num_epochs: int = 1, evaluate: Any = None) -> Pruner:
        """Start pruning ``model`` on every real step of ``optimizer``; returns the core `Pruner`.

        ``model`` and ``optimizer`` are those returned by ``accelerator.prepare``.
        ``train_dataloader`` (the prepared one) and ``num_epochs``: when no
        ``total_steps`` is given, count it from them and the accelerator's
        gradient accumulation (`count_optimizer_steps`).
        ``evaluate``: with ``accuracy_guard`` (and only then), a function of no argument returning the
        metrics (a mapping, or one number), called on every process; see
        :mod:`prune_callbacks.integrations.accelerate.guard` for when it runs.
        Also registers this hook for ``accelerator.save_state``/``load_state``.
        Raises ``NotImplementedError`` for the refused sharded setups (Accelerate's FSDP plugin, DeepSpeed,
        TP, FSDP1); an FSDP2 model you sharded yourself is pruned on each rank's rows, its pruning state
        saved by ``save_state`` through DCP (see the module docstring).
        """
        if self.pruner is not None:
            raise RuntimeError("this AcceleratePruningHook is already registered; create one hook per model")
        guarded = any(getattr(c, "accuracy_guard", None) is not None for c in self.configs)
        if guarded != (evaluate is not None):
            raise ValueError("accuracy_guard needs register(..., evaluate=fn) (fn() returns the metrics)" if guarded else
                             "register(..., evaluate=...) is only used with accuracy_guard, which no config sets")
        check_accelerator_supported(accelerator)
        if total_steps is not None:
            self.total_steps = total_steps
        elif self.total_steps is None and train_dataloader is not None:
            accumulation = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
            self.total_steps = count_optimizer_steps(len(train_dataloader), accumulation, num_epochs)
        pruner = Pruner(model, self.config, total_steps=self.total_steps)  # refuses shardings it cannot follow
        from accelerate.optimizer import AcceleratedOptimizer

        if not isinstance(optimizer, AcceleratedOptimizer):
            raise TypeError(
                f"register() needs the optimizer returned by accelerator.prepare(...), got {type(optimizer).__name__}: "
                "a bare torch optimizer would let the pruner act on gradient-accumulation micro-steps"
            )
        if pruner.sharded and guarded:
            raise NotImplementedError(
                "accuracy_guard in AcceleratePruningHook with an FSDP2-sharded model: not wired (the guard's checkpoint "
                "state is per rank and save_state would keep rank 0's); run without accuracy_guard, or drive the "
                "Pruner and its guard (prune_callbacks.controllers.guard) in a plain torch loop")
        pruner.attach(optimizer)
        if guarded:
            self._guard = GuardWiring(pruner, optimizer, evaluate)
        self.accelerator = accelerator
        self.pruner = pruner
        # Registered after the pruner's own hooks, so it runs after masks are updated.
        self._log_handle = _torch_optimizer(optimizer).register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        if pruner.sharded:  # each rank holds its rows: DCP, every rank (a custom object is saved by rank 0 only)
            accelerator.register_save_state_pre_hook(lambda models, weights, out: save_sharded_state(pruner, _dcp(out)))
            accelerator.register_load_state_pre_hook(lambda models, path: load_sharded_state(pruner, _dcp(path)))
        else:
            accelerator.register_for_checkpointing(self)
        return pruner

    def set_total_steps(self, total_steps: int) -> None:
        """Change the run length (e.g. once the dataloader is prepared); fractional steps are re-resolved."""
        if self.pruner is not None:
            self.pruner.set_total_steps(total_steps)
        else:
            self._resolve(total_steps)
        self.total_steps = total_steps
        self._warned_overrun = False

    def _require_pruner(self) -> Pruner:
        if self.pruner is None:
            raise RuntimeError("call hook.register(accelerator, model, optimizer) after accelerator.prepare(...) first")
        return self.pruner

    # ------------------------------------------------------------ logging
    def _has_trackers(self) -> bool:
        acc = self.accelerator
        return bool(getattr(acc, "trackers", None)) and bool(getattr(acc, "is_main_process", True))

    def _after_step(self) -> None:
        pruner = self.pruner
        if pruner is None:
            return
        if self.total_steps is not None and pruner.step > self.total_steps and not self._warned_overrun:
            self._warned_overrun = True
            warnings.warn(
                f"optimizer step {pruner.step} is beyond total_steps={self.total_steps}: the pruning schedule was "
                f"resolved for {self.total_steps} steps and ended early. Count the steps from the prepared dataloader "
                f"(count_optimizer_steps(len(loader), gradient_accumulation_steps={getattr(self.accelerator, 'gradient_accumulation_steps', '?')}, "
                "epochs), or register(..., train_dataloader=loader, num_epochs=n)) and pass that as total_steps",
                stacklevel=2,
            )
        if self._guard is not None:
            self._guard.after_step()
        if not self.log_every or pruner.step == self._last_logged or pruner.step % self.log_every:
            return
        self._log()

    def log_values(self) -> dict:
        """The figures sent to trackers (:mod:`prune_callbacks.core.figures`), each key with ``log_prefix`` first."""
        values = F.sparsity_figures(self._require_pruner().report())
        if self._guard is not None:
            values.update(self._guard.figures())
        return {f"{self.log_prefix}{k}": v for k, v in values.items()}

    def _log(self) -> None:
        sharded = self.pruner.sharded  # report() is collective: every rank computes the figures, rank 0 logs them
        if not sharded and not self._has_trackers():
            return
        self._last_logged = self.pruner.step
        values = self.log_values()
        if self._has_trackers():
            self.accelerator.log(values, step=self.pruner.step)

    # ------------------------------------------------------------ results
    def report(self) -> dict:
        """`Pruner.report()`: global and per-target sparsity, step, counters (+ ``accuracy_guard``: trajectories)."""
        report = self._require_pruner().report()
        if self._guard is not None:
            report["accuracy_guard"] = self._guard.report()
        return report

    def finalize(self, *, save_sparse_to: Optional[str] = None, tokenizer: Any = None, slim: bool = False) -> dict:
        """Make the masks permanent (pruned weights are +0.0), stop pruning, log and return the final report.

        Afterwards ``accelerator.unwrap_model(model).save_pretrained(...)`` saves
        an ordinary model. ``save_sparse_to``: also write the compressed sparse
        checkpoint there (`prune_callbacks.export.sparse_io.save_sparse`, main process
        only, then all processes wait). Calling it again returns the report and
        does nothing else (but still saves when asked). ``slim``: export the compact form in place
        (`prune_callbacks.integrations.exporting.export_model`, each granularity's ``export_as``; the
        report gains each export's summary under its name): structured units are cut out and the
        config rewritten (``report["slim"]``; ``save_pretrained`` then writes a smaller ordinary
        model), ``low_rank`` Linears are factorised into two thin Linears (``report["low_rank"]``:
        parameters and bytes before / after, ranks); save that model with
        ``prune_callbacks.export.low_rank.save_low_rank(accelerator.unwrap_model(model), out, tokenizer)``
        (its ``save_pretrained`` and ``save_sparse_to`` refuse it, since plain ``from_pretrained``
        cannot rebuild it). Call it once the optimizer is done (it still holds the old parameters).
        The pruner holds the unwrapped model, so a DDP-wrapped loop model is changed in place too
        (``accelerator.unwrap_model(model)`` is the exported model; the wrapper's gradient buckets
        still refer to the old parameters: do not train through it afterwards). Every rank exports
        (the masks are identical on every rank). ``ValueError``: ``slim`` with no granularity that
        has a compact form.
        """
        if self._require_pruner().sharded and (slim or save_sparse_to is not None):
            raise ValueError(
                f"finalize(slim={slim!r}, save_sparse_to={save_sparse_to!r}) with an FSDP2-sharded model: each rank "
                "holds only rows of every weight. Call finalize() (allowed: slim=False, save_sparse_to=None), gather "
                "the full state dict (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))) "
                "and slim / save_sparse an unsharded model on rank 0 (docs/sharded-training.md)"
            )
        report = self._finalize_pruner()
        if slim:
            from prune_callbacks.integrations.exporting import export_model

            report.update(export_model(self.pruner.model, self.pruner, log=self.accelerator.is_main_process))
        if save_sparse_to is not None:
            from prune_callbacks.integrations.exporting import factorised_save_problem

            problem = factorised_save_problem(self.pruner.model)
            if problem is not None:
                raise ValueError(f"save_sparse_to={str(save_sparse_to)!r}: {problem}")
            if self.accelerator.is_main_process:
                from prune_callbacks.export.sparse_io import save_sparse

                save_sparse(self.pruner.model, save_sparse_to, tokenizer=tokenizer)
            self.accelerator.wait_for_everyone()
        return report

    def _finalize_pruner(self) -> dict:
        pruner = self._require_pruner()
        if not pruner.finalized:
            if self._log_handle is not None:
                self._log_handle.remove()
                self._log_handle = None
            if self._guard is not None:
                self._guard.final_check()  # at the final sparsity; rolls back to the last good masks if it fails
            pruner.finalize()
            # a run that ends below final_sparsity is warned about by Pruner.finalize, with the reason
            if pruner.step != self._last_logged:
                self._log()
        return self.report()

    # ------------------------------------------------------------ checkpointing (accelerator.save_state)
    def state_dict(self) -> dict:
        """`Pruner.state_dict()` (+ the guards' under ``accuracy_guard``): tensors, numbers, strings, lists, dicts,
        bools, None (weights_only-safe)."""
        state = self._require_pruner().state_dict()
        if self._guard is not None:
            state[STATE_KEY] = self._guard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        guard_state = state.pop(STATE_KEY, None)
        self._require_pruner().load_state_dict(state)
        if self._guard is not None:
            self._guard.load_state_dict(guard_state)
        self._last_logged = self.pruner.step
