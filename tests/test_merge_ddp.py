"""Merging under two CPU processes (torchrun, gloo): both ranks fold the same correction, from both ranks' tokens."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import rank_results, run_torchrun  # noqa: E402
from merge_ddp_script import CONFIGS, fold, tokens  # noqa: E402

SCRIPT = Path(__file__).with_name("merge_ddp_script.py")


@pytest.mark.slow
def test_two_processes_fold_from_the_statistics_of_both(tmp_path):
    run_torchrun(SCRIPT, tmp_path, timeout=170)
    r0, r1 = rank_results(tmp_path)
    for name in CONFIGS:
        alone = fold(name, tokens(0))  # what rank 0 would fold from its own tokens
        both = fold(name, torch.cat([tokens(0), tokens(1)]))  # one process, both ranks' tokens
        assert r0[name]["report"]["updates"] == (2 if "gradual" in name else 1)
        exact = [{k: v for k, v in x["report"].items() if k not in ("recovered", "fit_error")}  # floats: rounding
                 for x in (r0[name], r1[name], both)]
        assert exact[0] == exact[1] == exact[2]
        assert r0[name]["masks"] == r1[name]["masks"] == both["masks"]  # select='fold' chose from the summed statistics
        folded0, folded1, reference, own = (torch.tensor(x["down_proj"]) for x in (r0[name],
                                                                                    r1[name], both, alone))
        assert torch.equal(folded0, folded1)  # identical sums on both ranks: identical fits
        error, apart = (folded0 - reference).abs().max(), (own - reference).abs().max()
        assert error < 1e-2 * apart  # rank 0's tokens alone fold a correction far off (here 5,000-300,000x further)
