"""PiSSA and OLoRA: adapters started from the base kernel, whose residual is written back.

Both follow PEFT 0.21's `LoraLayer.pissa_init` / `olora_init` exactly, in lora3's layouts:
the kernel as the `(in_features, out_features)` matrix `W` (PEFT's `weight` is `W.T`),
`A` `(rank, in_features)` (PEFT's `lora_A.weight`), `B` `(rank, out_features)` (the transpose of
PEFT's `lora_B.weight`). With `s` the adapter's scaling:

- **PiSSA** (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
  of Large Language Models", arXiv:2404.02948): with `W.T = V diag(S) Uh` (SVD),
  `A = diag(sqrt(S_r / s)) Uh_r` and `B = diag(sqrt(S_r / s)) V_r.T`, so `s * A.T @ B` is the
  best rank-r approximation of `W`. `"pissa_niter_<N>"` gets `V_r, S_r, Uh_r` from a randomised
  SVD with `N` subspace iterations (Halko et al. 2011, as `torch.svd_lowrank(W.T, q=r, niter=N)`,
  which PEFT calls): faster on large kernels, approximate.
- **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  arXiv:2406.01775): with `W.T = Q R` (reduced QR), `B = Q_r.T` (orthonormal) and `A = R_r`.

Either way the kernel becomes the residual `W - s * A.T @ B`, so the layer's output is unchanged
until training moves A and B. The factors are only defined up to the sign of each of the r
components (a singular or QR direction): `A.T @ B` and the residual do not depend on it, nor does
training (flipping a component's sign in A and B together flips its gradients with it), so lora3
and PEFT give the same model before and after each step even where their LAPACKs choose other signs.

All in `keras.ops`, on the device the kernel lives on.
"""

from keras import ops, random

from lora3.config import pissa_niter
from lora3.errors import LoraConfigError


def base_factors(weight, rank, scaling, init, seed=None):
    """`(A, B)` for a base-rewriting `init` on the `(in_features, out_features)` matrix `weight`.

    Args:
        weight: tensor `(in_features, out_features)`, the kernel's matrix view (any float dtype;
            computed in float32).
        rank: int. The adapter's rank `r`.
        scaling: float. The adapter's scaling `s` (PiSSA divides the singular values by it, so
            `s * A.T @ B` is the rank-r part; OLoRA subtracts `s * A.T @ B`, as PEFT does).
        init: str. `"pissa"`, `"pissa_niter_<N>"` or `"olora"`.
        seed: int, `keras.random.SeedGenerator` or None. The randomised SVD's seed
            (`"pissa_niter_<N>"` only).

    Returns:
        `(A, B)`, float32 tensors `(rank, in_features)` and `(rank, out_features)`.

    Raises:
        LoraConfigError: `init` is no base-rewriting initialiser.

    Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    >>> a, b = base_factors(w, rank=4, scaling=2.0, init="pissa")
    >>> bool(np.allclose(2.0 * (np.asarray(a).T @ np.asarray(b)), w, atol=1e-5))   # full rank: all of W
    True
    """
    weight_t = ops.transpose(ops.cast(weight, "float32"))  # PEFT's `weight`, (out_features, in_features)
    if init == "olora":
        q, r = ops.qr(weight_t, mode="reduced")
        return r[:rank], ops.transpose(q[:, :rank])
    niter = pissa_niter(init)
    if init == "pissa":
        v, s, uh = ops.svd(weight_t, full_matrices=False)
        v_r, s_r, uh_r = v[:, :rank], s[:rank], uh[:rank]
    elif niter is not None:
        v_r, s_r, uh_r = _svd_lowrank(weight_t, rank, niter, seed)
    else:
        raise LoraConfigError(f"init={init!r} does not start from the base kernel; use pissa, pissa_niter_<N> or olora")
    root = ops.sqrt(ops.divide(s_r, scaling))
    lora_a = ops.multiply(ops.expand_dims(root, 1), uh_r)
    lora_b = ops.multiply(ops.expand_dims(root, 1), ops.transpose(v_r))
    return lora_a, lora_b


def residual(weight, lora_a, lora_b, scaling):
    """`W - s * A.T @ B` in float32: the kernel matrix a base-rewriting init leaves behind.

    Example:
    >>> import numpy as np
    >>> w = np.ones((3, 2), "float32"); a = np.ones((1, 3), "float32"); b = np.ones((1, 2), "float32")
    >>> np.asarray(residual(w, a, b, 0.5)).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    delta = ops.matmul(ops.transpose(ops.cast(lora_a, "float32")), ops.cast(lora_b, "float32"))
    return ops.subtract(ops.cast(weight, "float32"), ops.multiply(delta, scaling))


def _svd_lowrank(matrix, rank, niter, seed):
    """`torch.svd_lowrank(matrix, q=rank, niter=niter)` (no centring): `(U, S, Vh)` truncated to `rank`.

    Halko, Martinsson and Tropp 2011 (arXiv:0909.4061), algorithms 4.4 and 5.1, with torch's
    choices: a Gaussian test matrix of `rank` columns (no oversampling) and a QR after every product.
    """
    n = matrix.shape[1]
    test = random.normal((n, rank), dtype="float32", seed=seed)
    basis, _ = ops.qr(ops.matmul(matrix, test), mode="reduced")
    for _ in range(niter):
        basis, _ = ops.qr(ops.matmul(ops.transpose(matrix), basis), mode="reduced")
        basis, _ = ops.qr(ops.matmul(matrix, basis), mode="reduced")
    small = ops.matmul(ops.transpose(basis), matrix)  # (rank, n)
    u, s, vh = ops.svd(small, full_matrices=False)
    return ops.matmul(basis, u), s, vh
