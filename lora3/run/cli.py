"""The command line: `python -m lora3.run rank=8 backend=jax` (Hydra; configs in `conf/`).

- A single run is checked first (`precheck`): the config against the schema, the output directory
  and the data files, before Hydra creates anything, so bad input leaves no file at all.
- Each job runs `lora3.run.job.run_job`. In a multirun where a job asks for a backend other than
  the one this process already imported, the job runs in a fresh `python -m lora3.run
  --lora3-child <spec>` process (the backend is chosen once per process, before keras is imported).
- Errors exit non-zero without a traceback (`HYDRA_FULL_ERROR=1` shows it). In a multirun a failing
  job records `error.json` and the sweep goes on; `sweep_summary.json` lists every job's status and
  the exit status is 1 if any job failed (`SweepSummary`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from lora3.errors import Lora3Error
from lora3.fileio import atomic_write_text
from lora3.run import backend, outputs, rundir, schema
from lora3.run.data import load as load_data
from lora3.run.job import run_job

log = logging.getLogger("lora3")


class JobFailed(Lora3Error):
    """A job run in a child process failed; its message is the child's."""


# ---------------------------------------------------------------- before Hydra: a single run's inputs


def precheck(argv: list[str]) -> int:
    """The command line's check before Hydra creates anything: for a single run given as plain
    `key=value` overrides, composes the config, validates it against the schema, checks the output
    directory and reads the data. Returns 0 when the run may start, else prints the problem (no
    traceback unless HYDRA_FULL_ERROR=1) and returns 1.

    What needs keras (targets that match nothing, a rank above a layer's width, sequences over the
    limits) is found by the job itself, which then removes whatever it created except `.hydra/` and
    `run.log`. Command lines with flags (`-m`, `--cfg`, `--help`, `--config-dir`, ...) are left to
    Hydra: a sweep's bad combination fails its own job and the others go on.
    """
    if any(a.startswith("-") for a in argv):
        return 0
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        cfg = schema.compose(argv, return_hydra_config=True)
    except ConfigCompositionException as e:
        m = re.search(r"Could not override '([^']+)'", str(e))
        hint = schema.unknown_key_hint(m.group(1)) if m and not full_error else ""
        if not hint:
            return 0  # Hydra reports composition errors itself (naming the valid options), before creating anything
        print(f"[lora3] error: {m.group(1)} is not a key of the config {hint}", file=sys.stderr)
        return 1
    except Exception:
        return 0
    try:
        run_dir = str(OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir", ""))
        plain = schema.validate(OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                                                  if k != "hydra"}))
        if "unique_dir" not in run_dir:  # a fresh directory from unique_dir holds nothing: don't claim it here
            out = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).resolve()
            if not (plain["resume"] and (out / "metrics.json").is_file()):
                rundir.check_output_dir(out, plain["resume"])
            if rundir.is_busy(out):
                raise rundir.RunDirBusy(rundir.busy_message(out))
        if plain["data"].get("source") != "wmt16":
            load_data(plain["data"], seed=plain["seed"])
    except Lora3Error as e:
        if full_error:
            raise
        print(f"[lora3] error: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- Hydra's task: one job


def _report_failure(e: BaseException, out: Path | None, multirun: bool):
    expected = isinstance(e, Lora3Error)
    msg = str(e) if expected else f"{type(e).__name__}: {e}"
    if expected:
        log.error("%s", msg)
    else:
        log.error("unexpected error: %s\n%s", msg, traceback.format_exc())
    if multirun and out is not None:
        try:
            atomic_write_text(Path(out) / "error.json", json.dumps(
                {"status": "failed", "error": msg, "type": type(e).__name__}, indent=1))
        except OSError:
            pass


def _job_info() -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    info = {"multirun": multirun, "choices": {k: v for k, v in hc.runtime.choices.items()
                                             if not k.startswith("hydra")},
            "overrides": list(hc.overrides.task)}
    if multirun:
        sweep = Path(hc.sweep.dir)
        info.update(sweep_dir=str(sweep), sweep_group=f"{sweep.parent.name}_{sweep.name}", job_num=hc.job.num)
    return info


def hydra_task(cfg) -> float:
    """The Hydra task function: one job. Returns the objective (NaN when the job failed)."""
    out = Path(HydraConfig.get().runtime.output_dir)
    job = _job_info()
    try:
        plain = schema.validate(cfg)
        have = backend.imported_backend()
        if have is not None and have != plain["backend"]:
            metrics = run_in_child(plain, str(out), job)
        else:
            metrics = run_job(cfg, out, job=job)
        return outputs.objective_value(metrics, plain["objective"])
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, JobFailed):  # the child already reported it
            log.error("%s", e)
        else:
            _report_failure(e, out, job["multirun"])
        if job["multirun"]:
            return float("nan")
        raise SystemExit(1)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, writes sweep_summary.json (every job's status, metrics or error),
    prints it, and exits with status 1 if any job failed."""

    def on_multirun_end(self, config, **kwargs):
        summary = outputs.summarize_sweep(Path(config.hydra.sweep.dir))
        failed = [j for j in summary["jobs"] if j["status"] != "finished"]
        print(f"\n[lora3] sweep {summary['sweep_dir']}: {len(summary['jobs']) - len(failed)} finished, "
              f"{len(failed)} failed", flush=True)
        for j in summary["jobs"]:
            detail = (f"bleu={j['best_val_bleu']:.2f}" if j.get("best_val_bleu") is not None
                      else j.get("error", ""))
            print(f"  {j['job']:<4} {j['status']:<9} {j['backend'] or '':<11} {j['overrides']}  {detail}")
        if failed:
            raise SystemExit(1)


# ---------------------------------------------------------------- one process per backend


def run_in_child(plain: dict, output_dir: str, job: Mapping[str, Any]) -> dict:
    """Runs the job in a fresh Python process (for a backend other than the imported one)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / ".lora3_child_job.json"
    atomic_write_text(spec, json.dumps({"config": plain, "output_dir": str(out), "job": dict(job)}))
    env = dict(os.environ, KERAS_BACKEND=plain["backend"])
    log.info("backend=%s differs from this process's keras backend: running the job in a new process",
             plain["backend"])
    proc = subprocess.run([sys.executable, "-m", "lora3.run", "--lora3-child", str(spec)], env=env)
    spec.unlink(missing_ok=True)
    if proc.returncode != 0:
        err = out / "error.json"
        msg = json.loads(err.read_text()).get("error") if err.is_file() else f"exit status {proc.returncode}"
        raise JobFailed(f"job in child process failed: {msg}")
    return json.loads((out / "metrics.json").read_text())


def _child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out / "run.log")])
    try:
        run_job(spec["config"], out, job=spec["job"])
        return 0
    except Exception as e:
        _report_failure(e, out, multirun=True)
        return 1


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--lora3-child":
        sys.exit(_child_main(sys.argv[2]))
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    rc = precheck(sys.argv[1:])
    if rc:
        sys.exit(rc)
    hydra.main(version_base="1.3", config_path="pkg://" + schema.CONF_MODULE, config_name="config")(hydra_task)()
