"""LoRA over Keras' own int8 / int4 quantized `Dense` and `EinsumDense` (QLoRA-style).

`layer.quantize("int8")` (or `model.quantize("int8")`) replaces a layer's float kernel by an
int8 one and a float `kernel_scale` (absmax per output channel); `"int4"` packs two 4-bit
values per byte, per channel or, with `keras.quantizers.Int4QuantizationConfig(block_size=...)`,
per group of input rows with a zero point. These variables are not trainable. A lora3 wrapper
over such a layer runs the frozen path through Keras' own quantized compute (`quantized_call`:
int8 inputs times int8 kernel for int8, with Keras' custom gradient for the inputs), never a
dequantized copy of the kernel, and keeps its LoRA branch (A, B, DoRA's magnitude) in the
compute dtype. This is QLoRA's recipe (Dettmers et al. 2023, arXiv:2305.14314) without its
4-bit NormalFloat, which Keras does not have.

Only DoRA's weight norm and `kernel_matrix()` read the dequantized kernel (`dequantized_kernel`),
as PEFT dequantizes a bitsandbytes weight for DoRA.
"""

import keras
from keras import ops

from lora3.errors import LoraConfigError

# The quantization modes a lora3 wrapper runs over (Keras' float8, GPTQ and AWQ are refused).
SUPPORTED_MODES = ("int8", "int4")


def quantization_mode(layer):
    """The layer's Keras quantization mode (`"int8"`, `"int4"`, ...), or None for a float layer.

    Example:
    >>> import keras
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> quantization_mode(dense) is None
    True
    >>> dense.quantize("int8")
    >>> quantization_mode(dense)
    'int8'
    """
    return getattr(layer, "quantization_mode", None)


def check_quantization(layer, name):
    """Refuses a layer quantized in a mode lora3 does not run over (naming the mode and those it runs over).

    Example:
    >>> import keras
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> dense.quantize("float8")
    >>> check_quantization(dense, "proj")
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: layer 'proj' is quantized with quantization_mode='float8'; ...
    """
    mode = quantization_mode(layer)
    if mode is not None and mode not in SUPPORTED_MODES:
        raise LoraConfigError(
            f"layer {name!r} is quantized with quantization_mode={mode!r}; lora3 adapts float layers and "
            f"Keras' {' and '.join(SUPPORTED_MODES)} quantized ones (layer.quantize('int8') / model.quantize('int8'))"
        )


def float_policy(layer):
    """The dtype policy a wrapper of `layer` takes: the layer's own, or its float source if it is quantized.

    A quantized policy (`"int8_from_float32"`) on the wrapper would make Keras route the wrapper's
    own call to `quantized_call`; the LoRA branch computes in the source policy's dtypes.

    Example:
    >>> import keras
    >>> dense = keras.layers.Dense(3, dtype="mixed_bfloat16")
    >>> dense.build((None, 4))
    >>> dense.quantize("int8")
    >>> float_policy(dense).name
    'mixed_bfloat16'
    """
    policy = layer.dtype_policy
    if getattr(policy, "quantization_mode", None) is None:
        return policy
    # From its dtypes, not its name: a quantized policy met on a reloaded layer had name=None here.
    compute, variable = policy.compute_dtype, policy.variable_dtype
    return keras.DTypePolicy(compute if compute == variable else f"mixed_{compute}")


def kernel_product(layer, inputs, training=None):
    """Keras' own quantized product of `layer` with `inputs`, before its bias and activation.

    Keras' `_int8_call` / `_int4_call` add the bias and apply the activation after the quantized
    product; the wrapper must add its LoRA term in between, so they are hidden from Keras' call
    for its duration (Python attributes read when the call is traced, put back at once).

    Example:
    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(3, activation="relu")
    >>> dense.build((None, 4))
    >>> dense.quantize("int8")
    >>> x = np.ones((2, 4), "float32")
    >>> y = keras.ops.add(kernel_product(dense, x), dense.bias)
    >>> bool(np.allclose(keras.ops.relu(y), dense(x)))
    True
    """
    hidden = {"bias": layer.bias, "activation": layer.activation}
    for attr in hidden:
        object.__setattr__(layer, attr, None)  # bypasses keras' attribute tracking: nothing is (un)tracked
    try:
        return layer.quantized_call(inputs, training=training)
    finally:
        for attr, value in hidden.items():
            object.__setattr__(layer, attr, value)


