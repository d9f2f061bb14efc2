"""Two CPU processes under torchrun (gloo): each rank's teacher is the same dense copy; the teacher file
is written once; training stays in lock step."""

from pathlib import Path

import pytest

from helpers import rank_results, run_torchrun

pytest.importorskip("transformers")

from prune_callbacks.controllers.distillation import TEACHER_FILE  # noqa: E402

SCRIPT = Path(__file__).with_name("ddp_distillation_script.py")


@pytest.mark.slow
def test_ddp_ranks_distil_from_identical_teachers(tmp_path):
    run_torchrun(SCRIPT, tmp_path, timeout=240)
    r0, r1 = rank_results(tmp_path)
    assert r0["distributed"] and r1["distributed"]
    assert r0["teacher_step"] == r1["teacher_step"] == 2
    assert r0["teacher"] == r1["teacher"] and r0["weights"] == r1["weights"]
    assert not r0["teacher_in_optimizer"] and r0["forward_restored"] and r1["forward_restored"]
    assert len(r0["kd"]) == 3 and all(v >= 0 for v in r0["kd"])  # logged at steps 4, 6, 8
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / TEACHER_FILE).is_file() and not list(ckpt.glob("*.tmp"))
