"""AcceleratePruningHook under `accelerate launch` with 2 CPU processes (DDP over gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import rank_results

pytest.importorskip("accelerate")

SCRIPT = Path(__file__).parent / "accelerate_scripts" / "ddp_masks.py"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_hold_identical_masks_at_every_update(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(launcher) if launcher.exists() else "accelerate", "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(SCRIPT), str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = rank_results(tmp_path)
    r0, r1 = results
    # two processes really ran, in one process group
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["is_distributed"] for r in results)

    # the pruner counted real optimizer steps only, on both ranks
    assert r0["step"] == r1["step"] == r0["expected_steps"] > 0
    # masks were updated, and at every update both ranks ended with the same masks
    assert len(r0["updates"]) == len(r1["updates"]) >= 5
    assert [u["step"] for u in r0["updates"]] == [u["step"] for u in r1["updates"]]
    for u0, u1 in zip(r0["updates"], r1["updates"]):
        assert u0["after"] == u1["after"], f"masks differ across ranks after the update at step {u0['step']}"
        assert u0["after"] == u0["before"]  # rank 0's masks are the reference
    # the test has teeth: the perturbed rank 1 computed different masks locally at least once
    assert any(u0["before"] != u1["before"] for u0, u1 in zip(r0["updates"], r1["updates"]))

    assert r0["masks"] == r1["masks"] and r0["weights"] == r1["weights"]
    assert r0["global_sparsity"] == r1["global_sparsity"] == pytest.approx(0.7, abs=0.005)
    assert r0["zeros_ok"] and r1["zeros_ok"]
