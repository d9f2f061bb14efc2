"""Run by tests/test_fsdp2.py under ``torchrun --nproc_per_node N`` (CPU, gloo): a tiny Llama sharded with
FSDP2 (``fully_shard``) pruned beside a single-process reference of the same model on every rank.

Both are driven by element-wise steps: the gradients come from one seeded generator (identical on both),
the optimizer is SGD with lr 0.5 (a power of two: one rounding, whatever the kernel), so every score is
bitwise equal and any difference in the masks is the sharded selection's. Shapes keep every local block a
multiple of 32 elements, so no element moves between a kernel's vector body and its scalar tail.

Usage: ``fsdp2_script.py <out_dir> <case>[,<case>...] [<dcp_dir>]``; each rank writes ``<out_dir>/<case>-rank<r>.json``.
Cases: ``global`` (caps), ``per_layer``, ``nm`` (2:4), ``attach`` (a real forward/backward loop),
``distill`` (a sharded teacher; "self" refused), ``accelerate`` (AcceleratePruningHook, own fully_shard), ``resume`` (DCP save at step 4, resume into a fresh pruner), ``unit_resume`` (the same with FFN neurons
scored by ``unit_taylor``), ``resume_from`` (load <dcp_dir> written by
another world size), ``alloc`` (largest tensor any op creates during a mask update).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.engine.sharded_state import load_sharded_state, save_sharded_state
from prune_callbacks.methods.sharding import layout_of, local

from helpers import end_world  # tests/ is this script's directory, first on sys.path

STEPS = 8
NAN_STEP = 3  # a non-finite gradient in rank 0's rows only: every rank must skip it


def tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def uneven(seed=0):
    """Row counts FSDP2 splits unevenly: 3 rows on 4 ranks leaves rank 3 none; 70 rows give 18, 18, 18, 16."""
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(32, 3), nn.Linear(32, 70), nn.Linear(64, 32)])
    return model


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers if hasattr(model, "model") else model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def config(case):
    common = dict(start_step=2, end_step=STEPS, update_every=2, sync_masks=False)
    if case == "per_layer":
        return PruningConfig(final_sparsity=0.6, scope="per_layer", **common)
    if case == "nm":
        return PruningConfig(granularity="2:4", **common)
    if case == "ffn":
        return PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, **common)
    if case == "unit_resume":  # the unit-level saliency: signed unit sums all-reduced every step, DCP resume
        return PruningConfig(granularity="ffn_neurons", saliency="unit_taylor", final_sparsity=0.5, **common)
    if case == "heads":
        return PruningConfig(granularity="attention_heads", final_sparsity=0.5, **common)
    return PruningConfig(final_sparsity=0.6, min_layer_sparsity=0.3, max_layer_sparsity=0.75, **common)


def set_grads(model, gen, step):
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen) * 0.05
        if step == NAN_STEP and name.endswith("layers.0.self_attn.q_proj.weight"):
            g[0, 0] = float("nan")
        if type(p).__name__ == "DTensor":
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)  # local slicing, no comms
        p.grad = g


def elementwise_step(model, pruner, opt, gen, step):
    set_grads(model, gen, step)
    pruner.before_optimizer_step()
    if step == NAN_STEP:
        opt.zero_grad(set_to_none=True)  # the weights stay finite; only the pruner's decision is tested
    opt.step()
    pruner.after_optimizer_step(opt)
    opt.zero_grad(set_to_none=True)


def compare(ref, sharded):
    """Per target: whether this rank's mask equals the same rows of the reference mask, bitwise."""
    if not ref.groups[0].granularity.elementwise:  # unit masks: one bool per unit, the same on every rank
        return {n: bool(torch.equal(a, b)) for n, a, b in zip(ref.groups[0].granularity.mask_names, ref.pruned,
                                                                 sharded.pruned)}
    out = {}
    for rt, rm, st, sm, src in zip(ref.targets, ref.pruned, sharded.targets, sharded.pruned,
                                    sharded.groups[0].granularity.sources):
        layout = layout_of([src])
        start = layout.offsets[0]
        want = rm.reshape(-1)[start:start + sm.numel()].view(sm.shape)
        out[rt.name] = bool(torch.equal(want, sm)) and rt.name == st.name
    return out


