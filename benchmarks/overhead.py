"""Step-time overhead and memory of the Pruner, in one process, as ratios.

Interleaved: one model and one AdamW; blocks of ``--block-steps`` optimizer
steps rotate over [dense, taylor, platon, movement, magnitude] (the Pruner of a
variant is attached only during its blocks), ``--rounds`` times. Per block the
median step time is kept; a variant's ratio is the median over rounds of its
block median divided by the dense block median of the same round. Medians
leave out the rare mask-update step, which is timed separately
(``mask_update_s``) and amortised: ``+ t_update / update_every`` during the
pruning phase (start..end, 60% of a run at the default 0.1..0.7).

Also: time of one mask update (global and per-layer threshold selection) and a
breakdown of the per-step hook (theta*grad + finite check, saliency EMA,
masking); exact bytes of the pruner's buffers and masks per prunable parameter
vs ``BYTES_PER_PARAM`` + 1 (mask), and transient peaks read from the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs) since tracemalloc does not
see torch's allocations.

    python benchmarks/overhead.py                         # CPU: MiniLM and BERT-base shapes
    python benchmarks/overhead.py --device cuda --dtype bf16 --batch 32 --seq 128   # GPU
    python benchmarks/overhead.py --smoke --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.methods.saliency import BYTES_PER_PARAM, gradient_products  # noqa: E402

VARIANTS = ["taylor", "taylor@v1", "platon", "movement", "magnitude"]
METHODS = [v for v in VARIANTS if "@" not in v]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Accumulates wall time of wrapped callables (synchronising the device)."""

    def __init__(self, device: str):
        self.device, self.total, self.calls = device, {}, {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            _sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **k)
            _sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
            self.calls[name] = self.calls.get(name, 0) + 1
            return out

        return timed

    def mean_ms(self, name):
        return 1000 * self.total.get(name, 0.0) / max(1, self.calls.get(name, 0))


def make_pruner(model, method: str, **overrides) -> Pruner:
    # masks active from the first update (initial 0.5), schedule long enough never to end in the benchmark.
    # "taylor@v1" is the hook as it was before this round's optimisations (a fresh theta*grad per step,
    # masks applied with masked_fill_), kept so before/after is measured side by side in one process.
    base = method.split("@")[0]
    cfg = dict(saliency=base, initial_sparsity=0.5, final_sparsity=0.9, start_step=0, end_step=10**6)
    cfg.update(overrides)
    pruner = Pruner(model, cfg, total_steps=10**6)
    if method.endswith("@v1"):
        for group in pruner.groups:
            _allocating_prepare(group)
            _masked_fill_apply(group.granularity)
    return pruner


def _masked_fill_apply(granularity) -> None:
    def apply():
        for param, pruned in zip(granularity.params, granularity.masks):
            param.masked_fill_(pruned, 0.0)

    granularity.apply = apply


def _allocating_prepare(group) -> None:
    def prepare(grad_scale):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group.params]
        prods, finite = gradient_products(group.params, grads, grad_scale)  # no out=: allocates per step
        group._prods = prods if finite else None
        return finite

    group.prepare = prepare


def interleaved(model, batch, *, rounds: int, block_steps: int, device: str, dtype, variants=VARIANTS) -> dict:
    opt = common.make_optimizer(model, lr=1e-5)
    pruners = {m: make_pruner(model, m) for m in variants}
    clocks = {}
    for m, pr in pruners.items():  # time the hooks themselves (profile of where the time goes)
        c = clocks[m] = Clock(device)
        pr.before_optimizer_step = c.wrap("before", pr.before_optimizer_step)
        pr.update_masks = c.wrap("update_masks", pr.update_masks)
        pr.apply_masks = c.wrap("apply_masks", pr.apply_masks)
        pr.after_optimizer_step = c.wrap("after", pr.after_optimizer_step)

    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step():
        _sync(device)
        t = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t

    for _ in range(2):  # warm-up (allocator, AdamW state)
        step()
    for pr in pruners.values():  # masks active (50%) before the timed blocks: apply_masks does real work
        pr.attach(opt)
        step()
        pr.detach()
        pr.update_masks(0.5)
    blocks = {v: [] for v in ["dense", *variants]}
    for _ in range(rounds):
        for v in blocks:
            if v != "dense":
                pruners[v].attach(opt)
            blocks[v].append(statistics.median(step() for _ in range(block_steps)))
            if v != "dense":
                pruners[v].detach()
    out = {"dense_step_ms": round(1000 * statistics.median(blocks["dense"]), 2), "variants": {}}
    for v in variants:
        ratios = [p / d for p, d in zip(blocks[v], blocks["dense"])]
        out["variants"][v] = {
            "step_ms": round(1000 * statistics.median(blocks[v]), 2),
            "ratio": round(statistics.median(ratios), 4),
            "ratios_per_round": [round(r, 4) for r in ratios],
            "hook_before_ms": round(clocks[v].mean_ms("before"), 3),
            "hook_after_ms_incl_updates": round(clocks[v].mean_ms("after"), 3),
            "apply_masks_ms": round(clocks[v].mean_ms("apply_masks"), 3),
            "mask_update_ms_in_loop": round(clocks[v].mean_ms("update_masks"), 2),
        }
    return out


