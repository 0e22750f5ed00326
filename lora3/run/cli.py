"""The experiment app: `python -m lora3.run rank=8 backend=jax`.

One job, top to bottom (`run_job`):

    validate config  ->  load data  ->  select backend, import keras  ->  build model  ->  LoRA surgery
    ->  compile  ->  evaluate before  ->  train (eval + checkpoint every eval.every steps)
    ->  adapter/, samples.jsonl, metrics.json  ->  W&B summary

This module imports no keras at the top: `backend=` must be set as KERAS_BACKEND before keras
is first imported. In a multirun where a job asks for a backend other than the one this process
already imported, the job runs in a fresh `python -m lora3.run --lora3-child` process.

Errors in the config or inputs stop the job before any work with a message naming the key and
what is valid; on the command line they exit non-zero without a traceback
(`HYDRA_FULL_ERROR=1` shows it). In a multirun a failing job records `error.json` and the sweep
goes on; the sweep's `sweep_summary.json` lists every job's status and the exit status is 1 if
any job failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from lora3.errors import Lora3Error

log = logging.getLogger("lora3")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
LORA_MODES = ("lora", "full", "none")


def _register_resolvers():
    """`${mul:${rank},2}`: alpha = 2r in a sweep (`-m rank=1,2,4 'alpha=${mul:${rank},2}'`)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda *xs: math.prod(xs))


_register_resolvers()
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("jax", "tensorflow")


class AppConfigError(Lora3Error):
    """A config value is of the wrong type or out of range."""


class JobFailed(Lora3Error):
    """A job run in a child process failed; its message is the child's."""


class OfflineError(Lora3Error):
    """The model preset or the dataset cannot be reached from here (no network, not cached)."""


def preflight(plain: Mapping[str, Any], job: Mapping[str, Any] | None = None) -> None:
    """Fails at once, before any heavy work, when the preset or the dataset cannot be reached;
    the message names both and the overrides that run the same recipe on local things."""
    from lora3.run import data as data_mod
    from lora3.run import models

    missing = {"model": models.unreachable(plain.get("model") or {}),
               "data": data_mod.unreachable(plain.get("data") or {})}
    if not any(missing.values()):
        return
    if missing["model"] and (plain.get("model") or {}).get("gguf") and not (plain.get("model") or {}).get("preset"):
        raise OfflineError(f"cannot load {missing['model']}")
    fixes = []
    if missing["model"]:
        fixes.append("model.preset=<dir> (a local keras-hub preset directory, as written by "
                     "`model.save_to_preset(dir)` on a machine that can download it)")
    if missing["data"]:
        fixes.append("data=multi30k (the Multi30K de-en files in ../shared/data/multi30k; data.path=<dir> "
                     "to move them) or data=jsonl data.path=<file.jsonl> (HF translation schema)")
    keep = [o for o in (job or {}).get("overrides", [])
            if not o.lstrip("+~").startswith(("model.preset=", "data=", "data.path=", "hydra."))]
    example = " ".join(["python -m lora3.run", *keep,
                        *(["model.preset=/path/to/preset"] if missing["model"] else []),
                        *(["data=multi30k"] if missing["data"] else [])])
    raise OfflineError(
        "cannot reach " + " and ".join(m for m in missing.values() if m) + " (offline?). "
        "Run the same recipe on local things with " + "; and ".join(fixes) + f". For example: {example}"
    )


def derive_length(plain: dict, n_train: int) -> None:
    """trainer.epochs -> trainer.max_steps = ceil(epochs * n_train / batch_size), capped by a
    trainer.max_steps given too; eval.every null -> once per epoch (or once, at the end)."""
    trainer, ev_cfg = plain["trainer"], plain["eval"]
    steps_per_epoch = math.ceil(n_train / trainer["batch_size"])
    if trainer.get("epochs"):
        derived = math.ceil(trainer["epochs"] * n_train / trainer["batch_size"])
        cap = trainer.get("max_steps")
        trainer["max_steps"] = min(derived, cap) if cap else derived
        trainer["steps_per_epoch"] = steps_per_epoch
    if ev_cfg.get("every") is None:
        ev_cfg["every"] = steps_per_epoch if trainer.get("epochs") else trainer["max_steps"]


# ---------------------------------------------------------------- validation (no keras)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v):
    return _is_int(v) and v > 0, "a positive integer"


def _nonneg_int(v):
    return _is_int(v) and v >= 0, "an integer >= 0"


def _positive_num(v):
    return _is_num(v) and v > 0, "a positive number"


def _nonneg_num(v):
    return _is_num(v) and v >= 0, "a number >= 0"


def _unit_interval(v):
    return _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"


def _dropout(v):
    return _is_num(v) and 0 <= v < 1, "a number in [0, 1)"


def _bool(v):
    return isinstance(v, bool), "true or false"


def _one_of(*choices):
    return lambda v: (v in choices, "one of " + ", ".join(map(str, choices)))


def _optional(check):
    def f(v):
        if v is None:
            return True, ""
        ok, what = check(v)
        return ok, what + " or null"
    return f


def _nonempty_str(v):
    return isinstance(v, str) and bool(v.strip()), "a non-empty string"


