"""lora3/run/backend.py: the backend is chosen before keras is imported, and a mismatch is refused."""

import os
import subprocess
import sys

import pytest

from lora3.run import backend

BACKEND = os.environ.get("KERAS_BACKEND", "jax")


def _python(code):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_select_sets_the_backend_before_keras_is_imported():
    proc = _python(f"import sys; from lora3.run import backend; assert 'keras' not in sys.modules; "
                   f"k = backend.select({BACKEND!r}); print(k.backend.backend(), backend.imported_backend())")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [BACKEND, BACKEND]


def test_a_second_backend_in_the_same_process_is_refused():
    other = "tensorflow" if BACKEND == "jax" else "jax"
    proc = _python(f"from lora3.run import backend; backend.select({BACKEND!r})\n"
                   f"try:\n    backend.select({other!r})\nexcept backend.BackendMismatch as e:\n    print('refused', e)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused") and "needs a fresh process" in proc.stdout


@pytest.mark.one_backend
def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend='torch' is not valid; valid: jax, tensorflow"):
        backend.select("torch")


def test_versions_and_devices_report_what_runs():
    backend.select(BACKEND)
    v = backend.versions()
    assert {"lora3", "python", "keras", "numpy"} <= set(v)
    assert BACKEND in v  # the running backend's library (others are listed only if something imported them)
    assert backend.devices() and all(isinstance(d, str) for d in backend.devices())
    assert backend.peak_memory()["host_peak_rss_bytes"] > 0
