"""`LoRAEinsumDense`: LoRA around a built `keras.layers.EinsumDense`."""

import math
import string

import keras
from keras import ops

from lora3.errors import LoraConfigError
from lora3.layers.base import LoRALayer


def analyze_equation(equation, kernel_shape):
    """Split an EinsumDense equation into the matrix view LoRA needs.

    Returns a dict with:
      contracted: kernel dims summed against the input, in kernel order;
      produced:   kernel dims that appear in the output, in output order;
      in_features / out_features: products of their sizes;
      eq_a / eq_b: einsum equations for `x @ A` and `h @ B` (A, B reshaped);
      a_shape / b_shape: the shapes A and B take in those equations;
      to_kernel:  permutation taking an array laid out as (contracted + produced)
                  to the kernel's own dim order.

    Example:
    >>> info = analyze_equation("btd,ndh->btnh", (4, 16, 8))
    >>> info["in_features"], info["out_features"], info["eq_a"], info["eq_b"]
    (16, 32, 'btd,dz->btz', 'btz,znh->btnh')
    """
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        raise LoraConfigError(f"cannot parse EinsumDense equation {equation!r}") from None
    ker_dims = ker.replace("...", "")
    inp_dims = inp.replace("...", "")
    out_dims = out.replace("...", "")
    if len(ker_dims) != len(kernel_shape):
        raise LoraConfigError(
            f"equation {equation!r} names {len(ker_dims)} kernel dims, kernel has shape {tuple(kernel_shape)}"
        )
    shared = [d for d in ker_dims if d in inp_dims and d in out_dims]
    if shared:
        raise LoraConfigError(
            f"EinsumDense equation {equation!r}: kernel dim(s) {''.join(shared)!r} appear in the "
            "input and the output (a batched kernel); LoRA's matrix view needs every kernel dim to be "
            "either contracted with the input or produced in the output"
        )
    contracted = [d for d in ker_dims if d in inp_dims]
    produced = [d for d in out_dims if d in ker_dims]
    orphan = [d for d in ker_dims if d not in contracted and d not in produced]
    if orphan or not contracted or not produced:
        raise LoraConfigError(
            f"EinsumDense equation {equation!r} has no matrix view for LoRA "
            f"(contracted={''.join(contracted)!r}, produced={''.join(produced)!r}, summed-out={''.join(orphan)!r})"
        )
    sizes = dict(zip(ker_dims, (int(s) for s in kernel_shape)))
    r = next(c for c in string.ascii_lowercase[::-1] + string.ascii_uppercase if c not in equation)
    mid = "".join(d for d in inp if d not in contracted) + r
    c, p = "".join(contracted), "".join(produced)
    layout = contracted + produced
    # A 2-D (tokens, in_features) view exists when the input ends with the contracted dims
    # in kernel order and the output is the same leading dims followed by the produced ones.
    prefix = inp[: len(inp) - len(c)]
    flat = "..." not in equation and inp.endswith(c) and out == prefix + p
    return {
        "contracted": c,
        "produced": p,
        "in_features": math.prod(sizes[d] for d in contracted),
        "out_features": math.prod(sizes[d] for d in produced),
        "eq_a": f"{inp},{c}{r}->{mid}",
        "eq_b": f"{mid},{r}{p}->{out}",
        "a_shape": tuple(sizes[d] for d in contracted),
        "b_shape": tuple(sizes[d] for d in produced),
        "to_kernel": tuple(layout.index(d) for d in ker_dims),
        "flat": flat,
    }


@keras.saving.register_keras_serializable(package="lora3")
class LoRAEinsumDense(LoRALayer):
    """LoRA on an `EinsumDense`, in the paper's matrix view.

    The kernel is read as a matrix `(in_features, out_features)`, where
    `in_features` is the product of the dims contracted with the input (in
    kernel order) and `out_features` the product of the dims it produces (in
    output-subscript order, so head-major like HF's `q_proj`). `A` is
    `(rank, in_features)` and `B` is `(rank, out_features)`: the update `A.T @ B` has rank
    at most `rank` (Keras' own EinsumDense LoRA gives Gemma's query an A of
    shape `(heads, d, rank)`, an update of rank `heads * rank`).

    Example:
    >>> import keras, numpy as np
    >>> q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 4, 8))
    >>> q.build((None, None, 16))
    >>> lora = LoRAEinsumDense(q, rank=2, alpha=4)
    >>> tuple(lora.lora_A.shape), tuple(lora.lora_B.shape)
    ((2, 16), (2, 32))
    >>> x = np.ones((1, 3, 16), "float32")
    >>> bool(np.allclose(lora(x), q(x)))
    True
    """

    wrapped_class = keras.layers.EinsumDense

    def build(self, input_shape=None):
        if not self.wrapped.built:
            self.wrapped.build(input_shape)
        self._einsum = analyze_equation(self.wrapped.equation, self.wrapped.kernel.shape)
        super().build(input_shape)

    @property
    def in_features(self):
        return self._einsum["in_features"]

    @property
    def out_features(self):
        return self._einsum["out_features"]

    def _base_linear(self, inputs):
        y = ops.einsum(self.wrapped.equation, inputs, self.wrapped.kernel)
        if self.wrapped.bias is not None:
            y = ops.add(y, self.wrapped.bias)
        return y

    def _apply_a(self, inputs, a):
        a = ops.reshape(a, self._einsum["a_shape"] + (self.rank,))
        return ops.einsum(self._einsum["eq_a"], inputs, a)

    def _apply_b(self, hidden, b):
        b = ops.reshape(b, (self.rank,) + self._einsum["b_shape"])
        return ops.einsum(self._einsum["eq_b"], hidden, b)

    def _delta_to_kernel_layout(self, delta):
        delta = ops.reshape(delta, self._einsum["a_shape"] + self._einsum["b_shape"])
        return ops.transpose(delta, self._einsum["to_kernel"])

    def _lora_delta(self, x):
        if self._einsum["flat"]:
            # Same products on the 2-D (tokens, in_features) view: faster gradients under XLA.
            return self._flat_lora_delta(x, len(self._einsum["contracted"]), self._einsum["b_shape"])
        return super()._lora_delta(x)
