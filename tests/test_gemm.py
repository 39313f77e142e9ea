"""pykernels.gemm and pykernels.pack against a float64 NumPy reference.

Tolerance (see conftest.gemm_tolerance for the derivation): per element

    |got - ref| <= eps32 * (c * sqrt(K) + 3) * (|alpha| * (|a| @ |b|) + |beta| * |C0|)

with c = 2 on the FMA paths (avx2, avx512) and c = 4 on the generic path, whose
a*b + c is rounded twice (product, then sum).

Layout of this file:

* cases: a ``GemmCase`` is one call (shape, memory layout of a and b, b as an array
  or a PackedWeight, variant, threads, alpha/beta, kind of ``out``); ``run_case``
  runs it and checks the result, that the inputs are unchanged and that nothing
  outside ``out`` was written. ``check_*`` functions cover aliasing, empty
  dimensions and NaN/Inf.
* batches: named groups of cases and checks. Each batch runs once per ISA path in
  one subprocess (``test_gemm_batch_under_isa``); the same cases also run
  in-process, one readable test id each, on the default ISA.
* then in-process only: bad input, concurrency, pickling, hypothesis properties.
"""
from __future__ import annotations

import functools
import itertools
import pickle
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pykernels as pk
from conftest import (
    CraftedPickle,
    assert_batch_passed,
    assert_gemm_close,
    case_items,
    check_items,
    current_isa,
    gemm_mismatch,
    gemm_reference,
    gemm_tolerance,
    run_batch_items,
    run_call_under_isa,
    run_json_under_isa,
    run_under_isa,
    special_params,
)

F32 = np.float32
VARIANTS = ("latency", "throughput", "auto")

# ---------------------------------------------------------------------------
# Inputs with a given memory layout
# ---------------------------------------------------------------------------

# Every layout the kernels must accept for a and b (and for w in pack()).
VIEWS = (
    "C",          # C-contiguous
    "F",          # Fortran order
    "T",          # transposed view of a C array
    "sliced",     # base[::2, 1::3]
    "odd_ld",     # base[:, :cols] of a (rows, cols + 3) array: odd leading dimension
    "offset",     # starts 4 bytes into its buffer: not 16/32/64-byte aligned
    "neg_rows",   # base[::-1]
    "neg_cols",   # base[:, ::-1]
    "neg_both",   # base[::-1, ::-1]
    "T_neg",      # base[::-1].T: transposed with a negative column stride
    "bcast_row",  # np.broadcast_to of one row: zero row stride
    "bcast_col",  # np.broadcast_to of one column: zero column stride
    "bcast_all",  # one scalar broadcast: both strides zero
    "readonly",   # flags.writeable = False
)


def rand(rng, *shape):
    return rng.standard_normal(shape, dtype=F32)


def make_matrix(view: str, rows: int, cols: int, rng) -> np.ndarray:
    """A float32 (rows, cols) matrix of random values laid out as ``view`` says."""
    if view == "C":
        x = rand(rng, rows, cols)
    elif view == "F":
        x = np.asfortranarray(rand(rng, rows, cols))
    elif view == "T":
        x = rand(rng, cols, rows).T
    elif view == "sliced":
        x = rand(rng, 2 * rows, 3 * cols + 1)[::2, 1::3]
    elif view == "odd_ld":
        x = rand(rng, rows, cols + 3)[:, :cols]
    elif view == "offset":
        x = rand(rng, rows * cols + 1)[1:].reshape(rows, cols)
    elif view == "neg_rows":
        x = rand(rng, rows, cols)[::-1]
    elif view == "neg_cols":
        x = rand(rng, rows, cols)[:, ::-1]
    elif view == "neg_both":
        x = rand(rng, rows, cols)[::-1, ::-1]
    elif view == "T_neg":
        x = rand(rng, cols, rows)[::-1].T
    elif view == "bcast_row":
        x = np.broadcast_to(rand(rng, 1, cols), (rows, cols))
    elif view == "bcast_col":
        x = np.broadcast_to(rand(rng, rows, 1), (rows, cols))
    elif view == "bcast_all":
        x = np.broadcast_to(rand(rng, 1)[0], (rows, cols))
    elif view == "readonly":
        x = rand(rng, rows, cols)
        x.flags.writeable = False
    else:
        raise AssertionError(f"unknown view {view!r}")
    assert x.shape == (rows, cols) and x.dtype == F32
    return x


# ---------------------------------------------------------------------------
# One gemm call, checked
# ---------------------------------------------------------------------------

B_KINDS = ("array", "packed_kn", "packed_nk")
OUT_KINDS = (
    "none",      # out=None: a new array is returned
    "nan",       # out prefilled with NaN (only with beta == 0: must be ignored)
    "rand",      # out C-contiguous, random values scaled by beta
    "padded",    # out = base[1:M+1, 2:N+2]: row stride > N; the rest of base must stay
    "neg_rows",  # out = base[::-1]: negative row stride
)


@dataclass(frozen=True)
class GemmCase:
    m: int
    n: int
    k: int
    a_view: str = "C"
    b_kind: str = "array"
    b_view: str = "C"  # layout of b (b_kind="array") or of w given to pack()
    variant: str = "auto"
    threads: int | None = None
    alpha: float = 1.0
    beta: float = 0.0
    out: str = "none"
    seed: int = 0

    @property
    def id(self) -> str:
        b = "b" if self.b_kind == "array" else self.b_kind.replace("packed_", "pack")
        parts = [f"{self.m}x{self.n}x{self.k}", f"a{self.a_view}", f"{b}{self.b_view}",
                 self.variant, f"t{self.threads or 'def'}"]
        if self.out != "none":
            parts.append(f"out{self.out}")
        if self.alpha != 1.0 or self.beta != 0.0:
            parts.append(f"al{self.alpha:g}be{self.beta:g}")
        return "-".join(parts)


