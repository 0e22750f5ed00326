"""lora3/run/schema.py: the app's config typed once (the per-case CLI table is tests/suites/test_bad_inputs.py)."""

import pytest

import lora3
from lora3.run import schema
from lora3.run.schema import AppConfigError, lora_config, unknown_key_hint, valid_keys, validate

pytestmark = pytest.mark.one_backend  # config validation does not depend on the backend


def test_every_shipped_group_option_validates(compose):
    from importlib.resources import files

    conf = files(schema.CONF_MODULE)
    for group in ("model", "data", "lora", "trainer", "distribution", "experiment"):
        for f in sorted(p.name for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")):
            option = f.removesuffix(".yaml")
            extra = ["data.path=x.jsonl"] if (group, option) == ("data", "jsonl") else []
            validate(compose([f"{group}={option}", *extra]))


def test_the_lora_node_is_the_librarys_lora_config(compose):
    plain = validate(compose(["rank=4", "alpha=8", "targets=[q,v]", "lora.dropout=0.1"]))
    cfg = lora_config(plain)
    assert isinstance(cfg, lora3.LoraConfig)
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, cfg.scaling) == (4, 8.0, ("q", "v"), 0.1, 2.0)


def test_the_runs_own_lora_keys_init_from_and_export(compose):
    """`lora.init_from` and `lora.export` belong to the run, not to the library's LoraConfig."""
    plain = validate(compose(["lora.init_from=/some/adapter", "lora.export=peft"]))
    assert plain["lora"]["init_from"] == "/some/adapter" and plain["lora"]["export"] == "peft"
    assert not hasattr(lora_config(plain), "init_from") and type(lora_config(plain)) is lora3.LoraConfig
    assert validate(compose([]))["lora"]["export"] == "none"
    with pytest.raises(AppConfigError, match=r"lora.export must be one of none, peft, got lora.export='hf'"):
        validate(compose(["lora.export=hf"]))
    with pytest.raises(AppConfigError, match=r"lora.init_from must be an adapter directory or null"):
        validate({"lora": {"init_from": ""}})
    with pytest.raises(AppConfigError, match=r"lora.init_from='/a' needs an adapter to train .*eval.adapter=<dir>"):
        validate(compose(["lora=none", "+lora.init_from=/a"]))
    with pytest.raises(AppConfigError, match=r"lora.export='peft' needs an adapter to train \(finetune=lora\), not finetune=full"):
        validate(compose(["lora=full", "+lora.export=peft"]))
    with pytest.raises(AppConfigError, match=r"lora.init_fro is not a key.*did you mean lora.init_from\?"):
        validate({"lora": {"init_fro": "x"}})


def test_per_layer_lora_settings_are_keys_of_the_lora_node(compose):
    plain = validate(compose(["targets=attention", "lora.rank_pattern={.*query: 4}", "lora.exclude=[k]"]))
    cfg = lora_config(plain)
    assert cfg.rank_pattern == {".*query": 4} and cfg.exclude == ("k",) and cfg.alpha_pattern == {}
    with pytest.raises(AppConfigError, match=r"lora.rank_pattern\['.\*query'\]=0 is not valid: it must be a positive integer"):
        validate(compose(["lora.rank_pattern={.*query: 0}"]))
    with pytest.raises(AppConfigError, match=r"lora.exclude must be a string or a list of strings, got lora.exclude=5"):
        validate(compose(["lora.exclude=5"]))


def test_dora_is_a_key_of_the_lora_node(compose):
    assert validate(compose([]))["lora"]["dora"] is False
    assert lora_config(validate(compose(["lora.dora=true"]))).dora is True
    with pytest.raises(AppConfigError, match=r"lora.dora"):
        validate({"lora": {"dora": 3}})


