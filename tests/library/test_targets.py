"""`lora3.targets` on layer paths alone (no model): roles per family, groups, regexes, the
`layers=` restriction, and errors that name what would be valid."""

import re

import pytest

from lora3.errors import LoraConfigError
from lora3.targets import FAMILIES, GROUPS, ROLES, expand, family_for, select

pytestmark = pytest.mark.one_backend  # string matching: cannot differ by backend

T5 = FAMILIES["t5"]
GEMMA = FAMILIES["gemma"]


def t5_paths(layers=2):
    """The Dense paths of a keras-hub T5Backbone, in model order (as `find_targets` lists them)."""
    paths = []
    for stack in ("encoder", "decoder"):
        for i in range(layers):
            block = f"transformer_{stack}_layer_{i}"
            for attn in ("self_attention",) + (("cross_attention",) if stack == "decoder" else ()):
                paths += [f"{block}/{attn}/{p}_projector" for p in ("query", "key", "value", "output")]
            paths += [f"{block}/{p}_projector" for p in ("input", "gate", "output")]
    return paths


def gemma_paths(layers=2):
    paths = []
    for i in range(layers):
        block = f"decoder_block_{i}"
        paths += [f"{block}/attention/{p}" for p in ("query", "key", "value", "attention_output")]
        paths += [f"{block}/{p}" for p in ("ffw_gating", "ffw_gating_2", "ffw_linear")]
    return paths


T5_ROLES = {
    "self_attention/query_projector": "q", "self_attention/key_projector": "k",
    "self_attention/value_projector": "v", "self_attention/output_projector": "o",
    "cross_attention/query_projector": "q", "cross_attention/output_projector": "o",
    "input_projector": "gate", "gate_projector": "up", "output_projector": "down",
}
GEMMA_ROLES = {
    "attention/query": "q", "attention/key": "k", "attention/value": "v", "attention/attention_output": "o",
    "ffw_gating": "gate", "ffw_gating_2": "up", "ffw_linear": "down",
}


@pytest.mark.parametrize("leaf, role", sorted(T5_ROLES.items()))
def test_t5_roles(leaf, role):
    stack = "decoder" if leaf.startswith("cross") else "encoder"
    site = T5.parse(f"transformer_{stack}_layer_3/{leaf}")
    assert site.role == role and site.block == 3 and site.stack == stack
    assert site.attention == (leaf.split("/")[0] if "/" in leaf else None)


@pytest.mark.parametrize("leaf, role", sorted(GEMMA_ROLES.items()))
def test_gemma_roles(leaf, role):
    site = GEMMA.parse(f"decoder_block_11/{leaf}")
    assert (site.role, site.block, site.stack) == (role, 11, None)


def test_paths_without_a_role():
    # T5's FFN output and attention output share a leaf name: the attention part decides.
    assert T5.parse("transformer_encoder_layer_0/self_attention/output_projector").role == "o"
    assert T5.parse("transformer_encoder_layer_0/output_projector").role == "down"
    for path in ("token_embedding", "transformer_encoder_layer_0/layer_norm",
                 "transformer_encoder_layer_0/self_attention/relative_attention_bias", "decoder_block_x/ffw_linear"):
        assert T5.parse(path) is None and GEMMA.parse(path) is None
    # A prefix before the block is allowed (a task model's path): the block is still found.
    assert GEMMA.parse("gemma_backbone/decoder_block_1/attention/query").block == 1


def test_family_for_reads_the_mro():
    assert family_for(["T5Backbone", "Backbone"]).name == "t5"
    assert family_for(["GemmaBackbone"]).name == "gemma"
    assert family_for(["Gemma3Backbone", "Backbone"]).name == "gemma"
    assert family_for(["MyGemma", "GemmaBackbone", "Backbone"]).name == "gemma"  # a subclass
    assert family_for(["BertBackbone", "Backbone", "Functional"]) is None


def test_groups_and_roles_expand():
    assert dict(expand(list(GROUPS))) == GROUPS
    assert expand(list(ROLES)) == [(r, (r,)) for r in ROLES]
    assert GROUPS["all_linear"] == ROLES and set(GROUPS["qv"]) < set(GROUPS["attention"])
    (entry, regex), = expand(r"decoder_block_\d+/ffw_linear")
    assert isinstance(regex, re.Pattern) and regex.pattern == entry


@pytest.mark.parametrize(
    "targets, leaves",
    [
        ("qv", {"query_projector", "value_projector"}),
        ("attention", {"query_projector", "key_projector", "value_projector", "output_projector"}),
        ("mlp", {"input_projector", "gate_projector", "output_projector"}),
        ("all_linear", None),
        (["k", "up"], {"key_projector", "gate_projector"}),
    ],
)
def test_t5_selection_by_group_and_role(targets, leaves):
    paths = t5_paths()
    chosen = select(paths, T5, targets)
    if leaves is None:
        assert list(chosen) == paths
    else:
        assert {p.rsplit("/", 1)[1] for p in chosen} == leaves
    assert list(chosen) == [p for p in paths if p in chosen]  # model order
    for path, role in chosen.items():
        assert role == T5.parse(path).role