def run_case(case: GemmCase, isa: str) -> str | None:
    """Run one gemm call; None if everything holds, else a description of the failure."""
    m, n, k = case.m, case.n, case.k
    rng = np.random.default_rng(case.seed)
    a = make_matrix(case.a_view, m, k, rng)
    if case.b_kind == "array":
        src = make_matrix(case.b_view, k, n, rng)
        b_arg, b_eff = src, src
    elif case.b_kind == "packed_kn":
        src = make_matrix(case.b_view, k, n, rng)
        b_arg, b_eff = None, src
    elif case.b_kind == "packed_nk":
        src = make_matrix(case.b_view, n, k, rng)  # (N, K) as torch.nn.Linear.weight
        b_arg, b_eff = None, src.T
    else:
        raise AssertionError(case.b_kind)
    a_before, src_before = a.copy(), src.copy()
    if b_arg is None:
        b_arg = pk.pack(src, layout=case.b_kind[-2:])
        if not np.array_equal(src, src_before):
            return "pack() modified its input"
        if b_arg.shape != (k, n):
            return f"PackedWeight.shape {b_arg.shape}, expected {(k, n)}"

    base = None
    if case.out == "none":
        out = None
    elif case.out == "nan":
        assert case.beta == 0.0
        out = np.full((m, n), np.nan, dtype=F32)
    elif case.out == "rand":
        out = rand(rng, m, n)
    elif case.out == "padded":
        base = rand(rng, m + 2, n + 5)
        out = base[1:m + 1, 2:n + 2]
    elif case.out == "neg_rows":
        out = rand(rng, m, n)[::-1]
    else:
        raise AssertionError(case.out)
    c0 = None if out is None else out.copy()
    base_before = None if base is None else base.copy()

    try:
        res = pk.gemm(a, b_arg, out=out, alpha=case.alpha, beta=case.beta,
                      variant=case.variant, threads=case.threads)
    except Exception as e:  # noqa: BLE001 - reported as the failure
        return f"raised {type(e).__name__}: {e}"

    if out is not None and res is not out:
        return "gemm(..., out=out) did not return out"
    if not np.array_equal(a, a_before):
        return "a was modified"
    if not np.array_equal(src, src_before):
        return "b (or the packed source) was modified"
    if base is not None:
        expect = base_before.copy()
        expect[1:m + 1, 2:n + 2] = res
        if not np.array_equal(base, expect, equal_nan=True):
            return "gemm wrote outside out (padded out: base changed around the view)"
    beta = case.beta if out is not None else 0.0  # out=None: beta has nothing to scale
    ref, mag = gemm_reference(a, b_eff, case.alpha, beta, c0)
    return gemm_mismatch(res, ref, mag, k, isa)


# ---------------------------------------------------------------------------
# Case grids
# ---------------------------------------------------------------------------

POW2_EDGES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65)
M_EDGES = (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 17, 31, 32, 33, 65)
N_EDGES = (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 127, 129)
K_EDGES = (1, 2, 3, 7, 13, 31, 32, 33, 63, 65, 127, 129, 255, 256, 257, 511, 513)
PRIMES = ((2, 3, 5), (7, 11, 13), (13, 17, 19), (23, 29, 31), (37, 41, 43), (53, 97, 61),
          (67, 71, 73), (5, 131, 257), (101, 103, 107))
# (16, 4100, 300): a plain b with more rows than one tile and a thread range
# wider than one copy span (240 columns with a 512 KiB L2), K blocks of 128 + 128 + 44, and
# a 4-column right edge.
LARGE = ((100, 300, 257), (1, 4096, 1000), (300, 200, 130), (13, 50, 600), (6, 40, 1000),
         (257, 33, 5), (50, 1, 700), (1, 1, 5000), (16, 4100, 300))
FLAT_VIEWS = ("C", "F", "T", "sliced", "neg_rows", "neg_cols", "offset", "odd_ld")


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def cases_cube():
    """Every (M, N, K) in 1..17, with layout, variant, threads, b kind and out drawn
    from a seeded generator (reproducible, all combinations mixed in)."""
    rng = np.random.default_rng(1234)
    for i, (m, n, k) in enumerate(itertools.product(range(1, 18), repeat=3)):
        out = _pick(rng, ("none", "none", "nan", "rand", "padded"))
        alpha, beta = (1.0, 0.0)
        if out in ("rand", "padded"):
            alpha, beta = _pick(rng, ((1.0, 0.0), (1.0, 1.0), (-0.5, 2.0)))
        elif rng.integers(4) == 0:
            alpha = 2.5
        yield GemmCase(m, n, k, a_view=_pick(rng, FLAT_VIEWS), b_kind=_pick(rng, B_KINDS),
                       b_view=_pick(rng, FLAT_VIEWS), variant=("latency", "throughput")[i % 2],
                       threads=_pick(rng, (1, 2)), alpha=alpha, beta=beta, out=out, seed=i)


def cases_edges():
    """Sizes at the tile and block edges (MR = 4/6 rows, 16-column panels,
    K blocks of 64..512), 2^k +- 1, primes, and a few larger problems with every
    variant x threads x b kind."""
    rng = np.random.default_rng(99)
    seed = itertools.count(10_000)
    for i, (m, n) in enumerate(itertools.product(M_EDGES, N_EDGES)):
        k = K_EDGES[i % len(K_EDGES)]
        for variant in ("latency", "throughput"):
            yield GemmCase(m, n, k, b_kind=_pick(rng, B_KINDS), variant=variant,
                           threads=_pick(rng, (1, 2)), seed=next(seed))
    for s in POW2_EDGES:
        for variant in VARIANTS:
            yield GemmCase(s, s, s, b_kind=_pick(rng, B_KINDS), variant=variant,
                           threads=_pick(rng, (1, 2)), seed=next(seed))
    for m, n, k in PRIMES:
        for variant, b_kind in itertools.product(("latency", "throughput"), B_KINDS):
            yield GemmCase(m, n, k, b_kind=b_kind, variant=variant,
                           threads=_pick(rng, (1, 2)), seed=next(seed))
    for (m, n, k), variant, threads, b_kind in itertools.product(LARGE, VARIANTS, (1, 2),
                                                                  B_KINDS):
        yield GemmCase(m, n, k, b_kind=b_kind, variant=variant, threads=threads,
                       seed=next(seed))


def cases_layouts():
    """Every layout of a against every layout of b (array, or w for pack)."""
    rng = np.random.default_rng(7)
    seed = itertools.count(20_000)
    b_specs = [("array", v) for v in VIEWS]
    b_specs += [("packed_kn", v) for v in ("C", "T", "neg_both", "bcast_col", "readonly")]
    b_specs += [("packed_nk", v) for v in ("C", "F", "sliced", "neg_rows", "readonly")]
    for (m, n, k), a_view, (b_kind, b_view), variant in itertools.product(
            ((5, 19, 7), (37, 70, 45)), VIEWS, b_specs, ("latency", "throughput")):
        yield GemmCase(m, n, k, a_view=a_view, b_kind=b_kind, b_view=b_view, variant=variant,
                       threads=_pick(rng, (1, 2)), seed=next(seed))