def _targets(v):
    if isinstance(v, str):
        return bool(v.strip()), "a role, group or regex (e.g. qv, attention, all_linear) or a list of them"
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(t, str) and t for t in v)
    return ok, "a role, group or regex (e.g. qv, attention, all_linear) or a list of them"


def _prompt_template(v):
    ok = isinstance(v, str) and ("{source}" in v or "{input}" in v)
    if ok:
        try:
            v.format(source="", input="")
        except (KeyError, IndexError, ValueError):
            ok = False
    return ok, 'a string with a {source} (or {input}) slot and no other {...} field, e.g. "Translate German to English: {source}\nEnglish:"'


def _step_list(v):
    ok = isinstance(v, (list, tuple)) and all(_is_int(s) and s > 0 for s in v)
    return ok, "a list of optimizer steps (positive integers), e.g. [3] or []"


def _objective(v):
    ok = isinstance(v, str) and v.split("/", 1)[0] in ("best", "final", "before") and "/" in v
    return ok, 'a metric path like "best/val/bleu", "final/val/loss"'


CHECKS = [
    ("backend", _one_of(*BACKENDS)),
    ("seed", _nonneg_int),
    ("rank", _positive_int),
    ("alpha", _positive_num),
    ("targets", _targets),
    ("resume", _bool),
    ("lora.mode", _one_of(*LORA_MODES)),
    ("lora.rank", _positive_int),
    ("lora.alpha", _positive_num),
    ("lora.targets", _targets),
    ("lora.dropout", _dropout),
    ("lora.rslora", _bool),
    ("lora.init", _one_of("kaiming", "gaussian")),
    ("trainer.max_steps", _optional(_positive_int)),
    ("trainer.epochs", _optional(_positive_num)),
    ("trainer.batch_size", _positive_int),
    ("trainer.lr", _positive_num),
    ("trainer.weight_decay", _nonneg_num),
    ("trainer.warmup_steps", _nonneg_int),
    ("trainer.schedule", _one_of("cosine", "linear", "constant")),
    ("trainer.min_lr_ratio", _unit_interval),
    ("trainer.grad_clip", _optional(_positive_num)),
    ("trainer.precision", _one_of("float32", "mixed_bfloat16", "mixed_float16")),
    ("trainer.jit_compile", _bool),
    ("trainer.keep_checkpoints", _positive_int),
    ("trainer.verbose", _one_of("auto", 0, 1, 2)),
    ("trainer.skip_nonfinite", _bool),
    ("trainer.inject_nonfinite_steps", _step_list),
    ("eval.every", _optional(_positive_int)),
    ("eval.num_samples", _nonneg_int),
    ("eval.batch_size", _positive_int),
    ("eval.max_length", _optional(_positive_int)),
    ("eval.before", _bool),
    ("eval.loss_samples", _optional(_positive_int)),
    ("eval.adapter", _optional(_nonempty_str)),
    ("model.name", _nonempty_str),
    ("model.family", _one_of("t5", "gemma", "gemma3")),
    ("model.preset", _optional(_nonempty_str)),
    ("model.gguf", _optional(_nonempty_str)),
    ("model.prompt_template", _optional(_prompt_template)),
    ("model.completion_prefix", _optional(lambda v: (isinstance(v, str), "a string"))),
    ("data.source", _one_of("synthetic", "files", "jsonl", "wmt16")),
    ("data.direction", _one_of("de-en", "en-de")),
    ("data.prefix", lambda v: (isinstance(v, str), 'a string ("auto" for the T5 prefix, "" for none)')),
    ("data.max_source_length", _positive_int),
    ("data.max_target_length", _positive_int),
    ("data.overlong", _one_of("truncate", "drop", "error")),
    ("data.max_train", _optional(_positive_int)),
    ("data.max_valid", _optional(_positive_int)),
    ("data.train_size", _positive_int),
    ("data.valid_size", _positive_int),
    ("data.variant", _one_of("all", "base", "shift")),
    ("data.valid_fraction", lambda v: (_is_num(v) and 0 < v < 1, "a number in (0, 1)")),
    ("wandb.mode", _one_of(*WANDB_MODES)),
    ("wandb.project", _nonempty_str),
    ("wandb.log_every", _positive_int),
    ("objective", _objective),
]
_MISSING = object()


def _lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            if part not in node:
                return _MISSING
            node = node[part]
        else:
            return _MISSING
    return node


