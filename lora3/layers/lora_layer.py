"""`LoRALayer`: the part of a LoRA wrapper that does not depend on the wrapped layer's type.

A wrapper holds a *built* `Dense`/`EinsumDense` (frozen) and, per adapter, two
matrices, `lora_A: (rank, in_features)` and `lora_B: (rank, out_features)`:

    y = activation(base_linear(x) + s * (dropout(x) @ A.T) @ B),   s = alpha / rank
                                                                  (alpha / sqrt(rank) with rslora)

so the weight update is `s * A.T @ B` in the `(in_features, out_features)` view.
`A` is stored `(rank, in_features)`, as PEFT stores `lora_A.weight`, because its
gradient `dh.T @ x` (a contraction over tokens) then comes out rank-major: XLA's
CPU backend computes a `(rank, in)` result about 2.5x faster than the same
product laid out `(in, rank)` (experiments/benchmarks/thin_dots.py). Adapter
files keep the matrix view `(in_features, rank)` (see `lora3.adapters`).

A wrapper may hold several named adapters (as PEFT's `lora_A[name]`), each with
its own rank, alpha, rslora flag and dropout; only the *active* one runs (and
trains), so `call` costs one adapter whatever the number held. The adapter
`"default"` keeps the variable names `lora_A`/`lora_B` (paths
`<layer.path>/lora_A`), adapter `"x"` gets `lora_A_x`/`lora_B_x`.
`wrapper.lora_A`, `.lora_B`, `.rank`, `.alpha`, `.rslora`, `.dropout`,
`.scaling` are the active adapter's. Which adapter is active is plain Python
state read when `call` is traced: whoever switches it must drop compiled
functions (`lora3.set_adapter` does, see `lora3.surgery.reset_compiled_functions`).

The low-rank path is two thin products (`lora3.layers.low_rank`, which gives the
ones contracting the rank their own gradient), so training never materialises the
full-size `A.T @ B` and never computes a gradient for the frozen kernel.
A subclass names the keras class it wraps (`wrapped_class`) and says how its
kernel reads as a matrix (`matrix_shape`), how to apply the kernel to an input
(`_apply_kernel`), how to apply A and B (`_lora_delta`), and how the
`(in_features, out_features)` matrix maps to the kernel's layout
(`_delta_to_kernel_layout`).
"""

import contextvars
import math
import warnings

import keras
from keras import ops

from lora3.config import (
    DEFAULT_ADAPTER,
    base_rewriting,
    check_adapter_name,
    check_init,
    check_scale,
    scaling,
    variable_suffix,
)
from lora3.errors import LoraConfigError
import lora3.layers.base_init as base_init
import lora3.layers.quantized as quantized
import lora3.layers.low_rank as low_rank

# `(A, B)` arrays that `from_weights` hands to the `build` its constructor runs, so the
# variables are created once from them (adapter loading), not drawn and then overwritten.
_INITIAL_WEIGHTS = contextvars.ContextVar("lora3_initial_weights", default=None)
# Set while `from_config` rebuilds a wrapper (a `.keras` file): the kernel is about to be loaded,
# already holding any PiSSA/OLoRA residual, so a base-rewriting init must not run again.
_RESTORING = contextvars.ContextVar("lora3_restoring", default=False)


class AdapterWeights:
    """One adapter inside a LoRA wrapper: its settings and its two variables.

    A plain object, not a keras layer: the variables are tracked by the
    wrapper (`add_weight`), so they appear in its weights under
    `<layer.path>/lora_A[_<name>]`. `lora_A`/`lora_B` are `None` until the
    wrapper is built. Get one with `LoRALayer.get_adapter`.

    Args:
        name: str. The adapter's name.
        rank: int. Its rank.
        alpha: float. Its scaling numerator.
        dropout: float. Its dropout rate on the LoRA branch's input.
        rslora: bool. Rank-stabilised scaling.
        init: str. The initialiser of its `A`.
        dora: bool. DoRA (Liu et al. 2024, arXiv:2402.09353): the adapter
            also has a magnitude vector `lora_magnitude` `(out_features,)`.

    Example:
    >>> adapter = AdapterWeights("x", rank=4, alpha=8.0, dropout=0.0, rslora=False, init="kaiming")
    >>> adapter.scaling, adapter.lora_A is None, adapter.dora
    (2.0, True, False)
    """

    __slots__ = ("name", "rank", "alpha", "dropout", "rslora", "init", "dora", "lora_A", "lora_B",
                 "lora_magnitude", "initial_factors", "restored")

    def __init__(self, name, rank, alpha, dropout, rslora, init, dora=False):
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.init = init
        self.dora = bool(dora)
        self.lora_A = None
        self.lora_B = None
        self.lora_magnitude = None
        # PiSSA/OLoRA: the `(A0, B0)` numpy arrays the adapter started from, whose update
        # `s * A0.T @ B0` was taken out of the base kernel (None: the kernel is the base's own,
        # or it came from a `.keras` file, which keeps the residual but not these).
        self.initial_factors = None
        # True for an adapter rebuilt from a `.keras` file: its kernel arrives with the residual.
        self.restored = False

    @property
    def rewrites_base(self):
        """Whether this adapter's init wrote a residual into the wrapped kernel (PiSSA, OLoRA)."""
        return base_rewriting(self.init)

    def variables(self):
        """The adapter's created variables: `lora_A`, `lora_B` and, with DoRA, `lora_magnitude`.

        Returns:
            A tuple of variables (empty before the wrapper is built).

        Example:
        >>> AdapterWeights("x", 2, 4, 0.0, False, "kaiming").variables()
        ()
        """
        return tuple(v for v in (self.lora_A, self.lora_B, self.lora_magnitude) if v is not None)

    @property
    def scaling(self):
        """`alpha / rank`, or `alpha / sqrt(rank)` with rslora."""
        return scaling(self.rank, self.alpha, self.rslora)

    def settings(self):
        """The constructor's arguments as a dict (for `get_config`).

        Returns:
            `{"name", "rank", "alpha", "dropout", "rslora", "init"}`, and
            `"dora": True` for a DoRA adapter (left out otherwise, so a
            plain adapter's config is what it was before DoRA existed).

        Example:
        >>> AdapterWeights("x", 2, 4, 0.0, False, "kaiming").settings()["alpha"]
        4.0
        """
        settings = {"name": self.name, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                    "rslora": self.rslora, "init": self.init}
        if self.dora:
            settings["dora"] = True
        return settings

    def __repr__(self):
        return (f"AdapterWeights(name={self.name!r}, rank={self.rank}, alpha={self.alpha:g}, "
                f"dropout={self.dropout:g}, rslora={self.rslora}{', dora=True' if self.dora else ''})")