def cases_epilogue():
    """out= of every kind with alpha/beta (beta = 0 ignores NaN already in out)."""
    seed = itertools.count(30_000)
    rng = np.random.default_rng(5)
    alpha_beta = ((1.0, 0.0), (2.5, 0.0), (1.0, 1.0), (0.5, -2.0), (-1.0, 0.25), (0.0, 1.0))
    for (m, n, k), out, (alpha, beta), variant in itertools.product(
            ((1, 1, 1), (3, 5, 4), (7, 33, 17), (40, 70, 300)),
            ("nan", "rand", "padded", "neg_rows"), alpha_beta, ("latency", "throughput")):
        if out == "nan" and beta != 0.0:
            continue
        yield GemmCase(m, n, k, b_kind=_pick(rng, B_KINDS), variant=variant,
                       threads=_pick(rng, (1, 2)), alpha=alpha, beta=beta, out=out,
                       seed=next(seed))
    # Few rows, a plain b and >= 256 rows of b per thread: the threads split K and
    # the partial sums meet in one epilogue (alpha, beta, out of every kind).
    for (m, n, k), out, (alpha, beta) in itertools.product(
            ((1, 37, 600), (6, 4100, 520)), ("nan", "rand", "padded", "neg_rows"), alpha_beta):
        if out == "nan" and beta != 0.0:
            continue
        yield GemmCase(m, n, k, b_kind="array", variant="latency", threads=2, alpha=alpha,
                       beta=beta, out=out, seed=next(seed))


# ---------------------------------------------------------------------------
# Checks beyond a single plain call: aliasing, empty dimensions, NaN/Inf
# (each raises AssertionError on failure)
# ---------------------------------------------------------------------------

def check_alias(isa, *, kind, n, variant, beta=0.0):
    """out overlapping an input gives NumPy's answer (as if computed into a temporary)."""
    rng = np.random.default_rng(n * 31 + len(kind))
    x = rand(rng, n, n)
    y = rand(rng, n, n)
    if kind == "out_is_a":            # a @ y -> a
        a, b, out = x, y, x
    elif kind == "out_is_b":          # y @ x -> x
        a, b, out = y, x, x
    elif kind == "out_is_a_and_b":    # x @ x -> x
        a, b, out = x, x, x
    elif kind == "a_is_out_T":        # x.T @ y -> x
        a, b, out = x.T, y, x
    elif kind == "shifted":           # a = base[:-1], out = base[1:] (partial overlap)
        base = rand(rng, n + 1, n)
        a, b, out = base[:-1], y, base[1:]
    elif kind == "packed_out_is_a":   # a @ pack(y) -> a
        a, b, out = x, y, x
    else:
        raise AssertionError(kind)
    a0, b0, c0 = a.copy(), b.copy(), out.copy()
    b_arg = pk.pack(b) if kind.startswith("packed") else b
    expected = np.matmul(a0, b0)
    if beta != 0.0:
        expected = expected + beta * c0
    res = pk.gemm(a, b_arg, out=out, beta=beta, variant=variant)
    assert res is out, "gemm(..., out=out) did not return out"
    ref, mag = gemm_reference(a0, b0, 1.0, beta, c0)
    msg = gemm_mismatch(out, ref, mag, n, isa)
    assert msg is None, f"overlapping out={kind}: {msg}"


def check_empty(isa, *, m, n, k, out_kind, variant):
    """Empty dimensions follow NumPy: M = 0 or N = 0 give an empty result, K = 0
    gives zeros (beta = 0) or beta * out."""
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    a = rand(rng, m, k)
    b = rand(rng, k, n)
    if out_kind == "none":
        res = pk.gemm(a, b, variant=variant)
        assert res.shape == (m, n) and res.dtype == F32, (res.shape, res.dtype)
        np.testing.assert_array_equal(res, np.zeros((m, n), F32))
        return
    if out_kind == "nan":       # beta = 0: NaN in out is overwritten
        out, beta = np.full((m, n), np.nan, F32), 0.0
        expected = np.matmul(a, b)
    elif out_kind == "beta":
        out, beta = rand(rng, m, n), 2.5
        expected = (np.matmul(a, b).astype(np.float64) + 2.5 * out.astype(np.float64)).astype(F32)
    else:
        raise AssertionError(out_kind)
    res = pk.gemm(a, b, out=out, beta=beta, variant=variant)
    assert res is out, "gemm(..., out=out) did not return out"
    assert res.shape == (m, n)
    np.testing.assert_array_equal(res, expected)


