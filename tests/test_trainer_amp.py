"""The fp16 GradScaler path, tested with a plain torch loop and ``torch.amp.GradScaler("cpu")``.

The Trainer cannot run fp16 with a GradScaler on CPU (accelerate builds no
scaler there), but what the Trainer does on GPU is exactly this loop:
``scaler.scale(loss).backward()``, optional ``unscale_`` + clipping,
``scaler.step(optimizer)``, ``scaler.update()``. The pruner is attached to the
optimizer as in the callbacks. The loss scale is a power of two and there is
no autocast, so scaled-then-unscaled gradients are bitwise the fp32 ones and
runs can be compared exactly. The Trainer's default optimizer is fused AdamW,
which GradScaler hands still-scaled gradients (it unscales inside its kernel)
and steps even on overflow.
"""

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner

CONFIG = dict(final_sparsity=0.5, start_step=1, end_step=5, update_every=1)


def run(*, scaler=None, fused=False, clip=False, overflow_at=None, skip=None, steps=7):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    pruner = Pruner(model, CONFIG, total_steps=steps).attach(optimizer)
    for i, batch in enumerate(random_batches(steps)):
        if i == skip:
            continue
        loss = lm_loss(model, batch)
        if i == overflow_at:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
    return model, pruner


def assert_same(a, b):
    (ma, pa), (mb, pb) = a, b
    assert pa.step == pb.step and pa.mask_updates == pb.mask_updates
    for x, y in zip(pa.pruned, pb.pruned):
        assert torch.equal(x, y)
    for x, y in zip(pa.saliency.buffers["importance"], pb.saliency.buffers["importance"]):
        assert torch.equal(x, y)
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_saliency_sees_unscaled_gradients(fused, clip):
    reference = run(fused=fused)
    scaled = run(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12), fused=fused, clip=clip)
    assert_same(reference, scaled)
    assert reference[1].mask_sparsity == 0.5


@pytest.mark.parametrize("fused", [False, True])
def test_scaler_skipped_step_changes_nothing(fused):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    skipped = run(scaler=scaler, fused=fused, overflow_at=2, steps=8)
    assert scaler.get_scale() == 2.0**11  # the scaler did see the overflow and skip
    reference = run(fused=fused, skip=2, steps=8)
    assert_same(reference, skipped)
    # non-fused: GradScaler never calls the inner step; fused: it does, and the pruner marks it skipped
    assert skipped[1].skipped_steps == (1 if fused else 0)
