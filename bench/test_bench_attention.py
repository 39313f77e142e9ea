"""Attention and decode attention: pykernels (latency / throughput x fp32 / bf16,
decode also on a paged cache) against torch.nn.functional.scaled_dot_product_
attention (CPU, ``enable_gqa``, a boolean mask when padded) when torch is
importable, and a NumPy implementation (grouped BLAS matmuls + softmax), each
at the same thread count, in the same run.

Shapes, inputs, the NumPy baseline and the float64 oracle are the ones of
``pykernels bench attention``
(``pykernels.harness.attention.ATTENTION_TARGETS``: decode B in {1, 8}, Hq=32,
Hkv in {32, 8}, D=128, L in {512, 2048, 8192}; causal prefill B=1, H=32,
D=128, S in {512, 2048}; MiniLM B=32, H=12, D=32, S=128 with padding) or, with ``PYKERNELS_BENCH_QUICK=1`` / ``--bench-quick``, its smoke
set ``ATTENTION_QUICK``. Decode B=8 L=8192 Hkv=32 (2 GiB of fp32 K/V) runs only
with ``PYKERNELS_BENCH_BIG=1``.

Every benchmark checks its own output against the float64 reference computed
on the same (bf16-rounded where bf16) inputs, with the CLI's tolerances
(``ATTENTION_REL_TOL`` for pykernels; torch bf16, which rounds P and the
output to bf16, only loosely). ``benchmark.extra_info`` records op, shape,
variant, precision, layout, threads, impl, isa, flops and kv_bytes (decode: the
K/V bytes streamed, for GB/s).
"""
from __future__ import annotations

import os

import pytest

import pykernels as pk
from pykernels.harness.attention import (
    ATTENTION_BASELINE_REL_TOL,
    ATTENTION_QUICK,
    ATTENTION_REL_TOL,
    ATTENTION_TARGETS,
    AttnCase,
    AttnProblem,
)
from pykernels.harness.results import to_numpy32
from pykernels.harness.timing import import_torch, numpy_blas_threads, torch_threads
from pykernels.testing import rel_error
from conftest import bench_quick, let_baseline_workers_idle

pytest.importorskip("ml_dtypes")


def _shapes(config):
    if bench_quick(config):
        return list(ATTENTION_QUICK)
    big = os.environ.get("PYKERNELS_BENCH_BIG", "").strip().lower() not in ("", "0", "false")
    return [s for s in ATTENTION_TARGETS if big or not s.big]


def _id(s) -> str:
    return f"{s.label.replace(' ', '-').replace('/', 'kv')}-d{s.d}"


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("problem", shapes, indirect=True, scope="module",
                             ids=[_id(s) for s in shapes])


@pytest.fixture(scope="module")
def problem(request):
    p = AttnProblem(request.param)
    let_baseline_workers_idle()
    yield p


def _run(benchmark, p: AttnProblem, case: AttnCase, isa, **extra):
    s = p.shape
    threads = pk.get_num_threads()
    benchmark.group = f"{_id(s)} t{threads}"
    benchmark.extra_info.update({
        "op": s.op, "kind": s.kind, "b": s.b, "hq": s.hq, "hkv": s.hkv, "sq": s.sq,
        "skv": s.skv, "d": s.d, "causal": s.causal, "padded": s.padded,
        # the names pykernels.work's ops read (Attention: s_q/s_kv, Decode: kv_len,
        # both: batch), so `pykernels calibrate --from-benchmark` ingests every case
        "s_q": s.sq, "s_kv": s.skv, "kv_len": s.skv, "batch": s.b,
        "variant": case.variant, "precision": case.precision, "layout": case.layout,
        "threads": threads, "impl": case.impl, "isa": isa, "flops": p.flops,
        "kv_bytes": p.kv_bytes(case.precision), **extra,
    })
    torch = import_torch() if case.impl == "torch" else None
    fn = p.call(case, threads, torch)
    result = benchmark(fn)
    tol = ATTENTION_REL_TOL if case.impl == "pykernels" else ATTENTION_BASELINE_REL_TOL[
        case.precision]
    err = rel_error(to_numpy32(result), p.ref(case.precision))
    benchmark.extra_info["rel_error"] = err
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["latency", "throughput"])
def test_pykernels(benchmark, problem, variant, precision, layout, isa):
    if problem.shape.kind != "decode":
        if layout == "paged":
            pytest.skip("a paged cache is a decode layout")
        layout = None
    _run(benchmark, problem, AttnCase("pykernels", precision, variant, layout), isa)


def test_numpy(benchmark, problem, isa):
    with numpy_blas_threads(pk.get_num_threads()) as limited:
        _run(benchmark, problem, AttnCase("numpy", "fp32", None, None), isa,
             threads_limited=limited)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch(benchmark, problem, precision, isa):
    torch = import_torch()
    if torch is None:
        pytest.skip("torch is not importable")
    with torch_threads(torch, pk.get_num_threads()):
        _run(benchmark, problem, AttnCase("torch", precision, None, None), isa,
             threads_limited=True)
