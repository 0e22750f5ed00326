"""`scripts/param_table.py`: the parameter table for any keras-hub config, from the command line."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.one_backend  # parameter counting does not depend on the backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
