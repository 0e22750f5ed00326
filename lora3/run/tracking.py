"""Weights & Biases tracking for the experiment app: one W&B run per job.

- Default mode is offline (no account): files go to `<run dir>/wandb/offline-run-*/` and the
  `wandb sync` command is printed. `disabled` gives a no-op; `online` needs a login.
- The run is created with the flattened resolved config (`lora.rank`, `model.name`, ...) so a
  dashboard can group and plot by any key, plus `backend` as actually used.
- `define_metric` keeps the best `val/bleu` (max) and `val/loss` (min) in the summary.
- `finish(exit_code=1)` marks a failed job; call it from a `finally` so a failing job never
  leaks its run into the next job of a multirun (a second `wandb.init` without `finish`
  returns the same run).

Tests read offline runs back with `read_offline_run()` (`wandb leet inspect --summary --json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import wandb
from lora3.fileio import atomic_write_text
from lora3.run import backend

MODES = ("offline", "online", "disabled")


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of scalars stay lists."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


class Tracker:
    """A thin wrapper around one wandb run; every method is a no-op when mode is `disabled`."""

    def __init__(self, run=None, mode: str = "disabled"):
        self.run = run
        self.mode = mode
        self._finished = False

    @property
    def active(self) -> bool:
        return self.run is not None and not self._finished

    @property
    def dir(self) -> str | None:
        """The run's directory (`.../wandb/offline-run-<time>-<id>`), for `wandb sync`."""
        if self.run is None:
            return None
        return str(Path(self.run.dir).parent)

    @property
    def id(self) -> str | None:
        return None if self.run is None else self.run.id

    def sync_command(self) -> str | None:
        if self.mode != "offline" or self.run is None:
            return None
        return f"wandb sync {self.dir}"

    def log(self, metrics: Mapping[str, Any], step: int | None = None):
        if self.active:
            self.run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]):
        if self.active:
            for k, v in values.items():
                self.run.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None):
        if self.active:
            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self, exit_code: int = 0):
        if self.run is not None and not self._finished:
            self._finished = True
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:  # never let tracking hide the job's own result or error
                print(f"[lora3] W&B: finishing the run failed: {e}", file=sys.stderr)


def start(
    *,
    mode: str,
    project: str,
    config: Mapping[str, Any],
    directory: str | os.PathLike,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    entity: str | None = None,
    job_type: str = "train",
    run_id: str | None = None,
) -> Tracker:
    """Starts one W&B run for this job. `run_id` resumes an earlier run of the same job."""
    if mode not in MODES:
        raise ValueError(f"wandb.mode={mode!r} is not valid; valid: {', '.join(MODES)}")
    if mode == "disabled":
        return Tracker(None, mode)
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no telemetry probe (10 s offline) at exit
    os.environ.setdefault("WANDB_SILENT", "true")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if wandb.run is not None:  # a run leaked by an earlier job in this process: close it first
        wandb.run.finish(exit_code=1)
    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    try:
        run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags or []),
            job_type=job_type,
            config=dict(config),
            dir=str(directory),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
            settings=settings,
        )
    except Exception as e:
        if mode == "online":
            raise RuntimeError(
                f"W&B online run could not start ({e}); log in with `wandb login`, or use wandb.mode=offline"
            ) from None
        raise
    run.define_metric("train/step")
    run.define_metric("val/bleu", summary="max")
    run.define_metric("val/chrf", summary="max")
    run.define_metric("val/loss", summary="min")
    run.define_metric("val/accuracy", summary="max")
    return Tracker(run, mode)


def find_offline_runs(directory: str | os.PathLike) -> list[Path]:
    """Offline run directories under `<directory>/wandb/`, oldest first."""
    root = Path(directory) / "wandb"
    return sorted(root.glob("offline-run-*"))


def read_offline_run(run_dir: str | os.PathLike) -> dict:
    """Config and summary of an offline run, read from its files without a server.

    Uses `wandb leet inspect --summary --json <run dir>`.
    """
    env = dict(os.environ, WANDB_ERROR_REPORTING="false")
    proc = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    out = json.loads(proc.stdout)
    # The summary view leaves out the group and name: take them from the run record.
    records = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, env=env, timeout=120)
    for line in records.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "run":
            run = rec.get("run", {})
            out.setdefault("group", run.get("run_group"))
            out.setdefault("name", run.get("display_name"))
            break
    return out


def run_name(plain: Mapping[str, Any]) -> str:
    """The default W&B run name: <model>-<data>-<r8-a16 | full | none>-<backend>-s<seed>."""
    lora = plain.get("lora") or {}
    tag = f"r{lora.get('rank')}-a{lora.get('alpha'):g}" if plain["finetune"] == "lora" else plain["finetune"]
    return f"{plain['model']['name']}-{plain['data'].get('name', 'data')}-{tag}-{plain['backend']}-s{plain['seed']}"


@contextlib.contextmanager
def run_for(plain: Mapping[str, Any], data, out: Path, job: Mapping[str, Any]):
    """The job's W&B run: the flattened config (plus the backend in use, the data's fingerprint and
    the library versions), resumed with `resume=true`; finished with exit code 0 only on success."""
    # keras here, not at the top: this module is imported before the job has chosen the backend
    import keras
    import keras_hub  # noqa: F401  (the model needs it anyway; versions() reports imported modules)

    wb = plain["wandb"]
    run_id_file = out / ".wandb_run_id"
    run_id = run_id_file.read_text().strip() if plain["resume"] and run_id_file.is_file() else None
    config = flatten({k: v for k, v in plain.items() if k != "wandb"})
    config.update({"backend": keras.backend.backend(), "choices": dict(job.get("choices", {})),
                   "data.fingerprint": data.info["fingerprint"], "output_dir": str(out)})
    config.update(flatten({"versions": backend.versions(), "data.files_sha256": data.info.get("files_sha256") or {}}))
    tags = [plain["model"]["name"], plain["finetune"], keras.backend.backend(), data.info["name"], *wb.get("tags", [])]
    tracker = start(mode=wb["mode"], project=wb["project"], entity=wb.get("entity"), config=config, directory=out,
                    name=wb.get("name") or run_name(plain), group=wb.get("group") or job.get("sweep_group"),
                    tags=tags, run_id=run_id)
    if tracker.id:
        atomic_write_text(run_id_file, tracker.id)
    exit_code = 1
    try:
        yield tracker
        exit_code = 0
    finally:
        tracker.finish(exit_code)
