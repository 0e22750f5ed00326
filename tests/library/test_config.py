"""`lora3.config`: LoraConfig's fields (validation, messages, normalisation), its dict round trip,
scaling, and `check_scale`, the one rank/alpha/dropout check."""

import dataclasses
import json
import math
import re

import pytest

import lora3
from lora3.config import INITS, LoraConfig, check_init, check_scale, scaling

pytestmark = pytest.mark.one_backend  # plain Python: cannot differ by backend


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": -3}, "alpha must be a positive number"),
        ({"init": "orthogonal"}, "init='orthogonal' is not valid: it must be one of kaiming, gaussian"),
        ({"dropout": 1.5}, "dropout must be a number in [0, 1)"),
        ({"targets": []}, "targets must be a non-empty string"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(lora3.LoraConfigError, match=re.escape(message)):
        lora3.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank", 0, "rank must be a positive integer, got rank=0"),
        ("rank", -4, "rank must be a positive integer, got rank=-4"),
        ("rank", 2.0, "rank must be a positive integer, got rank=2.0"),
        ("rank", True, "rank must be a positive integer, got rank=True"),
        ("rank", "8", "rank must be a positive integer, got rank='8'"),
        ("alpha", 0.0, "alpha must be a positive number, got alpha=0.0"),
        ("alpha", float("inf"), "alpha must be a positive number, got alpha=inf"),
        ("alpha", float("nan"), "alpha must be a positive number, got alpha=nan"),
        ("alpha", False, "alpha must be a positive number, got alpha=False"),
        ("alpha", "16", "alpha must be a positive number, got alpha='16'"),
        ("dropout", 1.0, "dropout must be a number in [0, 1), got dropout=1.0"),
        ("dropout", -0.1, "dropout must be a number in [0, 1), got dropout=-0.1"),
        ("dropout", True, "dropout must be a number in [0, 1), got dropout=True"),
        ("dropout", None, "dropout must be a number in [0, 1), got dropout=None"),
        ("rslora", 1, "rslora must be true or false, got rslora=1"),
        ("rslora", "yes", "rslora must be true or false, got rslora='yes'"),
        ("init", "xavier", "init='xavier' is not valid: it must be one of kaiming, gaussian, pissa, olora, or pissa_niter_<N> (N >= 0 iterations, e.g. pissa_niter_4)"),
        ("init", None, "init=None is not valid: it must be one of kaiming, gaussian, pissa, olora, or pissa_niter_<N> (N >= 0 iterations, e.g. pissa_niter_4)"),
        ("targets", "", "targets must be a non-empty string or list of strings, got targets=''"),
        ("targets", [], "targets must be a non-empty string or list of strings, got targets=[]"),
        ("targets", ["q", ""], "targets must be a non-empty string or list of strings, got targets=['q', '']"),
        ("targets", ["q", 3], "targets must be a non-empty string or list of strings, got targets=['q', 3]"),
        ("layers", [-1], "layers entries must be >= 0, got -1"),
        ("layers", [True], "layers entries must be block indices or 'encoder'/'decoder'[.N], got True"),
        ("layers", [1.5], "layers entries must be block indices or 'encoder'/'decoder'[.N], got 1.5"),
        ("train_also", [3], "train_also must be a string or a list of strings, got train_also=[3]"),
        ("train_also", [""], "train_also must be a string or a list of strings, got train_also=['']"),
    ],
)
def test_every_field_is_checked_and_the_message_quotes_the_value(field, value, message):
    with pytest.raises(lora3.LoraConfigError, match=re.escape(message) + "$"):
        LoraConfig(**{field: value})


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        LoraConfig(rank=-1)
    assert issubclass(lora3.LoraConfigError, lora3.Lora3Error) and issubclass(lora3.AdapterError, lora3.Lora3Error)


