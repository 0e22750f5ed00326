"""Data: the synthetic task, file readers and their errors (no keras); where relative paths resolve."""

import gzip
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import lora3.run.data as data_mod
from lora3.run.data import OFFICIAL, DataError, can_reach, load
from lora3.run.data import synthetic
from lora3.run.data.readers import read_jsonl, read_plain_pair

REPO = Path(__file__).resolve().parents[3]
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
GITHUB = "raw.githubusercontent.com"


def test_synthetic_is_deterministic_and_seeded():
    a = synthetic.generate(200, 20, seed=3)
    b = synthetic.generate(200, 20, seed=3)
    c = synthetic.generate(200, 20, seed=4)
    assert a == b
    assert a != c


def test_synthetic_valid_is_held_out_and_structured():
    train, valid = synthetic.generate(2000, 200, seed=0)
    assert len(train) == 2000 and len(valid) == 200
    assert not {p["de"] for p in valid} & {p["de"] for p in train}
    # German structure that English does not share: perfect with the participle at the end,
    # do-support for negation, verb-final subordinate clauses.
    perfect = [p for p in train if " hat " in f" {p['de']} " and "," not in p["de"]]
    assert perfect and all(p["de"].rstrip(".").split()[-1].startswith("ge") for p in perfect)
    assert any(" not " in p["en"] for p in train)
    sub = [p for p in train if ", weil " in p["de"]]
    assert sub and all(", because " in p["en"] for p in sub)
    assert all(p["de"][0].isupper() and p["de"].endswith(".") for p in train)


def test_synthetic_variants_split_constructions():
    base, _ = synthetic.generate(300, 10, seed=0, variant="base")
    shift, _ = synthetic.generate(300, 10, seed=0, variant="shift")
    assert not any(" hat " in f" {p['de']} " or " haben " in f" {p['de']} " for p in base)
    marked = [p for p in shift if any(w in f" {p['de']} " for w in (" hat ", " haben ", " nicht", " kein"))
              or "," in p["de"]]
    assert len(marked) == len(shift)
    with pytest.raises(DataError, match="data.variant"):
        load({"source": "synthetic", "variant": "nope"})


def test_load_synthetic_prefix_direction_and_caps():
    d = load({"source": "synthetic", "train_size": 50, "valid_size": 5, "max_train": 20}, seed=1)
    assert len(d.train) == 20 and len(d.valid) == 5
    assert d.inputs("train")[0] == "translate German to English: " + d.train[0]["de"]
    assert d.targets("train")[0] == d.train[0]["en"]
    r = load({"source": "synthetic", "train_size": 50, "valid_size": 5, "direction": "en-de", "prefix": ""}, seed=1)
    assert r.inputs("train")[0] == r.train[0]["en"] and r.targets("train")[0] == r.train[0]["de"]
    with pytest.raises(DataError, match="data.direction"):
        load({"source": "synthetic", "direction": "fr-en"})


