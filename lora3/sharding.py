"""LoRA-aware sharding for `keras.distribution.ModelParallel`: layouts for T5 and Gemma that cover the adapters.

Nothing here is home-made parallelism: the mesh is a `keras.distribution.DeviceMesh`, data
parallelism is `keras.distribution.DataParallel`, model parallelism is
`keras.distribution.ModelParallel` with a `keras.distribution.LayoutMap`. What lora3 adds is the part keras-hub does not ship:

* **Layouts that cover LoRA** (`layout_map`, `LoraModelParallel`). keras-hub has no layout map for
  T5, and `GemmaBackbone.get_layout_map` leaves LoRA variables replicated and fails when the
  key/value heads do not divide the mesh's model axis. lora3's map is Megatron-style on the
  `model` axis (weights are replicated over the `batch` axis):

  - *column-parallel* projections (T5 `query/key/value_projector`, `input_projector`,
    `gate_projector`; Gemma `query`, `key`, `value`, `ffw_gating`, `ffw_gating_2`) split the
    kernel's **output** side (Gemma's attention kernels on the heads axis). Their adapter's
    `lora_B (rank, out)` is split the same way on `out`, and `lora_A (rank, in)` is
    **replicated**: the input `x` is replicated over the model axis, so `x @ A.T` needs no
    communication and `(x @ A.T) @ B` comes out split exactly like the frozen layer's output.
  - *row-parallel* projections (T5 attention and FFN `output_projector`; Gemma
    `attention_output`, `ffw_linear`) split the kernel's **input** side. Their `lora_A (rank, in)`
    is split the same way on `in`, and `lora_B (rank, out)` is **replicated**: `x` arrives split
    on its features, so `x @ A.T` is a partial sum of shape `(tokens, rank)` and the only extra
    communication is an all-reduce of that thin tensor (the frozen path all-reduces
    `(tokens, out)` anyway). Replicating A instead would all-gather `x`, `(tokens, in)`: far more.
  - The replicated half of each adapter costs `rank * (in or out)` floats per device (plus its
    two Adam slots): a fraction `rank / min(in, out)` of the frozen kernel shard, which is why it
    is not worth splitting it further.
  - Token embeddings are split on the vocabulary (or the hidden size if the vocabulary does not
    divide); norms, T5's relative-position biases and everything unmatched are replicated.

  Every rule is checked against the variable's shape when it is created. If the dimension a rule
  splits does not divide the model axis (Gemma's `num_key_value_heads=1` on a model axis of 4,
  say), the kernel is replicated and so is its adapter, and the decision is recorded
  (`LoraModelParallel.decisions`); with `on_indivisible="error"` the run
  stops at once naming the dimension (`num_key_value_heads=1 does not divide ...`).
  An adapter always follows the decision taken for its own kernel, so A/B are never split
  where the kernel is not.

On TensorFlow, Keras 3.15's `keras.distribution` has no DataParallel/ModelParallel trainer
support (its TensorFlow distribution module only lists devices), and lora3 does not wrap
`tf.distribute`: `distribution=data_parallel|model_parallel` with `backend=tensorflow` fails at
once, saying that they need `backend=jax`.

`keras` is imported inside `layout_map` and `model_parallel_class` only: the app validates
`distribution.*` settings (`rules_for`, `DistributionError`) before the backend is chosen, and
importing keras would fix it.
"""

from __future__ import annotations

import dataclasses
import re

from lora3.errors import Lora3Error

ON_INDIVISIBLE = ("replicate", "error")
BATCH_AXIS, MODEL_AXIS = "batch", "model"


class DistributionError(Lora3Error):
    """The distribution config cannot be honoured (backend, mesh, shapes, batch sizes).

    Example:
    >>> rules_for("bert")
    Traceback (most recent call last):
    ...
    lora3.sharding.DistributionError: distribution=model_parallel has layouts for model.family in ['gemma', 'gemma3', 't5'], not 'bert'
    """


