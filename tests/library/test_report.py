"""`lora3.report`: LoraReport's numbers and text, AdaptedLayer, count_params."""

import keras
import numpy as np
import pytest

import lora3
from lora3.layers import LoRADense, LoRAEinsumDense
from lora3.report import AdaptedLayer, LoraReport, count_params

pytestmark = pytest.mark.one_backend  # counting and formatting: cannot differ by backend

ROWS = (
    AdaptedLayer("encoder/block_0/attention/query", "q", "EinsumDense", 768, 768, rank=8),
    AdaptedLayer("encoder/block_0/attention/value", "v", "EinsumDense", 768, 768, rank=8),
    AdaptedLayer("encoder/block_0/ffn/down", None, "Dense", 2048, 768, rank=8),
)


def report(rows=ROWS, trainable=None, total=1_000_000, config=lora3.LoraConfig(rank=8, alpha=16)):
    lora = sum(r.rank * (r.in_features + r.out_features) for r in rows)
    return LoraReport(rows, trainable_params=lora if trainable is None else trainable, total_params=total,
                      config=config)


def test_numbers():
    r = report()
    assert [row.lora_params for row in r.rows] == [12_288, 12_288, 22_528]
    assert r.lora_params == 47_104
    assert r.base_params == 1_000_000 - 47_104
    assert r.percent == pytest.approx(4.7104)
    assert (r.rank, r.alpha, r.scaling) == (8, 16.0, 2.0)
    rs = report(config=lora3.LoraConfig(rank=8, alpha=16, rslora=True))
    assert rs.scaling == pytest.approx(16 / np.sqrt(8))
    unknown = report(config=None)
    assert (unknown.rank, unknown.alpha, unknown.scaling) == (0, 0.0, 0.0)
    assert LoraReport((), trainable_params=0, total_params=0).percent == 0.0


def test_table_text():
    text = str(report())
    assert text == "\n".join([
        "layer path                       role  kind           in  out  LoRA params",
        "-------------------------------  ----  -----------  ----  ---  -----------",
        "encoder/block_0/attention/query  q     EinsumDense   768  768       12,288",
        "encoder/block_0/attention/value  v     EinsumDense   768  768       12,288",
        "encoder/block_0/ffn/down         -     Dense        2048  768       22,528",
        "3 layers adapted (rank=8, alpha=16, scaling=2); trainable params: 47,104 || all params: 1,000,000 "
        "|| trainable%: 4.7104",
    ])
    assert report().table() == text


def test_table_max_rows_and_empty():
    lines = report().table(max_rows=1).splitlines()
    assert len(lines) == 5 and lines[2].startswith("encoder/block_0/attention/query")
    assert lines[3] == "... 2 more layers" and lines[4].startswith("3 layers adapted")
    assert report().table(max_rows=3) == str(report())
    empty = str(LoraReport((), trainable_params=0, total_params=10))
    assert empty.splitlines()[0] == "layer path  role  kind  in  out  LoRA params"
    assert empty.splitlines()[-1] == ("0 layers adapted (rank=0, alpha=0, scaling=0); trainable params: 0 || "
                                      "all params: 10 || trainable%: 0.0000")


def test_trainable_beyond_lora_is_reported():
    r = report(trainable=47_104 + 1_536)  # train_also: two layer norms of 768
    assert r.trainable_params - r.lora_params == 1_536
    assert "trainable params: 48,640" in str(r)


def test_to_dict():
    d = report().to_dict()
    assert d == {
        "layers": [
            {"path": "encoder/block_0/attention/query", "role": "q", "kind": "EinsumDense", "in_features": 768,
             "out_features": 768, "rank": 8, "scaling": None, "lora_params": 12_288},
            {"path": "encoder/block_0/attention/value", "role": "v", "kind": "EinsumDense", "in_features": 768,
             "out_features": 768, "rank": 8, "scaling": None, "lora_params": 12_288},
            {"path": "encoder/block_0/ffn/down", "role": None, "kind": "Dense", "in_features": 2048,
             "out_features": 768, "rank": 8, "scaling": None, "lora_params": 22_528},
        ],
        "adapted_layers": 3,
        "lora_params": 47_104,
        "trainable_params": 47_104,
        "total_params": 1_000_000,
        "base_params": 952_896,
        "trainable_percent": pytest.approx(4.7104),
        "rank": 8,
        "alpha": 16.0,
        "scaling": 2.0,
    }


def test_adapted_layer_from_wrappers():
    dense = keras.layers.Dense(6, name="proj")
    dense.build((None, 5))
    row = AdaptedLayer.from_wrapper(LoRADense(dense, rank=2, alpha=4), role="down")
    assert row == AdaptedLayer("proj", "down", "Dense", 5, 6, rank=2, scaling=2.0) and row.lora_params == 2 * (5 + 6)
    q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), name="query")
    q.build((None, None, 8))
    row = AdaptedLayer.from_wrapper(LoRAEinsumDense(q, rank=2, alpha=4))
    assert (row.kind, row.in_features, row.out_features, row.role) == ("EinsumDense", 8, 12, None)


def test_count_params_counts_float_variables_once():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    counter = keras.Variable(0, dtype="int32", trainable=False)
    assert count_params(dense.weights) == 4 * 3 + 3
    assert count_params(dense.weights + dense.weights + [counter]) == 15
    assert count_params([]) == 0
