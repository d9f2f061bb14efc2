"""Run by tests/test_slim_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Every rank trains a 4-block tiny BERT with the Trainer callbacks, pruning 50% of the FFN neurons and
1 of 4 blocks, with ``make_callbacks(..., slim=True)``; it writes ``rank<r>.json`` into OUT_DIR: the
slim config and a hash of its slimmed weights. Rank 0 also saves the model.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddp_trainer_script import digest  # noqa: E402
from helpers import end_world, tiny_bert_classifier, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"), use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=2, max_steps=8, per_device_train_batch_size=4, disable_tqdm=True, seed=0, ddp_backend="gloo",
    )
    steps = {"start_step": 1, "end_step": 6, "update_every": 1}
    callbacks = make_callbacks([PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, **steps),
                                PruningConfig(granularity="blocks", final_sparsity=0.25, **steps)], slim=True)
    # Different initial weights per rank: DDP broadcasts rank 0's at wrap time, the units must still agree.
    model = tiny_bert_classifier(seed=rank, num_hidden_layers=4)
    trainer = Trainer(model=model, args=args, train_dataset=toy_classification_rows(64), callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    slim = trainer.model
    result = {
        "rank": rank,
        "distributed": torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2,
        "config": {k: getattr(slim.config, k) for k in ("intermediate_size", "num_hidden_layers")},
        "weights": digest([p for _, p in sorted(slim.state_dict().items())]),
        "params": sum(p.numel() for p in slim.parameters()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        trainer.save_model(os.path.join(out_dir, "slim"))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
