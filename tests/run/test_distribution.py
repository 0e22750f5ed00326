"""distribution=data_parallel|model_parallel on simulated CPU devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before JAX starts, and this
suite's process has started JAX already: the JAX checks run in ONE child process
(`python tests/run/test_distribution.py child <out.json>`) that does every check and reports a JSON
summary; the tests below read it. They are JAX-only by nature (keras.distribution); the
TensorFlow pass tests the clear refusal instead.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution trains on the JAX backend only "
                              "(simulated CPU devices via XLA_FLAGS); the TensorFlow pass tests the refusal")
STEPS = 3
BATCH = 12  # does not divide the 8 data-parallel devices: padded to 16 (model_parallel: 2 replicas)
RTOL = 1e-5


# ---------------------------------------------------------------- the child (8 CPU devices)

def _child(out_path):
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path[:0] = [str(REPO), str(TESTS)]
    import keras

    import lora3
    import tiny
    from lora3.run import distribution as dist

    assert len(keras.distribution.list_devices()) == 8, keras.distribution.list_devices()
    report = {"losses": {}, "layouts": {}, "adapters": {}, "errors": {}, "timings": {}}
    tmp = Path(out_path).parent

    def data(kind, n, seed=0):
        rng = np.random.default_rng(seed)
        if kind == "t5":
            x = tiny.t5_inputs(batch=n, enc=8, dec=6, vocab=40, seed=seed)
            y = rng.integers(3, 40, (n, 6)).astype("int32")
            sw = (rng.random((n, 6)) > 0.2).astype("float32")
        else:
            x = tiny.gemma_inputs(batch=n, length=8, vocab=40, seed=seed)
            y = rng.integers(3, 40, (n, 8)).astype("int32")
            sw = (rng.random((n, 8)) > 0.2).astype("float32")
        return x, y, sw

    def build(kind):
        keras.utils.set_random_seed(0)
        if kind == "t5":
            m = tiny.t5_lm(layers=1, hidden=16, heads=2, ff=32)
        else:
            m = tiny.gemma_lm(layers=1, heads=4, kv_heads=2, head_dim=4, hidden=16, ff=32)  # kv heads 2 on a model axis of 4
        # identical weights whatever the layout: draw them from numpy by path
        for v in m.weights:
            r = np.random.default_rng(abs(hash(v.path)) % 2**32)
            if "norm" in v.path or "layer_norm" in v.path:
                continue
            v.assign((r.standard_normal(tuple(v.shape)) * 0.2).astype("float32"))
        lora3.apply_lora(m, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
        for w in lora3.lora_layers(m):
            r = np.random.default_rng(abs(hash(w.path)) % 2**32)
            w.lora_A.assign((r.standard_normal(tuple(w.lora_A.shape)) * 0.3).astype("float32"))
        m.preprocessor = None
        m.compile(optimizer=keras.optimizers.AdamW(1e-2, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return m

    def run(kind, mode, batch=BATCH, **cfg):
        dist.reset()
        keras.backend.clear_session()
        setup = dist.setup({"mode": mode, **cfg}, "t5" if kind == "t5" else "gemma", keras)
        t0 = time.perf_counter()
        m = build(kind)
        x, y, sw = data(kind, batch * STEPS)
        xs, ys, sws, b = dist.pad_train_batches(x, y, sw, batch, setup)
        hist = m.fit(xs, ys, sample_weight=sws, batch_size=b, epochs=1, shuffle=False, verbose=0)
        # teacher-forced loss on 13 rows (not a multiple of 8): padded evaluation
        xv, yv, swv = data(kind, 13, seed=1)
        (ev, eb) = dist.pad_eval((xv, yv, swv), 8, setup)
        res = m.evaluate(ev[0], ev[1], sample_weight=ev[2], batch_size=eb, verbose=0, return_dict=True)
        report["timings"][f"{kind}/{mode}/{batch}"] = time.perf_counter() - t0
        return m, setup, {"train": float(hist.history["loss"][-1]), "eval": float(res["loss"]),
                          "acc": float(res["accuracy"])}

    for kind in ("t5", "gemma"):
        _, _, base = run(kind, "none")
        report["losses"][f"{kind}/none"] = base
        m, s, r = run(kind, "data_parallel")
        report["losses"][f"{kind}/data_parallel"] = r
        m, s, r = run(kind, "model_parallel", mesh_shape=[2, 4])
        report["losses"][f"{kind}/model_parallel"] = r
        report["layouts"][kind] = {p: [list(spec), note] for p, (spec, note) in s.distribution.decisions.items()}
        # sharded state really is sharded
        report["layouts"][kind + "/sharded_vars"] = sorted(
            v.path for v in m.weights if not v.value.sharding.is_fully_replicated)
        # adapter saved from the 2x4 mesh: same file layout as single-device, loads on one device
        lora3.save_adapter(m, tmp / f"{kind}-mp")
        saved = {w.path: (np.asarray(w.lora_A), np.asarray(w.lora_B)) for w in lora3.lora_layers(m)}
        dist.reset()
        keras.backend.clear_session()
        one = build(kind)
        lora3.save_adapter(one, tmp / f"{kind}-single")
        lora3.load_adapter(one, tmp / f"{kind}-mp")
        same = all(np.array_equal(np.asarray(w.lora_A), saved[w.path][0])
                   and np.array_equal(np.asarray(w.lora_B), saved[w.path][1]) for w in lora3.lora_layers(one))
        devices = {str(d) for w in lora3.lora_layers(one) for d in w.lora_A.value.devices()}
        report["adapters"][kind] = {"loaded_equal": same, "devices_after_load": sorted(devices)}

    # the keras-hub Gemma trap: kv heads (2) do not divide the model axis (4)
    dist.reset()
    keras.backend.clear_session()
    dist.setup({"mode": "model_parallel", "mesh_shape": [2, 4], "on_indivisible": "error"}, "gemma", keras)
    try:
        tiny.gemma_lm(heads=4, kv_heads=2, head_dim=4, hidden=16, ff=32)
        report["errors"]["gemma_strict"] = None
    except dist.DistributionError as e:
        report["errors"]["gemma_strict"] = str(e)
    dist.reset()
    Path(out_path).write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def child_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "report.json"
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__)), "child", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    report["wall"] = time.perf_counter() - t0
    report["_dir"] = str(tmp)
    print(f"distribution child: {report['wall']:.1f}s", report["timings"])
    return report


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@jax_only
@pytest.mark.parametrize("kind", ["t5", "gemma"])
@pytest.mark.parametrize("mode", ["data_parallel", "model_parallel"])
def test_distributed_loss_matches_single_device(child_report, kind, mode):
    base = child_report["losses"][f"{kind}/none"]
    got = child_report["losses"][f"{kind}/{mode}"]
    for key in ("train", "eval", "acc"):
        assert _rel(got[key], base[key]) < RTOL, (kind, mode, key, got, base)


def test_uneven_batches_are_padded_exactly():
    """Zero-weight padding rows and B'/B-scaled real rows: the same weighted mean (no keras needed)."""
    from lora3.run import distribution as dist

    setup = dist.Setup(mode="data_parallel", replicas=8)
    rng = np.random.default_rng(0)
    x = {"ids": rng.integers(0, 9, (36, 5))}
    y, sw = rng.integers(0, 9, (36, 5)), (rng.random((36, 5)) > 0.3).astype("float32")
    px, py, psw, b = dist.pad_train_batches(x, y, sw, 12, setup)
    assert b == 16 and len(py) == 48 and px["ids"].shape == (48, 5)
    for s in range(3):  # each padded batch: sum(w*l)/(16*T) equals the original sum(w*l)/(12*T)
        loss = rng.random((12, 5))
        lp = np.concatenate([loss, np.ones((4, 5))])
        ref = (sw[s * 12:(s + 1) * 12] * loss).sum() / (12 * 5)
        assert abs((psw[s * 16:(s + 1) * 16] * lp).sum() / (16 * 5) - ref) < 1e-6
    (ex, ey, esw), eb = dist.pad_eval((x, y, sw), 10, setup)
    assert eb == 16 and len(ey) == 48 and abs(esw.sum() - sw.sum() * 48 / 36) < 1e-3
    two = dist.Setup(mode="data_parallel", replicas=2, num_processes=2, process_id=1)
    lx, ly, lsw, lb = dist.pad_train_batches(x, y, sw, 12, two)  # process 1 feeds rows 6..11 of each batch
    assert lb == 6 and np.array_equal(ly, np.concatenate([y[6:12], y[18:24], y[30:36]]))
    with pytest.raises(dist.DistributionError, match="trainer.batch_size=12 does not divide by the 8"):
        dist.pad_train_batches(x, y, sw, 12, dist.Setup(mode="data_parallel", replicas=8, uneven_batch="error"))


