"""Which layers a target names: role maps per model family, groups, regexes.

Pure Python on layer paths (no keras import), so the CLI can validate targets
before a backend is chosen.

Role names read the same on every family and follow Hugging Face's names:

| role   | T5 (keras-hub)                              | HF T5      | Gemma (keras-hub)      |
|--------|---------------------------------------------|------------|------------------------|
| q k v  | `*_attention/{query,key,value}_projector`   | q k v      | `attention/{query,key,value}` |
| o      | `*_attention/output_projector`              | o          | `attention/attention_output`  |
| gate   | FFN `input_projector` (carries activation)  | wi_0 (wi)  | `ffw_gating`           |
| up     | FFN `gate_projector` (linear branch)        | wi_1       | `ffw_gating_2`         |
| down   | FFN `output_projector`                      | wo         | `ffw_linear`           |

T5's attention roles cover self- and cross-attention, as PEFT's `["q", "v"]` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence

from lora3.errors import LoraConfigError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {
    "qv": ("q", "v"),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all_linear": ("q", "k", "v", "o", "gate", "up", "down"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family names its blocks and projections."""

    name: str
    backbones: tuple  # backbone class names (matched along the MRO)
    pattern: re.Pattern  # groups: stack (optional), block, attn (optional), leaf
    attention_leaves: dict
    ffn_leaves: dict

    def parse(self, path: str) -> Optional["LayerSite"]:
        m = self.pattern.fullmatch(path)
        if not m:
            return None
        groups = m.groupdict()
        leaves = self.attention_leaves if groups.get("attn") else self.ffn_leaves
        role = leaves.get(groups["leaf"])
        if role is None:
            return None
        return LayerSite(path, role, groups.get("stack"), int(groups["block"]), groups.get("attn"))


@dataclasses.dataclass(frozen=True)
class LayerSite:
    path: str
    role: str
    stack: Optional[str]  # "encoder" / "decoder" for T5, None for decoder-only
    block: int
    attention: Optional[str]  # "self_attention", "cross_attention", "attention" or None (FFN)


FAMILIES = {
    "t5": Family(
        "t5",
        ("T5Backbone",),
        re.compile(
            r"(?:.*/)?transformer_(?P<stack>encoder|decoder)_layer_(?P<block>\d+)/"
            r"(?:(?P<attn>self_attention|cross_attention)/)?(?P<leaf>\w+)"
        ),
        {"query_projector": "q", "key_projector": "k", "value_projector": "v", "output_projector": "o"},
        {"input_projector": "gate", "gate_projector": "up", "output_projector": "down"},
    ),
    "gemma": Family(
        "gemma",
        ("GemmaBackbone", "Gemma3Backbone"),
        re.compile(r"(?:.*/)?decoder_block_(?P<block>\d+)/(?:(?P<attn>attention)/)?(?P<leaf>\w+)"),
        {"query": "q", "key": "k", "value": "v", "attention_output": "o"},
        {"ffw_gating": "gate", "ffw_gating_2": "up", "ffw_linear": "down"},
    ),
}


def family_for(class_names: Iterable[str]) -> Optional[Family]:
    """The family whose backbone class appears among `class_names` (an MRO)."""
    names = set(class_names)
    for family in FAMILIES.values():
        if names & set(family.backbones):
            return family
    return None


def expand(targets: str | Sequence[str]) -> list[tuple[str, object]]:
    """Each target entry as `(entry, roles)` or `(entry, compiled_regex)`."""
    entries = [targets] if isinstance(targets, str) else list(targets)
    out = []
    for entry in entries:
        if entry in GROUPS:
            out.append((entry, GROUPS[entry]))
        elif entry in ROLES:
            out.append((entry, (entry,)))
        else:
            try:
                out.append((entry, re.compile(entry)))
            except re.error as exc:
                raise LoraConfigError(
                    f"target {entry!r} is neither a role ({', '.join(ROLES)}), a group "
                    f"({', '.join(GROUPS)}) nor a valid regex: {exc}"
                ) from None
    return out


def _layer_filter(layers) -> Optional[callable]:
    if layers is None:
        return None
    wanted = []
    for item in layers:
        if isinstance(item, int):
            wanted.append((None, item))
            continue
        m = re.fullmatch(r"(encoder|decoder)(?:\.(\d+))?", str(item))
        if not m:
            raise LoraConfigError(
                f"layers entry {item!r} is not valid; use block indices (0, 1, ...), "
                "'encoder', 'decoder', or 'encoder.N' / 'decoder.N'"
            )
        wanted.append((m.group(1), None if m.group(2) is None else int(m.group(2))))

    def keep(site: LayerSite) -> bool:
        for stack, block in wanted:
            if stack is not None and site.stack != stack:
                continue
            if block is not None and site.block != block:
                continue
            return True
        return False

    return keep


def select(
    paths: Sequence[str], family: Optional[Family], targets, layers=None
) -> dict[str, Optional[str]]:
    """Choose the layer paths `targets` (and `layers`) name, as `{path: role or None}`.

    Raises `LoraConfigError` naming the first entry that matches nothing, with
    the adaptable paths and role names, so the user can fix the target.
    """
    sites = {p: family.parse(p) if family else None for p in paths}
    keep = _layer_filter(layers)
    if keep is not None and family is None:
        raise LoraConfigError(
            "layers= needs a known model family (T5 or Gemma) to read block indices; "
            "use a regex target that names the blocks instead"
        )
    chosen: dict[str, Optional[str]] = {}
    for entry, what in expand(targets):
        if isinstance(what, tuple):
            if family is None:
                raise LoraConfigError(
                    f"target {entry!r} is a role name, but this model has no role map "
                    f"(known families: {', '.join(FAMILIES)}); use a regex over layer paths, "
                    f"e.g. one of: {_sample(paths)}"
                )
            matched = [p for p, s in sites.items() if s is not None and s.role in what]
        else:
            matched = [p for p in paths if what.fullmatch(p)]
        if keep is not None:
            matched = [p for p in matched if sites[p] is not None and keep(sites[p])]
        if not matched:
            restriction = f" within layers={list(layers)}" if layers is not None else ""
            raise LoraConfigError(
                f"target {entry!r} matches no adaptable layer{restriction}. "
                f"Role names: {', '.join(ROLES)}; groups: {', '.join(GROUPS)}; or a regex "
                f"(re.fullmatch on layer.path). Adaptable layers of this model: {_sample(paths)}"
            )
        for p in matched:
            chosen[p] = sites[p].role if sites[p] is not None else None
    # Keep the model's own order.
    return {p: chosen[p] for p in paths if p in chosen}


def _sample(paths: Sequence[str], limit: int = 24) -> str:
    shown = ", ".join(paths[:limit])
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return f"[{shown}{more}]" if paths else "[] (the model has no Dense/EinsumDense layer)"
