"""The architecture support table: one tiny random config per architecture, the check each cell runs,
and the generator of ``docs/support-matrix.md``.

``tests/test_architectures.py`` runs `check` over `CASES` x `COLUMNS`; ``python
tests/support_matrix.py`` runs the same checks and writes the markdown table, so
what the docs claim is what was run. A cell is ``"ok"`` or the refusal message (the case's
``refuse`` says which kinds are refused, and by which words).

Each structured check: a few AdamW steps with a `Pruner` of that kind, the masks zero on every
tensor the units span, the masked model's logits equal to the slimmed model's, ``save_pretrained``,
a vanilla ``from_pretrained`` reload and its logits equal to the slimmed model's (max abs diff
<= 1e-5, fp32). It is a test and docs tool, kept beside the tests: the package never imports it.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

STRUCTURED = ("ffn_neurons", "attention_heads", "blocks")
COLUMNS = ("unstructured", "2:4", *STRUCTURED)
SPARSITY = {"ffn_neurons": 0.5, "attention_heads": 0.5, "blocks": 1 / 3, "unstructured": 0.5}
VOCAB, SEQ, STEPS = 64, 8, 3
RELOAD_ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One architecture: its transformers config / model class and a tiny config."""

    name: str
    family: str
    config: str
    model: str
    kwargs: dict = field(default_factory=dict)
    inputs: str = "text"  # "text" / "seq2seq" / "image"
    refuse: dict = field(default_factory=dict)  # kind -> words the refusal message must contain
    masked_atol: float = 1e-4  # masked vs slimmed (float rounding differs; OLMo-2's RMS over fewer entries)


_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
_DEC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
_HEADS_DERIVED = {"attention_heads": "derives head size"}

CASES: tuple[Case, ...] = (
    Case("BERT", "bert", "BertConfig", "BertForMaskedLM", _ENC, refuse=_HEADS_DERIVED),
    Case("RoBERTa", "bert", "RobertaConfig", "RobertaForMaskedLM", {**_ENC, "pad_token_id": 1,
                                                                      "max_position_embeddings": 72},
         refuse=_HEADS_DERIVED),
    Case("DistilBERT", "distilbert", "DistilBertConfig", "DistilBertForMaskedLM",
         dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64),
         refuse=_HEADS_DERIVED),
    Case("DeBERTa-v2", "deberta-v2", "DebertaV2Config", "DebertaV2ForMaskedLM",
         {**_ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
          "max_relative_positions": 16}, refuse={"attention_heads": "hidden_size x hidden_size"}),
    Case("ELECTRA", "bert", "ElectraConfig", "ElectraForMaskedLM", {**_ENC, "embedding_size": 32},
         refuse=_HEADS_DERIVED),
    Case("GPT-2", "gpt2", "GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                                                 n_positions=64), refuse=_HEADS_DERIVED),
    Case("OPT", "opt", "OPTConfig", "OPTForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
         refuse=_HEADS_DERIVED),
    Case("Llama", "llama", "LlamaConfig", "LlamaForCausalLM", _DEC),
    Case("Mistral", "llama", "MistralConfig", "MistralForCausalLM", _DEC),
    Case("Qwen2", "llama", "Qwen2Config", "Qwen2ForCausalLM", _DEC),
    Case("Qwen3", "llama", "Qwen3Config", "Qwen3ForCausalLM", _DEC),
    Case("Gemma", "llama", "GemmaConfig", "GemmaForCausalLM", _DEC),
    Case("Gemma 2", "llama", "Gemma2Config", "Gemma2ForCausalLM", {**_DEC, "sliding_window": 4}),
    Case("Phi-3", "phi3", "Phi3Config", "Phi3ForCausalLM", {k: v for k, v in _DEC.items() if k != "head_dim"}),
    # OLMo-2's q_norm/k_norm: RMS over the remaining entries, exact up to the norm's eps (initializer_range: the
    # tiny model's activations would otherwise be as small as eps)
    Case("OLMo-2", "llama", "Olmo2Config", "Olmo2ForCausalLM", {**_DEC, "initializer_range": 0.5}, masked_atol=1e-3),
    Case("Granite", "llama", "GraniteConfig", "GraniteForCausalLM", {k: v for k, v in _DEC.items() if k != "head_dim"}),
    Case("SmolLM3", "llama", "SmolLM3Config", "SmolLM3ForCausalLM", {**_DEC, "no_rope_layer_interval": 2}),
    Case("T5", "t5", "T5Config", "T5ForConditionalGeneration",
         dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
              relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
         inputs="seq2seq"),
    Case("ViT", "vit", "ViTConfig", "ViTForImageClassification",
         dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, num_labels=3), inputs="image"),
)


def build(case: Case, seed: int = 0):
    import transformers

    config = getattr(transformers, case.config)(**case.kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, case.model)(config)


def batch(case: Case, seed: int) -> tuple[dict, dict]:
    """(model inputs, the same with labels) for one small batch."""
    g = torch.Generator().manual_seed(seed)
    if case.inputs == "image":
        x = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
        return x, {**x, "labels": torch.randint(0, 3, (2,), generator=g)}
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    if case.inputs == "seq2seq":
        dec = torch.randint(3, VOCAB, (2, SEQ), generator=g)
        return {"input_ids": ids, "decoder_input_ids": dec}, {"input_ids": ids, "labels": dec}
    return {"input_ids": ids}, {"input_ids": ids, "labels": ids}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


