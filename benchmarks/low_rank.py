"""MiniLM on Rotten Tomatoes at a parameter budget: low rank during training vs SVD / FWSVD after fine-tuning.

Every variant removes the same fraction ``--sparsity`` of the targeted parameters (every Linear in the 6 blocks,
both factors counted: ``r*(m+n)`` against ``m*n``), with the same batches, optimizer, schedule, seed and
``--steps`` optimizer steps:

* ``low_rank``: ``granularity="low_rank"`` during the fine-tune (FWSVD ranks from the run's squared gradients,
  cubic from 10% to 60% of the run, the weight projected onto its subspace after every step);
* ``low_rank_at_updates``: the same, projected only at mask updates (cheaper per step);
* ``low_rank_plain``: during training, plain SVD ranks (``importance: none``);
* ``dense``: the fine-tune alone (reference);
* ``svd_after``: the fine-tuned dense model truncated one-shot by plain SVD, ranks allocated by the same global rule;
* ``fwsvd_after``: the same with Fisher weights from ``--calib`` extra gradient passes (no optimizer step) over
  training batches after the fine-tune;
* ``*_relative*``: ranks allocated on each layer's share of its own (weighted) energy (``allocation: relative``);
  ``*_late``: the rank schedule from 30% to 70% of the run instead of 10% to 60%; ``low_rank_oneshot_late``:
  dense fine-tune for 80% of the run, FWSVD ranks one-shot from the run's own Fisher, the last 20% in the subspace;
  ``*_late50``: the rank schedule from 50% to 80% of the run (the first half fine-tunes the dense model, the last
  20% the compressed one); ``*_late60``: 60% to 90%; ``low_rank_relative_oneshot80``: ``low_rank_oneshot_late`` with
  ``allocation: relative``;
* ``unstructured`` / ``ffn_neurons``: pruning riding the same fine-tune (taylor, cubic 10% -> 60%) removing the same
  number of block weights (``ffn_neurons``: ``1.5 x`` the fraction of the FFN neurons on MiniLM; not run above 2/3).

``--sparsity`` takes several values (one dense fine-tune shared by every ``*_after`` row); ``--seed`` sets the
classifier head, the batch order and the torch seed (the data split stays seed 0, so the test set is the same).
``--latency``: after the rows, CPU inference latency of every exported model and of the dense one (batch 1 and
32, seq ``--latency-seq``, one forward per model per round, models interleaved in rotated order, medians;
``benchmarks/structured_latency.interleaved_medians``).

Each variant is exported (two thin Linears per target), its test accuracy measured on the whole test split, its
parameters and the bytes of its ``save_low_rank`` file recorded. The projection's cost is timed against a
training step (medians, same process).

    python benchmarks/low_rank.py --threads 1 --steps 100 --out benchmarks/results/low_rank_rt50.json
    python benchmarks/low_rank.py --threads 1 --sparsity 0.25 0.5 0.75 --latency --variants low_rank_relative_late50 \
        dense svd_after fwsvd_after fwsvd_relative_after --out benchmarks/results/low_rank_rt_sweep.json
    python benchmarks/low_rank.py --smoke --out /tmp/lr.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

DURING = {"low_rank": {"importance": "fisher"}, "low_rank_at_updates": {"importance": "fisher", "projection": "at_updates"},
          "low_rank_plain": {"importance": "none"}, "low_rank_relative": {"importance": "fisher", "allocation": "relative"},
          "low_rank_late": {"importance": "fisher"}, "low_rank_relative_late": {"importance": "fisher",
                                                                                "allocation": "relative"}}
DURING["low_rank_oneshot_late"] = {"importance": "fisher"}
DURING["low_rank_late50"] = {"importance": "fisher"}
DURING["low_rank_relative_late50"] = {"importance": "fisher", "allocation": "relative"}
DURING["low_rank_relative_late60"] = {"importance": "fisher", "allocation": "relative"}
DURING["low_rank_relative_oneshot80"] = {"importance": "fisher", "allocation": "relative"}
WINDOW = {"low_rank_late": (0.3, 0.7), "low_rank_relative_late": (0.3, 0.7), "low_rank_oneshot_late": (0.8, 0.8),
          "low_rank_late50": (0.5, 0.8), "low_rank_relative_late50": (0.5, 0.8), "low_rank_relative_late60": (0.6, 0.9),
          "low_rank_relative_oneshot80": (0.8, 0.8)}
SCHEDULE = {"low_rank_oneshot_late": "oneshot", "low_rank_relative_oneshot80": "oneshot"}  # default cubic over the window (default window 0.1 -> 0.6)
AFTER = {"svd_after": {"importance": "none"}, "fwsvd_after": {"importance": "fisher"},
         "fwsvd_relative_after": {"importance": "fisher", "allocation": "relative"},
         "svd_relative_after": {"importance": "none", "allocation": "relative"}}


def _setup(args):
    if args.smoke:
        model = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=2))
        data = {s: common.synthetic_encoded(64, seed=i) for i, s in enumerate(("train", "validation", "test"))}
        return model, data
    model, tok = common.load_minilm(seed=args.seed)
    return model, common.load_rt_encoded(tok, seed=0, max_train=None, max_eval=args.max_eval, max_len=64)


def _export_and_measure(name, model, pruner, test, extra) -> dict:
    row = common.export_low_rank(model, pruner, lambda m: common.accuracy(m, test))
    return {"variant": name, "test_accuracy": row.pop("exported"), "projected_test_accuracy": row.pop("projected"),
            **row, **extra}


def _median_step_s(model, batches, reps: int = 5) -> float:
    """Median seconds of one training step of ``model`` (forward, backward, an SGD step at lr 0: weights unchanged)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    model.train()
    for batch in batches[:reps]:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _median_projection_s(granularity, reps: int = 5) -> float:
    """Median seconds of one projection of every factorised target (after export: the old weights, detached)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        granularity._project(force=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_during(name, args, data, template, sparsity) -> dict:
    from prune_callbacks import Pruner

    common.seed_everything(args.seed)
    model = copy.deepcopy(template)
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=args.steps, warmup=args.steps // 10)
    start, end = WINDOW.get(name, (0.1, 0.6))
    schedule = SCHEDULE.get(name, "cubic")
    window = dict(start_step=start) if schedule == "oneshot" else dict(start_step=start, end_step=end)
    pruner = Pruner(model, dict(granularity="low_rank", final_sparsity=sparsity, schedule=schedule,
                                granularity_settings=DURING[name], **window),
                    total_steps=args.steps).attach(optimizer)
    batches = common.train_batches(data["train"], steps=args.steps, batch_size=16, seed=args.seed)
    wall = common.train(model, batches, optimizer, scheduler)
    test = common.eval_batches(data["test"])
    timing = {"step_s_median": _median_step_s(model, batches)} if name == "low_rank" and not args.latency else {}
    row = _export_and_measure(name, model, pruner, test, {"train_wall_s": round(wall, 1), "window": [start, end],
                                                          "schedule": schedule,
                                                          "settings": DURING[name], **timing})
    if timing:  # the projection at the final ranks, against a training step of the unfactorised model
        row["projection_s_median"] = _median_projection_s(pruner.groups[0].granularity)
    return row, model


PEERS = ("unstructured", "ffn_neurons")  # pruning while fine-tuning at the same count of removed weights


def run_peer(name, args, data, template, sparsity) -> dict:
    """Unstructured (taylor, global) or FFN-neuron pruning riding the same fine-tune (cubic 10% -> 60%), removing
    the same number of block weights as low rank at ``sparsity``: unstructured prunes the same targets at
    ``sparsity``; FFN neurons only span the FFN weights, so their fraction is ``sparsity * targeted / ffn``."""
    from prune_callbacks import Pruner
    from prune_callbacks.core.targets import find_targets

    common.seed_everything(args.seed)
    model = copy.deepcopy(template)
    targeted = sum(t.numel for t in find_targets(model))
    ffn = sum(t.numel for t in find_targets(model) if t.name.endswith(("intermediate.dense", "output.dense"))
              and ".attention." not in t.name)
    fraction = sparsity if name == "unstructured" else sparsity * targeted / ffn
    if fraction >= 1:
        return {"variant": name, "not_run": f"needs {fraction:.3f} of the FFN neurons"}
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=args.steps, warmup=args.steps // 10)
    pruner = Pruner(model, dict(granularity=name, final_sparsity=fraction, start_step=0.1, end_step=0.6),
                    total_steps=args.steps).attach(optimizer)
    wall = common.train(model, common.train_batches(data["train"], steps=args.steps, batch_size=16, seed=args.seed),
                        optimizer, scheduler)
    pruner.finalize()
    removed = sum(int((t.param == 0).sum()) for t in find_targets(model))
    return {"variant": name, "final_sparsity": fraction, "removed_block_weights": removed,
            "removed_fraction_of_targeted": removed / targeted, "train_wall_s": round(wall, 1),
            "test_accuracy": common.accuracy(model, common.eval_batches(data["test"]))}


def run_dense(args, data, template):
    common.seed_everything(args.seed)
    model = copy.deepcopy(template)
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=args.steps, warmup=args.steps // 10)
    batches = common.train_batches(data["train"], steps=args.steps, batch_size=16, seed=args.seed)
    wall = common.train(model, batches, optimizer, scheduler)
    test = common.eval_batches(data["test"])
    return model, {"variant": "dense", "test_accuracy": common.accuracy(model, test), "train_wall_s": round(wall, 1),
                   "params": sum(p.numel() for p in model.parameters())}


def run_after(name, args, data, dense, sparsity) -> dict:
    from prune_callbacks import Pruner

    model = copy.deepcopy(dense)
    importance = AFTER[name]["importance"]
    pruner = Pruner(model, dict(granularity="low_rank", final_sparsity=sparsity,
                                granularity_settings=AFTER[name]), total_steps=args.steps)
    if importance == "fisher":  # squared gradients from --calib extra batches, no optimizer step
        model.train()
        for batch in common.train_batches(data["train"], steps=args.calib, batch_size=16, seed=1):
            model(**batch).loss.backward()
            pruner.before_optimizer_step()
            model.zero_grad(set_to_none=True)
    pruner.update_masks(sparsity)
    return _export_and_measure(name, model, pruner, common.eval_batches(data["test"]),
                               {"calibration_batches": args.calib if importance == "fisher" else 0}), model


def _latency(args, dense, exported: dict) -> dict:
    """Median forward seconds of the dense model and every exported one (batch 1 and 32), interleaved."""
    from benchmarks.structured_latency import interleaved_medians

    models = {"dense": dense.eval(), **exported}
    vocab = dense.config.vocab_size
    rounds = {1: 2 if args.smoke else args.rounds1, 32: 1 if args.smoke else args.rounds32}
    seq = 16 if args.smoke else args.latency_seq
    out = {"seq": seq, "rounds": rounds, "threads": args.threads,
           "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}}
    for batch, reps in rounds.items():
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(x)
        out[f"b{batch}_median_s"] = interleaved_medians(models, lambda m: m(input_ids=x, attention_mask=mask), reps,
                                                        label=f"batch {batch}")
    return out


def models_from_ranks(template, paths, variants=None) -> dict:
    """``{variant@sparsity: model}`` with the shapes of every exported row in the result files ``paths``: each target
    with a rank below break-even becomes two thin Linears of that rank (random orthonormal basis: for timing only,
    latency depends on the shapes, not the values). ``variants``: only those rows."""
    import json

    from prune_callbacks.export.low_rank.factorize import _set_module, factorize_linear

    g = torch.Generator().manual_seed(0)
    models = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            if not row.get("ranks") or (variants is not None and row["variant"] not in variants):
                continue
            model = copy.deepcopy(template).eval()
            for name, rank in row["ranks"].items():
                linear = model.get_submodule(name)
                m, n = linear.weight.shape
                if rank is not None and rank * (m + n) < m * n:
                    basis = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
                    _set_module(model, name, factorize_linear(linear, basis))
            sparsity = row.get("sparsity", data["sparsity"])  # older files: one sparsity per file
            models[f"{row['variant']}@{sparsity}"] = model
    return models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["low_rank", "low_rank_plain", "dense", "svd_after", "fwsvd_after"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                    help="fraction(s) of the targeted parameters removed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", action="store_true", help="CPU latency of every exported model vs dense")
    ap.add_argument("--latency-seq", type=int, default=128)
    ap.add_argument("--latency-from", nargs="+", type=Path, default=None,
                    help="no training: time models with the ranks of these result files' rows (those of "
                         "--variants) against dense")
    ap.add_argument("--rounds1", type=int, default=20, help="latency rounds at batch 1")
    ap.add_argument("--rounds32", type=int, default=5, help="latency rounds at batch 32")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--calib", type=int, default=16, help="gradient batches for fwsvd_after")
    ap.add_argument("--max-eval", type=int, default=None, help="cap the test split (default: all of it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "low_rank_rt50.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.calib = min(args.steps, 12), min(args.calib, 2)
    common.set_threads(args.threads)
    for name in args.variants:
        if name not in DURING and name not in AFTER and name not in PEERS and name != "dense":
            raise SystemExit(f"unknown variant {name!r}; valid: {', '.join([*DURING, 'dense', *AFTER, *PEERS])}")
    result = {"benchmark": "low_rank", "hardware": common.hardware_info(), "steps": args.steps, "lr": args.lr,
              "sparsity": args.sparsity, "seed": args.seed, "batch_size": 16, "max_len": 64,
              "schedule": "cubic 0.1 -> 0.6 unless the row's window says otherwise", "smoke": args.smoke, "rows": []}
    if args.latency_from:
        template = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=2)) if args.smoke \
            else common.load_minilm(seed=0)[0]
        result.update(rows=[], latency_from=[str(p) for p in args.latency_from],
                      latency=_latency(args, template, models_from_ranks(template, args.latency_from, args.variants)))
        common.write_json(args.out, result)
        return result
    model, data = _setup(args)
    result["test_examples"] = len(data["test"])
    dense, exported = None, {}
    for sparsity in args.sparsity:
        for name in args.variants:
            started = time.time()
            if name in DURING:
                row, out_model = run_during(name, args, data, model, sparsity)
            elif name in PEERS:
                row, out_model = run_peer(name, args, data, model, sparsity), None
            else:
                if dense is None:
                    dense, dense_row = run_dense(args, data, model)
                    if "dense" in args.variants:
                        result["rows"].append(dense_row)
                        print(dense_row, flush=True)
                if name == "dense":
                    continue
                row, out_model = run_after(name, args, data, dense, sparsity)
            row["sparsity"], row["seed"] = sparsity, args.seed
            row["wall_s"] = round(time.time() - started, 1)
            result["rows"].append(row)
            if args.latency and out_model is not None:
                exported[f"{name}@{sparsity}"] = out_model.eval()
            print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
            common.write_json(args.out, result)
    if args.latency:
        result["latency"] = _latency(args, model if dense is None else dense, exported)
    try:
        import os

        result["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
