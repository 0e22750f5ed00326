"""The tutorial's parameter table, done right, on the real FLAN-T5-base architecture."""

import os
import subprocess
import sys

import pytest

from lora3.param_table import build_backbone, param_table

pytestmark = pytest.mark.one_backend  # parameter counting does not depend on the backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def flan_rows():
    return param_table(lambda: build_backbone("flan_base_multi"), ranks=(4, 8, 16), target_groups=("qv", "all_linear"))


def test_flan_t5_base_counts(flan_rows):
    got = {(r["targets"], r["rank"]): r["lora_params"] for r in flan_rows}
    assert flan_rows[0]["base_params"] == 247_577_856
    assert got[("qv", 4)] == 442_368
    assert got[("qv", 8)] == 884_736
    assert got[("qv", 16)] == 1_769_472
    assert got[("all_linear", 8)] == 3_391_488
    assert {r["layers"] for r in flan_rows if r["targets"] == "qv"} == {72}


def test_script_prints_a_table_for_any_config():
    config = '{"vocabulary_size": 100, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "intermediate_dim": 32, "key_value_dim": 8}'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "param_table.py"), "--backbone", "T5Backbone",
         "--config", config, "--ranks", "2", "--targets", "qv", "--backend", os.environ.get("KERAS_BACKEND", "jax")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 1 encoder block (q, v) + 1 decoder block (self q, v; cross q, v) = 6 layers x 2 x (16 + 16)
    assert "| `qv` | 2 | 6 | 384 |" in proc.stdout
