"""Encoder-layer kernels over ragged (packed) batches: one call into C++ each.

A ragged batch packs the tokens of all sequences densely, sequence ``b`` in rows
``cu_seqlens[b]:cu_seqlens[b + 1]`` (flash-attention's varlen convention), so
projections and norms run on real tokens only. Contract: csrc/include/pykernels/
encoder.h. This layer checks dtypes, shapes, offsets, ids and aliasing with
messages that name the fix, allocates ``out`` when it is not given and passes
views (no silent copies of float data); the binding re-checks only what guards
memory and runs the kernel with the GIL released.
"""
from __future__ import annotations

import math

import numpy as np

from . import _core
from ._gemm import _ACTIVATION, _VARIANT, PackedWeight, _check_threads
from ._runtime import _bf16 as _bf16_scheme, _resolve_bf16

_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)
POOL_MODES = ("mean", "cls", "max")
_POOL_CODE = {"mean": 0, "cls": 1, "max": 2}

__all__ = ["add_layer_norm", "embed_layer_norm", "varlen_attention", "pool", "cu_seqlens",
           "encoder_layer", "encoder_layer_scratch", "POOL_MODES"]


def _threads(threads) -> int:
    return 0 if threads is None else _check_threads(threads)


def _matrix(name: str, x, cols: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(x).__name__}; "
                        f"use np.asarray({name}, dtype=np.float32)")
    if x.dtype != _F32:
        raise TypeError(f"{name} has dtype {x.dtype}, expected float32; "
                        f"convert with {name}.astype(np.float32)")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} has shape {x.shape}, expected {cols} columns")
    if x.shape[0] > 0 and x.shape[1] > 1 and x.strides[1] != 4:
        raise ValueError(f"{name} must have unit stride along its last axis (strides "
                         f"{x.strides}); pass np.ascontiguousarray({name})")
    if not x.flags.aligned:
        raise ValueError(f"{name} is not 4-byte aligned; pass {name}.copy()")
    return x


def _vector(name: str, v, n: int) -> np.ndarray:
    if not isinstance(v, np.ndarray) or v.dtype != _F32:
        got = v.dtype if isinstance(v, np.ndarray) else type(v).__name__
        raise TypeError(f"{name} must be a float32 numpy array of shape ({n},), got {got}; "
                        f"convert with np.asarray({name}, dtype=np.float32)")
    if v.shape != (n,):
        raise ValueError(f"{name} has shape {v.shape}, expected ({n},)")
    if not (v.flags.c_contiguous and v.flags.aligned):
        raise ValueError(f"{name} must be contiguous; pass np.ascontiguousarray({name})")
    return v