def figures(report):
    return {k: report[k] for k in ("global_sparsity", "pruned_params", "prunable_params", "mask_sparsity",
                                   "skipped_steps", "mask_updates")} | {
        "per_target": {n: r["pruned"] for n, r in report["per_target"].items()}}


def run_pair(case, rank, resume_dir=None):
    build = {"uneven": uneven, "heads": lambda: tiny_llama(num_key_value_heads=2)}.get(case, tiny_llama)
    ref_model, model = build(), shard(build())
    ref = Pruner(ref_model, config(case))
    pruner = Pruner(model, config(case))
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref_model, model))
    g_ref, g_sh = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    result = {"updates": []}
    for step in range(1, STEPS + 1):
        elementwise_step(ref_model, ref, ref_opt, g_ref, step)
        elementwise_step(model, pruner, opt, g_sh, step)
        if step == 4 and resume_dir is not None:  # swap in a fresh pruner resumed from DCP
            save_sharded_state(pruner, resume_dir)
            pruner.detach()
            pruner = Pruner(model, config(case))
            load_sharded_state(pruner, resume_dir)
        if ref.schedule.is_update_step(step):
            result["updates"].append({"step": step, "equal": compare(ref, pruner)})
    result["ref"], result["sharded"] = figures(ref.report()), figures(pruner.report())
    result["expected_pruned"] = round(ref.mask_sparsity * ref.report()["prunable_params"])
    result["local_shapes"] = {t.name: list(m.shape) for t, m in zip(pruner.targets, pruner.pruned)}
    result["masks_local"] = not pruner.groups[0].granularity.elementwise or all(tuple(m.shape) == tuple(local(t.param).shape) for t, m in zip(pruner.targets, pruner.pruned))
    result["saliency_bytes"] = sum(b.numel() * b.element_size() for bufs in pruner.saliency.buffers.values() for b in bufs)
    result["mask_bytes"] = sum(m.numel() for m in pruner.pruned)
    if case in ("ffn", "heads", "unit_resume"):
        result["kept_per_block"] = pruner.report()["groups"][0]["kept_per_block"]
    if case == "nm":
        kept = torch.cat([(~m).reshape(-1, 4).sum(-1) for m in pruner.pruned])
        result["kept_per_group"] = sorted(set(kept.tolist()))
    return ref_model, model, ref, pruner, result


def finalize_and_save(model, ref, pruner, out, rank, result):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    pruner.finalize()
    local_zeros = all(bool((local(t.param)[m] == 0).all()) for t, m in zip(pruner.targets, pruner.pruned))
    result["finalize_zeros_in_shards"] = local_zeros
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        result["full_zeros_match"] = all(
            torch.equal(full[f"{t.name}.weight"] == 0, m) for t, m in zip(ref.targets, ref.pruned))
        model.save_pretrained(Path(out, "hf"), state_dict=full)
        torch.save({t.name: m for t, m in zip(ref.targets, ref.pruned)}, Path(out, "ref_masks.pt"))


