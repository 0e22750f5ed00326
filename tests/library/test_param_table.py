"""The tutorial's parameter table, done right, on the real FLAN-T5-base architecture."""

import pytest

from lora3.param_table import build_backbone, param_table

pytestmark = pytest.mark.one_backend  # parameter counting does not depend on the backend


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