def _elementwise_product_sum(a, b):
    """a @ b in float64 by plain IEEE operations (no BLAS), for NaN/Inf references."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return (a64[:, :, None] * b64[None, :, :]).sum(axis=1)


def check_nan_inf(isa, *, variant, b_kind, m=9, n=37, k=20):
    """NaN and Inf in a and b propagate as IEEE arithmetic does."""
    rng = np.random.default_rng(4242)
    a = rand(rng, m, k)
    b = rand(rng, k, n)
    a[0, 1] = np.nan          # row 0: all NaN
    a[1, 2] = np.inf          # row 1: +-Inf by the sign of b[2, j] ...
    b[2, 6] = 0.0             # ... except Inf * 0 = NaN at (1, 6)
    b[4, 33] = np.nan         # column 33 (in the partial last panel): all NaN
    b[5, 20] = -np.inf        # column 20: -+Inf, NaN where Inf - Inf meets
    a[3, 5] = 0.0             # (3, 20): 0 * -Inf = NaN
    a[7, 9] = -np.inf
    b[9, 0] = 0.0             # (7, 0): -Inf * 0 = NaN
    b_arg = b if b_kind == "array" else pk.pack(b)
    res = pk.gemm(a, b_arg, variant=variant)
    ref = _elementwise_product_sum(a, b)
    np.testing.assert_array_equal(np.isnan(res), np.isnan(ref), err_msg="NaN positions")
    inf = np.isinf(ref)
    np.testing.assert_array_equal(np.isinf(res), inf, err_msg="Inf positions")
    np.testing.assert_array_equal(res[inf], ref[inf].astype(F32), err_msg="Inf signs")
    fin = np.isfinite(ref)
    assert fin.sum() > m * n // 2
    with np.errstate(invalid="ignore"):
        mag = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    err = np.abs(res[fin].astype(np.float64) - ref[fin])
    assert np.all(err <= gemm_tolerance(mag[fin], k, isa)), "finite elements out of tolerance"


def check_beta0_ignores_out(isa, *, variant, k, alpha):
    """beta = 0: out is write-only, NaN/Inf already in it must not leak."""
    m, n = 11, 35
    rng = np.random.default_rng(k)
    a, b = rand(rng, m, k), rand(rng, k, n)
    out = np.full((m, n), np.nan, F32)
    out[::2, ::3] = np.inf
    out[1::2, 1::4] = -np.inf
    res = pk.gemm(a, b, out=out, alpha=alpha, beta=0.0, variant=variant)
    assert np.isfinite(res).all(), "NaN/Inf from out leaked through beta = 0"
    ref, mag = gemm_reference(a, b, alpha)
    assert_gemm_close(res, ref, mag, k, isa)
    if alpha == 0.0 or k == 0:
        np.testing.assert_array_equal(res, np.zeros((m, n), F32))


def check_beta_scales_out(isa, *, variant, beta):
    """beta != 0: out is read and scaled; NaN/Inf in out propagate like IEEE."""
    m, n, k = 10, 21, 30
    rng = np.random.default_rng(17)
    a, b, out = rand(rng, m, k), rand(rng, k, n), rand(rng, m, n)
    out[0, 0] = np.nan
    out[1, 1] = np.inf
    c0 = out.copy()
    pk.gemm(a, b, out=out, beta=beta, variant=variant)
    assert np.isnan(out[0, 0]), "NaN in out with beta != 0 must propagate"
    assert out[1, 1] == np.copysign(np.inf, beta), "Inf in out must be scaled by beta"
    keep = np.isfinite(c0)
    ref, mag = gemm_reference(a, b, 1.0, beta, np.where(keep, c0, 0.0))
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err[keep] <= gemm_tolerance(mag, k, isa)[keep])


def check_alpha0_beta1_identity(isa, *, variant):
    """alpha = 0, beta = 1 leaves out exactly as it was (finite inputs)."""
    rng = np.random.default_rng(3)
    a, b, out = rand(rng, 9, 40), rand(rng, 40, 33), rand(rng, 9, 33)
    c0 = out.copy()
    pk.gemm(a, b, out=out, alpha=0.0, beta=1.0, variant=variant)
    np.testing.assert_array_equal(out, c0)


def check_out_none_ignores_beta(isa, *, variant):
    """out=None: a fresh array, beta has nothing to scale."""
    rng = np.random.default_rng(8)
    a, b = rand(rng, 7, 50), rand(rng, 50, 20)
    res = pk.gemm(a, b, beta=3.0, variant=variant)
    assert res.dtype == F32 and res.shape == (7, 20) and res.flags.writeable
    ref, mag = gemm_reference(a, b)
    assert_gemm_close(res, ref, mag, 50, isa)


def check_packed_weight_reuse(isa, *, layout):
    """One PackedWeight serves every variant, thread count and number of rows."""
    k, n = 70, 53
    rng = np.random.default_rng(11)
    w = rand(rng, k, n) if layout == "kn" else rand(rng, n, k)
    w_eff = w if layout == "kn" else w.T
    pw = pk.pack(w, layout=layout)
    assert pw.shape == (k, n) and pw.precision == "fp32"
    for m, variant, threads in itertools.product((1, 6, 7, 40), VARIANTS, (1, 2)):
        a = rand(rng, m, k)
        ref, mag = gemm_reference(a, w_eff)
        res = pk.gemm(a, pw, variant=variant, threads=threads)
        assert_gemm_close(res, ref, mag, k, isa)


def check_plain_b_throughput_equals_packed(isa, *, threads):
    """The throughput variant on a plain row-major ``b`` gives the bits of the
    same call on ``pk.pack(b)``: either path (``b`` packed whole, or copied
    chunk by chunk while the tiles run, chosen by the number of row blocks)
    must feed the tiles the same values in the same order. Shapes cover N
    inside one chunk, at and across chunk edges and across column blocks, K
    across several K blocks, few rows and many (both paths on any blocking),
    a row stride wider than N, and the fused bias and activation."""
    rng = np.random.default_rng(threads)
    # (2000 rows: >= 3 row blocks per thread, so the pack path, for any row
    # block up to 384 rows, the most any ISA's blocking uses; 5 rows: a chunk
    # run by a single tile.)
    for m, k, n in [(7, 5, 1), (5, 700, 130), (40, 1100, 15), (200, 700, 64), (130, 300, 65),
                    (300, 1100, 130), (2000, 520, 70), (90, 260, 1100)]:
        a = rand(rng, m, k)
        wide = rand(rng, k, n + 9)
        for b in (np.ascontiguousarray(wide[:, :n]), wide[:, 5:n + 5]):
            b0 = b.copy()
            bp = pk.pack(np.ascontiguousarray(b))
            got = pk.gemm(a, b, variant="throughput", threads=threads)
            want = pk.gemm(a, bp, variant="throughput", threads=threads)
            assert np.array_equal(got, want), (isa, threads, m, k, n, b.strides)
            np.testing.assert_array_equal(b, b0)
            ref, mag = gemm_reference(a, b)
            assert_gemm_close(got, ref, mag, k, isa)
            bias = rand(rng, n)
            got = pk.linear(a, b, bias, activation="gelu", variant="throughput", threads=threads)
            want = pk.linear(a, bp, bias, activation="gelu", variant="throughput", threads=threads)
            assert np.array_equal(got, want), ("linear", isa, threads, m, k, n)


def check_oversubscribed_threads(isa, *, threads):
    """More threads than cores is allowed and still correct."""
    rng = np.random.default_rng(threads)
    a, b = rand(rng, 50, 90), rand(rng, 90, 70)
    ref, mag = gemm_reference(a, b)
    for variant in ("latency", "throughput"):
        assert_gemm_close(pk.gemm(a, b, variant=variant, threads=threads), ref, mag, 90, isa)


SPECIAL_CHECKS = []
for _v in ("latency", "throughput"):
    for _kind in ("out_is_a", "out_is_b", "out_is_a_and_b", "a_is_out_T", "shifted",
                  "packed_out_is_a"):
        for _n in (1, 7, 40):
            SPECIAL_CHECKS.append((f"alias-{_kind}-n{_n}-{_v}",
                                   functools.partial(check_alias, kind=_kind, n=_n, variant=_v)))
        SPECIAL_CHECKS.append((f"alias-{_kind}-n17-beta1-{_v}",
                               functools.partial(check_alias, kind=_kind, n=17, variant=_v,
                                                 beta=1.0)))
    for (_m, _n, _k), _o in itertools.product(
            ((0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0), (0, 5, 0), (1, 1, 0), (0, 1, 2)),
            ("none", "nan", "beta")):
        SPECIAL_CHECKS.append((f"empty-{_m}x{_n}x{_k}-out{_o}-{_v}",
                               functools.partial(check_empty, m=_m, n=_n, k=_k, out_kind=_o,
                                                 variant=_v)))
    for _bk in ("array", "packed"):
        SPECIAL_CHECKS.append((f"nan_inf-{_bk}-{_v}",
                               functools.partial(check_nan_inf, variant=_v, b_kind=_bk)))
    for _k, _alpha in ((1, 1.0), (33, 1.0), (300, 2.0), (0, 1.0), (33, 0.0)):
        SPECIAL_CHECKS.append((f"beta0_ignores_out-k{_k}-alpha{_alpha:g}-{_v}",
                               functools.partial(check_beta0_ignores_out, variant=_v, k=_k,
                                                 alpha=_alpha)))
    for _beta in (1.0, -0.5):
        SPECIAL_CHECKS.append((f"beta_scales_out-beta{_beta:g}-{_v}",
                               functools.partial(check_beta_scales_out, variant=_v, beta=_beta)))
    SPECIAL_CHECKS.append((f"alpha0_beta1_identity-{_v}",
                           functools.partial(check_alpha0_beta1_identity, variant=_v)))
    SPECIAL_CHECKS.append((f"out_none_ignores_beta-{_v}",
                           functools.partial(check_out_none_ignores_beta, variant=_v)))
for _t in (1, 2):
    SPECIAL_CHECKS.append((f"plain_b_throughput_equals_packed-threads{_t}",
                           functools.partial(check_plain_b_throughput_equals_packed, threads=_t)))
for _layout in ("kn", "nk"):
    SPECIAL_CHECKS.append((f"packed_weight_reuse-{_layout}",
                           functools.partial(check_packed_weight_reuse, layout=_layout)))
for _t in (3, 4):
    SPECIAL_CHECKS.append((f"threads{_t}_oversubscribed",
                           functools.partial(check_oversubscribed_threads, threads=_t)))

# Checks that fail because of a known library bug: id -> reason (xfail strict
# in-process; the per-ISA batches skip them). Empty since the fixes of 2026-11-26.
KNOWN_BUGS: dict = {}  # fixed: empty out with strides (0, 0) is accepted


# ---------------------------------------------------------------------------
# Batches: what one subprocess per ISA runs
# ---------------------------------------------------------------------------

BATCHES = {
    "cube": lambda: case_items(cases_cube(), run_case),
    "edges": lambda: case_items(cases_edges(), run_case),
    "layouts": lambda: case_items(cases_layouts(), run_case),
    "epilogue": lambda: case_items(cases_epilogue(), run_case),
    "special": lambda: check_items(SPECIAL_CHECKS),
}


def run_batch(name: str, isa: str | None = None) -> dict:
    """Run every item of one batch on this process's ISA; report failures."""
    return run_batch_items(BATCHES[name](), isa or current_isa(), KNOWN_BUGS)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_gemm_batch_under_isa(isa, batch):
    """Each batch on each ISA path, in one subprocess with PYKERNELS_ISA set."""
    res = run_call_under_isa(isa, "test_gemm", f"test_gemm.run_batch({batch!r})")
    assert_batch_passed(res, isa, batch)


