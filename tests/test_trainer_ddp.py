"""Two CPU processes under torchrun (gloo): every rank holds the same masks at every update and steps at the same
rate."""

from pathlib import Path

import pytest

from helpers import rank_results, run_torchrun

pytest.importorskip("transformers")

from prune_callbacks.core.state_io import STATE_FILE, load_state_file  # noqa: E402

SCRIPT = Path(__file__).with_name("ddp_trainer_script.py")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_masks(tmp_path):
    run_torchrun(SCRIPT, tmp_path, timeout=170)
    r0, r1 = rank_results(tmp_path)
    assert r0["distributed"] and r1["distributed"] and r0["world_size"] == 2
    assert [u["step"] for u in r0["updates"]] == [1, 2, 3, 4, 5, 6]
    assert r0["updates"] == r1["updates"]  # same masks after every update
    assert len({u["masks"] for u in r0["updates"]}) == 6 and r0["updates"][-1]["sparsity"] == 0.6
    assert r0["final_masks"] == r1["final_masks"] and r0["weights"] == r1["weights"]
    # recovery_lr_scale=2 after the last update (step 6), ramp 1 step: steps 7-8 at twice the scheduled rate
    assert r0["rates"] == r1["rates"] == pytest.approx([1e-3] * 6 + [2e-3] * 2)
    assert r0["step"] == r0["global_step"] == 8 and r0["finalized"] and r1["finalized"]
    saved = load_state_file(tmp_path / "run" / "checkpoint-4" / STATE_FILE)  # written once, by rank 0
    assert saved["step"] == 4 and not list((tmp_path / "run" / "checkpoint-4").glob("*.tmp"))
