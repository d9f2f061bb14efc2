"""Run by tests/test_guard_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): the accuracy guard
in a stock Trainer. ``compute_metrics`` returns a rank-dependent score (rank 0 collapses above measured
sparsity 0.6, rank 1 above 0.3): without the rank-0 broadcast the ranks would decide differently.
Each rank writes ``rank<r>.json`` (trajectory, local scores, final sparsity, hashes of masks and weights).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import digest, end_world, tiny_bert_classifier, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402

BREAKS_AT = {0: 0.6, 1: 0.3}



def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    callbacks = make_callbacks(final_sparsity=0.95, start_step=2, end_step=14, update_every=2, saliency="magnitude",
                               accuracy_guard={"metric": "eval_score", "max_drop": 0.0, "every": 2, "patience": 2})
    local = []

    def compute_metrics(pred):
        measured = callbacks.pruner.report()["global_sparsity"]
        score = 1.0 if measured <= BREAKS_AT[rank] else 0.0
        local.append(score)
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean()), "score": score}

    args = TrainingArguments(output_dir=os.path.join(out_dir, "run"), use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=10, max_steps=30, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, disable_tqdm=True, seed=0, ddp_backend="gloo",
                             learning_rate=1e-3)
    trainer = Trainer(model=tiny_bert_classifier(), args=args, train_dataset=toy_classification_rows(32),
                      eval_dataset=toy_classification_rows(8, seed=1), compute_metrics=compute_metrics,
                      callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    callbacks.bind(trainer)
    trainer.train()
    pruner = callbacks.pruner
    (report,) = callbacks.guard.report()
    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
              "distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
              "trajectory": report["trajectory"], "final": report["final"], "local": local,
              "masks": digest(pruner.pruned), "weights": digest([p for _, p in sorted(trainer.model.state_dict().items())])}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
