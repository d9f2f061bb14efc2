"""Two CPU processes under torchrun (gloo): every rank holds the same masks at every update."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from prune_callbacks.state_io import STATE_FILE, load_state_file  # noqa: E402

SCRIPT = Path(__file__).with_name("ddp_trainer_script.py")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_masks(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["distributed"] and r1["distributed"] and r0["world_size"] == 2
    assert [u["step"] for u in r0["updates"]] == [1, 2, 3, 4, 5, 6]
    assert r0["updates"] == r1["updates"]  # same masks after every update
    assert len({u["masks"] for u in r0["updates"]}) == 6 and r0["updates"][-1]["sparsity"] == 0.6
    assert r0["final_masks"] == r1["final_masks"] and r0["weights"] == r1["weights"]
    assert r0["step"] == r0["global_step"] == 8 and r0["finalized"] and r1["finalized"]
    saved = load_state_file(tmp_path / "run" / "checkpoint-4" / STATE_FILE)  # written once, by rank 0
    assert saved["step"] == 4 and not list((tmp_path / "run" / "checkpoint-4").glob("*.tmp"))