def test_every_variant_is_a_key_and_a_sweep_composes(compose):
    """lora.init (kaiming, gaussian, pissa, pissa_niter_<N>, olora), lora.dora, lora.rslora and
    trainer.lora_plus_ratio: one multirun sweeps them; bad values and unsupported mixes name the key."""
    for overrides, check in ((["lora.init=pissa"], lambda c: c.init == "pissa"),
                             (["lora.init=pissa_niter_4"], lambda c: c.init == "pissa_niter_4"),
                             (["lora.init=olora", "lora.dora=true"], lambda c: c.init == "olora" and c.dora)):
        assert check(lora_config(validate(compose(overrides))))
    assert validate(compose(["trainer.lora_plus_ratio=16"]))["trainer"]["lora_plus_ratio"] == 16
    with pytest.raises(AppConfigError, match=r"lora.init='svd' is not valid: it must be one of kaiming, gaussian, "
                                             r"pissa, olora, or pissa_niter_<N>"):
        validate(compose(["lora.init=svd"]))
    with pytest.raises(AppConfigError, match=r"lora.init_from='/a' trains on from a saved adapter, which brings "
                                             r"its own init and dora setting; lora.init='pissa' cannot apply"):
        validate(compose(["lora.init_from=/a", "lora.init=pissa"]))
    with pytest.raises(AppConfigError, match=r"lora.dora=true cannot apply to it: drop lora.dora or lora.init_from"):
        validate(compose(["lora.init_from=/a", "lora.dora=true"]))
    with pytest.raises(AppConfigError, match=r"trainer.lora_plus_ratio=16.0 sets LoRA B's learning rate: it needs "
                                             r"finetune=lora, not finetune=full"):
        validate(compose(["lora=full", "trainer.lora_plus_ratio=16"]))


def test_strict_types_no_silent_conversion():
    with pytest.raises(AppConfigError, match=r"trainer.jit_compile=1 is not valid: it must be true or false"):
        validate({"trainer": {"jit_compile": 1}})
    with pytest.raises(AppConfigError, match=r"trainer.batch_size='8' is not valid: it must be a positive integer"):
        validate({"trainer": {"batch_size": "8"}})
    assert validate({"alpha": 16})["alpha"] == 16  # an int where a number is asked is a number


def test_every_problem_is_reported_at_once():
    with pytest.raises(AppConfigError) as e:
        validate({"rank": 0, "trainer": {"lr": -1}, "eval": {"num_samples": -3}})
    msg = str(e.value)
    assert "rank=0" in msg and "trainer.lr=-1" in msg and "eval.num_samples=-3" in msg


def test_unknown_keys_anywhere_name_the_closest_valid_one():
    with pytest.raises(AppConfigError, match=r"model.base.stepz is not a key.*did you mean model.base.steps\?"):
        validate({"model": {"base": {"stepz": 3}}})
    with pytest.raises(AppConfigError, match=r"lora.rnak is not a key.*did you mean lora.rank\?"):
        validate({"lora": {"rnak": 3}})
    with pytest.raises(AppConfigError, match=r"wandbb is not a key.*did you mean wandb\?"):
        validate({"wandbb": {}})
    assert "did you mean trainer.max_steps?" in unknown_key_hint("trainer.max_stepz")
    assert unknown_key_hint("trainer.max_steps") == ""  # a key that exists: no hint
    assert "rank" in valid_keys("lora") and valid_keys("nonexistent.node") is None


def test_required_values_are_named():
    with pytest.raises(AppConfigError, match=r"data.path is required \(set data.path=...\)"):
        validate({"data": {"source": "jsonl", "path": "???"}})


def test_cross_group_rules():
    with pytest.raises(AppConfigError, match="use it with lora=none"):
        validate({"eval": {"adapter": "some/dir"}})
    assert validate({"finetune": "none", "eval": {"adapter": "some/dir"}})["eval"]["adapter"] == "some/dir"
    with pytest.raises(AppConfigError, match="process_id=2 is not valid"):
        validate({"distribution": {"mode": "data_parallel", "num_processes": 2, "process_id": 2,
                                   "coordinator": "h:1"}})


def test_the_base_defaults_are_the_shipped_tiny_base(compose):
    shipped = validate(compose([]))["model"]["base"]
    defaults = schema.BaseConfig().model_dump()
    assert {k: shipped[k] for k in defaults if k != "data"} == {k: v for k, v in defaults.items() if k != "data"}
