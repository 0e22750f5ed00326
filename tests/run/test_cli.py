"""The experiment app end to end: compose API and CLI, outputs, sweeps, backends (bad inputs: test_bad_inputs.py)."""

import json
import os

import pytest

from lora3.errors import AdapterError
from lora3.run.job import run_job
from lora3.run.schema import AppConfigError, validate

SMOKE = ["experiment=smoke"]


def smoke(backend_name, cache, *extra):
    return [*SMOKE, f"backend={backend_name}", f"cache_dir={cache}", *extra]


# ---------------------------------------------------------------- config validation (no keras)

# Bad config values, bad CLI input and malformed files: the table in tests/suites/test_bad_inputs.py.


def test_default_config_is_valid_and_has_the_user_keys(compose):
    plain = validate(compose([]))
    for key in ("rank", "alpha", "backend", "model", "data", "targets", "seed"):
        assert key in plain
    assert plain["lora"]["rank"] == plain["rank"] == 8 and plain["model"]["name"] == "t5_tiny"
    assert plain["data"]["source"] == "synthetic" and plain["wandb"]["mode"] == "offline"
    assert plain["trainer"]["max_steps"] > 0 and "batch_size" in plain["trainer"] and "lr" in plain["trainer"]
    assert validate(compose(["lora=full"]))["finetune"] == "full"
    assert validate(compose(["lora=none"]))["finetune"] == "none"
    assert validate(compose(["model=flan_t5_base"]))["model"]["preset"] == "flan_base_multi"


# ---------------------------------------------------------------- one run in process (compose API)

@pytest.mark.slow
def test_run_job_writes_outputs_and_offline_wandb(compose, tmp_path, backend_name, lora3_cache):
    from lora3.run import tracking

    out = tmp_path / "run"
    m = run_job(compose(smoke(backend_name, lora3_cache, "wandb.mode=offline", "rank=4", "alpha=8")), out)
    assert m["status"] == "finished" and m["backend"] == backend_name
    assert m["versions"]["keras"] and m["versions"]["keras_hub"] and m["lora3_version"]
    assert 0 < m["params"]["trainable"] < m["params"]["total"]
    assert {"val/loss", "val/bleu", "val/chrf", "val/accuracy"} <= set(m["final"])
    assert {"val/loss", "val/bleu"} <= set(m["before"]) and "val/bleu" in m["best"]
    assert m["perf"]["tokens_per_s"] > 0 and m["perf"]["wall_seconds"] > 0 and m["perf"]["host_peak_rss_bytes"] > 0
    assert [h["step"] for h in m["history"]] == [2, 4]
    assert m["objective"]["name"] == "best/val/bleu"
    for f in ("metrics.json", "samples.jsonl", "config.yaml", "adapter/adapter_config.json",
              "adapter/adapter.safetensors"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"source", "reference", "hypothesis"} <= set(rows[0])
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["rank"] == 4

    runs = tracking.find_offline_runs(out)
    assert len(runs) == 1 and m["outputs"]["wandb_run_dir"] == str(runs[0])
    rec = tracking.read_offline_run(runs[0])
    assert rec["state"] == "finished"
    assert rec["config"]["lora.rank"] == 4 and rec["config"]["backend"] == backend_name
    assert rec["config"]["model.name"] == "t5_tiny" and rec["group"] is None
    summary = rec["summary"]
    assert summary["val/bleu"]["max"] == pytest.approx(m["best"]["val/bleu"])
    assert "train/loss" in summary and "params/trainable" in summary
    assert summary["val/samples"]["_type"] == "table-file"


@pytest.mark.slow
def test_lora_full_and_none_baselines(compose, tmp_path, backend_name, lora3_cache):
    full = run_job(compose(smoke(backend_name, lora3_cache, "lora=full", "trainer.max_steps=2")), tmp_path / "f")
    assert full["params"]["trainable"] == full["params"]["total"]
    assert (tmp_path / "f" / "model" / "config.json").is_file() and not (tmp_path / "f" / "adapter").exists()
    none = run_job(compose(smoke(backend_name, lora3_cache, "lora=none")), tmp_path / "n")
    assert none["params"]["trainable"] == 0 and none["history"] == []
    assert none["final"]["val/bleu"] == none["before"]["val/bleu"]


