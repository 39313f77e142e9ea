"""The encoder-layer kernels (pykernels._encoder) against float64 NumPy references.

Ragged batches (lengths 1..200, a length-1 sequence, an empty one, one
sequence, 64 sequences), on every ISA the machine has (the others in a
subprocess with PYKERNELS_ISA), 1 and 2 threads; inputs never modified; in-place
LayerNorm; bad inputs raise with a message. Tolerances are derived next to each
reference (fp32: eps = 2^-23; errors of independent roundings grow like sqrt(K)).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import (EPS32, assert_batch_passed, check_items, current_isa, run_batch_items,
                      run_call_under_isa, supported_isas, ISA_ORDER)

import pykernels._encoder as enc

LENGTH_SETS = {
    "one-token": [1],
    "one-seq-133": [133],
    "mixed": [1, 200, 5, 17, 64, 65],
    "with-empty": [3, 0, 5],
    "64-seqs": None,  # drawn below: 64 lengths in 1..200 including a 1
}


def lengths_for(name: str) -> list:
    if LENGTH_SETS[name] is not None:
        return LENGTH_SETS[name]
    rng = np.random.default_rng(64)
    lens = rng.integers(1, 201, size=64)
    lens[7] = 1
    lens[20] = 200
    return [int(x) for x in lens]


def _c(isa: str) -> float:
    """Roundings per multiply-add: 1 with FMA, 2 on the generic path (a*b + c
    rounded twice)."""
    return 2.0 if isa == "generic" else 1.0


# ---------------------------------------------------------------------------
# References and tolerances
# ---------------------------------------------------------------------------

def ln_reference(v64, gamma, beta, eps):
    """LayerNorm in float64 of the exact sum v64; returns (y, |d| * rstd, rstd, mean|v|)."""
    mean = v64.mean(axis=1, keepdims=True)
    d = v64 - mean
    rstd = 1.0 / np.sqrt((d * d).mean(axis=1, keepdims=True) + eps)
    g = gamma.astype(np.float64)
    return d * rstd * g + beta, np.abs(d) * rstd, rstd, np.abs(v64).mean(axis=1, keepdims=True)


def ln_tolerance(vmag, xhat_abs, rstd, mean_abs, gamma, beta, n, isa):
    """|y - ref| for y = (v - mean) * rstd * gamma + beta computed in fp32 from
    inputs whose fp32 sum v carries a rounding of eps * vmag (vmag = sum of the
    absolute terms added into v):
      * centred value d = v - mean: eps * vmag (the sum) + the mean's error,
        a sum of n terms in vector lanes, sqrt(n) * eps * mean|v| (random walk),
        + eps * |d| (the subtraction);
      * rstd: the variance is a sum of n squares, relative error ~ 2 sqrt(n) eps,
        plus the mean's error entering every d; rstd inherits half, +2 eps
        (sqrt, division);
      * the final fma and the beta add: 2 eps * (|gamma xhat| + |beta|).
    Each term with the ISA's roundings per multiply-add (c), times 2 for the
    constants this sketch drops."""
    c = _c(isa)
    g = np.abs(gamma.astype(np.float64))
    s = math.sqrt(n)
    bound = (g * rstd * (vmag + c * s * mean_abs)
             + g * xhat_abs * (c * s + 4.0)
             + 2.0 * np.abs(beta))
    return 2.0 * EPS32 * bound + 1e-30


def attention_reference(qkv, lens, heads):
    """Per sequence and head: softmax(q k^T / sqrt(D)) v in float64, and the
    error scale of each output (see attention_tolerance)."""
    tokens, cols = qkv.shape
    hidden = cols // 3
    d = hidden // heads
    q64 = qkv.astype(np.float64)
    out = np.zeros((tokens, hidden))
    tol = np.zeros((tokens, hidden))
    start = 0
    scale = 1.0 / math.sqrt(d)
    for ln in lens:
        sl = slice(start, start + ln)
        start += ln
        if ln == 0:
            continue
        for h in range(heads):
            q = q64[sl, h * d:(h + 1) * d]
            k = q64[sl, hidden + h * d:hidden + (h + 1) * d]
            v = q64[sl, 2 * hidden + h * d:2 * hidden + (h + 1) * d]
            s = q @ k.T * scale
            smag = np.abs(q) @ np.abs(k).T * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[sl, h * d:(h + 1) * d] = p @ v
            # Logit error: a D-term fp32 dot (sqrt(D) eps random walk) plus the
            # rounding of scale * log2(e) into Q (2 eps |s|): a weight p_j moves by
            # a relative 2 * max_j |ds_j| (numerator and the normalizer's mean).
            ds = (math.sqrt(d) + 2.0) * EPS32 * smag.max(axis=1, keepdims=True)
            # exp2 polynomial: relative 2e-7 (test_attention's measured 1.9e-7);
            # the running sum l and P.V: sqrt(L) eps each.
            rel = 2.0 * ds + 4e-7 + 2.0 * math.sqrt(ln) * EPS32
            tol[sl, h * d:(h + 1) * d] = rel * (p @ np.abs(v))
    return out, tol


def pool_reference(x, lens, mode, normalize):
    """(out, tol). Mean: a sequential fp32 sum of L rows errs by at most
    (L - 1) eps sum|x| (Higham's gamma_{L-1}, worst case: the rows are added one
    by one into the output row) and the 1/L scaling adds eps; cls/max are
    exact. Normalization: the squared norm is an n-term fp32 sum (sqrt(n) eps
    random walk), the scale one more rounding."""
    n = x.shape[1]
    x64 = x.astype(np.float64)
    out = np.zeros((len(lens), n))
    tol = np.zeros((len(lens), n))
    start = 0
    for b, ln in enumerate(lens):
        rows = x64[start:start + ln]
        start += ln
        if ln == 0:
            continue
        if mode == "mean":
            out[b] = rows.mean(axis=0)
            tol[b] = (ln + 1) * EPS32 * np.abs(rows).mean(axis=0)
        elif mode == "cls":
            out[b] = rows[0]
        else:
            out[b] = rows.max(axis=0)
        if normalize:
            nrm = max(np.linalg.norm(out[b]), 1e-12)
            out[b] /= nrm
            tol[b] = tol[b] / nrm + (2 * math.sqrt(n) + 4) * EPS32 * np.abs(out[b])
    return out, tol + 1e-30


def mismatch(got, ref, tol):
    if got.dtype != np.float32 or got.shape != ref.shape:
        return f"got {got.dtype} {got.shape}, expected float32 {ref.shape}"
    err = np.abs(got.astype(np.float64) - ref)
    bad = ~(err <= tol)
    if not bad.any():
        return None
    i = np.unravel_index(int(np.argmax(np.where(bad, err / tol, -1))), got.shape)
    return (f"{int(bad.sum())}/{got.size} out of tolerance; worst at {i}: got {got[i]!r}, "
            f"expected {ref[i]!r}, |err| {err[i]:.3g} > tol {tol[i]:.3g}")


_SNAPSHOTS: list = []


def frozen(*arrays):
    """Read-only copies, remembered with a snapshot: NumPy's writeable flag stops
    only NumPy writes (C++ writes through the pointer), so assert_unchanged()
    compares each input with its snapshot after the kernels ran."""
    out = []
    for a in arrays:
        a = a.copy()
        a.flags.writeable = False
        _SNAPSHOTS.append((a, a.copy()))
        out.append(a)
    return out


def assert_unchanged():
    try:
        for a, snap in _SNAPSHOTS:
            assert np.array_equal(a, snap, equal_nan=True), "a kernel modified an input"
    finally:
        _SNAPSHOTS.clear()


# ---------------------------------------------------------------------------
# Cases: one function per kernel, run on each ISA
# ---------------------------------------------------------------------------

def check_add_layer_norm(isa, lens_name, n, threads):
    rng = np.random.default_rng(n + threads)
    tokens = sum(lengths_for(lens_name))
    # An offset of 3 in x makes the mean matter (catastrophic cancellation if
    # the variance were E[v^2] - mean^2).
    x, r = frozen(rng.standard_normal((tokens, n)).astype(np.float32) + 3.0,
                  rng.standard_normal((tokens, n)).astype(np.float32))
    gamma, beta = frozen(rng.uniform(0.5, 1.5, n).astype(np.float32),
                         rng.standard_normal(n).astype(np.float32))
    v64 = x.astype(np.float64) + r
    ref, xhat, rstd, mabs = ln_reference(v64, gamma, beta, 1e-12)
    tol = ln_tolerance(np.abs(v64), xhat, rstd, mabs, gamma, beta, n, isa)
    got = enc.add_layer_norm(x, r, gamma, beta, 1e-12, threads=threads)
    assert (msg := mismatch(got, ref, tol)) is None, msg
    # in place: out=x, with a strided x (every other row of a bigger buffer)
    buf = np.zeros((2 * tokens, n + 3), dtype=np.float32)
    xs = buf[::2, 1:n + 1]
    xs[...] = x
    enc.add_layer_norm(xs, r, gamma, beta, 1e-12, out=xs, threads=threads)
    assert np.array_equal(xs, got), "in-place result differs from out-of-place"
    assert not buf[1::2].any() and not buf[:, 0].any() and not buf[:, n + 1:].any(), \
        "wrote outside the view"
    # no residual: plain LayerNorm
    ref0, xhat0, rstd0, mabs0 = ln_reference(x.astype(np.float64), gamma, beta, 1e-12)
    tol0 = ln_tolerance(np.abs(x.astype(np.float64)), xhat0, rstd0, mabs0, gamma, beta, n, isa)
    got0 = enc.add_layer_norm(x, None, gamma, beta, 1e-12, threads=threads)
    assert (msg := mismatch(got0, ref0, tol0)) is None, "no residual: " + msg
    assert_unchanged()


def check_embed(isa, lens_name, n, threads):
    rng = np.random.default_rng(7 * n + threads)
    lens = lengths_for(lens_name)
    tokens = sum(lens)
    vocab, max_pos = 1000, 256
    word, pos, typ = frozen(rng.standard_normal((vocab, n)).astype(np.float32),
                            rng.standard_normal((max_pos, n)).astype(np.float32) * 0.1,
                            rng.standard_normal((2, n)).astype(np.float32) * 0.1)
    gamma, beta = frozen(rng.uniform(0.5, 1.5, n).astype(np.float32),
                         rng.standard_normal(n).astype(np.float32))
    ids = rng.integers(0, vocab, tokens)
    tt = rng.integers(0, 2, tokens)
    cu = enc.cu_seqlens(lens)
    ids.flags.writeable = False
    _SNAPSHOTS.append((ids, ids.copy()))
    positions = np.concatenate([np.arange(ln) for ln in lens]).astype(np.int64) if tokens else \
        np.zeros(0, dtype=np.int64)
    for types in (None, tt):
        trow = typ[0 if types is None else types].astype(np.float64)
        if types is None:
            trow = np.broadcast_to(trow, (tokens, n))
        terms = (word[ids].astype(np.float64), pos[positions].astype(np.float64), trow)
        v64 = terms[0] + terms[1] + terms[2]
        ref, xhat, rstd, mabs = ln_reference(v64, gamma, beta, 1e-12)
        # two fp32 additions build v: 2 eps of the summed magnitudes
        vmag = 2.0 * (np.abs(terms[0]) + np.abs(terms[1]) + np.abs(terms[2]))
        tol = ln_tolerance(vmag, xhat, rstd, mabs, gamma, beta, n, isa)
        got = enc.embed_layer_norm(ids, cu, word, pos, typ, gamma, beta, 1e-12,
                                   token_type_ids=types, threads=threads)
        assert (msg := mismatch(got, ref, tol)) is None, f"types={types is not None}: {msg}"
    assert_unchanged()


def check_attention(isa, lens_name, heads, d, threads):
    rng = np.random.default_rng(heads * d + threads)
    lens = lengths_for(lens_name)
    tokens, hidden = sum(lens), heads * d
    # qkv as a strided view: rows of a wider buffer (row stride 3H + 5).
    buf = rng.standard_normal((tokens, 3 * hidden + 5)).astype(np.float32)
    qkv = buf[:, 2:3 * hidden + 2]
    qkv.flags.writeable = False
    before = qkv.copy()
    ref, tol = attention_reference(qkv, lens, heads)
    got = enc.varlen_attention(qkv, enc.cu_seqlens(lens), heads, threads=threads)
    assert (msg := mismatch(got, ref, tol + 1e-30)) is None, msg
    assert np.array_equal(qkv, before)


def check_pool(isa, lens_name, n, threads):
    rng = np.random.default_rng(3 * n + threads)
    lens = lengths_for(lens_name)
    (x,) = frozen(rng.standard_normal((sum(lens), n)).astype(np.float32) + 0.5)
    cu = enc.cu_seqlens(lens)
    for mode in enc.POOL_MODES:
        for normalize in (False, True):
            ref, tol = pool_reference(x, lens, mode, normalize)
            if mode != "mean" and not normalize:
                tol = np.zeros_like(tol)  # a copy or a max: exact
            got = enc.pool(x, cu, mode, normalize, threads=threads)
            assert (msg := mismatch(got, ref, tol)) is None, f"{mode} {normalize}: {msg}"
    assert_unchanged()


def isa_checks():
    for lname in LENGTH_SETS:
        for threads in (1, 2):
            for n in (384, 37):
                yield (f"add_ln-{lname}-n{n}-t{threads}",
                       lambda isa, a=(lname, n, threads): check_add_layer_norm(isa, *a))
                yield (f"embed-{lname}-n{n}-t{threads}",
                       lambda isa, a=(lname, n, threads): check_embed(isa, *a))
                yield (f"pool-{lname}-n{n}-t{threads}",
                       lambda isa, a=(lname, n, threads): check_pool(isa, *a))
            for heads, d in ((12, 32), (3, 20), (2, 64)):
                if lname == "64-seqs" and (heads, d) != (12, 32):
                    continue
                yield (f"attn-{lname}-h{heads}d{d}-t{threads}",
                       lambda isa, a=(lname, heads, d, threads): check_attention(isa, *a))


def isa_batch(isa: str) -> dict:
    return run_batch_items(check_items(isa_checks()), isa, {})


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_isa(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU supports up to {supported_isas()[-1]!r}")
    res = (isa_batch(isa) if isa == current_isa()
           else run_call_under_isa(isa, "test_encoder_kernels",
                                   f"test_encoder_kernels.isa_batch({isa!r})"))
    assert_batch_passed(res, isa, "encoder")


# ---------------------------------------------------------------------------
# In-process: aliasing, threads, errors
# ---------------------------------------------------------------------------

def test_layer_norm_out_may_be_residual():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 384)).astype(np.float32)
    r = rng.standard_normal((9, 384)).astype(np.float32)
    g, b = np.ones(384, np.float32), np.zeros(384, np.float32)
    want = enc.add_layer_norm(x, r, g, b)
    enc.add_layer_norm(x, r, g, b, out=r)
    assert np.array_equal(r, want)


def test_threads_agree():
    """1 and 2 threads split rows / tasks, never a reduction: bit-identical."""
    rng = np.random.default_rng(2)
    lens = lengths_for("64-seqs")
    cu = enc.cu_seqlens(lens)
    qkv = rng.standard_normal((sum(lens), 1152)).astype(np.float32)
    a1 = enc.varlen_attention(qkv, cu, 12, threads=1)
    a2 = enc.varlen_attention(qkv, cu, 12, threads=2)
    assert np.array_equal(a1, a2)
    x = qkv[:, :384]
    g, b = np.ones(384, np.float32), np.zeros(384, np.float32)
    assert np.array_equal(enc.add_layer_norm(x, x, g, b, threads=1),
                          enc.add_layer_norm(x, x, g, b, threads=2))
    for mode in enc.POOL_MODES:
        assert np.array_equal(enc.pool(x, cu, mode, threads=1), enc.pool(x, cu, mode, threads=2))


def _ln_args(rows=4, n=8):
    return (np.zeros((rows, n), np.float32), np.zeros((rows, n), np.float32),
            np.ones(n, np.float32), np.zeros(n, np.float32))


BAD_CALLS = [
    ("ln-float64-x", lambda: enc.add_layer_norm(np.zeros((2, 8)), None, *_ln_args()[2:]),
     TypeError, "float32"),
    ("ln-residual-shape", lambda: enc.add_layer_norm(_ln_args()[0], np.zeros((3, 8), np.float32),
                                                     *_ln_args()[2:]), ValueError, "residual"),
    ("ln-gamma-len", lambda: enc.add_layer_norm(*_ln_args()[:2], np.ones(7, np.float32),
                                                _ln_args()[3]), ValueError, "gamma"),
    ("ln-column-stride", lambda: enc.add_layer_norm(np.zeros((4, 16), np.float32)[:, ::2], None,
                                                    *_ln_args()[2:]), ValueError, "unit stride"),
    ("ln-partial-overlap", lambda: (lambda buf: enc.add_layer_norm(
        buf[:4], None, *_ln_args()[2:], out=buf[1:5]))(np.zeros((5, 8), np.float32)),
     ValueError, "overlaps"),
    ("attn-heads", lambda: enc.varlen_attention(np.zeros((3, 30), np.float32), [0, 3], 3),
     ValueError, "divid"),
    ("attn-cols", lambda: enc.varlen_attention(np.zeros((3, 31), np.float32), [0, 3], 1),
     ValueError, r"3 \* hidden"),
    ("attn-cu-end", lambda: enc.varlen_attention(np.zeros((3, 6), np.float32), [0, 2], 1),
     ValueError, "number of tokens"),
    ("attn-cu-start", lambda: enc.varlen_attention(np.zeros((3, 6), np.float32), [1, 3], 1),
     ValueError, "must be 0"),
    ("attn-cu-decreasing", lambda: enc.varlen_attention(np.zeros((3, 6), np.float32), [0, 2, 1, 3],
                                                        1), ValueError, "non-decreasing"),
    ("attn-cu-float", lambda: enc.varlen_attention(np.zeros((3, 6), np.float32), [0.0, 3.0], 1),
     TypeError, "integers"),
    ("attn-out-overlap", lambda: (lambda q: enc.varlen_attention(q, [0, 3], 1, out=q[:, :2]))(
        np.zeros((3, 6), np.float32)), ValueError, "overlaps"),
    ("embed-id-range", lambda: enc.embed_layer_norm(
        [0, 5], [0, 2], np.zeros((5, 8), np.float32), np.zeros((4, 8), np.float32),
        np.zeros((1, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)),
     ValueError, "vocabulary"),
    ("embed-too-long", lambda: enc.embed_layer_norm(
        [0] * 5, [0, 5], np.zeros((5, 8), np.float32), np.zeros((4, 8), np.float32),
        np.zeros((1, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)),
     ValueError, "position"),
    ("embed-type-range", lambda: enc.embed_layer_norm(
        [0, 1], [0, 2], np.zeros((5, 8), np.float32), np.zeros((4, 8), np.float32),
        np.zeros((1, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32),
        token_type_ids=[0, 1]), ValueError, "token_type_ids"),
    ("pool-mode", lambda: enc.pool(np.zeros((3, 4), np.float32), [0, 3], "sum"),
     ValueError, "mode"),
    ("pool-out-shape", lambda: enc.pool(np.zeros((3, 4), np.float32), [0, 1, 3],
                                        out=np.zeros((3, 4), np.float32)), ValueError, "shape"),
    ("threads-zero", lambda: enc.pool(np.zeros((3, 4), np.float32), [0, 3], threads=0),
     ValueError, "threads"),
]


@pytest.mark.parametrize("call,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in BAD_CALLS])
def test_bad_input_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_binding_guards_memory_without_python_checks():
    """The binding re-checks what guards memory even when called directly."""
    from pykernels import _core

    qkv = np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError):
        _core.varlen_attention(qkv, np.array([0, 5], np.int64), 1, 1.0,
                               np.zeros((3, 2), np.float32), 1)
    word = np.zeros((5, 8), np.float32)
    with pytest.raises(ValueError):
        _core.embed_layer_norm(np.array([0, 9], np.int64), None, np.array([0, 2], np.int64), word,
                               np.zeros((4, 8), np.float32), np.zeros((1, 8), np.float32),
                               np.ones(8, np.float32), np.zeros(8, np.float32), 1e-12,
                               np.zeros((2, 8), np.float32), 1)


def test_empty_batch():
    x = np.zeros((0, 384), np.float32)
    assert enc.pool(x, [0]).shape == (0, 384)
    assert enc.varlen_attention(np.zeros((0, 1152), np.float32), [0, 0], 12).shape == (0, 384)
    g, b = np.ones(384, np.float32), np.zeros(384, np.float32)
    assert enc.add_layer_norm(x, x, g, b).shape == (0, 384)


# ---------------------------------------------------------------------------
# The AVX-512 units under SIMDe: the real encoder_avx512.cc and the varlen
# attention of attention_avx512.cc, on any x86-64, against the generic units
# ---------------------------------------------------------------------------

SIMDE_SOURCES = ["tests/native/encoder_avx512_simde.cc", "csrc/kernels/avx512/encoder_avx512.cc",
                 "csrc/kernels/avx512/attention_avx512.cc",
                 "csrc/kernels/reference/encoder_generic.cc",
                 "csrc/kernels/reference/attention_generic.cc",
                 "csrc/kernels/reference/gemm_generic.cc", "csrc/runtime/pack.cc",
                 "csrc/runtime/threadpool.cc", "csrc/runtime/workspace.cc", "csrc/runtime/cpu.cc"]
SIMDE_DEPS = ["tests/native/simde_shim/immintrin.h", "csrc/kernels/common/encoder_impl.inc",
              "csrc/kernels/common/attention_impl.inc", "csrc/kernels/common/attention_tiles.inc",
              "csrc/kernels/common/attention_varlen.inc",
              "csrc/kernels/avx512/vec_avx512.inc", "csrc/kernels/reference/vec_generic.inc",
              "csrc/kernels/avx512/attention_avx512_tiles.h", "csrc/include/pykernels/encoder.h",
              "csrc/include/pykernels/attention.h", "csrc/include/pykernels/runtime.h",
              "csrc/include/pykernels/gemm.h", "csrc/kernels/common/gemm_impl.inc",
              "csrc/kernels/common/gemm_latency.inc", "csrc/kernels/common/gemm_throughput.inc",
              "csrc/kernels/common/gemm_rows.inc", "csrc/kernels/common/gemm_tiles.inc",
              "csrc/kernels/common/quantize.inc", "csrc/include/pykernels/prefetch.h"]


def test_avx512_encoder_unit_under_simde():
    import os
    import subprocess

    from conftest import REPO_ROOT, build_native_driver

    simde_py = pytest.importorskip("simde_py", reason="simde-py (the test extra) provides SIMDe")
    exe = build_native_driver(
        "encoder_avx512_simde", SIMDE_SOURCES, SIMDE_DEPS, flags=("-O0", "-w"),
        include_dirs=(os.path.join(REPO_ROOT, "tests", "native", "simde_shim"),
                      simde_py.get_include()))
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert summary.endswith(" 0 failures"), summary
    # 3 length sets x 2 thread counts x (3 widths x (LN + embed + 6 pools) + 1 layer
    # + 3 attention shapes)
    assert int(summary.split()[1]) == 3 * 2 * (3 * 8 + 1 + 3), summary


def test_kernels_release_the_gil():
    """Python code runs in another thread while a kernel call is in progress:
    with the GIL held the main loop below could not advance until the call
    returned (it would count ~0); released, it counts throughout the call."""
    import threading

    rng = np.random.default_rng(4)
    lens = [200] * 48
    qkv = rng.standard_normal((sum(lens), 1152)).astype(np.float32)
    cu = enc.cu_seqlens(lens)
    started, done = threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(3):
            enc.varlen_attention(qkv, cu, 12, threads=1)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    count = 0
    while not done.is_set():
        count += 1
    t.join()
    assert count > 1000, count
