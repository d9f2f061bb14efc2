"""Golden hashes: the engine's masks and saliency buffers for a table of runs, bitwise, on any CPU.

Every refactor of the engine must leave these hashes unchanged. A change that is *meant* to
alter behaviour regenerates them explicitly:
``PRUNE_CALLBACKS_WRITE_GOLDEN=1 pytest tests/test_golden.py`` (and says why in the commit).

Why the hashes hold on every machine (the first table hashed short training loops, whose
matmul rounding depends on the CPU: 13 of 15 hashes changed on another CPU):

* **No model computes anything.** Weights and gradients come from seeded *integer* streams
  (``torch.randint``) scaled by powers of two, so they are the same bits everywhere; ``p.grad``
  is set directly, no forward or backward pass runs, no matmul and no reduction sits in the
  hashed path.
* **Only correctly rounded element-wise operations.** ``mul``, ``add``, ``sub``, ``abs``,
  ``softshrink``, comparisons and the exact selections (``kthvalue``, ``argsort``, counts)
  give the same bits on every ATen CPU capability. What could differ is a multiply-add
  that a vectorised kernel fuses (FMA: one rounding) and the scalar kernel does not (two):
  ``lerp`` (the Taylor / PLATON EMAs: ``a + w * (b - a)``) and ``add(alpha=)`` (SGD). Every
  such product here has a power-of-two factor (EMA weights ``1 - beta`` of 1/4 and 1/8, SGD's
  learning rate, momentum's ``1 - dampening = 1`` and weight decay), so the product is exact
  and fused or not the result is the same. That is why the betas below are dyadic (0.75,
  0.875) rather than the defaults (0.85, 0.95) and the optimizer is SGD, not AdamW (whose
  ``addcdiv`` by a non-dyadic step size is such an inexact product). Checked: with the default
  betas, 15 of the 17 gradient-based rows of this table hash differently under
  ``ATEN_CPU_CAPABILITY=default`` than under ``avx512``; with AdamW, 17; as written, none.
* **Structured unit scores are sums** (a unit's per-weight scores added up), which a vectorised
  reduction orders differently per capability. They decide masks only through their order, so
  every structured mask update checks (`_check_margin`) that the units it prunes score below
  the units it keeps by more than any summation order can change (a relative gap of 2e-4 is
  above ``(n - 1) * eps`` for the ~1500 non-negative terms of the largest unit here). A row
  that fails that check needs another seed, not a looser check.
* **Distillation** needs a forward pass (its KD term is a softmax of model logits), whose bits
  depend on the CPU. Its golden row hashes what is platform-stable (the pruner driven by the
  seeded gradients while a `Distiller` is attached, and the frozen teacher snapshot: which step
  it copies and what); the loss itself is compared with a reference path in the same process
  (`test_distillation_matches_reference_in_process`).
* **The accuracy guard** is driven by a scripted metric (a function of the mask sparsity), so
  its decisions, rollbacks and restored weights are exact.

`test_golden_hashes_under_another_cpu_capability` reruns the table in a subprocess under
``ATEN_CPU_CAPABILITY=default`` (no AVX kernels), so every run proves two capability settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TinyLM, tiny_llama_lm
from prune_callbacks import Pruner, PruningConfig

GOLDEN = Path(__file__).with_name("golden_hashes.json")
STEPS = 30
LR = 2.0 ** -4  # SGD: every product with lr, momentum's dampening and weight decay is exact (powers of two)
BETAS = {"taylor": dict(beta=0.75), "platon": dict(beta=0.75, uncertainty_beta=0.875)}  # 1 - beta: 1/4, 1/8
SKIP_AT = {4, 11}  # steps whose gradients are made non-finite (a GradScaler would skip them)
MARGIN = 2e-4  # relative gap between pruned and kept structured unit scores (see the module docstring)


def _config(saliency: str = "taylor", **overrides) -> dict:
    base = dict(final_sparsity=0.75, start_step=3, end_step=24, update_every=3, saliency=saliency)
    base.update(BETAS.get(saliency, {}))
    base.update(overrides)
    return base


def _structured(granularity: str, final_sparsity: float, **overrides) -> dict:
    return _config(granularity=granularity, final_sparsity=final_sparsity, **overrides)


def _nm(pattern: str, **overrides) -> dict:
    cfg = _config(granularity=pattern, **overrides)
    del cfg["final_sparsity"]  # N:M fixes it (1 - N/M)
    return cfg


def _oneshot(start_step: int, **overrides) -> dict:
    cfg = _config(schedule="oneshot", start_step=start_step, **overrides)
    del cfg["end_step"], cfg["update_every"]  # one mask update: no window to end or to update along
    return cfg


LLAMA = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)

#: name -> row: ``configs`` (one PruningConfig's kwargs, or a list for several groups), ``model`` (tiny / llama),
#: and what the loop does differently (``skip``, ``accumulate``, ``resume_at``, ``guard``, ``distill``)
RUNS: dict[str, dict] = {
    **{f"{sal}-{scope}": dict(configs=_config(sal, scope=scope))
       for sal in ("taylor", "platon", "magnitude", "movement") for scope in ("global", "per_layer")},
    "taylor-caps": dict(configs=_config(min_layer_sparsity=0.3, max_layer_sparsity=0.9)),
    "taylor-l1": dict(configs=_config(l1_lambda=0.05, l1_ramp_steps=6)),
    "taylor-linear-initial": dict(configs=_config(schedule="linear", initial_sparsity=0.2)),
    "taylor-oneshot": dict(configs=_oneshot(5)),
    "platon-skipped-steps": dict(configs=_config("platon"), skip=SKIP_AT),
    "taylor-accumulation": dict(configs=_config(), accumulate=2),
    "taylor-resume": dict(configs=_config(), resume_at=13),
    "nm-2:4": dict(configs=_nm("2:4")),
    "nm-4:8-platon": dict(configs=_nm("4:8", saliency="platon")),
    "nm-1:4-linear": dict(configs=_nm("1:4", schedule="linear")),
    "ffn_neurons": dict(model="llama", configs=_structured("ffn_neurons", 0.5)),
    "attention_heads": dict(model="llama", configs=_structured("attention_heads", 0.5)),
    "blocks": dict(model="llama", configs=_structured("blocks", 0.5)),
    "ffn_neurons+blocks": dict(model="llama", configs=[_structured("ffn_neurons", 0.5),
                                                       _structured("blocks", 0.25, exclude=["layers\\.0\\."])]),
    "attention_heads-magnitude": dict(model="llama", configs=_structured("attention_heads", 0.5, saliency="magnitude")),
    "guard": dict(configs=_config(accuracy_guard=dict(metric="eval_accuracy", max_drop=0.05, every=3, patience=2)),
                  guard=True),
    "distill": dict(model="llama", configs=_config(), distill=True),
}


# ------------------------------------------------------------ seeded, platform-independent streams
def _dyadic(shape, generator: torch.Generator, bits: int, scale_exp: int) -> torch.Tensor:
    """Integers in (-2^bits, 2^bits) times 2^scale_exp: the same bits on every machine."""
    return torch.randint(-(2 ** bits) + 1, 2 ** bits, shape, generator=generator).float() * 2.0 ** scale_exp


def _build_model(kind: str) -> torch.nn.Module:
    model = tiny_llama_lm(**LLAMA) if kind == "llama" else TinyLM()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(_dyadic(p.shape, g, 8, -9))  # weights in (-0.5, 0.5), 8 significant bits
    return model


_POWERS = torch.tensor([2.0 ** -k for k in range(8)])  # a table, not exp2: no transcendental kernel anywhere


def _set_gradients(model: torch.nn.Module, generator: torch.Generator, accumulate: int = 1) -> None:
    """One step's gradients from the stream; each block gets its own scale so layers differ in saliency."""
    for name, p in sorted(model.named_parameters()):
        scale = -6 - sum(int(c) for c in name if c.isdigit()) % 4
        grad = torch.zeros_like(p)
        for _ in range(accumulate):  # micro-batches: dyadic values add exactly
            spread = _POWERS[torch.randint(0, 8, p.shape, generator=generator)]  # heavy-tailed sizes
            grad += _dyadic(p.shape, generator, 6, scale) * spread / accumulate
        p.grad = grad


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.875, weight_decay=2.0 ** -6, foreach=False)


