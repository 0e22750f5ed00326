"""Training, nanoGPT-style: one loop you can read top to bottom.

    compile_model(bundle, trainer_cfg, max_steps)        # AdamW, warm-up + decay, clipping, jit
    result = train(bundle, arrays, ..., evaluate_fn=...)  # fit one eval period at a time

The run is split into evaluation periods of `eval_every` steps. Each period is one Keras
`fit()` epoch over exactly the batches of those steps (the compiled train step is reused), then
evaluation, then an atomic checkpoint. Batch `s` of the run is a pure function of
(seed, s), so `resume=true` restarts from the last checkpoint and sees the same batches an
uninterrupted run would have seen.

Checkpoints: `checkpoints/step-<n>/` holding `state.npz` (trainable variables, optimizer
variables, RNG seed-generator states) and `meta.json` (step, history, best metrics). Each is
written into a temporary directory and renamed into place, so a directory named `step-<n>` is
always complete, and an interrupted write is never picked up.

keras is imported inside the functions that need it: the app imports this module before it has
chosen the backend (`lora3.run.backend.select`).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from lora3.errors import Lora3Error
from lora3.fileio import atomic_write_bytes, atomic_write_text, staged_dir
from lora3.run import distribution as dist_mod

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


class TrainingError(Lora3Error):
    """Training cannot continue: a non-finite loss, a checkpoint that does not fit the model."""


# ---------------------------------------------------------------- learning rate


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The learning rate for optimizer step `step` (0-based), in plain Python (for logging)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * min_ratio
    if schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(peak: float, warmup: int, total: int, schedule: str, min_ratio: float):
    import keras
    from keras import ops

    class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up to `peak`, then cosine or linear decay to `peak * min_ratio`."""

        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = peak * (step + 1.0) / max(1, warmup)
            progress = ops.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
            floor = peak * min_ratio
            if schedule == "constant" or total <= warmup:
                decayed = ops.convert_to_tensor(peak, "float32") + 0.0 * step
            elif schedule == "linear":
                decayed = floor + (peak - floor) * (1.0 - progress)
            else:
                decayed = floor + (peak - floor) * 0.5 * (1.0 + ops.cos(math.pi * progress))
            return ops.where(step < warmup, warm, decayed) if warmup > 0 else decayed

        def get_config(self):
            return dict(peak=peak, warmup=warmup, total=total, schedule=schedule, min_ratio=min_ratio)

    return WarmupDecay()


def compile_model(bundle, trainer: Mapping[str, Any], max_steps: int):
    """Compiles the task model: AdamW + schedule + clipping, masked loss and token accuracy, greedy sampler."""
    import keras

    schedule = make_schedule(float(trainer["lr"]), int(trainer["warmup_steps"]), max(1, int(max_steps)),
                             trainer["schedule"], float(trainer["min_lr_ratio"]))
    optimizer_cls = keras.optimizers.AdamW
    if trainer.get("lora_plus_ratio"):
        optimizer_cls = lora_plus_optimizer(optimizer_cls, float(trainer["lora_plus_ratio"]))
    if trainer.get("skip_nonfinite"):
        optimizer_cls = skip_nonfinite_optimizer(optimizer_cls)
    optimizer = optimizer_cls(
        learning_rate=schedule,
        weight_decay=float(trainer["weight_decay"]),
        global_clipnorm=None if trainer.get("grad_clip") in (None, 0) else float(trainer["grad_clip"]),
    )
    optimizer.exclude_from_weight_decay(var_names=["layer_norm", "layernorm", "bias", "norm"])
    # The loss is the mean cross-entropy over the tokens it uses: Keras' default reduction
    # (`sum_over_batch_size`) divides the weighted sum by every position, padding and prompt included.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    # `token_loss`: the same cross-entropy as a weighted metric, which Keras accumulates over all
    # batches as sum(w * ce) / sum(w): the exact per-token mean of an evaluation (lora3.run.evaluate).
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
               keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="token_loss")]
    jit = bool(trainer.get("jit_compile", True))
    if bundle.fit_model is bundle.model:
        bundle.model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics, sampler="greedy",
                             jit_compile=jit)
    else:  # decoder-only: fit on the completion-loss view (chunked head); generate with the task model
        from lora3.run.completion import completion_loss, completion_metrics

        bundle.fit_model.compile(optimizer=optimizer, loss=completion_loss(), weighted_metrics=completion_metrics(),
                                 jit_compile=jit)
        bundle.model.compile(sampler="greedy", jit_compile=jit)
    return optimizer


