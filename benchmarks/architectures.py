"""CPU latency and parameter count before / after slimming, one encoder (BERT), one decoder (Llama) and the
encoder-decoder (T5): 50% of the FFN neurons and one third of the blocks removed (uniform, random units: the
shape, not the choice, sets the speed). Interleaved timings (dense, slim, dense, slim, ...), medians, 1 thread,
batch 1, sequence 128. Writes benchmarks/results/architectures.json.

    OMP_NUM_THREADS=1 python -m benchmarks.architectures [--reps 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

SEQ = 128


def _models():
    import transformers

    bert = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                   intermediate_size=1024, max_position_embeddings=256)
    llama = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                                     num_key_value_heads=4, head_dim=32, intermediate_size=768,
                                     max_position_embeddings=256)
    t5 = transformers.T5Config(vocab_size=1000, d_model=256, d_kv=32, d_ff=1024, num_layers=6, num_decoder_layers=6,
                               num_heads=8, decoder_start_token_id=0)
    return {"encoder (BERT-like)": transformers.BertModel(bert),
            "decoder (Llama-like)": transformers.LlamaForCausalLM(llama),
            "encoder-decoder (T5)": transformers.T5ForConditionalGeneration(t5)}


def _keep(model, seed=0):
    from prune_callbacks.methods.structured import unit_map

    g = torch.Generator().manual_seed(seed)
    ffn = []
    for group in unit_map(model, "ffn_neurons"):
        kept = torch.zeros(group.n_units, dtype=torch.bool)
        kept[torch.randperm(group.n_units, generator=g)[: group.n_units // 2]] = True
        ffn.append(kept)
    layout_blocks = unit_map(model, "blocks")
    n = len(layout_blocks)
    # one third of the blocks, taken evenly from each block list (T5: encoder and decoder)
    removed = set(range(1, n, 3))
    return {"ffn_neurons": ffn, "blocks": [i not in removed for i in range(n)]}


def _inputs(name):
    ids = torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids} if "T5" in name else {"input_ids": ids}


@torch.no_grad()
def _time(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from prune_callbacks.export.dispatch import slim

    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/architectures.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    results = {}
    for name, dense in _models().items():
        dense.eval()
        small = copy.deepcopy(dense)
        summary = slim(small, _keep(dense))
        small.eval()
        inputs = _inputs(name)
        for _ in range(2):  # warm-up
            _time(dense, inputs), _time(small, inputs)
        times = {"dense": [], "slim": []}
        for _ in range(args.reps):
            times["dense"].append(_time(dense, inputs))
            times["slim"].append(_time(small, inputs))
        d, s = statistics.median(times["dense"]), statistics.median(times["slim"])
        ratios = [b / a for a, b in zip(times["dense"], times["slim"])]
        results[name] = {"params_dense": summary["params_before"], "params_slim": summary["params_after"],
                         "params_ratio": round(summary["params_after"] / summary["params_before"], 4),
                         "latency_ms_dense": round(d * 1e3, 2), "latency_ms_slim": round(s * 1e3, 2),
                         "latency_ratio_median_paired": round(statistics.median(ratios), 3),
                         "config_changes": summary["config"]}
        print(name, results[name], flush=True)
    out = {"setup": {"threads": 1, "batch": 1, "seq": SEQ, "reps": args.reps, "interleaved": True,
                     "keep": "50% FFN neurons (uniform per block), one third of the blocks",
                     "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                     "note": "shared, loaded 2-core machine (other agents running): ratios are the figure to read"},
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
