"""Any BERT-family sentence-embedding model from a Hugging Face directory, run
by the ragged forward (``models._ragged``) on pykernels kernels.

The directory holds config.json, model.safetensors and tokenizer.json, and,
when it is a sentence-transformers model, modules.json with its Pooling
module's config (``1_Pooling/config.json``), an optional ``Normalize`` module
and sentence_bert_config.json (max_seq_length). ``read_config`` turns these
into a ``BertConfig``: the shapes, the FFN activation (HF ``gelu`` -> the
kernels' erf GELU, ``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_fast`` ->
``gelu_tanh``), the pooling (mean, CLS or max) and whether to L2-normalize.
Without modules.json it does what sentence-transformers does for a plain
Transformer: mean pooling, no normalization.

This module owns the pieces every BERT-shaped model shares, so ``MiniLM``
can use them too: ``pack_encoder`` (checkpoint tensors -> ``EncoderWeights``
with Q, K, V fused and every projection packed in one precision) and
``describe_encoder`` (the forward as ``pykernels.work`` ops, for the planner).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .. import _gemm, testing, work
from ._ragged import EncoderLayer, EncoderWeights, ragged_forward, tokenize_ragged

# Hugging Face ``hidden_act`` -> pykernels.linear activation. gelu_new,
# gelu_pytorch_tanh and gelu_fast are all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
HIDDEN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}
POOLINGS = ("mean", "cls", "max")

_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# sentence-transformers' Pooling config keys -> our mode
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}
_UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                        "pooling_mode_lasttoken")


@dataclass(frozen=True)
class BertConfig:
    """The shapes and the embedding head of a BERT encoder."""
    hidden: int
    heads: int
    layers: int
    intermediate: int
    hidden_act: str        # as config.json spells it
    activation: str        # the pykernels.linear activation for it
    max_positions: int
    vocab: int
    type_vocab: int
    eps: float
    max_tokens: int        # truncation length of the tokenizer
    pooling: str = "mean"
    normalize: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_dict(cls, config: dict, *, pooling: str = "mean", normalize: bool = False,
                  max_tokens: int | None = None) -> "BertConfig":
        """From a config.json dict (``model_type`` bert or absent)."""
        mt = config.get("model_type", "bert")
        if mt != "bert":
            raise ValueError(f"expected a BERT config, got model_type={mt!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported, got "
                             f"position_embedding_type={config['position_embedding_type']!r}")
        act = config.get("hidden_act", "gelu")
        if act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported; expected one of "
                             f"{sorted(HIDDEN_ACTS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if hidden % heads:
            raise ValueError(f"num_attention_heads {heads} does not divide hidden_size {hidden}")
        max_pos = int(config.get("max_position_embeddings", 512))
        return cls(hidden=hidden, heads=heads, layers=int(config["num_hidden_layers"]),
                   intermediate=int(config["intermediate_size"]), hidden_act=act,
                   activation=HIDDEN_ACTS[act], max_positions=max_pos,
                   vocab=int(config["vocab_size"]),
                   type_vocab=int(config.get("type_vocab_size", 2)),
                   eps=float(config.get("layer_norm_eps", 1e-12)),
                   max_tokens=min(max_pos, int(max_tokens or max_pos)),
                   pooling=pooling, normalize=bool(normalize))


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_config(path: str | os.PathLike) -> BertConfig:
    """The ``BertConfig`` of a model directory: config.json, plus modules.json,
    the Pooling module's config.json and sentence_bert_config.json when present."""
    path = os.fspath(path)
    config = _read_json(os.path.join(path, "config.json"))
    pooling, normalize, max_tokens = "mean", False, None
    modules_path = os.path.join(path, "modules.json")
    if os.path.exists(modules_path):
        for mod in _read_json(modules_path):
            kind = mod.get("type", "")
            if kind == _NORMALIZE_MODULE:
                normalize = True
            elif kind == _POOLING_MODULE:
                pooling = _pooling_mode(os.path.join(path, mod.get("path", ""), "config.json"))
    st_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(st_path):
        max_tokens = _read_json(st_path).get("max_seq_length")
    else:
        tc_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc_path):
            m = _read_json(tc_path).get("model_max_length")
            max_tokens = m if isinstance(m, int) and m < 10**6 else None  # HF's "no limit" is 1e30
    return BertConfig.from_dict(config, pooling=pooling, normalize=normalize,
                                max_tokens=max_tokens)


def _pooling_mode(config_path: str) -> str:
    if not os.path.exists(config_path):
        return "mean"  # sentence-transformers' default Pooling
    cfg = _read_json(config_path)
    if "pooling_mode" in cfg:  # newer sentence-transformers spell the mode directly
        mode = {"mean": "mean", "cls": "cls", "max": "max"}.get(cfg["pooling_mode"])
        if mode is None:
            raise ValueError(f"pooling mode {cfg['pooling_mode']!r} is not supported; "
                             f"expected one of {POOLINGS}")
        return mode
    bad = [k for k in _UNSUPPORTED_POOLING if cfg.get(k)]
    modes = [m for k, m in _POOLING_KEYS.items() if cfg.get(k)]
    if bad or len(modes) != 1:
        raise ValueError(f"{config_path}: exactly one of {sorted(_POOLING_KEYS)} must be true "
                         f"(concatenated or other poolings are not supported), got "
                         f"{[k for k in cfg if k.startswith('pooling_mode') and cfg[k]]}")
    return modes[0]


