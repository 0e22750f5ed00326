"""Tiny keras-hub models and tokenizers for the tests (no download)."""

import functools
import io
import json
import os

import numpy as np

TEXT = [
    "ein mann fährt fahrrad auf der straße",
    "eine frau liest ein buch im park",
    "zwei kinder spielen mit einem ball",
    "der hund läuft über die wiese",
    "a man rides a bike on the street",
    "a woman reads a book in the park",
    "two children play with a ball",
    "the dog runs across the meadow",
    "translate German to English: ",
] * 20


def _train_spm(vocab_size, **special):
    """A SentencePiece model trained here on a few sentences (bytes)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **special,
    )
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def spm_proto(vocab_size=64):
    """T5's ids: pad 0, eos 1, unk 2, no bos."""
    return _train_spm(vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


@functools.lru_cache(maxsize=None)
def gemma_proto(vocab_size=64):
    """Gemma's ids and pieces: pad 0, eos 1, bos 2, unk 3, plus its chat-turn symbols."""
    return _train_spm(
        vocab_size, pad_id=0, bos_id=2, eos_id=1, unk_id=3, pad_piece="<pad>", bos_piece="<bos>",
        eos_piece="<eos>", unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )


def t5_backbone(vocab=64, layers=2, hidden=16, heads=2, ff=32, gated=True, **kw):
    import keras_hub

    return keras_hub.models.T5Backbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=ff,
        key_value_dim=hidden // heads,
        activation="gelu" if gated else "relu",
        use_gated_activation=gated,
        tie_embedding_weights=False,
        dropout=0.0,
        **kw,
    )


def gemma_backbone(vocab=64, layers=2, hidden=16, heads=4, kv_heads=2, head_dim=4, ff=32, **kw):
    import keras_hub

    return keras_hub.models.GemmaBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_query_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_dim=hidden,
        intermediate_dim=ff,
        head_dim=head_dim,
        **kw,
    )


def t5_lm(seq_len=16, **kw):
    import keras_hub

    tokenizer = keras_hub.models.T5Tokenizer(proto=spm_proto())
    backbone = t5_backbone(vocab=tokenizer.vocabulary_size(), **kw)
    pre = keras_hub.models.T5Seq2SeqLMPreprocessor(
        tokenizer=tokenizer, encoder_sequence_length=seq_len, decoder_sequence_length=seq_len
    )
    return keras_hub.models.T5Seq2SeqLM(backbone=backbone, preprocessor=pre)


def gemma_lm(seq_len=16, **kw):
    import keras_hub

    tokenizer = keras_hub.models.GemmaTokenizer(proto=gemma_proto())
    backbone = gemma_backbone(vocab=tokenizer.vocabulary_size(), **kw)
    pre = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tokenizer, sequence_length=seq_len)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=pre)


def t5_inputs(batch=2, enc=6, dec=5, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "encoder_token_ids": rng.integers(3, vocab, (batch, enc)).astype("int32"),
        "encoder_padding_mask": np.ones((batch, enc), "int32"),
        "decoder_token_ids": rng.integers(3, vocab, (batch, dec)).astype("int32"),
        "decoder_padding_mask": np.ones((batch, dec), "int32"),
    }


def gemma_inputs(batch=2, length=6, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(3, vocab, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }


def randomize_lora(model, seed=0, scale=0.1):
    """Give every LoRA B (and A) random values, so adapters change outputs."""
    import lora3

    rng = np.random.default_rng(seed)
    for w in lora3.lora_layers(model):
        w.lora_A.assign(rng.normal(0, scale, w.lora_A.shape).astype("float32"))
        w.lora_B.assign(rng.normal(0, scale, w.lora_B.shape).astype("float32"))


def backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def corrupt_adapter(case, adapter):
    """Damages a saved adapter directory in one of the ways the loader must refuse (`case`)."""
    from lora3.adapters import CONFIG_NAME, WEIGHTS_NAME

    cfg = adapter / CONFIG_NAME
    weights = adapter / WEIGHTS_NAME
    meta = json.loads(cfg.read_text())
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "altered":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "garbage":
        weights.write_bytes(b"not a safetensors file")
    elif case in ("missing_tensor", "extra_tensor", "wrong_shape"):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        if case == "missing_tensor":
            del tensors[key]
        elif case == "extra_tensor":
            tensors["../../evil/lora_A"] = np.zeros((2, 2), "float32")
        else:
            tensors[key] = np.zeros((3, 3), "float32")
        save_file(tensors, str(weights))
        from lora3.fileio import sha256_file

        meta["sha256"] = sha256_file(weights)  # a consistent file, with the wrong content
        cfg.write_text(json.dumps(meta))
    elif case == "missing_field":
        del meta["base_fingerprint"]
        cfg.write_text(json.dumps(meta))
    elif case == "wrong_type":
        meta["rank"] = "eight"
        cfg.write_text(json.dumps(meta))
    elif case == "bad_json":
        cfg.write_text("{not json")
    elif case == "dotdot_path":
        meta["layer_paths"][0] = "../outside/query_projector"
        cfg.write_text(json.dumps(meta))
    elif case == "no_config":
        cfg.unlink()
