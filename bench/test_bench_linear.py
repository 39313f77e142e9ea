"""linear (``activation(x @ w + b)``): pykernels in fp32, bf16 and int8, each in
the latency and the throughput variant with its weight prepacked once, against
NumPy fp32 (``x @ w``, ``+ b``, then the activation) and, when torch imports,
``torch.nn.functional.linear`` on float32 and on bfloat16 tensors and torch's
dynamic-quantized int8 Linear (``torch.ao.quantization.quantize_dynamic``), all
at the same thread count, on the target shapes
(``pykernels.harness.linear.LINEAR_TARGETS``: M in {1, 16, 256} at
K = N = 4096, the MiniLM projections K=384 -> N in {1152, 384, 1536} and
K=1536 -> N=384 at M in {1, 32, 256, 4096}, 2048^3; the same list ``pykernels bench linear`` times). Quick mode
(``PYKERNELS_BENCH_QUICK=1``): ``LINEAR_QUICK``, a few small shapes.

A second group times the fused epilogue: ``linear(x, w, b, activation="gelu")``
against the bare ``linear(x, w)`` at M=256, K=N=4096 (target: <= 5%
overhead), NumPy's two extra passes alongside.

Every benchmark checks its output once against a float64 reference (relative
Frobenius error within the accuracy contract: fp32 1e-5, bf16 1e-2, int8 3e-2;
torch's per-tensor int8 only within 0.1) and records ``benchmark.extra_info``.
Only the pykernels ``x @ w + b`` benchmarks carry ``extra_info["op"] =
"linear"`` (what ``pykernels.policy.Profile.from_pytest_benchmark`` reads);
baselines and the fused-overhead pairs carry the same keys under
``baseline_op`` / ``overhead_op`` instead, so the profile ignores them as its
convention says. Compare figures within one run: the ratios matter.
"""
from __future__ import annotations

import pytest

from pykernels.harness.linear import (
    BASELINE_LINEAR_CASES,
    LINEAR_BASELINE_REL_TOL,
    LINEAR_FUSED_QUICK,
    LINEAR_FUSED_TARGET,
    LINEAR_QUICK,
    LINEAR_REL_TOL,
    LINEAR_TARGETS,
    OUR_LINEAR_CASES,
    LinearCase,
    LinearProblem,
)
from pykernels.harness.results import to_numpy32
from pykernels.harness.timing import numpy_blas_threads, torch_threads
from pykernels.testing import rel_error
from conftest import bench_quick, let_baseline_workers_idle, shape_plan, torch_or_skip


def pytest_generate_tests(metafunc):
    quick = bench_quick(metafunc.config)
    if "problem" in metafunc.fixturenames:
        plan = shape_plan(LINEAR_QUICK if quick else LINEAR_TARGETS)
        # Module scope: inputs and the three packed weights (up to 64 + 32 + 16
        # MiB at K = N = 4096) are built once per shape, tests grouped by shape.
        metafunc.parametrize("problem", plan, indirect=True, scope="module",
                             ids=[f"{m}x{k}x{n}-t{t}" for m, k, n, t in plan])
    if "fused_problem" in metafunc.fixturenames:
        plan = shape_plan([LINEAR_FUSED_QUICK if quick else LINEAR_FUSED_TARGET])
        metafunc.parametrize("fused_problem", plan, indirect=True, scope="module",
                             ids=[f"{m}x{k}x{n}-t{t}" for m, k, n, t in plan])


class Problem:
    def __init__(self, m, k, n, threads):
        self.threads = threads
        self.data = LinearProblem(m, k, n)

    @property
    def group(self) -> str:
        d = self.data
        return f"linear {d.m}x{d.k}x{d.n} t{self.threads}"

    def extra_info(self, case: LinearCase, isa: str, *, bias: bool, activation) -> dict:
        d = self.data
        return {"m": d.m, "k": d.k, "n": d.n, "variant": case.variant,
                "precision": case.precision, "threads": self.threads, "impl": case.impl,
                "isa": isa, "b": "packed" if case.impl == "pykernels" else "raw",
                "bias": bias, "activation": activation, "flops": d.flops,
                "weight_bytes": d.bytes_moved(case.precision) - 4 * d.m * (d.k + d.n)}


def _make_problem(request):
    m, k, n, threads = request.param
    p = Problem(m, k, n, threads)
    let_baseline_workers_idle()
    return p


@pytest.fixture(scope="module")
def problem(request):
    p = _make_problem(request)
    yield p
    del p.data


@pytest.fixture(scope="module")
def fused_problem(request):
    p = _make_problem(request)
    yield p
    del p.data


def _run(benchmark, problem, case, isa, *, torch=None, bias=True, activation=None, op_key="op",
         **extra):
    fn = problem.data.call(case, problem.threads, torch, bias=bias, activation=activation)
    info = problem.extra_info(case, isa, bias=bias, activation=activation)
    info[op_key] = "linear"
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(extra)
    result = to_numpy32(benchmark(fn))
    ref = problem.data.ref_for(activation) if bias else problem.data.ref - problem.data.bias
    err = rel_error(result, ref)
    tol = (LINEAR_REL_TOL if case.impl == "pykernels" else LINEAR_BASELINE_REL_TOL)[
        case.precision]
    benchmark.extra_info["rel_error"] = err
    assert err <= tol, f"{case.label}: relative error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------
# x @ w + b on the target shapes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", OUR_LINEAR_CASES, ids=lambda c: f"{c.precision}-{c.variant}")
def test_pykernels(benchmark, problem, case, isa):
    benchmark.group = problem.group
    _run(benchmark, problem, case, isa)


def test_numpy(benchmark, problem, isa):
    benchmark.group = problem.group
    case = LinearCase("numpy", "fp32", None)
    with numpy_blas_threads(problem.threads) as limited:
        _run(benchmark, problem, case, isa, op_key="baseline_op", threads_limited=limited)


@pytest.mark.parametrize("case", [c for c in BASELINE_LINEAR_CASES if c.impl == "torch"],
                         ids=lambda c: f"{c.impl}-{c.precision}")
def test_torch(benchmark, problem, case, isa):
    torch = torch_or_skip()
    if case.precision == "int8" and not hasattr(getattr(torch, "ao", None), "quantization"):
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    benchmark.group = problem.group
    with torch_threads(torch, problem.threads):
        _run(benchmark, problem, case, isa, torch=torch, op_key="baseline_op",
             threads_limited=True)


# ---------------------------------------------------------------------------
# Fused bias + GELU against the bare product (the epilogue's cost)
# ---------------------------------------------------------------------------

FUSED_CASES = list(OUR_LINEAR_CASES) + [LinearCase("numpy", "fp32", None)]


@pytest.mark.parametrize("kind", ["bare", "bias_gelu"])
@pytest.mark.parametrize("case", FUSED_CASES,
                         ids=lambda c: f"{c.precision}-{c.variant}" if c.variant else c.impl)
def test_fused_overhead(benchmark, fused_problem, case, kind, isa):
    """bare: linear(x, w); bias_gelu: linear(x, w, b, activation="gelu") (NumPy:
    x @ w, then + b and GELU in two more passes). The ratio of the two medians
    of one case is the epilogue's overhead."""
    benchmark.group = f"fused bias+gelu vs bare {fused_problem.group}"
    bias, act = (False, None) if kind == "bare" else (True, "gelu")
    with numpy_blas_threads(fused_problem.threads) as limited:
        _run(benchmark, fused_problem, case, isa, bias=bias, activation=act,
             op_key="overhead_op", kind=kind, threads_limited=limited)
