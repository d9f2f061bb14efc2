"""Run by tests/test_merge_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): the FFN-neuron and the block
fold with each rank calibrating on its own tokens. The statistics are summed across ranks before the fit, so both
ranks fold the same correction, the one a single process computes from both ranks' tokens (`fold`, also called by
the test in one process). Writes rank<r>.json with the folded projections."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import end_world, tiny_llama_lm  # noqa: E402
from prune_callbacks import Pruner, PruningConfig  # noqa: E402

CONFIGS = {  # magnitude saliency: the same masks on every rank and in one process, whatever the data
    "ffn_neurons": dict(granularity="ffn_neurons", final_sparsity=0.25),
    "blocks": dict(granularity="blocks", final_sparsity=0.4, exclude=[r"^model\.layers\.0\."]),
}


def tokens(rank: int) -> torch.Tensor:
    return torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(10 + rank))


def fold(granularity: str, ids: torch.Tensor, steps: int = 2) -> dict:
    """A one-shot fold at lr 0 after ``steps`` calibration passes over ``ids``: the FFN output projections."""
    model = tiny_llama_lm(seed=0, num_hidden_layers=6)
    model.eval()
    config = PruningConfig(**CONFIGS[granularity], saliency="magnitude", schedule="oneshot", start_step=steps,
                           merge={"damping": 1e-3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=steps + 1).attach(optimizer)
    for _ in range(steps):
        model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"report": pruner.report()["groups"][0]["merge"],
            "down_proj": [layer.mlp.down_proj.weight.tolist() for layer in model.model.layers]}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {g: fold(g, tokens(rank)) for g in CONFIGS}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