def is_lora_b(variable) -> bool:
    """Whether a variable is a LoRA B matrix (`<layer>/lora_B`, or `lora_B_<name>` of a named adapter)."""
    leaf = variable.path.rsplit("/", 1)[-1]
    return leaf == "lora_B" or leaf.startswith("lora_B_")


def lora_plus_optimizer(base_cls, ratio: float):
    """LoRA+ (Hayou, Ghosh and Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"):
    `base_cls` (a Keras optimizer class) whose learning rate for every LoRA B matrix is `ratio` times
    the rate of everything else, A included, as PEFT's `create_loraplus_optimizer` sets its two
    parameter groups: the update step and AdamW's decoupled weight decay both run at B's rate.

    Keras' own `update_step(gradient, variable, learning_rate)` takes the rate per variable, so only
    that rate is changed: the optimizer, its state and its schedule are Keras'.

    Example:
    >>> import keras, numpy as np
    >>> opt = lora_plus_optimizer(keras.optimizers.SGD, 4.0)(learning_rate=0.5)
    >>> a = keras.Variable(np.ones(2, "float32"), name="lora_A")
    >>> b = keras.Variable(np.ones(2, "float32"), name="lora_B")
    >>> opt.apply([np.ones(2, "float32")] * 2, [a, b])
    >>> keras.ops.convert_to_numpy(a).tolist(), keras.ops.convert_to_numpy(b).tolist()
    ([0.5, 0.5], [-1.0, -1.0])
    """
    from keras import ops

    class LoraPlus(base_cls):
        def build(self, variables):
            super().build(variables)
            # Keyed as the optimizer keys its own slots: the step sees backend variables on TensorFlow.
            self._lora_b_keys = {self._var_key(v) for v in variables if is_lora_b(v)}

        def _is_b(self, variable):
            return self._var_key(variable) in self._lora_b_keys

        def update_step(self, gradient, variable, learning_rate):
            if self._is_b(variable):
                learning_rate = ops.multiply(learning_rate, ops.cast(ratio, learning_rate.dtype))
            return super().update_step(gradient, variable, learning_rate)

        def _apply_weight_decay(self, variables):
            super()._apply_weight_decay([v for v in variables if not self._is_b(v)])
            if self.weight_decay is None:
                return
            for variable in variables:  # Keras' decoupled decay, at B's rate
                if self._is_b(variable) and self._use_weight_decay(variable):
                    lr = ops.multiply(ops.cast(self.learning_rate, variable.dtype), ops.cast(ratio, variable.dtype))
                    wd = ops.cast(self.weight_decay, variable.dtype)
                    variable.assign(variable - variable * wd * lr)

    LoraPlus.__name__ = f"LoraPlus{base_cls.__name__}"
    return LoraPlus


def skip_nonfinite_optimizer(base_cls):
    """`base_cls` (a Keras optimizer class) that leaves every variable as it was, itself included, when
    any gradient is NaN or inf: the batch is skipped (its step does not count for the schedule).

    JAX trains through `stateless_apply`, the other backends through `apply`; both branch with
    `ops.cond` on the gradients' finiteness, as Keras' LossScaleOptimizer does."""
    from keras import ops
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    def all_finite(grads):
        flags = [ops.all(ops.isfinite(g)) for g in grads if g is not None]
        return ops.all(ops.stack(flags)) if flags else ops.convert_to_tensor(True)

    class SkipNonFinite(base_cls):
        def stateless_apply(self, optimizer_variables, grads, trainable_variables):
            return ops.cond(
                all_finite(grads),
                lambda: base_cls.stateless_apply(self, optimizer_variables, grads, trainable_variables),
                lambda: (list(trainable_variables), list(optimizer_variables)),
            )

        def apply(self, grads, trainable_variables=None):
            if in_stateless_scope() or not self.built:  # inside stateless_apply (JAX), or the first build
                return base_cls.apply(self, grads, trainable_variables)

            def update():
                base_cls.apply(self, grads, trainable_variables)

            ops.cond(all_finite(grads), update, lambda: None)

    SkipNonFinite.__name__ = f"SkipNonFinite{base_cls.__name__}"
    return SkipNonFinite


# ---------------------------------------------------------------- data order


