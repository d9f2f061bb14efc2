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

ONESHOT = dict(schedule="oneshot", start_step=2)
CONFIGS = {  # magnitude saliency: the same masks on every rank and in one process, whatever the data; the run
    # lasts until the last update (start_step of the one-shot ones, end_step of the gradual one)
    "ffn_neurons": dict(granularity="ffn_neurons", final_sparsity=0.25, **ONESHOT),
    "blocks": dict(granularity="blocks", final_sparsity=0.4, exclude=[r"^model\.layers\.0\."], **ONESHOT),
    # updates at steps 4, 6, 8 inside one calibration window: the second fold adds new tokens to the summed ones
    "ffn_neurons, gradual": dict(granularity="ffn_neurons", final_sparsity=0.5, schedule="linear", start_step=4,
                                 end_step=8, update_every=2),
    # the fold chooses the neurons (merge.select='fold'), from the summed statistics, then folds them
    "ffn_neurons, select": dict(granularity="ffn_neurons", final_sparsity=0.25, **ONESHOT),
}


def tokens(rank: int) -> torch.Tensor:
    return torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(10 + rank))


def fold(name: str, ids: torch.Tensor) -> dict:
    """Prune at lr 0 with ``merge``, calibrating on ``ids`` at every step: the report and the FFN output
    projections."""
    model = tiny_llama_lm(seed=0, num_hidden_layers=6)
    model.eval()
    merge = {"damping": 1e-3, "calibration_steps": 4, **({"select": "fold"} if name.endswith("select") else {})}
    config = PruningConfig(**CONFIGS[name], saliency="magnitude", merge=merge)
    steps = config.start_step if config.schedule == "oneshot" else config.end_step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=steps + 1).attach(optimizer)
    for _ in range(steps):
        model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"report": pruner.report()["groups"][0]["merge"], "masks": [m.tolist() for m in pruner.groups[0].masks],
            "down_proj": [layer.mlp.down_proj.weight.tolist() for layer in model.model.layers]}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {name: fold(name, tokens(rank)) for name in CONFIGS}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