def _configs(row: dict):
    configs = row["configs"]
    return [PruningConfig(**c) for c in configs] if isinstance(configs, list) else PruningConfig(**configs)


def _scripted_metric(pruner: Pruner) -> float:
    """The guarded metric: 0.9 up to 40% sparsity, then falling (fails max_drop=0.05 above 45%)."""
    s = pruner.mask_sparsity
    return 0.9 - max(0.0, s - 0.4)


# ------------------------------------------------------------ structured margin check
def _check_margin(granularity) -> None:
    """Wrap ``granularity.select`` so every structured mask update proves its order is platform-stable."""
    select = granularity.select

    def checked(scores, sparsity):
        masks = select(scores, sparsity)
        units = granularity.unit_scores(scores)
        pools = [list(zip(units, granularity.masks, masks))]
        if granularity.kind != "blocks":  # width kinds select per block, blocks across blocks
            pools = [[entry] for entry in pools[0]]
        for pool in pools:
            score = torch.cat([u.double().cpu() for u, _, _ in pool])
            old = torch.cat([o.cpu() for _, o, _ in pool])
            new = torch.cat([m.cpu() for _, _, m in pool]) & ~old
            kept = ~torch.cat([m.cpu() for _, _, m in pool])
            if new.any() and kept.any():
                hi, lo = float(score[new].max()), float(score[kept].min())
                assert lo - hi > MARGIN * max(abs(lo), abs(hi)), (
                    f"{granularity.kind}: pruned unit score {hi!r} and kept {lo!r} are too close for a "
                    "platform-stable order; change the row's seed")
        return masks

    granularity.select = checked


