"""Fused attention for keras-hub's T5: `keras.ops.dot_product_attention` in place of its three steps.

keras-hub's `T5MultiHeadAttention` computes attention as an einsum for the scores, a separate
softmax and a second einsum: the `(batch, heads, queries, keys)` scores and probabilities travel
through memory several times in the forward pass and again in the backward pass. On a GPU that
traffic, not the matrix products, is much of a step's time at 512 tokens (see
`experiments/benchmarks/gpu/`). `keras.ops.dot_product_attention` computes the same thing in one
op, which Keras hands to cuDNN's flash attention on an NVIDIA GPU (JAX) and to the plain
computation elsewhere, so the result is the same on every backend and device.

`fuse_attention(model)` switches every T5 attention layer of a model (self- and cross-attention,
encoder and decoder) to that op. What stays as keras-hub wrote it: the relative position bias and
the masks (built the same way and folded into one additive bias, which the layer still passes on to
the next one), the projections (LoRA-wrapped or not), cached decoding (`generate()` runs keras-hub's
own code) and dropout on the attention probabilities (a layer with attention dropout in training
runs keras-hub's code: the fused op has none).

Example:
>>> import keras_hub
>>> backbone = keras_hub.models.T5Backbone(vocabulary_size=50, num_layers=1, num_heads=2,
...     hidden_dim=8, intermediate_dim=16, key_value_dim=4)
>>> fuse_attention(backbone)
['transformer_encoder_layer_0/self_attention', 'transformer_decoder_layer_0/cross_attention', \
'transformer_decoder_layer_0/self_attention']
"""

from __future__ import annotations

import numpy as np
from keras import ops


def _is_t5_attention(layer) -> bool:
    # By class name, so that importing this module needs no keras-hub import.
    return type(layer).__name__ == "T5MultiHeadAttention" and hasattr(layer, "compute_bias")


def _fused_call(layer, original):
    """`layer.call` with the scores, softmax and weighted sum as one `dot_product_attention`."""

    def call(hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None,
             cache_update_index=None, training=False):
        if cache is not None or cache_update_index is not None or (training and layer.dropout_layer.rate > 0):
            return original(hidden_states, mask=mask, key_value_states=key_value_states,
                            position_bias=position_bias, cache=cache,
                            cache_update_index=cache_update_index, training=training)
        batch_size, seq_length = ops.shape(hidden_states)[:2]

        def heads(states):  # (batch, length, dim) -> (batch, length, heads, head_dim)
            return ops.reshape(states, (batch_size, -1, layer.num_heads, layer.key_value_dim))

        source = hidden_states if key_value_states is None else key_value_states
        query = heads(layer.query_projector(hidden_states))
        key = heads(layer.key_projector(source))
        value = heads(layer.value_projector(source))
        key_length = ops.shape(key)[1]
        # The bias exactly as keras-hub builds it (and passes it on): relative positions or zeros,
        # plus -1e9 where the mask is off, made in the first layer of a stack and reused after.
        if position_bias is None:
            if layer.use_relative_attention_bias:
                position_bias = layer.compute_bias(seq_length, key_length)
            else:
                position_bias = ops.zeros((1, layer.num_heads, seq_length, key_length), layer.compute_dtype)
            if mask is not None:
                mask = mask[:, np.newaxis, :, :]
                position_bias = position_bias + (1.0 - ops.cast(mask, position_bias.dtype)) * -1e9
        # Its last two axes are always full (queries, keys), as cuDNN needs; batch and heads may be 1.
        bias = ops.cast(position_bias, query.dtype)
        # T5 does not scale the scores (the 1/sqrt(d) is folded into its initialisation).
        attended = ops.dot_product_attention(query, key, value, bias=bias, scale=1.0)
        attended = ops.reshape(attended, (batch_size, -1, layer.inner_dim))
        return layer.output_projector(attended), position_bias, cache

    return call


def fuse_attention(model) -> list[str]:
    """Makes every keras-hub T5 attention layer of `model` compute attention with
    `keras.ops.dot_product_attention` (cuDNN flash attention on an NVIDIA GPU under JAX).

    Returns the paths of the layers it changed; none for a model without T5 attention (Gemma's
    keras-hub attention already calls the fused op where it can). Outputs and gradients are
    those of keras-hub's attention up to floating-point rounding; applying it twice changes nothing.
    """
    changed = []
    for layer in model._flatten_layers(include_self=False):
        if _is_t5_attention(layer) and not getattr(layer, "_lora3_fused", False):
            # An instance attribute: Keras' __call__ runs `self.call`, so this layer alone changes
            # (as `lora3.run.remat` wraps blocks); the layer's config and weights are untouched.
            object.__setattr__(layer, "call", _fused_call(layer, layer.call))
            object.__setattr__(layer, "_lora3_fused", True)
            changed.append(layer.path or layer.name)
    return changed
