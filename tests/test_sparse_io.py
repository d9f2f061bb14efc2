"""Tests for the compressed sparse checkpoint format (prune_callbacks.export.sparse_io)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from prune_callbacks.export.sparse_io import (
    SparseCheckpointError,
    densify,
    is_sparse_checkpoint,
    load_sparse,
    pack_bitmask,
    read_sparse_state_dict,
    save_sparse,
    unpack_bitmask,
)
from prune_callbacks.export.sparse_io import writer as writer_module
from prune_callbacks.export.sparse_io._hf import drop_tied_aliases
from prune_callbacks.export.sparse_io.format import METADATA_KEY, WEIGHTS_NAME
from prune_callbacks.export.sparse_io.index import decode_index, encode_index

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------- helpers
@torch.no_grad()
def trained_looking(model, dtype):
    """Fresh models have all-zero biases; give every parameter nonzero values."""
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def tiny_bert(dtype=torch.float32, hidden=32, intermediate=37, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate,
    )
    return trained_looking(BertModel(cfg), dtype)


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return trained_looking(LlamaForCausalLM(cfg), dtype)


def prunable(model):
    """The 2-D Linear weights inside the transformer layers."""
    return {
        n: p
        for n, p in model.named_parameters()
        if p.dim() == 2 and (".layer." in n or ".layers." in n)
    }


@torch.no_grad()
def prune_(model, sparsity):
    """Zero exactly round(sparsity * numel) smallest-magnitude entries per weight."""
    for p in prunable(model).values():
        k = round(sparsity * p.numel())
        idx = p.detach().float().abs().reshape(-1).argsort()[:k]
        p.view(-1)[idx] = 0
    return model


def assert_bitwise_equal(expected: dict, actual: dict):
    assert expected.keys() <= actual.keys(), sorted(expected.keys() - actual.keys())
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if tensor.is_floating_point():
            bits = BITS[tensor.dtype]
            assert torch.equal(tensor.contiguous().view(bits), got.contiguous().view(bits)), name
        else:
            assert torch.equal(tensor, got), name


def file_tensors(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


# ----------------------------------------------------------------- bitmask
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1_000_003])
@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_pack_unpack_round_trip(numel, kind):
    gen = torch.Generator().manual_seed(numel)
    mask = {
        "random": torch.rand(numel, generator=gen) < 0.3,
        "all": torch.ones(numel, dtype=torch.bool),
        "none": torch.zeros(numel, dtype=torch.bool),
    }[kind]
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((numel + 7) // 8,)
    if numel % 8:  # unused high bits of the last byte stay zero
        assert int(packed[-1]) >> (numel % 8) == 0
    assert torch.equal(unpack_bitmask(packed, numel), mask)


def test_pack_bit_order_is_little_endian_and_shape_is_flattened():
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    # element 8*i + j is bit j of byte i
    assert packed.tolist() == [0x85, 0x01, 0x02]
    assert torch.equal(unpack_bitmask(packed, 18), mask.reshape(-1))


def test_pack_unpack_reject_bad_input():
    with pytest.raises(TypeError, match="torch.bool"):
        pack_bitmask(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_bitmask(torch.zeros(2, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_bitmask(torch.zeros(3, dtype=torch.uint8), 9)


@pytest.mark.parametrize("density, encoding", [(0.5, "bitmask"), (0.1, "bitmask2"), (0.0, "bitmask2")])
def test_index_picks_smaller_encoding_and_round_trips(density, encoding):
    mask = torch.rand(4099, generator=torch.Generator().manual_seed(3)) < density
    name, data = encode_index(mask)
    assert name == encoding
    assert data.numel() <= (4099 + 7) // 8
    assert torch.equal(decode_index(name, data, 4099), mask)


def _two_level(numel=100):
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[[3, 50]] = True
    name, data = encode_index(mask)
    assert name == "bitmask2"
    return data


INDEX_ERRORS = {
    "unknown encoding": ("rle", torch.zeros(2, dtype=torch.uint8), 9, "unknown index encoding"),
    "wrong dtype": ("bitmask", torch.zeros(2, dtype=torch.int16), 9, "1-D uint8"),
    "padding bits": ("bitmask", torch.tensor([0, 2], dtype=torch.uint8), 9, "bits set past"),
    "short level 1": ("bitmask2", torch.zeros(1, dtype=torch.uint8), 100, "shorter than"),
    "zero level-0 byte": (
        "bitmask2",
        torch.cat([_two_level()[:2], torch.tensor([8, 0], dtype=torch.uint8)]),
        100,
        "all-zero",
    ),
    "level-1 padding": ("bitmask2", torch.tensor([0, 0x80], dtype=torch.uint8), 100, "level-1 bits set past"),
}


@pytest.mark.parametrize("case", sorted(INDEX_ERRORS))
def test_decode_index_rejects_corrupt_data(case):
    encoding, data, numel, problem = INDEX_ERRORS[case]
    with pytest.raises(ValueError, match=problem):
        decode_index(encoding, data, numel)


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_round_trip_is_bitwise(tmp_path, dtype):
    model = prune_(tiny_bert(dtype), 0.9)
    info = save_sparse(model, tmp_path)
    assert info.compressed == sorted(prunable(model)) and len(info.compressed) == 12
    loaded = load_sparse(tmp_path)
    assert type(loaded) is BertModel and not loaded.training
    assert loaded.dtype == dtype
    assert_bitwise_equal(model.state_dict(), loaded.state_dict())
    assert_bitwise_equal(model.state_dict(), read_sparse_state_dict(tmp_path))


def test_tied_weights_stored_once_and_retied(tmp_path):
    model = prune_(tiny_llama(torch.bfloat16), 0.9)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_sparse(model, tmp_path)
    tensors, _ = file_tensors(tmp_path / WEIGHTS_NAME)
    assert "model.embed_tokens.weight" in tensors
    assert not any(k.startswith("lm_head") for k in tensors)
    loaded = load_sparse(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_bitwise_equal(model.state_dict(), loaded.state_dict())
    # also through an Auto class
    auto = load_sparse(tmp_path, model_class=AutoModelForCausalLM)
    assert type(auto) is LlamaForCausalLM
    assert auto.lm_head.weight.data_ptr() == auto.model.embed_tokens.weight.data_ptr()


def test_fallback_tied_alias_removal_keeps_the_source():
    model = tiny_llama()
    out = drop_tied_aliases(model.state_dict(), model)
    assert "model.embed_tokens.weight" in out and "lm_head.weight" not in out
    assert len(out) == len(model.state_dict()) - 1


def test_negative_zero_survives(tmp_path):
    model = prune_(tiny_bert(torch.bfloat16), 0.9)
    name, weight = next(iter(prunable(model).items()))
    with torch.no_grad():
        weight.view(-1)[:5] = -0.0
    save_sparse(model, tmp_path)
    loaded = dict(load_sparse(tmp_path).named_parameters())[name]
    assert torch.signbit(loaded.view(-1)[:5]).all()
    assert torch.equal(weight.view(torch.int16), loaded.view(torch.int16))


# ----------------------------------------------------------------- sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_size_ratio(tmp_path, dtype, sparsity):
    model = prune_(tiny_bert(dtype, hidden=64, intermediate=128), sparsity)
    info = save_sparse(model, tmp_path / "sparse")
    itemsize = torch.finfo(dtype).bits // 8
    bound = {0.5: 0.5 + 1 / (8 * itemsize) + 0.002, 0.9: 0.15, 0.99: 0.03}[sparsity]
    assert info.compressed == sorted(prunable(model))
    assert info.compressed_ratio <= bound, info.compressed_ratio
    model.save_pretrained(tmp_path / "dense")
    dense_file = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    saved = info.compressed_dense_bytes - info.compressed_stored_bytes
    assert info.file_bytes <= dense_file - saved + 16384  # 16 KiB for the larger header (entries, sha256 digests)
    assert info.file_bytes == os.path.getsize(tmp_path / "sparse" / WEIGHTS_NAME)


def test_dense_tensors_stored_as_is(tmp_path):
    model = tiny_bert()  # nothing pruned
    info = save_sparse(model, tmp_path)
    tensors, metadata = file_tensors(tmp_path / WEIGHTS_NAME)
    assert info.compressed == [] and json.loads(metadata[METADATA_KEY])["tensors"] == {}
    assert not any("__mask__" in k or "__values__" in k for k in tensors)
    assert_bitwise_equal(model.state_dict(), tensors)
    # in a pruned model, the (unpruned) embeddings keep their own name
    prune_(model, 0.9)
    save_sparse(model, tmp_path)
    tensors, _ = file_tensors(tmp_path / WEIGHTS_NAME)
    assert "embeddings.word_embeddings.weight" in tensors
    assert "encoder.layer.0.attention.self.query.weight" not in tensors
    assert "encoder.layer.0.attention.self.query.weight.__mask__" in tensors


def test_min_saving(tmp_path):
    model = prune_(tiny_bert(torch.bfloat16), 0.9)
    assert save_sparse(model, tmp_path, min_saving=0.95).compressed == []
    assert len(save_sparse(model, tmp_path, min_saving=0.5).compressed) == 12
    with pytest.raises(ValueError, match="min_saving"):
        save_sparse(model, tmp_path, min_saving=1.0)


# ----------------------------------------------------------------- errors
def _rewrite(path, mutate):
    """Rewrite the file through ``mutate``, with the checksums recomputed (a consistent, crafted file), so the
    structural checks behind the checksum are what these tests exercise (corrupted bytes:
    tests/test_reliability_engine.py)."""
    from prune_callbacks.export.sparse_io.format import CHECKSUM_KEY, payload_digest

    tensors, metadata = file_tensors(path)
    header = json.loads(metadata[METADATA_KEY])
    tensors, metadata = mutate(tensors, metadata, header)
    try:
        changed = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        changed = None
    if isinstance(changed, dict) and CHECKSUM_KEY in changed:
        changed[CHECKSUM_KEY] = {k: payload_digest(t) for k, t in tensors.items()}
        metadata = {**metadata, METADATA_KEY: json.dumps(changed)}
    save_file(tensors, str(path), metadata=metadata)


def _with_header(**changes):
    def mutate(tensors, metadata, header):
        header.update(changes)
        return tensors, {**metadata, METADATA_KEY: json.dumps(header)}

    return mutate


def _first(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _drop_last(suffix):
    def mutate(tensors, metadata, header):
        key = _first(tensors, suffix)
        tensors[key] = tensors[key][:-1].clone()
        return tensors, metadata

    return mutate


def _delete(suffix):
    def mutate(tensors, metadata, header):
        del tensors[_first(tensors, suffix)]
        return tensors, metadata

    return mutate


def _truncate(keep):
    def cut(path):
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return cut


def _garbage(path):
    path.write_bytes(b"this is not a safetensors file" * 4)


def _foreign(path):
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})


ERROR_CASES = {
    "truncated_last_byte": (_truncate(lambda n: n - 1), "corrupt or truncated"),
    "truncated_in_header": (_truncate(lambda n: 20), "corrupt or truncated"),
    "empty": (_truncate(lambda n: 0), "corrupt or truncated"),
    "not_safetensors": (_garbage, "not a readable safetensors file"),
    "foreign": (_foreign, "metadata missing"),
    "other_format": (
        lambda p: _rewrite(p, _with_header(format="someone.else")),
        "names format 'someone.else'",
    ),
    "bad_version": (lambda p: _rewrite(p, _with_header(version=2)), "unsupported format version 2"),
    "bad_json": (
        lambda p: _rewrite(p, lambda t, m, h: (t, {**m, METADATA_KEY: "{not json"})),
        "not valid JSON",
    ),
    "mask_size": (lambda p: _rewrite(p, _drop_last(".__mask__")), "mask size does not match the shape"),
    "values_count": (lambda p: _rewrite(p, _drop_last(".__values__")), "mask's popcount"),
    "missing_values": (lambda p: _rewrite(p, _delete(".__values__")), "missing '"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    save_sparse(prune_(tiny_bert(), 0.9), directory)
    return directory


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_corrupt_files_raise_clear_errors(tmp_path, good_checkpoint, case):
    corrupt, problem = ERROR_CASES[case]
    for name in os.listdir(good_checkpoint):
        (tmp_path / name).write_bytes((good_checkpoint / name).read_bytes())
    path = tmp_path / WEIGHTS_NAME
    corrupt(path)
    with pytest.raises(SparseCheckpointError) as excinfo:
        read_sparse_state_dict(path)
    message = str(excinfo.value)
    assert str(path) in message and problem in message, message
    assert isinstance(excinfo.value, ValueError) and excinfo.value.path == str(path)
    with pytest.raises(SparseCheckpointError, match="sparse.safetensors"):
        load_sparse(tmp_path)


def test_missing_values_message_names_the_tensor(tmp_path, good_checkpoint):
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes((good_checkpoint / WEIGHTS_NAME).read_bytes())
    _rewrite(path, _delete(".__values__"))
    with pytest.raises(SparseCheckpointError, match=r"missing '.*\.__values__' for '.*\.__mask__'"):
        read_sparse_state_dict(path)


def _extra_tensor(tensors, metadata, header):
    return {**tensors, "encoder.extra.weight": torch.ones(2)}, metadata


def _drop_dense(tensors, metadata, header):
    del tensors["embeddings.LayerNorm.weight"]
    return tensors, metadata


@pytest.mark.parametrize("mutate, problem", [(_extra_tensor, "unexpected"), (_drop_dense, "missing")])
def test_load_is_strict(tmp_path, good_checkpoint, mutate, problem):
    for name in os.listdir(good_checkpoint):
        (tmp_path / name).write_bytes((good_checkpoint / name).read_bytes())
    _rewrite(tmp_path / WEIGHTS_NAME, mutate)
    read_sparse_state_dict(tmp_path)  # the file itself is fine
    with pytest.raises(SparseCheckpointError, match=f"do not match BertModel.*{problem}"):
        load_sparse(tmp_path)


def test_is_sparse_checkpoint(tmp_path, good_checkpoint):
    assert is_sparse_checkpoint(good_checkpoint)
    assert is_sparse_checkpoint(good_checkpoint / WEIGHTS_NAME)
    assert not is_sparse_checkpoint(tmp_path)
    _foreign(tmp_path / WEIGHTS_NAME)
    assert not is_sparse_checkpoint(tmp_path)
    _garbage(tmp_path / WEIGHTS_NAME)
    assert not is_sparse_checkpoint(tmp_path)


# ----------------------------------------------------------------- atomicity
class _ExplodingTokenizer:
    def save_pretrained(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w") as fh:
            fh.write("{half")
        raise OSError("disk full")


def _explode_mid_write(monkeypatch):
    real = writer_module.save_file

    def half_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "rb+") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "save_file", half_write)


@pytest.mark.parametrize("failure", ["weights", "tokenizer"])
def test_failed_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch, failure):
    old = prune_(tiny_bert(seed=1), 0.9)
    save_sparse(old, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    new = prune_(tiny_llama(seed=2), 0.5)
    tokenizer = None
    if failure == "weights":
        _explode_mid_write(monkeypatch)
    else:
        tokenizer = _ExplodingTokenizer()
    with pytest.raises(OSError, match="disk full"):
        save_sparse(new, tmp_path, tokenizer=tokenizer)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before  # no new, changed or left-over staging files
    assert_bitwise_equal(old.state_dict(), load_sparse(tmp_path).state_dict())


# ----------------------------------------------------------------- densify
def test_densify_loads_with_plain_from_pretrained(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sparse", "weights", "prune"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    model = prune_(tiny_bert(torch.bfloat16), 0.9)
    save_sparse(model, tmp_path / "sparse", tokenizer=tokenizer)
    densify(tmp_path / "sparse", tmp_path / "dense")
    files = set(os.listdir(tmp_path / "dense"))
    assert "model.safetensors" in files and WEIGHTS_NAME not in files
    assert not is_sparse_checkpoint(tmp_path / "dense")
    plain = AutoModel.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    assert type(plain) is BertModel
    assert_bitwise_equal(model.state_dict(), plain.state_dict())
    assert_bitwise_equal(model.state_dict(), load_file(str(tmp_path / "dense" / "model.safetensors")))
    ids = AutoTokenizer.from_pretrained(tmp_path / "dense")("prune sparse weights")["input_ids"]
    assert ids == [2, 7, 5, 6, 3]
    with pytest.raises(ValueError, match="different"):
        densify(tmp_path / "sparse", tmp_path / "sparse")
