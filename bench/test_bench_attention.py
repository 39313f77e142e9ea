"""Attention and decode attention: pykernels (latency / throughput x fp32 / bf16)
against torch.nn.functional.scaled_dot_product_attention (CPU, ``enable_gqa``)
when torch is importable, and a NumPy implementation (BLAS matmuls + softmax),
each at the same thread count, in the same run.

Shapes are the targets of issue 4 (decode B in {1, 8}, Hq=32, Hkv in {32, 8},
D=128, L in {512, 2048, 8192}; causal prefill B=1, H=32, D=128, S in {512,
2048}; MiniLM B=32, H=12, D=32, S=128 with padding) or, with
``PYKERNELS_BENCH_QUICK=1`` / ``--bench-quick``, a few small ones.

Every benchmark checks its own output against a float64 reference computed on
the same (bf16-rounded where bf16) inputs: relative Frobenius error < 1e-4
(fp32 softmax and accumulation; the error grows like sqrt(D) eps32 times the
logit magnitude, ~1e-6 here). ``benchmark.extra_info`` records op, shape,
variant, precision, threads, impl, isa, flops and bytes (decode: the K/V bytes
streamed, for GB/s).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

import pykernels as pk
from pykernels.cli import blas_threads, import_torch, rel_error, torch_threads

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
REL_TOL = 1e-4


def bench_quick(config) -> bool:
    import os

    env = os.environ.get("PYKERNELS_BENCH_QUICK", "").strip().lower()
    return bool(config.getoption("--bench-quick", default=False)) or env not in (
        "", "0", "false", "no")


@dataclass(frozen=True)
class Shape:
    op: str            # "attention" | "decode_attention"
    b: int
    hq: int
    hkv: int
    sq: int            # 1 for decode
    skv: int
    d: int
    causal: bool = False
    padded: bool = False  # mixed kv_lens (MiniLM-style padding)

    @property
    def label(self) -> str:
        if self.op == "decode_attention":
            return f"decode-b{self.b}-hq{self.hq}-hkv{self.hkv}-d{self.d}-L{self.skv}"
        tag = "causal" if self.causal else ("padded" if self.padded else "full")
        return f"prefill-b{self.b}-h{self.hq}-{self.hkv}-d{self.d}-s{self.sq}x{self.skv}-{tag}"


FULL = [
    *(Shape("decode_attention", b, 32, hkv, 1, L, 128)
      for b in (1, 8) for hkv in (32, 8) for L in (512, 2048, 8192)
      if not (b == 8 and L == 8192)),
    Shape("attention", 1, 32, 32, 512, 512, 128, causal=True),
    Shape("attention", 1, 32, 32, 2048, 2048, 128, causal=True),
    Shape("attention", 32, 12, 12, 128, 128, 32, padded=True),
]
QUICK = [
    Shape("decode_attention", 1, 8, 2, 1, 256, 64),
    Shape("attention", 1, 4, 4, 128, 128, 64, causal=True),
    Shape("attention", 4, 12, 12, 32, 32, 32, padded=True),
]


class Problem:
    """Inputs (fp32 and bf16), kv_lens and the float64 references, built once."""

    def __init__(self, s: Shape, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.s = s
        qshape = (s.b, s.hq, s.d) if s.op == "decode_attention" else (s.b, s.hq, s.sq, s.d)
        self.q = rng.standard_normal(qshape, dtype=np.float32)
        self.k = rng.standard_normal((s.b, s.hkv, s.skv, s.d), dtype=np.float32)
        self.v = rng.standard_normal((s.b, s.hkv, s.skv, s.d), dtype=np.float32)
        if s.padded:
            self.lens = rng.integers(s.skv // 4, s.skv + 1, s.b).astype(np.int64)
            self.lens[0] = s.skv
        elif s.op == "decode_attention":
            self.lens = np.full(s.b, s.skv, np.int64)
        else:
            self.lens = None
        self.bf = {"q": self.q.astype(BF16), "k": self.k.astype(BF16), "v": self.v.astype(BF16)}
        self._ref = {}

    def inputs(self, precision):
        if precision == "bf16":
            return self.bf["q"], self.bf["k"], self.bf["v"]
        return self.q, self.k, self.v

    def ref(self, precision):
        if precision not in self._ref:
            q, k, v = (np.asarray(x).astype(np.float64) for x in self.inputs(precision))
            self._ref[precision] = numpy_attention(q, k, v, self.s, self.lens)
        return self._ref[precision]

    @property
    def flops(self) -> int:
        s = self.s
        pairs = s.sq * s.skv
        if s.causal:
            pairs = sum(min(s.skv, i + s.skv - s.sq + 1) for i in range(s.sq))
        if self.lens is not None and s.op == "attention":
            pairs = pairs * float(np.mean(self.lens)) / s.skv
        return int(4 * s.b * s.hq * pairs * s.d)

    def kv_bytes(self, precision) -> int:
        item = 2 if precision == "bf16" else 4
        keys = int(np.sum(self.lens)) if self.lens is not None else self.s.b * self.s.skv
        return 2 * keys * self.s.hkv * self.s.d * item


def numpy_attention(q, k, v, s: Shape, lens):
    """The NumPy a user would write: repeat K/V per group, matmul, masked
    softmax, matmul (in the dtype of the inputs)."""
    decode = s.op == "decode_attention"
    if decode:
        q = q[:, :, None]
    g = s.hq // s.hkv
    if g > 1:
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
    sc = (q @ np.swapaxes(k, -1, -2)) * (1.0 / np.sqrt(s.d))
    if s.causal or lens is not None:
        j = np.arange(s.skv)
        L = np.full(s.b, s.skv) if lens is None else lens
        mask = j[None, None, :] < L[:, None, None]
        if s.causal:
            i = np.arange(q.shape[2])
            mask = mask & (j[None, None, :] <= i[None, :, None] + L[:, None, None] - q.shape[2])
        sc = np.where(mask[:, None], sc, -np.inf)
    m = sc.max(axis=-1, keepdims=True)
    p = np.exp(sc - m)
    out = (p @ v) / p.sum(axis=-1, keepdims=True)
    return out[:, :, 0] if decode else out


def _shapes(config):
    return QUICK if bench_quick(config) else FULL


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("problem", shapes, indirect=True, scope="module",
                             ids=[s.label for s in shapes])


@pytest.fixture(scope="module")
def problem(request):
    p = Problem(request.param)
    time.sleep(0.15)  # let the previous shape's BLAS / torch workers go idle
    yield p


def _record(benchmark, p: Problem, impl, variant, precision, threads, isa):
    s = p.s
    benchmark.group = f"{s.label} t{threads}"
    benchmark.extra_info.update({
        "op": s.op, "b": s.b, "hq": s.hq, "hkv": s.hkv, "sq": s.sq, "skv": s.skv, "d": s.d,
        "causal": s.causal, "padded": s.padded, "variant": variant, "precision": precision,
        "threads": threads, "impl": impl, "isa": isa, "flops": p.flops,
        "kv_bytes": p.kv_bytes(precision),
    })


def _check(benchmark, result, p: Problem, precision):
    err = rel_error(result, p.ref(precision))
    benchmark.extra_info["rel_error"] = err
    assert err < REL_TOL, f"relative error {err:.3g} >= {REL_TOL}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["latency", "throughput"])
def test_pykernels(benchmark, problem, variant, precision, isa):
    p, s = problem, problem.s
    threads = pk.get_num_threads()
    q, k, v = p.inputs(precision)
    _record(benchmark, p, "pykernels", variant, precision, threads, isa)
    if s.op == "decode_attention":
        out = np.empty((s.b, s.hq, s.d), np.float32)
        fn = lambda: pk.decode_attention(q, k, v, p.lens, out=out, variant=variant,  # noqa: E731
                                         threads=threads)
    else:
        out = np.empty((s.b, s.hq, s.sq, s.d), np.float32)
        fn = lambda: pk.attention(q, k, v, causal=s.causal, kv_lens=p.lens, out=out,  # noqa: E731
                                  variant=variant, threads=threads)
    result = benchmark(fn)
    _check(benchmark, result, p, precision)


def test_numpy(benchmark, problem, isa):
    p = problem
    threads = pk.get_num_threads()
    _record(benchmark, p, "numpy", None, "fp32", threads, isa)
    with blas_threads(threads) as limited:
        benchmark.extra_info["threads_limited"] = limited
        result = benchmark(lambda: numpy_attention(p.q, p.k, p.v, p.s, p.lens))
    _check(benchmark, result, p, "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch(benchmark, problem, precision, isa):
    torch = import_torch()
    if torch is None:
        pytest.skip("torch is not importable")
    p, s = problem, problem.s
    threads = pk.get_num_threads()
    dt = torch.float32 if precision == "fp32" else torch.bfloat16
    q, k, v = (torch.from_numpy(x).to(dt) for x in (p.q, p.k, p.v))
    if s.op == "decode_attention":
        q = q[:, :, None]
    mask = None
    if p.lens is not None and s.op == "attention":
        j = torch.arange(s.skv)
        mask = (j[None, :] < torch.from_numpy(p.lens)[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = {"enable_gqa": True} if s.hq != s.hkv else {}

    def run():
        with torch.no_grad():
            return sdpa(q, k, v, attn_mask=mask, is_causal=s.causal and mask is None, **gqa)

    _record(benchmark, p, "torch", None, precision, threads, isa)
    with torch_threads(torch, threads):
        out = benchmark(run)
    res = out.float().numpy()
    if s.op == "decode_attention":
        res = res[:, :, 0]
    # torch computes bf16 in bf16 (rounded P and output): compare loosely
    tol = REL_TOL if precision == "fp32" else 2e-2
    err = rel_error(res, p.ref(precision))
    benchmark.extra_info["rel_error"] = err
    assert err < tol, f"relative error {err:.3g} >= {tol}"
