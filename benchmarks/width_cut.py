"""MiniLM on Rotten Tomatoes: a 3x slim model cut in width (hidden size, head size, FFN) rather than mostly in depth.

Issue 28's 3x plan keeps 3 of 6 blocks at 37.5% of the FFN width; three recoveries (teacher, fold, twice the budget)
land at the same 96% of dense, which points at the plan's shape. The library's structured kinds cannot make another
shape at 3x for BERT-family models: fewer heads cannot be described (head size = hidden / heads) and the hidden width
is not a granularity. This benchmark measures whether that missing granularity would pay before it is built: it
fine-tunes dense for a share of the run, then cuts the model **one-shot** to a smaller BERT config (``hidden_size``,
``intermediate_size``, ``num_hidden_layers``; 12 heads kept, so the head size is hidden / 12) and fine-tunes the rest.

What is kept (activation statistics on calibration batches of the training stream, as Minitron does):

* residual channels: the mean |output| of every LayerNorm (the residual stream), summed over them; one choice for the
  whole model, since the stream is shared (embeddings, every block's input and output, pooler and classifier inputs);
* per head, query/key dimensions by mean |q| x mean |k| (the dimension's share of the scores, up to sign) and value
  dimensions by mean |v| x the norm of its output-projection column; the query is scaled by sqrt(new / old head size)
  so that the scores keep their scale under BERT's 1 / sqrt(head size);
* FFN neurons per block by mean |activation| x the norm of the output column (the same count in every block);
* blocks: the least influential (1 - cosine of a block's input and output, ``analysis.blocks.BlockInfluence``).

LayerNorm statistics over the fewer channels are not corrected (there is no exact way); the fine-tune that follows
recovers them. The optimizer's moments are cut with the weights, so the run continues, not restarts. The result is a
plain ``BertForSequenceClassification`` that vanilla ``transformers`` loads.

    python benchmarks/width_cut.py --shape 288,576,5 --steps 1600 --out /tmp/w.json
    python benchmarks/width_cut.py --time 384,576,3 288,576,5 --rounds 5 --out /tmp/t.json   # latency only
    python benchmarks/width_cut.py --merge /tmp/w.json /tmp/v.json --out benchmarks/results/width_cut_full.json
    python benchmarks/width_cut.py --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from prune_callbacks.methods.structured.calibration import rows  # noqa: E402


class Stats:
    """Forward hooks summing mean |activation| per channel over real tokens, plus block influence."""

    def __init__(self, model):
        from prune_callbacks.analysis.blocks import BlockInfluence

        self.sums: dict = {}
        self.mask = None
        self._handles = []
        bert = model.bert
        watch = {"emb_ln": bert.embeddings.LayerNorm}
        for i, layer in enumerate(bert.encoder.layer):
            watch.update({f"{i}.q": layer.attention.self.query, f"{i}.k": layer.attention.self.key,
                          f"{i}.v": layer.attention.self.value, f"{i}.ln1": layer.attention.output.LayerNorm,
                          f"{i}.act": layer.intermediate, f"{i}.ln2": layer.output.LayerNorm})
        for name, module in watch.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self.blocks = BlockInfluence([(str(i), layer) for i, layer in enumerate(bert.encoder.layer)])

    def _hook(self, name):
        def hook(module, args, output):  # the mergers' rows: float32, one per real token
            x = rows(output, self.mask.reshape(-1).bool()).abs().mean(dim=0)
            self.sums[name] = self.sums.get(name, 0) + x
        return hook

    @torch.no_grad()
    def collect(self, model, batches) -> "Stats":
        was = model.training
        model.eval()
        with self.blocks:
            for batch in batches:
                self.mask = batch["attention_mask"]
                self.blocks.select(self.mask)
                model(**{k: v for k, v in batch.items() if k != "labels"})
                self.blocks.accumulate()
        for handle in self._handles:
            handle.remove()
        model.train(was)
        return self


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return torch.topk(score, k).indices.sort().values


def check_shape(config, hidden: int, intermediate: int, layers: int) -> None:
    """Refuse a shape the model cannot be cut to, before any training."""
    heads = config.num_attention_heads
    problems = []
    if hidden % heads:
        problems.append(f"hidden {hidden} is not a multiple of the {heads} heads (head size = hidden / heads)")
    for what, value, most in (("hidden", hidden, config.hidden_size), ("intermediate", intermediate,
                              config.intermediate_size), ("layers", layers, config.num_hidden_layers)):
        if not 0 < value <= most:
            problems.append(f"{what} {value} is not in 1..{most}")
    if problems:
        raise SystemExit(f"--shape {hidden},{intermediate},{layers}: " + "; ".join(problems))


def choose(model, stats: Stats, hidden: int, intermediate: int, layers: int) -> dict:
    """What the cut keeps: ``channels``, ``blocks`` and per kept block ``qk``, ``v``, ``ffn`` indices."""
    config = model.config
    heads = config.num_attention_heads
    old_head, new_head = config.hidden_size // heads, hidden // heads
    channels = _top(sum(v for k, v in stats.sums.items() if "ln" in k), hidden)
    influence = torch.tensor(stats.blocks.influence())
    blocks = _top(influence, layers).tolist()
    out = {"channels": channels, "blocks": blocks, "influence": [round(float(x), 4) for x in influence],
           "qk": [], "v": [], "ffn": []}
    for i in blocks:
        layer = model.bert.encoder.layer[i]
        qk = (stats.sums[f"{i}.q"] * stats.sums[f"{i}.k"]).reshape(heads, old_head)
        v = (stats.sums[f"{i}.v"] * layer.attention.output.dense.weight.norm(dim=0)).reshape(heads, old_head)
        pick = lambda s: torch.cat([h * old_head + _top(s[h], new_head) for h in range(heads)])  # noqa: E731
        out["qk"].append(pick(qk))
        out["v"].append(pick(v))
        out["ffn"].append(_top(stats.sums[f"{i}.act"] * layer.output.dense.weight.norm(dim=0), intermediate))
    return out


def _slicer(keep: dict, old_head: int, new_head: int):
    """``slice(name, tensor) -> tensor`` of the cut model: applied to parameters and to their optimizer moments."""
    c = keep["channels"]

    def cut(name: str, t: torch.Tensor, param: bool = True) -> torch.Tensor:
        parts = name.split(".")
        if name.startswith("bert.embeddings.") and "LayerNorm" not in name:
            return t[:, c] if t.dim() == 2 else t  # position_ids / token_type_ids buffers stay
        if name.startswith("bert.embeddings.LayerNorm"):
            return t[c]
        if name.startswith("bert.pooler.dense"):
            return t[c][:, c] if t.dim() == 2 else t[c]
        if name.startswith("classifier."):
            return t[:, c] if t.dim() == 2 else t
        new = int(parts[3])
        sub = ".".join(parts[4:])
        rows = {"attention.self.query": keep["qk"][new], "attention.self.key": keep["qk"][new],
                "attention.self.value": keep["v"][new], "intermediate.dense": keep["ffn"][new]}
        for prefix, index in rows.items():
            if sub.startswith(prefix):
                out = t[index][:, c] if t.dim() == 2 else t[index]
                if prefix == "attention.self.query" and param:
                    out = out * math.sqrt(new_head / old_head)
                return out
        if sub.startswith("attention.output.dense"):
            return t[c][:, keep["v"][new]] if t.dim() == 2 else t[c]
        if sub.startswith("output.dense"):
            return t[c][:, keep["ffn"][new]] if t.dim() == 2 else t[c]
        if "LayerNorm" in sub:
            return t[c]
        raise KeyError(f"no cut rule for {name}")

    return cut


@torch.no_grad()
def cut_model(model, keep: dict, hidden: int, intermediate: int, optimizer=None, lr: float = 5e-5):
    """``(new model, new optimizer or None)``: a smaller ``BertForSequenceClassification``; the optimizer's state
    (AdamW moments and step) is cut the same way when ``optimizer`` is given."""
    from transformers import BertForSequenceClassification

    config = copy.deepcopy(model.config)
    old_head = config.hidden_size // config.num_attention_heads
    config.hidden_size, config.intermediate_size = hidden, intermediate
    config.num_hidden_layers = len(keep["blocks"])
    new_head = hidden // config.num_attention_heads
    source = model.state_dict()

    def old_name(name: str) -> str:
        """The cut model's tensor name in the original model: block ``i`` of the cut is kept block ``blocks[i]``."""
        parts = name.split(".")
        if name.startswith("bert.encoder.layer."):
            parts[3] = str(keep["blocks"][int(parts[3])])
        return ".".join(parts)

    cut = _slicer(keep, old_head, new_head)
    slim = BertForSequenceClassification(config)
    slim.load_state_dict({n: cut(n, source[old_name(n)]) for n in slim.state_dict()})
    slim.train(model.training)
    if optimizer is None:
        return slim, None
    new_optimizer = common.make_optimizer(slim, lr=lr)
    params = dict(model.named_parameters())
    for name, p in slim.named_parameters():
        state = optimizer.state.get(params[old_name(name)])
        if state:
            new_optimizer.state[p] = {"step": state["step"].clone(),
                                      "exp_avg": cut(name, state["exp_avg"], param=False).clone(),
                                      "exp_avg_sq": cut(name, state["exp_avg_sq"], param=False).clone()}
    return slim, new_optimizer


