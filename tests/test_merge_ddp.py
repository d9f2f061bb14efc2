"""Merging under two CPU processes (torchrun, gloo): both ranks fold the same correction, from both ranks' tokens."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import run_torchrun  # noqa: E402
from merge_ddp_script import CONFIGS, fold, tokens  # noqa: E402

SCRIPT = Path(__file__).with_name("merge_ddp_script.py")


@pytest.mark.slow
def test_two_processes_fold_from_the_statistics_of_both():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_torchrun(SCRIPT, tmp, timeout=170)
        r0, r1 = (json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1))
    for granularity in CONFIGS:
        alone = fold(granularity, tokens(0))  # what rank 0 would fold from its own tokens
        both = fold(granularity, torch.cat([tokens(0), tokens(1)]))  # one process, both ranks' tokens
        assert r0[granularity]["report"]["updates"] == 1 and r0[granularity]["report"] == r1[granularity]["report"]
        folded0, folded1, reference, own = (torch.tensor(x["down_proj"]) for x in (r0[granularity],
                                                                                    r1[granularity], both, alone))
        assert torch.equal(folded0, folded1)  # identical sums on both ranks: identical fits
        error, apart = (folded0 - reference).abs().max(), (own - reference).abs().max()
        assert error < 1e-2 * apart  # rank 0's tokens alone fold a correction far off (here 5,000-300,000x further)
