"""fp32 GEMM: pykernels (latency/throughput x prepacked/raw B) against
numpy.matmul (OpenBLAS), scipy.linalg.blas.sgemm and torch.matmul, each at the
same thread count, on the target shapes
(``pykernels.harness.gemm.GEMM_TARGETS``; the same list ``pykernels bench
gemm`` times).

Every benchmark checks its own output against a float64 reference (relative
Frobenius error < 1e-4: fp32 error grows like sqrt(K)*eps, ~4e-6 at K=4096)
and records ``benchmark.extra_info`` for the policy engine. Compare figures
within one run: the ratio to NumPy is the number that matters.
"""
from __future__ import annotations

import pytest

from pykernels.harness.gemm import (GEMM_QUICK, GEMM_REL_TOL, GEMM_TARGETS, GemmCase,
                                    GemmProblem)
from pykernels.harness.timing import blas_threads, torch_threads
from pykernels.testing import rel_error
from conftest import bench_quick, let_baseline_workers_idle, shape_plan, torch_or_skip

OURS = [GemmCase("pykernels", v, b)
        for v in ("latency", "throughput") for b in ("packed", "raw")]


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        plan = shape_plan(GEMM_QUICK if bench_quick(metafunc.config) else GEMM_TARGETS)
        # Module scope: the inputs (up to 64 MiB of B plus its packed copy) are
        # built once per shape and the tests are grouped by shape.
        metafunc.parametrize("problem", plan, indirect=True, scope="module",
                             ids=[f"{m}x{k}x{n}-t{t}" for m, k, n, t in plan])


class Problem:
    def __init__(self, m, k, n, threads):
        self.threads = threads
        self.data = GemmProblem(m, k, n)

    def extra_info(self, case: GemmCase, isa: str) -> dict:
        d = self.data
        return {"op": "gemm", "m": d.m, "k": d.k, "n": d.n, "variant": case.variant,
                "precision": "fp32", "threads": self.threads, "impl": case.impl,
                "isa": isa, "b": case.b, "flops": d.flops}


@pytest.fixture(scope="module")
def problem(request):
    m, k, n, threads = request.param
    p = Problem(m, k, n, threads)
    let_baseline_workers_idle()
    yield p
    del p.data


def _run(benchmark, problem, case, isa, torch=None, **extra):
    fn = problem.data.call(case, problem.threads, torch)
    benchmark.extra_info.update(problem.extra_info(case, isa))
    benchmark.extra_info.update(extra)
    result = benchmark(fn)
    err = rel_error(result, problem.data.ref)
    benchmark.extra_info["rel_error"] = err
    assert err < GEMM_REL_TOL, f"{case.label}: relative error {err:.3g} >= {GEMM_REL_TOL}"


@pytest.mark.parametrize("case", OURS, ids=lambda c: f"{c.variant}-{c.b}")
def test_pykernels(benchmark, problem, case, isa):
    benchmark.group = f"gemm {problem.data.m}x{problem.data.k}x{problem.data.n} t{problem.threads}"
    _run(benchmark, problem, case, isa)


@pytest.mark.parametrize("impl", ["numpy", "scipy"])
def test_blas(benchmark, problem, impl, isa):
    benchmark.group = f"gemm {problem.data.m}x{problem.data.k}x{problem.data.n} t{problem.threads}"
    case = GemmCase(impl, None, "raw")
    with blas_threads(problem.threads) as limited:
        _run(benchmark, problem, case, isa, threads_limited=limited)


def test_torch(benchmark, problem, isa):
    torch = torch_or_skip()
    benchmark.group = f"gemm {problem.data.m}x{problem.data.k}x{problem.data.n} t{problem.threads}"
    case = GemmCase("torch", None, "raw")
    with torch_threads(torch, problem.threads):
        _run(benchmark, problem, case, isa, torch=torch, threads_limited=True)