def validate(cfg) -> dict:
    """Checks every known key's type and range; returns the config as a plain resolved dict.

    Raises AppConfigError naming the key, the value and what is valid, before any work is done.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise AppConfigError(f"config error{f' at {key}' if key else ''}: {msg}") from None
    plain.pop("hydra", None)
    problems = []
    for key, check in CHECKS:
        value = _lookup(plain, key)
        if value is _MISSING:
            continue
        if value == "???":
            problems.append(f"{key} is required (set {key}=...)")
            continue
        if key.startswith("data.") and key.split(".")[1] in ("train_size", "valid_size", "variant") \
                and _lookup(plain, "data.source") != "synthetic":
            continue
        ok, what = check(value)
        if not ok:
            problems.append(f"{key}={value!r} is not valid: it must be {what}")
    trainer_cfg = plain.get("trainer")
    if isinstance(trainer_cfg, Mapping) and trainer_cfg.get("max_steps") is None and trainer_cfg.get("epochs") is None:
        problems.append("trainer.max_steps and trainer.epochs are both null: set one of them "
                        "(trainer.epochs=3 derives the steps from the training set size and trainer.batch_size)")
    ev_plain = plain.get("eval") if isinstance(plain.get("eval"), Mapping) else {}
    if ev_plain.get("adapter") and (plain.get("lora") or {}).get("mode") != "none":
        problems.append(f"eval.adapter={ev_plain['adapter']!r} evaluates a saved adapter without training: "
                        "use it with lora=none (python -m lora3.run lora=none eval.adapter=<dir>)")
    if problems:
        raise AppConfigError("invalid config: " + "; ".join(problems))
    lora_cfg = plain.get("lora", {})
    if lora_cfg.get("mode", "lora") == "lora":
        lora_config(lora_cfg)  # LoraConfig's own checks (they name the field)
    from lora3.run import distribution as dist_mod

    dist_mod.validate_config(plain)  # distribution.*: mode, backend, processes (issue 6)
    return plain


def lora_config(lora_cfg: Mapping[str, Any]):
    from lora3.config import LoraConfig
    from lora3.errors import LoraConfigError

    targets = lora_cfg.get("targets", "qv")
    if isinstance(targets, (list, tuple)):
        targets = list(targets)
    layers = lora_cfg.get("layers")
    if isinstance(layers, (list, tuple)):
        layers = list(layers)
    try:
        return LoraConfig(
            rank=lora_cfg.get("rank", 8), alpha=lora_cfg.get("alpha", 16), targets=targets,
            dropout=lora_cfg.get("dropout", 0.0), rslora=lora_cfg.get("rslora", False),
            init=lora_cfg.get("init", "kaiming"), layers=layers,
            train_also=list(lora_cfg.get("train_also") or []),
        )
    except LoraConfigError as e:
        raise AppConfigError(f"invalid lora config: {e}") from None


# ---------------------------------------------------------------- small helpers


def _atomic_write_text(path: Path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dump_yaml(plain: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(plain))


def _objective_value(metrics: Mapping[str, Any], objective: str):
    where, key = objective.split("/", 1)
    value = (metrics.get(where) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _run_name(plain: dict) -> str:
    lora = plain["lora"]
    mode = lora.get("mode", "lora")
    tag = f"r{lora.get('rank')}-a{lora.get('alpha'):g}" if mode == "lora" else mode
    return f"{plain['model']['name']}-{plain['data'].get('name', 'data')}-{tag}-{plain['backend']}-s{plain['seed']}"


def _check_output_dir(out: Path, resume: bool):
    """Refuses to overwrite a finished or unfinished run unless resume=true."""
    metrics = out / "metrics.json"
    if metrics.is_file() and not resume:
        raise AppConfigError(
            f"{out} already holds a finished run (metrics.json); choose another hydra.run.dir, "
            "or pass resume=true to report it again"
        )
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")) and not resume:
        raise AppConfigError(
            f"{out} holds an unfinished run (checkpoints/); pass resume=true to continue it, "
            "or choose another hydra.run.dir"
        )


def _is_input_error(e: BaseException) -> bool:
    """Errors in the config, data, model choice or adapter: found before training starts."""
    return isinstance(e, Lora3Error) and type(e).__name__ not in ("TrainingError", "JobFailed", "RunDirBusy")


class RunDirBusy(AppConfigError):
    """Another process is running a job in the same directory."""


def _lock_run_dir(out: Path):
    """An exclusive flock on the run directory itself (released when the process dies, even by SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirBusy(
            f"{out} is in use by another lora3 process (a run or a sweep job started at the same time); "
            "wait for it to finish, or choose another hydra.run.dir / hydra.sweep.dir"
        ) from None
    return fd


def _unlock_run_dir(fd):
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _run_dir_busy(out: Path) -> bool:
    if not out.is_dir():
        return False
    try:
        _unlock_run_dir(_lock_run_dir(out))
        return False
    except RunDirBusy:
        return True


_KEEP_ON_INPUT_ERROR = ("run.log", ".hydra", "error.json")


def _remove_new_entries(out: Path, existed: set | None):
    """Removes what a job that failed on bad input created in `out` (not the job's log)."""
    import shutil

    if not out.is_dir():
        return
    for name in set(os.listdir(out)) - (existed or set()) - set(_KEEP_ON_INPUT_ERROR):
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


def _register_unique_dir():
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("unique_dir"):
        # use_cache: one claim per config (Hydra copies the cache into each job of a sweep)
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)


_register_unique_dir()


# ---------------------------------------------------------------- the job


