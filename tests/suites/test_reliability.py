"""Numerical faults: a NaN loss stops the run (naming the step and the last good checkpoint, W&B run
marked failed, last good checkpoint kept) or, with trainer.skip_nonfinite=true, the batch is skipped
and counted (metrics.json and W&B). NaN is injected with trainer.inject_nonfinite_steps (NaN sample
weights for that step's batch: a NaN loss and NaN gradients). Also: W&B records versions and hashes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lora3.run import tracking
from lora3.run import train as tr

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
TINY = ["experiment=smoke", "model.base=null", f"backend={BACKEND}", "trainer.max_steps=4", "eval.every=2",
        "eval.before=false", "eval.num_samples=0"]


def test_skip_optimizer_leaves_every_variable_as_it_was(backend_name):
    """The optimizer wrapper alone: a NaN batch changes no weight and no optimizer state."""
    from lora3.run import backend

    keras = backend.select(backend_name)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.ones((8, 1), "float32")
    sw_bad = np.ones((8,), "float32")
    sw_bad[4:] = np.nan  # the second batch of 4

    def fitted(n, sw):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        opt = tr.skip_nonfinite_optimizer(keras.optimizers.AdamW)(learning_rate=0.1)
        model.compile(optimizer=opt, loss="mse", jit_compile=True)
        model.fit(x[:n], y[:n], sample_weight=sw[:n], batch_size=4, shuffle=False, verbose=0)
        return [keras.ops.convert_to_numpy(v) for v in model.weights], int(keras.ops.convert_to_numpy(opt.iterations))

    (w_skip, it_skip), (w_one, it_one) = fitted(8, sw_bad), fitted(4, sw_bad)
    assert it_skip == it_one == 1
    for a, b in zip(w_skip, w_one):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, compose, lora3_cache):
    from lora3.run.job import run_job

    out = tmp_path / "run"
    with pytest.raises(tr.TrainingError) as e:
        run_job(compose([*TINY, f"cache_dir={lora3_cache}", "trainer.inject_nonfinite_steps=[3]",
                         "wandb.mode=offline"]), out)
    ckpt = out / "checkpoints" / "step-00000002"
    msg = str(e.value)
    assert "at step 3" in msg and str(ckpt) in msg and "trainer.skip_nonfinite=true" in msg
    # The last good state is left in place (finite, loadable by resume=true); nothing looks finished.
    assert [p.name for p in tr.list_checkpoints(out)] == ["step-00000002"]
    with np.load(ckpt / "state.npz") as state:
        assert all(np.isfinite(state[k]).all() for k in state.files if state[k].dtype.kind == "f")
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    # W&B: the run is marked failed; its config records versions and the data fingerprint.
    rec = tracking.read_offline_run(tracking.find_offline_runs(out)[0])
    assert rec["state"] == "failed"
    assert rec["config"]["versions.keras"] and rec["config"]["versions.keras_hub"]
    assert rec["config"]["versions.lora3"] and rec["config"][f"versions.{BACKEND}"]
    assert rec["config"]["backend"] == BACKEND and rec["config"]["data.fingerprint"]


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts(tmp_path, compose, lora3_cache):
    from lora3.run.job import run_job

    out = tmp_path / "run"
    m = run_job(compose([*TINY, f"cache_dir={lora3_cache}", "trainer.skip_nonfinite=true",
                         "trainer.inject_nonfinite_steps=[3]", "wandb.mode=offline"]), out)
    assert m["status"] == "finished" and m["nonfinite_skipped"] == 1
    assert json.loads((out / "metrics.json").read_text())["nonfinite_skipped"] == 1
    assert all(np.isfinite(h["train/loss"]) and np.isfinite(h["val/loss"]) for h in m["history"])
    from safetensors.numpy import load_file

    assert all(np.isfinite(t).all() for t in load_file(str(out / "adapter" / "adapter.safetensors")).values())
    rec = tracking.read_offline_run(tracking.find_offline_runs(out)[0])
    assert rec["state"] == "finished"
    assert rec["summary"]["train/nonfinite_skipped"] == 1
