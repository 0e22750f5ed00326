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


# Logits of one chunk of the chunked loss: at most this many float32 values exist at once
# (16M floats = 64 MiB: e.g. 288 tokens x 32,768 entries of Gemma 3's 262,144-token vocabulary).
CHUNK_LOGITS = 2**24
# Tokens per block: the vocabulary products run on blocks this tall (taller blocks run the two
# matmuls more efficiently on CPU; the vocabulary chunk shrinks to keep the budget).
TOKEN_BLOCK = 1024


def chunk_sizes(tokens: int | None, vocabulary_size: int, *, chunk_tokens: int | None = None,
                chunk_vocab: int | None = None, budget: int = CHUNK_LOGITS) -> tuple[int, int]:
    """`(tokens per block, vocabulary rows per chunk)` with `block x chunk <= budget` logits.

    The vocabulary is cut into equal chunks where a divisor allows, else near-equal ones (the last
    one shorter).
    `tokens` may be None (a batch TensorFlow traces as unknown): blocks of `TOKEN_BLOCK` then.

    >>> chunk_sizes(288, 262_144)
    (288, 32768)
    """
    t = int(chunk_tokens or TOKEN_BLOCK)
    t = max(1, min(t, tokens) if tokens else t)
    vocab = int(vocabulary_size)
    most = max(1, min(int(chunk_vocab or budget // t), vocab))
    fewest = -(-vocab // most)
    # Chunks that divide the vocabulary, if at most twice as many do: no ragged tail step (its
    # buffers would come on top of the loop's)
    pieces = next((p for p in range(fewest, 2 * fewest + 1) if vocab % p == 0), fewest)
    return t, -(-vocab // pieces)


def _chunk_logits(h, kernel, soft_cap):
    """float32 logits `h @ kernel.T` of one chunk, soft-capped as keras-hub's `ReversibleEmbedding` does;
    also returns tanh of the capped logits (None without a cap) for the cap's derivative."""
    z = ops.cast(ops.matmul(h, ops.transpose(kernel)), "float32")
    if soft_cap is None:
        return z, None
    t = ops.tanh(z / soft_cap)
    return t * soft_cap, t


def _over_chunks(kernel, rows, step, carry):
    """`carry = step(carry, kernel_chunk, offset, size)` over the vocabulary, `rows` entries at a
    time: a loop of dynamic slices that read `kernel` in place (a reshape into chunks would copy
    the whole kernel when `rows` does not divide it), then the ragged tail, if any, once."""
    vocab, d = int(kernel.shape[0]), int(kernel.shape[1])
    full, tail = vocab // rows, vocab % rows
    carry = ops.fori_loop(
        0, full, lambda i, c: step(c, ops.slice(kernel, [i * rows, 0], [rows, d]), i * rows, rows), carry)
    return step(carry, kernel[full * rows:], full * rows, tail) if tail else carry


def _over_vocabulary(h, y, kernel, soft_cap, rows, accumulate):
    """One pass of a token block over the vocabulary, `rows` entries at a time, with a running
    maximum (the online softmax of flash attention): the block's log-sum-exp, the running maximum,
    the label's logit (picked from its chunk: the very value the maximum saw), and with
    `accumulate` the softmax-weighted sum of kernel rows `sum_v p_v (1 - t_v^2) w_v`, the hidden
    states' gradient but for the label's term."""
    d = int(h.shape[-1])
    n = ops.shape(h)[0]

    def step(carry, w_i, offset, size):
        top, total, z_y, acc = carry
        z, t = _chunk_logits(h, w_i, soft_cap)
        inside = ops.logical_and(y >= offset, y < offset + size)
        picked = ops.take_along_axis(z, ops.clip(y - offset, 0, size - 1)[:, None], axis=-1)[:, 0]
        z_y = ops.where(inside, picked, z_y)
        new_top = ops.maximum(top, ops.max(z, axis=-1))
        rescale = ops.exp(top - new_top)
        p = ops.exp(z - new_top[:, None])
        total = total * rescale + ops.sum(p, axis=-1)
        if accumulate:
            g = p if t is None else p * (1.0 - t * t)
            acc = acc * rescale[:, None] + ops.cast(ops.matmul(ops.cast(g, kernel.dtype), w_i), "float32")
        return new_top, total, z_y, acc

    carry = (ops.full((n,), -float("inf"), "float32"), ops.zeros((n,), "float32"), ops.zeros((n,), "float32"),
             ops.zeros((n, d) if accumulate else (1,), "float32"))
    top, total, z_y, acc = _over_chunks(kernel, rows, step, carry)
    return ops.log(total) + top, top, z_y, acc / total[:, None] if accumulate else None


def chunked_token_loss(hidden, labels, kernel, *, chunk_tokens=None, chunk_vocab=None, soft_cap=None,
                       kernel_grad=True, training=True, budget=CHUNK_LOGITS):
    """Per-token softmax cross-entropy of the logits `hidden @ kernel.T`, in blocks of tokens and
    chunks of the vocabulary, so the `(tokens, vocabulary)` logits never exist whole: at most one
    `(block, chunk)` piece of them does.

    Args:
        hidden: `(n, d)` hidden states.
        labels: `(n,)` integer labels.
        kernel: `(vocabulary, d)` output embedding (a tied `token_embedding.embeddings`).
        chunk_tokens: tokens per block (default `min(n, TOKEN_BLOCK)`); `n` is padded up to a
            multiple (the padding is sliced off).
        chunk_vocab: most vocabulary rows per chunk (default: what `budget` leaves for a block).
        soft_cap: keras-hub's `logit_soft_cap` (`tanh(z / cap) * cap`), or None.
        kernel_grad: whether `kernel` needs a gradient (False when it is frozen, as under LoRA).
        training: with False, the forward alone (no gradient is prepared).
        budget: most logits of one `(block, chunk)` piece.

    Returns:
        `(ce, correct)`, both `(n,)` float32: the cross-entropy and 1.0 where the label's logit is
        the largest (token accuracy: keras-hub's argmax but for exact ties, which count as correct).

    The gradient is written by hand (`keras.ops.custom_gradient`). The forward pass of a block runs
    over the vocabulary with a running maximum (flash attention's online softmax) and also sums
    `softmax(z) @ kernel`, so the hidden states' gradient `(softmax - onehot) @ kernel` costs no
    vocabulary product beyond the two a full-logit step does, and the backward pass needs no
    logits. Chunking the vocabulary rather than the tokens keeps the matmuls tall (all the block's
    tokens at once), which is what makes them fast on CPU. A trainable kernel's gradient depends
    on the upstream factors, so it is formed in the backward pass, recomputing each chunk's logits
    (one more vocabulary product, only when the embedding trains).

    Example:

    >>> import numpy as np
    >>> h = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    >>> w = np.random.default_rng(1).normal(size=(7, 4)).astype("float32")
    >>> y = np.array([0, 3, 6, 2, 1])
    >>> ce, _ = chunked_token_loss(h, y, w, chunk_tokens=2, chunk_vocab=3)
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
    c, rows = chunk_sizes(n, vocab, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, budget=budget)
    one_block = n is not None and n <= c
    if n is None:
        n = ops.shape(hidden)[0]
    pad = (-n) % c
    y = ops.cast(labels, "int32")
    if not isinstance(pad, int) or pad:  # a ragged last block: zero states and label 0, sliced off below
        hidden = ops.pad(hidden, [[0, pad], [0, 0]])
        y = ops.pad(y, [[0, pad]])

    def per_block(fn, *xs):
        """`fn` on each block of `c` tokens (no loop when there is one), results re-joined."""
        if one_block:
            return fn(*xs)
        out = ops.map(lambda b: fn(*b), tuple(ops.reshape(x, (-1, c) + tuple(x.shape[1:])) for x in xs))
        return tuple(ops.reshape(o, (-1,) + tuple(o.shape[2:])) for o in out)

    def unpad(t):
        return ops.reshape(t, (-1,))[:n]

    def stats(h_b, y_b, w, accumulate):
        lse, top, z_y, soft = _over_vocabulary(h_b, y_b, w, soft_cap, rows, accumulate)
        ce, correct = lse - z_y, ops.cast(z_y >= top, "float32")
        if not accumulate:
            return ce, correct
        # d ce / d h = softmax-weighted rows minus the label's row (each through the cap's derivative)
        w_y = ops.cast(ops.take(w, y_b, axis=0), "float32")
        if soft_cap is not None:
            t_y = z_y / soft_cap  # the capped logit is tanh(.) * cap
            w_y = w_y * (1.0 - t_y * t_y)[:, None]
        return ce, correct, lse, soft - w_y

    if not training:
        ce, correct = per_block(lambda h_b, y_b: stats(h_b, y_b, kernel, False), hidden, y)
        return unpad(ce), unpad(correct)

    @ops.custom_gradient
    def loss(h, w):
        ce, correct, lse, gh = per_block(lambda h_b, y_b: stats(h_b, y_b, w, True), h, y)

        def grad(*args, upstream=None):
            if upstream is None:
                upstream = args[0]
            up = upstream[0] if isinstance(upstream, (list, tuple)) else upstream  # d loss / d ce; correct has none
            up = ops.cast(up, "float32")
            dh = ops.cast(gh * up[:, None], h.dtype)
            if not kernel_grad:
                return dh, ops.zeros_like(w)
            return dh, _kernel_gradient(h, y, w, lse, up, soft_cap, c, rows)

        return (ce, correct), grad

    ce, correct = loss(hidden, kernel)
    return unpad(ce), unpad(correct)


def _kernel_gradient(h, y, w, lse, up, soft_cap, c, rows):
    """`sum_tokens up * (softmax - onehot)^T h` (through the cap's derivative), a `(block, chunk)`
    piece at a time, recomputing each piece's logits from the forward pass's log-sum-exp."""
    d = int(w.shape[-1])
    blocks = ops.shape(h)[0] // c

    def block(j, dw):
        h_j = ops.slice(h, [j * c, 0], [c, d])
        y_j, lse_j, up_j = (ops.slice(v, [j * c], [c]) for v in (y, lse, up))

        def piece(dw, w_i, offset, size):
            z, t = _chunk_logits(h_j, w_i, soft_cap)
            g = ops.exp(z - lse_j[:, None]) - ops.one_hot(y_j - offset, size, dtype="float32")  # 0 outside
            if t is not None:
                g = g * (1.0 - t * t)
            g = ops.cast(g * up_j[:, None], w.dtype)
            return ops.slice_update(dw, [offset, 0], ops.slice(dw, [offset, 0], [size, d])
                                    + ops.matmul(ops.transpose(g), h_j))

        return _over_chunks(w, rows, piece, dw)

    return ops.fori_loop(0, blocks, block, ops.zeros_like(w))


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
        chunk_tokens: tokens per block of the chunked loss (default: `chunk_sizes`).
        chunk_vocab: most vocabulary rows per chunk (default: what 64 MiB of logits leave).

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

    def __init__(self, causal_lm, chunk_tokens=None, chunk_vocab=None, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self.chunk_tokens, self.chunk_vocab = chunk_tokens, chunk_vocab

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
            emb.embeddings, chunk_tokens=self.chunk_tokens, chunk_vocab=self.chunk_vocab, soft_cap=emb.logit_soft_cap,
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
