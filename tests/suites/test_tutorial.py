"""experiment=tutorial: the tutorial's recipe as a config, its offline failure, and the recipe
end to end on local things (a tiny T5 preset written with save_to_preset, the Multi30K files)."""

import json
import math
import time
from pathlib import Path

import pytest

from lora3.run.data import can_reach, load, parse_split, slice_rows
from lora3.run.job import OfflineError, derive_length, run_job
from lora3.run.schema import validate

REPO_ROOT = Path(__file__).resolve().parents[2]
MULTI30K = REPO_ROOT.parent / "shared" / "data" / "multi30k"


# ---------------------------------------------------------------- the recipe (no keras)

@pytest.mark.one_backend
def test_tutorial_config_is_the_recipe(compose):
    c = validate(compose(["experiment=tutorial"]))
    assert c["model"]["preset"] == "flan_base_multi" and c["model"]["family"] == "t5"
    d = c["data"]
    assert (d["source"], d["direction"], d["train_split"], d["valid_split"], d["test_split"]) == \
        ("wmt16", "de-en", "train[:1%]", "validation", "test")
    assert d["prefix"] == "translate German to English: "
    assert (d["max_source_length"], d["max_target_length"], d["overlong"]) == (128, 128, "truncate")
    t = c["trainer"]
    assert (t["batch_size"], t["lr"], t["weight_decay"], t["epochs"], t["max_steps"]) == (16, 3e-5, 0.0, 3, None)
    assert (t["warmup_steps"], t["schedule"], t["grad_clip"], t["precision"]) == (0, "constant", None, "float32")
    lora = c["lora"]
    assert (c["finetune"], lora["rank"], lora["alpha"], lora["targets"], lora["dropout"]) == ("lora", 4, 4, "all_linear", 0.0)
    e = c["eval"]
    assert e["before"] is True and e["every"] is None and e["num_samples"] >= 2999 and e["loss_samples"] is None

    # data=multi30k replaces the whole data option (no 1% slice, no test split); the recipe stays
    local = validate(compose(["experiment=tutorial", "data=multi30k", "model.preset=/some/dir"]))
    assert local["data"]["source"] == "files" and local["data"]["train_split"] == "train"
    assert "test_split" not in local["data"] and local["data"]["max_source_length"] == 128
    assert local["trainer"]["lr"] == 3e-5 and local["lora"]["targets"] == "all_linear"


@pytest.mark.one_backend
def test_epochs_derive_the_steps_and_split_slices():
    plain = {"trainer": {"epochs": 3, "max_steps": None, "batch_size": 16}, "eval": {"every": None}}
    derive_length(plain, 45_489)            # WMT16 train[:1%] = round(4,548,885 / 100)
    assert plain["trainer"]["max_steps"] == math.ceil(3 * 45_489 / 16) == 8_530
    assert plain["eval"]["every"] == plain["trainer"]["steps_per_epoch"] == 2_844
    capped = {"trainer": {"epochs": 3, "max_steps": 5, "batch_size": 16}, "eval": {"every": 100}}
    derive_length(capped, 45_489)
    assert capped["trainer"]["max_steps"] == 5 and capped["eval"]["every"] == 100
    plain_steps = {"trainer": {"epochs": None, "max_steps": 7, "batch_size": 16}, "eval": {"every": None}}
    derive_length(plain_steps, 100)
    assert plain_steps["trainer"]["max_steps"] == 7 and plain_steps["eval"]["every"] == 7

    assert parse_split("train[:1%]") == ("train", None, "1%") and parse_split("valid") == ("valid", None, None)
    assert len(slice_rows(list(range(4_548_885)), None, "1%")) == 45_489
    assert slice_rows(list(range(10)), "20%", "-3") == [2, 3, 4, 5, 6]
    data = load({"source": "files", "path": str(MULTI30K), "train_split": "train[:1%]",
                 "valid_split": "valid[:10]", "test_split": "valid[-5:]"})
    assert (len(data.train), len(data.valid), len(data.test)) == (290, 10, 5)
    assert data.info["n_test"] == 5 and data.inputs("test")[0].startswith("translate German to English: ")


def test_both_null_lengths_are_refused(compose):
    from lora3.run.schema import AppConfigError

    with pytest.raises(AppConfigError, match="trainer.max_steps and trainer.epochs are both null"):
        validate(compose(["experiment=tutorial", "trainer.epochs=null"]))


# ---------------------------------------------------------------- offline: fail at once, say what to do