def strip_prefix(tensors: dict) -> dict:
    """The tensors keyed without a ``bert.`` model prefix (checkpoints of
    BertFor* classes store the encoder under it)."""
    if "embeddings.word_embeddings.weight" in tensors:
        return tensors
    if "bert.embeddings.word_embeddings.weight" in tensors:
        return {k[5:]: v for k, v in tensors.items() if k.startswith("bert.")}
    raise ValueError("no embeddings.word_embeddings.weight (or bert.-prefixed) tensor: "
                     "not a BERT checkpoint")


def _check_files(path: str) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} not found in model directory {path!r}")


def load_checkpoint(path: str | os.PathLike, max_tokens: int) -> tuple:
    """(tensors by HF name without a ``bert.`` prefix, as stored (float32),
    the tokenizer truncating at ``max_tokens`` without padding) of a model
    directory."""
    path = os.fspath(path)
    _check_files(path)
    try:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"BERT models need the 'safetensors' and 'tokenizers' packages "
                          f"(pip install 'pykernels[models]'): {e}") from None
    tensors = strip_prefix(load_file(os.path.join(path, "model.safetensors")))
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=int(max_tokens))
    tokenizer.no_padding()
    return tensors, tokenizer


def pack_encoder(tensors: dict, cfg: BertConfig, precision: str = "fp32") -> EncoderWeights:
    """``EncoderWeights`` from a checkpoint's tensors (HF names, no prefix):
    float32 embedding tables and LayerNorms, Q, K and V concatenated into one
    (hidden -> 3 * hidden) projection, every projection packed in
    ``precision`` ("fp32", "bf16", "int8" or "int8_7bit") from torch's (out, in)
    layout."""
    if precision not in _gemm.PRECISIONS:
        raise ValueError(f"precision must be one of {_gemm.PRECISIONS}, got {precision!r}")

    def f32(name):
        if name not in tensors:
            raise ValueError(f"tensor {name!r} missing from the checkpoint")
        return np.ascontiguousarray(tensors[name], dtype=np.float32)

    def pack(w):
        return _gemm.pack(w, precision=precision, layout="nk")

    layers = []
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}."
        att = p + "attention."
        qkv = ("query", "key", "value")
        layers.append(EncoderLayer(
            qkv=pack(np.concatenate([f32(att + f"self.{n}.weight") for n in qkv])),
            qkv_bias=np.concatenate([f32(att + f"self.{n}.bias") for n in qkv]),
            out=pack(f32(att + "output.dense.weight")), out_bias=f32(att + "output.dense.bias"),
            ln1=(f32(att + "output.LayerNorm.weight"), f32(att + "output.LayerNorm.bias")),
            up=pack(f32(p + "intermediate.dense.weight")),
            up_bias=f32(p + "intermediate.dense.bias"),
            down=pack(f32(p + "output.dense.weight")), down_bias=f32(p + "output.dense.bias"),
            ln2=(f32(p + "output.LayerNorm.weight"), f32(p + "output.LayerNorm.bias")),
        ))
    word = f32("embeddings.word_embeddings.weight")
    if word.shape != (cfg.vocab, cfg.hidden):
        raise ValueError(f"word embeddings have shape {word.shape}, config says "
                         f"({cfg.vocab}, {cfg.hidden})")
    return EncoderWeights(
        word_emb=word, pos_emb=f32("embeddings.position_embeddings.weight"),
        type_emb=f32("embeddings.token_type_embeddings.weight"),
        emb_ln=(f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias")),
        layers=layers, hidden=cfg.hidden, heads=cfg.heads, intermediate=cfg.intermediate,
        eps=cfg.eps, activation=cfg.activation)


def with_int8_precision(weights: EncoderWeights, precision: str) -> EncoderWeights:
    """``weights`` (packed "int8" or "int8_7bit") under the other int8
    precision, sharing every array (``PackedWeight.with_precision``): a model
    that serves both holds its int8 weights once."""
    return replace(weights, layers=[
        replace(L, **{f: getattr(L, f).with_precision(precision)
                      for f in ("qkv", "out", "up", "down")})
        for L in weights.layers])


def describe_encoder(cfg: BertConfig, tokens: int, precision: str | None,
                     family: str = "bert") -> work.Model:
    """The forward of one text of ``tokens`` tokens as ``pykernels.work`` ops:
    per layer the fused QKV projection, self-attention, the output projection
    and the two FFN projections (the forward's kernel calls), shapes from
    ``cfg``, the projections' precision fixed to ``precision`` (None: left to
    the planner, named ``any``). Embedding
    lookup, LayerNorm and pooling are not counted. The name
    ``{family}-l{layers}(h=..,heads=..,ffn=..,vocab=..,s=..,precision)`` keys
    the planner's profiles and feedback."""
    h, f, nh, p = cfg.hidden, cfg.intermediate, cfg.heads, precision
    tokens = int(tokens)
    layer = (work.Linear(h, 3 * h, p, rows_per_item=tokens),
             work.Attention(nh, nh, cfg.head_dim, tokens, tokens, False),
             work.Linear(h, h, p, rows_per_item=tokens),
             work.Linear(h, f, p, rows_per_item=tokens),
             work.Linear(f, h, p, rows_per_item=tokens))
    name = (f"{family}-l{cfg.layers}(h={h},heads={nh},ffn={f},vocab={cfg.vocab},s={tokens},"
            f"{p or 'any'})")
    return work.Model(ops=layer * cfg.layers, name=name)


def encoder_flops(cfg: BertConfig, lens) -> float:
    """The real FLOPs of encoding texts of ``lens`` tokens: per layer and token
    the projections 2 (4 h^2 + 2 h f), attention 4 L h for a text of L tokens
    (the sum of ``describe_encoder(cfg, L).flops()``; no padding counted)."""
    lens = np.asarray(lens, dtype=np.float64)
    h, f = cfg.hidden, cfg.intermediate
    return cfg.layers * (2.0 * (4 * h * h + 2 * h * f) * lens.sum() + 4.0 * h * (lens * lens).sum())


class BertEmbedder:
    """A BERT sentence-embedding model. Build it with ``BertEmbedder.load(path)``."""

    def __init__(self, config: BertConfig, tensors: dict, tokenizer, precision: str = "fp32",
                 family: str = "bert"):
        self.config = config
        self.precision = precision
        self.hidden = config.hidden
        self.tokenizer = tokenizer
        self.family = family
        self.weights = pack_encoder(tensors, config, precision)
        self._tensors = tensors  # float32 originals, for the float64 reference

    @classmethod
    def load(cls, path: str | os.PathLike, precision: str = "fp32") -> "BertEmbedder":
        """Load a Hugging Face BERT directory (see the module docstring).
        precision: "fp32", "bf16", "int8" or "int8_7bit" for the projection weights."""
        if precision not in _gemm.PRECISIONS:
            raise ValueError(f"precision must be one of {_gemm.PRECISIONS}, got {precision!r}")
        path = os.fspath(path)
        _check_files(path)
        cfg = read_config(path)
        tensors, tokenizer = load_checkpoint(path, cfg.max_tokens)
        return cls(cfg, tensors, tokenizer, precision)

    def tokenize(self, texts: Sequence[str]) -> tuple:
        """Packed token ids (total_tokens,) int64 and offsets (len(texts) + 1,) int64."""
        return tokenize_ragged(self, texts)

    def forward(self, ids: np.ndarray, cu: np.ndarray, *, variant: str = "auto",
                threads=None) -> np.ndarray:
        """Embeddings (batch, hidden) float32 of a packed batch (``tokenize`` output),
        pooled and (when the model says so) L2-normalized."""
        return ragged_forward(self.weights, ids, cu, pooling=self.config.pooling,
                              normalize=self.config.normalize, variant=variant, threads=threads)

    def encode(self, texts: Sequence[str], batch_size: int = 64, *, variant: str = "auto",
               threads=None) -> np.ndarray:
        """(n, hidden) float32 embeddings in the order of ``texts``, ``batch_size``
        texts per ragged forward (no padding, no sorting)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        texts = list(texts)
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            ids, cu = self.tokenize(texts[start:start + batch_size])
            out[start:start + batch_size] = self.forward(ids, cu, variant=variant,
                                                         threads=threads)
        return out

    def describe(self, tokens: int) -> work.Model:
        """The forward of one text of ``tokens`` tokens as work (``describe_encoder``)."""
        return describe_encoder(self.config, tokens, self.precision, self.family)

    def flops(self, lens) -> float:
        """Real FLOPs of encoding texts of ``lens`` tokens (``encoder_flops``)."""
        return encoder_flops(self.config, lens)

    def reference_forward(self, ids: np.ndarray, cu: np.ndarray) -> np.ndarray:
        """float64 embeddings of a packed batch from the original float32
        tensors (``testing.bert_forward64``): the oracle for the tests."""
        c = self.config
        return testing.bert_forward64(self._tensors, ids, cu, heads=c.heads, eps=c.eps,
                                      activation=c.activation, pooling=c.pooling,
                                      normalize=c.normalize)


__all__ = ["BertConfig", "BertEmbedder", "HIDDEN_ACTS", "POOLINGS", "describe_encoder",
           "encoder_flops", "load_checkpoint", "pack_encoder", "read_config", "strip_prefix"]
