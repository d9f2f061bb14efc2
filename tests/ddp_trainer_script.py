"""Run by tests/test_trainer_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Every rank trains the tiny BERT with the Trainer callbacks and writes
``rank<r>.json`` into OUT_DIR: a hash of its masks after every mask update,
a hash of its final weights, and its counters.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import digest, end_world, tiny_bert_classifier, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402


class MaskHashes(TrainerCallback):
    def __init__(self, callbacks):
        self.callbacks, self.updates, self.seen, self.rates = callbacks, [], 0, []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # the rate each optimizer step used: Accelerate's wrapper holds the torch optimizer the Pruner hooks
        optimizer.optimizer.register_step_pre_hook(lambda o, a, k: self.rates.append(o.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, **kwargs):
        pruner = self.callbacks.pruner
        if pruner.mask_updates != self.seen:
            self.seen = pruner.mask_updates
            self.updates.append({"step": state.global_step, "masks": digest(pruner.pruned), "sparsity": pruner.mask_sparsity})


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"), use_cpu=True, report_to=[], save_strategy="steps", save_steps=4,
        logging_steps=2, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        disable_tqdm=True, seed=0, ddp_backend="gloo",
        lr_scheduler_type="constant", learning_rate=1e-3,
    )
    # recovery_lr_scale: the rate after the last mask update (step 6) is 2x on steps 7-8, on every rank alike
    callbacks = make_callbacks(final_sparsity=0.6, start_step=1, end_step=6, update_every=1,
                               recovery_lr_scale=2.0)
    recorder = MaskHashes(callbacks)
    # Different initial weights per rank: DDP broadcasts rank 0's at wrap time, masks must still agree.
    model = tiny_bert_classifier(seed=rank)
    trainer = Trainer(model=model, args=args, train_dataset=toy_classification_rows(64), callbacks=[*callbacks, recorder])
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    pruner = callbacks.pruner
    result = {
        "rank": rank,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "updates": recorder.updates,
        "rates": recorder.rates,
        "final_masks": digest(pruner.pruned),
        "weights": digest([p for _, p in sorted(trainer.model.state_dict().items())]),
        "step": pruner.step,
        "global_step": trainer.state.global_step,
        "finalized": pruner.finalized,
        "distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
