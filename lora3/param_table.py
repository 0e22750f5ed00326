"""LoRA parameter counts for a keras-hub architecture, without downloading weights.

The backbone is built from its config (random init) and each (targets, rank)
surgery is counted on it. `scripts/param_table.py` is the command-line face.
"""

from __future__ import annotations

import lora3  # lazy: importing it does not import keras (see lora3/__init__.py)

# Architecture configs of well-known presets (keras-hub names), so the table
# needs no download. FLAN-T5-base: the tutorial's model.
ARCHITECTURES = {
    "flan_base_multi": ("T5Backbone", dict(
        vocabulary_size=32128, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=2048,
        key_value_dim=64, activation="gelu", use_gated_activation=True, tie_embedding_weights=False)),
    "flan_small_multi": ("T5Backbone", dict(
        vocabulary_size=32128, num_layers=8, num_heads=6, hidden_dim=512, intermediate_dim=1024,
        key_value_dim=64, activation="gelu", use_gated_activation=True, tie_embedding_weights=False)),
    "t5_small_multi": ("T5Backbone", dict(
        vocabulary_size=32128, num_layers=6, num_heads=8, hidden_dim=512, intermediate_dim=2048,
        key_value_dim=64, activation="relu", use_gated_activation=False, tie_embedding_weights=True)),
    "gemma_2b_en": ("GemmaBackbone", dict(
        vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
        intermediate_dim=32768, head_dim=256)),
}


def build_backbone(name_or_class, config=None):
    """A randomly initialised keras-hub backbone, without downloading anything.

    Args:
        name_or_class: str. A key of `ARCHITECTURES` (then `config` is
            `None`), or a `keras_hub.models` backbone class name.
        config: dict or None. The backbone's constructor arguments.

    Returns:
        The backbone.

    Raises:
        ValueError: an unknown architecture name (listing the known ones).

    Example:
    >>> backbone = build_backbone("T5Backbone", dict(vocabulary_size=64, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8))
    >>> type(backbone).__name__
    'T5Backbone'
    """
    # keras-hub only here, where a model family is named: the rest of lora3 needs keras alone.
    import keras_hub

    if config is None:
        if name_or_class not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name_or_class!r}; known: {', '.join(ARCHITECTURES)}")
        name_or_class, config = ARCHITECTURES[name_or_class]
    cls = getattr(keras_hub.models, name_or_class)
    return cls(**config)


def param_table(backbone_factory, ranks=(4, 8, 16), target_groups=("qv", "attention", "all_linear")):
    """LoRA parameter counts for each (targets, rank) pair on one architecture.

    Args:
        backbone_factory: callable returning a fresh backbone (built once;
            each surgery is merged away again before the next).
        ranks: tuple of int. The ranks to count.
        target_groups: tuple of str. The `targets` to count.

    Returns:
        A list of dicts with `targets`, `rank`, `layers` (adapted layers),
        `lora_params`, `base_params`, `total_params` and `percent_of_base`.

    Example:
    >>> rows = param_table(lambda: build_backbone("T5Backbone", dict(vocabulary_size=64,
    ...     num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)),
    ...     ranks=(2,), target_groups=("qv",))
    >>> rows[0]["layers"], rows[0]["lora_params"]
    (6, 384)
    """
    rows = []
    backbone = backbone_factory()
    base = backbone.count_params()
    for targets in target_groups:
        for rank in ranks:
            report = lora3.apply_lora(backbone, lora3.LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
            rows.append({
                "targets": targets,
                "rank": rank,
                "layers": len(report.rows),
                "lora_params": report.lora_params,
                "base_params": base,
                "total_params": base + report.lora_params,
                "percent_of_base": 100.0 * report.lora_params / base,
            })
            lora3.merge_and_unload(backbone)  # B is zero: merging leaves the base unchanged
    return rows


def format_markdown(rows, title=None) -> str:
    """`param_table` rows as a Markdown table (under a `### title` heading if given).

    Args:
        rows: list of dict. `param_table`'s result.
        title: str or None. A heading above the table.

    Returns:
        The Markdown text, a str.

    Example:
    >>> print(format_markdown([{"targets": "qv", "rank": 8, "layers": 72, "lora_params": 884736,
    ...                         "percent_of_base": 0.357, "base_params": 247577856}]))
    | targets | rank | adapted layers | LoRA params | % of base | base params |
    |---|---:|---:|---:|---:|---:|
    | `qv` | 8 | 72 | 884,736 | 0.357% | 247,577,856 |
    """
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| targets | rank | adapted layers | LoRA params | % of base | base params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['targets']}` | {r['rank']} | {r['layers']} | {r['lora_params']:,} | "
            f"{r['percent_of_base']:.3f}% | {r['base_params']:,} |"
        )
    return "\n".join(lines)
