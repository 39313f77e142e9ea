"""Attention (prefill) and decode attention: one call into C++.

This layer parses ``variant`` and ``threads``, normalizes the small integer
arrays (``kv_lens``, ``block_table``) and handles an ``out`` that overlaps an
input; the array checks run in the binding (docs/kernels.md).
"""
from __future__ import annotations

import numpy as np

from . import _bf16, _chooser, _core, _interop
from ._gemm import _AUTO, _VARIANT, VARIANTS, _bad_choice, _check_threads, policy_variant

_ND = np.ndarray
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)


def __getattr__(name: str):
    # BFLOAT16 (np.dtype(ml_dtypes.bfloat16)) on first access: see pykernels._bf16
    if name == "BFLOAT16":
        try:
            return _bf16.bf16_dtype()
        except ImportError:  # pragma: no cover - a declared dependency
            return None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _precision(arr) -> str:
    return "bf16" if _bf16.is_bf16(getattr(arr, "dtype", None)) else "fp32"


def _variant_code(variant: str):
    code = _VARIANT.get(variant)
    if code is None:
        raise _bad_choice("variant", variant, VARIANTS)
    return code


def _index_array(name: str, x, dtype, ndim: int):
    """``kv_lens`` / ``block_table`` as an aligned C-contiguous array of
    ``dtype`` (copied only when it is not one already: these are a few
    integers; the kernels read them through int32/int64 pointers, so an array
    at an odd byte address is copied too)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} has dtype {x.dtype}, expected integers; "
                            f"convert with {name}.astype(np.{dtype.name})")
        if (x.dtype in (_I32, _I64) and x.flags.c_contiguous and x.flags.aligned
                and (ndim == 1 or x.dtype == dtype)):
            return x
    else:
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    info = np.iinfo(dtype)
    if x.size and (x.min() < info.min or x.max() > info.max):
        bad = x.min() if x.min() < info.min else x.max()
        raise ValueError(f"{name} holds {bad}, outside the {dtype.name} range")
    return np.require(x, dtype=dtype, requirements=("C", "A"))


def attention(q, k, v, *, causal: bool = False, kv_lens=None, scale=None, out=None,
              variant: str = "auto", threads=None):
    """Scaled dot-product attention, float32 result of shape (B, Hq, Sq, D).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Skv, D) with ``Hq % Hkv == 0`` (grouped-query
    attention: query head h uses KV head ``h // (Hq // Hkv)``). float32 or
    ``ml_dtypes.bfloat16`` (q and k/v may differ; k and v share one dtype), any
    strides with unit stride along D. Softmax and accumulation are fp32.

    scale: defaults to ``1/sqrt(D)``. kv_lens: (B,) integers; keys at positions
    ``>= kv_lens[b]`` are masked (padding) and never read. causal: query row i sees
    keys ``j <= i + L_b - Sq`` with ``L_b = kv_lens[b]`` (or Skv), i.e. the
    queries are the last Sq positions (chunked prefill). A row that sees no key
    returns zeros.

    variant: "latency" (split the KV length across threads, merge by log-sum-exp),
    "throughput" (one task per batch item, KV head and query tile, online
    softmax) or "auto" (the active policy, else latency when ``Sq * Hq / Hkv <=
    16``). threads: an int >= 1, or None for the default (one thread for tiny
    problems).
    """
    if (type(q) is not _ND or type(k) is not _ND or type(v) is not _ND
            or (out is not None and type(out) is not _ND)
            or (kv_lens is not None and type(kv_lens) is not _ND)):
        (q2, k2, v2, l2), out2, finish = _interop.adapt(
            ("q", "k", "v", "kv_lens"), (q, k, v, kv_lens), out, ints=("kv_lens",))
        if q2 is not q or k2 is not k or v2 is not v or l2 is not kv_lens or out2 is not out:
            return finish(attention(q2, k2, v2, causal=causal, kv_lens=l2, scale=scale,
                                    out=out2, variant=variant, threads=threads))
    code = _variant_code(variant)
    threads = 0 if threads is None else _check_threads(threads)
    if code is _AUTO and _chooser.active is not None:
        code, threads = _auto_attention(q, k, causal, threads)
    if kv_lens is not None:
        kv_lens = _index_array("kv_lens", kv_lens, _I64, 1)
    _bf16.sync()  # the binding knows bf16 only once registered
    res = _core.attention(q, k, v, kv_lens, out, scale, bool(causal), code, threads)
    if res is None:  # out overlaps an input: compute into a temporary, then copy
        tmp = np.empty(out.shape, dtype=np.float32)
        _core.attention(q, k, v, kv_lens, tmp, scale, bool(causal), code, threads)
        out[...] = tmp
        return out
    return res


def decode_attention(q, k_cache, v_cache, kv_lens, *, block_table=None, scale=None, out=None,
                     variant: str = "auto", threads=None):
    """Attention of one new query token per sequence over a KV cache.

    q: (B, Hq, D). Contiguous cache: k_cache, v_cache (B, Hkv, S_max, D). Paged
    cache (as in vLLM): (num_blocks, Hkv, block_size, D) with ``block_table``
    (B, max_blocks) int32 mapping sequence b's logical block i to a physical
    block. kv_lens: (B,) integers, the number of cached tokens of each sequence
    (keys ``>= kv_lens[b]`` are not read; None means S_max for a contiguous
    cache). Every block id covering ``[0, kv_lens[b])`` is checked before any
    read: an out-of-range id raises ValueError. float32 or bfloat16 caches;
    float32 result of shape (B, Hq, D).

    variant: "latency" splits each sequence's KV length across threads
    (flash-decoding), "throughput" runs one task per (batch item, KV head),
    "auto" asks the active policy, else latency when ``Hq / Hkv <= 16``.
    """
    if (type(q) is not _ND or type(k_cache) is not _ND or type(v_cache) is not _ND
            or (out is not None and type(out) is not _ND)
            or (kv_lens is not None and type(kv_lens) is not _ND)
            or (block_table is not None and type(block_table) is not _ND)):
        (q2, k2, v2, l2, t2), out2, finish = _interop.adapt(
            ("q", "k_cache", "v_cache", "kv_lens", "block_table"),
            (q, k_cache, v_cache, kv_lens, block_table), out, ints=("kv_lens", "block_table"))
        if (q2 is not q or k2 is not k_cache or v2 is not v_cache or l2 is not kv_lens
                or t2 is not block_table or out2 is not out):
            return finish(decode_attention(q2, k2, v2, l2, block_table=t2, scale=scale,
                                           out=out2, variant=variant, threads=threads))
    code = _variant_code(variant)
    threads = 0 if threads is None else _check_threads(threads)
    if code is _AUTO and _chooser.active is not None:
        code, threads = _auto_decode(q, k_cache, kv_lens, threads)
    if kv_lens is not None:
        kv_lens = _index_array("kv_lens", kv_lens, _I64, 1)
    if block_table is not None:
        block_table = _index_array("block_table", block_table, _I32, 2)
    _bf16.sync()  # the binding knows bf16 only once registered
    res = _core.decode_attention(q, k_cache, v_cache, kv_lens, block_table, out, scale, code,
                                 threads)
    if res is None:
        tmp = np.empty(out.shape, dtype=np.float32)
        _core.decode_attention(q, k_cache, v_cache, kv_lens, block_table, tmp, scale, code,
                               threads)
        out[...] = tmp
        return out
    return res


# ---- variant="auto" under an active policy -------------------------------------
# The chooser (pykernels._chooser) sees the attention geometry as fields of a
# KernelCall: batch, heads, lengths, head dim and causality, nothing flattened.

def _auto_attention(q, k, causal, threads: int):
    qs, ks = getattr(q, "shape", ()), getattr(k, "shape", ())
    if len(qs) != 4 or len(ks) != 4:
        return _AUTO, threads  # the binding raises the precise error
    return policy_variant(dict(op="attention", precision=_precision(k), batch=qs[0], q_heads=qs[1],
                               kv_heads=ks[1], q_len=qs[2], kv_len=ks[2], head_dim=qs[3],
                               causal=bool(causal)), threads)


def _auto_decode(q, k_cache, kv_lens, threads: int):
    qs, ks = getattr(q, "shape", ()), getattr(k_cache, "shape", ())
    if len(qs) != 3 or len(ks) != 4:
        return _AUTO, threads
    try:
        n = int(np.max(kv_lens)) if kv_lens is not None and np.size(kv_lens) else ks[2]
    except (TypeError, ValueError):
        return _AUTO, threads
    return policy_variant(dict(op="decode_attention", precision=_precision(k_cache), batch=qs[0],
                               q_heads=qs[1], kv_heads=ks[1], q_len=1, kv_len=n, head_dim=qs[2]),
                          threads)