def _int64(name: str, x) -> np.ndarray:
    """A 1-D int64 C-contiguous array (integer inputs of another width are
    converted: these are token ids and offsets, a few KiB)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {a.max()}, outside the int64 range")
    return np.require(a, dtype=_I64, requirements=("C", "A"))


def _offsets(cu, tokens: int) -> tuple:
    """cu_seqlens as int64, checked; returns (cu, batch, longest)."""
    cu = _int64("cu_seqlens", cu)
    if cu.size < 1:
        raise ValueError("cu_seqlens must hold batch + 1 >= 1 offsets, got an empty array")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    if cu[-1] != tokens:
        raise ValueError(f"cu_seqlens[-1] = {cu[-1]} must equal the number of tokens {tokens}")
    lens = np.diff(cu)
    if lens.size and lens.min() < 0:
        b = int(np.argmin(lens))
        raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{b + 1}] = {cu[b + 1]} "
                         f"< cu_seqlens[{b}] = {cu[b]}")
    return cu, cu.size - 1, int(lens.max()) if lens.size else 0


def _out(out, shape: tuple) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=_F32)
    if not isinstance(out, np.ndarray) or out.dtype != _F32 or out.shape != shape:
        got = (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray)
               else type(out).__name__)
        raise ValueError(f"out must be a float32 array of shape {shape}, got {got}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return _matrix("out", out)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def cu_seqlens(lengths) -> np.ndarray:
    """Offsets (batch + 1,) int64 from per-sequence lengths: [0, l0, l0 + l1, ...]."""
    lens = _int64("lengths", lengths)
    if lens.size and lens.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lens.min()}")
    cu = np.zeros(lens.size + 1, dtype=_I64)
    np.cumsum(lens, out=cu[1:])
    return cu


def add_layer_norm(x, residual, gamma, beta, eps: float = 1e-12, *, out=None,
                   threads=None) -> np.ndarray:
    """``LayerNorm(x + residual) * gamma + beta`` over the last axis, float32 (rows, n).

    x, residual: (rows, n) float32, any row stride, unit column stride; residual
    may be None (plain LayerNorm). gamma, beta: (n,). Biased variance, fp32
    statistics. ``out`` may be ``x`` or ``residual`` itself (in place) or a
    separate array; a partial overlap is an error.
    """
    x = _matrix("x", x)
    rows, n = x.shape
    if residual is not None:
        residual = _matrix("residual", residual, n)
        if residual.shape[0] != rows:
            raise ValueError(f"residual has shape {residual.shape}, expected {x.shape}")
    gamma = _vector("gamma", gamma, n)
    beta = _vector("beta", beta, n)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out = _out(out, (rows, n))
    for name, a in (("x", x), ("residual", residual)):
        if a is not None and np.shares_memory(out, a) and not _same_view(out, a):
            raise ValueError(f"out partially overlaps {name}; pass out={name} (in place) "
                             "or a separate array")
    _core.add_layer_norm(x, residual, gamma, beta, eps, out, _threads(threads))
    return out


def embed_layer_norm(ids, cu, word, pos, type_, gamma, beta, eps: float = 1e-12, *,
                     token_type_ids=None, out=None, threads=None) -> np.ndarray:
    """BERT embeddings of a ragged batch, float32 (total_tokens, n).

    ``LayerNorm(word[ids[t]] + pos[t - cu[b]] + type_[token_type_ids[t]])`` for
    token t of sequence b. ids: (total_tokens,) integers in [0, vocab); cu:
    (batch + 1,) offsets (``cu_seqlens``); word (vocab, n), pos (max_pos, n),
    type_ (types, n) float32 tables; token_type_ids: (total_tokens,) or None
    (type 0 everywhere). Every sequence must fit the position table.
    """
    ids = _int64("ids", ids)
    word = _matrix("word", word)
    n = word.shape[1]
    pos = _matrix("pos", pos, n)
    type_ = _matrix("type_", type_, n)
    cu, _, longest = _offsets(cu, ids.size)
    if longest > pos.shape[0]:
        raise ValueError(f"a sequence of {longest} tokens exceeds the {pos.shape[0]} position "
                         "embeddings; truncate it")
    if ids.size and (ids.min() < 0 or ids.max() >= word.shape[0]):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise ValueError(f"ids holds {bad}, outside the vocabulary [0, {word.shape[0]})")
    if token_type_ids is not None:
        token_type_ids = _int64("token_type_ids", token_type_ids)
        if token_type_ids.shape != ids.shape:
            raise ValueError(f"token_type_ids has shape {token_type_ids.shape}, "
                             f"expected {ids.shape}")
        if ids.size and (token_type_ids.min() < 0 or token_type_ids.max() >= type_.shape[0]):
            raise ValueError(f"token_type_ids must lie in [0, {type_.shape[0]})")
    elif type_.shape[0] < 1:
        raise ValueError("type_ must hold at least one row (token type 0)")
    gamma = _vector("gamma", gamma, n)
    beta = _vector("beta", beta, n)
    out = _out(out, (ids.size, n))
    for name, a in (("word", word), ("pos", pos), ("type_", type_)):
        if np.shares_memory(out, a):
            raise ValueError(f"out overlaps {name}")
    _core.embed_layer_norm(ids, token_type_ids, cu, word, pos, type_, gamma, beta, float(eps),
                           out, _threads(threads))
    return out


def varlen_attention(qkv, cu, heads: int, scale: float | None = None, *, out=None,
                     threads=None) -> np.ndarray:
    """Non-causal self-attention of a ragged batch, float32 (total_tokens, hidden).

    qkv: (total_tokens, 3 * hidden) float32, the fused projection output
    ``[Q | K | V]`` (head h of Q at columns ``h*D:(h+1)*D``, K and V ``hidden``
    and ``2*hidden`` further), any row stride. cu: (batch + 1,) offsets
    (``cu_seqlens``): a token attends to the tokens of its own sequence only.
    heads must divide hidden; ``D = hidden // heads <= 256``. scale defaults to
    ``1/sqrt(D)``. The context is written as (tokens, heads * D), the layout the
    output projection reads. Softmax and accumulation in fp32.
    """
    qkv = _matrix("qkv", qkv)
    tokens, cols = qkv.shape
    if cols % 3:
        raise ValueError(f"qkv has {cols} columns, expected 3 * hidden")
    hidden = cols // 3
    if type(heads) is not int or heads < 1 or hidden % heads:
        raise ValueError(f"heads must be an int >= 1 dividing hidden = {hidden}, got {heads!r}")
    d = hidden // heads
    if d > 256:
        raise ValueError(f"head_dim {d} exceeds the supported 256")
    cu, _, _ = _offsets(cu, tokens)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = _out(out, (tokens, hidden))
    if np.shares_memory(out, qkv):
        raise ValueError("out overlaps qkv; pass a separate array")
    _core.varlen_attention(qkv, cu, heads, scale, out, _threads(threads))
    return out


def pool(x, cu, mode: str = "mean", normalize: bool = True, *, out=None,
         threads=None) -> np.ndarray:
    """Per-sequence pooling of a ragged batch, float32 (batch, n).

    x: (total_tokens, n) float32; cu: (batch + 1,) offsets. mode "mean" (over the
    sequence's tokens), "cls" (its first token) or "max" (elementwise). With
    normalize, each row is divided by ``max(||row||_2, 1e-12)``
    (sentence-transformers). An empty sequence gives a zero row.
    """
    x = _matrix("x", x)
    code = _POOL_CODE.get(mode)
    if code is None:
        raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
    cu, batch, _ = _offsets(cu, x.shape[0])
    out = _out(out, (batch, x.shape[1]))
    if np.shares_memory(out, x):
        raise ValueError("out overlaps x; pass a separate array")
    _core.pool(x, cu, code, bool(normalize), out, _threads(threads))
    return out


def encoder_layer_scratch(tokens: int, hidden: int, intermediate: int,
                          threads=None) -> np.ndarray:
    """The float32 scratch ``encoder_layer`` needs for a batch of ``tokens``
    tokens at ``threads`` (the same value as the layer calls'): the QKV output,
    the attention context and each worker's chunk buffers (encoder.h). Allocate
    it once per forward and pass it to every layer."""
    n = _core.encoder_layer_scratch(int(tokens), int(hidden), int(intermediate),
                                    _threads(threads))
    return np.empty(n, dtype=_F32)


def encoder_layer(x, cu, heads: int, qkv, qkv_bias, out, out_bias, ln1, up, up_bias, down,
                  down_bias, ln2, *, eps: float = 1e-12, activation: str = "gelu",
                  scale: float | None = None, variant: str = "auto", threads=None,
                  scratch=None) -> np.ndarray:
    """One post-LayerNorm BERT encoder layer on a ragged batch, in place on ``x``.

    ``x = LN1(attn(x) Wo + bo + x)``, then ``x = LN2(act(x Wu + bu) Wd + bd + x)``
    with ``attn`` the non-causal self-attention of each sequence (``cu``) over
    the fused projection ``x Wqkv + bqkv`` (``varlen_attention``). One call into
    C++ with the GIL released: the QKV projection and the attention run on the
    whole batch, then out-proj, add+LN, FFN up (+activation), FFN down and
    add+LN run per chunk of rows while the chunk is still in cache.

    x: (tokens, H) float32, overwritten with the layer's output (and returned).
    qkv, out, up, down: PackedWeight of shapes (H, 3H), (H, H), (H, F), (F, H),
    each in its own precision; the biases (n,) float32; ln1, ln2: (gamma, beta)
    of shape (H,). activation: the FFN's ("gelu", "gelu_tanh", "relu", "silu").
    variant: "auto" picks latency or throughput kernels by each GEMM's rows
    (the size rule of ``linear`` without a policy), or forces one. scratch:
    ``encoder_layer_scratch(tokens, H, F, threads)`` or None (allocated here).
    """
    x = _matrix("x", x)
    if not x.flags.writeable:
        raise ValueError("x is read-only; the layer writes its output into x")
    tokens, hidden = x.shape
    if type(heads) is not int or heads < 1 or hidden % heads:
        raise ValueError(f"heads must be an int >= 1 dividing hidden = {hidden}, got {heads!r}")
    for name, w in (("qkv", qkv), ("out", out), ("up", up), ("down", down)):
        if type(w) is not PackedWeight:
            raise TypeError(f"{name} must be a PackedWeight (pykernels.pack), got "
                            f"{type(w).__name__}")
    act = _ACTIVATION.get(activation) if isinstance(activation, str) else None
    if act is None:
        raise ValueError(f"activation must be one of {tuple(k for k in _ACTIVATION if k)}, "
                         f"got {activation!r}")
    code = _VARIANT.get(variant)
    if code is None:
        raise ValueError(f"variant must be one of {tuple(_VARIANT)}, got {variant!r}")
    if any(w.precision == "bf16" for w in (qkv, out, up, down)) and _bf16_scheme["pending"]:
        _resolve_bf16()  # set_bf16_scheme("auto") is decided at the first bf16 call, here too
    th = _threads(threads)
    scale = 1.0 / math.sqrt(hidden // heads) if scale is None else float(scale)
    if scratch is None:
        scratch = encoder_layer_scratch(tokens, hidden, up.shape[1], threads)
    cu = _int64("cu_seqlens", cu)
    _core.encoder_layer(x, cu, heads, scale, float(eps), act, code, th, scratch,
                        qkv, qkv_bias, out, out_bias, ln1[0], ln1[1], up, up_bias, down,
                        down_bias, ln2[0], ln2[1])
    return x
