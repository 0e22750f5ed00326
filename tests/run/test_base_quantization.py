"""`lora.base_quantization`: validated, and a tiny run on an int8-quantized base end to end."""

import pytest

from lora3.run.job import run_job
from lora3.run.schema import AppConfigError, validate


@pytest.mark.one_backend
def test_base_quantization_is_validated_with_an_actionable_message(compose):
    assert validate(compose([]))["lora"]["base_quantization"] == "none"
    assert validate(compose(["lora.base_quantization=int4"]))["lora"]["base_quantization"] == "int4"
    with pytest.raises(AppConfigError, match=r"lora.base_quantization must be one of none, int8, int4 .*"
                                             r"got lora.base_quantization='nf4'"):
        validate(compose(["lora.base_quantization=nf4"]))
    with pytest.raises(AppConfigError, match=r"full fine-tuning \(lora=full\) cannot train them"):
        validate(compose(["lora=full", "+lora.base_quantization=int8"]))


@pytest.mark.slow
def test_a_run_on_an_int8_base_trains_and_records_its_weight_memory(compose, tmp_path, backend_name, lora3_cache):
    m = run_job(compose(["experiment=smoke", f"backend={backend_name}", f"cache_dir={lora3_cache}",
                         "lora.base_quantization=int8", "trainer.max_steps=2", "eval.before=false"]), tmp_path / "r")
    params = m["params"]
    assert m["status"] == "finished" and params["base_quantization"] == "int8"
    assert 0 < params["weight_bytes"] < 0.6 * params["weight_bytes_float"]
    assert (tmp_path / "r" / "adapter" / "adapter.safetensors").is_file()