def batch_indices(n: int, batch_size: int, start_step: int, end_step: int, seed: int) -> np.ndarray:
    """Example indices for steps [start_step, end_step): a stream of per-pass permutations of range(n)."""
    first = start_step * batch_size
    last = end_step * batch_size
    out, pos = [], first
    while pos < last:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(n - offset, last - pos)
        out.append(perm[offset: offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros((0,), dtype="int64")


def _take(arrays, idx):
    x, y, sw = arrays
    return {k: v[idx] for k, v in x.items()}, y[idx], sw[idx]


# ---------------------------------------------------------------- checkpoints


def _state_variables(model):
    """Variables a checkpoint holds: trainable weights, optimizer slots, RNG seed-generator states."""
    seeds = [v for v in model.non_trainable_variables if "seed_generator" in v.path]
    return {"trainable": list(model.trainable_variables), "optimizer": list(model.optimizer.variables),
            "seeds": seeds}


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    good = []
    for p in root.glob("step-*"):
        if p.is_dir() and (p / "meta.json").is_file() and (p / "state.npz").is_file():
            try:
                good.append((int(p.name.split("-")[1]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(good)]


def save_checkpoint(model, out_dir: Path, step: int, meta: dict, keep: int = 2) -> Path:
    """Writes `checkpoints/step-<n>/` whole or not at all (`lora3.fileio.staged_dir`); keeps the last `keep`."""
    final = Path(out_dir) / "checkpoints" / f"step-{step:08d}"
    groups = _state_variables(model)
    arrays, names = {}, {}
    for group, variables in groups.items():
        names[group] = [v.path for v in variables]
        for i, v in enumerate(variables):
            arrays[f"{group}/{i}"] = np.asarray(v.numpy() if hasattr(v, "numpy") else v.value)
    state = io.BytesIO()
    np.savez(state, **arrays)
    with staged_dir(final) as tmp:
        atomic_write_bytes(Path(tmp) / "state.npz", state.getvalue())
        atomic_write_text(Path(tmp) / "meta.json", json.dumps(dict(meta, step=step, variables=names), indent=1,
                                                              default=float))
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(model, path: Path) -> dict:
    """Restores a checkpoint written by `save_checkpoint` into a compiled model; returns its meta."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    groups = _state_variables(model)
    with np.load(Path(path) / "state.npz") as state:
        for group, variables in groups.items():
            saved = meta["variables"].get(group, [])
            current = [v.path for v in variables]
            if saved != current:
                raise TrainingError(
                    f"checkpoint {path} does not fit this model ({group}: {len(saved)} saved variables vs "
                    f"{len(current)} now); resume with the same config, or start a new run directory"
                )
            for i, v in enumerate(variables):
                v.assign(state[f"{group}/{i}"])
    return meta


# ---------------------------------------------------------------- callbacks


PAUSE_ENV = "LORA3_TEST_PAUSE_AFTER_STEP"


class StepLogger:
    """Keras callback: logs train/loss (mean over the last `every` steps), train/lr, non-finite guard.

    A non-finite loss stops training (`nonfinite_step`), or with `skip_nonfinite` the batch is
    counted in `skipped` (the optimizer left every variable as it was) and the running loss mean
    restarts after it, so train/loss stays the mean over the finite batches.

    Fault injection for tests: with the environment variable LORA3_TEST_PAUSE_AFTER_STEP=N the process
    prints a line and sleeps after optimizer step N (a test then kills it with SIGKILL)."""

    def __new__(cls, *args, **kwargs):
        import keras

        class _StepLogger(keras.callbacks.Callback):
            def __init__(self, tracker, every, first_step, lr_fn, skip_nonfinite=False, skipped_before=0):
                super().__init__()
                self.tracker, self.every, self.first_step, self.lr_fn = tracker, max(1, every), first_step, lr_fn
                self.skip_nonfinite, self.skipped_before = skip_nonfinite, skipped_before
                self.nonfinite_step = None
                self.last_loss = None
                self.skipped: list[int] = []  # steps skipped in this period
                pause = os.environ.get(PAUSE_ENV, "")
                self.pause_after = int(pause) if pause.isdigit() else None

            def on_epoch_begin(self, epoch, logs=None):
                # Finite losses of the period: closed segments (sum, n) + the running segment (n, mean).
                self.closed_sum, self.closed_n = 0.0, 0
                self.seg_start, self.seg_n, self.seg_mean = 0, 0, 0.0
                self.s_prev, self.n_prev, self.k_logged = 0.0, 0, 0
                self.period_loss = None

            def on_epoch_end(self, epoch, logs=None):
                if self.skipped:
                    n = self.closed_n + self.seg_n
                    self.period_loss = (self.closed_sum + self.seg_n * self.seg_mean) / n if n else None
                elif logs and "loss" in logs:
                    self.period_loss = float(logs["loss"])  # mean training loss over the period

            def on_train_batch_end(self, batch, logs=None):
                logs = logs or {}
                if "loss" not in logs:
                    return
                k = batch + 1
                mean = float(logs["loss"])  # Keras' running mean since the period (or the last reset) began
                step = self.first_step + batch + 1  # optimizer steps done
                if not math.isfinite(mean):
                    if not self.skip_nonfinite:
                        self.nonfinite_step = step
                        self.model.stop_training = True
                        return
                    # The optimizer skipped this batch: close the running segment, restart Keras' means.
                    self.closed_sum += self.seg_n * self.seg_mean
                    self.closed_n += self.seg_n
                    self.seg_start, self.seg_n, self.seg_mean = k, 0, 0.0
                    for m in self.model.metrics:
                        m.reset_state()
                    self.skipped.append(step)
                    total = self.skipped_before + len(self.skipped)
                    print(f"[lora3] step {step}: non-finite loss, batch skipped ({total} so far; "
                          "trainer.skip_nonfinite=true)", flush=True)
                    self.tracker.log({"train/nonfinite_skipped": total}, step=step)
                    return
                self.seg_n, self.seg_mean = k - self.seg_start, mean
                if k - self.k_logged >= self.every or step % self.every == 0:
                    # Recover the window's mean from the running means.
                    s_now = self.closed_sum + self.seg_n * mean
                    n_now = self.closed_n + self.seg_n
                    if n_now > self.n_prev:
                        window = (s_now - self.s_prev) / (n_now - self.n_prev)
                        self.last_loss = window
                        self.tracker.log({"train/loss": window, "train/lr": self.lr_fn(step - 1),
                                          "train/step": step}, step=step)
                    self.s_prev, self.n_prev, self.k_logged = s_now, n_now, k
                if self.pause_after is not None and step == self.pause_after:
                    print(f"[lora3] {PAUSE_ENV}={step}: pausing after step {step}", flush=True)
                    time.sleep(3600)

        return _StepLogger(*args, **kwargs)


# ---------------------------------------------------------------- the loop


def train(
    bundle,
    train_arrays: tuple,
    *,
    trainer: Mapping[str, Any],
    max_steps: int,
    eval_every: int,
    seed: int,
    out_dir: str | os.PathLike,
    evaluate_fn: Callable[[int], dict],
    tracker,
    log_every: int = 10,
    resume: bool = False,
    meta_extra: Mapping[str, Any] | None = None,
    callbacks: tuple = (),
    tokens_per_step: float | None = None,
) -> dict:
    """Trains for `max_steps`, evaluating and checkpointing every `eval_every` steps.

    `evaluate_fn(step)` returns a dict of `val/*` metrics (and optionally `samples`).
    Returns {"history": [...], "best": {...}, "last": {...}, "perf": {...}, "resumed_from": step|None,
    "nonfinite_skipped": n, "last_scores": the last `evaluate_fn` result (None if no period ran)}.
    """
    model = bundle.fit_model  # decoder-only: the completion-logits view (same variables)
    out_dir = Path(out_dir)
    n = len(train_arrays[1])
    batch_size = int(trainer["batch_size"])
    lr_kwargs = dict(peak=float(trainer["lr"]), warmup=int(trainer["warmup_steps"]), total=max_steps,
                     schedule=trainer["schedule"], min_ratio=float(trainer["min_lr_ratio"]))
    verbose = trainer.get("verbose", "auto")
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    keep = int(trainer.get("keep_checkpoints", 2))

    # 1. where do we start?
    history: list[dict] = []
    best: dict = {}
    step = 0
    resumed_from = None
    skipped_total = 0
    skip_nonfinite = bool(trainer.get("skip_nonfinite", False))
    inject = sorted(int(s) for s in (trainer.get("inject_nonfinite_steps") or []))
    if resume:
        ckpts = list_checkpoints(out_dir)
        meta = None
        for ckpt in reversed(ckpts):  # the newest readable one; a damaged file never stops a resume
            try:
                meta = load_checkpoint(model, ckpt)
                break
            except TrainingError:
                raise
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                print(f"[lora3] checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); trying an earlier one",
                      flush=True)
        if meta is not None:
            step, history, best = int(meta["step"]), meta.get("history", []), meta.get("best", {})
            skipped_total = int(meta.get("nonfinite_skipped", 0))
            resumed_from = step
            print(f"[lora3] resumed from {ckpt} (step {step} of {max_steps})", flush=True)
        else:
            print(f"[lora3] resume=true but no checkpoint in {out_dir / 'checkpoints'}: starting at step 0",
                  flush=True)

    # 2. one fit() epoch per evaluation period
    fit_time, fit_steps, compile_time = 0.0, 0, None
    periods = math.ceil(max_steps / eval_every)
    scores = None  # the last evaluation's full result (with its samples): the run's final scores
    while step < max_steps:
        period = step // eval_every
        end = min(max_steps, (period + 1) * eval_every)
        x, y, sw = _take(train_arrays, batch_indices(n, batch_size, step, end, seed))
        for s in inject:  # fault injection (tests): NaN sample weights give a NaN loss and NaN gradients
            if step < s <= end:
                sw = np.array(sw, dtype="float32")
                sw[(s - 1 - step) * batch_size:(s - step) * batch_size] = np.nan
        x, y, sw, fit_batch = dist_mod.pad_train_batches(x, y, sw, batch_size)
        logger = StepLogger(tracker, log_every, step, lambda s: lr_at(s, **lr_kwargs),
                            skip_nonfinite=skip_nonfinite, skipped_before=skipped_total)
        if verbose:
            print(f"[lora3] steps {step + 1}-{end} of {max_steps}", flush=True)
        preprocessor = getattr(model, "preprocessor", None)
        if preprocessor is not None:
            model.preprocessor = None  # arrays are already tokenised and packed
        t0 = time.perf_counter()
        try:
            model.fit(x=x, y=y, sample_weight=sw, batch_size=fit_batch, shuffle=False,
                      epochs=period + 1, initial_epoch=period, verbose=verbose,
                      callbacks=[logger, *callbacks])
        finally:
            if preprocessor is not None:
                model.preprocessor = preprocessor
        dt = time.perf_counter() - t0
        if logger.nonfinite_step is not None:
            last = list_checkpoints(out_dir)
            raise TrainingError(
                f"non-finite training loss (NaN or inf) at step {logger.nonfinite_step}; "
                f"last good checkpoint: {last[-1] if last else 'none (no checkpoint yet)'}. Lower trainer.lr, "
                "check the data, or set trainer.skip_nonfinite=true to skip such batches; "
                "resume=true continues from the last good checkpoint"
            )
        skipped_total += len(logger.skipped)
        if logger.skipped and len(logger.skipped) == end - step:
            last = list_checkpoints(out_dir)
            raise TrainingError(
                f"every batch of steps {step + 1}-{end} had a non-finite loss (skipped); the run diverged. "
                f"Last good checkpoint: {last[-1] if last else 'none (no checkpoint yet)'}; lower trainer.lr"
            )
        if compile_time is None and fit_steps == 0 and periods > 1:
            compile_time = dt  # the first period includes tracing and compilation
        else:
            fit_time += dt
            fit_steps += end - step
        step = end

        # 3. evaluate
        scores = evaluate_fn(step)
        record = {"step": step, "train/loss": logger.period_loss, "train/lr": lr_at(step - 1, **lr_kwargs),
                  **{k: v for k, v in scores.items() if k.startswith("val/")}}
        history.append(record)
        tracker.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        if "val/bleu" in record and record["val/bleu"] >= best.get("val/bleu", -1.0):
            best.update({"val/bleu": record["val/bleu"], "val/bleu_step": step})
        if "val/chrf" in record and record["val/chrf"] >= best.get("val/chrf", -1.0):
            best.update({"val/chrf": record["val/chrf"], "val/chrf_step": step})
        if "val/loss" in record and record["val/loss"] <= best.get("val/loss", float("inf")):
            best.update({"val/loss": record["val/loss"], "val/loss_step": step})
        msg = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and not k.endswith("_s"))
        print(f"[lora3] step {step}: {msg}", flush=True)

        # 4. checkpoint (atomic)
        save_checkpoint(model, out_dir, step, {"history": history, "best": best, "nonfinite_skipped": skipped_total,
                                               **(meta_extra or {})}, keep=keep)

    if fit_steps == 0 and compile_time is not None:
        fit_time, fit_steps = compile_time, max_steps - (resumed_from or 0)
    perf = {
        "train_seconds": fit_time + (compile_time or 0.0),
        "first_period_seconds": compile_time,
        "steps_timed": fit_steps,
        "steps_per_s": fit_steps / fit_time if fit_time > 0 else None,
    }
    if tokens_per_step and fit_time > 0:
        perf["tokens_per_s"] = tokens_per_step * fit_steps / fit_time
    return {"history": history, "best": best, "last": history[-1] if history else {}, "perf": perf,
            "resumed_from": resumed_from, "nonfinite_skipped": skipped_total, "last_scores": scores}
