"""Golden hashes: the engine's masks and saliency buffers for a table of runs, bitwise.

Recorded before the engine was restructured around granularities, step components and
schedule objects (issue 10); every refactor since must leave them unchanged. A change
that is *meant* to alter behaviour regenerates them explicitly:
``PRUNE_CALLBACKS_WRITE_GOLDEN=1 pytest tests/test_golden.py`` (and says why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig

GOLDEN = Path(__file__).with_name("golden_hashes.json")
BASE = dict(final_sparsity=0.75, start_step=3, end_step=24, update_every=3)

RUNS = {
    **{f"{sal}-{scope}": dict(saliency=sal, scope=scope)
       for sal in ("taylor", "platon", "magnitude", "movement") for scope in ("global", "per_layer")},
    "taylor-caps": dict(min_layer_sparsity=0.3, max_layer_sparsity=0.9),
    "taylor-l1": dict(l1_lambda=0.05, l1_ramp_steps=6),
    "taylor-linear-initial": dict(schedule="linear", initial_sparsity=0.2),
    "taylor-oneshot": dict(schedule="oneshot", start_step=5),
    "platon-skipped-steps": dict(saliency="platon"),
    "taylor-accumulation": dict(),
    "taylor-resume": dict(),
}
SKIP_AT = {4, 11}  # steps whose gradients are made non-finite (a GradScaler would skip them)


def _digest(pruner: Pruner) -> str:
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
    return h.hexdigest()


def _run(name: str, steps: int = 30) -> str:
    overrides = RUNS[name]
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    pruner = Pruner(model, PruningConfig(**{**BASE, **overrides})).attach(opt)
    batches = random_batches(steps * 2, seed=1)
    for i in range(steps):
        if name == "taylor-resume" and i == 13:
            saved_model, saved_opt, saved = model.state_dict(), opt.state_dict(), pruner.state_dict()
            torch.manual_seed(1)
            model = TinyLM()
            model.load_state_dict(saved_model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
            opt.load_state_dict(saved_opt)
            pruner = Pruner(model, PruningConfig(**{**BASE, **overrides}))
            pruner.load_state_dict(saved)
            pruner.attach(opt)
        micro = batches[2 * i: 2 * i + 2] if name == "taylor-accumulation" else batches[i: i + 1]
        for ids in micro:
            (lm_loss(model, ids) / len(micro)).backward()
        if name == "platon-skipped-steps" and i in SKIP_AT:
            model.layers[0].up.weight.grad[0, 0] = float("nan")
            pruner.before_optimizer_step()
            pruner.after_optimizer_step(opt)  # what a skipped GradScaler step amounts to: no optimizer step
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
    return _digest(pruner)


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
    RUNS["taylor-straight"] = {}
    try:
        assert _run("taylor-resume") == _run("taylor-straight")
    finally:
        del RUNS["taylor-straight"]
