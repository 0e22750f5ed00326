"""`trainer.remat`: rematerialisation (gradient checkpointing) of each transformer block, through `keras.remat`.

Activations, not weights, bound a LoRA run's batch and sequence length. With `trainer.remat=full`
(`blocks` is its earlier name, still accepted) the backward pass recomputes each transformer block's
forward pass instead of keeping its intermediate activations: only the block's inputs are kept (what
Hugging Face calls gradient checkpointing), for about one more forward pass of time.

Why not `keras.RematScope`: Keras hands a layer's call to `jax.checkpoint` / `tf.recompute_grad`
with all its arguments, and keras-hub blocks take Python values (`training=False`,
`use_causal_mask`) and keyword arguments: JAX then traces the Python booleans (a
TracerBoolConversionError in T5's layers) and TensorFlow's `recompute_grad` takes no keyword
arguments inside a `tf.function`. `remat_blocks` gives `keras.remat` a function of the block's
tensors alone, positionally, with every other argument bound as it was passed.
"""

from __future__ import annotations

import re

MODES = ("none", "full", "blocks")
# The modes that recompute every transformer block: `full`, and `blocks`, its earlier name.
RECOMPUTE_BLOCKS = ("full", "blocks")
# keras-hub's block names: Gemma and Gemma 3 `decoder_block_<i>`, T5 `transformer_{en,de}coder_layer_<i>`.
BLOCK_PATTERN = re.compile(r"decoder_block_\d+|transformer_(en|de)coder_layer_\d+")


def _is_tensor(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (bool, int, float, str))


def _rematerialized(call):
    """`call(*args, **kwargs)` run through `keras.remat` with its tensors as the only (positional) inputs."""
    import keras

    def wrapped(*args, **kwargs):
        leaves, structure = keras.tree.flatten((args, kwargs)), (args, kwargs)
        where = [i for i, leaf in enumerate(leaves) if _is_tensor(leaf)]

        def run(*tensors):
            filled = list(leaves)
            for i, t in zip(where, tensors):
                filled[i] = t
            a, kw = keras.tree.pack_sequence_as(structure, filled)
            return call(*a, **kw)

        return keras.remat(run)(*[leaves[i] for i in where])

    return wrapped


def remat_blocks(model) -> list[str]:
    """Makes every transformer block of `model` recompute its forward pass in the backward pass.

    Returns the paths of the blocks it changed (none when the model has no keras-hub block).
    Outputs and gradients are unchanged; only what is kept between the passes differs.

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GemmaBackbone(vocabulary_size=50, num_layers=2,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
    >>> remat_blocks(backbone)
    ['decoder_block_0', 'decoder_block_1']
    """
    changed = []
    for layer in model._flatten_layers(include_self=False):
        if BLOCK_PATTERN.fullmatch(layer.name) and not getattr(layer, "_lora3_remat", False):
            # An instance attribute: Keras' __call__ runs `self.call`, so this block alone is wrapped.
            object.__setattr__(layer, "call", _rematerialized(layer.call))
            object.__setattr__(layer, "_lora3_remat", True)
            changed.append(layer.path or layer.name)
    return changed
