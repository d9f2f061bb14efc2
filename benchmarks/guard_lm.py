"""Accuracy guard with a loss-like criterion (issue 15): SmolLM2-135M on KJV, guarded on held-out perplexity.

``accuracy_guard={"metric": "eval_perplexity", "max_drop": R, "relative": True}``: a name containing
"perplexity" is minimised, so the guard fails an evaluation when perplexity rises above
``baseline * (1 + R)``. The guarded run (``AcceleratePruningHook(..., evaluate=fn)``, ``final_sparsity`` =
``--upper`` as the bound) is followed by a fixed cubic run to the sparsity it found, same budget.
Data and model come from ``benchmarks/causal_lm_peers.py`` (`build`, `held_out_perplexity`): the guard
evaluates on the first half of the ``--eval-blocks`` held-out blocks, the other half is reported.

    python benchmarks/guard_lm.py --threads 1 --steps 48 --max-drop 0.1
    python benchmarks/guard_lm.py --smoke --out /tmp/glm.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import causal_lm_peers as lm  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.guard import _accelerator, plot  # noqa: E402
from prune_callbacks import PruningConfig  # noqa: E402


def run(make, train, guard_blocks, report_blocks, args, *, final_sparsity, guard) -> dict:
    from transformers import get_scheduler

    from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

    model = make()
    acc = _accelerator()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps)
    model, opt = acc.prepare(model, opt)
    cfg = PruningConfig(final_sparsity=final_sparsity, saliency="taylor", schedule="cubic", start_step=0.1,
                        end_step=0.6, update_every=args.update_every, **({"accuracy_guard": guard} if guard else {}))
    hook = AcceleratePruningHook(cfg, total_steps=args.steps, log_every=0)
    cost = {"evaluations": 0, "eval_s": 0.0}

    def evaluate():
        t0 = time.perf_counter()
        ppl = lm.held_out_perplexity(model, guard_blocks, batch_size=4)
        cost["evaluations"] += 1
        cost["eval_s"] += time.perf_counter() - t0
        return {"eval_perplexity": ppl, "eval_loss": math.log(ppl)}

    hook.register(acc, model, opt, evaluate=evaluate if guard else None)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        ids = train[order[(torch.arange(args.batch_size) + step * args.batch_size) % len(train)]]
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    report = hook.finalize()
    wall = time.perf_counter() - t0
    record = {"guarded": guard is not None, "config": cfg.model_dump(mode="json"), "steps": args.steps,
              "tokens": args.steps * args.batch_size * args.seq_len, "wall_s": round(wall, 1),
              "achieved_sparsity": lm.measured_sparsity(model),
              "reported_perplexity": lm.held_out_perplexity(model, report_blocks, batch_size=4),
              "guard_set_perplexity": lm.held_out_perplexity(model, guard_blocks, batch_size=4)}
    if guard is not None:
        (gr,) = report["accuracy_guard"]
        record.update(guard_final=gr["final"], trajectory=gr["trajectory"], evaluations=cost["evaluations"],
                      eval_s=round(cost["eval_s"], 1), eval_share=round(cost["eval_s"] / wall, 3))
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--update-every", type=int, default=4)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--max-drop", type=float, default=0.1, help="relative: allowed perplexity rise (0.1 = +10%%)")
    p.add_argument("--upper", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-cache-dir", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS / "guard_smollm2_kjv.json")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    if args.smoke:
        args.steps, args.eval_blocks, args.seq_len = min(args.steps, 24), min(args.eval_blocks, 8), 32
    make, train, held, desc, _ = lm.build(args)
    half = len(held) // 2
    guard_blocks, report_blocks = held[:half], held[half:]
    guard = {"metric": "eval_perplexity", "max_drop": args.max_drop, "relative": True, "every": args.every,
             "patience": 2}
    results = {"benchmark": "guard_lm", "model": desc, "data": "KJV (prune_callbacks.assets.load_kjv)",
               "budget": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                          "tokens": args.steps * args.batch_size * args.seq_len, "guard_blocks": half,
                          "report_blocks": len(held) - half},
               "guard": guard, "upper_bound": args.upper, "hardware": common.hardware_info(), "runs": []}
    results["base_reported_perplexity"] = lm.held_out_perplexity(make(), report_blocks, batch_size=4)
    guarded = run(make, train, guard_blocks, report_blocks, args, final_sparsity=args.upper, guard=guard)
    guarded["name"] = f"guard_ppl_+{args.max_drop:.0%}"
    results["runs"].append(guarded)
    print(f"[guard_lm] guarded: sparsity {guarded['achieved_sparsity']:.4f} ppl {guarded['reported_perplexity']:.2f} "
          f"({guarded['evaluations']} evals, {guarded['eval_s']} s of {guarded['wall_s']} s)", flush=True)
    common.write_json(args.out, results)
    found = round(guarded["guard_final"]["sparsity"], 4)
    if found > 0:
        fixed = run(make, train, guard_blocks, report_blocks, args, final_sparsity=found, guard=None)
        fixed["name"] = f"fixed_cubic_at_{found}"
        results["runs"].append(fixed)
        print(f"[guard_lm] fixed cubic to {found}: ppl {fixed['reported_perplexity']:.2f} ({fixed['wall_s']} s)",
              flush=True)
    import os

    results["load_average_at_end"] = os.getloadavg()
    common.write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
