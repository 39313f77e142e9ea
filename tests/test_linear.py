"""pykernels.linear and the bf16/int8 PackedWeights against float64 references.

Accuracy contract (issue 3, SPEC "pack"/"linear")
-------------------------------------------------
Relative Frobenius error ``||got - ref||_F / ||ref||_F`` against a float64
reference of ``activation(x @ w + bias)`` on Gaussian x, w (and bias), K from
64 to 4096, every variant, 1 and 2 threads, every activation, with and without
bias:

    fp32 <= 1e-5      bf16 <= 1e-2      int8 <= 3e-2

Why these hold (x, w ~ N(0, 1)):

* fp32: rounding errors of K fused multiply-adds add like a random walk,
  ~ sqrt(K) * eps32/2 relative to |x| @ |w| (~1.25x |x @ w| for Gaussian
  data): at K = 4096, 64 * 6e-8 * 1.25 ~ 5e-6, under 1e-5.
* bf16: x and w are rounded to 8 significant bits; each operand's relative RMS
  rounding error is ~1.7e-3 (it is what ``PackedWeight.rel_error`` reports),
  the product's ~sqrt(2) * 1.7e-3 ~ 2.4e-3: 4x under 1e-2.
* int8: symmetric quantization with step max|row| / 127 (activations per row,
  weights per output column); error uniform in +-step/2, RMS step/sqrt(12).
  A Gaussian vector of length K has max ~ sqrt(2 ln K) (3.9 at K = 4096), so
  each operand's relative error is ~3.9/127/3.46 ~ 9e-3, the product's
  ~sqrt(2) * 9e-3 ~ 1.3e-2: 2x under 3e-2.

The activations add their own error, bounded below (vector math). Their slope
is at most 1.13 (GELU; SiLU 1.10), so they do not amplify a pre-activation
error by more than ``LIPSCHITZ``.

Element-wise oracles (edge grids, strides, out=, ...)
-----------------------------------------------------
The contract above is statistical; the edge grids check every element against
a bound that follows from each precision's arithmetic:

* fp32: float64 ``x @ w + bias`` with ``conftest.gemm_tolerance`` (per element
  ``eps32 * (c sqrt(K) + 3) * (|x| @ |w| + |bias|)``, c = 2 with FMA, 4 on the
  generic path).
* bf16: the issue fixes the numerics on every ISA: bf16-rounded (round to
  nearest even) x and w, fp32 accumulation. So the reference is float64
  ``bf16(x) @ bf16(w) + bias`` (rounded with ml_dtypes) and the bound is the
  same fp32 ``gemm_tolerance``: a wrong rounding mode or a lost pair shows.
* int8: the library's quantization is deterministic and documented (gemm.h):
  row scale ``max|x_i| / 127``, column scale ``max|w[:, j]| / 127``, values
  ``clip(rint(v * float32(127 / max)), -127, 127)`` (the product in float32),
  exact int32 sums, dequantized
  as ``float(sum) * col_scale * row_scale`` then ``+ bias`` in fp32.
  ``int8_emulate`` does exactly that in NumPy float32, so with no activation
  (and relu) the kernel must match it **bit for bit**, on every ISA and
  variant; with a smooth activation, within the activation's own bound.
* the activation: ``|act_kernel(z) - act(z)| <= ACT_TOL * max(1, |z|)``,
  ``ACT_TOL = 1e-6``: erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7,
  so <= 7.5e-8 |z| in 0.5 z (1 + erf)) plus ~10 fp32 roundings of terms
  bounded by |z| (<= 10 * 6e-8 |z|): 6.75e-7 |z| < 1e-6 |z|.

Layout of this file: helpers and oracles; the contract grid; cases and checks
that run as batches under every ISA (subprocesses with PYKERNELS_ISA) and
in-process; cross-ISA consistency; vector math; PackedWeight and pickling; bad
input; concurrency. Library bugs found are ``xfail(strict=True)`` with the
reason (``KNOWN_BUGS``).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import pickle
import sys
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

import pykernels as pk
from pykernels.testing import act64, bf16_round
from pykernels.testing import quantize_rows as _quantize_rows
from pykernels.testing import rel_error as rel_fro
from conftest import (
    CraftedPickle,
    assert_batch_passed,
    case_items,
    check_items,
    current_isa,
    float32_result_problem,
    gemm_tolerance,
    run_batch_items,
    run_call_under_isa,
    run_json_under_isa,
    special_params,
)

F32 = np.float32
PRECISIONS = ("fp32", "bf16", "int8")
VARIANTS = ("latency", "throughput")
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")
SMOOTH = ("gelu", "gelu_tanh", "silu")

# The accuracy contract (issue 3): relative Frobenius error vs float64.
CONTRACT = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2, "int8_7bit": 5e-2}
# Vector math bound, derived in the module docstring.
ACT_TOL = 1e-6
# Largest slope of any activation (GELU: 1.129 at x = 1.41), rounded up.
LIPSCHITZ = 1.2


def act_name(act) -> str:
    return "none" if act is None else act


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------

def act_tol(act, z):
    """Per-element error the fused activation may add (0: exact operations)."""
    if act in (None, "relu"):
        return np.zeros(np.shape(z))
    return ACT_TOL * np.maximum(1.0, np.abs(z))


def int8_emulate(x2, w, bias=None) -> np.ndarray:
    """The int8 pre-activation exactly as the kernels compute it, in float32:
    quantize x per row and w per column, exact integer sum, dequantize as
    ``(float(sum) * col_scale) * row_scale``, then ``+ bias``."""
    qx, rs = _quantize_rows(x2)
    qw_t, cs = _quantize_rows(np.asarray(w, dtype=F32).T)
    # Exact integer sums through float64 BLAS: every partial sum is an integer of
    # magnitude <= K * 127^2 < 2^53 (K <= 5e11), so no rounding happens in any order.
    acc = (qx.astype(np.float64) @ qw_t.T.astype(np.float64)).astype(F32)
    z = (acc * cs[None, :]).astype(F32) * rs[:, None]
    z = z.astype(F32)
    if bias is not None:
        z = (z + np.asarray(bias, dtype=F32)[None, :]).astype(F32)
    return z


def int8_weight_error(w) -> float:
    """The relative Frobenius error of the int8 quantization of w (K, N)."""
    q, s = _quantize_rows(np.asarray(w, F32).T)
    deq = q.astype(np.float64) * s.astype(np.float64)[:, None]
    w64 = np.asarray(w, np.float64).T
    return float(np.linalg.norm(w64 - deq) / np.linalg.norm(w64))


def preactivation_reference(precision, x2, w, bias, isa):
    """(z, tol): expected x2 @ w + bias (float64, shape (M, N)) and the per-element
    bound on the kernel's pre-activation error (see the module docstring)."""
    k = x2.shape[1]
    if precision == "int8":
        return int8_emulate(x2, w, bias).astype(np.float64), np.zeros((x2.shape[0], w.shape[1]))
    if precision == "bf16":
        x2, w = bf16_round(x2), bf16_round(w)
    x64, w64 = x2.astype(np.float64), np.asarray(w, np.float64)
    z = x64 @ w64
    mag = np.abs(x64) @ np.abs(w64)
    if bias is not None:
        b64 = np.asarray(bias, np.float64)
        z = z + b64[None, :]
        mag = mag + np.abs(b64)[None, :]
    return z, gemm_tolerance(mag, k, isa)


def mismatch(got, z, tol_z, act) -> str | None:
    """None if got == act(z) within LIPSCHITZ * tol_z + act_tol(z), else why not."""
    got = np.asarray(got)
    problem = float32_result_problem(got, z.shape)
    if problem:
        return problem
    if got.size == 0:
        return None
    exp = act64(act, z)
    tol = LIPSCHITZ * tol_z + act_tol(act, z)
    err = np.abs(got.astype(np.float64) - exp)
    bad = ~(err <= tol)  # NaN counts as bad
    if not bad.any():
        return None
    score = np.where(bad, np.nan_to_num(err / np.maximum(tol, 1e-300), nan=np.inf), -1.0)
    idx = np.unravel_index(int(np.argmax(score)), got.shape)
    return (f"{int(bad.sum())}/{got.size} elements out of tolerance; worst at {idx}: "
            f"got {got[idx]!r}, expected {exp[idx]!r}, |err| {err[idx]:.3g} > tol {tol[idx]:.3g}")


def rand(rng, *shape):
    return rng.standard_normal(shape, dtype=F32)


