"""Training: schedule, data order, atomic checkpoints, resume equals an uninterrupted run."""

import json

import numpy as np
import pytest

from lora3.run import train as tr


def test_lr_schedule_warmup_and_decay():
    kw = dict(peak=1e-2, warmup=10, total=110, min_ratio=0.1)
    cos = [tr.lr_at(s, schedule="cosine", **kw) for s in range(110)]
    assert cos[0] == pytest.approx(1e-3) and cos[9] == pytest.approx(1e-2)
    assert cos[-1] == pytest.approx(1e-3, rel=1e-2) and all(a >= b for a, b in zip(cos[10:], cos[11:]))
    lin = [tr.lr_at(s, schedule="linear", **kw) for s in range(110)]
    assert lin[60] == pytest.approx(1e-3 + 9e-3 * 0.5)
    assert tr.lr_at(100, schedule="constant", **kw) == 1e-2


def test_keras_schedule_matches_python(backend_name):
    from lora3.run import backend

    keras = backend.select(backend_name)
    for kind in ("cosine", "linear", "constant"):
        sched = tr.make_schedule(2e-3, 5, 50, kind, 0.1)
        for s in (0, 3, 5, 20, 49):
            got = float(keras.ops.convert_to_numpy(sched(s)))
            assert got == pytest.approx(tr.lr_at(s, peak=2e-3, warmup=5, total=50, schedule=kind, min_ratio=0.1),
                                        rel=1e-5)


def test_lora_plus_trains_b_at_ratio_times_the_rate_in_a_fit(backend_name):
    """`trainer.lora_plus_ratio`: one jit-compiled AdamW step from B = 0. A's gradient is zero there
    (it is multiplied by B), so A stays; Adam's first step is lr * g / (|g| + eps) (bias-corrected
    moments g and g^2), so B moves by -ratio * lr * sign(g): the closed form, not the code's output."""
    from lora3.run import backend

    keras = backend.select(backend_name)
    import lora3

    ratio, lr = 16.0, 1e-3
    keras.utils.set_random_seed(0)
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = keras.layers.Dense(3, name="proj")

        def call(self, x):
            return self.proj(x)

    model = keras.Sequential([keras.Input((4,)), Block(name="block")])
    lora3.apply_lora(model, rank=2, alpha=2, targets=".*block/proj")
    layer = lora3.lora_layers(model)[0]
    a0 = keras.ops.convert_to_numpy(layer.lora_A).copy()
    opt = tr.lora_plus_optimizer(keras.optimizers.AdamW, ratio)(learning_rate=lr, weight_decay=0.0)
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    b = keras.ops.convert_to_numpy(layer.lora_B)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.lora_A), a0)
    assert np.all(b != 0)
    np.testing.assert_allclose(np.abs(b), ratio * lr, rtol=1e-3)  # |g| >> eps = 1e-7 here


def test_lora_plus_weight_decay_runs_at_each_variables_rate(backend_name):
    """With zero gradients only AdamW's decoupled decay acts: v * (1 - wd * lr), at B's rate for B,
    as PEFT's two parameter groups decay."""
    from lora3.run import backend

    keras = backend.select(backend_name)
    ratio, lr, wd = 4.0, 0.01, 0.5
    opt = tr.lora_plus_optimizer(keras.optimizers.AdamW, ratio)(learning_rate=lr, weight_decay=wd)
    a = keras.Variable(np.ones((2, 3), "float32"), name="lora_A")
    b = keras.Variable(np.ones((2, 3), "float32"), name="lora_B")
    named = keras.Variable(np.ones((2, 3), "float32"), name="lora_B_fr")  # a named adapter's B
    opt.apply([np.zeros((2, 3), "float32")] * 3, [a, b, named])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a), 1 - wd * lr, rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(b), 1 - wd * lr * ratio, rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(named), 1 - wd * lr * ratio, rtol=1e-6)


