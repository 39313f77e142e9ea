"""Float64 references for pykernels' kernels: the one oracle the tests, the
benchmarks and ``pykernels bench`` check results against.

* ``gemm_reference64``: ``alpha a @ b + beta c0`` in float64 with the error
  magnitude; ``linear_reference64``: ``act(x @ w + b)`` in float64 (a GEMM
  is the case without bias and activation); ``act64`` the activations.
* ``attention_reference64``: softmax(scale q k^T) v in float64 with the
  magnitudes an error bound is proportional to; ``attention_ref64`` the same
  output computed one (batch item, KV head) at a time for large caches.
* ``bf16_round`` and ``quantize_rows``: the library's input roundings (bf16
  nearest-even, symmetric int8 per row), so a reference can be taken on the
  values the kernel actually sees.
* ``rel_error``: relative Frobenius error against a float64 reference.
* ``bert_forward64``: a BERT encoder's sentence embeddings in float64 from the
  checkpoint's float32 tensors (Hugging Face names), one sequence at a time.

Contract: pure functions of their arguments, float64 results; this module
imports NumPy, ml_dtypes (at the first bf16 use, through pykernels._bf16) and
nothing above the kernel layer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ._bf16 import bf16_dtype

F32 = np.float32
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# math.erf per element: the C library's double erf, without a SciPy dependency.
_erf = np.frompyfunc(math.erf, 1, 1)

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def act64(act: Optional[str], z) -> np.ndarray:
    """The activation ``act`` (None, "relu", "gelu" (erf form), "gelu_tanh",
    "silu") applied to ``z`` in float64. NaN stays NaN; overflow gives the
    IEEE limit without a warning."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if act is None:
            return z
        if act == "relu":
            return np.maximum(z, 0.0)
        if act == "gelu":
            return 0.5 * z * (1.0 + np.asarray(_erf(z / math.sqrt(2.0)), dtype=np.float64))
        if act == "gelu_tanh":
            return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)))
        if act == "silu":
            return z / (1.0 + np.exp(-z))
    raise ValueError(f"no float64 reference for activation {act!r}; "
                     f"expected one of {ACTIVATIONS}")


def gemm_reference64(a, b, alpha: float = 1.0, beta: float = 0.0, c0=None):
    """``alpha * a @ b + beta * c0`` in float64, and the error magnitude.

    Returns (ref, mag) with mag = |alpha| * (|a| @ |b|) + |beta| * |c0|: the sum of
    the absolute values of every term the kernel adds up, which is what fp32
    rounding errors are proportional to.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    ref = alpha * (a64 @ b64)
    mag = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if beta != 0.0 and c0 is not None:
        c64 = np.asarray(c0, dtype=np.float64)
        ref = ref + beta * c64
        mag = mag + abs(beta) * np.abs(c64)
    return ref, mag


def linear_reference64(x, w, bias=None, activation: Optional[str] = None) -> np.ndarray:
    """``activation(x @ w + bias)`` in float64: x (M, K), w (K, N), bias (N,) or
    None. With no bias and no activation it is the GEMM reference ``a @ b``."""
    z = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64)
    if bias is not None:
        z += np.asarray(bias, dtype=np.float64)
    return act64(activation, z)


def rel_error(got, ref64) -> float:
    """Relative Frobenius error ``|got - ref| / |ref|`` (the absolute error when
    ``ref`` is zero)."""
    got = np.asarray(got, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    denom = float(np.linalg.norm(ref64))
    diff = float(np.linalg.norm(got - ref64))
    return diff / denom if denom else diff


def bf16_round(a) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even), back in float32."""
    return np.asarray(a, dtype=F32).astype(bf16_dtype()).astype(F32)