def blas_single_thread():
    """The float64 references are thousands of tiny BLAS calls: one BLAS thread
    is faster (no fork/join, no spinning workers taking a core from the kernels
    under test on a 2-core machine). A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@pytest.fixture(scope="module", autouse=True)
def _references_on_one_blas_thread():
    with blas_single_thread():
        yield


# ---------------------------------------------------------------------------
# The accuracy contract: precision x K x variant x threads x activation x bias
# ---------------------------------------------------------------------------

CONTRACT_M, CONTRACT_N = 9, 40  # 9 rows: two row chunks; 40 columns: a partial panel
CONTRACT_K = (64, 256, 1024, 4096)


@functools.lru_cache(maxsize=None)
def _contract_data(k):
    rng = np.random.default_rng(k)
    x = rand(rng, CONTRACT_M, k)
    w = rand(rng, k, CONTRACT_N)
    bias = rand(rng, CONTRACT_N)
    z0 = x.astype(np.float64) @ w.astype(np.float64)
    return x, w, bias, z0


@functools.lru_cache(maxsize=None)
def _contract_packed(precision, k):
    return pk.pack(_contract_data(k)[1], precision=precision)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("threads", [1, 2], ids=["t1", "t2"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", CONTRACT_K, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_accuracy_contract(precision, k, variant, threads, act, bias):
    """Relative Frobenius error vs float64 <= 1e-5 (fp32), 1e-2 (bf16), 3e-2 (int8)."""
    x, w, b, z0 = _contract_data(k)
    b_arg = b if bias else None
    ref = act64(act, z0 + (b.astype(np.float64) if bias else 0.0))
    got = pk.linear(x, _contract_packed(precision, k), b_arg, activation=act, variant=variant,
                    threads=threads)
    assert got.dtype == F32 and got.shape == (CONTRACT_M, CONTRACT_N)
    assert np.isfinite(got).all()
    err = rel_fro(got, ref)
    assert err <= CONTRACT[precision], f"{precision} K={k}: relative error {err:.3g}"


@pytest.mark.parametrize("k", [63, 255, 1023, 4097], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_accuracy_contract_raw_and_odd_k(precision, k):
    """The same bounds with K not a multiple of 2 or 4 (the packed K is zero-padded)
    and, for fp32, with w passed as a raw (K, N) array."""
    rng = np.random.default_rng(k + 7)
    x, w, b = rand(rng, 17, k), rand(rng, k, 33), rand(rng, 33)
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    ws = [pk.pack(w, precision=precision)] + ([w] if precision == "fp32" else [])
    for w_arg, variant in itertools.product(ws, VARIANTS):
        err = rel_fro(pk.linear(x, w_arg, b, variant=variant), ref)
        assert err <= CONTRACT[precision], (precision, variant, type(w_arg).__name__, err)


# The bf16 latency kernels take products of bf16-rounded inputs summed in
# fp32, k after k, with the same K blocks as fp32: whether a strip is widened
# inline by the bf16 tiles (up to two row chunks) or once into a buffer the
# fp32 tiles read (three or more), the result is the fp32 latency kernel's on
# the rounded inputs, bit for bit. (K even: an odd K is padded with a zero
# pair, which can only turn a -0 sum into +0.) The "widen" scheme: vdpbf16ps
# (where it is chosen) rounds its pair sums its own way.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (8, 300, 33), (12, 256, 48), (13, 600, 70),
                                   (40, 1000, 100), (64, 384, 1152)])
def test_bf16_latency_is_fp32_latency_on_rounded_inputs(m, k, n, threads):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    prev = pk.set_bf16_scheme("widen")
    try:
        for act in (None, "gelu"):
            got = pk.linear(x, pk.pack(w, precision="bf16"), b, activation=act,
                            variant="latency", threads=threads)
            want = pk.linear(bf16_round(x), pk.pack(bf16_round(w), precision="fp32"), b,
                             activation=act, variant="latency", threads=threads)
            assert np.array_equal(got, want), (m, k, n, threads, act)
    finally:
        pk.set_bf16_scheme(prev)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("m,n,k", [(1, 37, 1000), (5, 16, 777), (6, 100, 520), (2, 5, 4100)])
def test_raw_w_few_rows_split_k_epilogue(m, n, k, act):
    """Few rows, a raw fp32 w and >= 256 rows of w per thread: the threads split K
    and their partial sums meet in one epilogue, which must add the bias and apply
    the activation once, element-wise within the fp32 bound."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    x0, w0 = x.copy(), w.copy()
    z, tol = preactivation_reference("fp32", x, w, b, current_isa())
    got = pk.linear(x, w, b, activation=act, variant="latency", threads=2)
    msg = mismatch(got, z, tol, act)
    assert msg is None, msg
    assert np.array_equal(x, x0) and np.array_equal(w, w0)


# ---------------------------------------------------------------------------
# One linear call, checked element-wise
# ---------------------------------------------------------------------------

X_VIEWS = (
    "C",          # C-contiguous
    "F",          # Fortran order
    "T",          # transposed view (all axes reversed) of a C array
    "sliced",     # every other leading index, every third column
    "offset",     # starts 4 bytes into its buffer
    "neg_rows",   # first axis reversed
    "neg_cols",   # last axis reversed
    "neg_both",   # every axis reversed
    "bcast_row",  # one row broadcast (zero strides on the leading axes)
    "readonly",   # flags.writeable = False
)


def make_x(view: str, shape: tuple, rng) -> np.ndarray:
    """A float32 array of ``shape`` (1-D or more) laid out as ``view`` says."""
    nd = len(shape)
    if view == "C":
        x = rand(rng, *shape)
    elif view == "F":
        x = np.asfortranarray(rand(rng, *shape))
    elif view == "T":
        x = rand(rng, *shape[::-1]).T
    elif view == "sliced":
        base = rand(rng, *[2 * s for s in shape[:-1]], 3 * shape[-1] + 1)
        x = base[(slice(None, None, 2),) * (nd - 1) + (slice(1, None, 3),)]
    elif view == "offset":
        x = rand(rng, int(np.prod(shape)) + 1)[1:].reshape(shape)
    elif view == "neg_rows":
        x = rand(rng, *shape)[::-1]
    elif view == "neg_cols":
        x = rand(rng, *shape)[..., ::-1]
    elif view == "neg_both":
        x = np.flip(rand(rng, *shape))
    elif view == "bcast_row":
        x = np.broadcast_to(rand(rng, *([1] * (nd - 1) + [shape[-1]])), shape)
    elif view == "readonly":
        x = rand(rng, *shape)
        x.flags.writeable = False
    else:
        raise AssertionError(f"unknown view {view!r}")
    assert x.shape == tuple(shape) and x.dtype == F32, (view, x.shape)
    return x


W_KINDS = ("kn", "nk", "raw")  # pack(layout="kn"), pack(layout="nk"), raw (K, N) array (fp32)


@dataclass(frozen=True)
class LinCase:
    m: int
    n: int
    k: int
    precision: str = "fp32"
    w_kind: str = "kn"
    x_view: str = "C"
    lead: tuple | None = None  # x.shape[:-1]; None: (m,). prod(lead) == m
    variant: str = "latency"
    threads: int | None = None
    act: str | None = None
    bias: bool = False
    out: str = "none"          # "none" | "nan": a C-contiguous out prefilled with NaN
    seed: int = 0

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead)) if self.lead is not None else str(self.m)
        parts = [self.precision, f"{lead}x{self.k}->{self.n}", f"w{self.w_kind}",
                 f"x{self.x_view}", self.variant, f"t{self.threads or 'def'}",
                 act_name(self.act)]
        if self.bias:
            parts.append("bias")
        if self.out != "none":
            parts.append(f"out{self.out}")
        return "-".join(parts)


def run_case(case: LinCase, isa: str) -> str | None:
    """Run one linear call; None if everything holds, else a description of the failure."""
    m, n, k = case.m, case.n, case.k
    lead = (m,) if case.lead is None else tuple(case.lead)
    assert int(np.prod(lead)) == m, case
    rng = np.random.default_rng(case.seed)
    x = make_x(case.x_view, lead + (k,), rng)
    if case.w_kind == "nk":
        src = rand(rng, n, k)
        w_eff = src.T
    else:
        src = rand(rng, k, n)
        w_eff = src
    bias = rand(rng, n) if case.bias else None
    x0, src0 = x.copy(), src.copy()
    b0 = None if bias is None else bias.copy()
    if case.w_kind == "raw":
        assert case.precision == "fp32"
        w_arg = src
    else:
        w_arg = pk.pack(src, precision=case.precision, layout=case.w_kind)
        if w_arg.shape != (k, n) or w_arg.precision != case.precision:
            return f"PackedWeight shape/precision {w_arg.shape}/{w_arg.precision}"
    out = None if case.out == "none" else np.full(lead + (n,), np.nan, F32)
    try:
        res = pk.linear(x, w_arg, bias, activation=case.act, out=out, variant=case.variant,
                        threads=case.threads)
    except Exception as e:  # noqa: BLE001 - reported as the failure
        return f"raised {type(e).__name__}: {e}"
    if out is not None and res is not out:
        return "linear(..., out=out) did not return out"
    if res.shape != lead + (n,):
        return f"result shape {res.shape}, expected {lead + (n,)}"
    if not np.array_equal(x, x0):
        return "x was modified"
    if not np.array_equal(src, src0):
        return "w was modified"
    if bias is not None and not np.array_equal(bias, b0):
        return "bias was modified"
    z, tol = preactivation_reference(case.precision, x0.reshape(m, k), w_eff, bias, isa)
    return mismatch(res.reshape(m, n), z, tol, case.act)


# ---------------------------------------------------------------------------
# Case grids
# ---------------------------------------------------------------------------

def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _w_kinds(precision):
    return W_KINDS if precision == "fp32" else W_KINDS[:2]


FLAT_VIEWS = ("C", "F", "T", "sliced", "offset", "neg_rows", "neg_cols", "neg_both")


def cases_cube():
    """Every (M, N, K) in 1..17 (K = 1..17 covers every remainder mod 2 and 4), the
    precision cycling over the shapes (each precision meets every M, N and K
    value ~96 times and every (M mod 6, N mod 16, K mod 4) class), with variant,
    threads, activation, bias, x layout and w kind drawn from a seeded generator."""
    rng = np.random.default_rng(2024)
    seed = itertools.count()
    for m, n, k in itertools.product(range(1, 18), repeat=3):
        s = next(seed)
        precision = PRECISIONS[(m + n + k) % 3]
        yield LinCase(m, n, k, precision, w_kind=_pick(rng, _w_kinds(precision)),
                      x_view=_pick(rng, FLAT_VIEWS), variant=VARIANTS[s % 2],
                      threads=_pick(rng, (1, 2)), act=_pick(rng, ACTIVATIONS),
                      bias=bool(rng.integers(2)), seed=s)