@jax_only
def test_model_parallel_layouts_cover_lora(child_report):
    t5 = child_report["layouts"]["t5"]
    q = "transformer_encoder_layer_0/self_attention/query_projector"
    o = "transformer_encoder_layer_0/output_projector"
    assert t5[q + "/kernel"][0] == [None, "model"]
    assert t5[q + "/lora_A"][0] == [None, None] and t5[q + "/lora_B"][0] == [None, "model"]
    assert t5[o + "/kernel"][0] == ["model", None]
    assert t5[o + "/lora_A"][0] == [None, "model"] and t5[o + "/lora_B"][0] == [None, None]  # A is (rank, in)
    gemma = child_report["layouts"]["gemma"]
    k = "decoder_block_0/attention/key"
    assert gemma[k + "/kernel"][0] == [None, None, None]
    assert "num_key_value_heads=2" in gemma[k + "/kernel"][1]
    assert gemma[k + "/lora_B"][0] == [None, None]  # the adapter follows its replicated kernel
    qg = "decoder_block_0/attention/query"
    assert gemma[qg + "/kernel"][0] == ["model", None, None] and gemma[qg + "/lora_B"][0] == [None, "model"]
    for kind in ("t5", "gemma"):
        sharded = child_report["layouts"][kind + "/sharded_vars"]
        assert any(p.endswith("/lora_B") for p in sharded) and any(p.endswith("/lora_A") for p in sharded)
        assert any(p.endswith("/kernel") for p in sharded)