NEEDLES = ("flan_base_multi", "WMT16 de-en", "model.preset=<dir>", "data=multi30k", "data=jsonl data.path=")


@pytest.mark.one_backend
def test_offline_fails_at_once_naming_preset_dataset_and_overrides(compose, tmp_path, monkeypatch):
    import lora3.run.data

    # Simulate "no network, nothing cached" on any machine: no host is reachable, empty caches.
    monkeypatch.setattr(lora3.run.data, "can_reach", lambda *a, **k: False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    try:
        import datasets

        def not_cached(*a, **k):
            raise ConnectionError("offline")
        monkeypatch.setattr(datasets, "load_dataset_builder", not_cached)
    except ImportError:
        pass
    out = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(OfflineError) as e:
        run_job(compose(["experiment=tutorial"]), out, job={"overrides": ["experiment=tutorial"]})
    assert time.perf_counter() - t0 < 15
    msg = str(e.value)
    for needle in NEEDLES:
        assert needle in msg, (needle, msg)
    assert "python -m lora3.run experiment=tutorial model.preset=" in msg
    assert not out.exists()  # nothing written: it failed before any work

    # only what is missing is named: a local preset dir leaves only the dataset
    preset = tmp_path / "preset"
    preset.mkdir()
    with pytest.raises(OfflineError) as e:
        run_job(compose(["experiment=tutorial", f"model.preset={preset}"]), out)
    assert "flan_base_multi" not in str(e.value) and "WMT16" in str(e.value) and "data=multi30k" in str(e.value)


@pytest.mark.one_backend
@pytest.mark.skipif(can_reach("www.kaggle.com", timeout=1.0) or can_reach("huggingface.co", timeout=1.0),
                    reason="this machine is online: the real recipe would start downloading")
def test_cli_offline_message_without_traceback(run_cli, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = run_cli("experiment=tutorial", f"hydra.run.dir={out}", timeout=120)
    both = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in both
    for needle in NEEDLES:
        assert needle in both, (needle, both[-2000:])
    assert time.perf_counter() - t0 < 60
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------- end to end on local things, each backend

@pytest.mark.slow
def test_tutorial_recipe_end_to_end_on_a_local_preset_and_multi30k(compose, tmp_path, backend_name, lora3_cache):
    """The recipe with model.preset=<tiny T5 preset dir> data=multi30k, capped to 2 steps and small evals.

    The test split is a stand-in (the last validation pairs): Multi30K's own test sets are held out."""
    import tiny

    preset = tmp_path / "tiny_t5_preset"
    tiny.t5_lm(seq_len=16, layers=1).save_to_preset(str(preset))
    out = tmp_path / "run"
    m = run_job(compose([
        "experiment=tutorial", f"model.preset={preset}", "data=multi30k", f"backend={backend_name}",
        f"cache_dir={lora3_cache}", "wandb.mode=disabled",
        'data.train_split="train[:48]"', 'data.valid_split="valid[:6]"', '++data.test_split="valid[-6:]"',
        "trainer.max_steps=2", "eval.num_samples=4", "eval.batch_size=4", "eval.max_length=16",
    ]), out)
    assert m["status"] == "finished" and m["backend"] == backend_name
    # the tiny T5 (1+1 layers, d=16, ff=32, gated) has 18 Dense layers (encoder 4 attention + 3 FFN,
    # decoder 8 attention + 3 FFN); r=4 adds 4*(in+out) each: 1,088 + 1,600 = 2,688
    assert m["params"]["adapted_layers"] == 18 and m["params"]["lora"] == 2_688
    assert m["params"]["trainable"] == 2_688
    assert m["steps"] == 2 and [h["step"] for h in m["history"]] == [2]
    assert (m["data"]["n_train"], m["data"]["n_valid"], m["data"]["n_test"]) == (48, 6, 6)
    for where in ("before", "final"):
        assert {"val/loss", "val/bleu", "val/chrf", "test/loss", "test/bleu", "test/chrf"} <= set(m[where]), where
    cfg = (out / "config.yaml").read_text()
    for line in ("max_steps: 2", "epochs: 3", "steps_per_epoch: 3", "batch_size: 16", "lr: 3.0e-05",
                 "weight_decay: 0.0", "prefix: 'translate German to English: '", "max_source_length: 128"):
        assert line in cfg, line
    assert "cross_attention/query_projector" in (out / "lora_report.txt").read_text()
    rows = [json.loads(x) for x in (out / "test_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"source", "reference", "hypothesis", "hypothesis_before"} <= set(rows[0])
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["rank"] == 4