def train(model, case: Case, kind: str, steps: int = STEPS):
    """A `Pruner` of ``kind`` (pruning at step 1), ``steps`` AdamW steps; returns the pruner."""
    from prune_callbacks import Pruner, PruningConfig

    granularity = {"unstructured": "unstructured"}.get(kind, kind)
    extra = {} if kind == "2:4" else {"final_sparsity": SPARSITY[kind]}
    config = PruningConfig(granularity=granularity, start_step=1, end_step=1, update_every=1, **extra)
    pruner = Pruner(model, config, total_steps=steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    model.train()
    for step in range(steps):
        _, labelled = batch(case, step + 1)
        model(**labelled).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return pruner


def masks_zero(pruner) -> bool:
    """Every tensor slice a pruned unit spans is exactly zero."""
    from prune_callbacks.methods.granularity.structured import StructuredUnits

    for group in pruner.groups:
        gran = group.granularity
        if not isinstance(gran, StructuredUnits):
            continue
        if not any(bool(m.any()) for m in gran.masks):
            return False  # the check would be vacuous
        for unit_group, pruned in zip(gran.groups, gran.masks):
            for span in unit_group.spans:
                view = span.unit_view(span.param.detach(), unit_group.n_units)
                if bool(view[pruned.cpu() if span.dim is not None else pruned.any().reshape(1)].any()):
                    return False
    return True


def check(case: Case, kind: str, folder: Optional[Path] = None) -> dict:
    """Run one cell; returns ``{"ok": bool, ...}`` with the figures (or ``refused``: the message)."""
    from prune_callbacks.methods.structured import StructuredUnitsError
    from prune_callbacks.export import slim_pruned

    model = build(case)
    inputs, _ = batch(case, 0)
    try:
        pruner = train(model, case, kind)
    except StructuredUnitsError as exc:
        return {"ok": False, "refused": str(exc)}
    if kind not in STRUCTURED:
        report = pruner.report()
        return {"ok": report["global_sparsity"] > 0.3, "sparsity": report["global_sparsity"]}
    zero = masks_zero(pruner)
    masked = logits(model, inputs)
    before = sum(p.numel() for p in model.parameters())
    summary = slim_pruned(model, pruner)
    slim_logits = logits(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(folder or tmp)
        model.save_pretrained(out)
        import transformers

        reloaded = getattr(transformers, case.model).from_pretrained(out)
        reload_logits = logits(reloaded, inputs)
    masked_diff = float((masked - slim_logits).abs().max())
    reload_diff = float((reload_logits - slim_logits).abs().max())
    ok = zero and masked_diff <= case.masked_atol and reload_diff <= RELOAD_ATOL and summary["params_after"] < before
    return {"ok": ok, "masks_zero": zero, "masked_vs_slim": masked_diff, "reload_vs_slim": reload_diff,
            "params": [before, summary["params_after"]], "config": summary["config"]}


def cell(case: Case, kind: str, result: dict) -> str:
    if result.get("refused"):
        return "refused"
    return "yes" if result["ok"] else "FAILS"


def render(results: dict) -> str:
    """Markdown for ``results``: ``{(case name, column): check result}``."""
    head = ["Architecture", "family", "unstructured", "N:M (2:4)", "FFN neurons", "attention heads", "blocks",
            "slim + vanilla reload"]
    lines = ["# Support matrix", "",
             "Generated by `python tests/support_matrix.py` from the table "
             "`tests/test_architectures.py` runs (`tests/support_matrix.py: CASES`). "
             "Each structured cell: tiny random config, 3 AdamW steps with a `Pruner` of that kind, masks zero on "
             "every spanned tensor, masked logits = slimmed logits, `save_pretrained`, vanilla `from_pretrained` "
             f"reload, logits equal (max abs diff <= {RELOAD_ATOL:g}, fp32). Unit descriptions: "
             "`prune_callbacks/core/families.py`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons = {}
    for case in CASES:
        row = [case.name, f"`{case.family}`"]
        for column in COLUMNS:
            r = results[(case.name, column)]
            row.append(cell(case, column, r))
            if r.get("refused"):
                reasons.setdefault(r["refused"].split(":")[1].strip() if ":" in r["refused"] else r["refused"],
                                   []).append(case.name)
        structured = [results[(case.name, k)] for k in STRUCTURED if not results[(case.name, k)].get("refused")]
        row.append("yes" if structured and all(r["ok"] for r in structured) else "FAILS")
        lines.append("| " + " | ".join(row) + " |")
    if reasons:
        lines += ["", "Refused (the message structured pruning gives):", ""]
        lines += [f"- {', '.join(names)}: {why}" for why, names in reasons.items()]
    lines += ["", "OLMo-2's `q_norm` / `k_norm` normalise the whole projection: cutting heads cuts their weights too "
              "and "
              "scales them by sqrt(old width / new width), so the root-mean-square over the fewer remaining entries "
              "gives the masked model's values, exact up to the norm's eps (the cell allows 1e-3 between the masked "
              "and the slimmed model; the reload is exact). T5: heads of the self-attention are one unit across "
              "each block list (block 0's relative position bias is shared by every block); removing block 0 hands "
              "that bias to the new first block."]
    lines += ["", "Your own architecture: describe its units with `PruningConfig(units=...)` "
              "(`prune_callbacks/core/unit_description.py`); a model without a `from_pretrained` config is slimmed "
              "in place, save its `state_dict`.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/support-matrix.md")
    args = parser.parse_args(argv)
    results = {(case.name, column): check(case, column) for case in CASES for column in COLUMNS}
    Path(args.out).write_text(render(results))
    failed = [k for k, r in results.items() if not r["ok"] and not r.get("refused")]
    print(f"wrote {args.out}; {len(results)} cells, {len(failed)} failing: {failed}")


if __name__ == "__main__":
    main()
