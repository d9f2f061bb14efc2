"""Accuracy guard with 2 CPU processes (torchrun, gloo): every rank takes rank 0's decision.

Each rank's evaluation breaks at a different sparsity (rank 0 above 0.6, rank 1 above 0.3); the guard
broadcasts rank 0's value before each decision, so both ranks end with the same trajectory, sparsity,
masks and weights, and rank 1 ends where rank 0's metric put it, not where its own would have.
"""

from pathlib import Path

import pytest

from helpers import rank_results, run_torchrun

HERE = Path(__file__).parent
SCRIPTS = {"accelerate": HERE / "accelerate_scripts" / "ddp_guard.py", "trainer": HERE / "ddp_guard_trainer_script.py"}


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["accelerate", "trainer"])
def test_both_ranks_take_rank0s_decisions(tmp_path, adapter):
    pytest.importorskip("accelerate" if adapter == "accelerate" else "transformers")
    run_torchrun(SCRIPTS[adapter], tmp_path, timeout=170)
    r0, r1 = rank_results(tmp_path)
    assert r0["distributed"] and r1["distributed"] and r0["world_size"] == 2
    assert r0["trajectory"] == r1["trajectory"] and r0["final"] == r1["final"]
    assert r0["masks"] == r1["masks"] and r0["weights"] == r1["weights"]
    decisions = [t["decision"] for t in r0["trajectory"]]
    assert "hold" in decisions and "rollback" in decisions, r0["trajectory"]
    # rank 0's breaking point decided: the run ends above rank 1's own s* = 0.3, at or below rank 0's 0.6
    assert r0["final"]["met"] and 0.3 < r0["final"]["sparsity"] <= 0.6 + 1e-6, r0["trajectory"]
    # the test has teeth: rank 1 computed failing values where rank 0's passed
    assert r0["local"] != r1["local"]