POW2_EDGES = (31, 32, 33, 63, 64, 65, 127, 128, 129)
M_EDGES = (1, 2, 3, 4, 5, 6, 7, 12, 13, 17, 33, 65)
N_EDGES = (1, 15, 16, 17, 31, 33, 47, 49, 63, 65, 129)
K_EDGES = (1, 2, 3, 5, 7, 31, 33, 63, 65, 127, 129, 255, 257, 511, 513, 1023, 1025)
LARGE = ((100, 300, 257), (1, 1000, 1001), (300, 70, 131), (13, 50, 600), (6, 40, 2047),
         (257, 33, 5), (40, 1, 701), (1, 3, 4099))


def cases_edge_grid():
    """Tile and block edges: M around the row tiles (MR = 2..6), N around the
    16-column panels, K around the bf16/int8 k-groups (2, 4) and the K blocks,
    for every precision and variant."""
    rng = np.random.default_rng(99)
    seed = itertools.count(100_000)
    for i, (m, n) in enumerate(itertools.product(M_EDGES, N_EDGES)):
        k = K_EDGES[i % len(K_EDGES)]
        for precision, variant in itertools.product(PRECISIONS, VARIANTS):
            yield LinCase(m, n, k, precision, w_kind=_pick(rng, _w_kinds(precision)),
                          variant=variant, threads=_pick(rng, (1, 2)),
                          act=_pick(rng, ACTIVATIONS), bias=bool(rng.integers(2)),
                          seed=next(seed))


def cases_sizes():
    """2^k +- 1 cubes and a few larger problems (K up to 4099, odd), for every
    precision, variant and thread count."""
    rng = np.random.default_rng(98)
    seed = itertools.count(150_000)
    for s, precision in itertools.product(POW2_EDGES, PRECISIONS):
        for variant in VARIANTS:
            yield LinCase(s, s, s, precision, w_kind=_pick(rng, _w_kinds(precision)),
                          variant=variant, threads=_pick(rng, (1, 2)),
                          act=_pick(rng, ACTIVATIONS), bias=True, seed=next(seed))
    for (m, n, k), precision, variant in itertools.product(LARGE, PRECISIONS, VARIANTS):
        for threads in (1, 2):
            yield LinCase(m, n, k, precision, w_kind=_pick(rng, _w_kinds(precision)),
                          variant=variant, threads=threads, act=_pick(rng, ACTIVATIONS),
                          bias=True, seed=next(seed))


LEADS = ((), (1,), (7,), (2, 3), (3, 1, 5), (2, 2, 2, 2))


def cases_layouts():
    """x of shape (..., K) with 0 to 4 leading dims (1 to 3 asked), every layout
    of x (transposed, sliced, negative strides, broadcast, read-only), w as a
    pack in both layouts or a raw array, and out= of the right shape."""
    rng = np.random.default_rng(7)
    seed = itertools.count(200_000)
    for lead, view, precision in itertools.product(LEADS, X_VIEWS, PRECISIONS):
        if lead == () and view in ("bcast_row",):
            continue
        m = int(np.prod(lead)) if lead else 1
        x_lead = lead if lead else ()
        for variant in VARIANTS:
            yield LinCase(m, 37, 45, precision, w_kind=_pick(rng, _w_kinds(precision)),
                          x_view=view, lead=x_lead, variant=variant,
                          threads=_pick(rng, (1, 2)), act=_pick(rng, ACTIVATIONS),
                          bias=bool(rng.integers(2)), out=_pick(rng, ("none", "nan")),
                          seed=next(seed))


# ---------------------------------------------------------------------------
# Checks beyond a single plain call (each raises AssertionError on failure)
# ---------------------------------------------------------------------------

def _packed_or_raw(w, precision, w_kind="kn"):
    if w_kind == "raw":
        return w
    return pk.pack(w if w_kind == "kn" else np.ascontiguousarray(w.T), precision=precision,
                   layout=w_kind)


def check_zero_rows(isa, *, precision, variant, act):
    """All-zero rows give exactly act(bias) (int8: the row's scale is 0, the
    quantized row is 0, the int32 sum is 0). Other rows are unaffected."""
    rng = np.random.default_rng(5)
    m, k, n = 7, 67, 35
    x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    x[[0, 3, 6]] = 0.0
    res = pk.linear(x, _packed_or_raw(w, precision), b, activation=act, variant=variant)
    bias_only = pk.linear(np.zeros((1, 0), F32), np.zeros((0, n), F32), b, activation=act)
    for i in (0, 3, 6):
        np.testing.assert_array_equal(res[i], bias_only[0], err_msg=f"zero row {i}")
        if act is None:
            np.testing.assert_array_equal(res[i], b)
        msg = mismatch(res[i:i + 1], b[None, :].astype(np.float64), np.zeros((1, n)), act)
        assert msg is None, f"zero row {i}: {msg}"
    z, tol = preactivation_reference(precision, x, w, b, isa)
    msg = mismatch(res, z, tol, act)
    assert msg is None, msg


def check_int8_extreme_sums(isa, *, variant):
    """int8 at the ends of the integer range, where the u8 x s8 (VNNI) scheme's
    biased sums sum_k (w + 128) a differ most from the true ones: rows and
    columns quantizing to all +127 / all -127 / alternating signs, K = 8202
    (not a multiple of 4). Exact equality with the emulation proves the
    128 * sum_k a[k] correction and the int32 wrap-around are right on every
    path (the generic path runs that scheme)."""
    k, n = 8202, 48
    signs = np.where(np.arange(k) % 2 == 0, 1.0, -1.0).astype(np.float32)
    x = np.stack([np.ones(k, np.float32), -np.ones(k, np.float32), signs, -signs])
    cols = [np.ones(k, np.float32), -np.ones(k, np.float32), signs, -signs]
    w = np.stack([cols[j % 4] * (1.0 + j) for j in range(n)], axis=1).astype(np.float32)
    res = pk.linear(x, pk.pack(w, precision="int8"), variant=variant)
    np.testing.assert_array_equal(res, int8_emulate(x, w),
                                  err_msg="int8 extreme sums differ from the emulation")
    np.testing.assert_allclose(res, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-6)


def check_outlier_row(isa, *, variant, outlier):
    """int8, a row with one huge finite outlier: the row's scale is outlier/127,
    so the outlier quantizes to +-127 and every other entry of that row
    (|v| * 127 / outlier < 0.5) to 0. The row's result is therefore
    outlier * dequantized w[j0, :] (finite, within the weight's quantization
    error of the float64 result, which the outlier dominates); the other rows
    keep their own scales and the int8 contract."""
    rng = np.random.default_rng(11)
    m, k, n, j0 = 6, 300, 40, 17
    x, w = rand(rng, m, k), rand(rng, k, n)
    x[2, j0] = outlier
    res = pk.linear(x, pk.pack(w, precision="int8"), variant=variant)
    assert np.isfinite(res).all(), "int8 result with a finite outlier is not finite"
    z = int8_emulate(x, w)
    np.testing.assert_array_equal(res, z, err_msg="int8 result differs from the emulation")
    # what the outlier row gives: only the outlier survives quantization
    q, s = _quantize_rows(w.T)
    row_expected = outlier * (q[:, j0] * s.astype(np.float64))
    np.testing.assert_allclose(res[2], row_expected, rtol=1e-5)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_fro(res[2], ref[2]) <= CONTRACT["int8"], rel_fro(res[2], ref[2])
    others = [0, 1, 3, 4, 5]
    assert rel_fro(res[others], ref[others]) <= CONTRACT["int8"]


def check_nonfinite_row_int8(isa, *, variant, value, act):
    """int8, a row holding Inf or NaN: that row is NaN (its scale is NaN, as
    linear's docstring says), every other row finite and unchanged."""
    rng = np.random.default_rng(13)
    m, k, n = 8, 70, 33
    x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    x[4, 9] = value
    pw = pk.pack(w, precision="int8")
    res = pk.linear(x, pw, b, activation=act, variant=variant)
    assert np.isnan(res[4]).all(), f"row with {value} is not all NaN: {res[4]}"
    others = [i for i in range(m) if i != 4]
    assert np.isfinite(res[others]).all(), "NaN/Inf leaked into other rows"
    clean = pk.linear(x[others], pw, b, activation=act, variant=variant)
    np.testing.assert_array_equal(res[others], clean)