def slim_from_full_state(model, pruner, rank, result):
    """finalize, gather the full state dict, load it into an unsharded copy on rank 0 and slim that."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from prune_callbacks.export import slim, structured_keep

    pruner.finalize()
    keep = structured_keep(pruner)  # unit masks are the same on every rank
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = tiny_llama()
        plain.load_state_dict(full)
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            before = plain(input_ids=ids).logits
            slim(plain, keep)
            after = plain(input_ids=ids).logits
        result["slim"] = {"intermediate": [m.mlp.up_proj.weight.shape[0] for m in plain.model.layers],
                          "max_logit_diff": float((before - after).abs().max())}


def attach_loop(rank):
    """A real sharded forward/backward loop through attach(): zeros where masked after every step. Two steps past
    the last mask update with ``recovery_lr_scale``: the rate each step used (seen by a hook after the pruner's)
    and the rate left after it (the pruner puts it back)."""
    model = shard(tiny_llama())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, config("global").model_copy(update={"recovery_lr_scale": 3.0}),
                    total_steps=STEPS + 2).attach(opt)
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    gen = torch.Generator().manual_seed(5)
    ok, after = [], []
    for step in range(1, STEPS + 3):
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        after.append(opt.param_groups[0]["lr"])
        ok.append(all(bool((local(t.param)[m] == 0).all()) for t, m in zip(pruner.targets, pruner.pruned)))
    return {"zeros_every_step": ok, "report": figures(pruner.report()), "step": pruner.step, "lr_used": used,
            "lr_after": after}


def largest_allocation(rank):
    """Run one mask update under a dispatch mode that records the largest tensor any op returns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    # every target (2M weights) is larger than the radix select's largest histogram (2**20 counts)
    model = shard(tiny_llama(hidden_size=1024, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=4,
                             num_hidden_layers=1))
    pruner = Pruner(model, PruningConfig(include=["mlp"], final_sparsity=0.6, start_step=2, end_step=STEPS,
                                         min_layer_sparsity=0.3, max_layer_sparsity=0.75))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(2)
    for step in (1, 2):
        set_grads(model, gen, step)
        pruner.before_optimizer_step()
        opt.step()
    with Largest():
        pruner.update_masks(0.5)
    # one ordinary step: which collectives does the pruner's hook issue? (patched at the torch.distributed level)
    calls = []
    patched = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                      "broadcast", "reduce_scatter_tensor")}

    def spy(name):
        def call(tensor, *args, **kwargs):
            t = tensor if isinstance(tensor, torch.Tensor) else args[0]
            calls.append((name, t.numel() * t.element_size()))
            return patched[name](tensor, *args, **kwargs)
        return call

    set_grads(model, gen, 3)
    for name in patched:
        setattr(dist, name, spy(name))
    update_biggest, Largest.biggest = Largest.biggest, 0
    try:
        with Largest():
            pruner.before_optimizer_step()
            pruner.after_optimizer_step()
    finally:
        for name, fn in patched.items():
            setattr(dist, name, fn)
    return {"hook_collectives": calls, "hook_largest_numel": Largest.biggest, "largest_numel": update_biggest,
            "largest_local": max(m.numel() for m in pruner.pruned),
            "smallest_global": min(t.numel for t in pruner.targets)}


def guarded(rank):
    """The accuracy guard on a sharded pruner: a fake metric that breaks above 40% sparsity makes it hold and
    roll back; decisions and masks must match the single-process reference."""
    from prune_callbacks.controllers.guard.controller import add_guards

    def metric(pruner):
        return 0.9 if pruner.mask_sparsity <= 0.4 + 1e-9 else 0.5

    cfg = PruningConfig(final_sparsity=0.8, start_step=1, end_step=STEPS, update_every=1, schedule="linear",
                        sync_masks=False, accuracy_guard={"metric": "acc", "max_drop": 0.01, "every": 2, "patience": 1})
    ref_model, model = tiny_llama(), shard(tiny_llama())
    ref, pruner = Pruner(ref_model, cfg, total_steps=STEPS), Pruner(model, cfg, total_steps=STEPS)
    guards = [add_guards(p)[0] for p in (ref, pruner)]
    for g, p in zip(guards, (ref, pruner)):
        g.set_baseline(metric(p))
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref_model, model)]
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    updates = []
    for step in range(1, STEPS + 1):
        for m, p, o, g, guard in zip((ref_model, model), (ref, pruner), opts, gens, guards):
            elementwise_step(m, p, o, g, step)
            if step % 2 == 0:
                guard.report_metric(metric(p), step)
        updates.append({"step": step, "equal": compare(ref, pruner)})
    decisions = [{k: v for k, v in g.report().items() if k != "snapshot_bytes"} for g in guards]
    return {"updates": updates, "ref": figures(ref.report()), "sharded": figures(pruner.report()),
            "guard_equal": decisions[0] == decisions[1], "guard": decisions[1]}


