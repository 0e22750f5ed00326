"""`LoRADense`: LoRA around a built `keras.layers.Dense`."""

import keras
from keras import ops

import lora3.layers.quantized as quantized
from lora3.layers.lora_layer import LoRALayer


@keras.saving.register_keras_serializable(package="lora3")
class LoRADense(LoRALayer):
    """LoRA on a `Dense`: `y = activation(x @ W + b + s * (dropout(x) @ A.T) @ B)`.

    The kernel `W` is `(in_features, out_features)` already, so the matrix
    view is the kernel itself. `A` is `(rank, in_features)` (PEFT's layout),
    `B` is `(rank, out_features)` and starts at zero, so a fresh wrapper
    leaves the layer's output unchanged. The LoRA term is added before the
    wrapped layer's activation (T5's FFN `input_projector` carries a GELU
    inside its Dense). Inputs may have any rank >= 2: the LoRA products run
    on the 2-D `(tokens, in_features)` view.

    Args:
        layer: the `keras.layers.Dense` to wrap (frozen by the wrapper).
        rank: int. Rank of the update, at most `min(in_features, out_features)`.
        alpha: float. Scaling numerator: `scaling = alpha / rank`.
        dropout: float. Dropout rate on the LoRA branch's input, in `[0, 1)`.
        rslora: bool. Rank-stabilised scaling `alpha / sqrt(rank)`.
        init: str. `"kaiming"` or `"gaussian"`: the initialiser of `A`.
        adapter_name: str. The name of this first adapter (see `LoRALayer`).
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:
    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(8, use_bias=False, name="proj")
    >>> dense.build((None, 4))
    >>> lora = LoRADense(dense, rank=2, alpha=4)
    >>> x = np.ones((3, 4), "float32")
    >>> bool(np.allclose(lora(x), dense(x)))
    True
    >>> [v.path for v in lora.trainable_weights]
    ['proj/lora_A', 'proj/lora_B']
    >>> tuple(lora.lora_A.shape), tuple(lora.lora_B.shape)
    ((2, 4), (2, 8))
    """

    wrapped_class = keras.layers.Dense

    @classmethod
    def matrix_shape(cls, layer):
        """`(in_features, out_features)`: the kernel's own shape.

        Args:
            layer: a built `keras.layers.Dense`.

        Example:
        >>> import keras
        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 5))
        >>> LoRADense.matrix_shape(dense)
        (5, 3)
        """
        in_features, out_features = (int(d) for d in layer.kernel.shape)
        return in_features, out_features

    def _apply_kernel(self, inputs):
        if self.base_quantization is not None:
            return quantized.kernel_product(self.wrapped, inputs)  # Keras' int8/int4 compute
        return ops.matmul(inputs, self.wrapped.kernel)

    def _lora_delta(self, x, adapter):
        return self._flat_lora_delta(x, adapter, 1, (self.out_features,))

    def _delta_to_kernel_layout(self, delta):
        return delta

    def kernel_matrix(self):
        """The kernel itself, `(in_features, out_features)`.

        Example:
        >>> import keras
        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 4))
        >>> tuple(LoRADense(dense, rank=1, alpha=1).kernel_matrix().shape)
        (4, 3)
        """
        if self.base_quantization is not None:
            return quantized.dequantized_kernel(self.wrapped, self.compute_dtype)
        return self.wrapped.kernel

    def _scale_to_output(self, scale):
        return scale
