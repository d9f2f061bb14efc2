"""Run by tests/test_distillation_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Every rank trains the tiny BERT with pruning + distillation (a "self" teacher copied before
pruning) and writes ``rank<r>.json`` into OUT_DIR: hashes of its teacher and final weights,
the teacher's step, the logged distill/* figures.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import digest, end_world, tiny_bert_classifier, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.trainer.distillation import DistillationCallback  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"), use_cpu=True, report_to=[], save_strategy="steps", save_steps=4,
        logging_steps=2, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        disable_tqdm=True, seed=0, ddp_backend="gloo",
    )
    callbacks = make_callbacks(final_sparsity=0.6, start_step=3, end_step=6, update_every=1,
                               distillation={"hardness": 0.5})
    model = tiny_bert_classifier(seed=rank)  # DDP broadcasts rank 0's weights: the teachers must still agree
    trainer = Trainer(model=model, args=args, train_dataset=toy_classification_rows(64), callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    d = next(cb for cb in callbacks if isinstance(cb, DistillationCallback)).distiller
    result = {
        "rank": rank,
        "teacher": digest([v for _, v in sorted(d.teacher.state_dict().items())]),
        "teacher_step": d.teacher_step,
        "teacher_in_optimizer": any(p is q for g in trainer.optimizer.param_groups for p in g["params"]
                                    for q in d.teacher.parameters()),
        "weights": digest([p for _, p in sorted(trainer.model.state_dict().items())]),
        "kd": [e["distill/kd_loss"] for e in trainer.state.log_history if "distill/kd_loss" in e],
        "forward_restored": "forward" not in trainer.model.__dict__,
        "distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