def distilled(rank):
    """Distillation with a sharded student and a teacher sharded the same way (the user's fully_shard), through
    a real forward/backward loop; every rank feeds the same batch, so the sharded gradients (reduce-scatter sum,
    then / 2: exact) equal the single-process ones and the masks can be compared bitwise. Also: a "self" teacher
    of a sharded student is refused at attach, before any compute."""
    from prune_callbacks.controllers.distillation import DistillationConfig, DistillationConfigError, Distiller

    ref_model, model = tiny_llama(), shard(tiny_llama())
    ref_teacher, teacher = tiny_llama(seed=1), shard(tiny_llama(seed=1))  # another model: a non-zero KD term
    distillers = [Distiller(DistillationConfig(teacher=t, hardness=0.5)).attach(m)
                  for t, m in ((ref_teacher, ref_model), (teacher, model))]
    opts = [torch.optim.SGD(m.parameters(), lr=2**-4) for m in (ref_model, model)]
    ref, pruner = (Pruner(m, config("global")).attach(o) for m, o in zip((ref_model, model), opts))
    gen = torch.Generator().manual_seed(5)
    result = {"updates": [], "losses": []}
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        losses = []
        for m, o in zip((ref_model, model), opts):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(float(loss.detach()))
        result["losses"].append(losses)
        if ref.schedule.is_update_step(step):
            result["updates"].append({"step": step, "equal": compare(ref, pruner)})
    result["ref"], result["sharded"] = figures(ref.report()), figures(pruner.report())
    result["expected_pruned"] = round(ref.mask_sparsity * ref.report()["prunable_params"])
    result["kd"] = [d.figures().get("distill/kd_loss") for d in distillers]
    try:
        Distiller(DistillationConfig(teacher="self", snapshot="before_pruning")).attach(shard(tiny_llama()))
        result["self_refusal"] = None
    except DistillationConfigError as exc:
        result["self_refusal"] = f"{type(exc).__name__}: {exc}"
    return result


