"""Planner decisions on hand-built profiles (tables of cases and properties),
determinism, and ``with policy.active()``. Behaviour only, never timings.
Feedback is in test_policy_feedback.py."""
import math
import time

import numpy as np
import pytest

import pykernels
from pykernels import KernelCall, _gemm
from pykernels.policy import SLO, Plan, Policy, Profile, ops
from pykernels.policy.simulate import SYNTHETIC_GROUPS, synthetic_profile

OP = ops.Linear(384, 1536)
GROUPS = SYNTHETIC_GROUPS  # (variant, precision, threads) -> (overhead ms, ms per item)


PROFILE = synthetic_profile()
FP32_ONLY = synthetic_profile({k: v for k, v in GROUPS.items() if k[1] == "fp32"})


# --- decisions: a table of cases --------------------------------------------
CASES = [
    # id, slo, queued, arrival_rate, expectations
    ("tight_p99_single_request", SLO(p99_ms=0.2), 0, None,
     dict(variant="latency", precision="fp32", batch_size=1, feasible=True, max_wait_ms=0.0)),
    ("throughput_floor_bulk", SLO(min_throughput=200_000), 0, None,
     dict(variant="throughput", precision="fp32", feasible=True, min_batch=128)),
    ("throughput_floor_admits_int8", SLO(min_throughput=200_000, max_rel_error=1e-2), 0, None,
     dict(variant="throughput", precision="int8", feasible=True, min_batch=128)),
    ("budget_between_bf16_and_int8", SLO(min_throughput=200_000, max_rel_error=5e-3), 0, None,
     dict(variant="throughput", precision="bf16", feasible=True)),
    ("tight_p99_admits_int8_latency", SLO(p99_ms=0.2, max_rel_error=1e-2), 0, None,
     dict(variant="latency", precision="int8", batch_size=1, feasible=True)),
    ("stream_batches_within_p99", SLO(p99_ms=3.0), 0, 20_000,
     dict(feasible=True, min_batch=2, max_batch=64)),
    ("backlog_drains_in_batches", SLO(p99_ms=5.0), 100, None,
     dict(feasible=True, min_batch=8, max_batch=100, max_wait_ms=0.0)),
    ("impossible_p99", SLO(p99_ms=0.01), 0, None,
     dict(feasible=False, variant="latency", batch_size=1, precision="fp32")),
    ("impossible_throughput", SLO(min_throughput=10_000_000), 0, None,
     dict(feasible=False, variant="throughput")),
    ("overload", SLO(p99_ms=5.0), 0, 2_000_000, dict(feasible=False)),
]


@pytest.mark.parametrize("slo,queued,rate,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_cases(slo, queued, rate, want):
    plan = Policy(slo, PROFILE).plan(OP, queued=queued, arrival_rate=rate)
    for k, v in want.items():
        if k == "min_batch":
            assert plan.batch_size >= v, plan.explain()
        elif k == "max_batch":
            assert plan.batch_size <= v, plan.explain()
        else:
            assert getattr(plan, k) == v, plan.explain()
    # invariants of every plan
    assert plan.threads in (1, 2) and plan.batch_size >= 1 and plan.max_wait_ms >= 0
    assert plan.predicted_p99_ms >= plan.predicted_p50_ms > 0
    assert plan.service_p99_ms >= plan.service_p50_ms > 0
    if plan.feasible:
        assert ops.PRECISION_REL_ERROR[plan.precision] <= slo.max_rel_error
        if slo.p99_ms is not None:
            assert plan.predicted_p99_ms <= slo.p99_ms
        if slo.min_throughput is not None:
            assert plan.throughput >= slo.min_throughput
    text = plan.explain()
    assert plan.variant in text and str(plan.batch_size) in text and plan.precision in text
    assert ("No plan meets the SLO" in text) == (not plan.feasible)


def test_infeasible_plan_explains_itself():
    plan = Policy(SLO(p99_ms=0.01), PROFILE).plan(OP)
    assert not plan.feasible
    assert plan.reason.startswith("infeasible")
    text = plan.explain()
    assert "misses the p99 target of 10 us" in text
    # it is the plan with the lowest predicted p99 of all
    assert all(a.predicted_p99_ms >= plan.predicted_p99_ms for a in plan.alternatives)


def test_explain_names_numbers_and_exclusions():
    plan = Policy(SLO(p99_ms=3.0), PROFILE).plan(OP, arrival_rate=20_000)
    text = plan.explain()
    assert "p99 target of 3 ms" in text and "headroom" in text
    assert f"batches of up to {plan.batch_size}" in text
    assert "Excluded by the accuracy budget" in text and "bf16" in text and "int8" in text
    assert "runner-up" in text
    assert plan.alternatives and all(a.precision == "fp32" for a in plan.alternatives)


def test_alternatives_lost_for_a_reason():
    plan = Policy(SLO(min_throughput=200_000), PROFILE).plan(OP)
    assert len(plan.alternatives) == 3  # the other fp32 kernel choices
    for a in plan.alternatives:
        assert (a.variant, a.precision, a.threads) != (plan.variant, plan.precision, plan.threads)
        assert a.why


def test_fixed_precision_outside_budget_is_flagged():
    plan = Policy(SLO(), PROFILE).plan(ops.Linear(384, 1536, precision="int8"))
    assert plan.precision == "int8" and not plan.feasible
    assert "No precision fits the accuracy budget" in plan.explain()


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="no measurements"):
        Policy(SLO(), PROFILE).plan(ops.Decode(8, 8, 64, 128))


