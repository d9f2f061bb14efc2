"""Run by tests/test_nm_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): a plain DDP loop with a
2:4 Pruner. Each rank sees different data and its saliency is perturbed on rank 1, so equal masks on both
ranks come from the broadcast, not from identical arithmetic. Writes rank<r>.json with mask hashes."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyLM, end_world, lm_loss, random_batches  # noqa: E402
from prune_callbacks import Pruner, PruningConfig  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, PruningConfig(granularity="2:4", start_step=2, end_step=10, update_every=2)).attach(opt)
    hashes = []
    for step, ids in enumerate(random_batches(12, seed=10 + rank), start=1):
        lm_loss(model, ids).backward()
        pruner.before_optimizer_step()
        if rank == 1:
            pruner.saliency.update(pruner.params, [torch.rand_like(p) for p in pruner.params])
        pruner.detach()
        opt.step()
        pruner.after_optimizer_step(opt)
        opt.zero_grad()
        if pruner.schedule.is_update_step(step):
            digest = hashlib.sha256(b"".join(m.to(torch.uint8).numpy().tobytes() for m in pruner.pruned)).hexdigest()
            hashes.append({"step": step, "masks": digest, "sparsity": pruner.report()["global_sparsity"]})
    kept = [int((~m).reshape(-1, 4).sum(-1).min()) for m in pruner.pruned] + \
        [int((~m).reshape(-1, 4).sum(-1).max()) for m in pruner.pruned]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"updates": hashes, "kept": sorted(set(kept))}))
    end_world()


if __name__ == "__main__":
    main(sys.argv[1])
