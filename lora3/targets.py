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
from typing import Callable, Iterable, Optional, Sequence

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
    """How one model family names its blocks and projections.

    Args:
        name: str. The family's name (`"t5"`, `"gemma"`).
        backbones: tuple of str. Backbone class names that belong to the
            family (matched along the model's MRO by `family_for`).
        pattern: compiled regex, `fullmatch`ed against a layer path, with
            the named groups `block` and `leaf`, and optionally `stack`
            (`encoder`/`decoder`) and `attn` (set for attention layers).
        attention_leaves: dict. Leaf layer name -> role, inside attention.
        ffn_leaves: dict. Leaf layer name -> role, in the feed-forward part.

    Example:
    >>> FAMILIES["gemma"].parse("decoder_block_3/attention/query")
    LayerSite(path='decoder_block_3/attention/query', role='q', stack=None, block=3, attention='attention')
    """

    name: str
    backbones: tuple  # backbone class names (matched along the MRO)
    pattern: re.Pattern  # groups: stack (optional), block, attn (optional), leaf
    attention_leaves: dict
    ffn_leaves: dict

    def parse(self, path: str) -> Optional["LayerSite"]:
        """The `LayerSite` of a layer path, or `None` when the path is no projection with a role.

        Args:
            path: str. A layer path (`layer.path`).

        Example:
        >>> FAMILIES["t5"].parse("transformer_encoder_layer_0/self_attention/value_projector").role
        'v'
        >>> FAMILIES["t5"].parse("token_embedding") is None
        True
        """
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
    """Where a projection sits in its model: its role, stack and block.

    Args:
        path: str. The layer path.
        role: str. One of `ROLES`.
        stack: str or None. `"encoder"` / `"decoder"` for T5, `None` for
            decoder-only models.
        block: int. The block index within its stack.
        attention: str or None. `"self_attention"`, `"cross_attention"`,
            `"attention"`, or `None` for a feed-forward layer.

    Example:
    >>> site = FAMILIES["t5"].parse("transformer_decoder_layer_1/cross_attention/query_projector")
    >>> site.role, site.stack, site.block, site.attention
    ('q', 'decoder', 1, 'cross_attention')
    """

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
    """The family whose backbone class appears among `class_names` (an MRO).

    Args:
        class_names: iterable of str. Class names, e.g. those of
            `type(backbone).__mro__`.

    Returns:
        A `Family`, or `None` when no family's backbone is named.

    Example:
    >>> family_for(["Gemma3Backbone", "Backbone", "Model"]).name
    'gemma'
    >>> family_for(["Sequential"]) is None
    True
    """
    names = set(class_names)
    for family in FAMILIES.values():
        if names & set(family.backbones):
            return family
    return None


def expand(targets: str | Sequence[str]) -> list[tuple[str, object]]:
    """Each target entry as `(entry, roles)` or `(entry, compiled_regex)`.

    A group expands to its roles, a role to itself; anything else is a regex.

    Args:
        targets: str or list of str. Roles, groups or regexes.

    Returns:
        A list of `(entry, tuple_of_roles)` or `(entry, re.Pattern)`.

    Raises:
        LoraConfigError: an entry is no role, no group and no valid regex.

    Example:
    >>> expand(["qv", "down"])
    [('qv', ('q', 'v')), ('down', ('down',))]
    >>> expand(r"block/inner")[0][1].pattern
    'block/inner'
    """
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


def _layer_filter(layers) -> Optional[Callable[["LayerSite"], bool]]:
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
    paths: Sequence[str], family: Optional[Family], targets, layers=None, exclude=()
) -> dict[str, Optional[str]]:
    """Chooses the layer paths `targets` (and `layers`) name.

    Args:
        paths: list of str. The adaptable layer paths, in model order.
        family: the model's `Family`, or `None` (then only regexes work).
        targets: str or list of str. Roles, groups or regexes (`re.fullmatch`
            on the path).
        layers: `None` or a list of block indices, `"encoder"`/`"decoder"`
            or `"encoder.N"`/`"decoder.N"` (needs a family).
        exclude: str or list of str. Roles, groups or regexes (same syntax
            as `targets`) whose layers are taken out of the selection.

    Returns:
        `{path: role or None}` in the order of `paths`.

    Raises:
        LoraConfigError: naming the first entry that matches nothing, with
            the role names, groups and the adaptable paths, so the target
            can be fixed; or a role name / `layers=` without a family; or an
            `exclude` entry that matches no adaptable layer, or an
            `exclude` that leaves no layer.

    Example:
    >>> paths = ["decoder_block_0/attention/query", "decoder_block_0/attention/key",
    ...          "decoder_block_0/ffw_linear", "decoder_block_1/attention/query"]
    >>> select(paths, FAMILIES["gemma"], ["q", "down"], layers=[0])
    {'decoder_block_0/attention/query': 'q', 'decoder_block_0/ffw_linear': 'down'}
    >>> list(select(paths, FAMILIES["gemma"], "all_linear", exclude=["down", ".*_1/.*"]))
    ['decoder_block_0/attention/query', 'decoder_block_0/attention/key']
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
        matched = _matching(entry, what, paths, sites, family)
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
    excluded = set()
    for entry, what in expand(exclude or ()):
        matched = _matching(entry, what, paths, sites, family, "exclude entry")
        if not matched:
            raise LoraConfigError(
                f"exclude entry {entry!r} matches no adaptable layer. Role names: {', '.join(ROLES)}; "
                f"groups: {', '.join(GROUPS)}; or a regex (re.fullmatch on layer.path). "
                f"Adaptable layers of this model: {_sample(paths)}"
            )
        excluded.update(matched)
    if chosen and not set(chosen) - excluded:
        raise LoraConfigError(
            f"exclude={list(exclude) if not isinstance(exclude, str) else exclude!r} takes out every layer "
            f"targets={targets!r} selects ({_sample(list(chosen))}): nothing is left to adapt"
        )
    # Keep the model's own order.
    return {p: chosen[p] for p in paths if p in chosen and p not in excluded}


def _matching(entry, what, paths, sites, family, kind="target"):
    """The paths one expanded entry (roles or a regex) names."""
    if isinstance(what, tuple):
        if family is None:
            raise LoraConfigError(
                f"{kind} {entry!r} is a role name, but this model has no role map "
                f"(known families: {', '.join(FAMILIES)}); use a regex over layer paths, "
                f"e.g. one of: {_sample(paths)}"
            )
        return [p for p, s in sites.items() if s is not None and s.role in what]
    return [p for p in paths if what.fullmatch(p)]


def _sample(paths: Sequence[str], limit: int = 24) -> str:
    shown = ", ".join(paths[:limit])
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return f"[{shown}{more}]" if paths else "[] (the model has no Dense/EinsumDense layer)"