@pytest.mark.one_backend
def test_lora_plus_ratio_is_a_trainer_key_for_lora_runs(compose):
    from lora3.run.schema import AppConfigError, validate

    assert validate(compose(["trainer.lora_plus_ratio=16"]))["trainer"]["lora_plus_ratio"] == 16
    assert validate(compose([]))["trainer"]["lora_plus_ratio"] is None
    with pytest.raises(AppConfigError, match=r"trainer.lora_plus_ratio=0 is not valid: it must be a positive number"):
        validate(compose(["trainer.lora_plus_ratio=0"]))
    with pytest.raises(AppConfigError, match=r"trainer.lora_plus_ratio=16.0 sets LoRA B's learning rate: it needs finetune=lora"):
        validate(compose(["lora=full", "trainer.lora_plus_ratio=16"]))


def test_batch_order_is_a_pure_function_of_seed_and_step():
    whole = tr.batch_indices(10, 4, 0, 8, seed=1)
    parts = np.concatenate([tr.batch_indices(10, 4, 0, 3, seed=1), tr.batch_indices(10, 4, 3, 8, seed=1)])
    np.testing.assert_array_equal(whole, parts)
    assert sorted(whole[:10]) == list(range(10))  # each pass is a permutation
    assert not np.array_equal(whole, tr.batch_indices(10, 4, 0, 8, seed=2))


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-00000004.tmp-123").mkdir(parents=True)
    (root / ".step-00000004.tmp-123" / "state.npz").write_bytes(b"partial")
    (root / "step-00000002").mkdir()
    (root / "step-00000002" / "state.npz").write_bytes(b"x")  # no meta.json: incomplete
    assert tr.list_checkpoints(tmp_path) == []
    (root / "step-00000002" / "meta.json").write_text("{}")
    assert tr.list_checkpoints(tmp_path) == [root / "step-00000002"]


class Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.one_backend  # both backends: the real SIGKILL test in test_crash_resume.py
def test_resume_continues_from_checkpoint_and_matches_uninterrupted(tmp_path, backend_name, lora3_cache, compose):
    from lora3.run import backend
    from lora3.run.job import run_job

    keras = backend.select(backend_name)

    overrides = ["experiment=smoke", f"backend={backend_name}", f"cache_dir={lora3_cache}",
                 "trainer.max_steps=4", "eval.every=2", "eval.before=false"]
    full = run_job(compose(overrides), tmp_path / "full")

    class CrashAfter(keras.callbacks.Callback):
        """Simulates a crash in the middle of the second evaluation period (after 3 steps)."""

        def __init__(self):
            super().__init__()
            self.seen = 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == 3:
                raise Crash()

    with pytest.raises(Crash):
        run_job(compose(overrides), tmp_path / "crashed", callbacks=(CrashAfter(),))
    assert not (tmp_path / "crashed" / "metrics.json").exists()
    assert not (tmp_path / "crashed" / "adapter").exists()
    assert [p.name for p in tr.list_checkpoints(tmp_path / "crashed")] == ["step-00000002"]

    with pytest.raises(Exception, match="resume=true"):  # an unfinished run is never overwritten
        run_job(compose(overrides), tmp_path / "crashed")
    resumed = run_job(compose(overrides + ["resume=true"]), tmp_path / "crashed")
    assert resumed["resumed_from"] == 2
    assert [h["step"] for h in resumed["history"]] == [2, 4]
    # Same batches, same state: the same losses (bitwise on CPU in practice; 1e-5 allowed).
    for a, b in zip(full["history"], resumed["history"]):
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=1e-5)
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
    cfg_a = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp_path / "crashed" / "adapter" / "adapter_config.json").read_text())
    assert cfg_a["layer_paths"] == cfg_b["layer_paths"]
    from safetensors.numpy import load_file

    ta = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    tb = load_file(str(tmp_path / "crashed" / "adapter" / "adapter.safetensors"))
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], atol=1e-5)
    # a rerun of a finished run with resume=true reports it and does no work
    again = run_job(compose(overrides + ["resume=true"]), tmp_path / "crashed")
    assert again["final"] == resumed["final"]