# ------------------------------------------------------------ one run
def _digest(pruner: Pruner, extra: tuple = ()) -> str:
    state = pruner.state_dict()
    h = hashlib.sha256()
    for name in sorted(state["masks"]):
        h.update(name.encode())
        h.update(state["masks"][name].to(torch.uint8).numpy().tobytes())
    for buffer in sorted(state["saliency"]):
        for name in sorted(state["saliency"][buffer]):
            h.update(f"{buffer}/{name}".encode())
            h.update(state["saliency"][buffer][name].numpy().tobytes())
    h.update(f"{pruner.step}/{pruner.skipped_steps}/{pruner.mask_updates}".encode())
    for item in extra:
        h.update(item if isinstance(item, bytes) else item.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _make(row: dict, model=None, state=None):
    from prune_callbacks.controllers.guard.controller import add_guards

    model = model if model is not None else _build_model(row.get("model", "tiny"))
    opt = _optimizer(model)
    pruner = Pruner(model, _configs(row))
    if state is not None:
        opt.load_state_dict(state[1])
        pruner.load_state_dict(state[2])
    pruner.attach(opt)
    for group in pruner.groups:
        if not group.granularity.elementwise:
            _check_margin(group.granularity)
    guards = add_guards(pruner) if row.get("guard") else []
    return model, opt, pruner, guards


def _run(name: str, steps: int = STEPS) -> str:
    from prune_callbacks.controllers.guard.controller import baseline_due, evaluation_due

    row = RUNS[name]
    model, opt, pruner, guards = _make(row)
    distiller = None
    if row.get("distill"):
        from prune_callbacks.controllers.distillation import DistillationConfig, Distiller
        from prune_callbacks.controllers.distillation.teacher import snapshot_step

        distiller = Distiller(DistillationConfig(snapshot="before_pruning")).attach(model)
        teacher_at = snapshot_step(pruner)
    stream = torch.Generator().manual_seed(1)
    for i in range(steps):
        if i == row.get("resume_at"):
            saved = (model.state_dict(), opt.state_dict(), pruner.state_dict())
            fresh = _build_model(row.get("model", "tiny"))
            fresh.load_state_dict(saved[0])
            pruner.detach()
            model, opt, pruner, guards = _make(row, fresh, saved)
        _set_gradients(model, stream, row.get("accumulate", 1))
        if i in row.get("skip", ()):
            model.layers[0].up.weight.grad[0, 0] = float("nan")
            pruner.before_optimizer_step()
            pruner.after_optimizer_step(opt)  # what a skipped GradScaler step amounts to: no optimizer step
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
        for guard in baseline_due(pruner, guards):
            guard.set_baseline(_scripted_metric(pruner), pruner.step)
        if evaluation_due(pruner, guards):
            for guard in guards:
                guard.report_metric(_scripted_metric(pruner), pruner.step)
        if distiller is not None and pruner.step == teacher_at:
            distiller.take_snapshot(pruner.step)
    extra: tuple = ()
    for guard in guards:
        guard.final_check(lambda: _scripted_metric(pruner), pruner.step)
        state = guard.state_dict()
        extra += (json.dumps(state["json"], sort_keys=True).encode(),
                  *(state["tensors"][k] for k in sorted(state["tensors"])),
                  *(p.detach() for p in pruner.params))  # a rollback restores weights: hash them too
    if distiller is not None:
        assert distiller.teacher is not None and not any(p.requires_grad for p in distiller.teacher.parameters())
        extra += (str(distiller.teacher_step).encode(), *(p.detach() for _, p in sorted(
            distiller.teacher.named_parameters())))
    return _digest(pruner, extra)


def test_golden_hashes_unchanged():
    got = {name: _run(name) for name in RUNS}
    if os.environ.get("PRUNE_CALLBACKS_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden hashes written")
    want = json.loads(GOLDEN.read_text())
    assert sorted(want) == sorted(got)
    changed = [n for n in RUNS if want[n] != got[n]]
    assert not changed, f"behaviour changed for: {changed}"


def test_resume_matches_straight_run():
    RUNS["taylor-straight"] = dict(configs=_config())
    try:
        assert _run("taylor-resume") == _run("taylor-straight")
    finally:
        del RUNS["taylor-straight"]


def test_guard_row_exercises_rollback():
    """The guard row is worth hashing only if its scripted metric makes the guard hold and roll back."""
    row = RUNS["guard"]
    model, opt, pruner, guards = _make(row)
    from prune_callbacks.controllers.guard.controller import baseline_due, evaluation_due

    stream = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        _set_gradients(model, stream)
        opt.step()
        opt.zero_grad()
        for guard in baseline_due(pruner, guards):
            guard.set_baseline(_scripted_metric(pruner), pruner.step)
        if evaluation_due(pruner, guards):
            for guard in guards:
                guard.report_metric(_scripted_metric(pruner), pruner.step)
    decisions = {r["decision"] for r in guards[0].trajectory}
    assert {"baseline", "continue", "hold", "rollback"} <= decisions, decisions


def test_distillation_matches_reference_in_process():
    """The Distiller's loss (patched forward) equals the formula written out here, bitwise, in this process;
    so does the gradient the pruner then reads (the platform-dependent part of the distillation row)."""
    import copy

    import torch.nn.functional as F

    from prune_callbacks.controllers.distillation import DistillationConfig, Distiller

    temperature, hardness = 2.0, 0.5
    student = _build_model("llama")
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    reference = copy.deepcopy(student)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    Distiller(DistillationConfig(teacher=teacher, hardness=hardness, temperature=temperature)).attach(student)
    student.train()
    reference.train()
    loss = student(input_ids=ids, labels=ids).loss
    out = reference(input_ids=ids, labels=ids)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s = out.logits.float() / temperature
    q = t_logits.float() / temperature
    log_t = F.log_softmax(q, dim=-1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :-1] = True  # causal LM: position t is compared with the label of token t + 1
    per_token = (log_t.exp() * (log_t - F.log_softmax(s, dim=-1))).sum(-1)[mask]
    kd = per_token.sum() * (temperature * temperature) / per_token.numel()
    want = hardness * kd + (1 - hardness) * out.loss
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    for (name, a), (_, b) in zip(sorted(student.named_parameters()), sorted(reference.named_parameters())):
        assert torch.equal(a.grad, b.grad), name


def test_golden_hashes_under_another_cpu_capability():
    """The table again in a subprocess under ``ATEN_CPU_CAPABILITY=default`` (or ``avx2`` when this process
    already runs without vector kernels): two capability settings proven on every run."""
    current = os.environ.get("ATEN_CPU_CAPABILITY", "")
    other = "avx2" if current == "default" else "default"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                         env.get("PYTHONPATH", "")])
    env.pop("PRUNE_CALLBACKS_WRITE_GOLDEN", None)
    code = ("import sys, json, torch; from test_golden import RUNS, _run; "
            "print(torch.backends.cpu.get_cpu_capability()); print(json.dumps({n: _run(n) for n in RUNS}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    capability, hashes = proc.stdout.strip().splitlines()[-2:]
    assert capability.lower() == other.lower() or other == "avx2", capability  # avx2 may be absent on old CPUs
    want = json.loads(GOLDEN.read_text())
    got = json.loads(hashes)
    changed = [n for n in want if got.get(n) != want[n]]
    assert not changed, f"hashes differ under ATEN_CPU_CAPABILITY={other}: {changed}"