@pytest.mark.slow
def test_eval_adapter_alone_reproduces_the_trained_runs_scores(compose, tmp_path, backend_name, lora3_cache):
    """`lora=none eval.adapter=<dir>`: a saved adapter scored without training gives the scores the
    run that trained it reported (same validation subset, greedy); its PEFT copy (`lora.export=peft`)
    gives the same, and `lora.init_from=<PEFT copy>` trains on from exactly there."""
    trained = run_job(compose(smoke(backend_name, lora3_cache, "rank=4", "lora.export=peft")), tmp_path / "t")
    assert trained["outputs"]["adapter_peft"] == str(tmp_path / "t" / "adapter_peft")
    assert (tmp_path / "t" / "adapter_peft" / "adapter_model.safetensors").is_file()
    for adapter in ("adapter", "adapter_peft"):
        scored = run_job(compose(smoke(backend_name, lora3_cache, "lora=none", f"eval.adapter={tmp_path / 't' / adapter}")),
                         tmp_path / f"e_{adapter}")
        assert scored["params"]["trainable"] == 0 and scored["params"]["adapted_layers"] > 0 and scored["history"] == []
        assert scored["final"]["val/bleu"] == pytest.approx(trained["final"]["val/bleu"], abs=1e-6)
        assert scored["final"]["val/loss"] == pytest.approx(trained["final"]["val/loss"], rel=1e-5)
    resumed = run_job(compose(smoke(backend_name, lora3_cache, "rank=2", f"lora.init_from={tmp_path / 't' / 'adapter_peft'}",
                                    "trainer.max_steps=2")), tmp_path / "i")
    assert resumed["params"]["init_from"] == str(tmp_path / "t" / "adapter_peft")
    assert resumed["params"]["trainable"] == trained["params"]["trainable"]  # the adapter's rank 4, not rank=2
    assert resumed["before"]["val/loss"] == pytest.approx(trained["final"]["val/loss"], rel=1e-5)
    with pytest.raises(AdapterError, match="lora.init_from=.* is not an adapter directory"):
        run_job(compose(smoke(backend_name, lora3_cache, f"lora.init_from={tmp_path}")), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.json").exists()
    with pytest.raises(AppConfigError, match="use it with lora=none"):
        validate(compose(smoke(backend_name, lora3_cache, f"eval.adapter={tmp_path}")))


def test_finished_run_dir_is_not_overwritten(compose, tmp_path, backend_name):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(AppConfigError, match="already holds a finished run"):
        run_job(compose(smoke(backend_name, tmp_path)), tmp_path)
    assert (tmp_path / "metrics.json").read_text() == "{}"


# ---------------------------------------------------------------- the CLI

def test_cli_help_and_cfg_show_the_keys(run_cli):
    r = run_cli("--help")
    assert r.returncode == 0 and "model: " in r.stdout and "lora: " in r.stdout and "rank: 8" in r.stdout
    r = run_cli("--cfg", "job", "rank=4")
    assert r.returncode == 0 and "rank: 4" in r.stdout and "max_steps:" in r.stdout


@pytest.mark.slow
def test_cli_run_prints_what_it_did(run_cli, tmp_path, backend_name, lora3_cache):
    out = tmp_path / "run"
    r = run_cli(*smoke(backend_name, lora3_cache), "wandb.mode=offline", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    for needle in ("trainable", "val BLEU", "adapter", "W&B run", "wandb sync"):
        assert needle in r.stdout
    assert json.loads((out / "metrics.json").read_text())["backend"] == backend_name


@pytest.mark.slow
@pytest.mark.one_backend  # sweep bookkeeping; training on each backend is covered by the single-run tests
def test_cli_multirun_2x2_each_job_its_dir_and_wandb_run(run_cli, tmp_path, backend_name, lora3_cache):
    from lora3.run import tracking

    sweep = tmp_path / "sweep"
    r = run_cli("-m", "rank=2,4", "alpha=4,8", *smoke(backend_name, lora3_cache), "wandb.mode=offline",
                "trainer.max_steps=2", "eval.before=false",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["finished"] * 4
    seen, ids = set(), set()
    for j in range(4):
        m = json.loads((sweep / str(j) / "metrics.json").read_text())
        seen.add((m["params"]["lora"], json.loads((sweep / str(j) / "adapter" / "adapter_config.json").read_text())["alpha"]))
        runs = tracking.find_offline_runs(sweep / str(j))
        assert len(runs) == 1
        ids.add(runs[0].name.rsplit("-", 1)[1])
    assert len(seen) == 4 and len(ids) == 4
    rec = tracking.read_offline_run(tracking.find_offline_runs(sweep / "0")[0])
    assert rec["group"] == f"{sweep.parent.name}_{sweep.name}"  # one W&B group per sweep


@pytest.mark.slow
@pytest.mark.one_backend  # Hydra's sweep bookkeeping does not depend on the backend
def test_cli_failing_job_does_not_stop_the_sweep(run_cli, tmp_path, backend_name, lora3_cache):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "rank=0,2", *smoke(backend_name, lora3_cache), "trainer.max_steps=2", "eval.before=false",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["failed", "finished"]
    assert "rank=0" in summary["jobs"][0]["error"]
    assert (sweep / "1" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="runs both backends itself; once per suite pair is enough")
def test_cli_backend_multirun_runs_each_job_on_its_backend(run_cli, tmp_path, lora3_cache):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "backend=jax,tensorflow", *SMOKE, f"cache_dir={lora3_cache}", "trainer.max_steps=2",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    used = [json.loads((sweep / str(j) / "metrics.json").read_text())["backend"] for j in range(2)]
    assert used == ["jax", "tensorflow"]
    cfg1 = (sweep / "1" / "config.yaml").read_text()
    assert "backend: tensorflow" in cfg1


@pytest.mark.slow
@pytest.mark.one_backend  # the sweeper does not depend on the backend
def test_cli_optuna_search_returns_the_objective(run_cli, tmp_path, backend_name, lora3_cache):
    sweep = tmp_path / "opt"
    r = run_cli("hparams_search=optuna", "hydra.sweeper.n_trials=2", *smoke(backend_name, lora3_cache),
                "trainer.max_steps=2", "eval.before=false", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in res and "best_value" in res
    assert len(list(sweep.glob("*/metrics.json"))) == 2
