"""Hydra launcher configs: submitit_slurm / submitit_local / ray, and a real 2-job submitit_local sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "conf" / "hydra" / "launcher"


def _hydra_cfg(compose_hydra, launcher, *overrides):
    return compose_hydra([f"hydra/launcher={launcher}", *overrides]).hydra.launcher


@pytest.fixture
def compose_hydra():
    from hydra import compose, initialize_config_module


    def make(overrides):
        with initialize_config_module(config_module="lora3.run.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)

    return make


def test_submitit_slurm_options(compose_hydra):
    cfg = _hydra_cfg(compose_hydra, "submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                     "hydra.launcher.timeout_min=30", "hydra.launcher.array_parallelism=4",
                     "hydra.launcher.setup=['module load cuda','export A=1']")
    assert cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (cfg.partition, cfg.gpus_per_node, cfg.timeout_min, cfg.array_parallelism) == ("gpu", 8, 30, 4)
    assert list(cfg.setup) == ["module load cuda", "export A=1"]
    # the launcher instantiates with these options (no cluster needed to build it)
    from hydra.utils import instantiate

    launcher = instantiate(cfg)
    assert launcher.params["partition"] == "gpu" and launcher.params["array_parallelism"] == 4


def test_submitit_local_and_ray_configs(compose_hydra):
    cfg = _hydra_cfg(compose_hydra, "submitit_local")
    assert cfg._target_.endswith("submitit_launcher.LocalLauncher")
    ray = yaml.safe_load((LAUNCHERS / "ray.yaml").read_text())
    assert ray["_target_"] == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    text = (LAUNCHERS / "ray.yaml").read_text()
    assert "own environment" in text and "cloudpickle<3" in text


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="the launcher does not depend on the backend: the sweep runs once, in the JAX pass")
def test_submitit_local_two_job_sweep(tmp_path, lora3_cache):
    """Each job is a fresh process with its own output dir and its own W&B run."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("WANDB_MODE", None)
    env.pop("XLA_FLAGS", None)
    backend = os.environ.get("KERAS_BACKEND", "jax")
    proc = subprocess.run(
        [sys.executable, "-m", "lora3.run", "-m", "hydra/launcher=submitit_local", "experiment=smoke", "rank=2,4",
         f"backend={backend}", "wandb.mode=offline", "trainer.max_steps=2", "eval.every=2", f"cache_dir={lora3_cache}",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["finished", "finished"]
    assert (sweep / ".submitit").is_dir()  # really went through submitit
    run_ids, run_dirs = set(), set()
    for n in ("0", "1"):
        job = sweep / n
        m = json.loads((job / "metrics.json").read_text())
        assert m["outputs"]["adapter"].startswith(str(job))
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        run_dirs.add(runs[0])
        run_ids.add((job / ".wandb_run_id").read_text().strip())
    assert len(run_ids) == 2 and len(run_dirs) == 2
    assert json.loads((sweep / "0" / "metrics.json").read_text())["params"]["lora"] != \
        json.loads((sweep / "1" / "metrics.json").read_text())["params"]["lora"]