@jax_only
def test_gemma_indivisible_kv_heads_strict_error_names_dimension(child_report):
    msg = child_report["errors"]["gemma_strict"]
    assert msg and "num_key_value_heads=2" in msg and "'model' mesh axis (4 devices)" in msg


@jax_only
@pytest.mark.parametrize("kind", ["t5", "gemma"])
def test_adapter_from_mesh_loads_on_one_device(child_report, kind, tmp_path):
    info = child_report["adapters"][kind]
    assert info["loaded_equal"]
    assert len(info["devices_after_load"]) == 1
    mp_dir = Path(child_report_dir(child_report)) / f"{kind}-mp"
    one_dir = mp_dir.with_name(f"{kind}-single")
    from safetensors import safe_open

    def layout(d):
        files = sorted(p.name for p in d.iterdir())
        with safe_open(str(d / "adapter.safetensors"), "np") as f:
            return files, {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert layout(mp_dir) == layout(one_dir)
    cfg_mp = json.loads((mp_dir / "adapter_config.json").read_text())
    cfg_one = json.loads((one_dir / "adapter_config.json").read_text())
    cfg_mp.pop("sha256"), cfg_one.pop("sha256")  # the weights differ (trained vs not), the rest must not
    assert cfg_mp == cfg_one


def child_report_dir(report):
    return report["_dir"]


def test_tensorflow_or_bad_config_refused_at_once(compose):
    from lora3.run.schema import AppConfigError
    from lora3.run.schema import validate

    cfg = compose(["distribution=data_parallel", "backend=tensorflow"])
    with pytest.raises(AppConfigError, match="needs backend=jax.*backend=tensorflow supports distribution=none"):
        validate(cfg)
    with pytest.raises(AppConfigError, match="distribution.coordinator"):
        validate(compose(["distribution=data_parallel", "distribution.num_processes=2"]))
    with pytest.raises(AppConfigError, match="distribution.mode='pipeline'"):
        validate(compose(["distribution=data_parallel", "distribution.mode=pipeline"]))
    assert validate(compose([]))["distribution"]["mode"] == "none"
    assert validate(compose(["distribution=model_parallel"]))["distribution"]["model_size"] >= 1


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@jax_only
@pytest.mark.slow
def test_two_processes_on_loopback_train_in_step_and_only_process_0_writes(tmp_path, lora3_cache):
    """Two `python -m lora3.run` processes, one CPU device each, joined by keras.distribution.initialize
    (jax.distributed over 127.0.0.1, gloo CPU collectives): one data-parallel run of 2 devices."""
    import re

    run_dir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               WANDB_ERROR_REPORTING="false", TF_CPP_MIN_LOG_LEVEL="2", HYDRA_FULL_ERROR="0")
    env.pop("WANDB_MODE", None)
    args = ["experiment=smoke", "wandb.mode=offline", "distribution=data_parallel", "distribution.num_processes=2",
            f"distribution.coordinator=127.0.0.1:{port}", f"hydra.run.dir={run_dir}", f"cache_dir={lora3_cache}"]
    procs = [subprocess.Popen([sys.executable, "-m", "lora3.run", *args, f"distribution.process_id={i}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
        assert f"2 process(es), this is process {i}" in out
    steps = [re.findall(r"\[lora3\] step (\d+): (.*)", out) for out in outs]
    assert steps[0] and steps[0] == steps[1], steps  # same steps, same losses, in step
    assert (run_dir / "metrics.json").is_file() and (run_dir / "adapter").is_dir()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run: process 0's
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "finished" and len(m["devices"]) == 2


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    _child(sys.argv[2])
