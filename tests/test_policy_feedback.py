"""Feedback: observed service times correct predictions, AIMD caps the batch,
sketches keep the tail; the policy predicts service times from them."""
import math
import threading

import pytest

from pykernels.policy import SLO, Policy, ops
from pykernels.policy.simulate import SYNTHETIC_GROUPS, synthetic_profile

OP = ops.Linear(384, 1536)
GROUPS = SYNTHETIC_GROUPS  # (variant, precision, threads) -> (overhead ms, ms per item)


def service(v, p, t, b):
    c0, c1 = GROUPS[(v, p, t)]
    return c0 + c1 * b


PROFILE = synthetic_profile()
FP32_ONLY = synthetic_profile({k: v for k, v in GROUPS.items() if k[1] == "fp32"})


# --- feedback -----------------------------------------------------------------
def true_service_ms(plan, slowdown, i):
    jitter = 1 + 0.02 * ((i * 7) % 5 - 2)  # deterministic +-4%
    return service(plan.variant, plan.precision, plan.threads, plan.batch_size) * slowdown * jitter


def test_observe_corrects_predictions():
    policy = Policy(SLO(p99_ms=3.0), FP32_ONLY, min_observations=5)
    plan = policy.plan(OP, arrival_rate=20_000)
    before = plan.service_p50_ms
    for _ in range(4):
        policy.observe(plan, 2 * before / 1e3)
    assert policy.correction(OP, plan.variant, plan.precision, plan.threads) is None  # prior until 5
    policy.observe(plan, 2 * before / 1e3)
    c50, tail = policy.correction(OP, plan.variant, plan.precision, plan.threads)
    assert c50 == pytest.approx(2.0, rel=0.011) and tail == pytest.approx(2.0, rel=0.011)  # 2% grid
    stats = policy.observed(plan)
    assert stats["n"] == 5 and stats["p50_ms"] == pytest.approx(2 * before)
    # the same kernel choice at the same batch is now predicted twice as slow
    again = policy.plan_call(OP, plan.batch_size, threads=plan.threads)
    if (again.variant, again.precision) == (plan.variant, plan.precision):
        assert again.service_p50_ms == pytest.approx(2 * before, rel=0.011)
    policy.reset_feedback()
    assert policy.plan(OP, arrival_rate=20_000) == plan


def test_observe_validates():
    policy = Policy(SLO(p99_ms=3.0), PROFILE)
    plan = policy.plan(OP)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            policy.observe(plan, bad)
    with pytest.raises(TypeError):
        policy.observe("plan", 0.001)
    with pytest.raises(ValueError):
        policy.observe(plan, 0.001, batch=0)


def test_slowdown_backs_off_then_recovers():
    """A 3x slowdown mid-run: the policy backs off (smaller batch) within a
    bounded number of observations, and returns to the original plan after."""
    policy = Policy(SLO(p99_ms=3.0), FP32_ONLY, window=20, min_observations=5)
    rate = 30_000
    trace = []
    for i in range(160):
        slow = 3.0 if 60 <= i < 100 else 1.0
        plan = policy.plan(OP, arrival_rate=rate)
        trace.append((slow, plan))
        policy.observe(plan, true_service_ms(plan, slow, i) / 1e3)
    steady = trace[59][1]
    assert steady.feasible and steady.batch_size > 1
    assert all((p.variant, p.batch_size) == (steady.variant, steady.batch_size) for _, p in trace[10:60])
    during = [p for _, p in trace[60:100]]
    backed = next(i for i, p in enumerate(during) if p.batch_size < steady.batch_size or not p.feasible)
    assert backed <= 15, [(p.variant, p.batch_size) for p in during]
    # once the window's median has turned, plans predict the slowed service time
    for p in during[policy.window // 2 + 1:]:
        assert p.service_p50_ms >= 2.5 * service(p.variant, p.precision, p.threads, p.batch_size)
        assert p.feasible  # a smaller batch still meets the SLO at 3x
    after = [p for _, p in trace[100:]]
    recovered = next(i for i, p in enumerate(after)
                     if (p.variant, p.batch_size, p.threads) == (steady.variant, steady.batch_size, steady.threads))
    assert recovered <= policy.window + 10
    last = after[-1]
    assert (last.variant, last.precision, last.threads, last.batch_size, last.max_wait_ms) == \
        (steady.variant, steady.precision, steady.threads, steady.batch_size, steady.max_wait_ms)
    assert last.predicted_p99_ms == pytest.approx(steady.predicted_p99_ms, rel=0.05)


def test_aimd_caps_batch_on_a_miss_and_probes_back():
    policy = Policy(SLO(p99_ms=3.0), FP32_ONLY, max_batch=64, probe_after=4)
    plan = policy.plan(OP, arrival_rate=20_000)
    assert plan.feasible and policy.batch_cap(OP) is None
    b0 = plan.batch_size
    policy.observe(plan, 0.050)  # a 50 ms batch: far past the budget
    cap = policy.batch_cap(OP)
    assert cap == int(0.9 * b0)
    assert policy.plan(OP, arrival_rate=20_000).batch_size <= cap
    assert "Feedback capped the batch" in policy.plan(OP, arrival_rate=20_000).explain()
    # observations with headroom raise the cap additively, then lift it
    for i in range(200):
        p = policy.plan(OP, arrival_rate=20_000)
        policy.observe(p, true_service_ms(p, 1.0, i) / 1e3)
        c = policy.batch_cap(OP)
        if i == 3:
            assert c == cap + 1  # max_batch // 64
        if c is None:
            break
    assert policy.batch_cap(OP) is None
    assert policy.plan(OP, arrival_rate=20_000).batch_size == b0


def test_observing_an_infeasible_plan_does_not_back_off():
    policy = Policy(SLO(p99_ms=0.01), PROFILE)
    plan = policy.plan(OP)
    assert not plan.feasible
    policy.observe(plan, 0.010)
    assert policy.batch_cap(OP) is None


def test_observe_is_thread_safe():
    policy = Policy(SLO(p99_ms=3.0), FP32_ONLY)
    plan = policy.plan(OP, arrival_rate=20_000)
    errors = []

    def worker(k):
        try:
            for i in range(200):
                policy.observe(plan, true_service_ms(plan, 1.0, i + k) / 1e3)
                policy.plan(OP, arrival_rate=20_000 + (i % 3))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    policy.flush()  # observe() buffers; apply what is pending
    assert policy._op_count[OP.key] == 800
    assert policy.observed(plan)["n"] == 800  # the cell's sketch lost no observation


def test_predict_service_ms_follows_the_corrections():
    policy = Policy(SLO(p99_ms=3.0), FP32_ONLY, min_observations=5)
    plan = policy.plan(OP, arrival_rate=20_000)
    assert policy.predict_service_ms(plan) == pytest.approx(plan.service_p99_ms)
    assert policy.predict_service_ms(plan, tail=False) == pytest.approx(plan.service_p50_ms)
    assert policy.predict_service_ms(plan, 0) == 0.0
    one = policy.predict_service_ms(plan, 1, tail=False)
    assert 0 < one <= policy.predict_service_ms(plan, plan.batch_size, tail=False)
    for _ in range(5):
        policy.observe(plan, 2 * plan.service_p50_ms / 1e3)
    assert policy.predict_service_ms(plan, tail=False) == pytest.approx(2 * plan.service_p50_ms, rel=0.011)
    assert policy.predict_service_ms(plan, 1, tail=False) == pytest.approx(2 * one, rel=0.011)