def run(args) -> dict:
    hidden, intermediate, layers = args.shape
    common.seed_everything(args.seed)
    if args.smoke:
        model = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=4, num_attention_heads=4))
        data = {s: common.synthetic_encoded(64, seed=i) for i, s in enumerate(("train", "test"))}
    else:
        model, tok = common.load_minilm(seed=args.seed)
        data = common.load_rt_encoded(tok, seed=0, max_train=None, max_eval=args.max_eval, max_len=64)
    check_shape(model.config, hidden, intermediate, layers)
    steps = args.steps
    at = round(args.cut_at * steps)
    batches = common.train_batches(data["train"], steps=steps, batch_size=16, seed=args.seed)
    optimizer = common.make_optimizer(model, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=steps, warmup=steps // 10)
    progress = lambda st: st % 100 == 0 and print(f"width {args.shape}: step {st}/{steps}", flush=True)  # noqa: E731
    wall = common.train(model, batches[:at], optimizer, scheduler, after_step=progress)
    params_before = sum(p.numel() for p in model.parameters())
    stats = Stats(model).collect(model, batches[: args.calib_batches])
    keep = choose(model, stats, hidden, intermediate, layers)
    model, optimizer = cut_model(model, keep, hidden, intermediate, optimizer, lr=args.lr)
    scheduler = common.linear_warmup_decay(optimizer, steps=steps, warmup=steps // 10, start=at)
    wall += common.train(model, batches[at:], optimizer, scheduler,
                         after_step=lambda st: progress(st + at))
    test = common.eval_batches(data["test"])
    return {"variant": common.with_seed(f"width h{hidden} i{intermediate} L{layers} @{args.cut_at:g}", args.seed),
            "seed": args.seed, "shape": {"hidden_size": hidden, "intermediate_size": intermediate,
                                         "num_hidden_layers": layers},
            "cut_at_step": at, "steps": steps, "calib_batches": args.calib_batches,
            "blocks_kept": keep["blocks"], "block_influence": keep["influence"],
            "params_before": params_before, "params": sum(p.numel() for p in model.parameters()),
            "train_wall_s": round(wall, 1), "test_accuracy": common.accuracy(model, test),
            "test_examples": len(data["test"])}


def time_shapes(shapes, rounds: int) -> dict:
    """Batch-32 x 128 latency of random-weight MiniLM-like classifiers of each shape against dense (384, 1536, 6),
    interleaved (the probe's ``interleaved_medians``), under the current thread setting."""
    from prune_callbacks.analysis.latency import interleaved_medians

    shapes = [(384, 1536, 6), *[s for s in shapes if s != (384, 1536, 6)]]
    models = {s: common.classifier_from_config(common.minilm_config(
        hidden_size=s[0], intermediate_size=s[1], num_hidden_layers=s[2])).eval() for s in shapes}
    ids = torch.randint(0, 30000, (32, 128), generator=torch.Generator().manual_seed(0))
    medians = interleaved_medians(models, lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids)), rounds)
    dense = medians[shapes[0]]
    return {"rounds": rounds, "load_average": list(os.getloadavg()), "rows": [
        {"shape": list(s), "params": sum(p.numel() for p in models[s].parameters()),
         "b32_median_ms": round(t * 1000, 1), "speedup": round(dense / t, 2)} for s, t in medians.items()]}


