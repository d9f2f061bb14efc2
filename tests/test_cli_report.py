"""``prune-callbacks report`` on every kind of saved weights, and the CLI's error contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_bert_classifier
from prune_callbacks import Pruner
from prune_callbacks.cli import main
from prune_callbacks.core.state_io import STATE_FILE, save_state_file

SPARSITY = 0.5


@pytest.fixture(scope="module")
def pruned():
    """A tiny BERT whose block linears are 50% zero, and its pruner."""
    model = tiny_bert_classifier(seed=0)
    pruner = Pruner(model, final_sparsity=SPARSITY, saliency="magnitude", total_steps=10)
    pruner.step = 7
    pruner.update_masks(SPARSITY)
    return model, pruner


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys, path) -> dict:
    code, out, err = run(capsys, "report", str(path), "--json")
    assert code == 0, err
    return json.loads(out)


def expected_zeros(model) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def test_safetensors_directory_table(tmp_path, capsys, pruned):
    model, _ = pruned
    model.save_pretrained(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 0 and err == ""
    assert "safetensors, 1 file" in out
    assert re.search(r"^bert\.encoder\.layer\.\*\.attention\.self\.query\.weight +2 ", out, re.M)  # 2 layers grouped
    assert "bert.embeddings.word_embeddings.weight" in out
    data = report_json(capsys, tmp_path)
    assert data["kind"] == "safetensors"
    params = sum(p.numel() for p in model.parameters())
    assert data["params"] == params and data["nonzero_params"] == params - expected_zeros(model)
    query = data["per_tensor"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert query["sparsity"] > 0.2  # global scope: about half, not exactly
    groups = {g["group"]: g for g in data["groups"]}
    assert groups["bert.encoder.layer.*.intermediate.dense.weight"]["tensors"] == 2


def test_sharded_safetensors(tmp_path, capsys, pruned):
    model, _ = pruned
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    data = report_json(capsys, tmp_path)
    assert data["kind"] == "sharded-safetensors" and len(data["files"]) > 1
    assert data["params"] - data["nonzero_params"] == expected_zeros(model)


def test_pytorch_bin_directory_and_single_files(tmp_path, capsys, pruned):
    model, _ = pruned
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    data = report_json(capsys, tmp_path)
    assert data["kind"] == "pytorch-bin" and data["params"] - data["nonzero_params"] == expected_zeros(model)
    single = report_json(capsys, tmp_path / "pytorch_model.bin")
    assert single["per_tensor"] == data["per_tensor"]


def test_bin_that_needs_pickle_is_refused(tmp_path, capsys):
    torch.save({"weight": torch.zeros(2, 2), "obj": Path("x")}, tmp_path / "evil.bin")
    code, out, err = run(capsys, "report", str(tmp_path / "evil.bin"))
    assert code == 1 and "weights_only=True" in err and "Traceback" not in err


def test_sparse_checkpoint(tmp_path, capsys, pruned):
    from prune_callbacks.export.sparse_io import save_sparse

    model, _ = pruned
    save_sparse(model, tmp_path / "sparse")
    data = report_json(capsys, tmp_path / "sparse")
    assert data["kind"] == "sparse"
    assert data["params"] - data["nonzero_params"] == expected_zeros(model)
    assert report_json(capsys, tmp_path / "sparse" / "model.sparse.safetensors")["kind"] == "sparse"


def test_trainer_checkpoint_shows_pruning_state(tmp_path, capsys, pruned):
    model, pruner = pruned
    ckpt = tmp_path / "checkpoint-7"
    model.save_pretrained(ckpt)
    save_state_file({**pruner.state_dict(), "global_step": 7, "total_steps": 10}, ckpt / STATE_FILE)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    code, out, err = run(capsys, "report", str(ckpt))
    assert code == 0, err
    assert "global step 7" in out
    assert "pruning state:      step 7, masks at 50.0% sparsity (target 50.0%)" in out
    state = report_json(capsys, ckpt)["pruning_state"]
    assert state["step"] == 7 and state["final_sparsity"] == SPARSITY and state["masked_fraction"] == pytest.approx(SPARSITY, abs=1e-3)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: d, "holds no model weights"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "is not a weights file"),
    (lambda d: (d / "bad.safetensors").write_bytes(b"garbage") and d / "bad.safetensors", "not a readable safetensors"),
])
def test_report_errors_exit_1_without_traceback(tmp_path, capsys, make, fragment):
    code, out, err = run(capsys, "report", str(make(tmp_path)))
    assert code == 1 and fragment in err and "Traceback" not in err and out == ""


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["explode"])
    assert info.value.code == 2


def test_console_script_errors_have_no_traceback(tmp_path):
    """The installed entry point, in a real process: a user mistake prints one message, status != 0."""
    bad = tmp_path / "r.yaml"
    bad.write_text("task: sequence-classification\nmodel: {name: minilm}\ndata: {name: rotten_tomatoes}\n"
                   "pruning: {final_sparsity: 1.0}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for argv, code, fragment in [
        (["validate", str(bad)], 2, "pruning.final_sparsity: final_sparsity=1.0 is invalid"),
        (["report", str(tmp_path / "nope")], 1, "no such file or directory"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "prune_callbacks.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert fragment in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""