# ---------------------------------------------------------------------------
# The same cases in-process (default ISA), one test id each
# ---------------------------------------------------------------------------

def _case_params():
    for cases in (cases_edges(), cases_layouts(), cases_epilogue()):
        for c in cases:
            yield pytest.param(c, id=c.id)


@pytest.mark.parametrize("case", list(_case_params()))
def test_gemm_case(case):
    msg = run_case(case, current_isa())
    assert msg is None, msg


@pytest.mark.parametrize("check", list(special_params(SPECIAL_CHECKS, KNOWN_BUGS)))
def test_gemm_special(check):
    check(current_isa())


def test_small_cube_in_process_spot_check():
    """A slice of the 1..17 cube in-process (the whole cube runs in the batches)."""
    cases = [c for i, c in enumerate(cases_cube()) if i % 37 == 0]
    failures = [f"{c.id}: {m}" for c in cases if (m := run_case(c, current_isa()))]
    assert not failures, "\n".join(failures[:20])


# variant="auto" resolves by size (pk::auto_variant: rows, product size,
# threads, prepacked or plain b, precision) to one of the two variants: its
# result is bit-identical to that variant's with the same threads, on both
# sides of every boundary of the rule (32 and 128 rows, a product of 128^3).
# K of 600-1100 spans several K blocks, which the two variants cut
# differently, so their fp32 and bf16 results differ in the last bits and a
# call that ran neither (another thread count, another blocking) fails.
# int8 sums are exact: there the test checks only that auto runs.
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int8_7bit"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", [(32, 1100, 70), (33, 1100, 70), (128, 128, 128),
                                   (129, 128, 128), (7, 1000, 300), (100, 600, 200),
                                   (128, 600, 300), (129, 600, 300)])
def test_auto_is_one_of_the_variants_exactly(precision, threads, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x, w = rand(rng, m, k), rand(rng, k, n)
    kinds = [pk.pack(w, precision=precision)] + ([w] if precision == "fp32" else [])
    for b in kinds:
        call = functools.partial(pk.linear, x, b, threads=threads)
        got = call(variant="auto")
        explicit = [call(variant=v) for v in ("latency", "throughput")]
        assert any(np.array_equal(got, e) for e in explicit), (precision, threads, m, k, n, type(b))

# ---------------------------------------------------------------------------
# Bad input: a clear exception, and every array the caller passed unchanged
# ---------------------------------------------------------------------------

def _ab(m=3, k=4, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return rand(rng, m, k), rand(rng, k, n)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16, np.int64],
                         ids=["float64", "int32", "float16", "int64"])
