"""Launched on 2 CPU processes by tests/test_guard_ddp.py (torchrun, gloo): the accuracy guard in an
Accelerate loop, ``register(..., evaluate=fn)``.

Each rank's evaluation returns a *different* synthetic accuracy (rank 0 collapses above sparsity 0.6,
rank 1 above 0.3), so without the rank-0 broadcast the ranks would hold and roll back at different
points. Each writes ``rank<i>.json``: the guard's trajectory, the locally computed values, final
sparsity and hashes of masks and weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers

from accelerate import Accelerator  # noqa: E402
from helpers import TinyLM, digest, end_world, lm_loss, random_batches  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook  # noqa: E402

BREAKS_AT = {0: 0.6, 1: 0.3}



def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.cat(random_batches(60, batch=4, seed=1)), batch_size=2)
    model, opt, loader = acc.prepare(model, opt, loader)  # 120 rows / 2 ranks / batch 2 = 30 steps per epoch
    epochs = 3
    cfg = PruningConfig(final_sparsity=0.95, start_step=1, end_step=40, update_every=3, schedule="linear",
                        saliency="magnitude", include=[r"layers\.\d+\.(up|down)"],
                        accuracy_guard={"metric": "eval_acc", "max_drop": 0.01, "every": 3, "patience": 2})
    hook = AcceleratePruningHook(cfg)
    local = []

    def evaluate():
        value = 0.9 if hook.pruner.mask_sparsity <= BREAKS_AT[rank] + 1e-9 else 0.5
        local.append({"step": hook.pruner.step, "value": value})
        return {"eval_acc": value}

    pruner = hook.register(acc, model, opt, train_dataloader=loader, num_epochs=epochs, evaluate=evaluate)
    for _ in range(epochs):
        for ids in loader:
            with acc.accumulate(model):
                acc.backward(lm_loss(model, ids))
                opt.step()
                opt.zero_grad()
    report = hook.finalize()
    (guard,) = report["accuracy_guard"]
    result = {"rank": rank, "world_size": acc.num_processes, "step": pruner.step,
              "distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
              "trajectory": guard["trajectory"], "final": guard["final"], "local": local,
              "global_sparsity": report["global_sparsity"], "masks": digest(pruner.pruned),
              "weights": digest(acc.unwrap_model(model).state_dict().values())}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
