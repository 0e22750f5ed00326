"""Model surgery: find the chosen Dense/EinsumDense layers, wrap them with LoRA
in their parents, freeze everything else, and report what changed.

Keras 3 locks a layer's tracker once it is built, so `setattr(parent, name,
wrapper)` raises. The swap below replaces the layer by object identity in the
parent's attributes, lists and dicts, and in the tracker's layer store, which
is what `setattr` would have done on an unbuilt layer. Wrappers are built under
the wrapped layer's parent path, so `wrapper.path == layer.path`.

What a surgery did is kept on the model as `model._lora3` (a `LoraState`): per
adapter its config and each adapted layer's role, which adapter is active, and
the trainable flags to restore on `unload`. Keras' `model.save("x.keras")`
writes it into the archive (see `LoraState`), so `lora3.load_model` can replay
the surgery.

A model may hold several named adapters (`apply_lora(..., adapter_name=...)`):
a second surgery adds its adapter to the wrappers already in place and wraps
the layers only it targets. Switching, disabling, deleting and combining
adapters is in `lora3.adapter_set`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import NamedTuple

import keras

from lora3 import targets as targets_lib
from lora3.config import DEFAULT_ADAPTER, LoraConfig, base_rewriting, check_adapter_name, pattern_key
from lora3.errors import LoraConfigError
from lora3.fileio import atomic_write_text
from lora3.layers import LoRADense, LoRAEinsumDense, LoRALayer
from lora3.layers.lora_layer import _check_float_kernel
from lora3.layers.quantized import differentiable_head
from lora3.report import AdaptedLayer, LoraReport, count_params

log = logging.getLogger(__name__)

# The attribute of the model that holds its `LoraState`, and the file that state becomes in a
# `.keras` archive (`assets/<attribute path>/_lora3/lora3.json`).
STATE_ATTR = "_lora3"
STATE_FILE = "lora3.json"
TRAIN_ALSO_SHORTCUTS = {"layer_norm": r"norm", "bias": r"/bias$"}
# The wrapper class for each keras layer class lora3 adapts (looked up along the layer's MRO,
# so subclasses of Dense/EinsumDense are adapted too).
WRAPPERS = {keras.layers.Dense: LoRADense, keras.layers.EinsumDense: LoRAEinsumDense}


class PlannedLayer(NamedTuple):
    """One layer a checked surgery will wrap (an entry of `plan()`'s result).

    Args:
        layer: the keras layer to wrap.
        role: str or None. Its role (`q`, `down`, ...).
        parents: list of the layers that hold it (it is replaced in each).
        in_features: int. Rows of its kernel's matrix view.
        out_features: int. Columns of its kernel's matrix view.

    Example:
    >>> import keras_hub
    >>> from lora3.config import LoraConfig
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> entry = plan(backbone, LoraConfig(rank=2, targets="down"))["transformer_encoder_layer_0/output_projector"]
    >>> entry.role, entry.in_features, entry.out_features
    ('down', 32, 16)
    """

    layer: keras.layers.Layer
    role: str | None
    parents: list
    in_features: int
    out_features: int


class AdapterRecord(NamedTuple):
    """One adapter of a model, as its `LoraState` records it.

    Args:
        config: the `LoraConfig` the adapter was made with.
        roles: dict. Adapted layer path -> role (or `None`), in model order.

    Example:
    >>> AdapterRecord(LoraConfig(rank=2), {"block/query": "q"}).config.rank
    2
    """

    config: LoraConfig
    roles: dict


class _Unsaved:
    """What a `LoraState` keeps that keras' saving must not see: saving walks the state's
    attributes and writes every optimizer and layer it meets (inside lists and dicts too) into
    the `.keras` file, where a freshly replayed state would not have them."""

    def __init__(self):
        self.optimizers = {}  # adapter name -> its built optimizer, while another adapter is active
        self.current_optimizer = None  # the one lora3 last gave the model (another: it was recompiled)
        self.released = []  # (path, layer) given back by `delete_adapter` while other adapters stay


class LoraState(keras.layers.Layer):
    """What `apply_lora` did to a model, kept on it as `model._lora3`.

    Not a layer of the network: it is never called, holds no weights and is
    not tracked by the model (it is set with `object.__setattr__`, so it is
    in no layer or weight list). It is a `keras.layers.Layer` so that keras'
    `model.save()` finds it: saving visits every saveable object among
    `dir(model)` and calls its `save_assets`, which writes the surgery (the
    config and the adapted layer paths) as `lora3.json` into the archive.
    `lora3.load_model` reads it back and replays the surgery.

    `adapters` maps each adapter's name to its `AdapterRecord`, in the order
    they were added; `active` names the one that runs. `lora_config` and
    `roles` are the active adapter's.

    Args:
        lora_config: the `LoraConfig` of the first surgery.
        roles: dict. Adapted layer path -> role (or `None`), in model order.
        trainable_flags: dict. `id(variable)` -> its `trainable` flag before
            the surgery, for every weight of the model.
        wrapped_trainable: dict. Adapted layer path -> the wrapped layer's
            `trainable` flag before the surgery.
        adapter_name: str. The name of the first surgery's adapter.

    Example:
    >>> state = LoraState(LoraConfig(rank=2), {"block/query": "q"}, {}, {})
    >>> state.record()
    {'config': {'rank': 2, 'alpha': 16.0, 'targets': 'qv', 'dropout': 0.0, 'rslora': False, 'init': 'kaiming', 'layers': None, 'train_also': []}, 'layer_paths': ['block/query']}
    >>> state.add_adapter("b", LoraConfig(rank=1), {"block/value": "v"})
    >>> [a["name"] for a in state.record()["adapters"]], state.record()["active_adapter"]
    (['default', 'b'], 'default')
    """

    def __init__(self, lora_config, roles, trainable_flags, wrapped_trainable, adapter_name=DEFAULT_ADAPTER,
                 **kwargs):
        super().__init__(**kwargs)
        # Plain attributes (not keras-tracked containers): the records hold no keras objects.
        object.__setattr__(self, "adapters", {adapter_name: AdapterRecord(lora_config, dict(roles))})
        object.__setattr__(self, "unsaved", _Unsaved())
        self.active = adapter_name
        self.disabled = False
        self.trainable_flags = dict(trainable_flags)
        self.wrapped_trainable = dict(wrapped_trainable)

    @property
    def lora_config(self):
        """The active adapter's `LoraConfig`."""
        return self.adapters[self.active].config

    @property
    def roles(self):
        """The active adapter's layers: path -> role (or `None`)."""
        return self.adapters[self.active].roles

    def add_adapter(self, name, config, roles):
        """Records one more adapter (not made active).

        Args:
            name: str. Its name.
            config: its `LoraConfig`.
            roles: dict. Its layers: path -> role.

        Example: see the class.
        """
        self.adapters[name] = AdapterRecord(config, dict(roles))

    def record(self) -> dict:
        """The surgery as JSON-ready data (see the class's example).

        `{"config": ..., "layer_paths": [...]}` of the active adapter; when
        the adapters are more than the one `"default"`, also
        `"active_adapter"` and `"adapters"`: `[{"name", "config",
        "layer_paths"}, ...]` in the order they were added.
        """
        record = {"config": self.lora_config.to_dict(), "layer_paths": list(self.roles)}
        if list(self.adapters) != [DEFAULT_ADAPTER]:
            record["active_adapter"] = self.active
            record["adapters"] = [{"name": name, "config": r.config.to_dict(), "layer_paths": list(r.roles)}
                                  for name, r in self.adapters.items()]
        return record

    def save_assets(self, dir_path):
        """Called by keras' `model.save()`: writes `record()` to `<dir_path>/lora3.json`.

        Args:
            dir_path: str. This object's folder in the archive's `assets/`.
        """
        atomic_write_text(os.path.join(dir_path, STATE_FILE), json.dumps(self.record(), indent=2) + "\n")

    def get_config(self):
        return {**super().get_config(), **self.record()}


def wrapper_class(layer):
    """The LoRA wrapper class for `layer`, or `None` if lora3 does not adapt its kind.

    Args:
        layer: a keras layer.

    Returns:
        `WRAPPERS[cls]` for the first class `cls` of `type(layer).__mro__`
        that `WRAPPERS` names, else `None`.

    Example:
    >>> import keras
    >>> wrapper_class(keras.layers.Dense(3)).__name__
    'LoRADense'
    >>> wrapper_class(keras.layers.Embedding(10, 3)) is None
    True
    """
    for cls in type(layer).__mro__:
        if cls in WRAPPERS:
            return WRAPPERS[cls]
    return None


def backbone_of(model):
    """`model.backbone` for a keras-hub task, the model itself otherwise.

    Args:
        model: a keras-hub task or backbone, or any keras model.

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> backbone_of(model) is model
    True
    """
    return getattr(model, "backbone", None) or model


def lora_state(model) -> LoraState | None:
    """The `LoraState` `apply_lora` left on `model`, or `None` when it has none.

    Args:
        model: any keras model.

    Example:
    >>> import keras
    >>> lora_state(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])) is None
    True
    """
    return getattr(model, STATE_ATTR, None)


def lora_layers(model) -> list[LoRALayer]:
    """Every lora3 wrapper inside `model`, in path order.

    Args:
        model: any keras layer or model.

    Returns:
        A list of `lora3.layers.LoRALayer`, sorted by path (block numbers in
        numeric order).

    Example:
    >>> import keras
    >>> lora_layers(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    []
    """
    found = [l for l in model._flatten_layers(include_self=True, recursive=True) if isinstance(l, LoRALayer)]
    return sorted(found, key=lambda l: _natural_key(l.path))


def find_targets(model, targets="qv", layers=None) -> dict:
    """The layers `targets` names, without changing the model.

    Args:
        model: a keras-hub task or backbone, or any keras model.
        targets: str or list of str. Roles, groups or regexes (see `LoraConfig`).
        layers: `None` or block indices / `"encoder"` / `"decoder.N"` (see `LoraConfig`).

    Returns:
        `{path: (layer, role)}` in model order; `role` is `None` for a layer
        chosen by a regex on a model without a role map.

    Raises:
        LoraConfigError: a target matches nothing (the message lists the
            role names and the model's adaptable layers).

    Example:
    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    >>> list(find_targets(model, targets="out"))
    ['out']
    """
    return _find(model, _parents_of(model), targets, layers)


def plan(model, config: LoraConfig, layer_paths=None, adapter_name=DEFAULT_ADAPTER) -> dict:
    """Checks everything `apply_lora` would do, without changing the model.

    On a model that already has LoRA, the plan adds the adapter
    `adapter_name`: targets are found among the wrapped layers too (an
    entry whose `parents` hold a `LoRALayer` gets the adapter added to that
    wrapper).

    Args:
        model: the model to adapt.
        config: the `LoraConfig`.
        layer_paths: list of str or None. The exact layers to adapt (adapter
            loading) instead of those `config.targets` names.
        adapter_name: str. The name of the adapter the surgery will add.

    Returns:
        `{path: PlannedLayer}`, for `apply_plan`.

    Raises:
        LoraConfigError: the model already has an adapter of that name (or
            LoRA layers lora3 has no record of), the name is invalid, a
            second adapter asks for `train_also` (those weights are not
            copied per adapter), a target or `exclude` entry matches
            nothing, a `rank_pattern` / `alpha_pattern` key matches no
            adapted layer (the message lists some), a layer cannot be
            wrapped (a node of a functional graph, quantized, too small for
            the rank, ...) or a `train_also` entry matches no weight.
            Nothing has changed then.

    Example:
    >>> import keras
    >>> from lora3.config import LoraConfig
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    >>> plan(model, LoraConfig(rank=1, targets="out"))
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: layer 'out' is a node of the functional model ...
    """
    check_adapter_name(adapter_name)
    existing = bool(lora_layers(model))
    if existing:
        state = lora_state(model)
        if state is None or adapter_name in state.adapters:
            what = f"an adapter named {adapter_name!r}" if state is not None else "LoRA layers"
            raise LoraConfigError(
                f"this model already has {what} (surgery applied twice); pass another adapter_name to add "
                "an adapter, use lora3.merge_and_unload(model) first, or load_adapter to replace the weights"
            )
        if config.train_also:
            raise LoraConfigError(
                f"adapter {adapter_name!r}: train_also={list(config.train_also)} is only available to a model's "
                "first adapter (lora3 keeps one copy of those weights, which every adapter would share)"
            )
        # PiSSA/OLoRA rewrite the kernels every adapter of a layer shares: one adapter per model.
        rewriting = [n for n, a in state.adapters.items() if base_rewriting(a.config.init)]
        if base_rewriting(config.init) or rewriting:
            raise LoraConfigError(
                f"adapter {adapter_name!r}: "
                + (f"init={config.init!r} rewrites the base kernels that the model's adapter(s) "
                   f"{', '.join(state.adapters)} share" if base_rewriting(config.init) else
                   f"the model's adapter {rewriting[0]!r} (init={state.adapters[rewriting[0]].config.init!r}) "
                   "left residuals in the base kernels, which another adapter would share")
                + "; lora3 supports pissa/olora for a model's only adapter (merge it first: lora3.merge_and_unload)"
            )
    table = _parents_of(model)  # one walk of the model serves the search and the parent lookup
    if layer_paths is None:
        chosen = _find(model, table, config.targets, config.layers, include_wrapped=existing, exclude=config.exclude)
    else:
        everything = _find(model, table, ".*", None, include_wrapped=existing)
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
        in_features, out_features = wrapper_class(layer).check_layer(layer, config.rank_for(path))
        if base_rewriting(config.init):
            _check_float_kernel(layer, config.init)
        result[path] = PlannedLayer(layer, role, parents, in_features, out_features)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not any(pattern_key([key], path) for path in result):
                raise LoraConfigError(
                    f"{field} key {key!r} matches no adapted layer (a key matches a layer when "
                    f"re.match(r'(.*/)?(KEY)$', layer.path) does); adapted layers: "
                    f"{targets_lib._sample(list(result), 8)}"
                )
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


def apply_lora(model, config: LoraConfig | None = None, *, layer_paths=None, adapter_name=DEFAULT_ADAPTER,
               **overrides) -> LoraReport:
    """Wraps the layers `config.targets` names with LoRA, in place, and freezes the rest.

    Everything is checked first (`plan`): a refused surgery leaves the model
    as it was. On a model that already has LoRA, a new `adapter_name` adds
    that adapter beside the others, as PEFT's `add_adapter`: it joins the
    wrappers already in place, wraps the layers only it targets, and is
    neither active nor trainable until `lora3.set_adapter(model, name)`.

    Args:
        model: a built keras-hub task (`T5Seq2SeqLM`, `GemmaCausalLM`, ...)
            or backbone, or any Keras model whose Dense/EinsumDense layers
            are called through attributes of their parent layers.
        config: a `LoraConfig`; keyword overrides are also accepted
            (`apply_lora(model, rank=4, targets="all_linear")`).
        layer_paths: list of str or None. Adapt exactly these layers instead
            of those `config.targets` names.
        adapter_name: str. The adapter's name (variables of an adapter other
            than `"default"` are `<layer.path>/lora_A_<name>`, `.../lora_B_<name>`).
        **overrides: `LoraConfig` fields, applied over `config`.

    Returns:
        A `LoraReport` of the new adapter (print it for a table). Compiled
        functions are reset here, so the next `fit()`/`predict()`/`generate()`
        traces the new layers.

    Raises:
        LoraConfigError: see `plan`.

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
    return apply_plan(model, config, plan(model, config, layer_paths, adapter_name), adapter_name=adapter_name)


def apply_plan(model, config: LoraConfig, planned: dict, initial_weights=None,
               adapter_name=DEFAULT_ADAPTER) -> LoraReport:
    """Carries out a surgery `plan()` has checked.

    Args:
        model: the model `plan` was made for.
        config: the `LoraConfig` `plan` was made with.
        planned: `plan()`'s result.
        initial_weights: a callable `path -> (A, B)` or None. If given, each
            new layer's LoRA weights are created from its arrays (`A`
            `(rank, in_features)`, `B` `(rank, out_features)`; adapter
            loading), one layer at a time, instead of drawn.
        adapter_name: str. The adapter's name (the one `plan` was made for).
            The model's first adapter becomes active; a later one is added
            frozen and inactive (see `apply_lora`).

    Returns:
        A `LoraReport` of the new adapter.

    Raises:
        LoraConfigError: the model already has an adapter of that name.

    Example:
    >>> import keras_hub
    >>> from lora3.config import LoraConfig
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> config = LoraConfig(rank=2, targets="mlp")
    >>> len(apply_plan(backbone, config, plan(backbone, config)).rows)
    6
    """
    check_adapter_name(adapter_name)
    _differentiable_heads(model)
    state = lora_state(model)
    if state is not None:
        return _add_adapter(model, state, config, planned, initial_weights, adapter_name)
    flags = {id(v): v.trainable for v in model.weights}
    wrapped_trainable, roles, lora_ids = {}, {}, set()
    for path, entry in planned.items():
        wrapped_trainable[path] = entry.layer.trainable
        initial = initial_weights(path) if initial_weights else None
        wrapper = _make_wrapper(entry.layer, config, initial, adapter_name)
        for parent in entry.parents:
            if not _swap(parent, entry.layer, wrapper):
                raise RuntimeError(f"internal error: could not replace {path!r} in {parent.name!r}")
        roles[wrapper.path] = entry.role
        lora_ids |= {id(v) for v in wrapper.get_adapter(adapter_name).variables()}

    if not model.trainable:
        model.trainable = True
    patterns = _train_also_patterns(config.train_also)
    for v in model.weights:
        v.trainable = id(v) in lora_ids or any(p.search(v.path) for _, p in patterns)
    object.__setattr__(model, STATE_ATTR, LoraState(config, roles, flags, wrapped_trainable, adapter_name))
    reset_compiled_functions(model)
    return make_report(model, adapter_name)


def _differentiable_heads(model):
    """A quantized tied output head of `model` made weight-only, so that training through it gets the
    true gradient (Keras' quantized reverse projection has none for its inputs: `differentiable_head`)."""
    for layer in model._flatten_layers(include_self=False):
        if differentiable_head(layer):
            log.info("%s: Keras' %s output head made weight-only (its inputs quantizer passes no gradient)",
                     layer.path, layer.quantization_mode)


def _add_adapter(model, state, config, planned, initial_weights, adapter_name):
    """`apply_plan` on a model that already has LoRA: one more adapter, frozen and inactive."""
    if adapter_name in state.adapters:
        raise LoraConfigError(f"this model already has an adapter named {adapter_name!r}")
    settings = dict(dropout=config.dropout, rslora=config.rslora, init=config.init, dora=config.dora)
    roles = {}
    for path, entry in planned.items():
        initial = initial_weights(path) if initial_weights else None
        host = next((p for p in entry.parents if isinstance(p, LoRALayer)), None)
        if host is not None:
            host.add_adapter(adapter_name, weights=initial, rank=config.rank_for(path),
                             alpha=config.alpha_for(path), **settings)
        else:
            state.wrapped_trainable.setdefault(path, entry.layer.trainable)
            host = _make_wrapper(entry.layer, config, initial, adapter_name)
            # The new wrapper follows the model: the active adapter (absent here, so the layer
            # computes its base alone until this adapter is activated), and a disabled model.
            host.set_adapter(state.active)
            host.disabled = state.disabled
            for parent in entry.parents:
                if not _swap(parent, entry.layer, host):
                    raise RuntimeError(f"internal error: could not replace {path!r} in {parent.name!r}")
        roles[host.path] = entry.role
    state.add_adapter(adapter_name, config, roles)
    reset_compiled_functions(model)
    return make_report(model, adapter_name)


def unload(model):
    """Takes the LoRA wrappers out of `model`, without merging them.

    Each wrapped layer goes back where its wrapper was, the trainable flags
    are those the model had before `apply_lora`, and the `LoraState` is
    removed. The LoRA weights are dropped: merge them first to keep them
    (`lora3.merge_and_unload`). An unmerged PiSSA/OLoRA adapter gives its
    initial update back to the kernel, so the kernel is the base's again.

    Args:
        model: a model `apply_lora` (or `load_adapter`) adapted.

    Returns:
        The same model object.

    Example:
    >>> import keras_hub, lora3
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> _ = lora3.apply_lora(backbone, rank=2)
    >>> lora_layers(unload(backbone))
    []
    """
    table = _parents_of(model)
    state = lora_state(model)
    wrappers = lora_layers(model)
    for w in wrappers:  # every check first: a base that cannot be restored changes nothing
        if not w.merged and any(a.rewrites_base and a.initial_factors is None
                                for a in map(w.get_adapter, w.adapter_names)):
            w.restore_base()  # raises, naming the layer
    for w in wrappers:
        if not w.merged:
            w.restore_base()
        for parent in table[id(w)][1]:
            _swap(parent, w, w.wrapped)
        w.wrapped.trainable = state.wrapped_trainable.get(w.path, True) if state else True
    if state is not None:
        # Layers `delete_adapter` gave back while other adapters stayed were left frozen.
        for path, layer in state.unsaved.released:
            layer.trainable = state.wrapped_trainable.get(path, True)
        for v in model.weights:
            if id(v) in state.trainable_flags:
                v.trainable = state.trainable_flags[id(v)]
        object.__delattr__(model, STATE_ATTR)
    reset_compiled_functions(model)
    return model


def make_report(model, adapter_name=None) -> LoraReport:
    """The `LoraReport` of `model` as it is now (an adapter's layers and the parameter counts).

    Args:
        model: any keras model, adapted or not.
        adapter_name: str or None. The adapter whose layers the rows show;
            `None` for the active one.

    Returns:
        A `LoraReport`; its config is that adapter's (`None` without a
        surgery), and it lists the model's adapters and the active one.

    Raises:
        LoraConfigError: the model has no adapter `adapter_name`.

    Example:
    >>> import keras
    >>> make_report(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])).total_params
    3
    """
    state = lora_state(model)
    if state is None:
        # Wrappers without a surgery's record: each row shows its layer's active adapter.
        rows = tuple(AdaptedLayer.from_wrapper(w) for w in lora_layers(model) if w.active_adapter in w.adapter_names)
        return LoraReport(rows=rows, trainable_params=count_params(model.trainable_weights),
                          total_params=count_params(model.weights))
    name = state.active if adapter_name is None else adapter_name
    if name not in state.adapters:
        raise LoraConfigError(f"this model has no adapter {name!r} (its adapters: {', '.join(state.adapters)})")
    record = state.adapters[name]
    rows = tuple(AdaptedLayer.from_wrapper(w, record.roles.get(w.path), adapter_name=name)
                 for w in lora_layers(model) if name in w.adapter_names)
    return LoraReport(
        rows=rows,
        trainable_params=count_params(model.trainable_weights),
        total_params=count_params(model.weights),
        config=record.config,
        adapters=tuple(state.adapters),
        active_adapter=state.active,
        adapter_name=name,
    )


def reset_compiled_functions(model):
    """Drops the model's compiled train/test/predict/generate functions (after a surgery).

    Keras compiles them on the next `fit`/`evaluate`/`predict`/`generate`, with the new layers.
    Which adapter runs (and whether any does) is Python state read while a function is traced,
    so every change of it (`set_adapter`, `disable_adapters`, `delete_adapter`, adding an
    adapter) calls this: a function compiled before would go on running the old choice.
    A keras-hub task's backbone is reset too (it may have been compiled on its own).

    Args:
        model: any keras model.

    Example:
    >>> import keras
    >>> reset_compiled_functions(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    """
    for target in {id(m): m for m in (model, backbone_of(model))}.values():
        for name in ("train_function", "test_function", "predict_function", "generate_function"):
            if hasattr(target, name):
                object.__setattr__(target, name, None)


def release_wrapper(model, wrapper):
    """Puts one wrapper's layer back in its parents (its last adapter was deleted).

    The layer stays frozen while the model has other adapters; `unload`
    restores its `trainable` flag with the others'.

    Args:
        model: the adapted model holding `wrapper`.
        wrapper: a `LoRALayer` of `model` with no adapter left.

    Example:
    >>> import keras, lora3
    >>> class Block(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.proj = keras.layers.Dense(4, name="proj")
    ...     def call(self, x):
    ...         return self.proj(x)
    >>> model = keras.Sequential([keras.Input((4,)), Block(name="block")])
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/proj")
    >>> release_wrapper(model, lora_layers(model)[0])
    >>> lora_layers(model), type(model.layers[0].proj).__name__
    ([], 'Dense')
    """
    state = lora_state(model)
    for parent in _parents_of(model)[id(wrapper)][1]:
        _swap(parent, wrapper, wrapper.wrapped)
    if state is not None:
        state.unsaved.released.append((wrapper.path, wrapper.wrapped))
    reset_compiled_functions(model)


def _natural_key(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _is_functional(layer):
    # A Sequential model is one too: once built it calls its layers through a functional graph of
    # its own, so a layer swapped into its layer list would never run.
    return any(cls.__name__ in ("Functional", "Sequential") for cls in type(layer).__mro__)


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


def _find(model, table, targets, layers, include_wrapped=False, exclude=()) -> dict:
    candidates = {}
    for layer, parents in table.values():
        if wrapper_class(layer) is not None:
            if not include_wrapped and any(isinstance(p, LoRALayer) for p in parents):
                continue  # already wrapped (a second adapter joins its wrapper instead)
            candidates.setdefault(layer.path, layer)
    paths = sorted(candidates, key=_natural_key)
    family = targets_lib.family_for(c.__name__ for c in type(backbone_of(model)).__mro__)
    chosen = targets_lib.select(paths, family, targets, layers, exclude)
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


def _make_wrapper(layer, config: LoraConfig, initial=None, adapter_name=DEFAULT_ADAPTER):
    cls = wrapper_class(layer)
    settings = dict(alpha=config.alpha_for(layer.path), dropout=config.dropout, rslora=config.rslora,
                    init=config.init, adapter_name=adapter_name, dora=config.dora)
    if initial is None:
        return cls(layer, rank=config.rank_for(layer.path), **settings)
    # (A, B), (A, B, magnitude) or (A, B, magnitude, (A0, B0)): a PiSSA/OLoRA file's initial factors
    lora_a, lora_b, *rest = initial
    return cls.from_weights(layer, lora_a, lora_b, magnitude=rest[0] if rest else None,
                            initial_factors=rest[1] if len(rest) > 1 else None, **settings)


def _train_also_patterns(train_also):
    patterns = []
    for entry in train_also:
        try:
            patterns.append((entry, re.compile(TRAIN_ALSO_SHORTCUTS.get(entry, entry))))
        except re.error as exc:
            raise LoraConfigError(f"train_also entry {entry!r} is not a valid regex: {exc}") from None
    return patterns