def _write(path: Path, text, mode="w"):
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_reader_and_errors_name_file_and_line(tmp_path):
    good = _write(tmp_path / "ok.jsonl", "\n".join(json.dumps({"translation": {"de": f" Hallo {i} ", "en": f"Hi {i}"}})
                                                    for i in range(5)) + "\n\n")
    rows = read_jsonl(good)
    assert rows[0] == {"de": "Hallo 0", "en": "Hi 0"} and len(rows) == 5
    bad = _write(tmp_path / "bad.jsonl", '{"translation": {"de": "a", "en": "b"}}\n{"translation": {"de": "a"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(bad)
    schema = _write(tmp_path / "schema.jsonl", '{"de": "a", "en": "b"}\n')
    with pytest.raises(DataError, match=r"schema\.jsonl:1: expected an object"):
        read_jsonl(schema)
    missing = _write(tmp_path / "missing.jsonl", '{"translation": {"de": "a", "en": 3}}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:1: .*'en' is int"):
        read_jsonl(missing)
    latin1 = _write(tmp_path / "latin1.jsonl", '{"translation": {"de": "a", "en": "b"}}\n'.encode() +
                    '{"translation": {"de": "Stra\xdfe", "en": "street"}}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_jsonl(latin1)
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_plain_pairs_and_errors(tmp_path):
    _write(tmp_path / "train.de", "Ein Hund\tläuft.\nZwei Katzen.\n")
    _write(tmp_path / "train.en", "A dog runs.\nTwo cats.\n")
    assert read_plain_pair(tmp_path / "train") == [{"de": "Ein Hund\tläuft.", "en": "A dog runs."},
                                                   {"de": "Zwei Katzen.", "en": "Two cats."}]
    _write(tmp_path / "bad.de", "a\nb\nc\n")
    _write(tmp_path / "bad.en", "a\nb\n")
    with pytest.raises(DataError, match=r"bad\.de has 3 lines but .*bad\.en has 2"):
        read_plain_pair(tmp_path / "bad")
    _write(tmp_path / "blank.de", "a\n\nc\n")
    _write(tmp_path / "blank.en", "a\nb\nc\n")
    with pytest.raises(DataError, match=r"blank\.de:2: empty line"):
        read_plain_pair(tmp_path / "blank")


def test_jsonl_source_holds_out_validation_and_rejects_tiny_files(tmp_path):
    f = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"translation": {"de": f"d{i}", "en": f"e{i}"}})
                                               for i in range(40)))
    d = load({"source": "jsonl", "path": str(f), "valid_fraction": 0.25}, seed=0)
    assert len(d.valid) == 10 and len(d.train) == 30
    assert not {p["de"] for p in d.valid} & {p["de"] for p in d.train}
    one = _write(tmp_path / "one.jsonl", json.dumps({"translation": {"de": "a", "en": "b"}}) + "\n")
    with pytest.raises(DataError, match="at least 2"):
        load({"source": "jsonl", "path": str(one)})
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match="at least 2"):
        load({"source": "jsonl", "path": str(empty)})
    with pytest.raises(DataError, match="data.path=.*not found"):
        load({"source": "jsonl", "path": str(tmp_path / "absent.jsonl")})


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k not present")
def test_multi30k_default_path_both_layouts(monkeypatch):
    monkeypatch.chdir(REPO)
    d = load({"source": "files", "path": "../shared/data/multi30k"}, seed=0)  # relative to the working directory
    assert (len(d.train), len(d.valid)) == (29000, 1014)
    assert "\t" in d.train[7365]["de"]  # the one German line with a tab (line 7366) is kept
    assert all(p["de"] == p["de"].strip() for p in d.train)
    plain = load({"source": "files", "path": str(MULTI30K), "format": "plain", "max_train": 100}, seed=0)
    assert plain.train == d.train[:100]
    assert d.info["files_sha256"]["train.jsonl"]


@pytest.mark.skipif(can_reach("huggingface.co"), reason="online: the offline failure path does not apply")
def test_wmt16_offline_fails_at_once_naming_local_alternatives():
    t = time.time()
    with pytest.raises(DataError, match="data=multi30k"):
        load({"source": "wmt16", "max_train": 10})
    assert time.time() - t < 30


def _pairs(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, "\n".join(json.dumps({"translation": {"de": f"d{i}", "en": f"e{i}"}}) for i in range(n)))


@pytest.mark.one_backend
def test_relative_paths_resolve_against_the_working_directory_only(tmp_path, monkeypatch):
    _pairs(tmp_path / "here" / "sub" / "d.jsonl", 20)
    monkeypatch.chdir(tmp_path / "here")
    assert load({"source": "jsonl", "path": "sub/d.jsonl"}).info["path"] == str(tmp_path / "here" / "sub" / "d.jsonl")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=rf"data.path=sub/d.jsonl not found \(looked in {tmp_path / 'elsewhere' / 'sub'}"):
        load({"source": "jsonl", "path": "sub/d.jsonl"})
    with pytest.raises(DataError, match=r"data.path=\.\./nope not found .*data.path=/path/to/data"):
        load({"source": "files", "path": "../nope"})  # no fallback for a dataset without official files