def test_wrong_dtype_is_type_error_naming_dtype_and_fix(which, dtype):
    a, b = _ab()
    if which == "a":
        a = a.astype(dtype)
    else:
        b = b.astype(dtype)
    a0, b0 = a.copy(), b.copy()
    with pytest.raises(TypeError) as ei:
        pk.gemm(a, b)
    msg = str(ei.value)
    assert np.dtype(dtype).name in msg, msg
    assert "float32" in msg and ("astype" in msg or "asarray" in msg), \
        f"message should say how to fix it: {msg}"
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("value", [
    pytest.param([[1.0, 2.0], [3.0, 4.0]], id="list"),
    pytest.param(((1.0, 2.0), (3.0, 4.0)), id="tuple"),
    pytest.param(None, id="None"),
    pytest.param(2.0, id="scalar"),
])
def test_non_array_is_type_error(which, value, request):
    a, b = _ab(2, 2, 2)
    args = (value, b) if which == "a" else (a, value)
    with pytest.raises(TypeError) as ei:
        pk.gemm(*args)
    assert "float32" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), ()], ids=["1d", "3d", "0d"])
def test_not_2d_is_value_error(which, shape):
    a, b = _ab(2, 2, 2)
    x = np.ones(shape, F32)
    with pytest.raises(ValueError):
        pk.gemm(x, b) if which == "a" else pk.gemm(a, x)


@pytest.mark.parametrize("packed", [False, True], ids=["array", "packed"])
def test_mismatched_k_names_both_shapes(packed):
    a = np.ones((3, 4), F32)
    b = np.ones((5, 6), F32)
    with pytest.raises(ValueError) as ei:
        pk.gemm(a, pk.pack(b) if packed else b)
    msg = str(ei.value)
    assert "(3, 4)" in msg and "(5, 6)" in msg, msg


def _bad_outs():
    yield pytest.param(lambda: np.zeros((5, 3), F32), id="shape_transposed")
    yield pytest.param(lambda: np.zeros((3, 6), F32), id="shape_wide")
    yield pytest.param(lambda: np.zeros((3, 5, 1), F32), id="shape_3d")
    yield pytest.param(lambda: np.zeros(15, F32), id="shape_1d")
    yield pytest.param(lambda: np.zeros((3, 5), np.float64), id="dtype_float64")
    yield pytest.param(lambda: np.zeros((3, 5), np.int32), id="dtype_int32")
    yield pytest.param(lambda: np.zeros((3, 10), F32)[:, ::2], id="last_stride_2")
    yield pytest.param(lambda: np.zeros((3, 5), F32, order="F"), id="fortran_order")
    yield pytest.param(lambda: np.zeros((3, 5), F32)[:, ::-1], id="last_stride_negative")

    def readonly():
        x = np.zeros((3, 5), F32)
        x.flags.writeable = False
        return x
    yield pytest.param(readonly, id="read_only")
    yield pytest.param(lambda: np.broadcast_to(np.zeros(5, F32), (3, 5)), id="broadcast")


@pytest.mark.parametrize("variant", ["latency", "throughput"])
@pytest.mark.parametrize("make_out", list(_bad_outs()))
def test_bad_out_is_value_error_and_nothing_changes(make_out, variant):
    a, b = _ab(3, 4, 5)
    out = make_out()
    a0, b0, out0 = a.copy(), b.copy(), np.array(out, copy=True)
    with pytest.raises(ValueError):
        pk.gemm(a, b, out=out, variant=variant)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(out, out0)


def _misaligned(shape, fill):
    """A float32 array starting 1 byte into its buffer (flags.aligned is False)."""
    n = int(np.prod(shape))
    x = np.ndarray(shape, F32, buffer=np.zeros(4 * n + 1, np.uint8), offset=1)
    x[...] = fill
    return x


@pytest.mark.parametrize("variant", ["latency", "throughput"])
@pytest.mark.parametrize("which", ["a", "b", "out"])
def test_misaligned_arrays_work_or_are_rejected_clearly(which, variant):
    """A float32 array at an odd byte address (np.ndarray(buffer=..., offset=1)) is
    computed correctly, as NumPy computes with such arrays: the binding copies
    a misaligned input to an aligned buffer and computes a misaligned out= in a
    temporary (reading one through float* would be undefined behaviour)."""
    rng = np.random.default_rng(0)
    a, b = rand(rng, 10, 20), rand(rng, 20, 37)
    out = None
    if which == "a":
        a = _misaligned(a.shape, a)
    elif which == "b":
        b = _misaligned(b.shape, b)
    else:
        out = _misaligned((10, 37), np.nan)
    a0, b0 = a.copy(), b.copy()
    res = pk.gemm(a, b, out=out, variant=variant)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    if out is not None:
        assert res is out
    ref, mag = gemm_reference(a0, b0)
    assert_gemm_close(res, ref, mag, 20)


@pytest.mark.parametrize("which", ["a", "b", "w"])
def test_stride_not_multiple_of_itemsize_is_value_error(which):
    from numpy.lib.stride_tricks import as_strided
    x = np.arange(100, dtype=F32)
    odd = as_strided(x, shape=(5, 5), strides=(6, 4))  # 6 bytes: half a float
    good = np.ones((5, 5), F32)
    x0 = x.copy()
    with pytest.raises(ValueError):
        if which == "a":
            pk.gemm(odd, good)
        elif which == "b":
            pk.gemm(good, odd)
        else:
            pk.pack(odd)
    np.testing.assert_array_equal(x, x0)