def dequantized_kernel(layer, dtype="float32"):
    """The float kernel an int8 / int4 layer computes with, in the layer's kernel layout.

    The inverse of Keras' `quantize` as its own gradient functions compute it: the int8 kernel
    divided by `kernel_scale`; int4 unpacked first, and with a zero point per group for
    sub-channel int4. Materialises the full kernel: for DoRA's norm and `kernel_matrix()` only.

    Example:
    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> w = keras.ops.convert_to_numpy(dense.kernel)
    >>> dense.quantize("int8")
    >>> bool(np.allclose(dequantized_kernel(dense), w, atol=np.abs(w).max() / 127))
    True
    """
    mode = quantization_mode(layer)
    einsum = isinstance(layer, keras.layers.EinsumDense)
    stored = layer._kernel
    if mode == "int8":
        scale = layer._adjust_scale_for_dequant(layer.kernel_scale) if einsum else layer.kernel_scale
        return ops.divide(ops.cast(stored, dtype), ops.cast(scale, dtype))
    if mode != "int4":
        raise LoraConfigError(f"layer {layer.path or layer.name!r}: no dequantization for quantization_mode={mode!r}")
    columns = layer._int4_unpacked_column_size if einsum else layer._orig_output_dim
    unpacked = ops.cast(keras.quantizers.unpack_int4(stored, columns, axis=-1, dtype="int8"), dtype)
    scale = ops.cast(layer.kernel_scale, dtype)
    if getattr(layer, "kernel_zero", None) is None:  # per channel: one scale per column
        matrix = ops.divide(unpacked, scale)
    else:  # sub-channel: (q - zero) * scale of each row's group (Keras' dequantize_with_sz_map)
        groups = ops.cast(layer.g_idx, "int32")
        zero = ops.cast(ops.take(layer.kernel_zero, groups, axis=0), dtype)
        matrix = ops.multiply(ops.subtract(unpacked, zero), ops.take(scale, groups, axis=0))
    return ops.reshape(matrix, layer.original_kernel_shape) if einsum else matrix


def merge_refusal(path, mode):
    """The message `merge` / `merge_and_unload` refuse a quantized base with (why, and what to do)."""
    return (
        f"layer {path!r} has a {mode}-quantized kernel (Keras' quantize): merging the LoRA update into it "
        f"would re-quantize W + s*A@B to {mode} and lose most of the update, so lora3 does not merge it. "
        "Save the adapter (lora3.save_adapter), load it onto the float base model (lora3.load_adapter reads "
        "it whatever the base's precision) and merge there; quantize the merged model afterwards if you need to"
    )


def differentiable_head(layer):
    """Makes a quantized tied output head (`ReversibleEmbedding`) pass its gradient; True if it changed.

    Keras' int8 / int4 `ReversibleEmbedding(..., reverse=True)` quantizes its inputs per token
    (`inputs_quantizer`: round and cast to int8) and, unlike its `Dense` / `EinsumDense`, has no
    custom gradient: the gradient that reaches the hidden states flows through the activation
    scale alone, not through the product, so every layer below the head trains on a wrong
    gradient (measured on Gemma 3 270M with an int8 base: LoRA's training loss rose from 2.4 to
    7.9 in 200 steps). Without its inputs quantizer the head is weight-only: float inputs times
    the int8 (or unpacked int4) kernel, divided by the kernel's scale, which autodiff
    differentiates exactly (the gradient Keras' `Dense` computes by hand). The logits move by the
    activation rounding only (a closer match to the float model). Frozen variables are untouched;
    a reloaded `.keras` model gets Keras' quantizer back.

    Example:
    >>> import keras, numpy as np
    >>> emb = keras.layers.ReversibleEmbedding(20, 8)
    >>> emb.build((None,))
    >>> emb.quantize("int8")
    >>> differentiable_head(emb), emb.inputs_quantizer is None
    (True, True)
    >>> differentiable_head(keras.layers.Dense(3))
    False
    """
    if quantization_mode(layer) not in SUPPORTED_MODES or not isinstance(layer, keras.layers.ReversibleEmbedding):
        return False
    if getattr(layer, "inputs_quantizer", None) is None:
        return False
    layer.inputs_quantizer = None
    return True
