"""`LoRALayer`: the part of a LoRA wrapper that does not depend on the wrapped layer's type.

A wrapper holds a *built* `Dense`/`EinsumDense` (frozen) and two trainable
matrices, `lora_A: (rank, in_features)` and `lora_B: (rank, out_features)`:

    y = activation(base_linear(x) + s * (dropout(x) @ A.T) @ B),   s = alpha / rank
                                                                  (alpha / sqrt(rank) with rslora)

so the weight update is `s * A.T @ B` in the `(in_features, out_features)` view.
`A` is stored `(rank, in_features)`, as PEFT stores `lora_A.weight`, because its
gradient `dh.T @ x` (a contraction over tokens) then comes out rank-major: XLA's
CPU backend computes a `(rank, in)` result about 2.5x faster than the same
product laid out `(in, rank)` (experiments/benchmarks/thin_dots.py). Adapter
files keep the matrix view `(in_features, rank)` (see `lora3.adapters`).

The low-rank path is two thin products, so training never materialises the
full-size `A.T @ B` and never computes a gradient for the frozen kernel.
A subclass names the keras class it wraps (`wrapped_class`) and says how its
kernel reads as a matrix (`matrix_shape`), how to run the wrapped layer without
its activation (`_base_linear`), how to apply A and B to an input
(`_lora_delta`), and how the `(in_features, out_features)` matrix maps to the
kernel's layout (`_delta_to_kernel_layout`).
"""

import contextvars
import math

import keras
from keras import ops

from lora3.config import check_init, check_scale, scaling
from lora3.errors import LoraConfigError

# `(A, B)` arrays that `from_weights` hands to the `build` its constructor runs, so the
# variables are created once from them (adapter loading), not drawn and then overwritten.
_INITIAL_WEIGHTS = contextvars.ContextVar("lora3_initial_weights", default=None)


