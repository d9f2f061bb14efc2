"""Smoke run of benchmarks/distillation.py (tiny BERT from a config, synthetic data, no asset)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import needs_native_attention_kernels  # noqa: E402



@needs_native_attention_kernels
def test_distillation_benchmark_smoke(tmp_path):
    from benchmarks import distillation

    out = tmp_path / "d.json"
    distillation.main(["--smoke", "--runs", "dense", "taylor", "kd_before", "kd_dense_teacher", "--out", str(out)])
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"dense", "taylor", "kd_before", "kd_dense_teacher"}
    assert runs["kd_before"]["teacher_step"] == 0  # 6 steps: the first mask update is at step 1
    assert runs["kd_dense_teacher"]["teacher_bytes"] > 0 and runs["taylor"]["distillation"] is None
    merged = distillation.main(["--merge", str(out), "--out", str(tmp_path / "m.json")])
    assert len(merged["runs"]) == 4 and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    cost = distillation.main(["--smoke", "--cost", "--rounds", "1", "--block", "1", "--out", str(tmp_path / "c.json")])
    assert cost["teacher_bytes_bf16"] < cost["teacher_bytes_fp32"] == cost["student_bytes"]
    assert cost["step_time_ratio"]["fp32"]["median_ratio"] > 0