@pytest.mark.one_backend
def test_multi30k_without_a_copy_offline_names_the_path_the_dataset_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "can_reach", lambda host, *a, **k: False)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    t = time.time()
    with pytest.raises(DataError) as e:
        load({"source": "files", "name": "multi30k", "path": "../shared/data/multi30k"})
    msg = str(e.value)
    assert f"data.path=../shared/data/multi30k not found (looked in {tmp_path / 'shared' / 'data' / 'multi30k'}" in msg
    assert "Multi30K" in msg and OFFICIAL["multi30k"]["url"] in msg and f"{GITHUB} is not reachable" in msg
    assert "data.path=<dir>" in msg
    assert time.time() - t < 5 and not (tmp_path / "cache").exists()


@pytest.mark.one_backend
@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k not present")
def test_multi30k_without_a_copy_downloads_the_official_files_once(tmp_path, monkeypatch):
    """The download path with the network replaced by the official files' bytes (the local copy, gzipped):
    the same pairs and fingerprint as the copy; a second load reads the cache; a changed file is refused."""
    monkeypatch.setenv("LORA3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "can_reach", lambda host, *a, **k: host == GITHUB)
    spec = OFFICIAL["multi30k"]
    served = {spec["url"] + remote: gzip.compress((MULTI30K / local).read_bytes(), compresslevel=1)
              for local, (remote, _) in spec["files"].items()}
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.chdir(tmp_path)
    cfg = {"source": "files", "name": "multi30k", "path": "../shared/data/multi30k", "max_train": 500}
    d = load(cfg)
    local = load({**cfg, "path": str(MULTI30K), "format": "plain"})
    assert sorted(calls) == sorted(served) and d.train == local.train and d.valid == local.valid
    assert d.fingerprint() == local.fingerprint() and d.info["url"] == spec["url"]
    assert load(cfg).train == d.train and len(calls) == 4  # cached: no second download

    monkeypatch.setenv("LORA3_CACHE", str(tmp_path / "cache2"))
    served[spec["url"] + "val.en.gz"] = gzip.compress(b"changed\n")
    with pytest.raises(DataError, match=r"val\.en\.gz does not hold the pinned file .*data.path=<dir>"):
        load(cfg)
    assert not any((tmp_path / "cache2" / "data").iterdir())  # nothing half-downloaded left behind


def _cli_from(cwd, *args, env=None):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {}))
    env.pop("WANDB_MODE", None)
    return subprocess.run([sys.executable, "-m", "lora3.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.one_backend
@pytest.mark.skipif(can_reach(GITHUB), reason="online: data=multi30k downloads the official files")
def test_cli_multi30k_from_another_directory_fails_clearly_offline(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    r = _cli_from(cwd, "data=multi30k", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}",
                  env={"LORA3_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"data.path=../shared/data/multi30k not found (looked in {tmp_path / 'shared' / 'data' / 'multi30k'}" in r.stderr
    assert "Multi30K" in r.stderr and "data.path=<dir>" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and list(cwd.iterdir()) == []


@pytest.mark.slow
@pytest.mark.one_backend  # where paths resolve cannot differ by backend
@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k not present")
def test_cli_multi30k_from_another_directory_with_an_absolute_path(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    r = _cli_from(cwd, "data=multi30k", f"data.path={MULTI30K}", "data.max_train=128", "data.max_valid=16",
                  "experiment=smoke", "model.base=null", f"backend={BACKEND}", "trainer.max_steps=2",
                  f"cache_dir={tmp_path / 'cache'}", "hydra.run.dir=run")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((cwd / "run" / "metrics.json").read_text())  # a relative hydra.run.dir: in the working directory
    assert m["status"] == "finished" and m["data"]["path"] == str(MULTI30K) and m["data"]["n_train"] == 128
