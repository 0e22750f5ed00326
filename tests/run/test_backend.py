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


def test_tensorflow_is_left_out_of_a_job_that_does_not_need_it():
    """`select(backend, tensorflow=False)` off TensorFlow: keras-hub imports and builds a Gemma without it,
    `import tensorflow` fails with a message naming the way back; on TensorFlow it is the backend."""
    code = ("import sys; from lora3.run import backend\n"
            f"k = backend.select({BACKEND!r}, tensorflow=False)\n"
            "import keras_hub\n"
            "keras_hub.models.GemmaBackbone(vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1,"
            " hidden_dim=16, intermediate_dim=32, head_dim=8)\n"
            "print('imported', 'tensorflow' in sys.modules)\n"
            "try:\n    import tensorflow\nexcept ImportError as e:\n    print('refused', e)\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if BACKEND == "tensorflow":
        assert proc.stdout.split()[:2] == ["imported", "True"] and "refused" not in proc.stdout
    else:
        assert proc.stdout.split()[:2] == ["imported", "False"]
        assert "refused lora3 left tensorflow out" in proc.stdout and "backend=tensorflow" in proc.stdout


@pytest.mark.one_backend
def test_only_t5_jobs_keep_tensorflow():
    """keras-hub's T5 generate() calls tf.ragged on any backend; Gemma and Gemma 3 jobs leave TensorFlow out
    (Gemma 3 runs without keras-hub's preprocessor: tests/run/test_gemma3_gguf.py); select() keeps it by default."""
    assert backend.NEEDS_TENSORFLOW == ("t5",)
    proc = _python("import sys; from lora3.run import backend; backend.select('jax'); import keras_hub; "
                   "print('tensorflow' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"  # the default: as keras-hub does when TensorFlow is installed


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend: nothing to leave out")
def test_a_gemma_job_runs_without_tensorflow(run_cli, lora3_cache, tmp_path):
    """Training, evaluation and greedy generation of a Gemma job, in a process TensorFlow never enters."""
    r = run_cli("experiment=smoke", "model=gemma_tiny", f"cache_dir={lora3_cache}", f"hydra.run.dir={tmp_path}",
                timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "TensorFlow left out of this process (model family gemma" in r.stdout
    assert "val/bleu" in r.stdout  # generation ran
