"""W&B tracking: offline runs read back from their files, one run per job, failed runs marked."""


import pytest

from lora3.run import tracking


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_disabled_is_a_no_op(tmp_path):
    t = tracking.start(mode="disabled", project="p", config={}, directory=tmp_path)
    t.log({"a": 1}, step=1)
    t.finish(1)
    assert t.dir is None and t.sync_command() is None and not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="wandb.mode"):
        tracking.start(mode="cloud", project="p", config={}, directory=tmp_path)


def test_offline_runs_are_separate_and_failed_runs_marked(tmp_path):
    a = tracking.start(mode="offline", project="p", config={"lora.rank": 4, "backend": "jax"},
                       directory=tmp_path / "a", group="g1", tags=["t"])
    for s, bleu in enumerate([1.0, 5.0, 3.0], start=1):
        a.log({"val/bleu": bleu, "val/loss": 3.0 - s}, step=s)
    a.finish(1)  # the job failed
    b = tracking.start(mode="offline", project="p", config={"lora.rank": 8}, directory=tmp_path / "b")
    b.finish(0)
    assert a.id != b.id
    assert b.sync_command() == f"wandb sync {b.dir}"
    ra = tracking.read_offline_run(tracking.find_offline_runs(tmp_path / "a")[0])
    rb = tracking.read_offline_run(tracking.find_offline_runs(tmp_path / "b")[0])
    assert ra["state"] != "finished" and rb["state"] == "finished"
    assert ra["summary"]["val/bleu"] == {"max": 5.0} and ra["summary"]["val/loss"] == {"min": 0.0}
    assert ra["group"] == "g1" and ra["config"]["lora.rank"] == 4 and ra["tags"] == ["t"]