def test_out_not_an_array_is_rejected():
    a, b = _ab(2, 2, 2)
    with pytest.raises((TypeError, ValueError)):
        pk.gemm(a, b, out=[[0.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("variant", ["fast", "", "LATENCY", None, "throughput "])
def test_unknown_variant_is_value_error(variant):
    a, b = _ab()
    with pytest.raises(ValueError):
        pk.gemm(a, b, variant=variant)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, False, "2"],
                         ids=["0", "-1", "1.5", "True", "False", "str"])
def test_bad_threads_is_value_error(threads):
    a, b = _ab()
    with pytest.raises(ValueError):
        pk.gemm(a, b, threads=threads)


def test_huge_threads_is_capped_or_clear_value_error():
    a, b = _ab(8, 9, 10)
    try:
        res = pk.gemm(a, b, threads=10**10)
    except ValueError as e:
        assert "threads" in str(e)
        return
    ref, mag = gemm_reference(a, b)
    assert_gemm_close(res, ref, mag, 9)


@pytest.mark.parametrize("precision", ["bogus", "FP32", "", "float32"])
def test_pack_unknown_precision_is_value_error(precision):
    with pytest.raises(ValueError):
        pk.pack(np.ones((4, 4), F32), precision=precision)


@pytest.mark.parametrize("layout", ["xy", "", "KN", "mn", None])
def test_pack_unknown_layout_is_value_error(layout):
    with pytest.raises(ValueError):
        pk.pack(np.ones((4, 4), F32), layout=layout)


@pytest.mark.parametrize("dtype", [np.float64, np.int32], ids=["float64", "int32"])
def test_pack_wrong_dtype_is_type_error(dtype):
    w = np.ones((4, 4), dtype)
    with pytest.raises(TypeError) as ei:
        pk.pack(w)
    assert np.dtype(dtype).name in str(ei.value)


def test_pack_not_2d_and_not_array():
    with pytest.raises(ValueError):
        pk.pack(np.ones(4, F32))
    with pytest.raises(ValueError):
        pk.pack(np.ones((2, 2, 2), F32))
    with pytest.raises(TypeError):
        pk.pack([[1.0, 2.0], [3.0, 4.0]])


def test_unallocatable_size_is_memory_error():
    """A size that cannot be allocated raises MemoryError, never a crash. Broadcast
    views make the inputs free; the (2**24, 2**24) float32 result (1 PiB) cannot be
    allocated, nor can the packed copy of a (2**40, 2**20) weight. In a subprocess
    with a timeout, so a library that started computing instead cannot hang the suite."""
    code = (
        "import numpy as np, pykernels as pk\n"
        "n = 2**24\n"
        "a = np.broadcast_to(np.float32(1), (n, 1))\n"
        "b = np.broadcast_to(np.float32(1), (1, n))\n"
        "for variant in ('latency', 'throughput', 'auto'):\n"
        "    try:\n"
        "        pk.gemm(a, b, variant=variant)\n"
        "    except MemoryError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('gemm: no MemoryError for ' + variant)\n"
        "try:\n"
        "    pk.pack(np.broadcast_to(np.float32(1), (2**40, 2**20)))\n"
        "except MemoryError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('pack: no MemoryError')\n"
        "print('ok')\n"
    )
    proc = run_under_isa(None, code, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


# ---------------------------------------------------------------------------
# PackedWeight: attributes, pickling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 16), (33, 17), (100, 300)])
def test_pack_attributes(layout, k, n):
    rng = np.random.default_rng(k * n)
    w = rand(rng, k, n) if layout == "kn" else rand(rng, n, k)
    w0 = w.copy()
    pw = pk.pack(w, layout=layout)
    np.testing.assert_array_equal(w, w0)
    assert isinstance(pw, pk.PackedWeight)
    assert pw.shape == (k, n)
    assert pw.precision == "fp32"
    assert isinstance(pw.nbytes, int) and pw.nbytes >= k * n * 4
    assert pw.rel_error == 0.0  # fp32 packing is an exact copy
    assert "PackedWeight" in repr(pw)


def test_pack_empty_weight():
    """Empty weights: either packed (and then usable like NumPy) or a ValueError."""
    for shape in ((0, 5), (5, 0), (0, 0)):
        try:
            pw = pk.pack(np.zeros(shape, F32))
        except ValueError:
            continue
        k, n = shape
        res = pk.gemm(np.ones((2, k), F32), pw)
        np.testing.assert_array_equal(res, np.zeros((2, n), F32))


def _packed(k=37, n=45, seed=0, layout="kn"):
    rng = np.random.default_rng(seed)
    w = rand(rng, k, n) if layout == "kn" else rand(rng, n, k)
    return w, pk.pack(w, layout=layout)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_pickle_round_trip_is_bit_identical(layout):
    w, pw = _packed(layout=layout)
    blob = pickle.dumps(pw)
    clone = pickle.loads(blob)
    assert isinstance(clone, pk.PackedWeight)
    assert (clone.shape, clone.precision, clone.nbytes, clone.rel_error) == \
        (pw.shape, pw.precision, pw.nbytes, pw.rel_error)
    assert pickle.dumps(clone) == blob, "re-pickling the clone gives different bytes"
    rng = np.random.default_rng(1)
    for m in (1, 9, 50):
        a = rand(rng, m, pw.shape[0])
        for variant in ("latency", "throughput"):
            np.testing.assert_array_equal(pk.gemm(a, clone, variant=variant, threads=1),
                                          pk.gemm(a, pw, variant=variant, threads=1))
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.dumps(pickle.loads(pickle.dumps(pw, protocol=protocol))) == blob


def test_pickle_crosses_processes_and_isas(isa, tmp_path):
    """A PackedWeight pickled here (default ISA) runs in a process on every ISA."""
    w, pw = _packed(k=70, n=33, seed=5)
    rng = np.random.default_rng(2)
    a = rand(rng, 8, 70)
    path = tmp_path / "pw.pkl"
    path.write_bytes(pickle.dumps((pw, a)))
    code = (
        "import json, pickle, numpy as np, pykernels as pk\n"
        f"pw, a = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "res = [pk.gemm(a, pw, variant=v).tolist() for v in ('latency', 'throughput')]\n"
        "print(json.dumps({'isa': pk.cpu_info().isa, 'res': res}))\n"
    )
    out = run_json_under_isa(isa, code)
    assert out["isa"] == isa
    ref, mag = gemm_reference(a, w)
    for r in out["res"]:
        assert_gemm_close(np.array(r, dtype=F32), ref, mag, 70, isa)


def test_mutated_packed_shape_does_not_crash():
    code = (
        "import numpy as np, pykernels as pk\n"
        "pw = pk.pack(np.ones((64, 32), np.float32))\n"
        "try:\n"
        "    pw.shape = (64, 32 * 100000)\n"
        "except (AttributeError, TypeError):\n"
        "    print('refused'); raise SystemExit(0)\n"
        "try:\n"
        "    pk.gemm(np.ones((1, 64), np.float32), pw)\n"
        "except ValueError:\n"
        "    print('refused')\n"
    )
    proc = run_under_isa(None, code, timeout=60)
    assert proc.returncode == 0 and "refused" in proc.stdout, \
        f"exit code {proc.returncode}: {proc.stderr[-1000:]}"


def _corruptions():
    # PackedWeight.__reduce__() -> (fn, (version, shape, precision, payload, rel_error))
    def alter(index, fn):
        def make(args):
            args = list(args)
            args[index] = fn(args[index])
            return tuple(args)
        return make
    yield pytest.param(alter(3, lambda p: p[:-4]), id="payload_truncated_by_one_float")
    yield pytest.param(alter(3, lambda p: p[:len(p) // 2]), id="payload_truncated_half")
    yield pytest.param(alter(3, lambda p: b""), id="payload_empty")
    yield pytest.param(alter(3, lambda p: p + b"\0\0\0\0"), id="payload_extended")
    yield pytest.param(alter(3, lambda p: p[:-1]), id="payload_odd_length")
    yield pytest.param(alter(1, lambda s: (s[0] + 1, s[1])), id="shape_k_altered")
    yield pytest.param(alter(1, lambda s: (s[0], s[1] + 16)), id="shape_n_altered")
    yield pytest.param(alter(1, lambda s: (s[1], s[0])), id="shape_swapped")
    yield pytest.param(alter(0, lambda v: v + 1), id="version_unknown")
    yield pytest.param(alter(2, lambda p: "bogus"), id="precision_unknown")
    yield pytest.param(alter(3, lambda p: None), id="payload_none")
    yield pytest.param(alter(3, lambda p: p.decode("latin-1")), id="payload_str")
    yield pytest.param(alter(1, lambda s: (-s[0], -s[1])), id="shape_negative")
    yield pytest.param(alter(1, lambda s: "37x45"), id="shape_not_a_tuple")


@pytest.mark.parametrize("corrupt", list(_corruptions()))
def test_corrupted_pickle_is_value_error(corrupt):
    w, pw = _packed(k=37, n=45)
    fn, args = pw.__reduce__()
    assert len(args) >= 4 and isinstance(args[3], bytes), "unexpected __reduce__ format"
    blob = pickle.dumps(CraftedPickle(fn, corrupt(args)))
    with pytest.raises(ValueError):
        pickle.loads(blob)


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------

def _concurrent_specs():
    rng = np.random.default_rng(77)
    shared = pk.pack(rand(rng, 96, 80))
    specs = []
    for i, (m, n, k) in enumerate([(1, 80, 96), (3, 80, 96), (7, 80, 96), (40, 80, 96),
                                   (5, 33, 17), (64, 64, 64), (100, 70, 130), (13, 129, 65),
                                   (2, 300, 200), (70, 10, 300)]):
        for variant, threads in itertools.product(VARIANTS, (1, 2, None)):
            a = rand(rng, m, k)
            b = shared if (k, n) == (96, 80) and i % 2 == 0 else rand(rng, k, n)
            specs.append((a, b, variant, threads))
    return specs


def test_concurrent_calls_match_serial_exactly():
    """8 Python threads, each making every call (different shapes, variants, thread
    counts, one shared PackedWeight) in its own order, 3 rounds: each result is
    bit-identical to the same call made serially."""
    specs = _concurrent_specs()
    serial = [pk.gemm(a, b, variant=v, threads=t) for a, b, v, t in specs]
    errors = []
    barrier = threading.Barrier(8)

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(specs))
        barrier.wait()
        for _ in range(3):
            for j in order:
                a, b, v, t = specs[j]
                got = pk.gemm(a, b, variant=v, threads=t)
                if not np.array_equal(got, serial[j]):
                    errors.append(f"call {j} ({a.shape} @ {getattr(b, 'shape', None)}, "
                                  f"{v}, threads={t}) differs from the serial result")
                    return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a gemm thread hung"
    assert not errors, "\n".join(errors[:10])


def test_concurrent_calls_with_out_and_alpha_beta():
    """Threads writing into their own out= buffers with alpha/beta."""
    rng = np.random.default_rng(3)
    a, b = rand(rng, 30, 50), rand(rng, 50, 40)
    c0 = rand(rng, 30, 40)
    ref, mag = gemm_reference(a, b, 0.5, 2.0, c0)
    errors = []

    def worker(i):
        for j in range(50):
            out = c0.copy()
            pk.gemm(a, b, out=out, alpha=0.5, beta=2.0, variant=VARIANTS[(i + j) % 3],
                    threads=1 + (j % 2))
            msg = gemm_mismatch(out, ref, mag, 50, current_isa())
            if msg:
                errors.append(msg)
                return

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors, errors[:5]


# ---------------------------------------------------------------------------
# Properties (hypothesis) over shapes and strides
# ---------------------------------------------------------------------------

@st.composite
def strided_matrix(draw, rows: int, cols: int):
    """A (rows, cols) float32 view with any steps (incl. negative), offsets and
    optionally transposed, cut from a random base array."""
    transpose = draw(st.booleans())
    r, c = (cols, rows) if transpose else (rows, cols)
    sr = draw(st.sampled_from([1, 2, 3, -1, -2]))
    sc = draw(st.sampled_from([1, 2, -1, -3]))
    off_r, off_c = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    base = np.random.default_rng(seed).standard_normal(
        (off_r + r * abs(sr), off_c + c * abs(sc)), dtype=F32)
    view = base[off_r:, off_c:][::sr, ::sc]
    assert view.shape == (r, c)
    return view.T if transpose else view


_dims = st.integers(1, 40)
_hyp = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_hyp
@given(st.data(), _dims, _dims, _dims, st.sampled_from(VARIANTS), st.sampled_from([1, 2]))
def test_property_any_strides(data, m, n, k, variant, threads):
    a = data.draw(strided_matrix(m, k), label="a")
    b = data.draw(strided_matrix(k, n), label="b")
    a0, b0 = a.copy(), b.copy()
    res = pk.gemm(a, b, variant=variant, threads=threads)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    ref, mag = gemm_reference(a, b)
    assert_gemm_close(res, ref, mag, k)


@_hyp
@given(st.data(), _dims, _dims, _dims, st.sampled_from(VARIANTS), st.sampled_from(["kn", "nk"]),
       st.sampled_from([(1.0, 0.0), (-2.0, 0.5), (0.25, 1.0)]))
def test_property_packed_with_out(data, m, n, k, variant, layout, alpha_beta):
    alpha, beta = alpha_beta
    a = data.draw(strided_matrix(m, k), label="a")
    w = data.draw(strided_matrix(k, n) if layout == "kn" else strided_matrix(n, k), label="w")
    w_eff = w if layout == "kn" else w.T
    w0 = w.copy()
    pw = pk.pack(w, layout=layout)
    np.testing.assert_array_equal(w, w0)
    base = np.random.default_rng(m * n).standard_normal((m + 1, n + 3), dtype=F32)
    out = base[1:, 3:] if data.draw(st.booleans(), label="padded_out") else base[:m, :n].copy()
    c0 = out.copy()
    res = pk.gemm(a, pw, out=out, alpha=alpha, beta=beta, variant=variant)
    assert res is out
    ref, mag = gemm_reference(a, w_eff, alpha, beta, c0)
    assert_gemm_close(out, ref, mag, k)
