"""The BERT encoder on a packed ragged batch: no padding anywhere.

The tokens of all texts are packed densely, text b in rows ``cu[b]:cu[b+1]``
(``cu_seqlens``), so every projection runs on the real tokens only and
attention runs per sequence inside the packed buffer. Per layer, one C++ call
(``_encoder.encoder_layer``, GIL released): the fused QKV projection,
``varlen_attention`` reading Q, K, V from its output by strides and writing the
context as (tokens, hidden), then per chunk of rows the output projection,
residual add + LayerNorm, the FFN up projection with GELU fused, the down
projection and another add + LayerNorm, while the chunk is in cache; then mean
pooling + L2 normalization. The layer's scratch is allocated once per forward.
``ragged_forward_steps`` is the same forward as one kernel call per step.

The forward reads an ``EncoderWeights`` (embedding tables, packed projections,
biases, LayerNorm parameters, the shapes and the FFN activation), built by
``models.bert.pack_encoder`` from a Hugging Face BERT checkpoint; a loaded
``MiniLM`` or ``BertEmbedder`` is accepted too (its ``weights``). It is what
``MiniLM.encode`` runs; the numerics are those of the padded ``MiniLM.forward``
up to fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import _encoder, _gemm


@dataclass
class EncoderLayer:
    """One BERT layer: Q, K, V fused into one packed (hidden, 3 * hidden)
    weight, the attention output, FFN up and down projections (packed, with
    float32 biases) and the two LayerNorms as (gamma, beta)."""
    qkv: "_gemm.PackedWeight"
    qkv_bias: np.ndarray
    out: "_gemm.PackedWeight"
    out_bias: np.ndarray
    ln1: tuple
    up: "_gemm.PackedWeight"
    up_bias: np.ndarray
    down: "_gemm.PackedWeight"
    down_bias: np.ndarray
    ln2: tuple


@dataclass
class EncoderWeights:
    """What ``ragged_forward`` runs: float32 embedding tables (word, position,
    token type), the embedding LayerNorm, the layers, and the shapes;
    ``activation`` is the FFN's ``pykernels.linear`` activation ("gelu" for
    HF ``gelu``, "gelu_tanh" for ``gelu_new``)."""
    word_emb: np.ndarray
    pos_emb: np.ndarray
    type_emb: np.ndarray
    emb_ln: tuple
    layers: list
    hidden: int
    heads: int
    intermediate: int
    eps: float
    activation: str = "gelu"


def encoder_weights(model) -> EncoderWeights:
    """``model`` as an ``EncoderWeights``: itself, or its ``weights`` attribute
    (``BertEmbedder``, and ``MiniLM``'s default precision)."""
    if isinstance(model, EncoderWeights):
        return model
    w = getattr(model, "weights", None)
    if isinstance(w, EncoderWeights):
        return w
    raise TypeError(f"expected an EncoderWeights or a model with one as .weights, got "
                    f"{type(model).__name__}")


def tokenize_ragged(model, texts: Sequence[str]) -> tuple:
    """Packed token ids (total_tokens,) int64 and offsets (len(texts) + 1,) int64."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
    encodings = model.tokenizer.encode_batch(list(texts))
    lens = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    cu = _encoder.cu_seqlens(lens)
    ids = np.empty(int(cu[-1]), dtype=np.int64)
    for b, e in enumerate(encodings):
        ids[cu[b]:cu[b + 1]] = e.ids
    return ids, cu


def ragged_forward(model, ids: np.ndarray, cu: np.ndarray, *, pooling: str = "mean",
                   normalize: bool = True, variant: str = "auto", threads=None) -> np.ndarray:
    """Sentence embeddings (batch, hidden) float32 of a packed ragged batch.

    model: an ``EncoderWeights`` or what ``encoder_weights`` accepts.
    ids: (total_tokens,) token ids; cu: (batch + 1,) offsets (``cu_seqlens``).
    pooling: "mean" (sentence-transformers' default), "cls" or "max".
    """
    w = encoder_weights(model)
    ids = np.asarray(ids)
    t = ids.shape[0]
    x = _encoder.embed_layer_norm(ids, cu, w.word_emb, w.pos_emb, w.type_emb,
                                  *w.emb_ln, w.eps, threads=threads)
    cu = np.asarray(cu, dtype=np.int64)
    scratch = _encoder.encoder_layer_scratch(t, w.hidden, w.intermediate, threads)
    for L in w.layers:  # one C++ call per layer, in place on x
        _encoder.encoder_layer(x, cu, w.heads, L.qkv, L.qkv_bias, L.out, L.out_bias, L.ln1,
                               L.up, L.up_bias, L.down, L.down_bias, L.ln2, eps=w.eps,
                               activation=w.activation, variant=variant, threads=threads,
                               scratch=scratch)
    return _encoder.pool(x, cu, pooling, normalize, threads=threads)


def ragged_forward_steps(model, ids: np.ndarray, cu: np.ndarray, *, pooling: str = "mean",
                         normalize: bool = True, variant: str = "auto",
                         threads=None) -> np.ndarray:
    """``ragged_forward`` spelled out as one kernel call per step (the readable
    form of what ``_encoder.encoder_layer`` fuses): QKV projection, varlen
    attention, output projection, add+LN, FFN up with the activation, FFN down,
    add+LN, each over the whole batch. The tests check the fused layer against
    it; it is not on any serving path."""
    w = encoder_weights(model)
    h, f, act = w.hidden, w.intermediate, w.activation
    ids = np.asarray(ids)
    t = ids.shape[0]
    x = _encoder.embed_layer_norm(ids, cu, w.word_emb, w.pos_emb, w.type_emb,
                                  *w.emb_ln, w.eps, threads=threads)
    qkv = np.empty((t, 3 * h), dtype=np.float32)
    ctx = np.empty((t, h), dtype=np.float32)
    proj = np.empty((t, h), dtype=np.float32)  # attention output and FFN down
    up = np.empty((t, f), dtype=np.float32)
    for L in w.layers:
        _gemm.linear(x, L.qkv, L.qkv_bias, out=qkv, variant=variant, threads=threads)
        _encoder.varlen_attention(qkv, cu, w.heads, out=ctx, threads=threads)
        _gemm.linear(ctx, L.out, L.out_bias, out=proj, variant=variant, threads=threads)
        _encoder.add_layer_norm(proj, x, *L.ln1, w.eps, out=x, threads=threads)
        _gemm.linear(x, L.up, L.up_bias, activation=act, out=up, variant=variant,
                     threads=threads)
        _gemm.linear(up, L.down, L.down_bias, out=proj, variant=variant, threads=threads)
        _encoder.add_layer_norm(proj, x, *L.ln2, w.eps, out=x, threads=threads)
    return _encoder.pool(x, cu, pooling, normalize, threads=threads)


def encode_ragged(model, texts: Sequence[str], *, batch_size: int = 64, pooling: str = "mean",
                  normalize: bool = True, variant: str = "auto", threads=None) -> np.ndarray:
    """(n, hidden) float32 embeddings (default mean-pooled and L2-normalized),
    in the order of ``texts``; batches of ``batch_size`` texts in their given
    order (a ragged batch pays for its real tokens, so no sorting by length).
    ``model`` has a ``tokenizer`` and the fields ``encoder_weights`` reads."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    w = encoder_weights(model)
    texts = list(texts)
    out = np.empty((len(texts), w.hidden), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        ids, cu = tokenize_ragged(model, texts[start:start + batch_size])
        out[start:start + batch_size] = ragged_forward(w, ids, cu, pooling=pooling,
                                                       normalize=normalize, variant=variant,
                                                       threads=threads)
    return out
