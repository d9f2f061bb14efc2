"""Where a model's repeated blocks are: their lists, names, family and the modules the family names in them.

`block_layout(model)` recognises the architecture by module names (the family table, :mod:`prune_callbacks.core.families`,
or the user's own description) and returns a `BlockLayout`: the block lists (an encoder-decoder has two), every
module by name, and lookups of a block's FFN and attention projections. The unit maps (:mod:`.units`), the masks,
the mergers, slim and the analysis read blocks only through it. Pure torch; the config is read duck-typed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from prune_callbacks.core.families import FAMILIES, Family, StructuredUnitsError
from prune_callbacks.core.targets import unwrap_model


@dataclass
class BlockLayout:
    """The model's repeated blocks: their lists, names and family (``family`` is None only for
    ``block_layout(model, known_only=False)`` on a model whose blocks it does not recognise)."""

    family: Optional[Family]
    stacks: list[tuple[str, list[str]]]  # (module name of the ModuleList, its block names)
    modules: dict[str, nn.Module]
    config: object

    @property
    def arch(self) -> Optional[Family]:
        return self.family

    @property
    def container(self) -> str:
        return self.stacks[0][0] if self.stacks else ""

    @property
    def blocks(self) -> list[str]:
        return [b for _, blocks in self.stacks for b in blocks]

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def stack_of(self, block: str) -> str:
        return next(c for c, blocks in self.stacks if block in blocks)

    def matches(self, block: str, pattern: Optional[str]) -> list[str]:
        """Full names of the modules of ``block`` whose name relative to it fullmatches ``pattern``."""
        if pattern is None:
            return []
        prefix = f"{block}."
        rx = re.compile(pattern)
        return [n for n in self.modules if n.startswith(prefix) and rx.fullmatch(n[len(prefix):])]

    def ffn_modules(self, block: str) -> tuple[list[str], Optional[str]]:
        """Full names of ``block``'s FFN input projections and its output projection."""
        if self.family is None:
            return [], None
        ins = [n for p in self.family.ffn_in for n in self.matches(block, p)]
        out = self.matches(block, self.family.ffn_out)
        return ins, (out[0] if out else None)

    def attentions(self, block: str) -> list[tuple[list[str], str]]:
        """Per attention of ``block``: its q/k/v (or fused qkv) projections and its output projection."""
        if self.family is None or self.family.o is None:
            return []
        ins = [self.matches(block, p) for p in self.family.attention_in]
        outs = self.matches(block, self.family.o)
        if not ins or any(len(i) != len(outs) for i in ins):
            return []
        return [([i[a] for i in ins], outs[a]) for a in range(len(outs))]

    def attention_modules(self, block: str) -> tuple[list[str], Optional[str]]:
        """The first attention of ``block`` (``([], None)`` where there is none)."""
        found = self.attentions(block)
        return found[0] if found else ([], None)


def _module_lists(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {n: m for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0}


def _stacks(family: Family, modules: dict[str, nn.Module]) -> list[tuple[str, list[str]]]:
    """The block lists of ``family`` in ``modules``: every block has the family's FFN and attention modules.
    One list per pattern of ``family.stacks`` (the longest where several fit, e.g. a vision tower's)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for name, module in _module_lists(modules).items():
        pattern = next((p for p in family.stacks if re.fullmatch(p, name)), None)
        if pattern is None:
            continue
        blocks = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
        probe = BlockLayout(family, [(name, blocks)], modules, None)
        if all(probe.matches(b, family.ffn_out) and all(probe.matches(b, p) for p in family.ffn_in)
               and (family.o is None or probe.attentions(b)) for b in blocks):
            if pattern not in found or len(blocks) > len(found[pattern][1]):
                found[pattern] = (name, blocks)
    return [found[p] for p in family.stacks if p in found]


def _largest_module_list(modules: dict[str, nn.Module]) -> Optional[str]:
    best = None
    for name, module in _module_lists(modules).items():
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[1]:
            best = (name, size)
    return None if best is None else best[0]


def block_layout(model: nn.Module, *, known_only: bool = True, family: Optional[Family] = None) -> BlockLayout:
    """Find the block list(s) and the family of ``model`` (``family`` given: only that one, e.g. a user's own).

    ``known_only=False`` (analysis): a model whose blocks match no family gets the ``nn.ModuleList``
    holding the most parameters as its blocks, with ``family=None`` (no units), instead of an error.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    if family is not None:
        from prune_callbacks.core.unit_description import check_family  # the user's own description: errors name the pattern

        check_family(family, modules)
    for candidate in (family,) if family is not None else FAMILIES:
        stacks = _stacks(candidate, modules)
        if stacks:
            return BlockLayout(candidate, stacks, modules, config)
    if not known_only:
        container = _largest_module_list(modules)
        stacks = [] if container is None else [(container, [f"{container}.{i}" if container else str(i)
                                                            for i in range(len(modules[container]))])]
        return BlockLayout(None, stacks, modules, config)
    raise StructuredUnitsError(
        "structured pruning found no transformer blocks it knows: expected an nn.ModuleList of blocks of one of the "
        f"families {', '.join(f.name for f in FAMILIES)} (e.g. BERT intermediate.dense / output.dense, Llama "
        "mlp.gate_proj / up_proj / down_proj, GPT-2 mlp.c_fc / mlp.c_proj). For your own architecture, describe its "
        "units with PruningConfig(units=...) (see prune_callbacks.core.unit_description)"
    )


def owned_by_stack(layout: BlockLayout, block: str) -> list[str]:
    """Modules of ``block`` its whole stack uses (see `Family.stack_owned`), present in this block."""
    if layout.family is None:
        return []
    return [f"{block}.{path}" for path, _ in layout.family.stack_owned if f"{block}.{path}" in layout.modules]
