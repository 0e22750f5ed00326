"""Several named adapters on one model, with PEFT's semantics: which one runs, running none,
deleting one, and combining several into a new one.

A model gets a second adapter from `apply_lora(model, ..., adapter_name="b")` or
`load_adapter(model, path, adapter_name="b")`. Only the active adapter runs and trains: the
others' variables are frozen (`trainable=False`), and a layer the active adapter does not adapt
computes its base layer alone. Which adapter runs is Python state read while `call` is traced,
so each change here drops the model's compiled functions (`reset_compiled_functions`): the next
`fit`/`predict`/`generate` traces the new choice, with no stale compiled function left.

Optimizers: a keras optimizer, once built, can only update the variables it was built for, so
after `set_adapter` the compiled optimizer could not train the new adapter. `set_adapter` keeps
each adapter's built optimizer aside and gives the model the new adapter's own (a fresh copy of
the compiled one, from its config, the first time): switching back resumes the old adapter's
optimizer state. Recompiling the model starts afresh (the kept optimizers are dropped at the
next switch). The kept optimizers are not written to `.keras` files; `model.optimizer` is.

PEFT functions followed: `set_adapter`, `disable_adapter` (a context manager),
`delete_adapter`, `add_weighted_adapter` (its `linear`, `cat` and `svd` combinations).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import ops

from lora3.config import LoraConfig, check_adapter_name
from lora3.errors import LoraConfigError
from lora3.report import LoraReport
from lora3.surgery import (
    _train_also_patterns,
    apply_plan,
    backbone_of,
    lora_layers,
    lora_state,
    plan,
    release_wrapper,
    reset_compiled_functions,
)

COMBINATIONS = ("linear", "cat", "svd")


def adapter_names(model) -> list:
    """The names of the model's adapters, in the order they were added.

    Args:
        model: any keras model (a task whose backbone was adapted counts).

    Returns:
        A list of str; empty for a model without lora3 adapters.

    Example:
    >>> import keras, lora3
    >>> model = _doc_model()
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/q")
    >>> _ = lora3.apply_lora(model, rank=1, targets=".*block/v", adapter_name="b")
    >>> adapter_names(model)
    ['default', 'b']
    """
    found = _find_state(model)
    return list(found[0].adapters) if found else []


def active_adapter(model):
    """The name of the adapter that runs and trains.

    Args:
        model: any keras model.

    Returns:
        A str, or `None` for a model without lora3 adapters.

    Example:
    >>> import lora3
    >>> model = _doc_model()
    >>> active_adapter(model) is None
    True
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/q", adapter_name="a")
    >>> active_adapter(model)
    'a'
    """
    found = _find_state(model)
    return found[0].active if found else None


def set_adapter(model, adapter_name, trainable=True):
    """Makes `adapter_name` the adapter that runs; only its variables train.

    As PEFT's `set_adapter`: every other adapter's variables are frozen, the
    active one's are trainable (unless `trainable=False`, PEFT's
    `inference_mode=True`), and a merged layer is unmerged first, with a
    warning. `train_also` weights follow their adapter: trainable when it is
    active. Compiled functions are dropped, and the model's optimizer is
    switched to the adapter's own (see the module's docstring), so `fit`
    right after trains the new adapter.

    Args:
        model: the adapted model (the one you compile, or its backbone).
        adapter_name: str. One of `adapter_names(model)`.
        trainable: bool. Whether the active adapter trains.

    Raises:
        LoraConfigError: the model has no lora3 adapters, no adapter of that
            name (the message lists them), or is inside `disable_adapters`.

    Example:
    >>> import lora3
    >>> model = _doc_model()
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/q")
    >>> _ = lora3.apply_lora(model, rank=1, targets=".*block/v", adapter_name="b")
    >>> set_adapter(model, "b")
    >>> [v.path for v in model.trainable_weights]
    ['block/v/lora_A_b', 'block/v/lora_B_b']
    >>> set_adapter(model, "c")
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: this model has no adapter 'c'; its adapters are: default, b
    """
    state, owner = _require_state(model)
    _check_known(state, adapter_name)
    if state.disabled:
        raise LoraConfigError("cannot switch adapters inside lora3.disable_adapters(model); leave the block first")
    _activate(model, owner, state, adapter_name, trainable, stash_current=True)


@contextlib.contextmanager
def disable_adapters(model):
    """A context manager: inside it the model computes its base model alone.

    As PEFT's `disable_adapter()`: every LoRA layer skips its adapters, so
    outputs equal the base model's exactly (the same operations on the same
    kernels), and every LoRA variable is frozen. On exit, also on an
    exception, the adapters run again and the trainable flags are restored.
    Compiled functions are dropped on entry and on exit. A merged layer is
    unmerged on entry, with a warning, as PEFT unmerges it (its kernel then
    equals the base's up to float rounding). Weights trained through
    `train_also` are not undone (they are not copied per adapter). Nested
    use is allowed (the inner block does nothing).

    Args:
        model: the adapted model (the one you compile, or its backbone).

    Returns:
        A context manager; `with disable_adapters(model) as m:` gives `model`.

    Raises:
        LoraConfigError: the model has no lora3 adapters, or a PiSSA/OLoRA
            adapter keeps residuals in its base kernels (the base is not
            there to compute).

    Example:
    >>> import numpy as np, lora3
    >>> model = _doc_model()
    >>> x = np.ones((2, 4), "float32")
    >>> base = model(x)
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/q")
    >>> for w in lora3.lora_layers(model):
    ...     _ = w.lora_B.assign(np.ones(w.lora_B.shape, "float32"))
    >>> with disable_adapters(model):
    ...     bool(np.array_equal(model(x), base))
    True
    >>> bool(np.array_equal(model(x), base))
    False
    """
    state, owner = _require_state(model)
    if state.disabled:
        yield model
        return
    wrappers = lora_layers(owner)
    rewritten = [(w.path, a) for w in wrappers for a in map(w.get_adapter, w.adapter_names) if a.rewrites_base]
    if rewritten:
        path, adapter = rewritten[0]
        raise LoraConfigError(
            f"adapter {adapter.name!r} (init={adapter.init!r}) keeps residuals in the base kernels (e.g. {path!r}), "
            "so without it the model would compute the residual, not the base; compare with a fresh base model "
            "(or lora3.unload, which gives the kernels their base back)")
    flags = [(v, v.trainable) for w in wrappers for v in _adapter_variables(w)]
    optimizer = getattr(model, "optimizer", None)
    optimizer_built = bool(getattr(optimizer, "built", False))
    for w in wrappers:
        if w.merged:
            warnings.warn(f"LoRA layer {w.path!r} is merged; unmerging it to disable adapters", stacklevel=3)
            w.unmerge()
        w.disabled = True
    for v, _ in flags:
        v.trainable = False
    state.disabled = True
    reset_compiled_functions(model)
    try:
        yield model
    finally:
        for w in lora_layers(owner):
            w.disabled = False
        for v, flag in flags:
            v.trainable = flag
        state.disabled = False
        if optimizer is not None and not optimizer_built and getattr(optimizer, "built", False):
            # Built inside the block for the variables left trainable there: it could not update
            # the adapter's, so the model gets an unbuilt copy again.
            if getattr(model, "optimizer", None) is optimizer:
                model.optimizer = _fresh_optimizer(optimizer)
        reset_compiled_functions(model)


def delete_adapter(model, adapter_name):
    """Deletes an adapter: its variables, and the wrappers only it used.

    As PEFT's `delete_adapter`: deleting the active adapter makes the first
    remaining adapter in sorted name order active (with PEFT's warning), and
    a merged adapter is refused. Unlike PEFT, the model's last adapter is
    refused (`lora3.unload(model)` removes LoRA altogether), and a layer left
    without adapters gets its original layer back (PEFT keeps an empty LoRA
    layer), so saved `.keras` files replay exactly. Compiled functions are
    dropped.

    Args:
        model: the adapted model (the one you compile, or its backbone).
        adapter_name: str. One of `adapter_names(model)`.

    Returns:
        The name of the active adapter afterwards, a str.

    Raises:
        LoraConfigError: no such adapter, it is the only one, it is merged,
            or the model is inside `disable_adapters`.

    Example:
    >>> import warnings, lora3
    >>> model = _doc_model()
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/q")
    >>> _ = lora3.apply_lora(model, rank=1, targets=".*block/v", adapter_name="b")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     delete_adapter(model, "default")
    'b'
    >>> [w.path for w in lora3.lora_layers(model)], adapter_names(model)
    (['block/v'], ['b'])
    """
    state, owner = _require_state(model)
    _check_known(state, adapter_name)
    if state.disabled:
        raise LoraConfigError("cannot delete an adapter inside lora3.disable_adapters(model); leave the block first")
    if len(state.adapters) == 1:
        raise LoraConfigError(
            f"adapter {adapter_name!r} is the model's only adapter; lora3.unload(model) removes LoRA altogether "
            "(or lora3.merge_and_unload(model) to keep it in the kernels)"
        )
    wrappers = [w for w in lora_layers(owner) if adapter_name in w.adapter_names]
    merged = [w.path for w in wrappers if w.merged and w.active_adapter == adapter_name]
    if merged:
        raise LoraConfigError(
            f"cannot delete adapter {adapter_name!r} while it is merged (layers {merged[:3]}); unmerge it first"
        )
    if adapter_name == state.active:
        successor = sorted(n for n in state.adapters if n != adapter_name)[0]
        warnings.warn(
            f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {successor}.",
            stacklevel=2,
        )
        # The deleted adapter's optimizer is dropped, not kept.
        _activate(model, owner, state, successor, True, stash_current=False)
    for w in wrappers:
        w.delete_adapter(adapter_name)
        if not w.adapter_names:
            release_wrapper(owner, w)
    del state.adapters[adapter_name]
    state.unsaved.optimizers.pop(adapter_name, None)
    reset_compiled_functions(model)
    return state.active


def add_weighted_adapter(model, adapters, weights, adapter_name, combination="svd", svd_rank=None) -> LoraReport:
    """A new adapter made of a weighted combination of existing ones, as PEFT's `add_weighted_adapter`.

    Follows PEFT's `LoraModel.add_weighted_adapter` (peft 0.21): the new
    adapter has `rank` r and `alpha = r` (so scaling 1), the other settings
    (`rslora`, `dropout`, `init`) of the first adapter, and adapts every
    layer any of `adapters` adapts; a layer combines the adapters it has.
    With `s_i` adapter i's scaling and `w_i` its weight, in PEFT's layout
    (`A` `(r, in)`, `B` as lora3's `(r, out)`):

    - `"linear"`: all ranks equal, r the same; `A = sum(sign_i * sqrt(|w_i s_i|) A_i)`,
      `B = sum(sqrt(|w_i s_i|) B_i)`, `sign_i` the sign of `w_i s_i` (put on A
      only, so a negative weight subtracts). The product is not the weighted
      sum of the updates (cross terms): PEFT calls it a rough approximation.
    - `"cat"`: r = the sum of the ranks; A stacks `w_i s_i A_i`, B stacks
      `B_i` (PEFT scales A, not B: the products are the same), so the update
      is exactly `sum(w_i s_i A_i.T @ B_i)`. Rows of adapters a layer lacks
      stay zero.
    - `"svd"`: r = `svd_rank` or the largest rank; the update
      `sum(w_i s_i A_i.T @ B_i)` is truncated by SVD: `A = Vh[:r]`,
      `B = (U[:, :r] * S[:r]).T` (computed in float64 with numpy).

    With one adapter the combination is `"linear"`, as PEFT. The new adapter
    is added frozen and inactive (`set_adapter` activates it). Where lora3
    cannot or does not follow PEFT: the SVD's singular vectors are defined up
    to sign (and rotation for equal singular values), so A and B may differ
    from PEFT's while their product and the outputs agree; PEFT's
    `svd_clamp`, `svd_full_matrices` (it does not change the result) and
    `svd_driver` and its ties/dare/magnitude_prune combinations are not
    offered; an existing `adapter_name` raises (PEFT returns silently);
    weights and adapters of different lengths raise (PEFT's `zip`
    truncates); a rank larger than a layer's `min(in, out)` raises (lora3's
    rank check). Kept from PEFT on purpose: with `rslora` on the first
    adapter the new one's scaling is `r / sqrt(r) = sqrt(r)`, not 1, as in
    PEFT, whose combined weights assume 1.

    Args:
        model: the adapted model (the one you compile, or its backbone).
        adapters: list of str. Names of existing adapters.
        weights: list of float. One weight per adapter (negative allowed).
        adapter_name: str. The new adapter's name.
        combination: str. `"linear"`, `"cat"` or `"svd"` (PEFT's default).
        svd_rank: int or None. The new rank for `"svd"`.

    Returns:
        A `LoraReport` of the new adapter.

    Raises:
        LoraConfigError: an unknown or taken name, unequal ranks for
            `"linear"`, per-layer ranks (`rank_pattern`) with another
            combination than `"svd"`, an unknown combination, mismatched lengths, a bad
            `svd_rank` or a rank a layer cannot take. Nothing has changed then.

    Example:
    >>> import numpy as np, lora3
    >>> model = _doc_model()
    >>> _ = lora3.apply_lora(model, rank=2, alpha=2, targets=".*block/q", adapter_name="a")
    >>> _ = lora3.apply_lora(model, rank=2, alpha=4, targets=".*block/q", adapter_name="b")
    >>> report = add_weighted_adapter(model, ["a", "b"], [1.0, -0.5], "mix", combination="cat")
    >>> report.rank, [w.get_adapter("mix").rank for w in lora3.lora_layers(model)]
    (4, [4])
    >>> w = lora3.lora_layers(model)[0]
    >>> d = lambda n: keras.ops.convert_to_numpy(w.delta_weight(n))
    >>> bool(np.allclose(d("mix"), d("a") - 0.5 * d("b"), atol=1e-6))
    True
    """
    state, owner = _require_state(model)
    check_adapter_name(adapter_name)
    if adapter_name in state.adapters:
        raise LoraConfigError(f"this model already has an adapter named {adapter_name!r}")
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if not adapters:
        raise LoraConfigError("add_weighted_adapter needs at least one adapter to combine")
    if len(weights) != len(adapters):
        raise LoraConfigError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise LoraConfigError(f"weights must be finite numbers, got {weights}")
    for name in adapters:
        _check_known(state, name)
    if combination not in COMBINATIONS:
        raise LoraConfigError(f"combination={combination!r} is not valid: it must be one of {', '.join(COMBINATIONS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise LoraConfigError(f"svd_rank must be a positive integer or None, got svd_rank={svd_rank!r}")
    if len(adapters) == 1:
        combination = "linear"
    configs = [state.adapters[name].config for name in adapters]
    dora = [name for name, c in zip(adapters, configs) if c.dora]
    if dora:
        raise LoraConfigError(
            f"add_weighted_adapter does not combine DoRA adapters ({dora}): their magnitude vectors "
            "have no weighted sum that keeps each adapter's layer outputs"
        )
    ranks = [c.rank for c in configs]
    per_layer = [name for name, c in zip(adapters, configs) if c.rank_pattern]
    if per_layer and combination != "svd":
        raise LoraConfigError(
            f"combination={combination!r} needs one rank per adapter, but {per_layer} set per-layer ranks "
            "(rank_pattern); use combination='svd'"
        )
    ranks = [max([c.rank, *c.rank_pattern.values()]) for c in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise LoraConfigError(
                f"combination='linear' needs adapters of one rank, got ranks {dict(zip(adapters, ranks))}; "
                "use 'cat' or 'svd'"
            )
        new_rank = ranks[0]
    elif combination == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    first = configs[0]
    targets = list(dict.fromkeys(t for c in configs for t in c.target_list))
    same_layers = all(c.layers == first.layers for c in configs)
    config = LoraConfig(rank=new_rank, alpha=float(new_rank), targets=targets, dropout=first.dropout,
                        rslora=first.rslora, init=first.init, layers=first.layers if same_layers else None)
    wrappers = [w for w in lora_layers(owner) if any(n in w.adapter_names for n in adapters)]
    planned = plan(owner, config, layer_paths=[w.path for w in wrappers], adapter_name=adapter_name)
    combined = {w.path: _combine(w, adapters, weights, combination, new_rank) for w in wrappers}
    return apply_plan(owner, config, planned, initial_weights=combined.__getitem__, adapter_name=adapter_name)


def _combine(wrapper, adapters, weights, combination, new_rank):
    """One layer's `(A, B)` of the combined adapter (float32 numpy, A `(r, in)`, B `(r, out)`)."""
    present = [(wrapper.get_adapter(n), w) for n, w in zip(adapters, weights) if n in wrapper.adapter_names]

    def arrays(adapter):
        return (ops.convert_to_numpy(adapter.lora_A).astype(np.float32),
                ops.convert_to_numpy(adapter.lora_B).astype(np.float32))

    if combination == "linear":
        a = np.zeros((new_rank, wrapper.in_features), np.float32)
        b = np.zeros((new_rank, wrapper.out_features), np.float32)
        for adapter, weight in present:
            lora_a, lora_b = arrays(adapter)
            scaled = weight * adapter.scaling
            # PEFT puts the sign on A only, so a negative weight subtracts the adapter.
            sign = 1.0 if scaled >= 0 else -1.0
            a += np.float32(math.sqrt(abs(scaled)) * sign) * lora_a
            b += np.float32(math.sqrt(abs(scaled))) * lora_b
        return a, b
    if combination == "cat":
        a = np.zeros((new_rank, wrapper.in_features), np.float32)
        b = np.zeros((new_rank, wrapper.out_features), np.float32)
        row = 0
        for adapter, weight in present:
            lora_a, lora_b = arrays(adapter)
            a[row:row + adapter.rank] = lora_a * np.float32(weight) * np.float32(adapter.scaling)
            b[row:row + adapter.rank] = lora_b
            row += adapter.rank
        return a, b
    # svd: PEFT decomposes the (out, in) update; its B is U S (out, r), its A is Vh (r, in).
    delta = sum(weight * adapter.scaling * (arrays(adapter)[1].T.astype(np.float64) @ arrays(adapter)[0])
                for adapter, weight in present)
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    b = (u[:, :new_rank] * s[:new_rank]).T
    return vh[:new_rank].astype(np.float32), b.astype(np.float32)


def _activate(model, owner, state, name, trainable, stash_current):
    previous = state.active
    wrappers = lora_layers(owner)
    for w in wrappers:
        w.set_adapter(name, trainable=trainable)
    lora_ids = {id(v) for w in wrappers for v in _adapter_variables(w)}
    patterns = {n: [p for _, p in _train_also_patterns(r.config.train_also)] for n, r in state.adapters.items()}
    others = [p for n, ps in patterns.items() if n != name for p in ps]
    for v in owner.weights:
        if id(v) in lora_ids:
            continue
        if any(p.search(v.path) for p in patterns[name]):
            v.trainable = bool(trainable)
        elif any(p.search(v.path) for p in others):
            v.trainable = False
    state.active = name
    _switch_optimizer(model, state, previous, name, stash_current)
    reset_compiled_functions(model)
    reset_compiled_functions(owner)


def _switch_optimizer(model, state, previous, name, stash_current):
    """Keeps the previous adapter's built optimizer aside and gives the model `name`'s own."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or previous == name:
        return
    kept = state.unsaved
    if kept.current_optimizer is not None and optimizer is not kept.current_optimizer:
        kept.optimizers.clear()  # the model was compiled again since: the kept ones are stale
    if getattr(optimizer, "built", False) and stash_current:
        kept.optimizers[previous] = optimizer
    replacement = kept.optimizers.pop(name, None)
    if replacement is None:
        replacement = _fresh_optimizer(optimizer) if getattr(optimizer, "built", False) else optimizer
    model.optimizer = replacement
    kept.current_optimizer = replacement


def _fresh_optimizer(optimizer):
    """An unbuilt optimizer with `optimizer`'s configuration (learning rate, schedule, ...)."""
    return keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))


def _adapter_variables(wrapper):
    for name in wrapper.adapter_names:
        adapter = wrapper.get_adapter(name)
        yield from adapter.variables()


def _find_state(model):
    """`(state, owner)`: the model's `LoraState` and the model holding it (a task's backbone may), or None."""
    for owner in {id(m): m for m in (model, backbone_of(model))}.values():
        state = lora_state(owner)
        if state is not None:
            return state, owner
    return None


def _require_state(model):
    found = _find_state(model)
    if found is None:
        raise LoraConfigError(
            "this model has no lora3 adapters; add one with lora3.apply_lora(model, ...) or lora3.load_adapter"
        )
    return found


def _check_known(state, name):
    if name not in state.adapters:
        raise LoraConfigError(f"this model has no adapter {name!r}; its adapters are: {', '.join(state.adapters)}")


def _doc_model():
    """The docstrings' model: one block holding two Dense layers, `block/q` and `block/v`."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.q = keras.layers.Dense(4, name="q")
            self.v = keras.layers.Dense(4, name="v")

        def call(self, x):
            return self.v(self.q(x))

    # Functional, not Sequential: its layers' paths do not carry an auto-numbered model name.
    inputs = keras.Input((4,))
    return keras.Model(inputs, Block(name="block")(inputs))
