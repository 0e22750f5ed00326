"""Sweeps that survive: two sweeps started at the same time into the same root get their own
directories (`${unique_dir:...}` claims a name with an atomic mkdir; the default hydra.run.dir and
hydra.sweep.dir use it), a failing job leaves the others running, and each sweep's summary lists which
jobs failed and why. One run directory is used by one process at a time (flock)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora3.run import tracking
from lora3.run.rundir import RunDirBusy, claim, unique_dir

pytestmark = pytest.mark.one_backend
REPO = Path(__file__).resolve().parents[2]


def test_unique_dir_claims_a_fresh_name_concurrently(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: unique_dir(str(tmp_path / "same")), range(16)))
    assert len(set(got)) == 16 and all(Path(g).is_dir() for g in got)
    cfg = (REPO / "conf" / "config.yaml").read_text()
    assert "dir: ${unique_dir:outputs/" in cfg and "dir: ${unique_dir:multirun/" in cfg


def test_a_run_dir_is_locked_while_a_job_runs(tmp_path):
    with claim(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match="in use by another lora3 process"):
            with claim(tmp_path / "run"):
                pass
    with claim(tmp_path / "run"):  # free again
        pass


@pytest.mark.slow
def test_two_sweeps_at_once_into_the_same_root(tmp_path, lora3_cache):
    root = tmp_path / "root"
    args = ["-m", "rank=0,2", "experiment=smoke", "model.base=null", "backend=jax", "trainer.max_steps=2",
            "eval.before=false", "eval.num_samples=0", "wandb.mode=offline", f"cache_dir={lora3_cache}",
            f"hydra.sweep.dir=${{unique_dir:{root}/same}}"]
    env = dict(os.environ, KERAS_BACKEND="jax", WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0")
    procs = [subprocess.Popen([sys.executable, "-m", "lora3.run", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs[0][-2000:]  # one failing job each: exit 1
    sweeps = sorted(p for p in root.iterdir() if p.is_dir())
    assert [p.name for p in sweeps] == ["same", "same-1"]
    run_ids = set()
    for sweep in sweeps:
        summary = json.loads((sweep / "sweep_summary.json").read_text())
        assert [j["status"] for j in summary["jobs"]] == ["failed", "finished"]
        assert "rank=0 is not valid" in summary["jobs"][0]["error"]
        assert summary["sweep_dir"] == str(sweep)
        assert "rank: 2" in (sweep / "1" / "config.yaml").read_text()
        assert sorted(os.listdir(sweep / "0")) == [".hydra", "error.json", "run.log"]
        runs = tracking.find_offline_runs(sweep / "1")
        assert len(runs) == 1
        run_ids.add(runs[0].name)
    assert len(run_ids) == 2  # separate W&B runs
