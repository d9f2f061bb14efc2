"""Causal LM: prune while fine-tuning vs one-shot pruning (llm-compressor SparseGPT / Wanda, magnitude) + fine-tuning.

SmolLM2-135M (the shipped asset) on KJV text, whole books split into train / held-out (`load_kjv`).
Every row gets the same fine-tuning budget: ``--steps`` AdamW steps of ``--batch-size`` blocks of
``--seq-len`` tokens (tokens = steps x batch x seq, stated in the results). Rows:

* ``dense``: fine-tuned, no pruning;
* ``ours_<s>``: prune while fine-tuning (`Pruner`, default saliency, cubic schedule);
* ``ours_kd_<s>``: the same, plus knowledge distillation (`prune_callbacks.controllers.distillation`, `DistillationConfig`
  defaults: ``"self"`` teacher copied ``"before_pruning"``, hardness 0.5, temperature 2.0);
* ``srste_<s>`` (N:M only): the same schedule with ``granularity="<s>-srste"`` (SR-STE: dense shadow weights,
  straight-through gradients, ``--srste-decay`` on pruned weights, masks re-chosen at every update);
  ``srste_full_<s>``: the same with ``initial_sparsity`` = the final one (the full N:M pattern from the first
  update, revisited at every later update); a non-default decay is in the label (``srste_l0.002_2:4``);
* ``oneshot_magnitude_<s>``: per-layer magnitude pruning once, then fine-tuning with the mask held fixed;
* ``sparsegpt_<s>`` / ``wanda_<s>``: llm-compressor one-shot on ``--calib-blocks`` training blocks, run in its
  own virtual environment (``--peer-python``; llmcompressor 0.14.0.1 pins transformers<=5.17), its zeroed weights
  handed back, then the same fine-tuning with the mask held fixed (re-zeroed after every optimizer step);
* ``sparsegpt_srste_<s>`` / ``wanda_srste_<s>`` (N:M only): the same one-shot start (pattern and reconstructed
  weights), then the ``srste_full`` fine-tuning instead of the fixed mask: the pattern may change its mind.

Every pruned row targets the same weights: the Linear layers inside the decoder blocks (not embeddings, not
lm_head). Held-out perplexity and wall time per row go to ``--out`` (JSON) and a plot (PNG next to it).
A long table can be run in parts (``--rows`` / ``--sparsities`` subsets, each with its own ``--out``) and the
parts joined with ``--merge`` (same budget required).

    python benchmarks/causal_lm_peers.py --threads 1 --peer-python outputs/peer-venv/bin/python
    python benchmarks/causal_lm_peers.py --smoke          # tiny Llama from a config, seconds
    python benchmarks/causal_lm_peers.py --merge a.json b.json --out benchmarks/results/causal_lm_peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEER_METHODS = ("sparsegpt", "wanda")
OURS_METHODS = ("ours", "ours_kd", "srste", "srste_full")
SRSTE_DEFAULT_DECAY = 2e-4
DEFAULT_WINDOW = (0.1, 0.7)  # start_step / end_step of the prune-while-fine-tuning rows; others are in the label
RESTART_METHODS = tuple(f"{peer}_srste" for peer in PEER_METHODS)  # one-shot start, then srste_full
ROWS = ("dense", *OURS_METHODS, "magnitude", *PEER_METHODS, *RESTART_METHODS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny LlamaConfig model and random tokens (CI)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--sparsities", nargs="+", type=_sparsity, default=[0.5, "2:4", 0.7],
                   help="unstructured fractions and/or N:M patterns such as 2:4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calib-blocks", type=int, default=32, help="training blocks used to calibrate one-shot peers")
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--eval-split", choices=("validation", "test"), default="validation",
                   help="KJV split of the held-out blocks: 'test' for rows whose settings were chosen on validation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", nargs=2, type=float, default=list(DEFAULT_WINDOW), metavar=("START", "END"),
                   help="start_step / end_step (fractions of --steps) of the prune-while-fine-tuning rows; a "
                        "non-default window is in the label (srste_full_w0.05-0.95_2:4)")
    p.add_argument("--srste-decay", type=float, default=SRSTE_DEFAULT_DECAY,
                   help="SR-STE decay of the srste rows (granularity_settings.decay)")
    p.add_argument("--model-cache-dir", default=None, help="float32 copy of SmolLM2 (load_smollm2 cache_dir)")
    p.add_argument("--peer-python", default=None,
                   help="python of a venv with llmcompressor==0.14.0.1 (peer rows are skipped, with the reason, without)")
    p.add_argument("--out", default="benchmarks/results/causal_lm_peers.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="join the results of several runs (same budget) into --out and plot them; runs nothing")
    p.add_argument("--peer-worker", nargs=5, metavar=("METHOD", "SPARSITY", "MODEL_DIR", "CALIB_PT", "OUT_PT"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sparsity(text: str):
    """A fraction in (0, 1) or an N:M pattern ("2:4")."""
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        if not 0 < n < m:
            raise argparse.ArgumentTypeError(f"N:M pattern {text!r} needs 0 < N < M, e.g. 2:4")
        return text
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity {text!r} must be in (0, 1) or an N:M pattern like 2:4")
    return value


def _fraction(s) -> float:
    """The fraction of weights an unstructured sparsity or N:M pattern removes."""
    if isinstance(s, str):
        n, m = (int(x) for x in s.split(":"))
        return 1.0 - n / m
    return float(s)


# ---------------------------------------------------------------- peer worker (runs in the peer venv)
def peer_worker(method: str, sparsity, model_dir: str, calib_pt: str, out_pt: str) -> None:
    """llm-compressor one-shot pruning; saves the pruned state dict (zeros in place). Imports only its own stack."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    if method == "sparsegpt":
        from llmcompressor.modifiers.obcq import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    ids = torch.load(calib_pt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        from transformers import AutoTokenizer
        processor = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # smoke model without a tokenizer: the data is already token ids, any processor will do
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast
        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                            unk_token="<unk>", pad_token="<unk>")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = sparsity if isinstance(sparsity, str) else "0:0"
    recipe = Modifier(sparsity=_fraction(sparsity), mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    oneshot(model=model, processor=processor, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1])
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_pt)


