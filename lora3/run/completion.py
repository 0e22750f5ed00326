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


# Tokens per chunk of the chunked loss: at most this many float32 logits exist at once
# (16M floats = 64 MiB: 64 tokens of Gemma 3's 262,144-token vocabulary).
CHUNK_LOGITS = 2**24


def chunk_tokens_for(vocabulary_size: int, budget: int = CHUNK_LOGITS) -> int:
    """Tokens per chunk so that one chunk's `(tokens, vocabulary)` logits hold at most `budget` values."""
    return max(1, int(budget) // max(1, int(vocabulary_size)))


def _chunk_logits(h, kernel, soft_cap):
    """float32 logits `h @ kernel.T` of one chunk, soft-capped as keras-hub's `ReversibleEmbedding` does;
    also returns tanh of the capped logits (None without a cap) for the cap's derivative."""
    z = ops.cast(ops.matmul(h, ops.transpose(kernel)), "float32")
    if soft_cap is None:
        return z, None
    t = ops.tanh(z / soft_cap)
    return t * soft_cap, t


def _chunk_stats(z, y):
    """Per-token cross-entropy, whether the label has the top logit, and the log-sum-exp."""
    top = ops.max(z, axis=-1)
    lse = ops.log(ops.sum(ops.exp(z - top[:, None]), axis=-1)) + top
    zy = ops.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return lse - zy, ops.cast(zy >= top, "float32"), lse


def chunked_token_loss(hidden, labels, kernel, *, chunk_tokens, soft_cap=None, kernel_grad=True,
                       training=True):
    """Per-token softmax cross-entropy of the logits `hidden @ kernel.T`, `chunk_tokens` tokens at a
    time, so the `(tokens, vocabulary)` logits never exist whole: at most one chunk's do.

    Args:
        hidden: `(n, d)` hidden states.
        labels: `(n,)` integer labels.
        kernel: `(vocabulary, d)` output embedding (a tied `token_embedding.embeddings`).
        chunk_tokens: tokens per chunk; `n` is padded up to a multiple (the padding is sliced off).
        soft_cap: keras-hub's `logit_soft_cap` (`tanh(z / cap) * cap`), or None.
        kernel_grad: whether `kernel` needs a gradient (False when it is frozen, as under LoRA).
        training: with False, the forward alone (no gradient is prepared).

    Returns:
        `(ce, correct)`, both `(n,)` float32: the cross-entropy and 1.0 where the label's logit is
        the largest (token accuracy).

    The gradient is written by hand (`keras.ops.custom_gradient`), Liger-Kernel's way: the forward
    pass of each chunk also forms `(softmax - onehot) @ kernel`, the gradient of the hidden states up
    to the per-token upstream factor, so the backward pass needs no logits at all and a LoRA step
    does the two vocabulary products a full-logit step does. A trainable kernel's gradient does
    depend on the upstream factors, so it is formed in the backward pass, recomputing each chunk's
    logits (one more vocabulary product, only when the embedding trains).

    Example:

    >>> import numpy as np
    >>> h = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    >>> w = np.random.default_rng(1).normal(size=(7, 4)).astype("float32")
    >>> y = np.array([0, 3, 6, 2, 1])
    >>> ce, _ = chunked_token_loss(h, y, w, chunk_tokens=2)
    >>> z = h @ w.T
    >>> ref = np.log(np.exp(z).sum(-1)) - z[np.arange(5), y]
    >>> bool(np.allclose(ops.convert_to_numpy(ce), ref, rtol=1e-5))
    True
    """
    hidden = ops.convert_to_tensor(hidden)
    # A tensor, not the variable: TensorFlow's custom_gradient would otherwise count the kernel as a
    # variable read inside the function (asking for `variables=` gradients); under jit the copy is free.
    kernel = ops.copy(kernel) if isinstance(kernel, keras.Variable) else ops.convert_to_tensor(kernel)
    d, vocab = int(hidden.shape[-1]), int(kernel.shape[0])
    n = hidden.shape[0]  # None when TensorFlow traces an unknown batch: then a tensor
    c = max(1, min(int(chunk_tokens), n)) if n is not None else max(1, int(chunk_tokens))
    if n is None:
        n = ops.shape(hidden)[0]
    pad = (-n) % c
    m = (n + pad) // c
    y = ops.cast(labels, "int32")
    if not isinstance(pad, int) or pad:  # a ragged last chunk: zero states and label 0, sliced off below
        hidden = ops.pad(hidden, [[0, pad], [0, 0]])
        y = ops.pad(y, [[0, pad]])
    y_chunks = ops.reshape(y, (-1, c))

    def unpad(t):
        return ops.reshape(t, (-1,))[:n]

    if not training:
        def stats(xs):
            z, _ = _chunk_logits(xs[0], kernel, soft_cap)
            ce, correct, _ = _chunk_stats(z, xs[1])
            return ce, correct

        ce, correct = ops.map(stats, (ops.reshape(hidden, (-1, c, d)), y_chunks))
        return unpad(ce), unpad(correct)

    def dlogits(z, t, y_i, lse, scale=None):
        """d ce / d (uncapped logits) of one chunk, times the per-token upstream `scale`."""
        g = ops.exp(z - lse[:, None]) - ops.one_hot(y_i, vocab, dtype="float32")
        if t is not None:
            g = g * (1.0 - t * t)
        return g if scale is None else g * scale[:, None]

    @ops.custom_gradient
    def loss(h, w):
        h_chunks = ops.reshape(h, (-1, c, d))

        # `ops.map` / `ops.fori_loop` (a while loop under jit): one chunk's logits at a time.
        def forward(xs):
            h_i, y_i = xs
            z, t = _chunk_logits(h_i, w, soft_cap)
            ce, correct, lse = _chunk_stats(z, y_i)
            gh = ops.matmul(ops.cast(dlogits(z, t, y_i, lse), w.dtype), w)  # (c, d), before the upstream
            return ce, correct, lse, gh

        ce, correct, lse, gh = ops.map(forward, (h_chunks, y_chunks))

        def grad(*args, upstream=None):
            if upstream is None:
                upstream = args[0]
            up = upstream[0] if isinstance(upstream, (list, tuple)) else upstream  # d loss / d ce; correct has none
            up = ops.reshape(ops.cast(up, "float32"), (-1, c))
            dh = ops.reshape(ops.cast(gh * up[..., None], h.dtype), (-1, d))
            if not kernel_grad:
                return dh, ops.zeros_like(w)

            def backward(i, dw):
                h_i = ops.take(h_chunks, i, axis=0)
                z, t = _chunk_logits(h_i, w, soft_cap)
                g = dlogits(z, t, ops.take(y_chunks, i, axis=0), ops.take(lse, i, axis=0),
                            ops.take(up, i, axis=0))
                return dw + ops.matmul(ops.transpose(ops.cast(g, w.dtype)), h_i)

            return dh, ops.fori_loop(0, m, backward, ops.zeros_like(w))

        return (ops.reshape(ce, (-1,)), ops.reshape(correct, (-1,))), grad

    ce, correct = loss(hidden, kernel)
    return unpad(ce), unpad(correct)


class CompletionLoss(keras.Model):
    """The per-token loss of `causal_lm` at `inputs["loss_positions"]`, with the chunked head.

    The training view of a decoder-only model at a large vocabulary: the backbone's hidden states
    are gathered at the loss positions (as `CompletionLM`), then `chunked_token_loss` applies the
    tied output embedding a chunk of tokens at a time, so not even the completion's
    `(tokens, vocabulary)` logits exist whole. The labels come in as `inputs["loss_labels"]`.
    The output is `(batch, k, 2)`: the cross-entropy of each position and 1.0 where its label has
    the top logit; `lora3.run.train.compile_model` reduces them with the sample weights
    (`completion_loss`, `completion_metrics`). Shares every variable with `causal_lm`.

    Args:
        causal_lm: a keras-hub `CausalLM` whose backbone has a tied `token_embedding`.
        chunk_tokens: tokens per chunk (default: `chunk_tokens_for(vocabulary)`, 64 MiB of logits).

    Example:

    >>> import numpy as np, keras_hub
    >>> lm = keras_hub.models.GemmaCausalLM(backbone=keras_hub.models.GemmaBackbone(
    ...     vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8))
    >>> view = CompletionLoss(lm, chunk_tokens=3)
    >>> x = {"token_ids": np.ones((2, 6), "int32"), "padding_mask": np.ones((2, 6), "int32"),
    ...      "loss_positions": np.array([[3, 4], [4, 5]], "int32"),
    ...      "loss_labels": np.array([[7, 8], [9, 1]], "int32")}
    >>> tuple(int(d) for d in view(x).shape)
    (2, 2, 2)
    """

    def __init__(self, causal_lm, chunk_tokens=None, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        emb = causal_lm.backbone.token_embedding
        self.chunk_tokens = int(chunk_tokens or chunk_tokens_for(emb.input_dim))

    def call(self, inputs, training=False):
        if "loss_labels" not in inputs:
            raise ValueError("CompletionLoss needs inputs['loss_labels'] (the label of each loss position); "
                             f"got the keys {sorted(inputs)}")
        backbone = self.causal_lm.backbone
        emb = backbone.token_embedding
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]},
                          training=training)
        positions = ops.cast(inputs["loss_positions"], "int32")
        k = positions.shape[1]
        picked = ops.take_along_axis(hidden, positions[..., None], axis=1)  # (batch, k, hidden)
        if getattr(emb, "quantization_mode", None) or not emb.tie_weights or emb.reverse_dtype is not None:
            # A head the chunked loss does not reproduce: keras-hub's own, at the gathered positions.
            z = ops.cast(emb(picked, reverse=True), "float32")
            ce = ops.logsumexp(z, axis=-1) - ops.take_along_axis(
                z, ops.cast(inputs["loss_labels"], "int32")[..., None], axis=-1)[..., 0]
            correct = ops.cast(ops.argmax(z, axis=-1) == ops.cast(inputs["loss_labels"], "int32"), "float32")
            return ops.stack([ce, correct], axis=-1)
        ce, correct = chunked_token_loss(
            ops.reshape(picked, (-1, picked.shape[-1])), ops.reshape(inputs["loss_labels"], (-1,)),
            emb.embeddings, chunk_tokens=self.chunk_tokens, soft_cap=emb.logit_soft_cap,
            kernel_grad=bool(emb.embeddings.trainable and emb.trainable), training=training)
        return ops.stack([ops.reshape(ce, (-1, k)), ops.reshape(correct, (-1, k))], axis=-1)


class _PerTokenLoss(keras.losses.Loss):
    """The cross-entropy `CompletionLoss` already computed (`y_pred[..., 0]`), reduced by Keras."""

    def call(self, y_true, y_pred):
        return y_pred[..., 0]


def completion_loss():
    """The Keras loss of `CompletionLoss`: the mean cross-entropy over the weighted tokens."""
    return _PerTokenLoss(reduction="mean_with_sample_weight", name="completion_loss")


def completion_metrics():
    """`accuracy` and `token_loss` of `CompletionLoss`, as lora3.run.train compiles them for a
    seq2seq model: weighted means over the tokens (sum(w * value) / sum(w) across batches)."""
    return [keras.metrics.MeanMetricWrapper(lambda y_true, y_pred: y_pred[..., 1], name="accuracy"),
            keras.metrics.MeanMetricWrapper(lambda y_true, y_pred: y_pred[..., 0], name="token_loss")]
