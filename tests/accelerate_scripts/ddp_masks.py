"""Launched on 2 CPU processes by tests/test_accelerate_multiprocess.py.

Each rank trains TinyLM on its own shard of the data with gradient
accumulation and an AcceleratePruningHook, and writes ``rank<i>.json``
into ``argv[1]``: per mask update the hash of its local masks before the
rank-0 broadcast and after it, plus final weights/mask hashes and counters.

Rank 1's saliency is perturbed at the start, so without the broadcast the
ranks would choose different masks: the test checks that they did not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers

from accelerate import Accelerator  # noqa: E402
from helpers import TinyLM, digest, end_world, lm_loss, random_batches  # noqa: E402

import prune_callbacks.methods.steps.pruning as pruner_module  # noqa: E402  (where masks are broadcast)
from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook, count_optimizer_steps  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    accum = 2
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    rank, world = acc.process_index, acc.num_processes

    torch.manual_seed(0)  # same initial model everywhere (DDP would broadcast it anyway)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.cat(random_batches(20, batch=2, seed=1))  # 40 rows, split across ranks by the prepared loader
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, opt, loader = acc.prepare(model, opt, loader)
    epochs = 2
    total = count_optimizer_steps(len(loader), accum, epochs)

    hook = AcceleratePruningHook(
        PruningConfig(final_sparsity=0.7, start_step=1, end_step=total - 1, update_every=1, saliency="taylor"),
        total_steps=total,
    )
    pruner = hook.register(acc, model, opt)

    updates = []
    real_broadcast = pruner_module.broadcast_masks

    def recording_broadcast(masks):
        before = digest(masks)
        real_broadcast(masks)
        updates.append({"step": pruner.step, "before": before, "after": digest(masks)})

    pruner_module.broadcast_masks = recording_broadcast

    if rank == 1:  # make the ranks disagree unless masks are synchronised
        g = torch.Generator().manual_seed(99)
        for buf in pruner.saliency.buffers["importance"]:
            buf.add_(torch.rand(buf.shape, generator=g))

    for _ in range(epochs):
        for ids in loader:
            with acc.accumulate(model):
                acc.backward(lm_loss(model, ids))
                opt.step()
                opt.zero_grad()

    report = hook.finalize()
    result = {
        "rank": rank,
        "world_size": world,
        "is_distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
        "expected_steps": total,
        "step": pruner.step,
        "updates": updates,
        "global_sparsity": report["global_sparsity"],
        "masks": digest(pruner.pruned),
        "weights": digest(acc.unwrap_model(model).state_dict().values()),
        "zeros_ok": all(bool((t.param[m] == 0).all()) for t, m in zip(pruner.targets, pruner.pruned)),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()  # barrier + destroy_process_group
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