@pytest.mark.parametrize("kwargs", [dict(queued=-1), dict(queued=1.5), dict(arrival_rate=-3.0),
                                    dict(arrival_rate=math.nan), dict(arrival_rate=math.inf)])
def test_plan_rejects_bad_queue_state(kwargs):
    with pytest.raises(ValueError):
        Policy(SLO(), PROFILE).plan(OP, **kwargs)


def test_policy_rejects_bad_arguments():
    with pytest.raises(TypeError):
        Policy({"p99_ms": 5}, PROFILE)
    with pytest.raises(TypeError):
        Policy(SLO(), "profile.json")
    with pytest.raises(ValueError):
        Policy(SLO(), PROFILE, max_batch=0)
    with pytest.raises(TypeError):
        Policy(SLO(), PROFILE).plan("linear")


# --- properties ---------------------------------------------------------------
@pytest.mark.parametrize("rate", [None, 2_000, 20_000, 60_000])
@pytest.mark.parametrize("budget", [1e-4, 1e-2])
def test_tighter_p99_never_gives_larger_predicted_p99(rate, budget):
    prev = math.inf
    for target in (50, 20, 10, 5, 3, 2, 1.5, 1, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02):
        plan = Policy(SLO(p99_ms=target, max_rel_error=budget), PROFILE).plan(OP, arrival_rate=rate)
        assert plan.predicted_p99_ms <= prev + 1e-12, (target, plan.explain())
        prev = plan.predicted_p99_ms


@pytest.mark.parametrize("target", [2.0, 5.0, 20.0])
def test_more_load_never_gives_smaller_batch_while_feasible(target):
    policy = Policy(SLO(p99_ms=target), FP32_ONLY)
    prev = 0
    for rate in (100, 1_000, 5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 150_000):
        plan = policy.plan(OP, arrival_rate=rate)
        if not plan.feasible:
            break
        assert plan.batch_size >= prev, (rate, plan.explain())
        prev = plan.batch_size
    assert prev > 1


@pytest.mark.parametrize("budget", [0.0, 1e-6, 1e-4, 4e-3, 5e-3, 1e-2, math.inf])
@pytest.mark.parametrize("slo_kw", [dict(p99_ms=0.3), dict(min_throughput=300_000), dict(p99_ms=3)])
def test_accuracy_budget_is_respected(budget, slo_kw):
    plan = Policy(SLO(max_rel_error=budget, **slo_kw), PROFILE).plan(OP, arrival_rate=30_000)
    if ops.PRECISION_REL_ERROR["fp32"] > budget:
        assert not plan.feasible and plan.precision == "fp32"
    else:
        assert ops.PRECISION_REL_ERROR[plan.precision] <= budget


def test_profile_measured_errors_override_the_nominal_table():
    prof = synthetic_profile()
    prof.precision_error["int8"] = 3e-3  # measured better than the nominal 1e-2
    plan = Policy(SLO(min_throughput=200_000, max_rel_error=4e-3), prof).plan(OP)
    assert plan.precision == "int8" and plan.rel_error == 3e-3