def components(model, device: str, repeats: int) -> dict:
    """Per-step pieces of the hook and one mask update, at this model's size (fake gradients)."""
    res = {}
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for method in METHODS:
        pr = make_pruner(model, method)
        pr.before_optimizer_step()  # fold the fake gradients: a mask update needs scores that tell weights apart
        pr.update_masks(0.5)
        params, grads = pr.params, [p.grad for p in pr.params]
        c = Clock(device)
        prods_fn = c.wrap("theta_x_grad_and_finite_check", gradient_products)
        only_mul = c.wrap("theta_x_grad_only", lambda: torch._foreach_mul([p.detach() for p in params], grads))
        upd = c.wrap("saliency_update", pr.saliency.update)
        msk = c.wrap("apply_masks", pr.apply_masks)
        for _ in range(repeats):
            prods, _ok = prods_fn(params, grads)
            only_mul()
            if pr.saliency.needs_gradients:
                upd(params, prods)
            msk()
        row = {k: round(c.mean_ms(k), 3) for k in c.total}
        row["finite_check_ms"] = round(row["theta_x_grad_and_finite_check"] - row["theta_x_grad_only"], 3)
        res[method] = row
        pr.finalize()
    return res


def mask_update_times(model, device: str, repeats: int) -> dict:
    out = {}
    for scope, extra in (("global", {}), ("per_layer", {}), ("global_cap0.98", {"max_layer_sparsity": 0.98})):
        pr = make_pruner(model, "magnitude", scope="global" if scope.startswith("global") else "per_layer", **extra)
        times = []
        for i in range(repeats):
            _sync(device)
            t = time.perf_counter()
            pr.update_masks(0.5 + 0.1 * i)
            _sync(device)
            times.append(time.perf_counter() - t)
        out[scope] = {"ms": round(1000 * statistics.median(times), 1), "all_ms": [round(1000 * t, 1) for t in times]}
        pr.finalize()
    return out


# ---------------------------------------------------------------------------- memory
def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory(model) -> dict:
    res = {}
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for method in METHODS:
        pr = make_pruner(model, method)
        n = sum(p.numel() for p in pr.params)
        buf = sum(t.numel() * t.element_size() for bufs in pr.saliency.buffers.values() for t in bufs)
        masks = sum(m.numel() * m.element_size() for m in pr.pruned)
        row = {
            "prunable_params": n,
            "saliency_bytes_per_param": round(buf / n, 4),
            "mask_bytes_per_param": round(masks / n, 4),
            "steady_bytes_per_param": round((buf + masks) / n, 4),
            "documented_BYTES_PER_PARAM_plus_mask": BYTES_PER_PARAM[method] + 1,
        }
        if common.reset_peak_rss() and _peak_rss_bytes() is not None:
            for phase, fn in (("step_hook", lambda: (pr.before_optimizer_step(), pr.apply_masks())),
                              ("global_mask_update", lambda: pr.update_masks(0.6))):
                base = _rss_bytes()
                common.reset_peak_rss()
                fn()
                row[f"transient_peak_bytes_per_param_{phase}"] = round((_peak_rss_bytes() - base) / n, 2)
        res[method] = row
        pr.finalize()
    return res


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="default: 6 for MiniLM, 3 for BERT-base")
    p.add_argument("--block-steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                   help="methods timed in the interleaved loop (components and memory: always all)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the component and mask-update timings")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    if args.smoke:
        args.models, args.batch, args.seq, args.rounds, args.block_steps, args.repeats = ["tiny"], 4, 16, 2, 2, 1
    out_path = args.out or common.RESULTS / f"overhead_{args.device.split(':')[0]}.json"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    results = {"benchmark": "overhead", "hardware": common.hardware_info(args.device),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    configs = {"minilm": common.minilm_config, "bert-base": common.bert_base_config, "tiny": common.tiny_bert_config}
    for name in args.models:
        t0 = time.perf_counter()
        model = common.classifier_from_config(configs[name](), seed=0).to(args.device)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device),
                 "labels": torch.randint(0, 2, (args.batch,), generator=g).to(args.device)}
        rounds = args.rounds or (6 if name == "minilm" else 3)
        row = {"batch": args.batch, "seq": args.seq, "rounds": rounds, "block_steps": args.block_steps}
        row["interleaved"] = interleaved(model, batch, rounds=rounds, block_steps=args.block_steps,
                                         device=args.device, dtype=dtype, variants=args.variants)
        row["mask_update"] = mask_update_times(model, args.device, args.repeats)
        row["components"] = components(model, args.device, args.repeats)
        if args.device == "cpu":
            row["memory"] = memory(model)
        # amortised with the library's defaults: a mask update every `update_every` steps while the
        # schedule runs (start_step..end_step as fractions of the run), read from PruningConfig itself
        defaults = PruningConfig.model_fields
        every = defaults["update_every"].default
        window = defaults["end_step"].default - defaults["start_step"].default
        row["amortised_assumes"] = {"update_every": every, "schedule_window": window}
        dense_ms = row["interleaved"]["dense_step_ms"]
        for v, vr in row["interleaved"]["variants"].items():
            upd = row["mask_update"]["global"]["ms"]
            vr["amortised_ratio"] = round(vr["ratio"] + window * upd / every / dense_ms, 4)
        row["prunable_params"] = sum(t.numel for t in make_pruner(model, "magnitude").targets)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["models"][name] = row
        common.write_json(out_path, results)
        iv = row["interleaved"]
        print(f"[overhead] {name}: dense {iv['dense_step_ms']} ms/step; "
              + ", ".join(f"{v} x{r['ratio']} (amortised x{r['amortised_ratio']})" for v, r in iv["variants"].items())
              + f"; mask update global {row['mask_update']['global']['ms']} ms, per_layer {row['mask_update']['per_layer']['ms']} ms",
              flush=True)
        del model
    return results


if __name__ == "__main__":
    main()