def run_job(cfg, output_dir: str | os.PathLike, *, job: Mapping[str, Any] | None = None,
            callbacks: tuple = ()) -> dict:
    """Runs one experiment in this process and returns its metrics (also written to metrics.json).

    `cfg` is a composed config (DictConfig or plain dict); `job` carries Hydra's view of the job
    (choices, multirun, sweep dir) when there is one. Raises on failure; the W&B run is finished
    either way.
    """
    t_start = time.perf_counter()
    job = dict(job or {})
    plain = validate(cfg)                                       # 1. config: fail before any work
    out = Path(output_dir).resolve()
    from lora3.run import distribution as dist_mod

    if dist_mod.is_worker(plain):  # multi-process: only process 0 writes the run (adapter, metrics, W&B)
        out = dist_mod.worker_dir(out, plain)
    _check_output_dir(out, plain["resume"])
    if plain["resume"] and (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        log.info("resume=true: %s already finished; nothing to do", out)
        return metrics

    existed = set(os.listdir(out)) if out.is_dir() else None
    lock = _lock_run_dir(out)  # one process per run directory (two sweeps, two runs, a stale resume)
    try:
        return _run_job_body(plain, out, job, callbacks, t_start)
    except Lora3Error as e:
        if _is_input_error(e):  # bad input: leave nothing behind but the job's log
            _remove_new_entries(out, existed)
        raise
    finally:
        _unlock_run_dir(lock)


def _run_job_body(plain, out, job, callbacks, t_start) -> dict:
    preflight(plain, job)                                       # offline: fail now, naming what to use instead
    from lora3.run import data as data_mod                          # 2. data (no keras needed)

    seed = plain["seed"]
    data = data_mod.load(plain["data"], seed=seed)
    derive_length(plain, len(data.train))

    from lora3.run import backend  # 3. backend, then keras

    keras = backend.select(plain["backend"])
    keras.backend.clear_session()  # a multirun reuses this process: drop the previous job's graph
    keras.config.set_dtype_policy(plain["trainer"]["precision"])
    keras.utils.set_random_seed(seed)
    from lora3.run import distribution as dist_mod

    dist = dist_mod.setup(plain.get("distribution"), plain["model"]["family"], keras)
    if dist.mode != "none":
        print(f"[lora3] {dist.describe()}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "config.yaml", _dump_yaml(plain))

    from lora3.run import evaluate as ev                            # 4. tracking
    from lora3.run import tracking

    group = plain["wandb"].get("group") or job.get("sweep_group")
    run_id_file = out / ".wandb_run_id"
    run_id = run_id_file.read_text().strip() if plain["resume"] and run_id_file.is_file() else None
    flat = tracking.flatten({k: v for k, v in plain.items() if k != "wandb"})
    flat.update({"backend": keras.backend.backend(), "choices": job.get("choices", {}),
                 "data.fingerprint": data.info["fingerprint"], "output_dir": str(out)})
    import keras_hub  # noqa: F401  (the model needs it anyway; versions() reports imported modules)

    flat.update(tracking.flatten({"versions": backend.versions(),
                                  "data.files_sha256": data.info.get("files_sha256") or {}}))
    tags = [plain["model"]["name"], plain["lora"]["mode"], keras.backend.backend(), data.info["name"],
            *plain["wandb"].get("tags", [])]
    tracker = tracking.start(
        mode=plain["wandb"]["mode"], project=plain["wandb"]["project"], entity=plain["wandb"].get("entity"),
        config=flat, directory=out, name=plain["wandb"].get("name") or _run_name(plain), group=group,
        tags=tags, run_id=run_id,
    )
    if tracker.id:
        _atomic_write_text(run_id_file, tracker.id)
    exit_code = 1
    try:
        metrics = _train_and_evaluate(plain, data, out, tracker, keras, callbacks, job, t_start)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)


def _train_and_evaluate(plain, data, out, tracker, keras, callbacks, job, t_start) -> dict:
    from lora3.run import backend, models, train as tr
    from lora3.run import evaluate as ev

    seed, trainer, ev_cfg, lora_cfg = plain["seed"], plain["trainer"], plain["eval"], plain["lora"]
    mode = lora_cfg["mode"]
    src_len, tgt_len = plain["data"]["max_source_length"], plain["data"]["max_target_length"]
    gen_len = ev_cfg.get("max_length") or tgt_len

    # 5. model
    model_cfg = plain["model"]
    if model_cfg.get("base") and plain["data"].get("source") != "synthetic" and not model_cfg["base"].get("data"):
        # the cached base (lora3.run.pretrain) is trained on the synthetic source task with its tokenizer:
        # on other data the model starts from random init, as before, with a tokenizer of that data
        log.info("model.base applies to synthetic data only: data.source=%s starts from random init",
                 plain["data"].get("source"))
        model_cfg = {**model_cfg, "base": None}
    bundle = models.build(model_cfg, data.tokenizer_texts(), seed=seed, cache_dir=plain.get("cache_dir"))
    model = bundle.model

    # 6. LoRA surgery (or full fine-tuning / frozen base)
    import lora3

    adapter_dir = ev_cfg.get("adapter")
    if adapter_dir:
        # evaluation of a saved adapter alone (lora=none eval.adapter=<dir>): its surgery replayed, frozen
        from lora3.run.data import resolve_path

        report = lora3.load_adapter(model, resolve_path(adapter_dir, what="eval.adapter"), trainable=False)
        print(report.table(max_rows=4), flush=True)
        total = int(sum(math.prod(v.shape) for v in model.weights))
        params = {"trainable": 0, "total": total, "trainable_percent": 0.0, "lora": report.lora_params,
                  "adapted_layers": len(report.rows), "adapter": str(adapter_dir)}
    elif mode == "lora":
        report = lora3.apply_lora(model, lora_config(lora_cfg))
        params = {"trainable": report.trainable_params, "total": report.total_params,
                  "trainable_percent": report.percent, "lora": report.lora_params,
                  "adapted_layers": len(report.rows)}
        print(report.table(max_rows=12) if hasattr(report, "table") else str(report), flush=True)
        if hasattr(report, "table"):
            _atomic_write_text(out / "lora_report.txt", report.table() + "\n")
    if not adapter_dir and mode != "lora":
        model.trainable = mode == "full"
        total = int(sum(math.prod(v.shape) for v in model.weights))
        trainable = int(sum(math.prod(v.shape) for v in model.trainable_weights))
        params = {"trainable": trainable, "total": total,
                  "trainable_percent": 100.0 * trainable / total if total else 0.0}
    max_steps = trainer["max_steps"] if mode != "none" else 0
    tr.compile_model(bundle, trainer, max(1, max_steps))

    # 7. arrays for training and for teacher-forced validation
    overlong = plain["data"]["overlong"]
    train_arrays = val_arrays = None
    if mode != "none":
        *train_arrays, tstats = bundle.encode(data.inputs("train"), data.targets("train"), src_len, tgt_len,
                                              overlong=overlong, what="train", sources=data.sources("train"))
        train_arrays = tuple(train_arrays)
    n_loss = ev_cfg.get("loss_samples") or len(data.valid)
    *val_arrays, vstats = bundle.encode(data.inputs("valid")[:n_loss], data.targets("valid")[:n_loss],
                                        src_len, tgt_len, overlong="error" if overlong == "error" else "truncate",
                                        what="validation", sources=data.sources("valid")[:n_loss])
    val_arrays = tuple(val_arrays)
    n_bleu = min(ev_cfg["num_samples"], len(data.valid))
    subset = dict(sources=data.sources("valid")[:n_bleu], inputs=data.inputs("valid")[:n_bleu],
                  references=data.targets("valid")[:n_bleu])

    from lora3.run import distribution as dist_mod  # issue 6: batches that divide the data-parallel devices

    val_arrays, eval_bs = dist_mod.pad_eval(val_arrays, ev_cfg["batch_size"])
    if dist_mod.current().multi_process:
        subset = dict(sources=[], inputs=[], references=[])  # generation is single-process only (notes)

    def evaluate_fn(step: int) -> dict:
        return ev.evaluate(bundle, **subset, arrays=val_arrays, batch_size=eval_bs,
                           src_len=src_len, max_length=gen_len)

    test_fn = None
    if data.test:  # data.test_split (WMT16: newstest2016): scored before and after training, never for selection
        n_tloss = ev_cfg.get("loss_samples") or len(data.test)
        *test_arrays, _ = bundle.encode(data.inputs("test")[:n_tloss], data.targets("test")[:n_tloss], src_len,
                                        tgt_len, overlong="error" if overlong == "error" else "truncate", what="test",
                                        sources=data.sources("test")[:n_tloss])
        n_test = min(ev_cfg["num_samples"], len(data.test))
        test_subset = dict(sources=data.sources("test")[:n_test], inputs=data.inputs("test")[:n_test],
                           references=data.targets("test")[:n_test])

        test_arrays, test_bs = dist_mod.pad_eval(tuple(test_arrays), ev_cfg["batch_size"])  # as val_arrays
        if dist_mod.current().multi_process:
            test_subset = dict(sources=[], inputs=[], references=[])

        def test_fn() -> dict:
            return ev.evaluate(bundle, **test_subset, arrays=test_arrays, batch_size=test_bs,
                               src_len=src_len, max_length=gen_len, prefix="test")

    print(f"[lora3] {plain['model']['name']} on {keras.backend.backend()}: {params['total']:,} params, "
          f"{params['trainable']:,} trainable ({params['trainable_percent']:.3f}%); "
          f"data {data.info['name']} {len(data.train)} train / {len(data.valid)} valid pairs", flush=True)
    tracker.summary({"params/trainable": params["trainable"], "params/total": params["total"],
                     "params/trainable_percent": params["trainable_percent"]})

    # 8. evaluate before training
    before = {}
    resuming = plain["resume"] and tr.list_checkpoints(out)
    if (ev_cfg["before"] or mode == "none") and not resuming:
        before = evaluate_fn(0)
        if test_fn is not None:
            before_test = test_fn()
            before.update({k: v for k, v in before_test.items() if k.startswith("test/")},
                          test_samples=before_test.get("samples", []))
        tracker.log({k: v for k, v in before.items() if k.startswith(("val/", "test/"))}, step=0)
        print(f"[lora3] before training: val/loss={before.get('val/loss', float('nan')):.4f} "
              f"val/bleu={before.get('val/bleu', float('nan')):.2f} val/chrf={before.get('val/chrf', float('nan')):.2f}",
              flush=True)
    elif resuming and (out / ".before.json").is_file():
        before = json.loads((out / ".before.json").read_text())
    if before:
        _atomic_write_text(out / ".before.json", json.dumps({k: v for k, v in before.items()
                                                             if k not in ("samples", "test_samples")}))

    # 9. train
    if mode != "none":
        tokens_per_step = tstats["tokens"] / max(1, tstats["pairs"]) * trainer["batch_size"]
        result = tr.train(
            bundle, train_arrays, trainer=trainer, max_steps=max_steps, eval_every=ev_cfg["every"], seed=seed,
            out_dir=out, evaluate_fn=lambda step: _remember(evaluate_fn(step)), tracker=tracker,
            log_every=plain["wandb"]["log_every"], resume=plain["resume"], callbacks=callbacks,
            tokens_per_step=tokens_per_step,
        )
        final_scores = _LAST.get("scores") or evaluate_fn(max_steps)
        if test_fn is not None:
            final_test = test_fn()
            final_scores = {**final_scores, **{k: v for k, v in final_test.items() if k.startswith("test/")},
                            "test_samples": final_test.get("samples", [])}
    else:
        result = {"history": [], "best": {}, "last": {}, "perf": {}, "resumed_from": None}
        final_scores = before

    # 10. outputs: adapter / full model, samples, metrics (each written atomically)
    outputs = {}
    if mode == "lora":
        outputs["adapter"] = lora3.save_adapter(model, out / "adapter")
    elif mode == "full":
        outputs["model"] = _save_full(model, out / "model")
    samples = final_scores.get("samples", [])
    before_h = {s["source"]: s["hypothesis"] for s in before.get("samples", [])}
    lines = [json.dumps({**s, **({"hypothesis_before": before_h[s["source"]]} if s["source"] in before_h else {})},
                        ensure_ascii=False) for s in samples]
    _atomic_write_text(out / "samples.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    outputs["samples"] = str(out / "samples.jsonl")
    if final_scores.get("test_samples"):
        before_t = {s["source"]: s["hypothesis"] for s in before.get("test_samples", [])}
        tlines = [json.dumps({**s, **({"hypothesis_before": before_t[s["source"]]} if s["source"] in before_t else {})},
                             ensure_ascii=False) for s in final_scores["test_samples"]]
        _atomic_write_text(out / "test_samples.jsonl", "\n".join(tlines) + "\n")
        outputs["test_samples"] = str(out / "test_samples.jsonl")
    if samples:
        tracker.table("val/samples", ["source", "reference", "hypothesis"],
                      [[s["source"], s["reference"], s["hypothesis"]] for s in samples[:50]], step=max_steps)

    final = {k: v for k, v in final_scores.items() if k.startswith(("val/", "test/"))}
    final.update({"train/loss": result["last"].get("train/loss")} if result["last"] else {})
    best = dict(result["best"]) or {k: v for k, v in final.items() if k in ("val/bleu", "val/chrf", "val/loss")}
    perf = dict(result["perf"])
    perf.update(backend.peak_memory())
    perf["wall_seconds"] = time.perf_counter() - t_start
    outputs["wandb_run_dir"] = tracker.dir
    outputs["wandb_sync"] = tracker.sync_command()
    metrics = {
        "status": "finished",
        "backend": keras.backend.backend(),
        "lora3_version": lora3.__version__,
        "versions": backend.versions(),
        "devices": backend.devices(),
        "seed": seed,
        "lora_mode": mode,
        "model": bundle.info,
        "data": data.info,
        "params": params,
        "steps": max_steps,
        "resumed_from": result["resumed_from"],
        "nonfinite_skipped": result.get("nonfinite_skipped", 0),
        "before": {k: v for k, v in before.items() if k.startswith(("val/", "test/"))},
        "final": final,
        "best": best,
        "history": result["history"],
        "perf": perf,
        "signatures": final_scores.get("signatures", {}),
        "outputs": outputs,
        "choices": dict(job.get("choices", {})),
    }
    metrics["objective"] = {"name": plain["objective"], "value": _objective_value(metrics, plain["objective"])}
    tracker.summary({"train/nonfinite_skipped": metrics["nonfinite_skipped"]})
    tracker.summary({f"final/{k}": v for k, v in final.items() if v is not None})
    tracker.summary({f"best/{k}": v for k, v in best.items()})
    tracker.summary({f"before/{k}": v for k, v in metrics["before"].items()})
    tracker.summary({k: v for k, v in [("perf/tokens_per_s", perf.get("tokens_per_s")),
                                       ("perf/wall_seconds", perf["wall_seconds"]),
                                       ("perf/host_peak_rss_bytes", perf.get("host_peak_rss_bytes"))] if v is not None})
    if perf.get("tokens_per_s"):
        tracker.log({"perf/tokens_per_s": perf["tokens_per_s"]}, step=max_steps)
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, ensure_ascii=False, default=str))
    _print_summary(metrics, out)
    return metrics


