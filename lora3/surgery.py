"""Model surgery: find the chosen Dense/EinsumDense layers, wrap them with LoRA
in their parents, freeze everything else, and report what changed.

Keras 3 locks a layer's tracker once it is built, so `setattr(parent, name,
wrapper)` raises. The swap below replaces the layer by object identity in the
parent's attributes, lists and dicts, and in the tracker's layer store, which
is what `setattr` would have done on an unbuilt layer. Wrappers are built under
the wrapped layer's parent path, so `wrapper.path == layer.path`.
"""

from __future__ import annotations

import re

import keras

from lora3.config import LoraConfig
from lora3.errors import LoraConfigError
from lora3.layers import LoRADense, LoRAEinsumDense, LoRALayer
from lora3.report import AdaptedLayer, LoraReport
from lora3 import targets as targets_lib

# `model._lora3` holds what the surgery did, for saving, reporting and undoing it.
STATE_ATTR = "_lora3"
TRAIN_ALSO_SHORTCUTS = {"layer_norm": r"norm", "bias": r"/bias$"}


def _natural_key(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _is_functional(layer):
    return any(cls.__name__ == "Functional" for cls in type(layer).__mro__)


def _children(layer):
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _parents_of(model):
    """Map `id(layer) -> (layer, [parents])` for every sublayer of `model`."""
    table = {}
    stack = [model]
    seen = {id(model)}
    while stack:
        parent = stack.pop()
        for child in _children(parent):
            entry = table.setdefault(id(child), (child, []))
            if all(p is not parent for p in entry[1]):
                entry[1].append(parent)
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return table


def backbone_of(model):
    return getattr(model, "backbone", None) or model


def lora_layers(model) -> list[LoRALayer]:
    """Every lora3 wrapper inside `model`, in path order."""
    found = [l for l in model._flatten_layers(include_self=True, recursive=True) if isinstance(l, LoRALayer)]
    return sorted(found, key=lambda l: _natural_key(l.path))


def find_targets(model, targets="qv", layers=None, _table=None) -> dict:
    """`{path: (layer, role)}` of the layers `targets` name, without changing the model."""
    table = _table if _table is not None else _parents_of(model)
    candidates = {}
    for layer, parents in table.values():
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            if any(isinstance(p, LoRALayer) for p in parents):
                continue  # already wrapped
            candidates.setdefault(layer.path, layer)
    paths = sorted(candidates, key=_natural_key)
    family = targets_lib.family_for(c.__name__ for c in type(backbone_of(model)).__mro__)
    chosen = targets_lib.select(paths, family, targets, layers)
    return {p: (candidates[p], role) for p, role in chosen.items()}


def _swap(parent, old, new):
    store = parent._tracker.config.get("layers", (None, None))[1] if hasattr(parent, "_tracker") else None
    replaced = False
    for name, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, name, new)
            replaced = True
        elif isinstance(value, list) and value is not store:
            for i, item in enumerate(value):
                if item is old:
                    list.__setitem__(value, i, new)
                    replaced = True
        elif isinstance(value, dict):
            for key, item in value.items():
                if item is old:
                    dict.__setitem__(value, key, new)
                    replaced = True
    if store is not None and parent._tracker.is_in_store("layers", old):
        parent._tracker.replace_tracked_value("layers", old, new)
        replaced = True
    return replaced


def _wrapper_for(layer, config: LoraConfig, initial_weights=None):
    cls = LoRADense if isinstance(layer, keras.layers.Dense) else LoRAEinsumDense
    return cls(
        layer,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        rslora=config.rslora,
        init=config.init,
        initial_weights=initial_weights,
    )


def _train_also_patterns(train_also):
    patterns = []
    for entry in train_also:
        try:
            patterns.append((entry, re.compile(TRAIN_ALSO_SHORTCUTS.get(entry, entry))))
        except re.error as exc:
            raise LoraConfigError(f"train_also entry {entry!r} is not a valid regex: {exc}") from None
    return patterns


def plan(model, config: LoraConfig, layer_paths=None) -> dict:
    """Check everything `apply_lora` would do and return
    `{path: (layer, role, parents, (in_features, out_features))}`.

    Raises before any change to the model, so a refused surgery leaves it intact.
    `layer_paths` (used when loading an adapter) names the exact layers instead
    of `config.targets`.
    """
    if lora_layers(model):
        raise LoraConfigError(
            "this model already has LoRA layers (surgery applied twice); "
            "use lora3.merge_and_unload(model) first, or load_adapter to replace the weights"
        )
    table = _parents_of(model)  # one walk of the model serves the search and the parent lookup
    if layer_paths is None:
        chosen = find_targets(model, config.targets, config.layers, _table=table)
    else:
        everything = find_targets(model, ".*", _table=table)
        missing = [p for p in layer_paths if p not in everything]
        if missing:
            raise LoraConfigError(
                f"layer path(s) {missing[:5]} do not exist in this model (or are not Dense/EinsumDense)"
            )
        chosen = {p: everything[p] for p in layer_paths}
    result = {}
    for path, (layer, role) in chosen.items():
        parents = table[id(layer)][1]
        graph_parents = [p for p in parents if _is_functional(p)]
        if graph_parents:
            raise LoraConfigError(
                f"layer {path!r} is a node of the functional model {graph_parents[0].name!r} "
                "(a task head or top-level layer): it is called by the graph, not through an "
                "attribute, so lora3 cannot wrap it. Choose layers inside the blocks"
            )
        if getattr(layer, "lora_enabled", False):
            raise LoraConfigError(f"layer {path!r} has Keras' own LoRA enabled; lora3 needs a model without it")
        wrapper_cls = LoRADense if isinstance(layer, keras.layers.Dense) else LoRAEinsumDense
        if wrapper_cls is LoRAEinsumDense:
            from lora3.layers.einsum import analyze_equation

            info = analyze_equation(layer.equation, layer.kernel.shape)
            fan_in, fan_out = info["in_features"], info["out_features"]
        else:
            fan_in, fan_out = (int(d) for d in layer.kernel.shape)
        if config.rank > min(fan_in, fan_out):
            raise LoraConfigError(
                f"rank={config.rank} is larger than layer {path!r} allows (in_features={fan_in}, "
                f"out_features={fan_out}: rank must be <= {min(fan_in, fan_out)})"
            )
        result[path] = (layer, role, parents, (fan_in, fan_out))
    patterns = _train_also_patterns(config.train_also)
    var_paths = [v.path for v in model.weights]
    for entry, pattern in patterns:
        if not any(pattern.search(p) for p in var_paths):
            raise LoraConfigError(
                f"train_also entry {entry!r} matches no weight of the model "
                f"(shortcuts: {', '.join(TRAIN_ALSO_SHORTCUTS)}; or a regex searched in variable paths "
                f"such as {var_paths[:3]})"
            )
    return result