class LoRALayer(keras.layers.Layer):
    """Base class of the LoRA wrappers `LoRADense` and `LoRAEinsumDense`.

    The wrapper takes the wrapped layer's name and dtype policy, freezes it,
    and adds two trainable weights, `lora_A` `(rank, in_features)` and
    `lora_B` `(rank, out_features)`, whose product (times `scaling`) is added
    to the wrapped layer's output before its activation. When the wrapped
    layer is already built the wrapper is built at once, under the wrapped
    layer's parent path, so `wrapper.path == layer.path` and the LoRA weights
    live at `<layer.path>/lora_A` and `<layer.path>/lora_B`.

    Args:
        layer: the `keras.layers.Dense` / `keras.layers.EinsumDense` to wrap
            (the subclass's `wrapped_class`). It must not be quantized nor
            have Keras' own LoRA enabled.
        rank: int. Rank of the update, at most `min(in_features, out_features)`.
        alpha: float. Scaling numerator: `scaling = alpha / rank`.
        dropout: float. Dropout rate on the LoRA branch's input, in `[0, 1)`.
            The frozen path always sees the undropped input.
        rslora: bool. Rank-stabilised scaling `alpha / sqrt(rank)`.
        init: str. Initialiser of `lora_A`: `"kaiming"` (PEFT's default,
            `U(-1/sqrt(in), 1/sqrt(in))`) or `"gaussian"` (std `1/rank`).
            `lora_B` starts at zero, so a fresh wrapper changes nothing.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`).

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

    def __init__(self, layer, rank, alpha, dropout=0.0, rslora=False, init="kaiming", **kwargs):
        self._check_kind(layer)
        check_scale(rank, alpha, dropout)
        check_init(init)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        self.wrapped = layer
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.init = init
        # True once `merge()` has added the update into the wrapped kernel: `call` then skips
        # the LoRA branch. Not a constructor argument; `from_config` restores it.
        self.merged = False
        self.lora_dropout = keras.layers.Dropout(dropout, name="lora_dropout") if dropout > 0 else None
        # The wrapped layer is frozen: only A and B train.
        layer.trainable = False
        if layer.built:
            # Build under the wrapped layer's parent path, so `lora_A` lives at
            # `<layer.path>/lora_A` and adapters are keyed by the original path.
            path = layer.path or layer.name
            self._parent_path = path.rsplit("/", 1)[0] if "/" in path else ""
            self.build()

    @classmethod
    def from_weights(cls, layer, lora_A, lora_B, alpha, dropout=0.0, rslora=False, init="kaiming", **kwargs):
        """A wrapper whose `lora_A` and `lora_B` are created from arrays instead of drawn.

        The variables are created once, from these values (adapter loading:
        nothing is drawn and then overwritten, so a large adapter costs its
        own size in memory, not twice that). The rank is `lora_A`'s first
        dimension.

        Args:
            layer: the built layer to wrap (see the class).
            lora_A: array `(rank, in_features)`.
            lora_B: array `(rank, out_features)`.
            alpha, dropout, rslora, init, **kwargs: as for the constructor
                (`init` is only recorded: A is not drawn).

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
        token = _INITIAL_WEIGHTS.set((lora_A, lora_B))
        try:
            return cls(layer, int(lora_A.shape[0]), alpha, dropout, rslora, init, **kwargs)
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

    def _base_linear(self, inputs):
        """The wrapped layer's output before its activation."""
        raise NotImplementedError

    def _lora_delta(self, x):
        """`s * (x @ A.T) @ B` in the wrapped layer's output layout."""
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
            LoraConfigError: the layer has the wrong type, is quantized, has
                Keras' own LoRA enabled, or is too small for `rank`.

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
        if getattr(layer, "quantization_mode", None) is not None:
            raise LoraConfigError(
                f"layer {name!r} is quantized (quantization_mode={layer.quantization_mode!r}); "
                "lora3 adapts float layers only"
            )

    # -- keras Layer API --------------------------------------------------------
    @property
    def scaling(self):
        """The factor `s` of the update: `alpha / rank`, or `alpha / sqrt(rank)` with rslora."""
        return scaling(self.rank, self.alpha, self.rslora)

    @property
    def lora_params(self):
        """Number of LoRA parameters: `rank * (in_features + out_features)`."""
        return self.rank * (self.in_features + self.out_features)

    def build(self, input_shape=None):
        if not self.wrapped.built:
            if input_shape is None:
                raise ValueError(
                    f"{self.name}: the wrapped layer is not built, so build() needs an input shape; "
                    f"got input_shape={input_shape!r}"
                )
            self.wrapped.build(input_shape)
        self.in_features, self.out_features = self.matrix_shape(self.wrapped)
        _check_rank(self.rank, self.wrapped, self.in_features, self.out_features)
        a_shape, b_shape = (self.rank, self.in_features), (self.rank, self.out_features)
        initial = _INITIAL_WEIGHTS.get()
        if initial is not None:
            a_init, b_init = _constant(initial[0], a_shape), _constant(initial[1], b_shape)
        elif self.init == "kaiming":
            # PEFT's default: kaiming_uniform(a=sqrt(5)) on its (rank, in) weight,
            # i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(self.in_features)
            a_init, b_init = keras.initializers.RandomUniform(-bound, bound), "zeros"
        else:
            a_init, b_init = keras.initializers.RandomNormal(stddev=1.0 / self.rank), "zeros"
        self.lora_A = self.add_weight(name="lora_A", shape=a_shape, initializer=a_init, trainable=True)
        self.lora_B = self.add_weight(name="lora_B", shape=b_shape, initializer=b_init, trainable=True)
        if self.lora_dropout is not None and not self.lora_dropout.built:
            self.lora_dropout.build(None)

    def call(self, inputs, training=None):
        outputs = self._base_linear(inputs)
        if not self.merged:
            x = inputs if self.lora_dropout is None else self.lora_dropout(inputs, training=training)
            outputs = ops.add(outputs, self._lora_delta(x))
        if self.wrapped.activation is not None:
            outputs = self.wrapped.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.wrapped.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layer": keras.layers.serialize(self.wrapped),
                "rank": self.rank,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "rslora": self.rslora,
                "init": self.init,
                "merged": self.merged,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = keras.layers.deserialize(config.pop("layer"))
        merged = config.pop("merged", False)
        wrapper = cls(layer, **config)
        wrapper.merged = bool(merged)
        return wrapper

    # -- merging ----------------------------------------------------------------
    def delta_weight(self):
        """The update `s * A.T @ B` in the wrapped kernel's layout (materialised: for merging).

        Returns:
            A tensor shaped like the wrapped layer's kernel.

        Example: see `unmerge`.
        """
        delta = ops.multiply(ops.matmul(ops.transpose(self.lora_A), self.lora_B), self.scaling)
        return self._delta_to_kernel_layout(delta)

    def merge(self):
        """Adds the update into the wrapped kernel; `call` then skips the LoRA branch.

        A second call does nothing. Example: see `unmerge`.
        """
        if self.merged:
            return
        kernel = self.wrapped._kernel  # the variable (`kernel` is a read-only property)
        kernel.assign(ops.add(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = True

    def unmerge(self):
        """Subtracts the update from the wrapped kernel again (undoes `merge`).

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
        kernel = self.wrapped._kernel
        kernel.assign(ops.subtract(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = False

    # -- helpers for subclasses ------------------------------------------------
    def _flat_lora_delta(self, x, n_contracted, out_shape_tail):
        """`s * (x @ A.T) @ B` on a 2-D `(tokens, in_features)` view of `x`.

        For inputs whose last `n_contracted` dims are the contracted ones (flattened in A's
        column order) and whose output is `x.shape[:-n_contracted] + out_shape_tail`. The same
        products as a 3-D `dot_general`, but XLA's CPU backend runs the thin rank-r matmuls
        (and their gradients, which contract over batch and time) several times faster in 2-D.
        The thin `(tokens, rank)` intermediate is scaled, not the wide output.
        """
        lead = ops.shape(x)[: len(x.shape) - n_contracted]
        x2 = ops.reshape(x, (-1, self.in_features))
        hidden = ops.multiply(ops.matmul(x2, ops.transpose(self.lora_A)), ops.cast(self.scaling, x.dtype))
        delta = ops.matmul(hidden, self.lora_B)
        return ops.reshape(delta, tuple(lead) + tuple(out_shape_tail))


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
