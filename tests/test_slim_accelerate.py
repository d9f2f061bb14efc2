"""``AcceleratePruningHook.finalize(slim=True)`` in a single-process Accelerate loop: the model the loop holds
(through ``accelerator.unwrap_model``, also when it is DDP-wrapped) is cut in place, equals the masked
model and reloads with plain ``from_pretrained``."""

from __future__ import annotations

import copy
import socket

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from accelerate import Accelerator  # noqa: E402
from helpers import tiny_llama_lm  # noqa: E402
from test_accelerate_hook import fresh_accelerate_state  # noqa: E402,F401  (autouse: a clean Accelerator singleton)
from transformers import AutoModelForCausalLM  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook  # noqa: E402

STEPS = {"start_step": 1, "end_step": 4, "update_every": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrap", ["plain", "ddp"])
def test_finalize_slim_cuts_the_loop_model_in_place(tmp_path, wrap):
    acc = Accelerator(cpu=True)
    model = tiny_llama_lm(seed=0, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if wrap == "ddp":  # what accelerate.prepare does under --multi_gpu, with a one-process group
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        model = torch.nn.parallel.DistributedDataParallel(model)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        hook = AcceleratePruningHook([PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, **STEPS),
                                      PruningConfig(granularity="attention_heads", final_sparsity=0.5, **STEPS)],
                                     total_steps=6)
        pruner = hook.register(acc, model, opt)
        inner = acc.unwrap_model(model)
        assert pruner.model is inner  # the pruner holds the bare model, never the wrapper
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            ids = torch.randint(0, 97, (4, 10), generator=g)
            acc.backward(model(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()
        masked = copy.deepcopy(inner).eval()
        report = hook.finalize(slim=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert acc.unwrap_model(model) is inner
    assert report["slim"]["config"] == {"intermediate_size": [48, 24], "num_attention_heads": [4, 2],
                                        "num_key_value_heads": [2, 1]}
    assert inner.config.intermediate_size == 24 and inner.model.layers[0].self_attn.k_proj.out_features == 8
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    inner.eval()
    with torch.no_grad():
        expected = masked(input_ids=ids).logits
        assert (inner(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
        inner.save_pretrained(tmp_path / "slim")
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "slim")).eval()
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    assert hook.finalize()["step"] == 6  # again: the report, nothing else
