"""scripts/report.py on a tiny sweep dir: fabricated metrics.json/error.json runs plus one real tiny run."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _report_module():
    spec = importlib.util.spec_from_file_location("lora3_report_script", REPO / "scripts" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(d: Path, *, mode="lora", rank=None, alpha=None, targets="all_linear", seed=0, bleu=10.0,
              pct=1.0, rslora=False, lora_extra=None, trainer=None):
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    lora = {"mode": mode, "rank": rank or 8, "alpha": alpha or 16, "targets": targets, "rslora": rslora,
            **(lora_extra or {})}
    (d / "config.yaml").write_text(json.dumps({"backend": "jax", "seed": seed, "lora": lora, "trainer": trainer or {},
                                               "model": {"name": "t5_tiny"}}))  # JSON is YAML
    hist = [{"step": s, "val/loss": 2.0 / s, "val/bleu": bleu * s / 200} for s in (100, 200)]
    (d / "metrics.json").write_text(json.dumps({
        "status": "finished", "backend": "jax", "seed": seed, "lora_mode": mode, "model": {"name": "t5_tiny"},
        "params": {"trainable": int(pct * 1000), "total": 100000, "trainable_percent": pct},
        "before": {"val/bleu": 1.0}, "final": {"val/bleu": bleu, "val/loss": 0.01, "val/chrf": bleu + 20},
        "best": {"val/bleu": bleu, "val/chrf": bleu + 20}, "history": hist,
        "perf": {"tokens_per_s": 1234.0, "wall_seconds": 60.0},
    }))


@pytest.mark.one_backend
def test_report_on_fabricated_sweep(tmp_path):
    report = _report_module()
    sweep = tmp_path / "sweep"
    n = 0
    for rank in (1, 2, 4, 8):
        for alpha in (rank, 2 * rank, 16):
            _fake_run(sweep / str(n), rank=rank, alpha=alpha, bleu=20 + rank + alpha / 10)
            n += 1
    _fake_run(sweep / str(n), rank=8, alpha=16, targets="qv", bleu=15)
    _fake_run(sweep / "full0", mode="full", bleu=40, pct=100.0)
    _fake_run(sweep / "full1", mode="full", bleu=42, pct=100.0, seed=1)
    _fake_run(sweep / "none0", mode="none", bleu=3, pct=0.0)
    failed = sweep / "failed"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "config.yaml").write_text(json.dumps({"backend": "tensorflow", "lora": {"mode": "lora", "rank": 64,
                                                                                       "alpha": 128, "targets": "qv"}}))
    (failed / "error.json").write_text(json.dumps({"status": "failed", "error": "non-finite training loss at step 7"}))
    killed = sweep / "killed"
    (killed / ".hydra").mkdir(parents=True)  # neither metrics.json nor error.json

    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert len(rows) == n + 1 + 3 + 2
    assert "non-finite training loss at step 7" in md and "killed" in md  # failures are listed, not dropped
    by_run = {r["run"]: r for r in rows}
    assert by_run["sweep/failed"]["status"] == "failed" and by_run["sweep/failed"]["rank"] == "64"
    assert by_run["sweep/killed"]["status"] == "incomplete"
    assert by_run["sweep/full1"]["mode"] == "full" and float(by_run["sweep/full1"]["best_bleu"]) == 42
    # the aggregate table: full has 2 seeds, mean 41
    assert "| full | t5_tiny | 100.000 | 2 | 41.00 |" in md
    for col in ("trainable %", "best BLEU", "best chrF", "final val loss", "tokens/s", "targets", "alpha"):
        assert col in md
    # BLEU vs rank: one line per alpha rule (r, 2r, fixed 16)
    lines = report.series(report.aggregate([r for r in report.collect_dirs([sweep])]))
    assert {"all_linear α=r", "all_linear α=2r", "all_linear α=16"} <= set(lines)
    assert "all_linear α=2" not in lines and "qv α=2r" not in lines  # coincidences and single points are no lines
    assert [p[0] for p in lines["all_linear α=2r"]] == [1, 2, 4, 8]
    for png in ("bleu_vs_rank.png", "val_loss.png"):
        assert (out / png).stat().st_size > 5000
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.one_backend  # reads files; a TensorFlow run's files are the same format
@pytest.mark.one_backend
def test_variants_get_their_own_column_and_rows(tmp_path):
    report = _report_module()
    sweep = tmp_path / "variants"
    arms = {"plain": ({}, {}), "dora": ({"dora": True}, {}), "pissa": ({"init": "pissa"}, {}),
            "niter": ({"init": "pissa_niter_4"}, {}), "plus": ({}, {"lora_plus_ratio": 16}),
            "mixed": ({"dora": True, "init": "olora", "base_quantization": "int8"}, {})}
    for i, (name, (lora, trainer)) in enumerate(arms.items()):
        for seed in (0, 1):
            _fake_run(sweep / f"{name}{seed}", seed=seed, bleu=10.0 + i + seed, lora_extra=lora, trainer=trainer)
    _fake_run(sweep / "rs", rslora=True)
    rows = report.collect_dirs([sweep])
    by_run = {r["run"].split("/")[-1]: r["variant"] for r in rows}
    assert by_run == {**{f"{n}{s}": v for n, v in (("plain", "plain"), ("dora", "DoRA"), ("pissa", "PiSSA"),
                                                      ("niter", "PiSSA(niter 4)"), ("plus", "LoRA+x16"),
                                                      ("mixed", "DoRA+OLoRA+int8 base")) for s in (0, 1)},
                      "rs": "rsLoRA"}
    aggs = report.aggregate(rows)
    labels = {a["label"]: (a["n"], a["bleu_mean"]) for a in aggs}
    assert labels["all_linear r=8 α=16"] == (2, 10.5)
    assert labels["all_linear r=8 α=16 DoRA"] == (2, 11.5) and labels["all_linear r=8 α=16 LoRA+x16"] == (2, 14.5)
    assert len(aggs) == 7
    report.write_csv(rows, tmp_path / "runs.csv")
    assert "variant" in (tmp_path / "runs.csv").read_text().splitlines()[0].split(",")


def test_report_reads_a_real_run_and_its_offline_wandb_files(compose, tmp_path, backend_name, lora3_cache, capsys):
    from lora3.run.job import run_job

    report = _report_module()
    sweep = tmp_path / "sweep"
    m = run_job(compose(["experiment=smoke", f"backend={backend_name}", f"cache_dir={lora3_cache}",
                         "wandb.mode=offline", "rank=2", "alpha=4", "targets=all_linear"]), sweep / "0")
    printed = capsys.readouterr().out
    # base-then-adapt: the run adapts the cached trained base and says how the frozen base scored
    assert m["model"]["base"]["source_task"]["variant"] == "base" and m["data"]["variant"] == "shift"
    assert "frozen base BLEU" in printed and "LoRA BLEU" in printed and "of the params trainable" in printed
    rows = report.collect_dirs([sweep])
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "finished" and r["rank"] == 2 and r["alpha"] == 4 and r["targets"] == "all_linear"
    assert r["backend"] == backend_name and r["best_bleu"] == pytest.approx(m["best"]["val/bleu"])
    assert r["trainable_pct"] == pytest.approx(m["params"]["trainable_percent"]) and r["tokens_per_s"] > 0
    assert [s for s, _ in r["curve"]] == [0] + [h["step"] for h in m["history"]]
    # the same run read back from its offline W&B files only
    w = report.collect_dirs([sweep], wandb_files=True)[0]
    assert w["status"] == "finished" and w["rank"] == 2 and w["targets"] == "all_linear"
    assert w["best_bleu"] == pytest.approx(m["best"]["val/bleu"])
    assert w["trainable_pct"] == pytest.approx(m["params"]["trainable_percent"])
    assert report.main([str(sweep), "--no-plots"]) == 0 and (sweep / "report.md").is_file()
