"""`scripts/report.py dashboard`: the W&B workspace of a LoRA sweep as code.

The spec (plain data), its wandb-workspaces wire form (what --publish saves), the JSON written by
--out, the offline --publish failure, and that every key the panels use is one a real offline run
of the app logs (one `python -m lora3.run experiment=smoke` run for the module)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "report.py"

pytestmark = pytest.mark.one_backend  # files and JSON: nothing here depends on the Keras backend


def _report_module():
    spec = importlib.util.spec_from_file_location("lora3_report_script_dash", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _report_module()


def _panels(spec):
    return {p["id"]: p for s in spec["sections"] for p in s["panels"]}


def _ref(section, key):
    return {"section": section, "key": key}


def test_spec_panels_axes_and_grouping():
    spec = report.dashboard_spec("lora3", "me", "rank_alpha")
    assert spec["schema"] == "lora3.dashboard/1" and spec["kind"] == "workspace"
    assert (spec["entity"], spec["project"], spec["sweep_group"]) == ("me", "lora3", "rank_alpha")
    p = _panels(spec)
    assert set(p) == {"bleu_vs_rank", "bleu_vs_rank_runs", "bleu_vs_trainable", "val_loss", "hparams"}
    # (1) best val BLEU against rank, one line per alpha: a line over runs
    b = p["bleu_vs_rank"]
    assert b["type"] == "vega_line" and b["chart"] == "wandb/line/v0"
    assert b["x"] == _ref("config", "lora.rank") and b["y"] == _ref("summary", "best/val/bleu")
    assert b["series"] == _ref("config", "lora.alpha")
    assert p["bleu_vs_rank_runs"]["x"] == b["x"] and p["bleu_vs_rank_runs"]["y"] == b["y"]
    # (2) best val BLEU against the trainable share
    t = p["bleu_vs_trainable"]
    assert t["type"] == "scatter" and t["x"] == _ref("summary", "params/trainable_percent")
    assert t["y"] == _ref("summary", "best/val/bleu")
    # (3) validation loss curves over steps, grouped by W&B group (the sweep)
    v = p["val_loss"]
    assert v["type"] == "line" and v["x"] == _ref("history", "_step") and v["y"] == [_ref("history", "val/loss")]
    assert v["groupby"] == _ref("run", "group") and v["aggregate"] == "mean"
    # (4) parallel coordinates: rank, alpha, targets, lr -> best BLEU, in that order
    h = p["hparams"]
    assert h["type"] == "parallel_coordinates"
    assert h["columns"] == [_ref("config", "lora.rank"), _ref("config", "lora.alpha"),
                            _ref("config", "lora.targets"), _ref("config", "trainer.lr"),
                            _ref("summary", "best/val/bleu")]
    json.dumps(spec)  # plain data


def test_spec_filters_by_sweep_group_only_when_given():
    assert report.dashboard_spec("lora3")["filters"] == []
    assert report.dashboard_spec("lora3", sweep_group="g7")["filters"] == [
        {"section": "run", "key": "group", "op": "=", "value": "g7"}]
    assert "g7" in report.dashboard_spec("lora3", sweep_group="g7")["name"]
    with pytest.raises(ValueError):
        report.dashboard_spec("")


def test_dashboard_keys_lists_every_reference():
    keys = report.dashboard_keys(report.dashboard_spec("lora3", sweep_group="g"))
    assert keys == {("config", "lora.rank"), ("config", "lora.alpha"), ("config", "lora.targets"),
                    ("config", "trainer.lr"), ("summary", "best/val/bleu"),
                    ("summary", "params/trainable_percent"), ("history", "val/loss"), ("history", "_step"),
                    ("run", "group")}


def test_wire_view_is_what_wandb_workspaces_saves():
    pytest.importorskip("wandb_workspaces")
    from wandb_workspaces.workspaces import internal

    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    view = report.wire_view(report.dashboard_spec("lora3", "me", "rank_alpha"))
    assert (view["entity"], view["project"], view["displayName"]) == ("me", "lora3", "lora3 LoRA sweep rank_alpha")
    section = view["spec"]["section"]
    panels = section["panelBankConfig"]["sections"][0]["panels"]
    by_type = {}
    for p in panels:
        by_type.setdefault(p["viewType"], []).append(p["config"])
    vega = by_type["Vega2"][0]
    assert vega["panelDefId"] == "wandb/line/v0"
    assert vega["fieldSettings"] == {"x": "lora.rank", "y": "best/val/bleu", "stroke": "lora.alpha"}
    fields = {f["name"]: f for f in vega["userQuery"]["queryFields"][0]["fields"]}
    assert fields["config"]["args"] == [{"name": "keys", "value": ["lora.rank", "lora.alpha"]}]
    assert fields["summary"]["args"] == [{"name": "keys", "value": ["best/val/bleu"]}]
    scatter = {c["chartTitle"]: c for c in by_type["Scatter Plot"]}
    # lora.rank is a flat config key (the app logs the flattened config): backend path lora.rank.value
    assert scatter["best val BLEU vs LoRA rank (every run)"]["xAxis"] == "config:lora.rank.value"
    trainable = scatter["best val BLEU vs trainable share (%)"]
    assert (trainable["xAxis"], trainable["yAxis"]) == ("summary:params/trainable_percent", "summary:best/val/bleu")
    line = by_type["Run History Line Plot"][0]
    assert line["metrics"] == ["val/loss"] and line["xAxis"] == "_step"
    assert line["groupBy"] == "group" and line["aggregate"] is True
    pc = by_type["Parallel Coordinates Plot"][0]
    assert [c["accessor"] for c in pc["columns"]] == [
        "config:lora.rank.value", "config:lora.alpha.value", "config:lora.targets.value",
        "config:trainer.lr.value", "summary:best/val/bleu"]
    filters = section["runSets"][0]["filters"]["filters"]
    assert [(f["key"], f["op"], f["value"]) for f in filters] == [({"section": "run", "name": "group"}, "=",
                                                                    "rank_alpha")]
    assert "config:lora.rank.value" in section["runSets"][0]["runFeed"]["columnPinned"]
    # read back as W&B would load it: the columns name the flat keys the app logs
    loaded = ws.Workspace._from_model(internal.View.model_validate(view))
    pcs = [p for p in loaded.sections[0].panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    assert [c.metric for c in pcs[0].columns][:4] == [wr.Config("lora.rank"), wr.Config("lora.alpha"),
                                                      wr.Config("lora.targets"), wr.Config("trainer.lr")]
    # no group given: no filter
    assert report.wire_view(report.dashboard_spec("lora3"))["spec"]["section"]["runSets"][0]["filters"][
        "filters"] == []


def test_cli_writes_the_spec_to_out_atomically(tmp_path, capsys):
    out = tmp_path / "dash" / "spec.json"
    assert report.main(["dashboard", "--project", "lora3", "--entity", "me", "--sweep-group", "g1",
                        "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    expected = report.dashboard_spec("lora3", "me", "g1")
    assert {k: doc[k] for k in expected} == expected
    assert "wandb_view" in doc
    if doc["wandb_view"] is not None:
        assert doc["wandb_view"]["project"] == "lora3"
    assert sorted(p.name for p in out.parent.iterdir()) == ["spec.json"]  # no temporary file left
    assert str(out) in capsys.readouterr().out
    # without --out: the same JSON on stdout
    assert report.main(["dashboard", "--project", "lora3", "--sweep-group", "g1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["filters"] == expected["filters"] and printed["entity"] is None


def test_a_directory_named_dashboard_is_still_a_report_source(tmp_path, monkeypatch, capsys):
    d = tmp_path / "dashboard" / "0"
    (d / ".hydra").mkdir(parents=True)  # a killed run: still a row
    monkeypatch.chdir(tmp_path)
    assert report.main(["dashboard", "--no-plots"]) == 0
    assert (tmp_path / "dashboard" / "report.md").is_file()


def _run_script(args, env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full.update(env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_publish_offline_fails_with_a_message(tmp_path):
    p = _run_script(["dashboard", "--project", "lora3", "--publish"], {"WANDB_MODE": "offline"})
    assert p.returncode == 1, p.stderr
    assert "offline" in p.stderr and "--publish" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_publish_not_logged_in_fails_with_a_message(tmp_path):
    pytest.importorskip("wandb_workspaces")
    home = tmp_path / "home"
    home.mkdir()
    p = _run_script(["dashboard", "--project", "lora3", "--entity", "me", "--publish"],
                    {"HOME": str(home), "NETRC": str(home / "no.netrc"), "WANDB_CONFIG_DIR": str(home / "wb"),
                     "WANDB_ERROR_REPORTING": "false"})
    assert p.returncode == 1, p.stderr
    assert "wandb login" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_every_key_is_one_a_real_offline_run_logs(run_cli, tmp_path, lora3_cache):
    from lora3.run import tracking

    out = tmp_path / "run"
    p = run_cli("experiment=smoke", "wandb.mode=offline", "wandb.group=dash_group", f"hydra.run.dir={out}",
                f"cache_dir={lora3_cache}", "rank=2", "alpha=4")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    (run_dir,) = tracking.find_offline_runs(out)
    rec = tracking.read_offline_run(run_dir)
    records = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, WANDB_ERROR_REPORTING="false")).stdout
    history = set()
    for line in records.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("type") == "history":
            history |= set(r["history"]["item"])
    assert "val/loss" in history  # the read-back works: something to compare against
    run_attrs = {"group": rec.get("group")}
    spec = report.dashboard_spec("lora3", sweep_group="dash_group")
    for section, key in sorted(report.dashboard_keys(spec)):
        where = {"config": rec["config"], "summary": rec["summary"], "history": history, "run": run_attrs}[section]
        assert key in where, f"the dashboard uses {section} key {key!r}, which the app does not log"
    # the values the panels and filters need are there, with the types they need
    assert rec["config"]["lora.rank"] == 2 and rec["config"]["lora.alpha"] == 4
    assert isinstance(rec["config"]["trainer.lr"], float)
    assert isinstance(rec["summary"]["best/val/bleu"], (int, float))
    assert 0 < rec["summary"]["params/trainable_percent"] < 100
    assert [f["value"] for f in spec["filters"]] == [rec["group"]] == ["dash_group"]
