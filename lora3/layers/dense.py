"""`LoRADense`: LoRA around a built `keras.layers.Dense`."""

import keras
from keras import ops

from lora3.layers.base import LoRALayer


@keras.saving.register_keras_serializable(package="lora3")
class LoRADense(LoRALayer):
    """LoRA on a `Dense`: `y = act(x @ W + b + s * (dropout(x) @ A.T) @ B)`.

    `A` is `(rank, in_features)` (PEFT's layout), `B` is `(rank, out_features)`; `B` starts at
    zero, so a fresh wrapper leaves the layer's output unchanged. The LoRA term
    is added before the wrapped layer's activation (T5's FFN `input_projector`
    carries a GELU inside its Dense).

    Example:
    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(8, use_bias=False)
    >>> dense.build((None, 4))
    >>> lora = LoRADense(dense, rank=2, alpha=4)
    >>> x = np.ones((3, 4), "float32")
    >>> bool(np.allclose(lora(x), dense(x)))
    True
    >>> [v.path for v in lora.trainable_weights]
    ['dense/lora_A', 'dense/lora_B']
    """

    wrapped_class = keras.layers.Dense

    @property
    def in_features(self):
        return int(self.wrapped.kernel.shape[0])

    @property
    def out_features(self):
        return int(self.wrapped.kernel.shape[1])

    def _base_linear(self, inputs):
        y = ops.matmul(inputs, self.wrapped.kernel)
        if self.wrapped.bias is not None:
            y = ops.add(y, self.wrapped.bias)
        return y

    def _apply_a(self, inputs, a):
        return ops.matmul(inputs, a)

    def _apply_b(self, hidden, b):
        return ops.matmul(hidden, b)

    def _delta_to_kernel_layout(self, delta):
        return delta

    def _lora_delta(self, x):
        # Thin products on the 2-D (tokens, in_features) view: same math, faster gradients.
        return self._flat_lora_delta(x, 1, (self.out_features,))