# ---------------------------------------------------------------- layout rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """How one family of kernels is split on the model axis.

    Args:
        pattern: str. Regex (`re.fullmatch`) on the *layer* path (the kernel
            is `<layer>/kernel`, LoRA's `<layer>/lora_A`, `<layer>/lora_B`).
        kind: str. `"column"`, `"row"` or `"embedding"`.
        axis: int. Which kernel axis is split.
        dims: tuple of str. Names of the kernel's axes (for messages).
        fallback: int or None. Another axis to try when `axis` does not
            divide (embeddings only).

    Example:
    >>> rule = rules_for("t5")[0]
    >>> rule.kind, rule.axis, rule.dims[rule.axis]
    ('column', 1, 'num_heads*key_value_dim')
    """

    pattern: str
    kind: str
    axis: int
    dims: tuple
    fallback: int | None = None


T5_RULES = (
    Rule(r".*_attention/(query|key|value)_projector", "column", 1, ("hidden_dim", "num_heads*key_value_dim")),
    Rule(r".*_attention/output_projector", "row", 0, ("num_heads*key_value_dim", "hidden_dim")),
    Rule(r"transformer_(en|de)coder_layer_\d+/(input|gate)_projector", "column", 1,
         ("hidden_dim", "intermediate_dim")),
    Rule(r"transformer_(en|de)coder_layer_\d+/output_projector", "row", 0, ("intermediate_dim", "hidden_dim")),
)
GEMMA_RULES = (
    Rule(r".*attention/query", "column", 0, ("num_query_heads", "hidden_dim", "head_dim")),
    Rule(r".*attention/(key|value)", "column", 0, ("num_key_value_heads", "hidden_dim", "head_dim")),
    Rule(r".*attention/attention_output", "row", 0, ("num_query_heads", "head_dim", "hidden_dim")),
    Rule(r".*/ffw_gating(_2)?", "column", 1, ("hidden_dim", "intermediate_dim/2")),
    Rule(r".*/ffw_linear", "row", 0, ("intermediate_dim/2", "hidden_dim")),
)
EMBEDDING_RULES = (
    Rule(r"token_embedding", "embedding", 0, ("vocabulary_size", "hidden_dim"), fallback=1),
)
FAMILY_RULES = {"t5": T5_RULES, "gemma": GEMMA_RULES, "gemma3": GEMMA_RULES}


def rules_for(family: str) -> tuple:
    """The layout `Rule`s of a model family.

    Args:
        family: str. `"t5"`, `"gemma"` or `"gemma3"`.

    Returns:
        A tuple of `Rule`s (projections only; embeddings are `EMBEDDING_RULES`).

    Raises:
        DistributionError: for a family without rules (naming those with).

    Example:
    >>> [r.pattern for r in rules_for("gemma") if r.kind == "row"]
    ['.*attention/attention_output', '.*/ffw_linear']
    """
    if family not in FAMILY_RULES:
        raise DistributionError(
            f"distribution=model_parallel has layouts for model.family in {sorted(FAMILY_RULES)}, not {family!r}"
        )
    return FAMILY_RULES[family]


def _spec(ndim, axis):
    spec = [None] * ndim
    if axis is not None:
        spec[axis] = MODEL_AXIS
    return tuple(spec)


def layout_map(family: str, device_mesh, kernel_ndim: int | None = None):
    """The `keras.distribution.LayoutMap` of the *preferred* layouts for `family` (T5 or Gemma).

    Keys are regexes on variable paths; values are TensorLayouts on `device_mesh`'s `model` axis.
    It covers frozen kernels, embeddings and the LoRA `lora_A`/`lora_B` of every rule (see the
    module docstring for which side each adapter matrix is split on, and why). Used as is with
    `keras.distribution.ModelParallel` it is correct whenever every split dimension divides the
    model axis; `LoraModelParallel` adds the per-shape check and the replicate/error fallback.

    Args:
        family: str. `"t5"`, `"gemma"` or `"gemma3"`.
        device_mesh: a `keras.distribution.DeviceMesh` with a `"model"` axis.
        kernel_ndim: int or None. The kernels' rank, if not the rule's.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"),
    ...                                      keras.distribution.list_devices()[:1])
    >>> lm = layout_map("t5", mesh)
    >>> lm[".*_attention/(query|key|value)_projector/lora_B"].axes
    (None, 'model')
    """
    import keras  # here, not at the top: see the module docstring

    lm = keras.distribution.LayoutMap(device_mesh)
    for rule in rules_for(family):
        ndim = kernel_ndim or len(rule.dims)
        lm[rule.pattern + "/kernel"] = _spec(ndim, rule.axis)
        if rule.kind == "column":
            lm[rule.pattern + "/lora_A"] = (None, None)
            lm[rule.pattern + "/lora_B"] = (None, MODEL_AXIS)
        else:
            lm[rule.pattern + "/lora_A"] = (None, MODEL_AXIS)
            lm[rule.pattern + "/lora_B"] = (None, None)
    lm["token_embedding/embeddings"] = (MODEL_AXIS, None)
    lm["token_embedding/reverse_embeddings"] = (None, MODEL_AXIS)
    return lm


def model_parallel_class():
    """The class `LoraModelParallel`, a `keras.distribution.ModelParallel` (defined on first call).

    A factory, so that importing `lora3.sharding` does not import keras (see the module docstring).

    Returns:
        The class; construct it as `cls(family=..., device_mesh=..., on_indivisible=...)`.

    Example:
    >>> model_parallel_class().__name__
    'LoraModelParallel'
    """
    import keras  # here, not at the top: see the module docstring

    class LoraModelParallel(keras.distribution.ModelParallel):
        """`keras.distribution.ModelParallel` whose layouts come from lora3's rules, checked per shape.

        `get_variable_layout` is the only override: for a variable whose path a rule matches it
        returns the rule's layout if the split dimension divides the model axis, otherwise the
        replicated layout (or raises with `on_indivisible="error"`). LoRA A/B follow the decision
        taken for their kernel. `decisions` maps each matched path to `(spec, note)`.
        """

        def __init__(self, *, family, device_mesh, on_indivisible="replicate", **kwargs):
            self.family = family
            self.rules = rules_for(family)
            self.on_indivisible = on_indivisible
            self.decisions: dict[str, tuple] = {}
            self._kernel_split: dict[str, bool] = {}
            super().__init__(layout_map=layout_map(family, device_mesh), batch_dim_name=BATCH_AXIS, **kwargs)

        @property
        def model_size(self):
            return self.device_mesh.shape[self.device_mesh.axis_names.index(MODEL_AXIS)]

        def _layout(self, spec):
            return keras.distribution.TensorLayout(spec, self.device_mesh)

        def _record(self, path, spec, note=""):
            self.decisions[path] = (spec, note)
            return self._layout(spec)

        def _match(self, layer_path):
            for rule in (*self.rules, *EMBEDDING_RULES):
                if re.fullmatch(rule.pattern, layer_path):
                    return rule
            return None

        def get_variable_layout(self, variable):
            if getattr(variable, "_layout", None) is not None:
                return variable._layout
            path = variable.path
            layer_path, _, leaf = path.rpartition("/")
            rule = self._match(layer_path)
            shape = tuple(variable.shape)
            m = self.model_size
            if rule is None or m == 1:
                return self._layout((None,) * len(shape))
            if leaf in ("kernel", "embeddings", "reverse_embeddings"):
                axes = [rule.axis] if leaf != "reverse_embeddings" else [1 - rule.axis]
                if rule.fallback is not None:
                    axes.append(rule.fallback if leaf != "reverse_embeddings" else 1 - rule.fallback)
                for axis in axes:
                    if axis < len(shape) and shape[axis] % m == 0:
                        self._kernel_split[layer_path] = True
                        return self._record(path, _spec(len(shape), axis))
                axis = axes[0]
                dim = rule.dims[axis] if leaf != "reverse_embeddings" else rule.dims[1 - axis]
                msg = (f"{path}: {dim}={shape[axis]} does not divide the '{MODEL_AXIS}' mesh axis "
                       f"({m} devices)")
                if self.on_indivisible == "error":
                    raise DistributionError(
                        f"distribution=model_parallel: {msg}. Choose distribution.model_size (or "
                        f"distribution.mesh_shape) so that {m} is replaced by a divisor of {shape[axis]}, or "
                        "set distribution.on_indivisible=replicate to keep this weight (and its adapter) "
                        "replicated"
                    )
                self._kernel_split[layer_path] = False
                return self._record(path, (None,) * len(shape), msg + ": replicated, with its LoRA A/B")
            # A named adapter's variables are `lora_A_<name>` / `lora_B_<name>`: laid out as the default's.
            leaf = next((kind for kind in ("lora_A", "lora_B") if leaf == kind or leaf.startswith(kind + "_")), leaf)
            if leaf in ("lora_A", "lora_B") and len(shape) == 2:
                split = self._kernel_split.get(layer_path)
                if split is None:  # adapter without a seen kernel: decide on its own shape
                    split = True
                if rule.kind == "column":
                    spec = (None, MODEL_AXIS) if leaf == "lora_B" and split and shape[1] % m == 0 else (None, None)
                else:
                    spec = (None, MODEL_AXIS) if leaf == "lora_A" and split and shape[1] % m == 0 else (None, None)
                return self._record(path, spec)
            return self._layout((None,) * len(shape))

        def table(self) -> str:
            rows = [f"  {p}  {s}{'  # ' + n if n else ''}" for p, (s, n) in self.decisions.items()]
            return "\n".join(rows)

    return LoraModelParallel


