"""The part of a LoRA wrapper that does not depend on the wrapped layer's type.

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
Subclasses say how to run the wrapped layer without its activation
(`_base_linear`), how to apply A and B to an input (`_apply_a`, `_apply_b`),
and how the `(in_features, out_features)` matrix maps to the kernel's layout
(`_delta_to_kernel_layout`).
"""

import math

import keras
from keras import ops

from lora3.errors import LoraConfigError

INITS = ("kaiming", "gaussian")


class LoRALayer(keras.layers.Layer):
    """Base class of `LoRADense` and `LoRAEinsumDense`; not used directly."""

    wrapped_class = None  # the keras layer class a subclass wraps

    def __init__(
        self,
        layer,
        rank,
        alpha,
        dropout=0.0,
        rslora=False,
        init="kaiming",
        merged=False,
        initial_weights=None,
        **kwargs,
    ):
        if not isinstance(layer, self.wrapped_class):
            raise LoraConfigError(
                f"{type(self).__name__} wraps a keras.layers.{self.wrapped_class.__name__}, "
                f"got {type(layer).__name__} ({getattr(layer, 'path', None) or layer.name!r})"
            )
        if getattr(layer, "lora_enabled", False):
            raise LoraConfigError(
                f"layer {layer.path!r} has Keras' own LoRA enabled (enable_lora); "
                "use lora3 on a model without it"
            )
        if getattr(layer, "quantization_mode", None) is not None:
            raise LoraConfigError(
                f"layer {layer.path!r} is quantized ({layer.quantization_mode}); "
                "lora3 adapts float layers only"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise LoraConfigError(f"rank must be a positive integer, got rank={rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise LoraConfigError(f"alpha must be a positive number, got alpha={alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise LoraConfigError(f"dropout must be in [0, 1), got dropout={dropout!r}")
        if init not in INITS:
            raise LoraConfigError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        self.wrapped = layer
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.init = init
        self.merged = bool(merged)
        self.lora_dropout = keras.layers.Dropout(dropout, name="lora_dropout") if dropout > 0 else None
        # `(A, B)` arrays, shaped like the variables (`(rank, in)`, `(rank, out)`), to build
        # with instead of the initializers (adapter loading: the variables are created once,
        # from the file, not drawn and then overwritten).
        self._initial_weights = initial_weights
        # The wrapped layer is frozen: only A and B train.
        layer.trainable = False
        if layer.built:
            # Keep the wrapped layer's path, so `lora_A` lives at
            # `<layer.path>/lora_A` and adapters are keyed by the original path.
            path = layer.path or layer.name
            self._parent_path = path.rsplit("/", 1)[0] if "/" in path else ""
            self.build()

    # -- shape logic, per wrapped type -------------------------------------
    @property
    def in_features(self):
        raise NotImplementedError

    @property
    def out_features(self):
        raise NotImplementedError

    def _base_linear(self, inputs):
        """The wrapped layer's output before its activation."""
        raise NotImplementedError

    def _apply_a(self, inputs, a):
        """`inputs` times `a`, an `(in_features, rank)` matrix (the transpose of `lora_A`)."""
        raise NotImplementedError

    def _apply_b(self, hidden, b):
        raise NotImplementedError

    def _delta_to_kernel_layout(self, delta):
        """Reshape/transpose an `(in_features, out_features)` matrix to the kernel's layout."""
        raise NotImplementedError

    def _lora_delta(self, x):
        """`s * (x @ A) @ B` in the wrapped layer's output layout.

        Subclasses may compute it on a 2-D `(tokens, features)` view of `x` (see
        `_flat_lora_delta`): the same products, but XLA's CPU backend runs the thin
        rank-r matmuls of a 3-D `dot_general` (and their gradients, which contract over
        batch and time) several times slower than the 2-D ones.
        """
        # Scale the thin (..., rank) intermediate, not the wide output.
        hidden = ops.multiply(self._apply_a(x, ops.transpose(self.lora_A)), ops.cast(self.scaling, x.dtype))
        return self._apply_b(hidden, self.lora_B)

    def _flat_lora_delta(self, x, n_contracted, out_shape_tail):
        """`_lora_delta` for inputs whose last `n_contracted` dims are the contracted ones
        (flattened in A's row order) and whose output is `x.shape[:-n_contracted] + out_shape_tail`."""
        lead = ops.shape(x)[: len(x.shape) - n_contracted]
        x2 = ops.reshape(x, (-1, self.in_features))
        hidden = ops.multiply(ops.matmul(x2, ops.transpose(self.lora_A)), ops.cast(self.scaling, x.dtype))
        delta = ops.matmul(hidden, self.lora_B)
        return ops.reshape(delta, tuple(lead) + tuple(out_shape_tail))

    # -- keras Layer API ----------------------------------------------------
    @property
    def scaling(self):
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def build(self, input_shape=None):
        if not self.wrapped.built:
            if input_shape is None:
                raise ValueError(f"{self.name}: build() needs an input shape when the wrapped layer is not built")
            self.wrapped.build(input_shape)
        max_rank = min(self.in_features, self.out_features)
        if self.rank > max_rank:
            raise LoraConfigError(
                f"rank={self.rank} is larger than layer {self.wrapped.path!r} allows "
                f"(in_features={self.in_features}, out_features={self.out_features}: "
                f"rank must be <= {max_rank})"
            )
        if self.init == "kaiming":
            # PEFT's default: kaiming_uniform(a=sqrt(5)) on its (rank, in) weight,
            # i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(self.in_features)
            a_init = keras.initializers.RandomUniform(-bound, bound)
        else:
            a_init = keras.initializers.RandomNormal(stddev=1.0 / self.rank)
        b_init = "zeros"
        if self._initial_weights is not None:
            a_value, b_value = self._initial_weights
            self._initial_weights = None  # do not keep the arrays alive
            a_init, b_init = _constant(a_value), _constant(b_value)
        self.lora_A = self.add_weight(
            name="lora_A", shape=(self.rank, self.in_features), initializer=a_init, trainable=True
        )
        self.lora_B = self.add_weight(
            name="lora_B", shape=(self.rank, self.out_features), initializer=b_init, trainable=True
        )
        if self.lora_dropout is not None and not self.lora_dropout.built:
            self.lora_dropout.build(None)

    def call(self, inputs, training=None):
        y = self._base_linear(inputs)
        if not self.merged:
            x = inputs
            if self.lora_dropout is not None:
                x = self.lora_dropout(x, training=training)
            y = ops.add(y, self._lora_delta(x))
        activation = self.wrapped.activation
        if activation is not None:
            y = activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self.wrapped.compute_output_shape(input_shape)

    # -- merging ------------------------------------------------------------
    def delta_weight(self):
        """`s * A.T @ B` in the kernel's layout (materialised: for merging only)."""
        delta = ops.multiply(ops.matmul(ops.transpose(self.lora_A), self.lora_B), self.scaling)
        return self._delta_to_kernel_layout(delta)

    def _kernel_variable(self):
        return self.wrapped._kernel

    def merge(self):
        """Add `s * A.T @ B` into the wrapped kernel; the LoRA path is then skipped."""
        if self.merged:
            return
        kernel = self._kernel_variable()
        kernel.assign(ops.add(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = True

    def unmerge(self):
        """Subtract `s * A.T @ B` from the wrapped kernel again."""
        if not self.merged:
            return
        kernel = self._kernel_variable()
        kernel.assign(ops.subtract(kernel, ops.cast(self.delta_weight(), kernel.dtype)))
        self.merged = False

    @property
    def lora_params(self):
        return self.rank * (self.in_features + self.out_features)

    # -- serialisation ------------------------------------------------------
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
        config["layer"] = keras.layers.deserialize(config["layer"])
        return cls(**config)


def _constant(value):
    """An initializer that returns `value` (checked against the requested shape)."""

    def initializer(shape, dtype=None):
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"initial LoRA weight has shape {tuple(value.shape)}, the layer needs {tuple(shape)}")
        return ops.cast(value, dtype) if dtype is not None else value

    return initializer
