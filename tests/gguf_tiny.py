"""A tiny Gemma 3 GGUF file written here with gguf's own writer: the real file's layout (names,
norm scales stored as 1 + scale, float and quantized tensors, a SentencePiece vocabulary with
control, user-defined, byte and whitespace-run pieces) at toy dimensions."""

import numpy as np

from tests.tiny import TEXT

# 6 layers: 5 sliding + 1 global. head_dim 256 as in every Gemma 3 text model: the GGUF has no
# query_pre_attn_scalar; llama.cpp and lora3 scale by head_dim, transformers by its default 256.
DIMS = dict(layers=6, hidden=64, heads=2, kv_heads=1, head_dim=256, ff=128)
QUANTIZED = {"token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q5_0", "ffn_up": "Q4_0", "ffn_down": "Q8_0"}


def vocabulary():
    """(tokens, scores, types) in Gemma's order: specials, user-defined, bytes, then BPE pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [3] * len(tokens)
    tokens += ["\n", "\n\n", "  ", "   "]  # as llama.cpp writes them: whitespace runs in real spaces
    types += [4] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = []
    for line in TEXT:
        for word in line.replace(":", " :").split():
            w = "\u2581" + word
            for ch in w:
                if ch not in pieces:
                    pieces.append(ch)
            for end in range(2, len(w) + 1):  # every prefix, so BPE merges can reach the word
                if w[:end] not in pieces:
                    pieces.append(w[:end])
    tokens += pieces
    types += [1] * len(pieces)
    scores = [-1000.0 if t == 3 else -float(i) for i, t in enumerate(types)]
    return tokens, scores, types


def write(path, seed=0):
    """Writes the tiny GGUF to `path`; returns the float32 tensors in Hugging Face layout and names
    as stored (norm scales included as 1 + scale)."""
    import gguf

    rng = np.random.default_rng(seed)
    d = DIMS
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3 (lora3 tests)")
    w.add_context_length(2048)
    w.add_embedding_length(d["hidden"])
    w.add_block_count(d["layers"])
    w.add_feed_forward_length(d["ff"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_key_length(d["head_dim"])
    w.add_value_length(d["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(512)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    stored = {}

    def add(name, shape, kind, scale=0.08):
        if kind == "norm":
            value = (1.0 + rng.normal(0, 0.1, shape)).astype(np.float32)
        else:
            value = rng.normal(0, scale, shape).astype(np.float32)
        qtype = QUANTIZED.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
        if qtype:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            data = gguf.quants.quantize(value, qt)
            w.add_tensor(name, data, raw_dtype=qt)
            value = gguf.quants.dequantize(data, qt).reshape(shape)
        else:
            w.add_tensor(name, value)
        stored[name] = value

    h, q, kv, f = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["ff"]
    add("token_embd.weight", (len(tokens), h), "w", scale=0.5)
    add("output_norm.weight", (h,), "norm")
    for i in range(d["layers"]):
        b = f"blk.{i}."
        add(b + "attn_q.weight", (q, h), "w")
        add(b + "attn_k.weight", (kv, h), "w")
        add(b + "attn_v.weight", (kv, h), "w")
        add(b + "attn_output.weight", (h, q), "w")
        add(b + "attn_q_norm.weight", (d["head_dim"],), "norm")
        add(b + "attn_k_norm.weight", (d["head_dim"],), "norm")
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            add(b + n + ".weight", (h,), "norm")
        add(b + "ffn_gate.weight", (f, h), "w")
        add(b + "ffn_up.weight", (f, h), "w")
        add(b + "ffn_down.weight", (h, f), "w")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
