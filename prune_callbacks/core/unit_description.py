"""A unit description of the user's own model (``PruningConfig(units=...)`` / recipe ``pruning.units``).

The built-in families are entries of :data:`.families.FAMILIES`; a model none of them
fits describes its units with the same fields, as module-name regexes::

    units:
      blocks: "layers"                    # fullmatches the module name of the block list(s)
      ffn_in: ["ff.up"]                   # relative to a block: output features = neurons
      ffn_out: "ff.down"                  # input features = neurons
      q: "attn.q"; k: "attn.k"; v: "attn.v"; o: "attn.o"   # optional: attention_heads
      num_heads: 4; num_kv_heads: 4; head_dim: 8            # where the model has no config saying so
      config_fields: {ffn: "d_ff", heads: "n_heads", layers: "n_layers"}  # rewritten by slim (optional)

`check_family` validates it against the model before training: every pattern must match
(the error names the pattern that matched nothing, and what there was), and the shapes
must agree (the error names them). A model without a ``from_pretrained`` config slims in
place (no config to rewrite); save its ``state_dict``.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from prune_callbacks.core.families import Family, StructuredUnitsError

CONFIG_KEYS = ("ffn", "heads", "kv_heads", "head_dim", "hidden", "layers")


class UnitDescription(BaseModel):
    """Where the user's own model keeps its structured units (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: list[str] = Field(..., min_length=1, description="Regexes fullmatching the module name of each block list.")
    ffn_in: list[str] = Field(..., min_length=1, description="FFN input projections (relative to a block).")
    ffn_out: str = Field(..., description="FFN output projection (relative to a block).")
    ffn_parts: Literal[1, 2] = Field(
        1, description="2: one fused gate|up input projection (neuron i = rows i and I+i).")
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    qkv: Optional[str] = Field(None, description="One fused q|k|v projection instead of q, k, v.")
    num_heads: Optional[int] = Field(None, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0)
    head_dim: Optional[int] = Field(None, gt=0)
    config_fields: dict[str, str] = Field(default_factory=dict, description=f"Config fields slim rewrites; keys: "
                                          f"{', '.join(CONFIG_KEYS)}.")

    @field_validator("blocks", "ffn_in")
    @classmethod
    def _compile_all(cls, value):
        for pattern in value:
            _compile(pattern)
        return value

    @field_validator("ffn_out", "q", "k", "v", "o", "qkv")
    @classmethod
    def _compile_one(cls, value):
        if value is not None:
            _compile(value)
        return value

    @field_validator("config_fields")
    @classmethod
    def _keys(cls, value):
        unknown = sorted(set(value) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config_fields has unknown keys {unknown}; allowed: {', '.join(CONFIG_KEYS)}")
        return value

    @model_validator(mode="after")
    def _attention(self):
        separate = [f for f in ("q", "k", "v") if getattr(self, f)]
        if self.qkv and separate:
            raise ValueError(f"give either qkv or q/k/v, not both (got qkv and {', '.join(separate)})")
        if (separate or self.qkv) and (len(separate) not in (0, 3) or not self.o):
            raise ValueError("attention heads need q, k, v and o (or qkv and o); "
                             f"got {', '.join(f for f in ('q', 'k', 'v', 'o', 'qkv') if getattr(self, f)) or 'none'}")
        if self.o and not (separate or self.qkv):
            raise ValueError("o is given without q, k, v (or qkv)")
        return self

    def to_family(self) -> Family:
        f = self.config_fields
        geometry = None
        if self.num_heads and self.head_dim:
            geometry = (self.num_heads, self.num_kv_heads or self.num_heads, self.head_dim)
        return Family(
            "custom", tuple(self.blocks), tuple(self.ffn_in), self.ffn_out, f.get("ffn"), ffn_parts=self.ffn_parts,
            q=self.q, k=self.k, v=self.v, o=self.o, qkv=self.qkv, hidden_field=f.get("hidden"),
            heads_field=f.get("heads"), kv_field=f.get("kv_heads"), head_size_field=f.get("head_dim"),
            layers_fields=(("", f["layers"]),) if "layers" in f else (), per_layer_fields=(), geometry=geometry)


def _compile(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None


def _preview(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "none"


def check_family(family: Family, modules: dict[str, nn.Module]) -> None:
    """Raise `StructuredUnitsError` naming the pattern of ``family`` that matches nothing in ``modules`` (block
    lists, then the modules of the first block) or the shapes that disagree."""

    lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    stacks = [n for n in lists if any(re.fullmatch(p, n) for p in family.stacks)]
    for pattern in family.stacks:
        if not any(re.fullmatch(pattern, n) for n in lists):
            raise StructuredUnitsError(f"units.blocks pattern {pattern!r} matches no nn.ModuleList of the model "
                                       f"(its module lists: {_preview(lists)})")
    problems = []
    for stack in stacks:
        for i in range(len(modules[stack])):
            block = f"{stack}.{i}" if stack else str(i)
            rel = [n[len(block) + 1:] for n in modules if n.startswith(f"{block}.")]
            fields = [("ffn_in", p) for p in family.ffn_in] + [("ffn_out", family.ffn_out)] + \
                [(f, getattr(family, f)) for f in ("q", "k", "v", "o", "qkv") if getattr(family, f)]
            for what, pattern in fields:
                if not any(re.fullmatch(pattern, n) for n in rel):
                    problems.append(f"units.{what} pattern {pattern!r} matches nothing in block {block!r} "
                                    f"(its modules: {_preview(rel)})")
            if problems:
                raise StructuredUnitsError("\n".join(problems))
            _check_shapes(family, modules, block, rel)


def _features(module: nn.Module, output_side: bool) -> Optional[int]:
    from prune_callbacks.core.targets import is_transposed

    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    transposed = is_transposed(module)
    return int(weight.shape[(1 if transposed else 0) if output_side else (0 if transposed else 1)])


def _check_shapes(family: Family, modules, block: str, rel: list[str]) -> None:

    def find(pattern):
        return [n for n in rel if re.fullmatch(pattern, n)]

    ins = [(n, _features(modules[f"{block}.{n}"], True)) for p in family.ffn_in for n in find(p)]
    out = find(family.ffn_out)[0]
    width = _features(modules[f"{block}.{out}"], False)
    for name, features in ins:
        if features is None or width is None:
            raise StructuredUnitsError(f"units: {block}.{name if features is None else out} has no 2-D weight "
                                       "(expected an nn.Linear or Conv1D)")
        if features != width * family.ffn_parts:
            raise StructuredUnitsError(
                f"units: shapes disagree in block {block!r}: ffn_in {name!r} has {features} output features but "
                f"ffn_out {out!r} has {width} input features" + (f" (x{family.ffn_parts} parts)" if family.ffn_parts > 1
                                                                  else ""))