class LoRALayer(keras.layers.Layer):
    """Base class of the LoRA wrappers `LoRADense` and `LoRAEinsumDense`.

    The wrapper takes the wrapped layer's name and dtype policy, freezes it,
    and adds an adapter: two trainable weights, `lora_A` `(rank, in_features)`
    and `lora_B` `(rank, out_features)`, whose product (times `scaling`) is
    added to the wrapped layer's output before its activation. When the
    wrapped layer is already built the wrapper is built at once, under the
    wrapped layer's parent path, so `wrapper.path == layer.path` and the
    default adapter's weights live at `<layer.path>/lora_A` and
    `<layer.path>/lora_B`. More adapters can be added (`add_adapter`); only
    the active one (`active_adapter`, see `set_adapter`) runs and trains.

    Args:
        layer: the `keras.layers.Dense` / `keras.layers.EinsumDense` to wrap
            (the subclass's `wrapped_class`), float or quantized by Keras in
            int8 / int4 (`layer.quantize("int8")`: the frozen path then runs
            Keras' quantized compute, the LoRA branch stays float; see
            `lora3.layers.quantized`), without Keras' own LoRA enabled.
        rank: int. Rank of the update, at most `min(in_features, out_features)`.
        alpha: float. Scaling numerator: `scaling = alpha / rank`.
        dropout: float. Dropout rate on the LoRA branch's input, in `[0, 1)`.
            The frozen path always sees the undropped input.
        rslora: bool. Rank-stabilised scaling `alpha / sqrt(rank)`.
        init: str. Initialiser of `lora_A`: `"kaiming"` (PEFT's default,
            `U(-1/sqrt(in), 1/sqrt(in))`) or `"gaussian"` (std `1/rank`).
            `lora_B` starts at zero, so a fresh wrapper changes nothing.
        adapter_name: str. The name of this first adapter (it is active).
        dora: bool. DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
            Adaptation", arXiv:2402.09353), as PEFT's `use_dora=True`: the
            adapter also learns `lora_magnitude` `m` `(out_features,)`,
            initialised to the column norms of `W + s * A.T @ B` in the
            `(in_features, out_features)` view (`||W||`, as B starts at
            zero), and the layer computes
            `base(x) + (m/n - 1) * (x' @ W) + (m/n) * s * (x' @ A.T) @ B`
            with `n = ||W + s * A.T @ B||` held constant in the backward
            pass (`stop_gradient`) and `x'` the dropped-out input (`x`
            itself when no dropout runs), i.e. `(m/n) * x @ (W + s*A.T@B) + b`.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`).

    Raises:
        LoraConfigError: a bad setting, a layer of the wrong kind, quantized
            in another mode than int8 / int4, with Keras' LoRA enabled, or too
            small for `rank`.

    Example:
    >>> import keras, numpy as np
    >>> from lora3.layers import LoRADense
    >>> dense = keras.layers.Dense(8, name="proj")
    >>> dense.build((None, 4))
    >>> lora = LoRADense(dense, rank=2, alpha=4)
    >>> lora.scaling, lora.lora_params
    (2.0, 24)
    >>> x = np.ones((3, 4), "float32")
    >>> bool(np.allclose(lora(x), dense(x)))   # B is zero: nothing changed yet
    True
    """

    wrapped_class = None  # the keras layer class a subclass wraps

    def __init__(self, layer, rank, alpha, dropout=0.0, rslora=False, init="kaiming",
                 adapter_name=DEFAULT_ADAPTER, dora=False, **kwargs):
        self._check_kind(layer)
        check_scale(rank, alpha, dropout)
        check_init(init)
        check_adapter_name(adapter_name)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", quantized.float_policy(layer))  # the LoRA branch stays float on a quantized layer
        super().__init__(**kwargs)
        self.wrapped = layer
        # name -> AdapterWeights, in the order the adapters were added (which is also the order
        # of their variables in this layer, the order a `.keras` file stores them in). A plain
        # dict, kept out of keras' attribute tracking: `add_weight` tracks the variables.
        object.__setattr__(self, "_adapters", {})
        # The adapter `call` runs. It may name an adapter this layer lacks (another adapter of
        # the model adapts other layers): the layer then computes its wrapped layer alone.
        self.active_adapter = adapter_name
        # True inside `lora3.disable_adapters`: `call` skips every adapter.
        self.disabled = False
        # True once `merge()` has added the active adapter's update into the wrapped kernel:
        # `call` then skips the LoRA branch. Switching adapters unmerges first, so a merged
        # layer's merged adapter is always its active one. Not a constructor argument;
        # `from_config` restores it.
        self.merged = False
        self.lora_dropout = None  # the default adapter's Dropout layer (its attribute name is kept)
        _check_dora(dora)
        # The column norms `n` each DoRA adapter was merged with (name -> tensor), for `unmerge`.
        object.__setattr__(self, "_dora_merge_norm", {})
        self._add_settings(AdapterWeights(adapter_name, rank, alpha, dropout, rslora, init, dora))
        # The wrapped layer is frozen: only A and B train.
        layer.trainable = False
        if layer.built:
            # Build under the wrapped layer's parent path, so `lora_A` lives at
            # `<layer.path>/lora_A` and adapters are keyed by the original path.
            path = layer.path or layer.name
            self._parent_path = path.rsplit("/", 1)[0] if "/" in path else ""
            self.build()

    @classmethod
    def from_weights(cls, layer, lora_A, lora_B, alpha, dropout=0.0, rslora=False, init="kaiming",
                     adapter_name=DEFAULT_ADAPTER, magnitude=None, dora=False, initial_factors=None, **kwargs):
        """A wrapper whose `lora_A` and `lora_B` are created from arrays instead of drawn.

        The variables are created once, from these values (adapter loading:
        nothing is drawn and then overwritten, so a large adapter costs its
        own size in memory, not twice that). The rank is `lora_A`'s first
        dimension.

        Args:
            layer: the built layer to wrap (see the class).
            lora_A: array `(rank, in_features)`.
            lora_B: array `(rank, out_features)`.
            alpha, dropout, rslora, init, adapter_name, **kwargs: as for the
                constructor (`init` is only recorded: A is not drawn).
            magnitude: array `(out_features,)` or None. A DoRA adapter's
                `lora_magnitude` (None: PEFT's initial value,
                `||W + s * A.T @ B||`). Needs `dora=True`.
            dora: bool. A DoRA adapter (see the class).
            initial_factors: `(A0, B0)` or None. For `init="pissa"`/`"olora"`:
                the factors the adapter started from, whose update is taken
                out of the kernel (None: computed from the kernel, as PEFT
                does when it loads such an adapter).

        Returns:
            The built wrapper.

        Raises:
            LoraConfigError: as the constructor; also if `layer` is not built
                or an array's shape does not fit it (naming both shapes).

        Example:
        >>> import keras, numpy as np
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 4))
        >>> a, b = np.ones((2, 4), "float32"), np.ones((2, 3), "float32")
        >>> lora = LoRADense.from_weights(dense, a, b, alpha=2)
        >>> float(keras.ops.sum(lora.lora_A)), lora.rank
        (8.0, 2)
        """
        if not layer.built:
            raise LoraConfigError(
                f"{cls.__name__}.from_weights needs a built layer; {layer.name!r} is not built"
            )
        if magnitude is not None and not dora:
            raise LoraConfigError(f"{cls.__name__}.from_weights: a magnitude vector needs dora=True")
        token = _INITIAL_WEIGHTS.set((lora_A, lora_B, magnitude, initial_factors))
        try:
            return cls(layer, int(lora_A.shape[0]), alpha, dropout, rslora, init, adapter_name, dora=dora, **kwargs)
        finally:
            _INITIAL_WEIGHTS.reset(token)

    # -- what a subclass provides ---------------------------------------------
    @classmethod
    def matrix_shape(cls, layer):
        """`(in_features, out_features)` of a built wrapped layer's kernel read as a matrix.

        Args:
            layer: a built layer of `wrapped_class`.

        Example: see `LoRADense.matrix_shape`, `LoRAEinsumDense.matrix_shape`.
        """
        raise NotImplementedError

    def _apply_kernel(self, inputs):
        """The wrapped layer's kernel applied to `inputs` (no bias, no activation)."""
        raise NotImplementedError

    def _lora_delta(self, x, adapter):
        """`s * (x @ A.T) @ B` of `adapter` in the wrapped layer's output layout."""
        raise NotImplementedError

    def _delta_to_kernel_layout(self, delta):
        """Reshape/transpose an `(in_features, out_features)` matrix to the kernel's layout."""
        raise NotImplementedError

    # -- checks shared with the surgery's plan --------------------------------
    @classmethod
    def check_layer(cls, layer, rank):
        """Checks that `cls(layer, rank=rank, ...)` would succeed, without building anything.

        Args:
            layer: a built keras layer.
            rank: int. The intended rank.

        Returns:
            `(in_features, out_features)` of the layer's matrix view.

        Raises:
            LoraConfigError: the layer has the wrong type, is quantized in a
                mode other than int8 / int4, has Keras' own LoRA enabled, or is
                too small for `rank`.

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 4))
        >>> LoRADense.check_layer(dense, rank=2)
        (4, 3)
        """
        cls._check_kind(layer)
        in_features, out_features = cls.matrix_shape(layer)
        _check_rank(rank, layer, in_features, out_features)
        return in_features, out_features

    @classmethod
    def _check_kind(cls, layer):
        name = getattr(layer, "path", None) or getattr(layer, "name", None)
        if not isinstance(layer, cls.wrapped_class):
            raise LoraConfigError(
                f"{cls.__name__} wraps a keras.layers.{cls.wrapped_class.__name__}, "
                f"got {type(layer).__name__} ({name!r})"
            )
        if getattr(layer, "lora_enabled", False):
            raise LoraConfigError(
                f"layer {name!r} has Keras' own LoRA enabled (enable_lora); use lora3 on a model without it"
            )
        # Keras' int8 / int4 layers are wrapped (their quantized compute runs the frozen path); other modes are refused.
        quantized.check_quantization(layer, name)

    # -- the adapters -----------------------------------------------------------
    @property
    def adapter_names(self):
        """The names of this layer's adapters, in the order they were added (a list)."""
        return list(self._adapters)

    def get_adapter(self, name=None):
        """One adapter's settings and variables.

        Args:
            name: str or None. The adapter; `None` for the active one.

        Returns:
            Its `AdapterWeights`.

        Raises:
            LoraConfigError: this layer has no adapter of that name (listing
                the ones it has).

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> LoRADense(dense, rank=2, alpha=4).get_adapter()
        AdapterWeights(name='default', rank=2, alpha=4, dropout=0, rslora=False)
        """
        name = self.active_adapter if name is None else name
        adapter = self._adapters.get(name)
        if adapter is None:
            raise LoraConfigError(
                f"LoRA layer {self.path or self.name!r} has no adapter {name!r} "
                f"(its adapters: {', '.join(self._adapters) or 'none'})"
            )
        return adapter

    def add_adapter(self, name, rank, alpha, dropout=0.0, rslora=False, init="kaiming", weights=None, dora=False):
        """Adds a named adapter beside the existing ones (not made active).

        Its variables are `<layer.path>/lora_A_<name>` and `.../lora_B_<name>`
        (`lora_A`/`lora_B` for `"default"`), created now when the layer is
        built, else by `build`. They are trainable only if `name` is the
        active adapter.

        Args:
            name: str. A new adapter name (letters, digits, `_`, `-`).
            rank, alpha, dropout, rslora, init: as for the constructor.
            weights: `(A, B)` arrays `(rank, in_features)`, `(rank, out_features)`
                to create the variables from, or None to draw A (B is zero);
                for a DoRA adapter `(A, B, m)` with `m` `(out_features,)` or None.
            dora: bool. A DoRA adapter (see the class).

        Returns:
            The new `AdapterWeights`.

        Raises:
            LoraConfigError: the name is invalid or taken, a setting is bad,
                the rank is too large or an array's shape does not fit.

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> lora = LoRADense(dense, rank=2, alpha=4)
        >>> _ = lora.add_adapter("b", rank=1, alpha=1)
        >>> lora.adapter_names, [v.path for v in lora.trainable_weights]
        (['default', 'b'], ['proj/lora_A', 'proj/lora_B'])
        """
        check_adapter_name(name)
        if name in self._adapters:
            raise LoraConfigError(f"LoRA layer {self.path or self.name!r} already has an adapter {name!r}")
        check_scale(rank, alpha, dropout)
        check_init(init)
        _check_dora(dora)
        if not _RESTORING.get():
            self.check_base_rewrite(init, name)
        adapter = AdapterWeights(name, rank, alpha, dropout, rslora, init, dora)
        if self.built:
            _check_rank(rank, self.wrapped, self.in_features, self.out_features)
            with _unlocked(self):
                self._create_variables(adapter, weights)
        elif weights is not None:
            raise LoraConfigError(f"{self.name}: weights for a new adapter need a built layer")
        with _unlocked(self):
            self._add_settings(adapter)
        return adapter

    def delete_adapter(self, name):
        """Removes an adapter and its variables (and its dropout layer) from this layer.

        The active adapter's name is left as it is (the model-level
        `lora3.delete_adapter` chooses the next active adapter).

        Args:
            name: str. One of this layer's adapters.

        Raises:
            LoraConfigError: no such adapter, or it is merged into the kernel
                (unmerge first, as PEFT requires).

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> lora = LoRADense(dense, rank=2, alpha=4)
        >>> _ = lora.add_adapter("b", rank=1, alpha=1)
        >>> lora.delete_adapter("b")
        >>> lora.adapter_names, len(lora.weights)
        (['default'], 4)
        """
        adapter = self.get_adapter(name)
        if self.merged and name == self.active_adapter:
            raise LoraConfigError(
                f"adapter {name!r} of {self.path or self.name!r} is merged into the kernel; unmerge it first"
            )
        if adapter.rewrites_base:
            self.restore_base()  # the kernel gets its base back (or nothing changes: it raises)
        for variable in adapter.variables():
            self._untrack_variable(variable)
        attr = _dropout_attr(name)
        dropout_layer = getattr(self, attr, None)
        if dropout_layer is not None:
            self._tracker.untrack(dropout_layer)
            with _unlocked(self):
                if attr == "lora_dropout":
                    self.lora_dropout = None
                else:
                    object.__delattr__(self, attr)
        del self._adapters[name]

    def set_adapter(self, name, trainable=True):
        """Makes `name` the adapter `call` runs; only its variables stay trainable.

        `name` may be an adapter this layer lacks: the layer then computes
        the wrapped layer alone (another adapter of the model adapts other
        layers). A merged layer is unmerged first, with a warning, as PEFT
        does. Compiled functions that traced this layer are stale afterwards:
        the model-level `lora3.set_adapter` drops them.

        Args:
            name: str. The adapter to activate.
            trainable: bool. With `False` the active adapter is frozen too
                (PEFT's `inference_mode=True`).

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> lora = LoRADense(dense, rank=2, alpha=4)
        >>> _ = lora.add_adapter("b", rank=1, alpha=1)
        >>> lora.set_adapter("b")
        >>> lora.rank, [v.path for v in lora.trainable_weights]
        (1, ['proj/lora_A_b', 'proj/lora_B_b'])
        """
        if self.merged and name != self.active_adapter:
            warnings.warn(
                f"LoRA layer {self.path or self.name!r}: adapter {self.active_adapter!r} is merged; "
                "unmerging it before switching adapters", stacklevel=2,
            )
            self.unmerge()
        self.active_adapter = name
        for adapter in self._adapters.values():
            for variable in adapter.variables():
                variable.trainable = bool(trainable) and adapter.name == name

    def _add_settings(self, adapter):
        self._adapters[adapter.name] = adapter
        if adapter.dropout > 0:
            attr = _dropout_attr(adapter.name)
            setattr(self, attr, keras.layers.Dropout(adapter.dropout, name=attr))
            if self.built:
                getattr(self, attr).build(None)

    def _create_variables(self, adapter, weights=None):
        a_shape, b_shape = (adapter.rank, self.in_features), (adapter.rank, self.out_features)
        magnitude = weights[2] if weights is not None and len(weights) > 2 else None
        if magnitude is not None and not adapter.dora:
            raise LoraConfigError(f"{self.name}: a magnitude vector for adapter {adapter.name!r}, which is no DoRA adapter")
        initial = weights[3] if weights is not None and len(weights) > 3 else None
        if adapter.rewrites_base and not adapter.restored and not _RESTORING.get():
            # PiSSA/OLoRA: A and B start from the kernel (or from the factors an adapter file
            # recorded), and the kernel keeps the residual; trained values, if given, come after.
            a0, b0 = self._rewrite_base(adapter, initial)
            if weights is None:
                weights = (a0, b0)
        elif initial is not None:
            raise LoraConfigError(f"{self.name}: initial factors for adapter {adapter.name!r}, whose init "
                                  f"{adapter.init!r} does not start from the base kernel")
        if weights is not None:
            a_init, b_init = _constant(weights[0], a_shape), _constant(weights[1], b_shape)
        elif adapter.init == "kaiming":
            # PEFT's default: kaiming_uniform(a=sqrt(5)) on its (rank, in) weight,
            # i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(self.in_features)
            a_init, b_init = keras.initializers.RandomUniform(-bound, bound), "zeros"
        else:
            a_init, b_init = keras.initializers.RandomNormal(stddev=1.0 / adapter.rank), "zeros"
        suffix = variable_suffix(adapter.name)
        # Created trainable, then frozen unless active: on TensorFlow a variable created
        # non-trainable is never watched by the gradient tape, so it could not train later.
        adapter.lora_A = self.add_weight(name="lora_A" + suffix, shape=a_shape, initializer=a_init, trainable=True)
        adapter.lora_B = self.add_weight(name="lora_B" + suffix, shape=b_shape, initializer=b_init, trainable=True)
        if adapter.dora:
            if magnitude is not None:
                m_init = _constant(magnitude, (self.out_features,))
            else:
                # PEFT's initial magnitude: the column norms of W + s * A.T @ B (||W|| while B is 0).
                norm = ops.convert_to_numpy(self._dora_weight_norm(adapter))

                def m_init(shape, dtype=None):
                    return ops.cast(norm, dtype or "float32")

            adapter.lora_magnitude = self.add_weight(
                name="lora_magnitude" + suffix, shape=(self.out_features,), initializer=m_init, trainable=True
            )
        active = adapter.name == self.active_adapter
        for variable in adapter.variables():
            variable.trainable = variable.trainable and active

    def check_base_rewrite(self, init, adapter_name):
        """Refuses a base-rewriting `init` (PiSSA, OLoRA) this layer cannot take, changing nothing.

        The init rewrites the wrapped kernel, which every adapter of the layer shares, so it
        needs a float kernel (as PEFT: initialise on the float model, then quantize the
        residual), an unmerged layer and no other adapter; and another adapter cannot join a
        layer whose kernel holds such a residual.

        Args:
            init: str. The new adapter's init.
            adapter_name: str. The new adapter's name.

        Raises:
            LoraConfigError: naming the layer and the reason.

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> lora = LoRADense(dense, rank=2, alpha=4, init="pissa")
        >>> lora.check_base_rewrite("kaiming", "b")
        Traceback (most recent call last):
        ...
        lora3.errors.LoraConfigError: layer 'proj': its adapter 'default' (init='pissa') holds a residual in the kernel, so no other adapter can share it; use one adapter per model with pissa/olora
        """
        where = self.path or self.name
        for other in self._adapters.values():
            if other.name != adapter_name and other.rewrites_base:
                raise LoraConfigError(
                    f"layer {where!r}: its adapter {other.name!r} (init={other.init!r}) holds a residual in the "
                    "kernel, so no other adapter can share it; use one adapter per model with pissa/olora")
        if not base_rewriting(init):
            return
        others = [n for n in self._adapters if n != adapter_name]
        if others:
            raise LoraConfigError(
                f"layer {where!r}: init={init!r} rewrites the kernel that its adapter(s) {', '.join(others)} "
                "share; use pissa/olora for a model's only adapter")
        _check_float_kernel(self.wrapped, init)

    def _rewrite_base(self, adapter, initial=None):
        """Writes `W - s * A0.T @ B0` into the wrapped kernel; returns `(A0, B0)` (numpy).

        `initial`: `(A0, B0)` an adapter file recorded (the residual is then exact whatever
        the backend or the randomised SVD would give), or None to compute them from the kernel.
        """
        self.check_base_rewrite(adapter.init, adapter.name)
        weight = self.kernel_matrix()
        if initial is not None:
            a0, b0 = (ops.convert_to_numpy(ops.cast(x, "float32")) for x in initial)
            if a0.shape != (adapter.rank, self.in_features) or b0.shape != (adapter.rank, self.out_features):
                raise LoraConfigError(
                    f"initial PiSSA/OLoRA factors of shapes {a0.shape}, {b0.shape}; layer "
                    f"{self.path or self.name!r} needs {(adapter.rank, self.in_features)}, {(adapter.rank, self.out_features)}")
        else:
            a0, b0 = (ops.convert_to_numpy(x) for x in base_init.base_factors(weight, adapter.rank, adapter.scaling, adapter.init))
        kernel = self.wrapped._kernel
        kernel.assign(ops.cast(self._delta_to_kernel_layout(base_init.residual(weight, a0, b0, adapter.scaling)), kernel.dtype))
        adapter.initial_factors = (a0, b0)
        return a0, b0

    def restore_base(self):
        """Adds the update a PiSSA/OLoRA adapter took out of the kernel back in (the kernel is the base's again).

        Called when the adapter goes away unmerged (`lora3.surgery.unload`,
        `delete_adapter`). Nothing to do for other inits.

        Raises:
            LoraConfigError: the initial factors are unknown (a model loaded from a `.keras`
                file keeps the residual, not the factors), so the base cannot be restored.

        Example:
        >>> import keras, numpy as np
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, use_bias=False)
        >>> dense.build((None, 4))
        >>> kernel = keras.ops.convert_to_numpy(dense.kernel)
        >>> lora = LoRADense(dense, rank=2, alpha=2, init="pissa")
        >>> lora.restore_base()
        >>> bool(np.allclose(keras.ops.convert_to_numpy(dense.kernel), kernel, atol=1e-5))
        True
        """
        for adapter in self._adapters.values():
            if not adapter.rewrites_base:
                continue
            if adapter.initial_factors is None:
                raise LoraConfigError(
                    f"layer {self.path or self.name!r}: adapter {adapter.name!r} (init={adapter.init!r}) left a residual "
                    "in the kernel, and its initial factors are unknown (loaded from a .keras file), so the base "
                    "kernel cannot be restored; merge it instead (lora3.merge_and_unload) or reload the base model")
            a0, b0 = adapter.initial_factors
            kernel = self.wrapped._kernel
            delta = ops.multiply(ops.matmul(ops.transpose(a0), b0), adapter.scaling)
            kernel.assign(ops.add(kernel, ops.cast(self._delta_to_kernel_layout(delta), kernel.dtype)))
            adapter.initial_factors = None
            # The kernel is the base's own now: the adapter, if kept, is a plain one on top of it.
            adapter.init = "kaiming"

    # -- the active adapter's settings (what single-adapter code reads) ------------
    @property
    def lora_A(self):
        """The active adapter's `A` variable, `(rank, in_features)`."""
        return self._active().lora_A

    @property
    def lora_B(self):
        """The active adapter's `B` variable, `(rank, out_features)`."""
        return self._active().lora_B

    @property
    def rank(self):
        """The active adapter's rank."""
        return self._active().rank

    @property
    def alpha(self):
        """The active adapter's scaling numerator."""
        return self._active().alpha

    @property
    def dropout(self):
        """The active adapter's dropout rate."""
        return self._active().dropout

    @property
    def rslora(self):
        """Whether the active adapter uses rank-stabilised scaling."""
        return self._active().rslora

    @property
    def init(self):
        """The initialiser name of the active adapter's `A`."""
        return self._active().init

    @property
    def scaling(self):
        """The factor `s` of the active adapter's update: `alpha / rank`, or `alpha / sqrt(rank)` with rslora."""
        return self._active().scaling

    @property
    def dora(self):
        """Whether the active adapter is a DoRA adapter."""
        return self._active().dora

    @property
    def lora_magnitude(self):
        """The active adapter's DoRA magnitude variable `(out_features,)`, or None without DoRA."""
        return self._active().lora_magnitude

    @property
    def base_quantization(self):
        """The wrapped layer's Keras quantization mode (`"int8"`, `"int4"`), or None for a float base.

        Read from the wrapped layer each time: `model.quantize` on a wrapped model quantizes it in place.
        """
        return quantized.quantization_mode(self.wrapped)

    @property
    def lora_params(self):
        """Number of the active adapter's parameters: `rank * (in_features + out_features)`, plus `out_features` with DoRA."""
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.dora else 0)

    def _active(self):
        adapter = self._adapters.get(self.active_adapter)
        if adapter is None:
            # AttributeError, so `getattr(wrapper, "lora_A", None)` and keras' attribute walks
            # treat a layer without the active adapter as having none.
            raise AttributeError(
                f"LoRA layer {self.path or self.name!r} has no adapter {self.active_adapter!r}, the active one "
                f"(its adapters: {', '.join(self._adapters) or 'none'})"
            )
        return adapter

    # -- keras Layer API --------------------------------------------------------
    def build(self, input_shape=None):
        if not self.wrapped.built:
            if input_shape is None:
                raise ValueError(
                    f"{self.name}: the wrapped layer is not built, so build() needs an input shape; "
                    f"got input_shape={input_shape!r}"
                )
            self.wrapped.build(input_shape)
        self.in_features, self.out_features = self.matrix_shape(self.wrapped)
        self._wrapped_built()
        initial = _INITIAL_WEIGHTS.get()
        for i, adapter in enumerate(self._adapters.values()):
            _check_rank(adapter.rank, self.wrapped, self.in_features, self.out_features)
            if adapter.lora_A is None:
                # `from_weights`' arrays belong to the constructor's adapter, the first.
                self._create_variables(adapter, initial if i == 0 else None)
            dropout_layer = getattr(self, _dropout_attr(adapter.name), None)
            if dropout_layer is not None and not dropout_layer.built:
                dropout_layer.build(None)

    def _wrapped_built(self):
        """Called in `build` once the wrapped layer is built, before any adapter's variables exist."""

    def _base_linear(self, inputs):
        """The wrapped layer's output before its activation."""
        outputs = self._apply_kernel(inputs)
        if self.wrapped.bias is not None:
            outputs = ops.add(outputs, self.wrapped.bias)
        return outputs

    def call(self, inputs, training=None):
        adapter = self._adapters.get(self.active_adapter)
        if adapter is not None and adapter.dora and not self.merged and not self.disabled:
            outputs = self._dora_call(inputs, adapter, training)
        else:
            outputs = self._base_linear(inputs)
        if adapter is not None and not adapter.dora and not self.merged and not self.disabled:
            dropout_layer = getattr(self, _dropout_attr(adapter.name), None)
            x = inputs if dropout_layer is None else dropout_layer(inputs, training=training)
            outputs = ops.add(outputs, self._lora_delta(x, adapter))
        if self.wrapped.activation is not None:
            outputs = self.wrapped.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.wrapped.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        adapters = list(self._adapters.values())
        first = adapters[0].settings()
        config.update(
            {
                "layer": keras.layers.serialize(self.wrapped),
                "rank": first["rank"],
                "alpha": first["alpha"],
                "dropout": first["dropout"],
                "rslora": first["rslora"],
                "init": first["init"],
                "adapter_name": first["name"],
                **({"dora": True} if first.get("dora") else {}),
                "extra_adapters": [a.settings() for a in adapters[1:]],
                "active_adapter": self.active_adapter,
                "merged": self.merged,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = keras.layers.deserialize(config.pop("layer"))
        merged = config.pop("merged", False)
        extra = config.pop("extra_adapters", [])
        active = config.pop("active_adapter", None)
        token = _RESTORING.set(True)  # the kernel the file holds already has any residual
        try:
            wrapper = cls(layer, **config)
            for settings in extra:
                settings = dict(settings)
                wrapper.add_adapter(settings.pop("name"), **settings)
        finally:
            _RESTORING.reset(token)
        for adapter in wrapper._adapters.values():
            adapter.restored = True
        if active is not None:
            wrapper.set_adapter(active)
        wrapper.merged = bool(merged)
        return wrapper

    # -- merging ----------------------------------------------------------------
    def delta_weight(self, adapter_name=None):
        """An adapter's update `s * A.T @ B` in the wrapped kernel's layout (materialised: for merging).

        Args:
            adapter_name: str or None. The adapter; `None` for the active one.

        Returns:
            A tensor shaped like the wrapped layer's kernel.

        Raises:
            LoraConfigError: this layer has no such adapter.

        Example: see `unmerge`.
        """
        return self._delta_to_kernel_layout(self._matrix_delta(self.get_adapter(adapter_name)))

    def _matrix_delta(self, adapter):
        """`s * A.T @ B`, `(in_features, out_features)`."""
        return ops.multiply(ops.matmul(ops.transpose(adapter.lora_A), adapter.lora_B), adapter.scaling)

    # -- DoRA -------------------------------------------------------------------
    def kernel_matrix(self):
        """The wrapped kernel read as the `(in_features, out_features)` matrix (the inverse of its layout).

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 4))
        >>> tuple(LoRADense(dense, rank=1, alpha=1).kernel_matrix().shape)
        (4, 3)
        """
        raise NotImplementedError

    def _scale_to_output(self, scale):
        """An `(out_features,)` vector laid out to broadcast against the wrapped layer's output."""
        raise NotImplementedError

    def _dora_weight_norm(self, adapter):
        """`||W + s * A.T @ B||` over the input dim, `(out_features,)`: PEFT's `get_weight_norm`."""
        weight = ops.add(ops.cast(self.kernel_matrix(), "float32"), ops.cast(self._matrix_delta(adapter), "float32"))
        return ops.sqrt(ops.sum(ops.square(weight), axis=0))

    def _dora_call(self, inputs, adapter, training):
        """The DoRA layer's output before the activation, as PEFT's `DoraLinearLayer.forward`."""
        dropout_layer = getattr(self, _dropout_attr(adapter.name), None)
        base = self._apply_kernel(inputs)
        outputs = base if self.wrapped.bias is None else ops.add(base, self.wrapped.bias)
        if dropout_layer is not None and training:
            # PEFT: with dropout running, the magnitude's correction sees the dropped input too.
            x = dropout_layer(inputs, training=training)
            base = self._apply_kernel(x)
        else:
            x = inputs
        norm = ops.stop_gradient(self._dora_weight_norm(adapter))
        scale = ops.cast(ops.divide(adapter.lora_magnitude, norm), outputs.dtype)
        scale = self._scale_to_output(scale)
        correction = ops.multiply(ops.subtract(scale, ops.cast(1, scale.dtype)), base)
        return ops.add(ops.add(outputs, correction), ops.multiply(scale, self._lora_delta(x, adapter)))

    def merge(self):
        """Adds the active adapter's update into the wrapped kernel; `call` then skips the LoRA branch.

        A second call does nothing, and so does a layer without the active
        adapter. Example: see `unmerge`.

        Raises:
            LoraConfigError: the wrapped kernel is quantized (int8 / int4):
                the message says why lora3 does not merge into it and what
                to do (merge on the float base).
        """
        if self.merged or self.active_adapter not in self._adapters:
            return
        if self.base_quantization is not None:
            raise LoraConfigError(quantized.merge_refusal(self.path or self.name, self.base_quantization))
        kernel = self.wrapped._kernel  # the variable (`kernel` is a read-only property)
        adapter = self._active()
        if adapter.dora:
            # PEFT's merged DoRA weight: (m / ||W + s*dW||) * (W + s*dW), per output feature.
            norm = ops.stop_gradient(self._dora_weight_norm(adapter))
            factor = ops.divide(ops.cast(adapter.lora_magnitude, "float32"), norm)
            weight = ops.add(ops.cast(self.kernel_matrix(), "float32"), ops.cast(self._matrix_delta(adapter), "float32"))
            kernel.assign(ops.cast(self._delta_to_kernel_layout(ops.multiply(weight, factor)), kernel.dtype))
            self._dora_merge_norm[adapter.name] = norm
        else:
            kernel.assign(ops.add(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = True

    def unmerge(self):
        """Subtracts the merged update from the wrapped kernel again (undoes `merge`).

        Example:
        >>> import keras, numpy as np
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, use_bias=False)
        >>> dense.build((None, 4))
        >>> kernel = keras.ops.convert_to_numpy(dense.kernel)
        >>> lora = LoRADense(dense, rank=1, alpha=1)
        >>> _ = lora.lora_B.assign(np.ones((1, 3), "float32"))
        >>> delta = keras.ops.convert_to_numpy(lora.delta_weight())
        >>> lora.merge()
        >>> bool(np.allclose(keras.ops.convert_to_numpy(dense.kernel), kernel + delta))
        True
        >>> lora.unmerge()
        >>> bool(np.allclose(keras.ops.convert_to_numpy(dense.kernel), kernel, atol=1e-6))
        True
        """
        if not self.merged:
            return
        if self.base_quantization is not None:  # merged, then the base was quantized (model.quantize)
            raise LoraConfigError(quantized.merge_refusal(self.path or self.name, self.base_quantization))
        kernel = self.wrapped._kernel
        adapter = self._active()
        if adapter.dora:
            norm = self._dora_merge_norm.get(adapter.name)
            if norm is None:
                raise LoraConfigError(
                    f"DoRA adapter {adapter.name!r} of {self.path or self.name!r} was merged before this layer "
                    "was loaded: the weight norm it was merged with is unknown, so it cannot be unmerged"
                )
            factor = ops.divide(ops.cast(adapter.lora_magnitude, "float32"), norm)
            weight = ops.subtract(ops.divide(ops.cast(self.kernel_matrix(), "float32"), factor),
                                  ops.cast(self._matrix_delta(adapter), "float32"))
            kernel.assign(ops.cast(self._delta_to_kernel_layout(weight), kernel.dtype))
            del self._dora_merge_norm[adapter.name]
        else:
            kernel.assign(ops.subtract(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = False

    # -- helpers for subclasses ------------------------------------------------
    def _flat_lora_delta(self, x, adapter, n_contracted, out_shape_tail):
        """`s * (x @ A.T) @ B` of `adapter` on a 2-D `(tokens, in_features)` view of `x`.

        For inputs whose last `n_contracted` dims are the contracted ones (flattened in A's
        column order) and whose output is `x.shape[:-n_contracted] + out_shape_tail`. The same
        products as a 3-D `dot_general`, but XLA's CPU backend runs the thin rank-r matmuls
        (and their gradients, which contract over batch and time) several times faster in 2-D,
        and the products contracting the rank faster still unrolled (`lora3.layers.low_rank`).
        The thin `(tokens, rank)` intermediate is scaled, not the wide output.
        """
        lead = ops.shape(x)[: len(x.shape) - n_contracted]
        x2 = ops.reshape(x, (-1, self.in_features))
        hidden = ops.multiply(low_rank.project(x2, adapter.lora_A), ops.cast(adapter.scaling, x.dtype))
        delta = low_rank.expand(hidden, adapter.lora_B)
        return ops.reshape(delta, tuple(lead) + tuple(out_shape_tail))


class restoring:
    """A context in which new LoRA layers skip PiSSA/OLoRA's rewrite of the kernel (a file's weights follow).

    `lora3.load_model` replays a `.keras` file's surgery on a freshly built model, whose kernels
    the file then overwrites with the residuals it holds: running the init there would cost an
    SVD per layer and record initial factors of random kernels. Adapters made here have
    `initial_factors=None` (unknown).

    Example:
    >>> import keras
    >>> from lora3.layers import LoRADense
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> with restoring():
    ...     lora = LoRADense(dense, rank=2, alpha=2, init="pissa")
    >>> lora.get_adapter().initial_factors is None
    True
    """

    def __enter__(self):
        self._token = _RESTORING.set(True)
        return self

    def __exit__(self, *exc):
        _RESTORING.reset(self._token)


def _dropout_attr(adapter_name):
    """The wrapper attribute holding an adapter's Dropout layer (`lora_dropout` for the default one)."""
    return "lora_dropout" + variable_suffix(adapter_name)


class _unlocked:
    """Unlocks a built layer's tracker for a block (Keras locks it at build), then locks it again."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.was_locked = self.layer._tracker.locked
        self.layer._tracker.unlock()

    def __exit__(self, *exc):
        if self.was_locked:
            self.layer._tracker.lock()


def _check_dora(dora):
    if not isinstance(dora, bool):
        raise LoraConfigError(f"dora must be true or false, got dora={dora!r}")


def _check_float_kernel(layer, init):
    """PiSSA/OLoRA write a float residual into the kernel: refused on a quantized one (as PEFT)."""
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise LoraConfigError(
            f"init={init!r} rewrites the kernel of {layer.path or layer.name!r}, which is quantized "
            f"(quantization_mode={mode!r}); initialise on the float model, then quantize the residual model")


def _check_rank(rank, layer, in_features, out_features):
    max_rank = min(in_features, out_features)
    if rank > max_rank:
        raise LoraConfigError(
            f"rank={rank} is larger than layer {layer.path or layer.name!r} allows "
            f"(in_features={in_features}, out_features={out_features}: rank must be <= {max_rank})"
        )


def _constant(value, shape):
    """An initializer returning `value`, refused (naming both shapes) unless it is `shape`."""
    if tuple(value.shape) != tuple(shape):
        raise LoraConfigError(f"initial LoRA weight has shape {tuple(value.shape)}, the layer needs {tuple(shape)}")

    def initializer(shape, dtype=None):
        return ops.cast(value, dtype) if dtype is not None else value

    return initializer