def test_model_plans_cover_the_whole_forward():
    layer = ops.Model(ops=[ops.Linear(384, 1536, rows_per_item=4), ops.Linear(384, 1536, rows_per_item=4)],
                      name="two-linears")
    policy = Policy(SLO(p99_ms=2.0), PROFILE)
    plan = policy.plan(layer, queued=8)
    single = policy.plan(ops.Linear(384, 1536, rows_per_item=4), queued=8)
    assert plan.feasible and plan.op == layer
    assert plan.service_p50_ms > single.service_p50_ms


# --- determinism ----------------------------------------------------------------
def test_plans_are_deterministic_and_use_no_clock(monkeypatch):
    cases = [(SLO(p99_ms=t, max_rel_error=e), q, r) for t in (0.2, 3.0) for e in (1e-4, 1e-2)
             for q in (0, 50) for r in (None, 20_000)]
    first = [Policy(s, PROFILE).plan(OP, queued=q, arrival_rate=r) for s, q, r in cases]

    def no_clock(*a, **k):
        raise AssertionError("the planner must not read a clock")
    for name in ("time", "monotonic", "perf_counter", "perf_counter_ns", "monotonic_ns", "time_ns"):
        monkeypatch.setattr(time, name, no_clock)
    again = [Policy(s, synthetic_profile()).plan(OP, queued=q, arrival_rate=r) for s, q, r in cases]
    assert first == again
    policy = Policy(cases[0][0], PROFILE)
    assert policy.plan(OP) == policy.plan(OP)
    assert isinstance(first[0], Plan) and hash(first[0]) == hash(again[0])


def test_plan_is_frozen():
    plan = Policy(SLO(p99_ms=1), PROFILE).plan(OP)
    with pytest.raises(Exception):
        plan.batch_size = 7


# --- with policy.active() ----------------------------------------------------------
def chooser_profile():
    """A machine where the throughput kernel wins even at 4 rows -- the opposite
    of pykernels' size heuristic (latency up to 32 rows)."""
    prof = Profile(source="synthetic")
    small = ops.Linear(64, 64)
    for b in (1, 2, 4, 8, 16, 32, 64):
        prof.add(small, "latency", "fp32", 1, b, 0.05 + 0.01 * b, 0.07 + 0.01 * b)
        prof.add(small, "throughput", "fp32", 1, b, 0.01 + 0.001 * b, 0.02 + 0.001 * b)
    return prof


def test_active_changes_what_auto_does():
    policy = Policy(SLO(p99_ms=1.0), chooser_profile())
    a = np.ones((4, 64), np.float32)
    b = np.ones((64, 64), np.float32)
    assert pykernels.get_variant_chooser() is None
    pykernels.gemm(a, b)  # no policy: the kernel's own size heuristic, nobody asked
    assert policy.chooser_calls == 0
    with policy.active() as p:
        assert p is policy and pykernels.get_variant_chooser() == policy.choose
        out = pykernels.gemm(a, b)
        assert policy.chooser_calls == 1 and policy.choice_counts["throughput"] == 1
        np.testing.assert_allclose(out, a @ b, rtol=1e-5)
        pykernels.gemm(a, b, variant="latency")  # an explicit variant does not ask
        assert policy.chooser_calls == 1
        if hasattr(pykernels, "linear"):
            pykernels.linear(a, b)
            assert policy.chooser_calls == 2 and policy.choice_counts["throughput"] == 2
        # the decision for 4 rows is the policy's (throughput), not the heuristic's (latency)
        assert policy.choose(KernelCall("gemm", "fp32", None, m=4, k=64, n=64)) == ("throughput", 1)
        # shapes the profile never measured are predicted by the fit
        assert policy.choose(KernelCall("gemm", "fp32", None, m=4, k=100, n=80)) == ("throughput", 1)
        # calls the registry cannot map fall back to the heuristic
        assert policy.choose(KernelCall("unknown_op", "fp32", None, m=4, k=64, n=64)) == (None, None)
    assert pykernels.get_variant_chooser() is None
    calls = policy.chooser_calls
    pykernels.gemm(a, b)
    assert policy.chooser_calls == calls