def _ieee_product_sum(a, b):
    """a @ b in float64 by plain IEEE operations (NaN and Inf as IEEE says)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return (a64[:, :, None] * b64[None, :, :]).sum(axis=1)


def check_nan_inf_float(isa, *, precision, variant, w_kind, act):
    """fp32/bf16: NaN and Inf in x, w and bias propagate as IEEE arithmetic does
    (positions of NaN and +-Inf match an element-wise float64 reference on the
    same, bf16-rounded for bf16, values). Activations: NaN stays NaN; relu keeps
    +Inf and maps -Inf to 0; the other activations are only checked on finite
    pre-activations."""
    rng = np.random.default_rng(4242)
    m, k, n = 9, 20, 37
    x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    x[0, 1] = np.nan          # row 0: all NaN
    x[1, 2] = np.inf          # row 1: +-Inf by the sign of w[2, j] ...
    w[2, 6] = 0.0             # ... except Inf * 0 = NaN at (1, 6)
    w[4, 33] = np.nan         # column 33 (in the partial last panel): all NaN
    w[5, 20] = -np.inf        # column 20: -+Inf, NaN where Inf - Inf meets
    x[3, 5] = 0.0             # (3, 20): 0 * -Inf = NaN
    b[11] = np.nan            # column 11: NaN through the bias
    b[12] = np.inf            # column 12: +Inf unless a NaN/-Inf meets it
    res = pk.linear(x, _packed_or_raw(w, precision, w_kind), b, activation=act,
                    variant=variant)
    xr, wr = (bf16_round(x), bf16_round(w)) if precision == "bf16" else (x, w)
    with np.errstate(invalid="ignore"):
        pre = _ieee_product_sum(xr, wr) + b.astype(np.float64)[None, :]
    if act is None:
        ref = pre
    elif act == "relu":
        ref = np.where(np.isnan(pre), np.nan, np.maximum(pre, 0.0))
    else:  # smooth activations: NaN in, NaN out; +-Inf in is not checked here
        ref = None
        assert np.isnan(res[np.isnan(pre)]).all(), "NaN did not propagate through " + act
    if ref is not None:
        np.testing.assert_array_equal(np.isnan(res), np.isnan(ref), err_msg="NaN positions")
        inf = np.isinf(ref)
        np.testing.assert_array_equal(np.isinf(res), inf, err_msg="Inf positions")
        np.testing.assert_array_equal(res[inf], ref[inf].astype(F32), err_msg="Inf signs")
    fin = np.isfinite(pre)
    assert fin.sum() > m * n // 2
    z, tol = preactivation_reference(precision, np.where(np.isfinite(x), x, 0).astype(F32),
                                     np.where(np.isfinite(w), w, 0).astype(F32),
                                     np.where(np.isfinite(b), b, 0).astype(F32), isa)
    # finite entries only: the non-finite inputs were zeroed in this reference,
    # and every finite entry of the result saw none of them.
    err = np.abs(res[fin].astype(np.float64) - act64(act, z[fin]))
    assert np.all(err <= LIPSCHITZ * tol[fin] + act_tol(act, z[fin])), \
        "finite elements out of tolerance"


def check_out_alias_x(isa, *, precision, variant, lead):
    """out aliasing x (N == K): the result NumPy would give (as if computed into a
    temporary), for every precision and 2-D or 3-D x."""
    rng = np.random.default_rng(31 + len(lead))
    k = 40
    x = rand(rng, *lead, k)
    w, b = rand(rng, k, k), rand(rng, k)
    pw = pk.pack(w, precision=precision)
    expected = pk.linear(x.copy(), pw, b, activation="gelu", variant=variant)
    res = pk.linear(x, pw, b, activation="gelu", out=x, variant=variant)
    assert res is x, "linear(..., out=x) did not return x"
    np.testing.assert_array_equal(x, expected)
    if precision == "fp32":  # and a raw w that is x itself (2-D): x @ x -> x
        sq = rand(rng, k, k)
        exp2 = pk.linear(sq.copy(), sq.copy(), variant=variant)
        pk.linear(sq, sq, out=sq, variant=variant)
        np.testing.assert_array_equal(sq, exp2)


def check_out_kinds(isa, *, precision, variant):
    """out= of the right shape (2-D and (..., N)) is written and returned; NaN
    already in it is ignored; a new array has the same values."""
    rng = np.random.default_rng(41)
    k, n = 50, 29
    w, b = rand(rng, k, n), rand(rng, n)
    pw = pk.pack(w, precision=precision)
    for lead in ((6,), (2, 3), (1, 2, 3)):
        x = rand(rng, *lead, k)
        new = pk.linear(x, pw, b, activation="silu", variant=variant)
        out = np.full(lead + (n,), np.nan, F32)
        res = pk.linear(x, pw, b, activation="silu", out=out, variant=variant)
        assert res is out
        np.testing.assert_array_equal(out, new)


def check_empty_rows(isa, *, precision, variant):
    """Empty leading dims follow NumPy: (0, K) -> (0, N), (2, 0, K) -> (2, 0, N)."""
    k, n = 12, 7
    w = np.ones((k, n), F32)
    pw = _packed_or_raw(w, precision)
    for shape in ((0, k), (2, 0, k), (0, 3, k)):
        res = pk.linear(np.zeros(shape, F32), pw, np.ones(n, F32), activation="relu",
                        variant=variant)
        assert res.shape == shape[:-1] + (n,) and res.dtype == F32, res.shape


def check_k_zero(isa, *, act, lead, variant):
    """K == 0 (raw (0, N) weight): the empty sum is 0, so the result is
    act(bias) broadcast over the leading dims (zeros without bias)."""
    n = 19
    b = np.linspace(-4, 4, n).astype(F32)
    x = np.zeros(lead + (0,), F32)
    w = np.zeros((0, n), F32)
    res = pk.linear(x, w, b, activation=act, variant=variant)
    assert res.shape == lead + (n,) and res.dtype == F32, res.shape
    ref = np.broadcast_to(act64(act, b.astype(np.float64)), lead + (n,))
    err = np.abs(res.astype(np.float64) - ref)
    assert np.all(err <= act_tol(act, ref)), (res, ref)
    res0 = pk.linear(x, w, activation=act, variant=variant)
    np.testing.assert_array_equal(res0, np.zeros(lead + (n,), F32))


def check_raw_vs_packed(isa, *, variant, m, k):
    """fp32: w as a raw (K, N) array, pack(w, layout="kn") and pack(w.T, layout="nk")
    give the same result: the two packs bit-identical (same packed bytes), the
    raw path within the fp32 bound of them (its K blocking may round differently)."""
    rng = np.random.default_rng(m * 1000 + k)
    n = 53
    x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    kn = pk.pack(w, layout="kn")
    nk = pk.pack(np.ascontiguousarray(w.T), layout="nk")
    r_kn = pk.linear(x, kn, b, activation="gelu_tanh", variant=variant)
    r_nk = pk.linear(x, nk, b, activation="gelu_tanh", variant=variant)
    r_raw = pk.linear(x, w, b, activation="gelu_tanh", variant=variant)
    np.testing.assert_array_equal(r_kn, r_nk)
    assert pickle.dumps(kn) == pickle.dumps(nk), "kn and nk packs of the same weight differ"
    z, tol = preactivation_reference("fp32", x, w, b, isa)
    assert mismatch(r_raw, z, tol, "gelu_tanh") is None
    assert mismatch(r_kn, z, tol, "gelu_tanh") is None
    for precision in ("bf16", "int8"):  # kn and nk packs agree for every precision
        a = pk.linear(x, pk.pack(w, precision=precision), variant=variant)
        c = pk.linear(x, pk.pack(w.T, precision=precision, layout="nk"), variant=variant)
        np.testing.assert_array_equal(a, c, err_msg=precision)


def check_readonly_inputs(isa, *, precision, variant):
    """Read-only x, w and bias are accepted and left unchanged."""
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, 5, 33), rand(rng, 33, 18), rand(rng, 18)
    for a in (x, w, b):
        a.flags.writeable = False
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    res = pk.linear(x, _packed_or_raw(w, precision), b, activation="relu", variant=variant)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
    z, tol = preactivation_reference(precision, x, w, b, isa)
    assert mismatch(res, z, tol, "relu") is None


def check_int8_variants_identical(isa, *, act, bias):
    """int8: latency and throughput, 1 and 2 threads, give bit-identical results
    (exact int32 sums over the full K, the same dequantization and epilogue), and
    with no activation or relu they equal the NumPy emulation bit for bit."""
    rng = np.random.default_rng(77)
    for m, k, n in ((1, 1001, 70), (7, 257, 33), (40, 130, 129)):
        x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
        pw = pk.pack(w, precision="int8")
        b_arg = b if bias else None
        results = [pk.linear(x, pw, b_arg, activation=act, variant=v, threads=t)
                   for v, t in itertools.product(VARIANTS, (1, 2))]
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])
        z = int8_emulate(x, w, b_arg)
        if act in (None, "relu"):
            np.testing.assert_array_equal(results[0], act64(act, z).astype(F32))
        else:
            assert mismatch(results[0], z.astype(np.float64), np.zeros(z.shape), act) is None


def check_int8_k_limit(isa, *, variant):
    """int8 at K = 131072 with every value at +-max: the int32 sum reaches
    131072 * 127 * 127 = 2 114 060 288 < 2^31 and must not wrap."""
    k, n = 131072, 16
    w = np.ones((k, n), F32)
    w[:, 1] = -1.0
    pw = pk.pack(w, precision="int8")
    x = np.ones((2, k), F32)
    x[1] = -1.0
    res = pk.linear(x, pw, variant=variant)
    exp = np.array([[k, -k] + [k] * (n - 2), [-k, k] + [-k] * (n - 2)], np.float64)
    np.testing.assert_allclose(res, exp, rtol=1e-6)


SPECIAL_CHECKS = []


def _add(cid, fn, **kw):
    SPECIAL_CHECKS.append((cid, functools.partial(fn, **kw)))


for _v in VARIANTS:
    for _p in PRECISIONS:
        for _a in (None, "relu", "gelu"):
            _add(f"zero_rows-{_p}-{_v}-{act_name(_a)}", check_zero_rows, precision=_p,
                 variant=_v, act=_a)
        _add(f"out_kinds-{_p}-{_v}", check_out_kinds, precision=_p, variant=_v)
        _add(f"empty_rows-{_p}-{_v}", check_empty_rows, precision=_p, variant=_v)
        _add(f"readonly_inputs-{_p}-{_v}", check_readonly_inputs, precision=_p, variant=_v)
        for _lead in ((40,), (2, 20)):
            _add(f"out_alias_x-{_p}-{len(_lead) + 1}d-{_v}", check_out_alias_x, precision=_p,
                 variant=_v, lead=_lead)
    for _o in (1e30, -1e30, 1e37, 3e4):
        _add(f"outlier_row-int8-{_o:g}-{_v}", check_outlier_row, variant=_v, outlier=_o)
    _add(f"int8_extreme_sums-{_v}", check_int8_extreme_sums, variant=_v)
    for _val, _a in itertools.product((np.inf, -np.inf, np.nan), (None, "relu", "silu")):
        _add(f"nonfinite_row-int8-{_val}-{act_name(_a)}-{_v}", check_nonfinite_row_int8,
             variant=_v, value=_val, act=_a)
    for _p, _wk in (("fp32", "kn"), ("fp32", "raw"), ("bf16", "kn")):
        for _a in ACTIVATIONS:
            _add(f"nan_inf-{_p}-{_wk}-{act_name(_a)}-{_v}", check_nan_inf_float, precision=_p,
                 variant=_v, w_kind=_wk, act=_a)
    for _a in ACTIVATIONS:
        for _lead in ((3,), ()):
            _add(f"k_zero-{len(_lead) + 1}d-{act_name(_a)}-{_v}", check_k_zero, act=_a,
                 lead=_lead, variant=_v)
        _add(f"k_zero-3d-{act_name(_a)}-{_v}", check_k_zero, act=_a, lead=(2, 3), variant=_v)
    for _m, _k in ((1, 600), (5, 33), (50, 1000)):
        _add(f"raw_vs_packed-{_m}x{_k}-{_v}", check_raw_vs_packed, variant=_v, m=_m, k=_k)
    _add(f"int8_k_limit-{_v}", check_int8_k_limit, variant=_v)
for _a, _b in itertools.product(ACTIVATIONS, (False, True)):
    _add(f"int8_variants_identical-{act_name(_a)}-{'bias' if _b else 'nobias'}",
         check_int8_variants_identical, act=_a, bias=_b)

# Checks that fail because of a library bug (reported, not fixed here): id -> reason.
# In-process they are xfail(strict=True); the per-ISA batches skip them.
_K0_ND_BUG = (
    "library bug: linear with K == 0 and x.ndim != 2 (x of shape (3, 0) is fine, "
    "(0,) or (2, 3, 0) is not) raises ValueError 'cannot reshape array of size 0 into "
    "shape (0)' from x.reshape(-1, k) in _gemm.linear; NumPy gives act(bias) broadcast "
    "to x.shape[:-1] + (N,)")
KNOWN_BUGS: dict = {}  # the K == 0 reshape bug (_K0_ND_BUG) is fixed


# ---------------------------------------------------------------------------
# Batches: what one subprocess per ISA runs
# ---------------------------------------------------------------------------

BATCHES = {
    "cube": lambda: case_items(cases_cube(), run_case),
    "edge_grid": lambda: case_items(cases_edge_grid(), run_case),
    "sizes": lambda: case_items(cases_sizes(), run_case),
    "layouts": lambda: case_items(cases_layouts(), run_case),
    "special": lambda: check_items(SPECIAL_CHECKS),
}
# Batches that also run in-process with one test id per item (test_linear_case,
# test_linear_special): on the in-process ISA the batch itself is skipped.
IN_PROCESS_BATCHES = ("sizes", "layouts", "special")


def run_batch(name: str, isa: str | None = None) -> dict:
    """Run every item of one batch on this process's ISA; report failures."""
    isa = isa or current_isa()
    with blas_single_thread():
        return run_batch_items(BATCHES[name](), isa, KNOWN_BUGS)


