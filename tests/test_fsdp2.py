"""FSDP2 (``fully_shard``) on CPU/gloo under torchrun: the sharded pruner against a single-process reference.

The script (tests/fsdp2_script.py) runs the sharded pruner and an unsharded reference side by side on every
rank with identical, seeded element-wise steps; here we assert what it recorded.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import rank_results

SCRIPT = Path(__file__).with_name("fsdp2_script.py")


def launch(out, cases, nproc=2, extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(SCRIPT), str(out), ",".join(cases), *([str(extra)] if extra else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return {c: rank_results(out, nproc, prefix=f"{c}-") for c in cases}


def assert_same_as_reference(ranks, n_updates=4):
    for r in ranks:
        assert len(r["updates"]) == n_updates or n_updates is None
        for update in r["updates"]:
            assert update["equal"] and all(update["equal"].values()), update
        assert r["sharded"] == r["ref"]  # figures global: every rank reports the whole model's counts


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_2")
    dcp = out / "dcp"
    return out, launch(out, ["global", "per_layer", "nm", "ffn", "attach", "resume", "unit_resume", "refusals",
                             "guard", "distill"], nproc=2, extra=dcp), dcp


@pytest.mark.slow
@pytest.mark.parametrize("case", ["global", "per_layer", "nm", "resume"])
def test_masks_bitwise_equal_to_single_process(two_ranks, case):
    _, results, _ = two_ranks
    ranks = results[case]
    assert_same_as_reference(ranks)
    for r in ranks:
        assert r["masks_local"]  # masks sized from the local shard, not the whole weight
        assert r["sharded"]["skipped_steps"] == 1  # the non-finite step, seen by rank 0 only, skipped by all
        assert r["local_shapes"]["model.layers.0.mlp.up_proj"] == [96 // r["world_size"], 32]


@pytest.mark.slow
def test_ffn_neurons_sharded_then_slimmed_from_the_full_state_dict(two_ranks):
    _, results, _ = two_ranks
    ranks = results["ffn"]
    assert_same_as_reference(ranks)  # unit masks equal (unit sums: local rows + one all-reduce)
    for r in ranks:
        assert r["kept_per_block"] == {"model.layers.0": 48, "model.layers.1": 48}
    slimmed = ranks[0]["slim"]
    assert slimmed["intermediate"] == [48, 48]  # 96 -> 48 neurons, cut from the gathered full state dict
    assert slimmed["max_logit_diff"] < 1e-4  # the slim model computes what the masked one did


@pytest.mark.slow
def test_unit_taylor_sharded_selects_like_one_process_and_resumes_from_dcp(two_ranks):
    _, results, _ = two_ranks
    ranks = results["unit_resume"]
    assert_same_as_reference(ranks)  # signed unit sums of local rows, all-reduced every step; resumed at step 4
    for r in ranks:
        assert r["kept_per_block"] == {"model.layers.0": 48, "model.layers.1": 48}
        assert r["saliency_bytes"] == 4 * 96 * 2  # one float32 per neuron, whole on every rank (not per weight)


@pytest.mark.slow
def test_pruned_count_exact_and_memory_per_rank(two_ranks):
    _, results, _ = two_ranks
    ranks = results["global"]
    for r in ranks:
        assert r["sharded"]["pruned_params"] == r["expected_pruned"]
        # 4 B (taylor EMA) + 1 B (mask) per *local* weight: half the model's targets on each of 2 ranks
        assert r["saliency_bytes"] == 4 * r["mask_bytes"]
    assert sum(r["mask_bytes"] for r in ranks) == ranks[0]["sharded"]["prunable_params"]


@pytest.mark.slow
def test_nm_groups_whole_on_each_rank(two_ranks):
    _, results, _ = two_ranks
    for r in results["nm"]:
        assert min(r["kept_per_group"]) == 2 and max(r["kept_per_group"]) <= 4  # never below N=2 of M=4


@pytest.mark.slow
def test_attach_loop_keeps_pruned_weights_zero(two_ranks):
    _, results, _ = two_ranks
    a, b = results["attach"]
    assert all(a["zeros_every_step"]) and all(b["zeros_every_step"])
    assert a["report"] == b["report"] and a["report"]["mask_updates"] == 4
    assert a["report"]["pruned_params"] == round(a["report"]["mask_sparsity"] * a["report"]["prunable_params"])
    # recovery_lr_scale=3 on sharded parameters: the 8 steps up to the last mask update at the run's rate, the two
    # after it at 3x (a ramp of one step); the rate put back after every step, the same on both ranks
    assert a["lr_used"] == b["lr_used"] == [1e-2] * 8 + [pytest.approx(3e-2)] * 2
    assert a["lr_after"] == b["lr_after"] == [1e-2] * 10


@pytest.mark.slow
def test_finalize_full_state_dict_loads_with_vanilla_from_pretrained(two_ranks):
    from transformers import AutoModelForCausalLM

    out, results, _ = two_ranks
    assert all(r["finalize_zeros_in_shards"] for r in results["global"])
    assert results["global"][0]["full_zeros_match"]
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    ref = torch.load(out / "ref_masks.pt")
    modules = dict(model.named_modules())
    for name, mask in ref.items():
        assert torch.equal(modules[name].weight == 0, mask), name
    # the compressed checkpoint is written from the gathered model, and reads back bitwise
    from prune_callbacks.export.sparse_io import load_sparse, save_sparse

    save_sparse(model, out / "sparse")
    back = dict(load_sparse(out / "sparse").named_parameters())
    assert all(torch.equal(back[n], p) for n, p in model.named_parameters())


@pytest.mark.slow
def test_four_ranks_and_resume_resharded_from_two(two_ranks, tmp_path):
    _, _, dcp = two_ranks
    results = launch(tmp_path, ["global", "nm", "uneven", "heads", "resume_from"], nproc=4, extra=dcp)
    assert_same_as_reference(results["heads"])  # KV groups of 16 rows split over ranks holding 8 rows each
    assert all(r["kept_per_block"] == {"model.layers.0": 1, "model.layers.1": 1} for r in results["heads"])
    assert_same_as_reference(results["global"])
    assert_same_as_reference(results["uneven"])  # a rank holding no rows of a target, uneven row blocks
    assert [r["local_shapes"]["layers.0"] for r in results["uneven"]] == [[1, 32], [1, 32], [1, 32], [0, 32]]
    assert [r["local_shapes"]["layers.1"][0] for r in results["uneven"]] == [18, 18, 18, 16]
    assert_same_as_reference(results["nm"])
    assert all(r["local_shapes"]["model.layers.0.mlp.up_proj"] == [24, 32] for r in results["global"])
    for r in results["resume_from"]:  # DCP resharded the 2-rank masks and EMAs into 4 ranks
        assert_same_as_reference([r], n_updates=1)


@pytest.mark.slow
def test_no_rank_materialises_all_scores_or_a_full_mask(tmp_path):
    results = launch(tmp_path, ["alloc"], nproc=2)
    for r in results["alloc"]:
        # the biggest tensor any op created during a mask update (the radix histogram, 2**20 counts) is smaller
        # than any whole target: a gathered score vector or a full-size mask would be at least that big
        assert r["largest_numel"] < r["smallest_global"], r
        # the per-step hook: one 8-byte all-reduce (the skipped-step agreement), no gather of anything
        assert r["hook_collectives"] == [["all_reduce", 8]], r["hook_collectives"]
        assert r["hook_largest_numel"] <= r["largest_local"]  # the hook touches local shards only


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("tensor_parallel", ["NotImplementedError", "tensor parallel", "Shard(dim=1)"]),
    ("fsdp1", ["NotImplementedError", "FSDP1 FlatParameter"]),
    ("zero3", ["NotImplementedError", "DeepSpeed ZeRO-3"]),
    ("blocks", ["NotImplementedError", "granularity='blocks'", "FSDP2"]),
    ("l1", ["NotImplementedError", "l1_lambda=0.1"]),
    ("low_rank", ["NotImplementedError", "granularity='low_rank'", "FSDP2"]),
    ("srste", ["NotImplementedError", "granularity='2:4-srste'", "FSDP2"]),
])
def test_unsupported_sharding_refused_with_its_reason(two_ranks, case, words):
    _, results, _ = two_ranks
    for r in results["refusals"]:
        assert r[case] is not None and all(w in r[case] for w in words), r[case]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import fsdp2

    out = tmp_path / "fsdp2.json"
    fsdp2.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    one, two = rows
    assert one["pruned_params"] == two["pruned_params"]  # exact count, sharded or not
    assert one["collective_bytes_per_update"] == 0 < two["collective_bytes_per_update"]
    assert two["pruning_bytes_per_rank"] * 2 == one["pruning_bytes_per_rank"]  # the local shard's share


@pytest.mark.slow
def test_accuracy_guard_decides_and_rolls_back_like_a_single_process(two_ranks):
    _, results, _ = two_ranks
    for r in results["guard"]:
        assert_same_as_reference([r], n_updates=8)  # masks after every step, rollback included
        assert r["guard_equal"]
        assert [t["decision"] for t in r["guard"]["trajectory"]] == ["baseline", "continue", "continue", "rollback",
                                                                      "continue"]


@pytest.mark.slow
def test_step_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import fsdp2_step

    out = tmp_path / "fsdp2_step.json"
    fsdp2_step.main(["--smoke", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["world_size"] == 2 and row["timed_steps_per_variant"] == 3
    assert row["pruned_params"] == round(0.5 * row["prunable_params"])  # global count over both shards
    assert row["mask_update_steps"] == sum(row["update_at"]) > 0  # masks were updated inside the timed blocks
    # taylor: 4 B EMA + 1 B mask + 4 B work buffer per local weight, half of the weights on each of 2 ranks
    assert row["pruning_bytes_per_rank"] == [9 * row["prunable_params"] // 2] * 2
    assert row["dense_ms"] > 0 and row["pruned_ms"] > 0


@pytest.mark.slow
def test_distillation_with_a_sharded_teacher_and_self_refused(two_ranks):
    _, results, _ = two_ranks
    for r in results["distill"]:
        assert_same_as_reference([r])  # masks bitwise equal to a single process at every update
        assert r["sharded"]["pruned_params"] == r["expected_pruned"]
        assert all(math.isfinite(a) and a == b for a, b in r["losses"])  # the distilled loss, the same bits
        assert r["kd"][0] == r["kd"][1] and r["kd"][1] > 0  # the KD term ran (the teacher is another model)
        refusal = r["self_refusal"]
        assert refusal is not None and all(w in refusal for w in ["DistillationConfigError", "teacher='self'",
                                                                   "DTensor", "fully_shard", "teacher=<that module>"])


@pytest.mark.slow
def test_accelerate_hook_on_a_model_sharded_with_fully_shard(tmp_path):
    """Accelerator(cpu=True) under torchrun (MULTI_CPU: Accelerate's FSDP plugin never applies on CPU), the model
    sharded by the user, only the optimizer prepared: the hook prunes the local rows like a single process, with
    AccelerateDistillationHook and a sharded teacher."""
    results = launch(tmp_path, ["accelerate"], nproc=2)
    for r in results["accelerate"]:
        assert r["distributed_type"] == "MULTI_CPU" and r["sharded_pruner"]
        assert_same_as_reference([r])  # masks bitwise equal at every update; figures global on every rank
        assert r["sharded"]["pruned_params"] == r["expected_pruned"]
        assert r["dcp_written"] and r["restored"]  # save_state / load_state carry the pruning state (DCP)
        assert r["kd"] is not None and r["kd"] > 0  # AccelerateDistillationHook with a sharded teacher ran
        assert "save_sparse_to=" in r["export_refusal"] and "full_state_dict" in r["export_refusal"]
        assert r["zeros_after_finalize"]