def test_attention_roles_cover_self_and_cross_attention():
    chosen = select(t5_paths(layers=1), T5, "q")
    assert list(chosen) == [
        "transformer_encoder_layer_0/self_attention/query_projector",
        "transformer_decoder_layer_0/self_attention/query_projector",
        "transformer_decoder_layer_0/cross_attention/query_projector",
    ]


def test_regex_is_a_fullmatch_on_the_path():
    paths = gemma_paths()
    assert select(paths, GEMMA, r"decoder_block_1/attention/query") == {"decoder_block_1/attention/query": "q"}
    assert select(paths, GEMMA, r".*/ffw_gating.*") == {
        "decoder_block_0/ffw_gating": "gate", "decoder_block_0/ffw_gating_2": "up",
        "decoder_block_1/ffw_gating": "gate", "decoder_block_1/ffw_gating_2": "up",
    }
    with pytest.raises(LoraConfigError, match="matches no adaptable layer"):
        select(paths, GEMMA, "query")  # re.search would match; re.fullmatch does not


def test_regex_without_a_family_gives_no_role():
    paths = ["block/inner", "block/outer", "head"]
    assert select(paths, None, r"block/.*") == {"block/inner": None, "block/outer": None}


def test_overlapping_entries_choose_each_layer_once_in_model_order():
    paths = gemma_paths(layers=1)
    chosen = select(paths, GEMMA, ["v", "qv", r".*/attention/query"])
    assert list(chosen) == ["decoder_block_0/attention/query", "decoder_block_0/attention/value"]


@pytest.mark.parametrize(
    "layers, blocks",
    [
        ([0], {("encoder", 0), ("decoder", 0)}),
        ([1], {("encoder", 1), ("decoder", 1)}),
        (["encoder"], {("encoder", 0), ("encoder", 1)}),
        (["decoder.1"], {("decoder", 1)}),
        (["encoder.0", 1], {("encoder", 0), ("encoder", 1), ("decoder", 1)}),
    ],
)
def test_layers_restriction_t5(layers, blocks):
    chosen = select(t5_paths(), T5, "qv", layers)
    assert {(T5.parse(p).stack, T5.parse(p).block) for p in chosen} == blocks
    assert all(T5.parse(p).role in ("q", "v") for p in chosen)


def test_layers_restriction_gemma_and_regex():
    chosen = select(gemma_paths(layers=3), GEMMA, ["down", r".*attention/key"], layers=[2])
    assert chosen == {"decoder_block_2/attention/key": "k", "decoder_block_2/ffw_linear": "down"}


def test_target_matching_nothing_names_what_would_be_valid():
    paths = t5_paths()
    with pytest.raises(LoraConfigError) as info:
        select(paths, T5, ["q", "query_proj"])
    message = str(info.value)
    assert message.startswith("target 'query_proj' matches no adaptable layer")
    assert "Role names: q, k, v, o, gate, up, down" in message
    assert "groups: qv, attention, mlp, all_linear" in message
    assert "re.fullmatch on layer.path" in message
    assert "transformer_encoder_layer_0/self_attention/query_projector" in message  # the model's layers


def test_restriction_matching_nothing_names_the_restriction():
    with pytest.raises(LoraConfigError, match=re.escape("target 'qv' matches no adaptable layer within layers=[7]")):
        select(t5_paths(), T5, "qv", [7])
    with pytest.raises(LoraConfigError, match=re.escape("within layers=['decoder.5']")):
        select(t5_paths(), T5, "qv", ["decoder.5"])


@pytest.mark.parametrize("entry", ["middle", "encoder.x", "decoder-1", "enc"])
def test_bad_layers_entry(entry):
    with pytest.raises(LoraConfigError) as info:
        select(t5_paths(), T5, "qv", [entry])
    assert str(info.value).startswith(f"layers entry {entry!r} is not valid")
    assert "'encoder', 'decoder', or 'encoder.N' / 'decoder.N'" in str(info.value)


def test_role_names_and_layers_need_a_family():
    paths = ["block/inner", "head"]
    with pytest.raises(LoraConfigError) as info:
        select(paths, None, "qv")
    assert "target 'qv' is a role name, but this model has no role map" in str(info.value)
    assert "known families: t5, gemma" in str(info.value) and "[block/inner, head]" in str(info.value)
    with pytest.raises(LoraConfigError, match="layers= needs a known model family"):
        select(paths, None, r"block/.*", layers=[0])


def test_invalid_regex_names_roles_and_groups():
    with pytest.raises(LoraConfigError) as info:
        expand("(unclosed")
    assert str(info.value).startswith("target '(unclosed' is neither a role (q, k, v, o, gate, up, down), a group "
                                      "(qv, attention, mlp, all_linear) nor a valid regex")


def test_long_and_empty_path_lists_in_messages():
    paths = [f"block_{i}/proj" for i in range(30)]
    with pytest.raises(LoraConfigError) as info:
        select(paths, None, "nothing")
    assert "block_23/proj, ... (6 more)]" in str(info.value) and "block_24/proj" not in str(info.value)
    with pytest.raises(LoraConfigError, match=re.escape("[] (the model has no Dense/EinsumDense layer)")):
        select([], None, ".*")