def _run_on_isa(isa: str, call: str):
    """Evaluate ``call`` (an expression on this module, returning JSON-able data)
    on the ISA path ``isa``: in-process when that is this process's path, else in
    a subprocess with PYKERNELS_ISA set."""
    if isa == current_isa():
        return json.loads(json.dumps(eval(call, {"test_linear": sys.modules[__name__]})))
    return run_call_under_isa(isa, "test_linear", call)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_linear_batch_under_isa(isa, batch):
    """Each batch on each ISA path (a subprocess with PYKERNELS_ISA set, or this
    process for its own path)."""
    if batch in IN_PROCESS_BATCHES and isa == current_isa():
        pytest.skip(f"the {batch} batch runs in-process on {isa} with one test id per item")
    res = _run_on_isa(isa, f"test_linear.run_batch({batch!r})")
    assert_batch_passed(res, isa, batch)


# ---------------------------------------------------------------------------
# The same cases in-process (default ISA), one test id each
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id)
                                  for c in itertools.chain(cases_sizes(), cases_layouts())])
def test_linear_case(case):
    msg = run_case(case, current_isa())
    assert msg is None, msg


@pytest.mark.parametrize("check", list(special_params(SPECIAL_CHECKS, KNOWN_BUGS)))
def test_linear_special(check):
    check(current_isa())


# ---------------------------------------------------------------------------
# Library bugs found by this file (xfail strict; reproducers in the reasons)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_tiny_row_scale(variant):
    rng = np.random.default_rng(9)
    k, n = 64, 24
    w = rand(rng, k, n)
    x = rand(rng, 3, k)
    x[1] *= np.float32(1e-38)  # a legitimate, finite, tiny row (values ~1e-38, some subnormal)
    res = pk.linear(x, pk.pack(w, precision="int8"), variant=variant)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_fro(res[1], ref[1]) <= CONTRACT["int8"], rel_fro(res[1], ref[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_quantizes_in_float32_with_a_double_fallback(variant):
    """The documented rule (pykernels.testing.quantize_rows): x * float32(127 /
    max) rounded in float32, where a double product would round some values
    the other way; rows and columns too tiny for a float32 inverse (max <
    ~3.7e-37) in double. Bit-exact to the emulation in each case."""
    k = n = 48
    amax = np.float32(3.3)
    inv32 = np.float32(127.0 / np.float64(amax))
    # values whose float32 product is a tie n + 0.5 (rounds to even) while the
    # double product is not: the two arithmetics give different q
    cand = ((np.arange(1, 127) + 0.5) / np.float64(inv32)).astype(F32)
    cand = np.concatenate([cand, np.nextafter(cand, F32(np.inf)), np.nextafter(cand, F32(0))])
    prod32 = cand * inv32
    differ = np.rint(prod32) != np.rint(cand.astype(np.float64) * np.float64(inv32))
    assert differ.any()  # the rule matters for these inputs
    row = np.resize(cand[differ], k - 1).astype(F32)
    x = np.zeros((3, k), F32)
    x[0, 0], x[0, 1:] = amax, row
    x[1] = -x[0]
    x[2] = x[0] * np.float32(1e-38)  # tiny: the double fallback
    w = np.eye(k, n, dtype=F32) * np.float32(2.0)
    w[:, 5] *= np.float32(1e-38)      # a tiny weight column
    res = pk.linear(x, pk.pack(w, precision="int8"), variant=variant)
    np.testing.assert_array_equal(res, int8_emulate(x, w))


def test_int8_tiny_weight_column():
    w = np.array([[1e-38], [0.0]], F32)
    pw = pk.pack(w, precision="int8")
    assert pw.rel_error <= 1e-2, pw.rel_error


@pytest.mark.parametrize("precision", ["fp32", "bf16", "raw"])
def test_out_aliasing_bias(precision):
    rng = np.random.default_rng(0)
    k, n = 1000, 64
    x, w = rand(rng, 1, k), rand(rng, k, n)
    w_arg = w if precision == "raw" else pk.pack(w, precision=precision)
    out = rand(rng, 1, n)
    expected = pk.linear(x, w_arg, out[0].copy(), variant="throughput")
    pk.linear(x, w_arg, out[0], out=out, variant="throughput")
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("wk", ["raw", "fp32", "bf16", "int8"])
def test_empty_out_with_zero_rows(wk):
    """out=np.empty((0, N)) (NumPy gives it strides (0, 0)) is accepted, as np.matmul does."""
    w = np.ones((3, 5), F32)
    for shape in ((0, 5), (2, 0, 5)):
        out = np.empty(shape, F32)
        res = pk.linear(np.zeros(shape[:-1] + (3,), F32), w if wk == "raw" else
                        pk.pack(w, precision=wk), out=out)
        assert res is out


# ---------------------------------------------------------------------------
# Every precision matches its own generic-path result on every ISA
# ---------------------------------------------------------------------------

ISA_SHAPES = ((9, 40, 1001), (33, 70, 257), (1, 17, 4096))


def isa_consistency_results(path: str) -> dict:
    """Compute every (shape, precision, variant, threads, activation, bias) result
    on this process's ISA into ``path`` (npz); returns a summary."""
    res = {}
    for si, (m, n, k) in enumerate(ISA_SHAPES):
        rng = np.random.default_rng(500 + si)
        x, w, b = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
        for precision in PRECISIONS:
            pw = pk.pack(w, precision=precision)
            for v, t, a, bias in itertools.product(VARIANTS, (1, 2), ACTIVATIONS, (False, True)):
                key = f"{si}|{precision}|{v}|{t}|{act_name(a)}|{int(bias)}"
                res[key] = pk.linear(x, pw, b if bias else None, activation=a, variant=v,
                                     threads=t)
    np.savez(path, **res)
    return {"isa": current_isa(), "count": len(res)}


@pytest.fixture(scope="module")
def generic_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("isa") / "generic.npz")
    info = _run_on_isa("generic", f"test_linear.isa_consistency_results({path!r})")
    assert info["isa"] == "generic"
    return dict(np.load(path))


# Bounds against the generic path: the contract's; and tighter, since every ISA
# computes the same thing from the same rounded/quantized operands: fp32 and
# bf16 differ only in fp32 summation order (rel. diff ~sqrt(K) eps32 < 1e-5);
# int8 only in the smooth activations' last bits (generic has no FMA).
SAME_NUMERICS_BOUND = {"fp32": 1e-5, "bf16": 1e-5}


def test_every_isa_matches_generic(isa, generic_results, tmp_path):
    """Each ISA against the generic path, for every shape x precision x variant x
    threads x activation x bias of ISA_SHAPES: within the contract bound, and
    within SAME_NUMERICS_BOUND for fp32/bf16. int8: bit-identical to generic with
    no activation and relu (exact int32 sums, the same fp32 dequantization); the
    smooth activations may differ in the last bits (the generic build has no FMA,
    so its polynomial rounds differently), within 2 * ACT_TOL. On one ISA, int8 is
    bit-identical across variants and thread counts for every activation."""
    if isa == "generic":
        got = generic_results
    else:
        path = str(tmp_path / f"{isa}.npz")
        info = _run_on_isa(isa, f"test_linear.isa_consistency_results({path!r})")
        assert info["isa"] == isa
        got = dict(np.load(path))
    assert got.keys() == generic_results.keys()
    failures = []
    for key, r in got.items():
        g = generic_results[key]
        si, precision, variant, threads, act, bias = key.split("|")
        err = rel_fro(r, g)
        if not err <= CONTRACT[precision]:
            failures.append(f"{key}: rel. diff to generic {err:.3g} > contract")
        if precision == "int8":
            if act in ("none", "relu"):
                if not np.array_equal(r, g):
                    failures.append(f"{key}: int8 not bit-identical to the generic path")
            else:
                a = None if act == "none" else act
                d = np.abs(r.astype(np.float64) - g)
                if not np.all(d <= 2 * act_tol(a, g)):
                    failures.append(f"{key}: int8 + {act} differs from generic by {d.max():.3g}")
        elif not err <= SAME_NUMERICS_BOUND[precision]:
            failures.append(f"{key}: rel. diff to generic {err:.3g} > "
                            f"{SAME_NUMERICS_BOUND[precision]:g}")
        if precision == "int8":  # bit-identical across variants and threads on one ISA
            base = got["|".join([si, precision, "latency", "1", act, bias])]
            if not np.array_equal(r, base):
                failures.append(f"{key}: int8 differs from latency/1 thread on {isa}")
    assert not failures, "\n".join(failures[:20])


# ---------------------------------------------------------------------------
# Vector math: the fused activations on a dense grid and at large magnitudes
# ---------------------------------------------------------------------------

def activation_grid_errors() -> dict:
    """max |act_kernel(x) - act(x)| / max(1, |x|) over a grid of x in [-20, 20]
    (step 4e-4, 100 001 points) plus large magnitudes, computed as linear(x, ones) so the
    activation sees x exactly (K = 1, w = 1); full vectors (N = 16) and the
    partial-vector edge path (N = 1), both variants. Also counts non-finite
    outputs (there must be none for finite inputs)."""
    g = np.linspace(-20.0, 20.0, 100_001).astype(F32)
    big = np.array([1e4, 88.0, 100.0, 87.3, 88.4, 88.7, 89.0, 90.0, 1e3, 1e6, 1e10, 1e20, 1e30,
                    3.4e38, 1e-3, 1e-10, 1e-30, 1e-40], F32)
    x = np.concatenate([g, big, -big, np.array([0.0, -0.0], F32)])
    x64 = x.astype(np.float64)
    out = {}
    for act in ("gelu", "gelu_tanh", "silu", "relu"):
        ref = act64(act, x64)
        for n, variant in itertools.product((1, 16), VARIANTS):
            r = pk.linear(x[:, None], np.ones((1, n), F32), activation=act, variant=variant)
            r64 = r.astype(np.float64)
            scaled = np.abs(r64 - ref[:, None]) / np.maximum(1.0, np.abs(x64))[:, None]
            i = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(scaled), scaled, np.inf))),
                                 scaled.shape)
            out[f"{act}-n{n}-{variant}"] = {
                "max_scaled_err": float(np.max(np.where(np.isnan(scaled), np.inf, scaled))),
                "worst_x": float(x[i[0]]), "got": float(r[i]), "ref": float(ref[i[0]]),
                "nonfinite": int((~np.isfinite(r)).sum()),
                "columns_differ": bool(n > 1 and not (r == r[:, :1]).all()),
            }
    return {"isa": current_isa(), "errors": out}


