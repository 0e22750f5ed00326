"""Bad input, one table: every case must fail with a message that names the value and what is valid,
a non-zero exit (a `Lora3Error`, a `ValueError`, in the Python API), no traceback on the command line
(unless HYDRA_FULL_ERROR=1), and no file created or changed but the job's log.

How a case is run (column `how`):

- `cli`: `lora3.run.cli.precheck(argv)`, in process: the same function `python -m lora3.run argv` runs
  before Hydra creates anything (config values, data files, the output directory). Returns the
  exit status and prints the message; nothing may be written at all.
- `compose`: a group or launcher that does not exist: Hydra's composition, which the CLI reports
  itself before creating anything (`test_cli_subprocess` runs one for real).
- `job`: `run_job` in process, for what needs keras (targets that match nothing, overlong pairs):
  the job must remove what it created (only Hydra's `.hydra/` and `run.log` may stay, on the CLI).
- `api`: the Python API (`LoraConfig`, `apply_lora`, `load_adapter`, `load_model`, `save_adapter`).
- `subprocess`: a real `python -m lora3.run` (a handful: keras imports take seconds).

Adapter corruptions reuse `tiny.corrupt_adapter` (tests/tiny.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

import lora3
from lora3.run.cli import precheck
from lora3.run.job import run_job

pytestmark = pytest.mark.one_backend
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
LOG_FILES = {".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.log"}


@dataclasses.dataclass
class Case:
    id: str
    how: str                      # cli | compose | job | api | subprocess
    args: list | Callable = ()    # overrides (cli, compose, job, subprocess) or fn(tmp, ctx) (api)
    needles: tuple = ()           # must all appear in the message: the value and what is valid
    files: Callable | None = None  # setup(tmp) writing input files before the case


# ---------------------------------------------------------------- input files


def _jsonl(tmp, name, lines):
    p = tmp / name
    p.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return p


GOOD = '{"translation": {"de": "ein Hund", "en": "a dog"}}'


def _plain(tmp, de, en):
    d = tmp / "pairs"
    d.mkdir()
    (d / "train.de").write_bytes(de)
    (d / "train.en").write_bytes(en)
    (d / "valid.de").write_text("eins\n")
    (d / "valid.en").write_text("one\n")


def _finished_run(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.json").write_text('{"status": "finished"}')


def _unfinished_run(tmp):
    (tmp / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)


# ---------------------------------------------------------------- API cases (ctx: a saved adapter)


def _load_corrupted(kind):
    def run(tmp, ctx):
        import tiny

        adapter = tmp / "adapter"
        shutil.copytree(ctx["adapter"], adapter)
        tiny.corrupt_adapter(kind, adapter)
        return lambda: lora3.load_adapter(ctx["fresh"](), adapter)

    return run


def _load_onto_other_model(tmp, ctx):
    import tiny

    shutil.copytree(ctx["adapter"], tmp / "adapter")
    return lambda: lora3.load_adapter(tiny.t5_backbone(hidden=32), tmp / "adapter")


def _load_pickle_as_keras(tmp, ctx):
    import pickle

    (tmp / "model.keras").write_bytes(pickle.dumps({"x": 1}))
    return lambda: lora3.load_model(tmp / "model.keras")


def _save_over(tmp, ctx):
    shutil.copytree(ctx["adapter"], tmp / "adapter")
    return lambda: lora3.save_adapter(ctx["model"], tmp / "adapter", overwrite=False)


def _apply(**kw):
    def run(tmp, ctx):
        return lambda: lora3.apply_lora(ctx["fresh"](), lora3.LoraConfig(**kw))

    return run


def _config(**kw):
    return lambda tmp, ctx: (lambda: lora3.LoraConfig(**kw))


# ---------------------------------------------------------------- the table

CASES = [
    # -- config values (CLI pre-check: nothing at all is written)
    Case("rank-0", "cli", ["rank=0"], ("rank=0", "positive integer")),
    Case("rank-str", "cli", ["rank=abc"], ("rank='abc'", "positive integer")),
    Case("rank-float", "cli", ["rank=2.5"], ("rank=2.5", "positive integer")),
    Case("alpha-negative", "cli", ["alpha=-1"], ("alpha=-1", "positive number")),
    Case("dropout-1.5", "cli", ["lora.dropout=1.5"], ("lora.dropout=1.5", "[0, 1)")),
    Case("backend-unknown", "cli", ["backend=torch"], ("backend='torch'", "jax, tensorflow")),
    Case("lr-zero", "cli", ["trainer.lr=0"], ("trainer.lr=0", "positive number")),
    Case("lr-nan", "cli", ["trainer.lr=nan"], ("trainer.lr=nan", "positive number")),
    Case("batch-negative", "cli", ["trainer.batch_size=-2"], ("trainer.batch_size=-2", "positive integer")),
    Case("seed-negative", "cli", ["seed=-1"], ("seed=-1", "integer >= 0")),
    Case("resume-not-bool", "cli", ["resume=maybe"], ("resume='maybe'", "true or false")),
    Case("precision-unknown", "cli", ["trainer.precision=fp8"], ("trainer.precision='fp8'", "float32")),
    Case("eval-every-0", "cli", ["eval.every=0"], ("eval.every=0", "positive integer")),
    Case("wandb-mode", "cli", ["wandb.mode=cloud"], ("wandb.mode='cloud'", "offline, online, disabled")),
    Case("targets-empty", "cli", ["targets=[]"], ("targets=[]", "a role, group or regex")),
    Case("init-unknown", "cli", ["lora.init=zeros"], ("lora.init='zeros'", "kaiming, gaussian")),
    Case("overlong-unknown", "cli", ["data.overlong=ignore"], ("data.overlong='ignore'", "truncate, drop, error")),
    Case("objective", "cli", ["objective=bleu"], ("objective='bleu'", "best/val/bleu")),
    Case("skip-nonfinite", "cli", ["trainer.skip_nonfinite=2"], ("trainer.skip_nonfinite=2", "true or false")),
    Case("inject-steps", "cli", ["trainer.inject_nonfinite_steps=[0]"], ("inject_nonfinite_steps=[0]", "positive")),
    Case("unknown-key", "cli", ["trainer.max_stepz=3"], ("trainer.max_stepz", "did you mean trainer.max_steps")),
    # -- groups that do not exist (Hydra's composition, before anything is created)
    Case("model-unknown", "compose", ["model=nope"], ("model/nope", "Available options in 'model'", "t5_tiny")),
    Case("data-unknown", "compose", ["data=nope"], ("data/nope", "Available options in 'data'", "synthetic")),
    Case("launcher-unknown", "subprocess", ["hydra/launcher=nope"], ("hydra/launcher/nope", "joblib")),
    # -- data files (CLI pre-check reads them)
    Case("jsonl-empty", "cli", ["data=jsonl", "data.path={tmp}/empty.jsonl"], ("empty.jsonl: 0 pair(s)", "at least 2"),
         lambda t: _jsonl(t, "empty.jsonl", [])),
    Case("jsonl-one-line", "cli", ["data=jsonl", "data.path={tmp}/one.jsonl"], ("one.jsonl: 1 pair(s)", "at least 2"),
         lambda t: _jsonl(t, "one.jsonl", [GOOD])),
    Case("jsonl-malformed", "cli", ["data=jsonl", "data.path={tmp}/bad.jsonl"], ("bad.jsonl:2: malformed JSON",),
         lambda t: _jsonl(t, "bad.jsonl", [GOOD, '{"translation": ', GOOD])),
    Case("jsonl-schema", "cli", ["data=jsonl", "data.path={tmp}/schema.jsonl"],
         ("schema.jsonl:1:", '{"translation": {"de": "...", "en": "..."}}'),
         lambda t: _jsonl(t, "schema.jsonl", ['{"de": "a", "en": "b"}', GOOD])),
    Case("jsonl-field-type", "cli", ["data=jsonl", "data.path={tmp}/types.jsonl"], ("types.jsonl:2:", "'en' is int"),
         lambda t: _jsonl(t, "types.jsonl", [GOOD, '{"translation": {"de": "a", "en": 3}}'])),
    Case("non-utf8", "cli", ["data=jsonl", "data.path={tmp}/latin1.jsonl"], ("latin1.jsonl:2: not valid UTF-8", "UTF-8"),
         lambda t: _jsonl(t, "latin1.jsonl", [GOOD, '{"translation": {"de": "Stra\xdfe", "en": "x"}}'.encode("latin-1")])),
    Case("data-missing", "cli", ["data=jsonl", "data.path={tmp}/nowhere.jsonl"], ("nowhere.jsonl not found",)),
    Case("pairs-line-counts", "cli", ["data=multi30k", "data.path={tmp}/pairs"], ("has 3 lines but", "same number of lines"),
         lambda t: _plain(t, b"a\nb\nc\n", b"x\ny\n")),
    Case("pairs-blank-line", "cli", ["data=multi30k", "data.path={tmp}/pairs"], ("train.de:2: empty line",),
         lambda t: _plain(t, b"a\n\nc\n", b"x\ny\nz\n")),
    # -- output directory
    Case("dir-finished", "cli", [], ("already holds a finished run", "resume=true"), _finished_run),
    Case("dir-unfinished", "cli", [], ("holds an unfinished run", "resume=true"), _unfinished_run),
    # -- what needs the model (the job removes what it created)
    Case("targets-match-nothing", "job", ["targets=nomatch_xyz"], ("'nomatch_xyz' matches no adaptable layer",)),
    Case("overlong-error", "job", ["data.overlong=error", "data.max_source_length=4"],
         ("data.max_source_length allows 3", "data.overlong=truncate")),
    # -- Python API
    Case("api-rank-0", "api", _config(rank=0), ("rank=0", "positive integer")),
    Case("api-dropout", "api", _config(dropout=1.5), ("dropout=1.5", "[0, 1)")),
    Case("api-init", "api", _config(init="zeros"), ("'zeros'", "kaiming, gaussian")),
    Case("api-rank-above-width", "api", _apply(rank=64, targets="qv"), ("rank=64", "rank must be <= 16")),
    Case("api-targets-nothing", "api", _apply(rank=2, targets="nomatch"), ("'nomatch' matches no adaptable layer",)),
    Case("adapter-other-model", "api", _load_onto_other_model, ("T5Backbone", "another architecture or size")),
    Case("adapter-truncated", "api", _load_corrupted("truncated"), ("adapter.safetensors", "does not match the sha256")),
    Case("adapter-altered", "api", _load_corrupted("altered"), ("adapter.safetensors", "does not match the sha256")),
    Case("adapter-extra-tensor", "api", _load_corrupted("extra_tensor"), ("../../evil/lora_A", "name no adapted layer")),
    Case("adapter-wrong-shape", "api", _load_corrupted("wrong_shape"), ("has shape (3, 3)", "this model needs")),
    Case("config-missing-field", "api", _load_corrupted("missing_field"), ("'base_fingerprint'", "required:")),
    Case("config-wrong-type", "api", _load_corrupted("wrong_type"), ("'rank' must be int", "'eight'")),
    Case("config-dotdot-path", "api", _load_corrupted("dotdot_path"), ("'../outside/query_projector'", "not a model layer path")),
    Case("config-not-json", "api", _load_corrupted("bad_json"), ("adapter_config.json is not valid JSON",)),
    Case("keras-file-is-pickle", "api", _load_pickle_as_keras, ("model.keras", "not a .keras archive")),
    Case("save-over-existing", "api", _save_over, ("adapter already exists", "overwrite=True")),
    # -- the real command line (a handful)
    Case("cli-rank-0", "subprocess", ["rank=0"], ("rank=0 is not valid", "positive integer")),
    Case("cli-targets-nothing", "subprocess", ["targets=nomatch_xyz"], ("'nomatch_xyz' matches no adaptable layer",)),
]
assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)

SMOKE = ["experiment=smoke", "model.base=null", f"backend={BACKEND}", "eval.before=false", "eval.num_samples=0",
         "trainer.max_steps=2"]


def snapshot(root: Path) -> dict:
    """Every file under root with its content hash (directories as None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def assert_nothing_written(before: dict, after: dict, allowed=frozenset()):
    changed = {k for k in before if k in after and before[k] != after[k]}
    removed = set(before) - set(after)
    created = {k.split("run/", 1)[-1] if k.startswith("run/") else k for k in set(after) - set(before)}
    created = {k for k in created if k not in allowed and not (allowed and k == "run")}
    assert not changed and not removed and not created, (changed, removed, created)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A tiny T5 with a saved adapter (as in test_adapters) and a factory of fresh bases."""
    import keras
    import tiny

    tmp = tmp_path_factory.mktemp("bad_inputs_adapter")
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone()
    bb.save_weights(str(tmp / "base.weights.h5"))
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="qv"))
    tiny.randomize_lora(bb)
    lora3.save_adapter(bb, tmp / "adapter")

    def fresh():
        m = tiny.t5_backbone()
        m.load_weights(str(tmp / "base.weights.h5"))
        return m

    return {"adapter": tmp / "adapter", "model": bb, "fresh": fresh}


def _fill(args, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in args]


@pytest.mark.parametrize("case", [c for c in CASES if c.how != "subprocess"], ids=lambda c: c.id)
def test_bad_input(case, tmp_path, capsys, compose, lora3_cache, request):
    if case.files:
        case.files(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    if case.how == "cli":
        rc = precheck([*_fill(case.args, tmp_path), "experiment=smoke", f"hydra.run.dir={out}"])
        cap = capsys.readouterr()
        message = cap.out + cap.err
        assert rc == 1, message
        assert "Traceback" not in message
    elif case.how == "compose":
        from hydra.errors import HydraException

        with pytest.raises(HydraException) as e:
            compose([*case.args])
        message = str(e.value)
        assert precheck([*case.args, f"hydra.run.dir={out}"]) == 0  # left to Hydra, which reports it first
    elif case.how == "job":
        with pytest.raises(lora3.Lora3Error) as e:  # hydra_task turns these into exit 1, no traceback
            run_job(compose([*SMOKE, f"cache_dir={lora3_cache}", *_fill(case.args, tmp_path)]), out)
        message = str(e.value)
    else:
        call = case.args(tmp_path, request.getfixturevalue("ctx"))
        before = snapshot(tmp_path)
        with pytest.raises(lora3.Lora3Error) as e:
            call()
        message = str(e.value)
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert_nothing_written(before, snapshot(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.how == "subprocess"], ids=lambda c: c.id)
def test_cli_subprocess(case, tmp_path, run_cli, lora3_cache):
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    r = run_cli(*SMOKE, f"cache_dir={lora3_cache}", *case.args, f"hydra.run.dir={out}", timeout=300)
    message = r.stdout + r.stderr
    assert r.returncode == 1, message[-3000:]
    assert "Traceback" not in message
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in: {message[-3000:]}"
    assert_nothing_written(before, snapshot(tmp_path), allowed=LOG_FILES)


def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(lora3.Lora3Error, match="rank=0"):
        precheck(["rank=0", f"hydra.run.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_cli_precheck_accepts_good_input_and_leaves_sweeps_alone(tmp_path):
    assert precheck(["experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert precheck(["-m", "rank=0,2"]) == 0          # a sweep: each job fails or runs on its own
    assert precheck(["--cfg", "job", "rank=0"]) == 0  # printing the config is not a run
    assert not (tmp_path / "run").exists()