def test_fields_types_and_defaults_are_the_apps_schema():
    # The app uses LoraConfig as the `lora` node of its Hydra structured config: these must not move.
    fields = {f.name: (f.type, f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(LoraConfig)}
    assert fields == {
        "rank": ("int", 8),
        "alpha": ("float", 16.0),
        "targets": ("Any", "qv"),
        "dropout": ("float", 0.0),
        "rslora": ("bool", False),
        "init": ("str", "kaiming"),
        "layers": ("Any", None),
        "train_also": ("Any", ()),
        "rank_pattern": ("dict", {}),
        "alpha_pattern": ("dict", {}),
        "exclude": ("Any", ()),
        "dora": ("bool", False),
    }
    cfg = LoraConfig()
    cfg.rank = 4  # a plain dataclass, not frozen
    assert cfg.rank == 4


def test_normalisation():
    cfg = LoraConfig(rank=4, alpha=8, targets=["q"], layers=3, train_also="layer_norm", dropout=0)
    assert cfg.targets == "q" and cfg.target_list == ["q"]
    assert cfg.layers == (3,) and cfg.train_also == ("layer_norm",)
    assert isinstance(cfg.alpha, float) and cfg.alpha == 8.0 and isinstance(cfg.dropout, float)
    cfg = LoraConfig(targets=["q", "v", r"block_\d+/proj"], layers=["encoder", 1, "decoder.0"], train_also=None)
    assert cfg.targets == ("q", "v", r"block_\d+/proj") and cfg.target_list == ["q", "v", r"block_\d+/proj"]
    assert cfg.layers == ("encoder", 1, "decoder.0") and cfg.train_also == ()
    assert LoraConfig(layers="decoder").layers == ("decoder",)
    assert LoraConfig().layers is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rank": 4, "alpha": 8, "targets": ["q", "down"], "dropout": 0.1, "rslora": True, "init": "gaussian",
         "layers": [0, "decoder.1"], "train_also": ["layer_norm", r"/bias$"]},
        {"targets": "all_linear", "layers": 2},
        {"targets": "all_linear", "rank_pattern": {"query": 4, r"decoder_block_1/.*": 2},
         "alpha_pattern": {"ffw_.*": 3}, "exclude": ["o", r".*_7/.*"]},
        {"targets": "all_linear", "dora": True},
    ],
)
def test_to_dict_from_dict_round_trip_through_json(kwargs):
    cfg = LoraConfig(**kwargs)
    d = cfg.to_dict()
    optional = {"rank_pattern", "alpha_pattern", "exclude", "dora"}  # written only when set
    assert set(d) == {f.name for f in dataclasses.fields(LoraConfig)} - (optional - set(kwargs))
    assert not any(isinstance(v, tuple) for v in d.values())  # JSON-ready: lists, not tuples
    again = LoraConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg and again.to_dict() == d


def test_from_dict_unknown_fields_name_the_valid_ones():
    with pytest.raises(lora3.LoraConfigError) as info:
        LoraConfig.from_dict({"rank": 4, "lora_alpha": 8, "target_modules": ["q"]})
    message = str(info.value)
    assert "unknown LoraConfig fields ['lora_alpha', 'target_modules']" in message
    for field in ("rank", "alpha", "targets", "dropout", "rslora", "init", "layers", "train_also"):
        assert repr(field) in message


def test_from_dict_missing_fields_take_defaults_and_values_are_checked():
    assert LoraConfig.from_dict({"rank": 4}) == LoraConfig(rank=4)
    with pytest.raises(lora3.LoraConfigError, match=re.escape("got rank=-2")):
        LoraConfig.from_dict({"rank": -2})


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (8, 16.0), (16, 8.0), (64, 128.0)])
def test_scaling_with_and_without_rslora(rank, alpha):
    assert LoraConfig(rank=rank, alpha=alpha).scaling == pytest.approx(alpha / rank)
    assert LoraConfig(rank=rank, alpha=alpha, rslora=True).scaling == pytest.approx(alpha / math.sqrt(rank))
    assert scaling(rank, alpha) == pytest.approx(alpha / rank)
    assert scaling(rank, alpha, rslora=True) == pytest.approx(alpha / math.sqrt(rank))


def test_check_scale_is_the_one_check_config_and_layers_share():
    check_scale(1, 0.5, 0.0)
    check_scale(8, 16, 0.99)
    for args, message in [
        ((0, 16, 0.0), "got rank=0"),
        ((8, -1, 0.0), "got alpha=-1"),
        ((8, 16, 1.0), "got dropout=1.0"),
        ((8, float("nan"), 0.0), "got alpha=nan"),
    ]:
        with pytest.raises(lora3.LoraConfigError, match=re.escape(message)):
            check_scale(*args)
        # LoraConfig says exactly what check_scale says.
        with pytest.raises(lora3.LoraConfigError) as from_config:
            LoraConfig(rank=args[0], alpha=args[1], dropout=args[2])
        with pytest.raises(lora3.LoraConfigError) as from_check:
            check_scale(*args)
        assert str(from_config.value) == str(from_check.value)


