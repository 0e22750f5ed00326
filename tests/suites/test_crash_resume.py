"""Crash and resume with a real SIGKILL, and reproducibility of a run (same seed, backend, config).

`python -m lora3.run` is started as a subprocess and paused after optimizer step 3 (environment
variable LORA3_TEST_PAUSE_AFTER_STEP, read by the training loop's callback): by then the checkpoint of
step 2 exists and step 3 has been applied in memory only. The test kills it with SIGKILL, leaves a
fake half-written checkpoint (a temporary directory, and a `step-3` whose state file is cut short),
restarts with resume=true and compares with an uninterrupted run of the same config in this process.

Equality is bitwise (train/val loss curve and every adapter tensor) on both backends on CPU: the
batches are a pure function of (seed, step), the checkpoint holds every trainable and optimizer
variable and the RNG seed states, and XLA on CPU computes the same program the same way in another
process. (On a GPU with non-deterministic kernels this would need a tolerance; not tested here.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lora3.run import train as tr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
TINY = ["experiment=smoke", "model.base=null", f"backend={BACKEND}", "trainer.max_steps=4", "eval.every=2",
        "eval.before=false", "eval.num_samples=0", "wandb.mode=disabled"]


def _cli(args, log_path, env_extra=None):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0",
               **(env_extra or {}))
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "lora3.run", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT), log


def _wait_for(predicate, proc, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter" / "adapter.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compose, lora3_cache):
    """An uninterrupted run in this process."""
    from lora3.run.job import run_job

    out = tmp_path_factory.mktemp("reference") / "run"
    metrics = run_job(compose([*TINY, f"cache_dir={lora3_cache}"]), out)
    return out, metrics


@pytest.fixture(scope="module")
def compose():  # module scope (the conftest fixture is per test)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module


    def make(overrides=()):
        with initialize_config_module(config_module="lora3.run.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return make


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference, lora3_cache):
    ref_dir, ref = reference
    out = tmp_path / "run"
    args = [*TINY, f"cache_dir={lora3_cache}", f"hydra.run.dir={out}"]
    proc, log = _cli(args, tmp_path / "killed.log", {tr.PAUSE_ENV: "3"})
    try:
        ckpt = out / "checkpoints" / "step-00000002"
        _wait_for(lambda: ckpt.is_dir() and "pausing after step 3" in (tmp_path / "killed.log").read_text(),
                  proc, 300, "the checkpoint of step 2 and the pause after step 3")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    assert [p.name for p in tr.list_checkpoints(out)] == ["step-00000002"]

    # A half-written checkpoint of either kind is never picked up.
    root = out / "checkpoints"
    (root / ".step-00000004.tmp-99999").mkdir()
    (root / ".step-00000004.tmp-99999" / "state.npz").write_bytes(b"PK\x03\x04partial")
    (root / "step-00000003").mkdir()
    good = (root / "step-00000002" / "state.npz").read_bytes()
    (root / "step-00000003" / "state.npz").write_bytes(good[: len(good) // 2])
    meta = json.loads((root / "step-00000002" / "meta.json").read_text())
    (root / "step-00000003" / "meta.json").write_text(json.dumps(dict(meta, step=3)))

    r = subprocess.run([sys.executable, "-m", "lora3.run", *args, "resume=true"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, KERAS_BACKEND=BACKEND, WANDB_ERROR_REPORTING="false"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "step-00000003 is unreadable" in r.stdout
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from"] == 2

    # Bitwise: the loss curve and every adapter tensor.
    keys = ("step", "train/loss", "val/loss", "val/accuracy")
    assert [{k: h.get(k) for k in keys} for h in resumed["history"]] == \
           [{k: h.get(k) for k in keys} for h in ref["history"]]
    a, b = _tensors(ref_dir), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_same_seed_same_curve_and_adapter(tmp_path, reference, compose, lora3_cache):
    """Reproducibility in one process: a second run of the same config gives the same bits; the run
    records the versions and data hashes (metrics.json; W&B config gets the same, see test_reliability)."""
    from lora3.run.job import run_job

    ref_dir, ref = reference
    again = run_job(compose([*TINY, f"cache_dir={lora3_cache}"]), tmp_path / "again")
    assert again["history"] == ref["history"]
    a, b = _tensors(ref_dir), _tensors(tmp_path / "again")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for key in ("keras", "keras_hub", "lora3", "numpy"):
        assert again["versions"][key]
    assert again["backend"] == BACKEND and again["versions"].get(BACKEND)
    assert again["data"]["fingerprint"] and again["data"]["generator_version"]
