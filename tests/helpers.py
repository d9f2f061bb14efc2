"""Tiny models and data built in-process (no downloads), shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TinyLM(nn.Module):
    """Embedding -> numbered blocks -> head tied to the embedding (pure torch)."""

    def __init__(self, vocab: int = 11, dim: int = 16, hidden: int = 32, layers: int = 3, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, hidden) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def random_batches(n: int, batch: int = 8, seq: int = 6, vocab: int = 11, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert_classifier(seed: int = 0, **overrides):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def tiny_llama_lm(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def toy_classification_rows(n: int = 64, seq: int = 12, vocab: int = 101, seed: int = 0) -> list[dict]:
    """Token sequences whose label is whether token 7 appears: learnable by a tiny BERT."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(8, vocab, (seq,), generator=g)
        label = i % 2
        if label:
            ids[int(torch.randint(1, seq, (1,), generator=g))] = 7
        ids[0] = 2
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * seq, "labels": label})
    return rows


def rank_results(out_dir, nproc: int = 2, prefix: str = "") -> list:
    """What each rank of a multi-process test script wrote to ``out_dir`` as ``<prefix>rank<r>.json``, by rank."""
    import json
    from pathlib import Path

    return [json.loads(Path(out_dir, f"{prefix}rank{r}.json").read_text()) for r in range(nproc)]


def run_torchrun(script, *args, timeout: int = 170):
    """Run ``script`` under ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) with this checkout on the
    path; skips the test when torchrun is missing, fails it with the output tail when a rank fails."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def digest(tensors) -> str:
    """A short hash of the bytes of ``tensors`` (compare masks / weights across processes or runs)."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reset_accelerate_state() -> None:
    """Accelerate's state is a process-wide singleton: forget it (before and after each Accelerate test)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


#: torch's CPU attention kernels call ``pack_vnni2`` (AVX-512 only) on AVX-512/AMX CPUs even when
#: ``ATEN_CPU_CAPABILITY`` forces a lower level, and raise: a limitation of torch under the forced setting (the
#: suite's second-capability run), not of this code; on a CPU that really is AVX2 these tests run
needs_native_attention_kernels = pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in {"default", "avx2"},
    reason="torch's CPU attention calls pack_vnni2 (AVX-512 only) under a forced lower ATEN_CPU_CAPABILITY",
)


def end_world() -> None:
    """End a torchrun test script: barrier, `destroy_process_group`, then leave without interpreter finalization.

    Every result is on disk before this is called. Objects that still hold the gloo group (FSDP2's device mesh,
    DTensor specs) are otherwise torn down during finalization, where gloo's worker threads can abort the process
    ("terminate called without an active exception", SIGABRT: one 4-rank FSDP2 run in a fresh-clone CI), and the
    exit status would then report that teardown instead of the script."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
