"""lora3/run/evaluate.py: scores against sacrebleu itself, and the one path for validation and test splits."""

import json

import pytest
import sacrebleu

from lora3.run import evaluate as ev

pytestmark = pytest.mark.one_backend  # no model: a fake bundle (generation and loss are tested in test_models)

REFS = ["a dog runs in the park .", "two men play football .", "the woman reads a book ."]
HYPS = ["a dog runs in a park .", "two men play soccer .", "the woman reads a book ."]


class FakeBundle:
    fit_model = None

    def __init__(self, hyps):
        self.hyps, self.calls = hyps, 0

    def generate(self, inputs, **kwargs):
        self.calls += 1
        return list(self.hyps[: len(inputs)])


def _plain(**eval_overrides):
    return {"data": {"max_source_length": 8, "max_target_length": 8},
            "eval": {"max_length": None, "before": True, **eval_overrides}, "finetune": "lora", "resume": False}


def test_scores_are_sacrebleus_corpus_scores():
    got = ev.score_translations(HYPS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert ev.score_translations(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_validation_and_test_go_through_one_path():
    val = ev.Split("val", None, 4, REFS, REFS, REFS)
    test = ev.Split("test", None, 4, REFS[:2], REFS[:2], REFS[:2])
    bundle = FakeBundle(HYPS)
    out = ev.evaluate_all(bundle, [val, test], _plain())
    assert out["val/bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert out["test/bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS[:2], [REFS[:2]]).score)
    assert [s["hypothesis"] for s in out["samples"]] == HYPS and len(out["test_samples"]) == 2
    assert "val/sentences_per_s" in out and "test/sentences_per_s" in out and bundle.calls == 2


def test_final_scores_reuse_the_training_loops_last_validation():
    val = ev.Split("val", None, 4, REFS, REFS, REFS)
    bundle = FakeBundle(HYPS)
    last = {"val/bleu": 12.5, "samples": [{"source": "s", "reference": "r", "hypothesis": "h"}]}
    final = ev.after_training(bundle, [val], _plain(), {"last_scores": last}, before={})
    assert final["val/bleu"] == 12.5 and bundle.calls == 0  # not generated again
    final = ev.after_training(bundle, [val], _plain(), {"last_scores": None}, before={})
    assert bundle.calls == 1 and "val/bleu" in final  # no period ran (resumed at the end): scored now


class Tracker:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step=None):
        self.logged.append((step, metrics))


def test_before_training_is_recorded_and_read_back_on_resume(tmp_path):
    val = ev.Split("val", None, 4, REFS, REFS, REFS)
    tracker = Tracker()
    before = ev.before_training(FakeBundle(HYPS), [val], _plain(), tmp_path, tracker)
    saved = json.loads((tmp_path / ".before.json").read_text())
    assert saved["val/bleu"] == pytest.approx(before["val/bleu"]) and "samples" not in saved
    assert tracker.logged[0][0] == 0 and "val/bleu" in tracker.logged[0][1]
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)  # a resumable run
    for name in ("meta.json", "state.npz"):
        (tmp_path / "checkpoints" / "step-00000002" / name).write_text("{}")
    again = ev.before_training(FakeBundle(["x"] * 3), [val], {**_plain(), "resume": True}, tmp_path, Tracker())
    assert again["val/bleu"] == pytest.approx(before["val/bleu"])  # read back, not recomputed


def test_no_scores_before_training_when_not_asked(tmp_path):
    val = ev.Split("val", None, 4, REFS, REFS, REFS)
    assert ev.before_training(FakeBundle(HYPS), [val], _plain(before=False), tmp_path, Tracker()) == {}
    assert not (tmp_path / ".before.json").exists()
