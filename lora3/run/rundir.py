"""The run directory: claimed fresh, never overwritten, one process at a time, left clean on bad input.

- `unique_dir` (the `${unique_dir:<path>}` resolver of `hydra.run.dir` / `hydra.sweep.dir`) claims a
  fresh name with an atomic mkdir, so two runs started in the same second never share a directory.
- `check_output_dir` refuses a directory that holds a finished or an unfinished run (unless
  `resume=true`).
- `claim` holds the directory's lock for the job (a second process on the same directory is refused)
  and, when the job fails on bad input (an input error), removes what the job created in it: only
  the job's log and Hydra's record stay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from lora3.errors import Lora3Error
from lora3.run.locking import Busy, exclusive
from lora3.run.schema import AppConfigError

KEEP_ON_INPUT_ERROR = ("run.log", ".hydra", "error.json")


class RunDirBusy(AppConfigError):
    """Another process is running a job in the same directory."""


def check_output_dir(out: Path, resume: bool) -> None:
    """Raises unless `out` is free for a new run (or `resume=true`)."""
    if (out / "metrics.json").is_file() and not resume:
        raise AppConfigError(
            f"{out} already holds a finished run (metrics.json); choose another hydra.run.dir, "
            "or pass resume=true to report it again"
        )
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")) and not resume:
        raise AppConfigError(
            f"{out} holds an unfinished run (checkpoints/); pass resume=true to continue it, "
            "or choose another hydra.run.dir"
        )


def busy_message(out: Path) -> str:
    return (f"{out} is in use by another lora3 process (a run or a sweep job started at the same time); "
            "wait for it to finish, or choose another hydra.run.dir / hydra.sweep.dir")


def is_busy(out: Path) -> bool:
    """Whether another process holds `out`'s lock."""
    if not out.is_dir():
        return False
    try:
        with exclusive(out):
            return False
    except Busy:
        return True


def is_input_error(e: BaseException) -> bool:
    """Errors in the config, data, model choice or adapter: found before training starts."""
    return isinstance(e, Lora3Error) and type(e).__name__ not in ("TrainingError", "JobFailed", "RunDirBusy")


@contextlib.contextmanager
def claim(out: Path):
    """Locks `out` for this job; on an input error, removes what the job created there."""
    existed = set(os.listdir(out)) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(out):
            yield
    except Busy:
        raise RunDirBusy(busy_message(out)) from None
    except Lora3Error as e:
        if is_input_error(e):
            remove_new_entries(out, existed)
        raise


def remove_new_entries(out: Path, existed: set | None) -> None:
    """Removes what a job that failed on bad input created in `out` (not the job's log)."""
    if not out.is_dir():
        return
    for name in set(os.listdir(out)) - (existed or set()) - set(KEEP_ON_INPUT_ERROR):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if existed is None and not os.listdir(out):
        out.rmdir()


def unique_dir(path: str) -> str:
    """OmegaConf resolver `${unique_dir:<path>}`: claims `<path>` (or `<path>-1`, `-2`, ...) by an atomic
    mkdir, so two runs or sweeps started in the same second never share a directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    for i in range(100000):
        cand = p if i == 0 else p.with_name(f"{p.name}-{i}")
        try:
            cand.mkdir()
            return str(cand)
        except FileExistsError:
            continue
    raise AppConfigError(f"could not claim a fresh directory next to {p}")


# use_cache: one claim per config (Hydra copies the cache into each job of a sweep)
if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
