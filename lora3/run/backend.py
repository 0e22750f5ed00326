"""Choosing the Keras backend: the one place that imports keras first.

`KERAS_BACKEND` is read once, at the first `import keras` (also when keras_hub or a W&B Keras
callback imports it). So `select()` sets it and then imports keras; if keras is already imported
with another backend, it raises `BackendMismatch` and the caller runs the job in a fresh process
(`lora3.run` does that for multiruns over `backend=`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys
import warnings

import lora3
from lora3.run import distribution

try:
    import resource
except ImportError:  # not POSIX
    resource = None

BACKENDS = ("jax", "tensorflow")


# What keras-hub imports whenever it is installed (its preprocessors' tf.data path), though a JAX job on
# Gemma never calls it: TensorFlow alone adds about 570 MB to the process's memory and seconds to its
# start. T5 needs it on every backend: keras-hub's T5 `generate()` strips its output with `tf.ragged`.
# (Gemma 3 runs without keras-hub's preprocessor, which would need it: lora3.run.models.WITHOUT_PREPROCESSOR.)
TENSORFLOW_MODULES = ("tensorflow", "tensorflow_text", "tf_keras")
NEEDS_TENSORFLOW = ("t5",)


class _TensorFlowLeftOut:
    """A meta-path finder: `import tensorflow` (and what needs it) fails, as where it is not installed,
    with a message that says why; libraries that import it optionally (keras-hub) carry on without."""

    def __init__(self, backend: str):
        self.backend = backend

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in TENSORFLOW_MODULES:
            raise ModuleNotFoundError(
                f"lora3 left {fullname} out of this backend={self.backend} process (its model family does not need it; "
                f"it would cost ~570 MB); run with backend=tensorflow to have it", name=fullname)
        return None


def tensorflow_left_out() -> bool:
    """Whether `leave_out_tensorflow` has made TensorFlow unimportable in this process."""
    return any(isinstance(f, _TensorFlowLeftOut) for f in sys.meta_path)


def leave_out_tensorflow(backend: str) -> bool:
    """Makes TensorFlow unimportable in this process (see `_TensorFlowLeftOut`), unless it is already
    imported or is the backend. Returns whether it is left out. `USE_TF=0` tells Hugging Face's
    libraries (datasets) not to look for it."""
    if backend == "tensorflow" or any(m in sys.modules for m in TENSORFLOW_MODULES):
        return False
    if not tensorflow_left_out():
        sys.meta_path.insert(0, _TensorFlowLeftOut(backend))
    os.environ.setdefault("USE_TF", "0")
    return True


class BackendMismatch(RuntimeError):
    """keras is already imported in this process with a different backend."""


def imported_backend() -> str | None:
    """The backend of the keras already imported in this process, or None."""
    if "keras" not in sys.modules:
        return None
    keras = sys.modules["keras"]
    try:
        return keras.backend.backend()
    except AttributeError:  # a half-imported keras
        return None


def _quiet_env():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # JAX on CPU: keep one process from grabbing every thread pool it can.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def select(backend: str, tensorflow: bool = True):
    """Makes `backend` the Keras backend of this process and returns the keras module. With
    `tensorflow=False` on another backend, TensorFlow stays out of the process (`leave_out_tensorflow`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; valid: {', '.join(BACKENDS)}")
    current = imported_backend()
    if current is not None and current != backend:
        raise BackendMismatch(
            f"keras is already imported with backend {current!r} in this process; "
            f"backend={backend!r} needs a fresh process"
        )
    if current is None:
        os.environ["KERAS_BACKEND"] = backend
        _quiet_env()
        if not tensorflow:
            leave_out_tensorflow(backend)
    import keras  # the one place keras is first imported: after KERAS_BACKEND is set above

    actual = keras.backend.backend()
    if actual != backend:  # e.g. keras imported half-way through by something else
        raise BackendMismatch(f"asked for backend {backend!r} but keras runs on {actual!r}")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"

    # keras-hub's T5 attention layers warn on every trace that they drop Keras masks (they use their own).
    warnings.filterwarnings("ignore", message=".*does not support masking and will therefore destroy the mask.*")
    return keras


def start(plain) -> object:
    """The job's keras: `select(backend)`, a clean session (a multirun reuses the process), the dtype
    policy (`trainer.precision`), the seed, and `keras.distribution` (set before the model is built)."""
    family = plain["model"]["family"]
    keras = select(plain["backend"], tensorflow=family in NEEDS_TENSORFLOW)
    if tensorflow_left_out():
        print(f"[lora3] TensorFlow left out of this process (model family {family} on {plain['backend']} "
              f"does not need it: ~570 MB less memory)", flush=True)
    keras.backend.clear_session()
    keras.config.set_dtype_policy(plain["trainer"]["precision"])
    keras.utils.set_random_seed(plain["seed"])
    dist = distribution.setup(plain.get("distribution"), plain["model"]["family"], keras)
    if dist.mode != "none":
        print(f"[lora3] {dist.describe()}", flush=True)
    return keras


def versions() -> dict:
    """Versions of lora3, keras, keras-hub, the backend library and Python."""
    out = {"lora3": lora3.__version__, "python": platform.python_version()}
    for name in ("keras", "keras_hub", "jax", "jaxlib", "tensorflow", "numpy", "wandb", "sacrebleu"):
        mod = sys.modules.get(name)
        if mod is None and name in ("keras", "keras_hub"):
            continue
        if mod is None:
            backend = imported_backend()
            if name in ("jax", "jaxlib") and backend != "jax" or name == "tensorflow" and backend != "tensorflow":
                continue
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
            continue
        out[name] = getattr(mod, "__version__", None)
    return out


def devices() -> list[str]:
    backend = imported_backend()
    try:
        if backend == "jax":  # the backend's module is imported already (keras imported it)
            return [str(d) for d in sys.modules["jax"].devices()]
        if backend == "tensorflow":
            return [d.name for d in sys.modules["tensorflow"].config.list_logical_devices()]
    except Exception:
        pass
    return []


def peak_memory() -> dict:
    """Peak host RSS (bytes) and, where the backend reports it, peak accelerator memory."""
    out = {}
    if resource is not None:
        out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    backend = imported_backend()
    try:
        if backend == "jax":
            dev = sys.modules["jax"].devices()[0]
            if dev.platform != "cpu":
                stats = dev.memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
        elif backend == "tensorflow":
            tf = sys.modules["tensorflow"]
            gpus = tf.config.list_logical_devices("GPU")
            if gpus:
                out["device_peak_bytes"] = int(tf.config.experimental.get_memory_info(gpus[0].name)["peak"])
    except Exception:
        pass
    return out
