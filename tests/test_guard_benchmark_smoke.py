"""Smoke runs of the accuracy-guard benchmarks (``--smoke``: tiny models from configs, no asset, seconds)."""

from __future__ import annotations

import json

import pytest


pytest.importorskip("accelerate")



@pytest.mark.parametrize("script", ["guard", "guard_lm"])
def test_guard_benchmark_smoke(tmp_path, script):
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    out = tmp_path / f"{script}.json"
    res = module.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    guarded, fixed = [r for r in data["runs"] if "guarded" in r]
    assert guarded["guarded"] and not fixed["guarded"]
    traj = guarded["trajectory"]
    assert traj[0]["decision"] == "baseline" and traj[-1]["decision"] == "final"
    assert guarded["evaluations"] == len(traj) and guarded["eval_s"] <= guarded["wall_s"]
    # the fixed run prunes to the sparsity the guard ended at
    assert fixed["config"]["final_sparsity"] == pytest.approx(guarded["guard_final"]["sparsity"], abs=1e-4)
    assert out.with_suffix(".png").stat().st_size > 0
