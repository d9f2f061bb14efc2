"""N:M under two CPU processes (torchrun, gloo): identical masks on both ranks at every update."""

from pathlib import Path

import pytest

from helpers import rank_results, run_torchrun

SCRIPT = Path(__file__).with_name("nm_ddp_script.py")


@pytest.mark.slow
def test_two_processes_hold_identical_nm_masks(tmp_path):
    run_torchrun(SCRIPT, tmp_path, timeout=170)
    r0, r1 = rank_results(tmp_path)
    assert [u["step"] for u in r0["updates"]] == [2, 4, 6, 8, 10]
    assert r0["updates"] == r1["updates"]
    assert r0["updates"][-1]["sparsity"] == 0.5 and r0["kept"] == [2]  # exactly 2 of every 4 kept
