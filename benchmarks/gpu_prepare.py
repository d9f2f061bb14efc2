"""Copy the benchmark assets into ``.device_carry/`` (git-ignored) for a GPU machine without the asset wheels.

MiniLM is stored as fp16 (~44 MB, so it fits the 64 MiB a device run can carry)
and trained there in float32; the Rotten Tomatoes CSV is copied as is.

    python benchmarks/gpu_prepare.py            # then see BENCHMARKS.md, "GPU runs"
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / ".device_carry")
    args = p.parse_args(argv)
    from prune_callbacks.assets import load_minilm_for_classification
    from prune_callbacks.assets.rotten_tomatoes import rotten_tomatoes_csv_path

    args.dest.mkdir(parents=True, exist_ok=True)
    model, tok = load_minilm_for_classification(num_labels=2)
    model = model.to(torch.float16)
    # the random classifier head is re-created from the seed on the GPU machine: keep only the encoder
    model.bert.save_pretrained(args.dest / "minilm_fp16")
    tok.save_pretrained(args.dest / "minilm_fp16")
    shutil.copy(rotten_tomatoes_csv_path(), args.dest / Path(str(rotten_tomatoes_csv_path())).name)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MiB")
    return args.dest


if __name__ == "__main__":
    main()
