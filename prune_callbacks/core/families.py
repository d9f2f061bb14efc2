"""The unit description of every architecture family structured pruning knows: one table.

A `Family` says, declaratively, where a model keeps its structured units:

* **blocks**: ``stacks`` are regexes that fullmatch the module name of a block list
  (an ``nn.ModuleList``); an encoder-decoder (T5) has two;
* **FFN neurons**: ``ffn_in`` (regexes relative to a block) are the projections whose
  *output* features are the neurons (weight rows, or columns of a GPT-2 ``Conv1D``, and
  bias entries), ``ffn_out`` the projection whose *input* features are; ``ffn_parts=2``
  for a fused ``gate|up`` projection (neuron ``i`` is row ``i`` and row ``I + i``);
* **attention heads** (one unit = one KV group with the query heads that read it):
  ``q``/``k``/``v``/``o`` (regexes relative to a block; several matches = several
  attentions per block, e.g. T5's self- and cross-attention), or a fused ``qkv``
  (thirds sized ``heads*d | kv*d | kv*d``); ``head_extras`` are more query-sized
  projections of the attention module (DeBERTa-v2's ``pos_key_proj`` / ``pos_query_proj``),
  ``head_norms`` the norms of the attention module that go with the heads (OLMo-2's
  ``q_norm``/``k_norm`` normalise the whole projection: they span the heads; Qwen3's
  normalise one head and span nothing), ``head_tables`` per-head columns of an embedding
  (T5's ``relative_attention_bias``); ``tied_heads``: attentions whose head ``i`` is one
  unit across the whole stack (T5's self-attention: block 0 computes the relative
  position bias of every head once and every block of the stack adds column ``i`` to
  its head ``i``, so the same heads must go in every block);
* **config fields** rewritten when units are cut (``ffn_field``, ``heads_field``,
  ``kv_field``, ``head_size_field``, ``layers_fields`` per stack, ``per_layer_fields``);
  ``heads_refusal`` says why a config cannot describe fewer heads (head size derived as
  hidden / heads), so ``attention_heads`` is refused there;
* ``stack_owned``: modules of a stack's first block that the whole stack uses (T5's
  relative position bias), kept out of the ``blocks`` unit and moved to the new first
  block when the first one is removed; ``block_refusals``: config flags under which
  blocks cannot be removed;
* **the residual form** the block fold (``merge`` with ``blocks``,
  :mod:`prune_callbacks.methods.structured.block_merging`) relies on: a block ends either
  in ``stream + FFN output`` (pre-LN: GPT-2, Llama, T5, ViT; ``post_norm`` None) or in a
  norm over that sum (post-LN: ``post_norm``, BERT's ``output.LayerNorm``);
  ``fold_refusals`` name the modules (relative to a block) and ``fold_flag_refusals`` the
  config values under which neither holds (a norm on the FFN output before the add:
  Gemma 2/3, OLMo-2; post-LN OPT).

`FAMILIES` is the table the masks (:mod:`.units`, :mod:`.masking`), `slim`
(:mod:`.slim`) and the analysis (:mod:`prune_callbacks.analysis.architecture`) read; a
user's own model brings its own entry (:mod:`.description`). Pure data: no torch, no
transformers. A new architecture is a new row here plus a case in
:mod:`tests/support_matrix.py` (the test and the docs table follow).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional



class StructuredUnitsError(ValueError):
    """A model or unit kind that structured pruning cannot describe or cut."""


#: module attributes (on the attention module) that count query heads / KV heads / hold heads * head size
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
WIDTH_ATTRS = ("all_head_size", "inner_dim")
#: per-layer config lists subset when blocks are removed (only when their length is the number of layers)
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "attention_types_per_layer")

_DERIVED = ("derives head size as {hidden} / {heads}, so a config cannot describe fewer heads with the same "
            "hidden size (transformers 5 has no pruned_heads)")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its units (see the module docstring)."""

    name: str
    stacks: tuple[str, ...]
    ffn_in: tuple[str, ...]
    ffn_out: str
    ffn_field: Optional[str]
    ffn_parts: int = 1
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    qkv: Optional[str] = None
    head_extras: tuple[str, ...] = ()
    head_norms: tuple[tuple[str, str], ...] = ()  # (name in the attention module, "q" or "kv")
    head_tables: tuple[str, ...] = ()
    tied_heads: tuple[str, ...] = ()  # attentions (relative to a block) whose heads are one unit across a stack
    hidden_field: Optional[str] = "hidden_size"
    heads_field: Optional[str] = "num_attention_heads"
    kv_field: Optional[str] = None
    head_size_field: Optional[str] = None
    heads_refusal: Optional[str] = None
    # (regex searched in the block list's name, its layer-count field)
    layers_fields: tuple[tuple[str, str], ...] = (("", "num_hidden_layers"),)
    per_layer_fields: tuple[str, ...] = PER_LAYER_FIELDS
    stack_owned: tuple[tuple[str, str], ...] = ()  # (module relative to a block, flag set on its new parent)
    block_refusals: tuple[tuple[str, str], ...] = ()  # (truthy config flag, why blocks cannot be removed)
    geometry: Optional[tuple[int, int, int]] = None  # (heads, kv heads, head size) where no config says
    post_norm: Optional[str] = None  # post-LN: the norm over FFN output + residual that ends a block (relative)
    fold_refusals: tuple[tuple[str, str], ...] = ()  # (module regex relative to a block, why blocks cannot fold)
    fold_flag_refusals: tuple[tuple[str, object, str], ...] = ()  # (config field, value, why blocks cannot fold)

    @property
    def attention_in(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else tuple(p for p in (self.q, self.k, self.v) if p)

    def layers_field(self, stack: str) -> Optional[str]:
        """The config field counting the blocks of block list ``stack``."""
        return next((f for pattern, f in self.layers_fields if re.search(pattern, stack)), None)


_BERT_FFN = dict(ffn_in=(r"intermediate\.dense",), ffn_out=r"output\.dense", ffn_field="intermediate_size",
                 post_norm=r"output\.LayerNorm")
_LLAMA_FFN = dict(ffn_in=(r"mlp\.gate_proj", r"mlp\.up_proj"), ffn_out=r"mlp\.down_proj", ffn_field="intermediate_size")
_LLAMA_HEADS = dict(kv_field="num_key_value_heads", head_size_field="head_dim")

FAMILIES: tuple[Family, ...] = (
    # BERT, RoBERTa, ELECTRA, (XLM-)RoBERTa-likes
    Family("bert", (r"(.+\.)?encoder\.layer",), **_BERT_FFN,
           q=r"attention\.self\.query", k=r"attention\.self\.key", v=r"attention\.self\.value",
           o=r"attention\.output\.dense",
           heads_refusal="BERT-style attention " + _DERIVED.format(hidden="hidden_size", heads="num_attention_heads")),
    Family("deberta-v2", (r"(.+\.)?encoder\.layer",), **_BERT_FFN,
           q=r"attention\.self\.query_proj", k=r"attention\.self\.key_proj", v=r"attention\.self\.value_proj",
           o=r"attention\.output\.dense", head_extras=("pos_key_proj", "pos_query_proj"),
           head_size_field="attention_head_size",
           heads_refusal="DeBERTa-v2's attention output projection is built hidden_size x hidden_size (not heads x "
                         "head size), so a config cannot describe fewer heads"),
    # ViT (transformers 5: q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2; head size read as config.head_dim)
    Family("vit", (r"(.+\.)?layers",), (r"mlp\.fc1",), r"mlp\.fc2", "intermediate_size",
           q=r"attention\.q_proj", k=r"attention\.k_proj", v=r"attention\.v_proj", o=r"attention\.o_proj",
           head_size_field="head_dim"),
    Family("distilbert", (r"(.+\.)?transformer\.layer",), (r"ffn\.lin1",), r"ffn\.lin2", "hidden_dim",
           q=r"attention\.q_lin", k=r"attention\.k_lin", v=r"attention\.v_lin", o=r"attention\.out_lin",
           hidden_field="dim", heads_field="n_heads", layers_fields=(("", "n_layers"),), post_norm=r"output_layer_norm",
           heads_refusal="DistilBERT attention " + _DERIVED.format(hidden="dim", heads="n_heads")),
    Family("gpt2", (r"(.+\.)?h",), (r"mlp\.c_fc",), r"mlp\.c_proj", "n_inner", qkv=r"attn\.c_attn", o=r"attn\.c_proj",
           hidden_field="n_embd", heads_field="n_head", layers_fields=(("", "n_layer"),),
           heads_refusal="GPT-2 attention fuses q/k/v in c_attn and "
                         + _DERIVED.format(hidden="n_embd", heads="n_head"),
           block_refusals=(("scale_attn_by_inverse_layer_idx",
                            "its attention scale depends on the layer index, which changes when blocks are removed"),)),
    Family("opt", (r"(.+\.)?decoder\.layers",), (r"fc1",), r"fc2", "ffn_dim",
           fold_flag_refusals=(("do_layer_norm_before", False, "post-LN OPT (do_layer_norm_before=False) normalises "
                                "after the residual add with a norm the family table does not name"),),
           q=r"self_attn\.q_proj", k=r"self_attn\.k_proj", v=r"self_attn\.v_proj", o=r"self_attn\.out_proj",
           heads_refusal="OPT attention " + _DERIVED.format(hidden="hidden_size", heads="num_attention_heads")),
    # Phi-3: fused qkv_proj and gate_up_proj
    Family("phi3", (r"(.+\.)?layers",), (r"mlp\.gate_up_proj",), r"mlp\.down_proj", "intermediate_size", ffn_parts=2,
           qkv=r"self_attn\.qkv_proj", o=r"self_attn\.o_proj", **_LLAMA_HEADS),
    # Llama, Mistral, Qwen2/3, Gemma 1/2/3, Granite, SmolLM3, OLMo-2 (q_norm/k_norm over the whole projection)
    Family("llama", (r"(.+\.)?layers",), **_LLAMA_FFN,
           q=r"self_attn\.q_proj", k=r"self_attn\.k_proj", v=r"self_attn\.v_proj", o=r"self_attn\.o_proj",
           head_norms=(("q_norm", "q"), ("k_norm", "kv")), **_LLAMA_HEADS,
           fold_refusals=((r"post_feedforward_layernorm", "the FFN output is normalised before the residual add "
                           "(Gemma 2/3, OLMo-2), so the kept block's output is not linear in its FFN output "
                           "projection"),)),
    # T5 / mT5 / Flan-T5: encoder and decoder block lists; heads describable through d_kv
    Family("t5", (r"(.+\.)?encoder\.block", r"(.+\.)?decoder\.block"),
           (r"layer\.\d+\.DenseReluDense\.wi(_\d)?",), r"layer\.\d+\.DenseReluDense\.wo", "d_ff",
           q=r"layer\.\d+\.(SelfAttention|EncDecAttention)\.q", k=r"layer\.\d+\.(SelfAttention|EncDecAttention)\.k",
           v=r"layer\.\d+\.(SelfAttention|EncDecAttention)\.v", o=r"layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
           head_tables=("relative_attention_bias",), tied_heads=(r"layer\.0\.SelfAttention",), hidden_field="d_model",
           heads_field="num_heads",
           head_size_field="d_kv", layers_fields=((r"decoder", "num_decoder_layers"), ("", "num_layers")),
           per_layer_fields=(),
           stack_owned=(("layer.0.SelfAttention.relative_attention_bias", "has_relative_attention_bias"),)),
)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no architecture family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
