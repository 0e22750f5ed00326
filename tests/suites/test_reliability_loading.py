"""Safe loading: adapters only from safetensors + JSON (no pickle anywhere in the loaders), `.keras`
files with Keras' safe mode, and a large adapter loads tensor by tensor (extra memory well under its
size: measured with a ~180 MB adapter in a fresh process)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.one_backend
def test_no_pickle_in_the_loaders():
    for path in (REPO / "lora3").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\b|allow_pickle\s*=\s*True|torch\.load|safe_mode\s*=\s*False", text), path


def test_keras_file_with_a_lambda_is_refused_in_safe_mode(tmp_path):
    import keras

    import lora3

    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        lora3.load_model(tmp_path / "m.keras")


SAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import keras, lora3, tiny
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone(vocab=64, layers=1, hidden=1024, heads=8, ff=2048)
    lora3.apply_lora(bb, lora3.LoraConfig(rank=1024, targets="all_linear"))
    lora3.save_adapter(bb, {out!r})
    """
)

# Loads the adapter onto a fresh base (the usual case: the surgery and the weights come from the
# file), then once more onto the now-adapted model, measuring each load's peak anonymous memory
# (safe_open maps the file: page cache, reclaimable, not counted).
LOAD_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys, threading, time, tracemalloc
    sys.path.insert(0, {tests!r})
    import keras, lora3, tiny
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone(vocab=64, layers=1, hidden=1024, heads=8, ff=2048)
    size = os.path.getsize(os.path.join({out!r}, "adapter.safetensors"))

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    def measure():
        gc.collect()
        base, peak, stop = rss(), [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)
        t = threading.Thread(target=sample); t.start()
        tracemalloc.start()
        lora3.load_adapter(bb, {out!r})
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stop.set(); t.join()
        return {{"rss_extra": (peak[0] - base) / size, "traced_peak": traced / size}}

    print(json.dumps({{"size": size, "fresh": measure(), "existing": measure()}}))
    """
)


@pytest.mark.one_backend
@pytest.mark.slow
def test_large_adapter_loads_tensor_by_tensor(tmp_path):
    env = dict(os.environ, KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "jax"))
    fmt = dict(tests=str(REPO / "tests"), out=str(tmp_path / "big"))
    for script in (SAVE_SCRIPT, LOAD_SCRIPT):  # separate processes: no garbage of the save in the baseline
        r = subprocess.run([sys.executable, "-c", script.format(**fmt)], capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(m)  # the largest layer's A + B: 2 x 1024 x 1024 float32 = 8 MB of a ~176 MB file
    assert m["size"] > 150e6
    # The loader never holds the file: numpy allocations alive at once stay well under its size
    # (measured 0.2-0.45x: on CPU the backend may keep a few numpy buffers as the variables' values).
    assert m["fresh"]["traced_peak"] < 0.6 and m["existing"]["traced_peak"] < 0.6, m
    # Onto a fresh base the adapter's own weights must end up in memory (1.0x); the loader adds one
    # layer on top (measured 1.05-1.10x on JAX, 1.00x on TensorFlow; 1.21x once on JAX with the CPU
    # shared with a second test run, so the bound leaves room: holding the file whole would be 2x).
    assert m["fresh"]["rss_extra"] < 1.3, m
    # Onto existing LoRA layers nothing new has to stay; measured ~0.94x on JAX (glibc keeps freed
    # XLA buffers mapped for reuse rather than returning them at once), ~0.2x on TensorFlow.
    assert m["existing"]["rss_extra"] < 1.0, m
