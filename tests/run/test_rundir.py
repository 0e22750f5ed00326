"""lora3/run/rundir.py and locking.py: a run directory is claimed by one process and left clean on bad input."""

import subprocess
import sys
import time

import pytest

from lora3.errors import Lora3Error
from lora3.run import rundir
from lora3.run.locking import Busy, exclusive

pytestmark = pytest.mark.one_backend  # file system behaviour


def test_bad_input_removes_what_the_job_made_but_its_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(Lora3Error):
        with rundir.claim(out):
            (out / "run.log").write_text("log")
            (out / "config.yaml").write_text("x")
            (out / "adapter").mkdir()
            raise Lora3Error("bad targets")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "run.log"]


def test_a_fresh_directory_is_removed_entirely_on_bad_input(tmp_path):
    with pytest.raises(Lora3Error):
        with rundir.claim(tmp_path / "fresh"):
            raise Lora3Error("bad")
    assert not (tmp_path / "fresh").exists()


def test_a_training_failure_keeps_everything(tmp_path):
    class TrainingError(Lora3Error):
        pass

    with pytest.raises(TrainingError):
        with rundir.claim(tmp_path / "run"):
            (tmp_path / "run" / "checkpoints").mkdir()
            raise TrainingError("NaN at step 3")
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_finished_and_unfinished_runs_are_refused(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(rundir.AppConfigError, match="already holds a finished run.*resume=true"):
        rundir.check_output_dir(tmp_path, resume=False)
    rundir.check_output_dir(tmp_path, resume=True)


def test_the_lock_holds_across_processes_and_is_released_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lora3.run.locking import exclusive\n"
        f"with exclusive({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy):
            with exclusive(tmp_path):
                pass
        assert rundir.is_busy(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while rundir.is_busy(tmp_path) and time.time() < deadline:
        time.sleep(0.1)
    with exclusive(tmp_path):  # the kernel released it with the process
        pass