def _check_activation_errors(res):
    failures = []
    for key, e in res["errors"].items():
        if e["nonfinite"]:
            failures.append(f"{key}: {e['nonfinite']} non-finite outputs for finite inputs")
        if not e["max_scaled_err"] <= ACT_TOL:
            failures.append(f"{key}: |err|/max(1,|x|) = {e['max_scaled_err']:.3g} > {ACT_TOL:g} "
                            f"at x = {e['worst_x']!r} (got {e['got']!r}, ref {e['ref']!r})")
        if e["columns_differ"]:
            failures.append(f"{key}: the same input gave different outputs across columns")
    assert not failures, f"on {res['isa']}:\n" + "\n".join(failures)


def test_activation_vector_math(isa):
    res = _run_on_isa(isa, "test_linear.activation_grid_errors()")
    assert res["isa"] == isa
    _check_activation_errors(res)


def test_activation_special_values():
    """NaN stays NaN through every activation; relu maps -Inf to 0 and keeps +Inf;
    GELU/SiLU of +Inf is +Inf; -0.0 and tiny values give (near) zero."""
    x = np.array([[np.nan], [np.inf], [-np.inf], [-0.0], [1e-30]], F32)
    one = np.ones((1, 4), F32)
    for act in ACTIVATIONS:
        r = pk.linear(x, one, activation=act)
        assert np.isnan(r[0]).all(), act
        if act in (None, "relu", "gelu", "gelu_tanh", "silu"):
            assert (r[1] == np.inf).all(), (act, r[1])
        assert np.abs(r[3:]).max() <= 1e-30, (act, r[3:])
    np.testing.assert_array_equal(pk.linear(x, one, activation="relu")[2], 0.0)
    np.testing.assert_array_equal(pk.linear(x, one)[2], -np.inf)


# ---------------------------------------------------------------------------
# PackedWeight: attributes, pickling, validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 16), (33, 17), (130, 300)])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_pack_attributes(precision, layout, k, n):
    rng = np.random.default_rng(k * n)
    w = rand(rng, k, n) if layout == "kn" else rand(rng, n, k)
    w0 = w.copy()
    pw = pk.pack(w, precision=precision, layout=layout)
    np.testing.assert_array_equal(w, w0)
    assert isinstance(pw, pk.PackedWeight)
    assert pw.shape == (k, n)
    assert pw.precision == precision
    assert isinstance(pw.nbytes, int) and pw.nbytes >= k * n * {"fp32": 4, "bf16": 2, "int8": 1}[
        precision]
    assert isinstance(pw.rel_error, float)
    w_eff = w if layout == "kn" else w.T
    if precision == "fp32":
        assert pw.rel_error == 0.0
    elif precision == "bf16":
        w64 = w_eff.astype(np.float64)
        exp = np.linalg.norm(w64 - bf16_round(w_eff)) / np.linalg.norm(w64)
        assert pw.rel_error == pytest.approx(exp, rel=1e-6, abs=1e-12)
    else:
        assert pw.rel_error == pytest.approx(int8_weight_error(w_eff), rel=1e-5, abs=1e-12)
    assert "PackedWeight" in repr(pw) and precision in repr(pw)


def test_pack_sizes_and_errors_on_gaussian_weights():
    """nbytes: int8 ~1/4 of fp32 (plus one fp32 scale per column), bf16 1/2.
    rel_error on Gaussian weights: fp32 0; bf16 ~2^-9 (8 significant bits, RNE:
    relative RMS error ~1.7e-3); int8 ~1e-2 (step max/127 over ~3.3 sigma at
    K = 1024: RMS 3.3/127/sqrt(12) ~ 7.5e-3)."""
    rng = np.random.default_rng(0)
    w = rand(rng, 1024, 1024)
    p = {prec: pk.pack(w, precision=prec) for prec in PRECISIONS}
    assert p["fp32"].nbytes >= 4 * w.size
    assert p["bf16"].nbytes / p["fp32"].nbytes == pytest.approx(0.5, abs=0.01)
    assert p["int8"].nbytes / p["fp32"].nbytes == pytest.approx(0.25, abs=0.01)
    assert p["fp32"].rel_error == 0.0
    assert 2 ** -11 <= p["bf16"].rel_error <= 2 ** -8, p["bf16"].rel_error
    assert 3e-3 <= p["int8"].rel_error <= 2e-2, p["int8"].rel_error


def test_pack_keeps_bf16_and_int8_usable_after_source_changes():
    """The pack is a copy: changing w afterwards does not change the results."""
    rng = np.random.default_rng(2)
    w, x = rand(rng, 40, 20), rand(rng, 3, 40)
    for precision in PRECISIONS:
        src = w.copy()
        pw = pk.pack(src, precision=precision)
        before = pk.linear(x, pw)
        src[...] = 0
        np.testing.assert_array_equal(pk.linear(x, pw), before)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_pickle_round_trip_is_bit_identical(precision, layout):
    rng = np.random.default_rng(3)
    w = rand(rng, 77, 45) if layout == "kn" else rand(rng, 45, 77)
    pw = pk.pack(w, precision=precision, layout=layout)
    blob = pickle.dumps(pw)
    clone = pickle.loads(blob)
    assert isinstance(clone, pk.PackedWeight)
    assert (clone.shape, clone.precision, clone.nbytes, clone.rel_error) == \
        (pw.shape, pw.precision, pw.nbytes, pw.rel_error)
    assert pickle.dumps(clone) == blob
    b = rand(rng, 45)
    for m, variant, act in itertools.product((1, 9, 50), VARIANTS, (None, "gelu")):
        x = rand(rng, m, 77)
        np.testing.assert_array_equal(
            pk.linear(x, clone, b, activation=act, variant=variant, threads=1),
            pk.linear(x, pw, b, activation=act, variant=variant, threads=1))
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.dumps(pickle.loads(pickle.dumps(pw, protocol=protocol))) == blob