_LAST: dict = {}


def _remember(scores):
    _LAST["scores"] = scores
    return scores


def _save_full(model, target: Path) -> str:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=target.parent))
    try:
        model.save_to_preset(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _print_summary(m: dict, out: Path):
    b, f = m["before"], m["final"]
    lines = [
        "",
        f"[lora3] done in {m['perf']['wall_seconds']:.1f}s on {m['backend']}",
        f"  trainable     {m['params']['trainable']:,} of {m['params']['total']:,} params "
        f"({m['params']['trainable_percent']:.3f}%)",
    ]
    base = (m.get("model") or {}).get("base")
    if base:  # base-then-adapt (lora3.run.pretrain): what the base is and how it scores on the target task
        sv = base.get("source_val") or {}
        lines.append(f"  base          trained {base.get('steps')} steps on "
                     f"{(base.get('source_task') or {}).get('name')} (its own task: BLEU {sv.get('bleu', 0):.2f}); "
                     f"cached at {base.get('path')}")
        if "val/bleu" in b and "val/bleu" in f:
            tag = {"lora": "LoRA", "full": "full fine-tuning", "none": "frozen base"}.get(m.get("lora_mode"), "tuned")
            d = m.get("data") or {}
            lines.append(f"  target task   {d.get('name')}/{d.get('variant') or d.get('direction')}: "
                         f"frozen base BLEU {b['val/bleu']:.2f} | {tag} BLEU {f['val/bleu']:.2f} "
                         f"with {m['params']['trainable_percent']:.2f}% of the params trainable")
    if f.get("train/loss") is not None:
        lines.append(f"  train loss    {f['train/loss']:.4f} (per-token cross-entropy, mean over the last eval period)")
    if "val/loss" in f:
        lines.append(f"  val loss      {b.get('val/loss', float('nan')):.4f} -> {f['val/loss']:.4f} per token "
                     f"(perplexity {b.get('val/perplexity', float('nan')):.2f} -> {f.get('val/perplexity', float('nan')):.2f})")
    if "val/bleu" in f:
        lines.append(f"  val BLEU      {b.get('val/bleu', float('nan')):.2f} -> {f['val/bleu']:.2f} "
                     f"(best {m['best'].get('val/bleu', f['val/bleu']):.2f})")
        lines.append(f"  val chrF      {b.get('val/chrf', float('nan')):.2f} -> {f['val/chrf']:.2f}")
    if "test/bleu" in f:
        lines.append(f"  test BLEU     {b.get('test/bleu', float('nan')):.2f} -> {f['test/bleu']:.2f}")
        lines.append(f"  test chrF     {b.get('test/chrf', float('nan')):.2f} -> {f['test/chrf']:.2f}")
    if m["perf"].get("tokens_per_s"):
        lines.append(f"  speed         {m['perf']['tokens_per_s']:,.0f} tokens/s")
    if f.get("val/sentences_per_s"):
        lines.append(f"  generation    {f['val/sentences_per_s']:.2f} sentences/s (greedy, batch of the eval)")
    for key in ("adapter", "model"):
        if key in m["outputs"]:
            lines.append(f"  {key:<13} {m['outputs'][key]}")
    lines.append(f"  metrics       {out / 'metrics.json'}")
    if m["outputs"].get("wandb_run_dir"):
        lines.append(f"  W&B run       {m['outputs']['wandb_run_dir']}")
    if m["outputs"].get("wandb_sync"):
        lines.append(f"  upload with   {m['outputs']['wandb_sync']}")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- one process per backend


def run_in_child(plain: dict, output_dir: str, job: Mapping[str, Any]) -> dict:
    """Runs the job in a fresh Python process (for a backend other than the imported one)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / ".lora3_child_job.json"
    _atomic_write_text(spec, json.dumps({"config": plain, "output_dir": str(out), "job": dict(job)}))
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


# ---------------------------------------------------------------- Hydra entry point


def _report_failure(e: BaseException, out: Path | None, multirun: bool):
    expected = isinstance(e, Lora3Error)
    msg = str(e) if expected else f"{type(e).__name__}: {e}"
    if expected:
        log.error("%s", msg)
    else:
        log.error("unexpected error: %s\n%s", msg, traceback.format_exc())
    if multirun and out is not None:
        try:
            _atomic_write_text(Path(out) / "error.json", json.dumps(
                {"status": "failed", "error": msg, "type": type(e).__name__}, indent=1))
        except OSError:
            pass


def _job_info() -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
    from hydra.core.hydra_config import HydraConfig

    from lora3.run import backend

    out = Path(HydraConfig.get().runtime.output_dir)
    job = _job_info()
    try:
        plain = validate(cfg)
        have = backend.imported_backend()
        if have is not None and have != plain["backend"]:
            metrics = run_in_child(plain, str(out), job)
        else:
            metrics = run_job(cfg, out, job=job)
        return _objective_value(metrics, plain["objective"])
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


class SweepSummary:
    """Hydra callback: after a multirun, writes sweep_summary.json (every job's status, metrics or error),
    prints it, and exits with status 1 if any job failed."""

    def __new__(cls, *args, **kwargs):
        from hydra.experimental.callback import Callback

        class _SweepSummary(Callback):
            def on_multirun_end(self, config, **kwargs):
                summary = summarize_sweep(Path(config.hydra.sweep.dir))
                failed = [j for j in summary["jobs"] if j["status"] != "finished"]
                print(f"\n[lora3] sweep {summary['sweep_dir']}: {len(summary['jobs']) - len(failed)} finished, "
                      f"{len(failed)} failed", flush=True)
                for j in summary["jobs"]:
                    detail = (f"bleu={j['best_val_bleu']:.2f}" if j.get("best_val_bleu") is not None
                              else j.get("error", ""))
                    print(f"  {j['job']:<4} {j['status']:<9} {j['backend'] or '':<11} {j['overrides']}  {detail}")
                if failed:
                    raise SystemExit(1)

        return _SweepSummary()


def summarize_sweep(sweep_dir: Path) -> dict:
    jobs = []
    for d in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                    key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        overrides = []
        try:
            from omegaconf import OmegaConf

            overrides = list(OmegaConf.load(d / ".hydra" / "overrides.yaml"))
        except Exception:
            pass
        entry = {"job": d.name, "dir": str(d), "overrides": " ".join(overrides), "backend": None}
        if (d / "metrics.json").is_file():
            m = json.loads((d / "metrics.json").read_text())
            entry.update(status="finished", backend=m.get("backend"), best_val_bleu=m["best"].get("val/bleu"),
                         final=m.get("final"), objective=m.get("objective", {}).get("value"),
                         trainable_percent=m["params"]["trainable_percent"])
        elif (d / "error.json").is_file():
            entry.update(status="failed", error=json.loads((d / "error.json").read_text()).get("error"))
        else:
            entry.update(status="failed", error="no metrics.json or error.json (killed?)")
        jobs.append(entry)
    summary = {"sweep_dir": str(sweep_dir), "jobs": jobs}
    _atomic_write_text(sweep_dir / "sweep_summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def precheck(argv: list[str]) -> int:
    """The command line's check before Hydra creates anything: for a single run (not -m), composes the
    config from `argv`, validates it, checks the output directory and reads the data. Returns 0 when
    the run may start, else prints the problem (no traceback unless HYDRA_FULL_ERROR=1) and returns 1.

    So a bad value, a bad data file or a finished run directory leave no file at all (not even
    Hydra's `.hydra/` or `run.log`). What needs keras (targets that match nothing, a rank above a
    layer's width, sequences over the limits) is found by the job itself, which then removes
    whatever it created except `.hydra/` and `run.log` (the job's log). A sweep (-m) is not
    prechecked: a bad combination fails its own job and the others go on.
    """
    from hydra._internal.utils import get_args_parser

    try:
        args, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return 0  # let Hydra report its own usage error
    if (unknown or args.multirun or args.help or args.hydra_help or args.cfg or args.info
            or args.shell_completion or args.config_path or args.config_name or args.config_dir
            or getattr(args, "experimental_rerun", None)):
        return 0
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="lora3"):
            cfg = compose("config", overrides=list(args.overrides), return_hydra_config=True)
    except ConfigCompositionException as e:
        import re

        m = re.search(r"Could not override '([^']+)'", str(e))
        hint = _unknown_key_hint(m.group(1)) if m and not full_error else ""
        if not hint:
            return 0  # Hydra reports composition errors itself (naming the valid options), before creating anything
        print(f"[lora3] error: {m.group(1)} is not a key of the config {hint}", file=sys.stderr)
        return 1
    except Exception:
        return 0
    try:
        hydra_raw = OmegaConf.to_container(cfg.hydra.run, resolve=False)
        task = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                                 if k != "hydra"})
        plain = validate(task)
        run_dir = str(hydra_raw.get("dir", ""))
        if "unique_dir" not in run_dir:  # a fresh directory from unique_dir holds nothing: don't claim it here
            out = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).resolve()
            if not (plain["resume"] and (out / "metrics.json").is_file()):
                _check_output_dir(out, plain["resume"])
            if _run_dir_busy(out):
                raise RunDirBusy(f"{out} is in use by another lora3 process; wait for it to finish, "
                                 "or choose another hydra.run.dir")
        if (plain.get("data") or {}).get("source") not in ("wmt16",):
            from lora3.run import data as data_mod

            data_mod.load(plain["data"], seed=plain["seed"])
    except Lora3Error as e:
        if full_error:
            raise
        print(f"[lora3] error: {e}", file=sys.stderr)
        return 1
    return 0


def _unknown_key_hint(full: str) -> str:
    """For an override of a key the config lacks: the valid keys at that level and the closest one
    ("" when the key exists, so the error was something else)."""
    import difflib

    from hydra import compose, initialize_config_dir

    parent, _, leaf = full.lstrip("+~").rpartition(".")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="lora3"):
            cfg = compose("config")
        node = cfg
        for part in filter(None, parent.split(".")):
            node = node[part]
        keys = sorted(str(k) for k in node.keys())
    except Exception:
        return ""
    if leaf in keys:
        return ""
    close = difflib.get_close_matches(leaf, keys, n=1)
    where = parent or "the top level"
    return (f"(valid keys under {where}: {', '.join(keys)}"
            + (f"; did you mean {(parent + '.') if parent else ''}{close[0]}?" if close else "") + ")")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--lora3-child":
        sys.exit(_child_main(sys.argv[2]))
    import hydra

    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    rc = precheck(sys.argv[1:])
    if rc:
        sys.exit(rc)
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(hydra_task)()