def test_active_restores_the_previous_chooser_even_on_error():
    outer = Policy(SLO(p99_ms=1.0), chooser_profile())
    inner = Policy(SLO(p99_ms=1.0), chooser_profile())
    with outer.active():
        with pytest.raises(RuntimeError):
            with inner.active():
                assert pykernels.get_variant_chooser() == inner.choose
                raise RuntimeError("boom")
        assert pykernels.get_variant_chooser() == outer.choose
    assert pykernels.get_variant_chooser() is None


def test_chooser_never_raises():
    policy = Policy(SLO(p99_ms=1.0), chooser_profile())
    assert policy.choose(KernelCall("gemm", "fp32", None, m=0, k=64, n=64)) == (None, None)
    assert policy.choose(KernelCall("gemm", "int8", None, m=4, k=64, n=64)) == (None, None)  # no int8 measurements


def test_active_auto_calls_follow_the_policys_threads(monkeypatch):
    """With threads=None the call runs on the policy's thread count; a caller's
    count stands and narrows the variant choice to what was measured on it.
    The precision is the weight's: an fp32 weight is never planned as int8."""
    prof = Profile(source="synthetic")
    op = ops.Linear(64, 64)
    for b in (1, 4, 16, 64):
        prof.add(op, "latency", "fp32", 1, b, 0.05 + 0.01 * b, 0.06 + 0.01 * b)
        prof.add(op, "throughput", "fp32", 1, b, 0.01 + 0.001 * b, 0.02 + 0.001 * b)
        prof.add(op, "latency", "fp32", 2, b, 0.005 + 0.0005 * b, 0.006 + 0.0005 * b)
        prof.add(op, "throughput", "fp32", 2, b, 0.02 + 0.001 * b, 0.03 + 0.001 * b)
        prof.add(op, "latency", "int8", 2, b, 0.001, 0.002)  # fastest, but needs an int8 weight
    policy = Policy(SLO(p99_ms=1.0, max_rel_error=1e-1), prof)
    seen = []
    real = _gemm._core

    class Core:
        def __getattr__(self, name):
            return getattr(real, name)

        # the binding's named signature, so positional and keyword calls both land here
        def matmul(self, a, b, out=None, alpha=1.0, beta=0.0, variant=None, threads=0, *rest,
                   **kw):
            seen.append((variant, threads))
            return real.matmul(a, b, out, alpha, beta, variant, threads, *rest, **kw)
    monkeypatch.setattr(_gemm, "_core", Core())
    x = np.ones((4, 64), np.float32)
    w = np.ones((64, 64), np.float32)
    with policy.active():
        pykernels.gemm(x, w)
        pykernels.gemm(x, w, threads=1)
        pykernels.linear(x, pykernels.pack(w))
    lat, thr = _gemm.Variant.latency, _gemm.Variant.throughput
    assert seen == [(lat, 2), (thr, 1), (lat, 2)]
    assert policy.choose(KernelCall("linear", "fp32", None, m=4, k=64, n=64)) == ("latency", 2)
    assert policy.choose(KernelCall("linear", "fp32", 1, m=4, k=64, n=64)) == ("throughput", None)


def test_policy_loads_the_cached_profile_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKERNELS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(Profile, "calibrate",
                        classmethod(lambda cls, quick=True, progress=True, *a, **k: calls.append(quick) or synthetic_profile()))
    policy = Policy(SLO(p99_ms=1.0))
    assert calls == []  # nothing happens until a plan is asked for
    plan = policy.plan(OP)
    assert calls == [True] and plan.feasible
    # next time the saved file is used, no calibration
    assert Policy(SLO(p99_ms=1.0)).plan(OP) == plan
    assert calls == [True]


def test_measured_error_just_over_the_budget_is_admitted():
    prof = synthetic_profile()
    prof.precision_error["int8"] = 0.0101  # int8 "~1e-2", measured on random data
    plan = Policy(SLO(min_throughput=200_000, max_rel_error=1e-2), prof).plan(OP)
    assert plan.precision == "int8"
    prof.precision_error["int8"] = 0.02
    plan = Policy(SLO(min_throughput=200_000, max_rel_error=1e-2), prof).plan(OP)
    assert plan.precision == "bf16"