def test_check_init():
    for init in INITS:
        check_init(init)
    with pytest.raises(lora3.LoraConfigError, match=re.escape("init='he' is not valid")):
        check_init("he")


# -- per-layer settings -------------------------------------------------------------------------------------

def _peft_rule(patterns, name, default):
    """PEFT's `get_pattern_key` + `.get(...)` on dotted module names, written out independently."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return patterns.get(name, default)


PATHS = ["decoder_block_0/attention/query", "decoder_block_0/attention/key", "decoder_block_1/attention/query",
         "decoder_block_1/ffw_linear", "decoder_block_11/ffw_linear", "transformer_encoder_layer_0/self_attention/query_projector"]


@pytest.mark.one_backend
@pytest.mark.parametrize("patterns", [
    {"query": 8},
    {"decoder_block_1/.*": 2, "query": 8},  # first key wins: block 1's query gets 2
    {"query": 8, "decoder_block_1/.*": 2},  # ... or 8
    {"attention/(query|key)": 3, "ffw_linear": 5},
    {"block_1/ffw_linear": 6},  # a tail must start after a '/': not decoder_block_11
    {"uery": 7, "decoder_block_0/attention/key": 9},  # 'uery' is no whole component: nothing
])
def test_rank_and_alpha_follow_peft_first_match_rule(patterns):
    cfg = LoraConfig(rank=4, alpha=16, rank_pattern=patterns, alpha_pattern={k: 2.0 * v for k, v in patterns.items()})
    for path in PATHS:
        dotted = path.replace("/", ".")
        dotted_patterns = {k.replace("/", r"\."): v for k, v in patterns.items()}
        assert cfg.rank_for(path) == _peft_rule(dotted_patterns, dotted, 4), path
        assert cfg.alpha_for(path) == _peft_rule({k: 2.0 * v for k, v in dotted_patterns.items()}, dotted, 16.0)
        assert cfg.scaling_for(path) == pytest.approx(cfg.alpha_for(path) / cfg.rank_for(path))
    assert LoraConfig(rank=4, alpha=8, rslora=True, rank_pattern={"query": 16}).scaling_for("b/query") == 2.0


@pytest.mark.one_backend
@pytest.mark.parametrize("kwargs, message", [
    ({"rank_pattern": {"([": 2}}, "rank_pattern key '([' is not a valid regex"),
    ({"rank_pattern": {"query": 0}}, "rank_pattern['query']=0 is not valid: it must be a positive integer"),
    ({"rank_pattern": {"query": 2.0}}, "rank_pattern['query']=2.0 is not valid: it must be a positive integer"),
    ({"rank_pattern": {"query": True}}, "rank_pattern['query']=True is not valid: it must be a positive integer"),
    ({"alpha_pattern": {"query": -1}}, "alpha_pattern['query']=-1 is not valid: it must be a positive number"),
    ({"alpha_pattern": {"query": float("nan")}}, "alpha_pattern['query']=nan is not valid: it must be a positive number"),
    ({"alpha_pattern": {"": 2}}, "alpha_pattern keys must be non-empty regex strings, got key ''"),
    ({"rank_pattern": ["query"]}, "rank_pattern must be a mapping of regex -> value, got rank_pattern=['query']"),
    ({"exclude": [3]}, "exclude must be a string or a list of strings, got exclude=[3]"),
    ({"exclude": 5}, "exclude must be a string or a list of strings, got exclude=5"),
    ({"exclude": "(["}, "exclude: target '([' is neither a role"),
])
def test_per_layer_settings_are_checked(kwargs, message):
    with pytest.raises(lora3.LoraConfigError, match=re.escape(message)):
        LoraConfig(**kwargs)


@pytest.mark.one_backend
def test_per_layer_settings_normalisation():
    cfg = LoraConfig(rank_pattern=None, alpha_pattern={"q": 2}, exclude="down")
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {"q": 2.0} and isinstance(cfg.alpha_pattern["q"], float)
    assert cfg.exclude == ("down",) and LoraConfig(exclude=None).exclude == ()
    assert list(LoraConfig(rank_pattern={"b": 1, "a": 2}).to_dict()["rank_pattern"]) == ["b", "a"]  # order kept
