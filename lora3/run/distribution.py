"""Scale-out with Keras' own distribution API: `distribution=none|data_parallel|model_parallel`.

Nothing here is home-made parallelism: the mesh is a `keras.distribution.DeviceMesh`, data
parallelism is `keras.distribution.DataParallel`, model parallelism is `lora3.sharding`'s
`LoraModelParallel` (a `keras.distribution.ModelParallel` whose layouts cover LoRA), and
multi-process runs call `keras.distribution.initialize`. This module is the app's side:

* **Batches that do not divide the data-parallel degree** (`pad_train_batches`, `pad_eval`):
  every batch that reaches a distributed step must split evenly over the `batch` mesh axis
  (keras.distribution splits every batch on the mesh's `batch` axis). lora3 pads a batch of `B` rows to the next multiple `B'` with rows of sample weight 0
  and multiplies the real rows' weights by `B'/B`. Keras' loss is `sum(w * l) / (B' * T)`, so the
  loss, its gradient and the weighted token accuracy are those of the unpadded batch (exact up
  to float rounding): padding, never a crash, never a changed objective.

* **Multi-process JAX** (`coordinator`, `num_processes`, `process_id`): `setup()` calls
  `keras.distribution.initialize` before any JAX computation. Each process feeds its slice of
  every global batch (`auto_shard_dataset=False`, slices taken by `local_rows`), so N processes
  see exactly the batches one process would, and only process 0 writes (the app sends the
  others' files to a scratch directory and disables their W&B run).

On TensorFlow, Keras 3.15's `keras.distribution` has no DataParallel/ModelParallel trainer
support, and lora3 does not wrap `tf.distribute`: `distribution=data_parallel|model_parallel`
with `backend=tensorflow` is refused by the config's schema (`lora3.run.schema`), which says so.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lora3.sharding import BATCH_AXIS, MODEL_AXIS, DistributionError, model_parallel_class



# ---------------------------------------------------------------- config

def _get(cfg: Mapping[str, Any] | None, key, default=None):
    if not cfg:
        return default
    v = cfg.get(key, default)
    return default if v is None else v


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
    if mode != "none" and (backend or keras.backend.backend()) != "jax":  # the schema says so for the app
        raise DistributionError(f"distribution={mode} needs backend=jax (keras.distribution trains on JAX only)")
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
        cls = model_parallel_class()
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


def output_dir(run_dir: Path, plain: dict) -> Path:
    """The directory this process writes: the run directory, or a worker's scratch (`worker_dir`)."""
    return worker_dir(run_dir, plain) if is_worker(plain) else run_dir