def quantize_rows(v, qmax: int = 127):
    """Symmetric int8 per row of ``v`` (float32), with the library's arithmetic
    (csrc/kernels/common/quantize.inc, for activations and weights alike): the
    float32 max, inv = qmax / max in double rounded to float32, then
    rint(v * inv) in float32 (round half to even). A row whose inv overflows
    float32 (max < ~3.7e-37) keeps the double inv and product. Values clipped
    to [-qmax, qmax]. Returns (int values as int64, float32 scales max / qmax);
    non-finite values quantize to 0."""
    v = np.asarray(v, dtype=F32)
    amax = (np.max(np.abs(v), axis=1) if v.shape[1] else np.zeros(v.shape[0], F32)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv64 = np.where(amax > 0, float(qmax) / amax.astype(np.float64), 0.0)
        fits = inv64 <= np.finfo(F32).max
        inv32 = np.where(fits, inv64, 0.0).astype(F32)
        q32 = np.rint(v * inv32[:, None]).astype(np.float64)         # float32 product
        q64 = np.rint(v.astype(np.float64) * inv64[:, None])
        q = np.clip(np.where(fits[:, None], q32, q64), -qmax, qmax)
    return np.nan_to_num(q).astype(np.int64), (amax / F32(qmax)).astype(F32)


def attention_reference64(q, k, v, *, causal: bool = False,
                          kv_lens: Optional[Sequence[int]] = None, scale=None):
    """float64 attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Skv, D), Hq a
    multiple of Hkv (grouped heads). Returns (out, mag, amax, nvis):

    out = softmax(scale q k^T) v over the visible keys (key j < kv_lens[b]; with
    ``causal`` also j <= i + kv_lens[b] - Sq), zero for a row that sees no key;
    mag = sum_j w_j |v_j| per output element, amax = max over visible keys of
    |scale| * sum_d |q_d k_jd| per row, nvis = visible keys per row: what the
    rounding error of an fp32 kernel is proportional to.
    """
    q64, k64, v64 = (np.asarray(t).astype(np.float64) for t in (q, k, v))
    b, hq, sq, d = q64.shape
    hkv, skv = k64.shape[1], k64.shape[2]
    g = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    kx, vx = np.repeat(k64, g, axis=1), np.repeat(v64, g, axis=1)
    kt = np.swapaxes(kx, -1, -2)
    s = scale * (q64 @ kt)
    a = abs(scale) * (np.abs(q64) @ np.abs(kt))
    lens = np.full(b, skv) if kv_lens is None else np.asarray(kv_lens, dtype=np.int64)
    j = np.arange(skv)[None, None, :]
    i = np.arange(sq)[None, :, None]
    mask = j < lens[:, None, None]
    if causal:
        mask = mask & (j <= i + lens[:, None, None] - sq)
    mask = mask[:, None]  # (B, 1, Sq, Skv)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if skv else np.zeros(s.shape[:-1] + (1,))
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    w = np.where(den > 0, p / np.where(den > 0, den, 1.0), 0.0)
    out = w @ vx
    mag = w @ np.abs(vx)
    amax = np.where(mask, a, 0.0).max(axis=-1, keepdims=True) if skv else np.zeros_like(m)
    nvis = mask.sum(axis=-1, keepdims=True)
    return out, mag, amax, nvis


def attention_ref64(q, k, v, *, causal: bool = False, kv_lens=None) -> np.ndarray:
    """The output of ``attention_reference64`` (default scale), computed one
    (batch item, KV head) at a time so the largest caches (GiBs of K/V) need
    no float64 copy of the whole cache."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    out = np.zeros((b, hq, sq, d))
    for bi in range(b):
        n = skv if kv_lens is None else int(kv_lens[bi])
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            out[bi, heads] = attention_reference64(
                q[bi:bi + 1, heads], k[bi:bi + 1, h:h + 1, :n], v[bi:bi + 1, h:h + 1, :n],
                causal=causal)[0][0]
    return out


def bert_forward64(tensors: dict, ids, cu, *, heads: int, eps: float = 1e-12,
                   activation: str = "gelu", pooling: str = "mean",
                   normalize: bool = True) -> np.ndarray:
    """Sentence embeddings (batch, hidden) of a BERT encoder in float64.

    tensors: the checkpoint's tensors by Hugging Face name without a model
    prefix (``embeddings.word_embeddings.weight``, ``encoder.layer.{i}.
    attention.self.query.weight``, ...; torch Linear weights (out, in)); the
    layer count is read from the names. ids: (total_tokens,) token ids of a
    packed batch, sequence b in ``ids[cu[b]:cu[b + 1]]``; token type 0,
    positions from 0 per sequence. activation: "gelu" (erf), "gelu_tanh" or
    another ``act64`` name. pooling: "mean", "cls" or "max" over the
    sequence's tokens; normalize divides by ``max(||row||, 1e-12)``. The
    oracle of ``models.bert`` (no packing, no quantization, no padding).
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    ids = np.asarray(ids, dtype=np.int64)
    cu = np.asarray(cu, dtype=np.int64)
    layers = 0
    while f"encoder.layer.{layers}.attention.self.query.weight" in w:
        layers += 1

    def ln(x, name):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    h = w["embeddings.word_embeddings.weight"].shape[1]
    d = h // heads
    out = np.zeros((cu.size - 1, h))
    for b in range(cu.size - 1):
        seq = ids[cu[b]:cu[b + 1]]
        n = seq.size
        if n == 0:
            continue
        x = (w["embeddings.word_embeddings.weight"][seq]
             + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = ln(x, "embeddings.LayerNorm")
        for i in range(layers):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(n, h)
            x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            u = act64(activation, lin(x, p + "intermediate.dense"))
            x = ln(lin(u, p + "output.dense") + x, p + "output.LayerNorm")
        if pooling == "mean":
            e = x.mean(axis=0)
        elif pooling == "cls":
            e = x[0]
        elif pooling == "max":
            e = x.max(axis=0)
        else:
            raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")
        out[b] = e / max(float(np.linalg.norm(e)), 1e-12) if normalize else e
    return out