def apply_lora(model, config: LoraConfig | None = None, *, layer_paths=None, **overrides) -> LoraReport:
    """Wrap the layers `config.targets` names with LoRA, in place, and freeze the rest.

    Args:
        model: a built keras-hub task (`T5Seq2SeqLM`, `GemmaCausalLM`, ...) or backbone,
            or any Keras model whose Dense/EinsumDense layers are called through
            attributes of their parent layers.
        config: a `LoraConfig`; keyword overrides are also accepted
            (`apply_lora(model, rank=4, targets="all_linear")`).

    Returns:
        A `LoraReport` (print it for a table). Compile the model again before
        `fit()` or `generate()`: compiled functions are reset here.

    Example:
    >>> import keras_hub, lora3
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> report = lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, targets="qv"))
    >>> len(report.rows), report.lora_params
    (6, 384)
    """
    if config is None:
        config = LoraConfig(**overrides)
    elif overrides:
        config = LoraConfig(**{**config.to_dict(), **overrides})
    return apply_plan(model, config, plan(model, config, layer_paths))


def apply_plan(model, config: LoraConfig, planned: dict, initial_weights=None) -> LoraReport:
    """Carry out a surgery `plan()` has checked.

    `initial_weights`, if given, is a callable `path -> (A, B)` whose arrays the new
    LoRA weights are created from (adapter loading), one layer at a time.
    """

    flags = {id(v): (v, v.trainable) for v in model.weights}
    wrapped_trainable = {}
    wrappers = []
    for path, (layer, role, parents, _) in planned.items():
        wrapped_trainable[path] = layer.trainable
        initial = initial_weights(path) if initial_weights is not None else None
        wrapper = _wrapper_for(layer, config, initial)
        del initial
        for parent in parents:
            if not _swap(parent, layer, wrapper):
                raise RuntimeError(f"internal error: could not replace {path!r} in {parent.name!r}")
        wrappers.append((wrapper, role))

    if not model.trainable:
        model.trainable = True
    patterns = _train_also_patterns(config.train_also)
    lora_ids = {id(w.lora_A) for w, _ in wrappers} | {id(w.lora_B) for w, _ in wrappers}
    for v in model.weights:
        v.trainable = id(v) in lora_ids or any(p.search(v.path) for _, p in patterns)

    def get_config_with_lora(self=model, _orig=type(model).get_config):
        config_dict = _orig(self)
        config_dict["lora3"] = lora_record(self)
        return config_dict

    object.__setattr__(model, STATE_ATTR, {
        "config": config,
        "roles": {w.path: role for w, role in wrappers},
        "trainable_flags": flags,
        "wrapped_trainable": wrapped_trainable,
    })
    # Record the surgery in the model's config, so `model.save("x.keras")`
    # carries it and `lora3.load_model` can replay it.
    object.__setattr__(model, "get_config", get_config_with_lora)
    _reset_compiled_functions(model)
    return make_report(model)


def lora_record(model) -> dict:
    state = getattr(model, STATE_ATTR)
    return {
        "config": state["config"].to_dict(),
        "layer_paths": [w.path for w in lora_layers(model)],
    }


def _reset_compiled_functions(model):
    for name in ("train_function", "test_function", "predict_function", "generate_function"):
        if hasattr(model, name):
            object.__setattr__(model, name, None)


def _count(variables):
    seen, total = set(), 0
    for v in variables:
        if id(v) in seen or not _is_float(v):
            continue
        seen.add(id(v))
        total += int(_prod(v.shape))
    return total


def _is_float(v):
    return "float" in str(v.dtype)


def _prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


def make_report(model) -> LoraReport:
    state = getattr(model, STATE_ATTR, None)
    wrappers = lora_layers(model)
    roles = state["roles"] if state else {}
    rows = tuple(
        AdaptedLayer(
            path=w.path,
            role=roles.get(w.path),
            kind=type(w.wrapped).__name__,
            in_features=w.in_features,
            out_features=w.out_features,
            lora_params=w.lora_params,
        )
        for w in wrappers
    )
    total = _count(model.weights)
    lora = sum(r.lora_params for r in rows)
    config = state["config"] if state else None
    return LoraReport(
        rows=rows,
        trainable_params=_count(model.trainable_weights),
        total_params=total,
        base_params=total - lora,
        rank=config.rank if config else 0,
        alpha=config.alpha if config else 0.0,
        scaling=config.scaling if config else 0.0,
    )
