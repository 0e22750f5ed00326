"""Scale-out with Keras' own distribution API: `distribution=none|data_parallel|model_parallel`.

Nothing here is home-made parallelism: the mesh is a `keras.distribution.DeviceMesh`, data
parallelism is `keras.distribution.DataParallel`, model parallelism is
`keras.distribution.ModelParallel` with a `keras.distribution.LayoutMap`, and multi-process runs
call `keras.distribution.initialize`. What lora3 adds is the part keras-hub does not ship:

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
  (`LoraModelParallel.decisions`, printed by the app); with `on_indivisible="error"` the run
  stops at once naming the dimension (`num_key_value_heads=1 does not divide ...`).
  An adapter always follows the decision taken for its own kernel, so A/B are never split
  where the kernel is not.

* **Batches that do not divide the data-parallel degree** (`pad_train_batches`, `pad_eval`):
  every batch that reaches a distributed step must split evenly over the `batch` mesh axis
  (FACTS). lora3 pads a batch of `B` rows to the next multiple `B'` with rows of sample weight 0
  and multiplies the real rows' weights by `B'/B`. Keras' loss is `sum(w * l) / (B' * T)`, so the
  loss, its gradient and the weighted token accuracy are those of the unpadded batch (exact up
  to float rounding): padding, never a crash, never a changed objective.

* **Multi-process JAX** (`coordinator`, `num_processes`, `process_id`): `setup()` calls
  `keras.distribution.initialize` before any JAX computation. Each process feeds its slice of
  every global batch (`auto_shard_dataset=False`, slices taken by `local_rows`), so N processes
  see exactly the batches one process would, and only process 0 writes (the app sends the
  others' files to a scratch directory and disables their W&B run).

On TensorFlow, Keras 3.15's `keras.distribution` has no DataParallel/ModelParallel trainer
support (its TensorFlow distribution module only lists devices), and lora3 does not wrap
`tf.distribute`: `distribution=data_parallel|model_parallel` with `backend=tensorflow` fails at
once, saying that they need `backend=jax` (see `check_backend`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lora3.errors import Lora3Error

MODES = ("none", "data_parallel", "model_parallel")
UNEVEN = ("pad", "error")
ON_INDIVISIBLE = ("replicate", "error")
BATCH_AXIS, MODEL_AXIS = "batch", "model"


class DistributionError(Lora3Error):
    """The distribution config cannot be honoured (backend, mesh, shapes, batch sizes)."""


# ---------------------------------------------------------------- layout rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """How one family of kernels is split on the model axis.

    pattern: regex (fullmatch) on the *layer* path (the kernel is `<layer>/kernel`, LoRA's
      `<layer>/lora_A`, `<layer>/lora_B`); kind: column | row | embedding;
    axis: which kernel axis is split; dims: names of the kernel's axes (for messages);
    fallback: another axis to try when `axis` does not divide (embeddings only).
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
    """
    import keras

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


def _make_model_parallel_class():
    import keras

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


# ---------------------------------------------------------------- config

def _get(cfg: Mapping[str, Any] | None, key, default=None):
    if not cfg:
        return default
    v = cfg.get(key, default)
    return default if v is None else v


def validate_config(plain: Mapping[str, Any]) -> None:
    """Checks `distribution.*` (no keras needed); raises DistributionError naming the key."""
    d = plain.get("distribution") or {}
    mode = _get(d, "mode", "none")
    problems = []
    if mode not in MODES:
        problems.append(f"distribution.mode={mode!r} is not valid: it must be one of {', '.join(MODES)}")
    for key in ("num_processes",):
        v = _get(d, key, 1)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            problems.append(f"distribution.{key}={v!r} is not valid: it must be a positive integer")
    pid, n = _get(d, "process_id", 0), _get(d, "num_processes", 1)
    if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < max(1, n if isinstance(n, int) else 1)):
        problems.append(f"distribution.process_id={pid!r} is not valid: it must be in [0, num_processes={n})")
    if _get(d, "uneven_batch", "pad") not in UNEVEN:
        problems.append(f"distribution.uneven_batch={d.get('uneven_batch')!r} is not valid: one of {', '.join(UNEVEN)}")
    if _get(d, "on_indivisible", "replicate") not in ON_INDIVISIBLE:
        problems.append(f"distribution.on_indivisible={d.get('on_indivisible')!r} is not valid: "
                        f"one of {', '.join(ON_INDIVISIBLE)}")
    ms = _get(d, "model_size", 1)
    if not (isinstance(ms, int) and not isinstance(ms, bool) and ms >= 1):
        problems.append(f"distribution.model_size={ms!r} is not valid: it must be a positive integer")
    shape = d.get("mesh_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 2
                                  and all(isinstance(s, int) and s >= 1 for s in shape)):
        problems.append(f"distribution.mesh_shape={shape!r} is not valid: it must be [batch, model] "
                        "(two positive integers) or null")
    if n != 1 and isinstance(n, int) and mode == "none":
        problems.append("distribution.num_processes > 1 needs distribution=data_parallel or model_parallel")
    if isinstance(n, int) and n > 1 and not _get(d, "coordinator", None):
        problems.append("distribution.num_processes > 1 needs distribution.coordinator=<host:port of process 0>")
    if isinstance(n, int) and n > 1 and plain.get("resume"):
        problems.append("resume=true is not supported with distribution.num_processes > 1 yet")
    if problems:
        raise DistributionError("invalid config: " + "; ".join(problems))
    check_backend(plain.get("backend", "jax"), mode)


def check_backend(backend: str, mode: str) -> None:
    if mode != "none" and backend != "jax":
        raise DistributionError(
            f"distribution={mode} needs backend=jax: lora3 distributes through keras.distribution "
            "(DeviceMesh, DataParallel, ModelParallel, LayoutMap), whose trainer support in Keras 3 is JAX only. "
            f"backend={backend} supports distribution=none (one device). Use backend=jax distribution={mode}"
        )


# ---------------------------------------------------------------- set-up

@dataclasses.dataclass
class Setup:
    mode: str = "none"
    distribution: Any = None
    replicas: int = 1              # size of the data-parallel (batch) axis
    num_processes: int = 1
    process_id: int = 0
    uneven_batch: str = "pad"
    devices: int = 1

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1

    def describe(self) -> str:
        if self.mode == "none":
            return "distribution: none (one device)"
        mesh = self.distribution.device_mesh
        return (f"distribution: {self.mode} on {self.devices} devices, mesh {dict(zip(mesh.axis_names, mesh.shape))}, "
                f"{self.num_processes} process(es), this is process {self.process_id}")


_CURRENT = Setup()
_INITIALIZED = None


def current() -> Setup:
    """The set-up of the running job (mode none when `setup` was not called)."""
    return _CURRENT


def reset() -> None:
    global _CURRENT
    _CURRENT = Setup()
    try:
        import keras

        keras.distribution.set_distribution(None)
    except Exception:
        pass


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """`keras.distribution.initialize` (JAX: `jax.distributed.initialize`) once per process."""
    import keras

    global _INITIALIZED
    if _INITIALIZED == (coordinator, num_processes, process_id):  # a multirun's next job in this process
        return
    # (no jax.process_count() here: any such call starts the XLA backend, after which initialize fails)
    keras.distribution.initialize(job_addresses=coordinator, num_processes=num_processes, process_id=process_id)
    _INITIALIZED = (coordinator, num_processes, process_id)


def setup(dist_cfg: Mapping[str, Any] | None, family: str, keras, backend: str | None = None) -> Setup:
    """Sets the global keras distribution for `dist_cfg` (call after clear_session, before building)."""
    global _CURRENT
    mode = _get(dist_cfg, "mode", "none")
    check_backend(backend or keras.backend.backend(), mode)
    if mode == "none":
        _CURRENT = Setup()
        keras.distribution.set_distribution(None)
        return _CURRENT
    n_proc = int(_get(dist_cfg, "num_processes", 1))
    pid = int(_get(dist_cfg, "process_id", 0))
    if n_proc > 1:
        initialize(str(dist_cfg["coordinator"]), n_proc, pid)
    devices = keras.distribution.list_devices()
    wanted = _get(dist_cfg, "devices", None)
    if wanted:
        if wanted > len(devices):
            raise DistributionError(f"distribution.devices={wanted} but only {len(devices)} devices are visible "
                                    f"({devices[0].split(':')[0]}); on CPU set "
                                    f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted} before starting")
        devices = devices[:wanted]
    n = len(devices)
    uneven = _get(dist_cfg, "uneven_batch", "pad")
    if mode == "data_parallel":
        mesh = keras.distribution.DeviceMesh((n,), (BATCH_AXIS,), devices)
        dist = keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
        replicas = n
    else:
        shape = dist_cfg.get("mesh_shape")
        if shape is None:
            m = int(_get(dist_cfg, "model_size", 1))
            if n % m:
                raise DistributionError(f"distribution.model_size={m} does not divide the {n} visible devices")
            shape = (n // m, m)
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != n:
            raise DistributionError(f"distribution.mesh_shape={list(shape)} needs {math.prod(shape)} devices, "
                                    f"{n} are visible (set distribution.devices, or on CPU "
                                    f"XLA_FLAGS=--xla_force_host_platform_device_count=...)")
        mesh = keras.distribution.DeviceMesh(shape, (BATCH_AXIS, MODEL_AXIS), devices)
        cls = _make_model_parallel_class()
        dist = cls(family=family, device_mesh=mesh, on_indivisible=_get(dist_cfg, "on_indivisible", "replicate"),
                   auto_shard_dataset=False)
        replicas = shape[0]
    if n_proc > 1 and replicas % n_proc:
        raise DistributionError(f"the batch axis ({replicas}) must divide by distribution.num_processes={n_proc}")
    keras.distribution.set_distribution(dist)
    _CURRENT = Setup(mode=mode, distribution=dist, replicas=replicas, num_processes=n_proc, process_id=pid,
                     uneven_batch=uneven, devices=n)
    return _CURRENT


# ---------------------------------------------------------------- batches

def padded_size(b: int, multiple: int) -> int:
    return -(-b // multiple) * multiple


def _pad_rows(a, n_pad):
    if n_pad == 0:
        return a
    filler = np.repeat(a[-1:], n_pad, axis=0)
    return np.concatenate([a, filler], axis=0)


def _check_uneven(b, setup: Setup, key):
    if b % setup.replicas and setup.uneven_batch == "error":
        raise DistributionError(f"{key}={b} does not divide by the {setup.replicas} data-parallel replicas; "
                                f"use a multiple of {setup.replicas}, or distribution.uneven_batch=pad")


def local_rows(n_rows: int, batch: int, setup: Setup) -> np.ndarray:
    """Row indices this process feeds: its contiguous `batch/num_processes` slice of every batch."""
    per = batch // setup.num_processes
    idx = np.arange(n_rows).reshape(-1, batch)[:, setup.process_id * per:(setup.process_id + 1) * per]
    return idx.reshape(-1)


def pad_train_batches(x: dict, y, sw, batch_size: int, setup: Setup | None = None):
    """Arrays of whole batches of `batch_size`, padded so each batch divides the replicas.

    Returns (x, y, sw, per_process_batch). Padding rows have weight 0 and the real rows'
    weights are scaled by B'/B, so loss and gradients equal the unpadded batch's (see module doc).
    In a multi-process run only this process's slice of every batch is returned.
    """
    setup = setup or current()
    if setup.mode == "none":
        return x, y, sw, batch_size
    _check_uneven(batch_size, setup, "trainer.batch_size")
    b2 = padded_size(batch_size, setup.replicas)
    n = len(y)
    if n % batch_size:
        raise DistributionError(f"internal: {n} training rows are not whole batches of {batch_size}")
    steps = n // batch_size
    if b2 != batch_size:
        def pad(a, fill_zero=False):
            a = a.reshape((steps, batch_size) + a.shape[1:])
            extra = np.repeat(a[:, -1:], b2 - batch_size, axis=1)
            if fill_zero:
                extra = np.zeros_like(extra)
            return np.concatenate([a, extra], axis=1).reshape((steps * b2,) + a.shape[2:])

        x = {k: pad(v) for k, v in x.items()}
        y = pad(y)
        sw = pad(np.asarray(sw, dtype="float32") * np.float32(b2 / batch_size), fill_zero=True)
    if setup.multi_process:
        idx = local_rows(steps * b2, b2, setup)
        x, y, sw = {k: v[idx] for k, v in x.items()}, y[idx], sw[idx]
    return x, y, sw, b2 // setup.num_processes


def pad_eval(arrays: tuple, batch_size: int, setup: Setup | None = None):
    """(x, y, sw) for `model.evaluate` under a distribution: every batch divides the replicas.

    Returns ((x, y, sw), per_process_batch). Rows are padded to whole batches of B' (a multiple of
    the replicas) with weight 0, and the real rows' weights scaled by N'/N, so the evaluated loss
    is the mean over the N real rows (Keras weights each batch's loss by its row count) and the
    weighted accuracy is unchanged.
    """
    setup = setup or current()
    if setup.mode == "none" or arrays is None:
        return arrays, batch_size
    x, y, sw = arrays
    _check_uneven(batch_size, setup, "eval.batch_size")
    b2 = padded_size(batch_size, setup.replicas)
    n = len(y)
    n2 = padded_size(n, b2)
    sw = np.asarray(sw, dtype="float32")
    if n2 != n:
        x = {k: _pad_rows(v, n2 - n) for k, v in x.items()}
        y = _pad_rows(y, n2 - n)
        sw = np.concatenate([sw * np.float32(n2 / n), np.zeros((n2 - n,) + sw.shape[1:], "float32")])
    if setup.multi_process:
        idx = local_rows(n2, b2, setup)
        x, y, sw = {k: v[idx] for k, v in x.items()}, y[idx], sw[idx]
    return (x, y, sw), b2 // setup.num_processes


# ---------------------------------------------------------------- process 0 writes

def is_worker(plain: Mapping[str, Any]) -> bool:
    """True in a multi-process run's processes other than 0 (from the config: no keras needed)."""
    d = plain.get("distribution") or {}
    return _get(d, "mode", "none") != "none" and int(_get(d, "num_processes", 1)) > 1 \
        and int(_get(d, "process_id", 0)) != 0


def worker_dir(run_dir: Path, plain: dict) -> Path:
    """Where a process other than 0 writes: a scratch directory outside the run, and no W&B run.

    It trains in step with process 0 (every collective needs it) but leaves the run directory,
    adapter/, metrics.json and the W&B run to process 0.
    """
    pid = int(_get(plain.get("distribution"), "process_id", 0))
    plain.setdefault("wandb", {})["mode"] = "disabled"
    return Path(tempfile.mkdtemp(prefix=f"lora3-{Path(run_dir).name}-process{pid}-"))