# ---------------------------------------------------------------- shared parts
def build(args):
    """(model factory, train blocks [N, T], held-out blocks [M, T], model description, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.smoke:
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
        g = torch.Generator().manual_seed(args.seed)
        # a learnable pattern (repeated short motifs) so fine-tuning lowers the loss
        motifs = torch.randint(0, 128, (8, 8), generator=g)
        pick = torch.randint(0, 8, (160, args.seq_len // 8), generator=g)
        blocks = motifs[pick].reshape(160, -1)

        def make():
            torch.manual_seed(args.seed)
            return AutoModelForCausalLM.from_config(cfg)
        return make, blocks[:128], blocks[128:128 + args.eval_blocks], "tiny LlamaConfig (smoke)", None

    from prune_callbacks.assets import load_kjv, load_smollm2, tokenize_and_group

    base, tokenizer = load_smollm2(dtype=torch.float32, cache_dir=args.model_cache_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    kjv = load_kjv(seed=args.seed)
    grouped = tokenize_and_group(kjv, tokenizer, block_size=args.seq_len)
    train = torch.tensor(grouped["train"]["input_ids"])
    held = torch.tensor(grouped[args.eval_split]["input_ids"][: args.eval_blocks])
    cfg = base.config
    del base

    def make():
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.config.use_cache = False
        return model
    return make, train, held, "SmolLM2-135M (prune_callbacks.assets)", tokenizer


@torch.no_grad()
def held_out_perplexity(model, blocks, batch_size: int = 8) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        total += model(input_ids=ids, labels=ids).loss.float().item() * len(ids)
    model.train()
    return math.exp(min(total / len(blocks), 50.0))


def block_weights(model):
    from prune_callbacks.core.targets import find_targets
    return find_targets(model)  # the Linear layers inside the decoder blocks: the targets of every pruned row


def fixed_mask_hook(optimizer, model):
    """Hold the current zeros of the block weights fixed: re-zero them after every optimizer step."""
    masks = [(t.param, t.param.ne(0)) for t in block_weights(model)]

    def rezero(opt, args, kwargs):
        with torch.no_grad():
            for p, m in masks:
                p.mul_(m)
    return optimizer.register_step_post_hook(rezero)


def measured_sparsity(model) -> float:
    targets = block_weights(model)
    zeros = sum(int((t.param == 0).sum()) for t in targets)
    return zeros / sum(t.numel for t in targets)


def finetune(model, train, args, pruning_config=None, distillation=None):
    """The shared budget: args.steps AdamW steps, linear warm-up then cosine, same batches for every row.
    Returns the (finalized) `Pruner`, or None without ``pruning_config``.

    ``distillation`` (a `DistillationConfig`, with ``pruning_config``): the student's loss gets the KD term
    (`Distiller` patches its forward); a ``"self"`` / ``"before_pruning"`` teacher is copied after the last
    optimizer step before the pruner's first mask update (`Pruner.first_update_step`)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, args.steps // 10),
                              num_training_steps=args.steps)
    pruner, hook = None, None
    if pruning_config is not None:
        from prune_callbacks.engine.pruner import Pruner
        pruner = Pruner(model, pruning_config, total_steps=args.steps).attach(optimizer)
    elif measured_sparsity(model) > 0:
        hook = fixed_mask_hook(optimizer, model)
    distiller, snapshot_at = None, None
    if distillation is not None:
        from prune_callbacks.controllers.distillation import Distiller
        from prune_callbacks.controllers.distillation.teacher import snapshot_step
        if pruner is None:
            raise ValueError("distillation rows prune while fine-tuning: give pruning_config too")
        distiller = Distiller(distillation).attach(model)
        if distillation.self_teacher and distillation.snapshot == "before_pruning":
            snapshot_at = snapshot_step(pruner)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)
    model.train()
    for step in range(args.steps):  # step = optimizer steps taken so far
        if distiller is not None and distiller.teacher is None and step >= snapshot_at:
            distiller.take_snapshot(step)
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(train)]
        ids = train[idx]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"    step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    if distiller is not None:
        kd = distiller.figures()
        print(f"    distill since last log: {kd}", flush=True)
        distiller.detach()
    if pruner is not None:
        pruner.finalize()
    if hook is not None:
        hook.remove()
    return pruner