def test_pickle_crosses_processes_and_isas(isa, tmp_path):
    """bf16 and int8 PackedWeights pickled here run in a process on every ISA;
    int8 gives bit-identical results there (no activation)."""
    rng = np.random.default_rng(6)
    w, x = rand(rng, 70, 33), rand(rng, 8, 70)
    pws = {p: pk.pack(w, precision=p) for p in PRECISIONS}
    here = {p: pk.linear(x, pw, variant="latency") for p, pw in pws.items()}
    path = tmp_path / "pw.pkl"
    path.write_bytes(pickle.dumps((pws, x)))
    code = (
        "import json, pickle, numpy as np, pykernels as pk\n"
        f"pws, x = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "res = {p: [pk.linear(x, pw, variant=v).tolist() for v in ('latency', 'throughput')]\n"
        "       for p, pw in pws.items()}\n"
        "print(json.dumps({'isa': pk.cpu_info().isa, 'res': res}))\n"
    )
    out = run_json_under_isa(isa, code)
    assert out["isa"] == isa
    for p, results in out["res"].items():
        for r in results:
            r = np.array(r, dtype=F32)
            if p == "int8":
                np.testing.assert_array_equal(r, here[p])
            else:
                assert rel_fro(r, here[p]) <= SAME_NUMERICS_BOUND[p]


def _alter(index, fn):
    def make(args):
        args = list(args)
        while len(args) <= index:
            args.append(None)
        args[index] = fn(args[index])
        return tuple(args)
    return make


def _drop_scale(args):
    return tuple(args[:5])


def _scale_nan(s):
    a = np.frombuffer(s, dtype=F32).copy()
    a[3] = np.nan
    return a.tobytes()


def _scale_negative(s):
    a = np.frombuffer(s, dtype=F32).copy()
    a[0] = -a[0] - 1.0
    return a.tobytes()


def _scale_inf(s):
    a = np.frombuffer(s, dtype=F32).copy()
    a[-1] = np.inf
    return a.tobytes()


# PackedWeight.__reduce__() -> (fn, (version, shape, precision, payload, rel_error, scale))
CORRUPTIONS = {
    "payload_truncated_by_one": _alter(3, lambda p: p[:-1]),
    "payload_truncated_half": _alter(3, lambda p: p[:len(p) // 2]),
    "payload_empty": _alter(3, lambda p: b""),
    "payload_extended": _alter(3, lambda p: p + b"\0" * 16),
    "payload_none": _alter(3, lambda p: None),
    "payload_str": _alter(3, lambda p: p.decode("latin-1")),
    "precision_unknown": _alter(2, lambda p: "bogus"),
    "precision_fp16": _alter(2, lambda p: "fp16"),
    "precision_uppercase": _alter(2, lambda p: p.upper()),
    "precision_none": _alter(2, lambda p: None),
    "shape_k_altered": _alter(1, lambda s: (s[0] + 5, s[1])),
    "shape_n_altered": _alter(1, lambda s: (s[0], s[1] + 16)),
    "shape_swapped": _alter(1, lambda s: (s[1], s[0])),
    "shape_negative": _alter(1, lambda s: (-s[0], -s[1])),
    "shape_zero": _alter(1, lambda s: (0, s[1])),
    "shape_three_dims": _alter(1, lambda s: (s[0], s[1], 1)),
    "shape_not_a_tuple": _alter(1, lambda s: "77x45"),
    "version_unknown": _alter(0, lambda v: v + 1),
}
INT8_CORRUPTIONS = {
    "scale_missing": _drop_scale,
    "scale_none": _alter(5, lambda s: None),
    "scale_truncated": _alter(5, lambda s: s[:-4]),
    "scale_extended": _alter(5, lambda s: s + b"\0\0\0\0"),
    "scale_nan": _alter(5, _scale_nan),
    "scale_inf": _alter(5, _scale_inf),
    "scale_negative": _alter(5, _scale_negative),
}


def _corruption_params():
    for precision in PRECISIONS:
        for name, fn in CORRUPTIONS.items():
            yield pytest.param(precision, fn, id=f"{precision}-{name}")
    for name, fn in INT8_CORRUPTIONS.items():
        yield pytest.param("int8", fn, id=f"int8-{name}")


@pytest.mark.parametrize("precision,corrupt", list(_corruption_params()))
def test_corrupted_pickle_is_value_error(precision, corrupt):
    rng = np.random.default_rng(1)
    pw = pk.pack(rand(rng, 77, 45), precision=precision)
    fn, args = pw.__reduce__()
    assert len(args) >= 5 and isinstance(args[3], bytes), "unexpected __reduce__ format"
    blob = pickle.dumps(CraftedPickle(fn, corrupt(args)))
    with pytest.raises(ValueError):
        pickle.loads(blob)


def test_pickle_of_each_precision_rejects_another_precisions_payload():
    """A payload relabeled with another precision is refused (the sizes differ)."""
    rng = np.random.default_rng(4)
    w = rand(rng, 77, 45)
    for src, dst in itertools.permutations(PRECISIONS, 2):
        fn, args = pk.pack(w, precision=src).__reduce__()
        args = list(args)
        args[2] = dst
        if dst == "int8" and len(args) > 5 and args[5] is None:
            args[5] = np.ones(45, F32).tobytes()
        with pytest.raises(ValueError):
            pickle.loads(pickle.dumps(CraftedPickle(fn, tuple(args))))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_pack_int8_nonfinite_weights_is_value_error(value, layout):
    w = np.ones((8, 5), F32)
    w[3, 2] = value
    w0 = w.copy()
    with pytest.raises(ValueError):
        pk.pack(w if layout == "kn" else w.T, precision="int8", layout=layout)
    np.testing.assert_array_equal(w, w0)


def test_bf16_rel_error_of_nan_weight_is_not_zero():
    w = np.ones((4, 3), F32)
    w[1, 2] = np.nan
    rel = pk.pack(w, precision="bf16").rel_error
    assert not rel == 0.0, rel


def test_bf16_rel_error_of_inf_weight_is_nan():
    w = np.ones((4, 3), F32)
    w[1, 2] = np.inf
    assert math.isnan(pk.pack(w, precision="bf16").rel_error)


@pytest.mark.parametrize("precision", ["fp16", "bogus", "BF16", "int4", "", None, 8])
def test_pack_unknown_precision_is_value_error(precision):
    if precision == "fp16" and "avx512_fp16" in pk.cpu_info().features:
        pytest.skip("fp16 is optional where the CPU has AVX512-FP16")
    with pytest.raises(ValueError):
        pk.pack(np.ones((4, 4), F32), precision=precision)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("dtype", [np.float64, np.int8, ml_dtypes.bfloat16],
                         ids=["float64", "int8", "bfloat16"])
def test_pack_lowp_wrong_dtype_is_type_error(precision, dtype):
    with pytest.raises(TypeError) as ei:
        pk.pack(np.ones((4, 4), dtype), precision=precision)
    assert np.dtype(dtype).name in str(ei.value)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pack_empty_weight_is_value_error_or_numpy(precision):
    for shape in ((0, 5), (5, 0)):
        try:
            pw = pk.pack(np.zeros(shape, F32), precision=precision)
        except ValueError:
            continue
        k, n = shape
        np.testing.assert_array_equal(pk.linear(np.ones((2, k), F32), pw), np.zeros((2, n), F32))


# ---------------------------------------------------------------------------
# Bad input: a clear exception, and every array the caller passed unchanged
# ---------------------------------------------------------------------------

def _xwb(m=3, k=4, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return rand(rng, m, k), rand(rng, k, n), rand(rng, n)


def _w_arg(w, kind):
    return w if kind == "raw" else pk.pack(w, precision=kind)


W_ARGS = ["raw", "fp32", "bf16", "int8"]


@pytest.mark.parametrize("wk", W_ARGS)
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16, ml_dtypes.bfloat16],
                         ids=["float64", "int32", "float16", "bfloat16"])
def test_wrong_x_dtype_is_type_error_naming_dtype_and_fix(dtype, wk):
    x, w, b = _xwb()
    x = x.astype(dtype)
    x0 = x.copy()
    with pytest.raises(TypeError) as ei:
        pk.linear(x, _w_arg(w, wk), b)
    msg = str(ei.value)
    assert np.dtype(dtype).name in msg, msg
    assert "float32" in msg and ("astype" in msg or "asarray" in msg), msg
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("value", [
    pytest.param([[1.0, 2.0, 3.0, 4.0]], id="list"),
    pytest.param(((1.0, 2.0, 3.0, 4.0),), id="tuple"),
    pytest.param(None, id="None"),
    pytest.param(2.0, id="scalar"),
])
@pytest.mark.parametrize("wk", W_ARGS)
def test_non_array_x_is_type_error(value, wk):
    _, w, _ = _xwb()
    with pytest.raises(TypeError) as ei:
        pk.linear(value, _w_arg(w, wk))
    assert "float32" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("value", [
    pytest.param([[1.0] * 5] * 4, id="list"),
    pytest.param(None, id="None"),
    pytest.param(np.ones((4, 5), np.float64), id="float64"),
])
def test_bad_w_is_type_error(value):
    x, _, _ = _xwb()
    with pytest.raises(TypeError):
        pk.linear(x, value)


@pytest.mark.parametrize("wk", W_ARGS)
@pytest.mark.parametrize("x_shape", [(3, 5), (2, 3, 7), (5,)], ids=["2d", "3d", "1d"])
def test_mismatched_k_is_value_error_naming_both_shapes(x_shape, wk):
    _, w, _ = _xwb(k=4, n=6)
    x = np.ones(x_shape, F32)
    with pytest.raises(ValueError) as ei:
        pk.linear(x, _w_arg(w, wk))
    msg = str(ei.value)
    assert str(x_shape) in msg and "(4, 6)" in msg, msg


def test_zero_dim_x_is_value_error():
    _, w, _ = _xwb()
    with pytest.raises(ValueError):
        pk.linear(np.array(1.0, F32), w)


@pytest.mark.parametrize("wk", W_ARGS)
@pytest.mark.parametrize("dtype", [np.float64, np.int32, ml_dtypes.bfloat16],
                         ids=["float64", "int32", "bfloat16"])
def test_bias_wrong_dtype_is_type_error(dtype, wk):
    x, w, b = _xwb()
    b = b.astype(dtype)
    with pytest.raises(TypeError) as ei:
        pk.linear(x, _w_arg(w, wk), b)
    assert np.dtype(dtype).name in str(ei.value), str(ei.value)


@pytest.mark.parametrize("wk", W_ARGS)
@pytest.mark.parametrize("shape", [(4,), (6,), (1, 5), (5, 1), ()],
                         ids=["short", "long", "row", "column", "scalar"])
def test_bias_wrong_shape_is_value_error(shape, wk):
    x, w, _ = _xwb()
    with pytest.raises(ValueError) as ei:
        pk.linear(x, _w_arg(w, wk), np.ones(shape, F32))
    assert "bias" in str(ei.value)


def test_bias_list_is_type_error():
    x, w, _ = _xwb()
    with pytest.raises(TypeError):
        pk.linear(x, w, [0.0] * 5)


@pytest.mark.parametrize("wk", W_ARGS)
def test_strided_bias_is_correct_or_value_error(wk):
    """A non-contiguous bias is either used correctly or refused with ValueError."""
    x, w, _ = _xwb(5, 9, 6)
    bias = np.arange(12, dtype=F32)[::2]
    try:
        res = pk.linear(x, _w_arg(w, wk), bias)
    except ValueError:
        return
    exp = pk.linear(x, _w_arg(w, wk), np.ascontiguousarray(bias))
    np.testing.assert_array_equal(res, exp)


@pytest.mark.parametrize("act", ["tanh", "GELU", "Relu", "gelu_erf", "", "none", 1, True,
                                 pytest.param(np.tanh, id="callable")])
@pytest.mark.parametrize("wk", W_ARGS)
def test_unknown_activation_is_value_error(act, wk):
    x, w, b = _xwb()
    with pytest.raises(ValueError):
        pk.linear(x, _w_arg(w, wk), b, activation=act)


@pytest.mark.parametrize("variant", ["fast", "", "LATENCY", None, "throughput "])
@pytest.mark.parametrize("wk", W_ARGS)
def test_unknown_variant_is_value_error(variant, wk):
    x, w, _ = _xwb()
    with pytest.raises(ValueError):
        pk.linear(x, _w_arg(w, wk), variant=variant)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"], ids=["0", "-1", "1.5", "True", "str"])
def test_bad_threads_is_value_error(threads):
    x, w, _ = _xwb()
    with pytest.raises(ValueError):
        pk.linear(x, pk.pack(w, precision="int8"), threads=threads)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_gemm_with_lowp_weight_points_to_linear(precision):
    x, w, _ = _xwb()
    out = np.full((3, 5), 7.0, F32)
    with pytest.raises(ValueError) as ei:
        pk.gemm(x, pk.pack(w, precision=precision), out=out)
    assert "linear" in str(ei.value), str(ei.value)
    assert precision in str(ei.value)
    np.testing.assert_array_equal(out, 7.0)


def _bad_outs():
    yield pytest.param(lambda lead, n: np.zeros(lead + (n + 1,), F32), id="shape_wide")
    yield pytest.param(lambda lead, n: np.zeros((n,) + lead, F32), id="shape_transposed")
    yield pytest.param(lambda lead, n: np.zeros((int(np.prod(lead)) * n,), F32), id="shape_flat")
    yield pytest.param(lambda lead, n: np.zeros(lead + (n,), np.float64), id="dtype_float64")
    yield pytest.param(lambda lead, n: np.zeros(lead + (2 * n,), F32)[..., ::2],
                       id="last_stride_2")
    yield pytest.param(lambda lead, n: np.zeros(lead + (n,), F32, order="F"), id="fortran")
    yield pytest.param(lambda lead, n: np.zeros(lead + (n,), F32)[..., ::-1], id="reversed")

    def readonly(lead, n):
        o = np.zeros(lead + (n,), F32)
        o.flags.writeable = False
        return o
    yield pytest.param(readonly, id="read_only")
    yield pytest.param(lambda lead, n: [[0.0] * n] * int(np.prod(lead)), id="list")


@pytest.mark.parametrize("lead", [(3,), (3, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("wk", W_ARGS)
@pytest.mark.parametrize("make_out", list(_bad_outs()))
def test_bad_out_is_value_error_and_nothing_changes(make_out, wk, lead):
    rng = np.random.default_rng(0)
    x, w, b = rand(rng, *lead, 4), rand(rng, 4, 5), rand(rng, 5)
    out = make_out(lead, 5)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    out0 = None if isinstance(out, list) else np.array(out, copy=True)
    with pytest.raises(ValueError):
        pk.linear(x, _w_arg(w, wk), b, out=out)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
    if out0 is not None:
        np.testing.assert_array_equal(out, out0)


@pytest.mark.parametrize("precision", ["int8", "int8_7bit"])
def test_int8_k_beyond_exact_accumulation_is_refused_or_correct(precision):
    """K > 131072 could overflow int32 sums (K * 127^2 >= 2^31): refused with a
    ValueError naming K, or computed within the contract."""
    k = 131073
    rng = np.random.default_rng(0)
    w = rand(rng, k, 3)
    x = rand(rng, 2, k)
    pw = pk.pack(w, precision=precision)
    try:
        res = pk.linear(x, pw)
    except ValueError as e:
        assert "K" in str(e)
        return
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_fro(res, ref) <= CONTRACT[precision]


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------

def _concurrent_specs():
    rng = np.random.default_rng(77)
    w_shared = rand(rng, 96, 80)
    shared = {p: pk.pack(w_shared, precision=p) for p in PRECISIONS}
    specs = []
    shapes = [(1, 80, 96), (3, 80, 96), (40, 80, 96), (5, 33, 17), (64, 64, 64),
              (100, 70, 130), (13, 129, 65), (2, 300, 201)]
    for i, (m, n, k) in enumerate(shapes):
        w = w_shared if (k, n) == (96, 80) else rand(rng, k, n)
        b = rand(rng, n)
        for j, (precision, variant) in enumerate(itertools.product(PRECISIONS, VARIANTS)):
            w_arg = shared[precision] if w is w_shared else pk.pack(w, precision=precision)
            if precision == "fp32" and j % 2 == 0 and w is not w_shared:
                w_arg = w  # some raw fp32 weights too
            act = ACTIVATIONS[(i + j) % len(ACTIVATIONS)]
            specs.append((rand(rng, m, k), w_arg, b if (i + j) % 2 else None, act, variant,
                          (1, 2, None)[(i + j) % 3]))
    return specs


def test_concurrent_calls_match_serial_exactly():
    """8 Python threads, each making every call (mixed precisions, variants,
    activations, thread counts, shared PackedWeights of each precision) in its own
    order, 3 rounds: each result is bit-identical to the same call made serially."""
    specs = _concurrent_specs()

    def call(spec):
        x, w, b, act, variant, threads = spec
        return pk.linear(x, w, b, activation=act, variant=variant, threads=threads)

    serial = [call(s) for s in specs]
    errors = []
    barrier = threading.Barrier(8)

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(specs))
        try:
            barrier.wait()
            for _ in range(3):
                for j in order:
                    got = call(specs[j])
                    if not np.array_equal(got, serial[j]):
                        x, w, b, act, variant, threads = specs[j]
                        errors.append(f"call {j} ({x.shape} x {getattr(w, 'precision', 'raw')} "
                                      f"{w.shape}, {variant}, {act}, threads={threads}) differs "
                                      "from the serial result")
                        return
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {seed}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a linear thread hung"
    assert not errors, "\n".join(errors[:10])


def test_concurrent_calls_with_out():
    """Threads writing into their own out= buffers (int8 and bf16, both variants)."""
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, 30, 50), rand(rng, 50, 40), rand(rng, 40)
    pws = [pk.pack(w, precision=p) for p in ("bf16", "int8")]
    expected = [[pk.linear(x, pw, b, activation="gelu", variant=v) for v in VARIANTS]
                for pw in pws]
    errors = []

    def worker(i):
        for j in range(40):
            p, v = (i + j) % 2, j % 2
            out = np.full((30, 40), np.nan, F32)
            pk.linear(x, pws[p], b, activation="gelu", out=out, variant=VARIANTS[v],
                      threads=1 + (j % 2))
            if not np.array_equal(out, expected[p][v]):
                errors.append((i, j))
                return

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors, errors[:5]


# Quantizing (int8) or rounding (bf16) the activations is split among the call's
# threads once the rows hold enough elements (gemm_tiles.inc, for_each_row):
# every row is prepared the same way whichever thread does it, so the product
# is the one-thread product, bit for bit, and within the contract. M = 201 rows
# of K = 700 (140,700 elements, rows split unevenly between two threads).
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", PRECISIONS + ("int8_7bit",))
def test_activations_prepared_on_several_threads_match_one(precision, variant):
    rng = np.random.default_rng(201)
    x, w, b = rand(rng, 201, 700), rand(rng, 700, 50), rand(rng, 50)
    x0 = x.copy()
    pw = pk.pack(w, precision=precision)
    # bf16: each scheme this machine has (dpbf16ps reads A as pair words)
    schemes = ["widen"] + (["dpbf16ps"] if precision == "bf16" and pk._core.bf16_dot_available() else [])
    prev = pk.set_bf16_scheme("widen")
    try:
        for scheme in schemes:
            pk.set_bf16_scheme(scheme)
            one = pk.linear(x, pw, b, variant=variant, threads=1)
            two = pk.linear(x, pw, b, variant=variant, threads=2)
            assert np.array_equal(one, two), (precision, variant, scheme)
            ref = x.astype(np.float64) @ w.astype(np.float64) + b
            assert rel_fro(two, ref) <= CONTRACT[precision], scheme
    finally:
        pk.set_bf16_scheme(prev)
    assert np.array_equal(x, x0)
