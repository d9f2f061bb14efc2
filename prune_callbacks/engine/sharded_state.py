"""The pruning state of an FSDP2-sharded run through ``torch.distributed.checkpoint`` (DCP).

Each rank writes its rows of every mask and saliency buffer: the local tensors are
wrapped as DTensors laid out like the parameters they belong to (``Shard(0)`` on the
parameters' mesh), so DCP records the global shapes and can **reshard on load**: a
state written by 2 ranks loads into 4 (or 1) ranks. Counters, schedules and the
config (no tensors) go in ``pruning_state.json``, written by rank 0; DCP would pickle
them, and state files here are never pickled.

Layout on disk: ``<dir>/`` holds DCP's ``.metadata`` and ``__<rank>_0.distcp`` files
plus ``pruning_state.json``. Save it next to the model and optimizer shards (their own
DCP folder). Every rank must call `save_sharded_state` / `load_sharded_state`.
An unsharded pruner (one process, DDP) can use the same functions: its tensors are
written whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from prune_callbacks.engine.state import buffer_names, group_key, load_pruner_state, pruner_state_dict
from prune_callbacks.methods.sharding import is_sharded, local

if TYPE_CHECKING:
    from prune_callbacks.engine.pruner import Pruner

META_FILE = "pruning_state.json"


def _like(tensor: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """``tensor`` (this rank's rows) as a DTensor laid out like the parameter ``source`` (itself if unsharded or None)."""
    if source is None or not is_sharded(source) or tuple(tensor.shape) != tuple(local(source).shape):
        return tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(tensor, source.device_mesh, source.placements, run_check=False,
                              shape=source.shape, stride=source.stride())


def _tensors(pruner: "Pruner") -> dict[str, torch.Tensor]:
    """Every mask and saliency buffer, keyed as in the pruner state (``masks/<key>``, ``saliency/<b>/<key>``),
    as the live tensors (so a DCP load writes into them)."""
    out = {}
    for i, g in enumerate(pruner.groups):
        sources = g.granularity.sources
        elementwise = len(g.masks) == len(sources)
        for j, (name, mask) in enumerate(zip(g.granularity.mask_names, g.masks)):
            out[f"masks/{group_key(i, name)}"] = _like(mask, sources[j]) if elementwise else mask
        keys = buffer_names(g)
        laid_out = [None] * len(keys) if g.saliency.per_unit else sources  # per-unit buffers: whole on every rank
        for b, bufs in g.saliency.buffers.items():
            for key, buf, source in zip(keys, bufs, laid_out):
                out[f"saliency/{b}/{group_key(i, key)}"] = _like(buf, source)
    return out


def save_sharded_state(pruner: "Pruner", directory: Union[str, os.PathLike]) -> Path:
    """Write ``pruner``'s state under ``directory`` (each rank its rows, through DCP); call on every rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    state = pruner_state_dict(pruner)
    meta = {k: v for k, v in state.items() if k not in ("masks", "saliency")}
    meta["saliency_buffers"] = sorted(state["saliency"])
    dcp.save(_tensors(pruner), checkpoint_id=str(directory))
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = directory / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / META_FILE)
    if dist.is_initialized():
        dist.barrier()
    return directory


@torch.no_grad()
def load_sharded_state(pruner: "Pruner", directory: Union[str, os.PathLike]) -> None:
    """Resume ``pruner`` from `save_sharded_state` output, resharding to this run's ranks; call on every rank.

    Refuses (``PruningStateError``) what `Pruner.load_state_dict` refuses (other targets, saliency, ...).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no sharded pruning state at {directory} ({META_FILE} missing)")
    meta = json.loads(path.read_text())
    buffers = meta.pop("saliency_buffers")
    live = _tensors(pruner)
    if meta.get("finalized"):  # a finalized pruner saved no saliency buffers
        live = {k: v for k, v in live.items() if k.startswith("masks/")}
    holders = {k: v.clone() if not is_sharded(v) else _like(local(v).clone(), v) for k, v in live.items()}
    dcp.load(holders, checkpoint_id=str(directory))
    tensors = {k: local(v) for k, v in holders.items()}
    state = dict(meta)
    state["masks"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("masks/")}
    state["saliency"] = {b: {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"saliency/{b}/")}
                         for b in buffers if not meta.get("finalized")}
    load_pruner_state(pruner, state)
