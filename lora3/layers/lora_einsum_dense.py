"""`LoRAEinsumDense`: LoRA around a built `keras.layers.EinsumDense`, and `analyze_equation`,
which reads an EinsumDense kernel as the matrix LoRA adapts."""

import math
import string

import keras
from keras import ops

from lora3.errors import LoraConfigError
import lora3.layers.quantized as quantized
from lora3.layers.lora_layer import LoRALayer


def analyze_equation(equation, kernel_shape):
    """Splits an EinsumDense equation into the matrix view LoRA needs.

    Every kernel dim must be either contracted with the input or produced in
    the output (a dim in both would be a batched kernel, one in neither a sum).

    Args:
        equation: str. The layer's equation, e.g. `"btd,ndh->btnh"`.
        kernel_shape: tuple of int. The kernel's shape, in the equation's
            kernel-subscript order.

    Returns:
        A dict with:
        `contracted`: kernel dims summed against the input, in kernel order;
        `produced`: kernel dims that appear in the output, in output order;
        `in_features` / `out_features`: products of their sizes;
        `eq_a` / `eq_b`: einsum equations for `x @ A` and `h @ B` (A, B reshaped);
        `a_shape` / `b_shape`: the shapes A and B take in those equations;
        `to_kernel`: permutation taking an array laid out as
        `contracted + produced` to the kernel's own dim order;
        `flat`: whether a 2-D `(tokens, in_features)` view of the input exists.

    Raises:
        LoraConfigError: the equation cannot be parsed, does not fit the
            kernel's shape, or has no matrix view (quoting the equation).

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
    output-subscript order, so head-major like HF's `q_proj`); see
    `analyze_equation`. `A` is `(rank, in_features)` and `B` is
    `(rank, out_features)`: the update `A.T @ B` has rank at most `rank`
    (Keras' own EinsumDense LoRA gives Gemma's query an A of shape
    `(heads, d, rank)`, an update of rank `heads * rank`).

    Args:
        layer: the `keras.layers.EinsumDense` to wrap (frozen by the wrapper).
        rank: int. Rank of the update, at most `min(in_features, out_features)`.
        alpha: float. Scaling numerator: `scaling = alpha / rank`.
        dropout: float. Dropout rate on the LoRA branch's input, in `[0, 1)`.
        rslora: bool. Rank-stabilised scaling `alpha / sqrt(rank)`.
        init: str. `"kaiming"` or `"gaussian"`: the initialiser of `A`.
        adapter_name: str. The name of this first adapter (see `LoRALayer`).
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`).

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

    @classmethod
    def matrix_shape(cls, layer):
        """`(in_features, out_features)` of the kernel's matrix view (see `analyze_equation`).

        Args:
            layer: a built `keras.layers.EinsumDense`.

        Example:
        >>> import keras
        >>> q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 4, 8))
        >>> q.build((None, None, 16))
        >>> LoRAEinsumDense.matrix_shape(q)
        (16, 32)
        """
        info = analyze_equation(layer.equation, layer.kernel.shape)
        return info["in_features"], info["out_features"]

    def _wrapped_built(self):
        # The einsum equations and shapes `call`, `merge` and a PiSSA/OLoRA init (which runs
        # while the adapters' variables are created) use.
        self._einsum = analyze_equation(self.wrapped.equation, self.wrapped.kernel.shape)

    def _apply_kernel(self, inputs):
        if self.base_quantization is not None:
            return quantized.kernel_product(self.wrapped, inputs)  # Keras' int8/int4 compute
        return ops.einsum(self.wrapped.equation, inputs, self.wrapped.kernel)

    def _lora_delta(self, x, adapter):
        info = self._einsum
        if info["flat"]:
            # Same products on the 2-D (tokens, in_features) view: faster gradients under XLA.
            return self._flat_lora_delta(x, adapter, len(info["contracted"]), info["b_shape"])
        a = ops.reshape(ops.transpose(adapter.lora_A), info["a_shape"] + (adapter.rank,))
        b = ops.reshape(adapter.lora_B, (adapter.rank,) + info["b_shape"])
        # Scale the thin (..., rank) intermediate, not the wide output.
        hidden = ops.multiply(ops.einsum(info["eq_a"], x, a), ops.cast(adapter.scaling, x.dtype))
        return ops.einsum(info["eq_b"], hidden, b)

    def kernel_matrix(self):
        """The kernel as its `(in_features, out_features)` matrix view (contracted dims first, in kernel order).

        Example:
        >>> import keras
        >>> q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 4, 8))
        >>> q.build((None, None, 16))
        >>> tuple(LoRAEinsumDense(q, rank=1, alpha=1).kernel_matrix().shape)
        (16, 32)
        """
        info = self._info()
        inverse = tuple(sorted(range(len(info["to_kernel"])), key=info["to_kernel"].__getitem__))
        kernel = self.wrapped.kernel
        if self.base_quantization is not None:
            kernel = quantized.dequantized_kernel(self.wrapped, self.compute_dtype)
        matrix = ops.transpose(kernel, inverse)
        return ops.reshape(matrix, (self.in_features, self.out_features))

    def _scale_to_output(self, scale):
        info = self._info()
        out = self.wrapped.equation.replace(" ", "").split("->")[1]
        head, _, tail = out.rpartition("...")
        if any(d in info["produced"] for d in head):
            raise LoraConfigError(
                f"DoRA on {self.path or self.name!r}: equation {self.wrapped.equation!r} produces kernel dims "
                "before its '...', which lora3's DoRA does not lay out"
            )
        sizes = dict(zip(info["produced"], info["b_shape"]))
        return ops.reshape(scale, tuple(sizes.get(d, 1) for d in tail))

    def _info(self):
        info = getattr(self, "_einsum", None)
        return info if info is not None else analyze_equation(self.wrapped.equation, self.wrapped.kernel.shape)

    def _delta_to_kernel_layout(self, delta):
        delta = ops.reshape(delta, self._einsum["a_shape"] + self._einsum["b_shape"])
        return ops.transpose(delta, self._einsum["to_kernel"])
