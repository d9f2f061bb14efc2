"""N:M under two CPU processes (torchrun, gloo): identical masks on both ranks at every update."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("nm_ddp_script.py")


@pytest.mark.slow
def test_two_processes_hold_identical_nm_masks(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [u["step"] for u in r0["updates"]] == [2, 4, 6, 8, 10]
    assert r0["updates"] == r1["updates"]
    assert r0["updates"][-1]["sparsity"] == 0.5 and r0["kept"] == [2]  # exactly 2 of every 4 kept
