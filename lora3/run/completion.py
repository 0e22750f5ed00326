"""The training view of a decoder-only language model: logits only where the loss is.

keras-hub's `CausalLM` computes logits for every position. A translation pair packed as
`<bos> prompt completion` is trained on the completion only, so most of those logits are
thrown away by a zero sample weight, and at a real vocabulary (Gemma 3: 262,144 tokens) they
are most of a step's work and memory. `CompletionLM` runs the same backbone, gathers the hidden
states at `loss_positions` (a fixed number per row, so shapes stay static under `jit`), and
applies the tied output embedding there alone.
"""

from __future__ import annotations

import keras
from keras import ops


class CompletionLM(keras.Model):
    """Logits of `causal_lm` at the positions named by `inputs["loss_positions"]`.

    Shares every variable with `causal_lm` (LoRA wrappers included): train this model, then
    generate with `causal_lm`.

    Args:
        causal_lm: a keras-hub `CausalLM` whose backbone has a `token_embedding`
            (`ReversibleEmbedding`) used as the output head.

    Example:

    >>> import numpy as np, keras_hub
    >>> lm = keras_hub.models.GemmaCausalLM(backbone=keras_hub.models.GemmaBackbone(
    ...     vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8))
    >>> view = CompletionLM(lm)
    >>> x = {"token_ids": np.ones((2, 6), "int32"), "padding_mask": np.ones((2, 6), "int32"),
    ...      "loss_positions": np.array([[3, 4], [4, 5]], "int32")}
    >>> tuple(int(d) for d in view(x).shape)
    (2, 2, 50)
    """

    def __init__(self, causal_lm, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm

    def call(self, inputs, training=False):
        backbone = self.causal_lm.backbone
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]},
                          training=training)
        positions = ops.cast(inputs["loss_positions"], "int32")[..., None]  # (batch, k, 1)
        picked = ops.take_along_axis(hidden, positions, axis=1)             # (batch, k, hidden)
        return backbone.token_embedding(picked, reverse=True)               # (batch, k, vocabulary)