def accelerated(rank, out):
    """AcceleratePruningHook on a model the user sharded with fully_shard, Accelerator(cpu=True) (MULTI_CPU, gloo):
    only the optimizer is prepared; AccelerateDistillationHook with a teacher sharded the same way. Masks against a
    single-process reference (same batch on every rank, distilled alike), tracker logging every 2 steps (collective
    figures on every rank), save_state / load_state of the pruning state (DCP)."""
    from accelerate import Accelerator

    from prune_callbacks.controllers.distillation import DistillationConfig, Distiller
    from prune_callbacks.integrations.accelerate.distillation import AccelerateDistillationHook
    from prune_callbacks.integrations.accelerate.hook import PRUNING_DCP_DIR, AcceleratePruningHook

    acc = Accelerator(cpu=True)
    ref_model, model = tiny_llama(), shard(tiny_llama())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=2**-4)
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=2**-4))  # not the model: DDP fails on DTensors
    ref = Pruner(ref_model, config("global")).attach(ref_opt)
    hook = AcceleratePruningHook(config("global"), log_every=2)
    pruner = hook.register(acc, model, opt, total_steps=STEPS)
    Distiller(DistillationConfig(teacher=tiny_llama(seed=1), hardness=0.5)).attach(ref_model)
    distill = AccelerateDistillationHook(DistillationConfig(teacher=shard(tiny_llama(seed=1)), hardness=0.5))
    distill.register(acc, model, opt, pruning=hook)
    gen = torch.Generator().manual_seed(5)
    result = {"distributed_type": acc.distributed_type.value, "updates": [], "sharded_pruner": pruner.sharded}
    state_dir = Path(out, "accelerate_state")
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 64, (4, 12), generator=gen)  # the same batch on every rank (see distilled)
        ref_model(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        acc.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
        if ref.schedule.is_update_step(step):
            result["updates"].append({"step": step, "equal": compare(ref, pruner)})
        if step == 4:
            acc.save_state(str(state_dir))
            saved = ([m.clone() for m in pruner.pruned], pruner.step)
    result["ref"], result["sharded"] = figures(ref.report()), figures(hook.report())
    result["expected_pruned"] = round(ref.mask_sparsity * ref.report()["prunable_params"])
    result["dcp_written"] = Path(state_dir, PRUNING_DCP_DIR, ".metadata").is_file()
    result["kd"] = distill.figures().get("distill/kd_loss")
    acc.load_state(str(state_dir))  # back to step 4, on every rank's rows
    result["restored"] = pruner.step == saved[1] == 4 and all(torch.equal(a, b) for a, b in zip(pruner.pruned, saved[0]))
    try:
        hook.finalize(save_sparse_to=str(Path(out, "nope")))
        result["export_refusal"] = None
    except ValueError as exc:
        result["export_refusal"] = str(exc)
    hook.finalize()
    result["zeros_after_finalize"] = all(bool((local(t.param)[m] == 0).all()) for t, m in zip(pruner.targets, pruner.pruned))
    return result


def refusals(rank):
    """What stays refused, and the message each gives (every rank raises alike, before any collective)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def message(build):
        try:
            build()
        except (NotImplementedError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def tp_model():
        model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)))
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        model[0][0].weight = nn.Parameter(distribute_tensor(model[0][0].weight.detach(), mesh, [Shard(1)]))
        return Pruner(model, PruningConfig())

    def flat(attr):
        model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)))
        model[0][0].weight = nn.Parameter(torch.zeros(64))
        setattr(model[0][0].weight, attr, True)
        return Pruner(model, PruningConfig())

    return {
        "tensor_parallel": message(tp_model),
        "fsdp1": message(lambda: flat("_is_flat_param")),
        "zero3": message(lambda: flat("ds_id")),
        "blocks": message(lambda: Pruner(shard(tiny_llama()), PruningConfig(granularity="blocks", final_sparsity=0.5))),
        "l1": message(lambda: Pruner(shard(tiny_llama()), PruningConfig(l1_lambda=0.1))),
        "low_rank": message(lambda: Pruner(shard(tiny_llama()), PruningConfig(granularity="low_rank", final_sparsity=0.5))),
        "srste": message(lambda: Pruner(shard(tiny_llama()), PruningConfig(granularity="2:4-srste"))),
    }


def main(out, cases, extra=None):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases.split(","):
        torch.manual_seed(0)
        run_case(out, case, rank, extra)
        dist.barrier()
    end_world()


def run_case(out, case, rank, extra):
    if case == "guard":
        result = guarded(rank)
    elif case == "refusals":
        result = refusals(rank)
    elif case == "attach":
        result = attach_loop(rank)
    elif case == "distill":
        result = distilled(rank)
    elif case == "accelerate":
        result = accelerated(rank, out)
    elif case == "alloc":
        result = largest_allocation(rank)
    elif case == "resume_from":  # a checkpoint written by another world size, resharded by DCP
        ref_model, model = tiny_llama(), shard(tiny_llama())
        ref, pruner = Pruner(ref_model, config("global")), None
        ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref_model, model))
        g_ref, g_sh = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for step in range(1, STEPS + 1):
            elementwise_step(ref_model, ref, ref_opt, g_ref, step)
            if step <= 4:  # the model's weights follow the same steps; the pruner arrives by checkpoint
                set_grads(model, g_sh, step)
                if step == NAN_STEP:
                    opt.zero_grad(set_to_none=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 4:
                    pruner = Pruner(model, config("global"))
                    load_sharded_state(pruner, extra)
            else:
                elementwise_step(model, pruner, opt, g_sh, step)
        result = {"updates": [{"step": STEPS, "equal": compare(ref, pruner)}],
                  "ref": figures(ref.report()), "sharded": figures(pruner.report())}
    else:
        resume_dir = {"resume": Path(extra), "unit_resume": Path(extra).with_name("dcp_unit")}.get(case) if extra else None
        _, model, ref, pruner, result = run_pair("global" if case == "resume" else case, rank, resume_dir)
        if case == "global":
            finalize_and_save(model, ref, pruner, out, rank, result)
        if case == "ffn":
            slim_from_full_state(model, pruner, rank, result)
    result["world_size"] = dist.get_world_size()
    Path(out, f"{case}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