def _shape(text: str) -> tuple[int, int, int]:
    try:
        hidden, intermediate, layers = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected HIDDEN,INTERMEDIATE,LAYERS, e.g. 288,576,5")
    return hidden, intermediate, layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=_shape, default=(288, 576, 5), help="HIDDEN,INTERMEDIATE,LAYERS of the cut model")
    ap.add_argument("--cut-at", type=float, default=0.33, help="share of the run trained dense before the cut")
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-eval", type=int, default=None, help="test rows (default: the whole split)")
    ap.add_argument("--threads", type=int, default=1)
    common.add_seed_argument(ap)
    ap.add_argument("--time", nargs="+", type=_shape, default=None, metavar="SHAPE",
                    help="only time these shapes against dense (random weights, batch 32 x 128), no training")
    ap.add_argument("--rounds", type=int, default=5, help="--time: interleaved rounds (median)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "width_cut.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="join these result files' rows into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        merged = dict(parts[0], rows=[r for p in parts for r in p["rows"]], merged_from=[str(f) for f in args.merge])
        common.write_json(args.out, merged)
        return merged
    if args.time:
        common.set_threads(args.threads)
        timing = dict(benchmark="width_cut latency", hardware=common.hardware_info(), threads=args.threads,
                      **time_shapes(args.time, args.rounds))
        for r in timing["rows"]:
            print(r, flush=True)
        common.write_json(args.out, timing)
        return timing
    if args.smoke:
        args.shape, args.steps, args.calib_batches = (24, 16, 3), 6, 2
    common.set_threads(args.threads)
    row = run(args)
    print(row, flush=True)
    results = {"benchmark": "width_cut", "hardware": common.hardware_info(), "threads": args.threads, "lr": args.lr,
               "batch_size": 16, "max_len": 64, "rows": [row]}
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