@torch.no_grad()
def oneshot_magnitude(model, sparsity) -> None:
    """Per-layer magnitude: zero the smallest |w| of every block weight (N:M: per group of M along the input)."""
    for t in block_weights(model):
        w = t.param
        if isinstance(sparsity, str):
            if t.transposed:
                raise ValueError(f"{t.param_name}: N:M one-shot magnitude supports [out, in] weights only")
            n, m = (int(x) for x in sparsity.split(":"))
            groups = w.view(-1, m)  # a view: the zeros land in w
            drop = groups.abs().topk(m - n, dim=1, largest=False).indices
            groups.scatter_(1, drop, 0.0)
            continue
        k = int(round(sparsity * w.numel()))
        if k:
            threshold = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= threshold, 0.0)


def run_peer(method, sparsity, model, calib, args, workdir: Path, tokenizer=None):
    """One-shot llm-compressor pruning in its own venv; loads the zeroed weights into ``model``."""
    model_dir = workdir / "base"
    if not model_dir.exists():
        model.save_pretrained(model_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
    calib_pt, out_pt = workdir / "calib.pt", workdir / f"{method}_{str(sparsity).replace(':', 'of')}.pt"
    torch.save(calib, calib_pt)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    cmd = [args.peer_python, str(Path(__file__).resolve()), "--peer-worker", method, str(sparsity),
           str(model_dir), str(calib_pt), str(out_pt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"llm-compressor {method} failed (rc {proc.returncode}): " + " | ".join(tail))
    state = torch.load(out_pt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()


def plan(args):
    rows = []
    if "dense" in args.rows:
        rows.append(("dense", None))
    for s in args.sparsities:
        for r in args.rows:
            if r != "dense":
                rows.append((r, s))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.peer_worker:
        m, s, model_dir, calib, out = args.peer_worker
        peer_worker(m, _sparsity(s), model_dir, calib, out)
        return None
    if args.merge:
        return merge(args.merge, Path(args.out), plot_it=not args.no_plot)
    torch.set_num_threads(args.threads)
    from prune_callbacks import PruningConfig
    from prune_callbacks.controllers.distillation import DistillationConfig

    distillation = DistillationConfig()  # the defaults: "self" teacher copied "before_pruning"

    make, train, held, model_desc, tokenizer = build(args)
    calib = train[: args.calib_blocks]
    results = {
        "model": model_desc,
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "tokens": args.steps * args.batch_size * args.seq_len, "lr": args.lr,
                   "calib_blocks": args.calib_blocks, "held_out_blocks": len(held),
                   "held_out_split": args.eval_split},
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                     "torch": torch.__version__, "cpus": os.cpu_count(), "load_average_start": os.getloadavg()},
        "seed": args.seed, "distillation": distillation.dump(),
        "runs": [], "skipped": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = make()
    results["base_perplexity"] = held_out_perplexity(base, held)
    print(f"{model_desc}: base held-out perplexity {results['base_perplexity']:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in plan(args):
            label = name if s is None else f"{name}_{s if isinstance(s, str) else f'{s:g}'}"
            peer = name.removesuffix("_srste") if name in RESTART_METHODS else name
            srste = name.startswith("srste") or name in RESTART_METHODS
            if srste:
                if not isinstance(s, str):
                    results["skipped"].append({"name": label, "reason": "SR-STE rows are N:M only"})
                    continue
                if args.srste_decay != SRSTE_DEFAULT_DECAY:
                    label = f"{name}_l{args.srste_decay:g}_{s}"
            if (name in OURS_METHODS or srste) and tuple(args.window) != DEFAULT_WINDOW:
                label = f"{label.removesuffix(f'_{s}')}_w{args.window[0]:g}-{args.window[1]:g}_{s}"
            if peer in PEER_METHODS and not args.peer_python:
                results["skipped"].append({"name": label, "reason": "no --peer-python (llm-compressor venv) given"})
                continue
            print(f"== {label}", flush=True)
            model = make()
            t0 = time.time()
            oneshot_s = 0.0
            try:
                if name == "magnitude":
                    oneshot_magnitude(model, s)
                elif peer in PEER_METHODS:
                    run_peer(peer, s, model, calib, args, Path(tmp), tokenizer)
                oneshot_s = time.time() - t0
                oneshot = s is not None and name not in OURS_METHODS
                after_oneshot = held_out_perplexity(model, held) if oneshot else None
                cfg = None
                if name in OURS_METHODS or srste:
                    target = {"granularity": s} if isinstance(s, str) else {"final_sparsity": s}
                    if srste:
                        target = {"granularity": f"{s}-srste", "granularity_settings": {"decay": args.srste_decay}}
                        if name != "srste":  # srste_full and the one-shot starts: the whole pattern at once
                            target["initial_sparsity"] = _fraction(s)
                    cfg = PruningConfig(**target, start_step=args.window[0], end_step=args.window[1], update_every=2)
                finetune(model, train, args, cfg, distillation if name == "ours_kd" else None)
            except Exception as exc:  # a peer that cannot run here is reported, not hidden
                results["skipped"].append({"name": label, "reason": f"{type(exc).__name__}: {exc}"[:600]})
                print(f"   skipped: {exc}", flush=True)
                continue
            row = {"name": label, "method": name, "pattern": s if isinstance(s, str) else "unstructured",
                   "target_sparsity": 0.0 if s is None else _fraction(s),
                   "achieved_sparsity": measured_sparsity(model), "perplexity": held_out_perplexity(model, held),
                   "perplexity_after_oneshot": after_oneshot, "oneshot_seconds": oneshot_s,
                   "wall_seconds": time.time() - t0, "load_average": os.getloadavg()}
            results["runs"].append(row)
            print(f"   ppl {row['perplexity']:.2f} sparsity {row['achieved_sparsity']:.3f} "
                  f"wall {row['wall_seconds']:.0f}s", flush=True)
            out.write_text(json.dumps(results, indent=2))  # after every row: a cut-short run keeps what it did
    out.write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        plot(results, out.with_suffix(".png"))
    return results


def merge(paths, out: Path, plot_it: bool = True) -> dict:
    """Join the runs of several result files of the same model and budget (a table run in parts)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths, parts):
        for key in ("model", "budget", "seed"):
            if part.get(key) != first.get(key):
                raise SystemExit(f"--merge: {path} has {key}={part.get(key)!r}, {paths[0]} has {first.get(key)!r}; "
                                 "only runs of the same model, budget and seed can be joined")
    merged = {k: v for k, v in first.items() if k not in ("runs", "skipped", "hardware")}
    merged["parts"] = [{"file": str(p), "hardware": part["hardware"], "base_perplexity": part["base_perplexity"],
                        "rows": [r["name"] for r in part["runs"]]} for p, part in zip(paths, parts)]
    seen, merged["runs"], merged["skipped"] = set(), [], []
    for part in parts:
        for r in part["runs"]:
            if r["name"] in seen:
                raise SystemExit(f"--merge: row {r['name']!r} is in more than one file")
            seen.add(r["name"])
            merged["runs"].append(r)
        merged["skipped"].extend(part["skipped"])
    done = {r["name"] for r in merged["runs"]}
    merged["skipped"] = [s for s in merged["skipped"] if s["name"] not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2))
    if plot_it:
        plot(merged, out.with_suffix(".png"))
    print(markdown(merged))
    return merged


def markdown(results) -> str:
    """The results as a markdown table (what BENCHMARKS.md shows), the skipped rows with their reasons below."""
    lines = ["| row | sparsity (achieved) | ppl after one-shot | held-out ppl | one-shot s | wall s | load avg (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        once = r.get("perplexity_after_oneshot")
        load = r.get("load_average")
        lines.append(f"| `{r['name']}` | {r['achieved_sparsity']:.3f} | {'' if once is None else f'{once:.2f}'} | "
                     f"**{r['perplexity']:.2f}** | {r['oneshot_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{'' if not load else f'{load[0]:.1f}'} |")
    lines += [f"- `{s['name']}` not run: {s['reason']}" for s in results["skipped"]]
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    """Grouped bars: one group per sparsity setting, one bar per method (held-out perplexity after the
    fine-tuning budget); x = the same one-shot model before fine-tuning; lines = dense fine-tuned and base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    pruned = [r for r in runs if r["method"] != "dense"]
    def setting(r):
        return r["target_sparsity"], r["pattern"] != "unstructured", r["pattern"]

    settings = sorted({setting(r) for r in pruned})
    methods = [m for m in ROWS if m != "dense" and any(r["method"] == m for r in pruned)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, m in enumerate(methods):
        for i, key in enumerate(settings):
            row = next((r for r in pruned if r["method"] == m and setting(r) == key), None)
            if row is None:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, row["perplexity"], width, color=f"C{j}", label=m if i == 0 or m not in
                   ax.get_legend_handles_labels()[1] else None)
            if row.get("perplexity_after_oneshot"):
                ax.plot(x, row["perplexity_after_oneshot"], "x", color="k", ms=6,
                        label="one-shot, before fine-tuning" if "one-shot, before fine-tuning" not in
                        ax.get_legend_handles_labels()[1] else None)
    for r in runs:
        if r["method"] == "dense":
            ax.axhline(r["perplexity"], color="k", ls="--", lw=1, label="dense fine-tuned")
    ax.axhline(results["base_perplexity"], color="grey", ls=":", label="base (no fine-tuning)")
    ax.set_xticks(range(len(settings)), [p if nm else f"{s:.0%}" for s, nm, p in settings])
    b = results["budget"]
    ax.set(xlabel="sparsity of the decoder-block Linear weights", ylabel="held-out perplexity", yscale="log",
           title=f"{results['model']}: {b['steps']} steps x {b['batch_size']} x {b['seq_len']} tokens per row")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
