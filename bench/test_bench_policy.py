"""Decision and feedback cost of the policy engine (issue targets: ``plan()``
<= 20 us median, ``observe()`` record <= 1 us median on the Cython path).

    python -m pytest bench/test_bench_policy.py --benchmark-columns=median,mean,rounds

Timed on a synthetic profile shaped like this machine's (8 kernel choices:
latency/throughput x fp32/bf16/int8 x 1-2 threads, 9 batch buckets), SLO
p99 <= 1 ms with int8 admitted, so every decision weighs 72 cells:

* ``plan`` hot: the same queue state again (the plan cache).
* ``plan`` new queue state: a different arrival rate every call (a cache miss:
  the per-decision scan over the precomputed candidate table, the Plan built).
* ``plan`` first call: candidate table and cost-model predictions dropped
  before every call (what a new op, or new feedback, costs once).
* ``observe``: one service time fed back -- the record path (validated and
  buffered; every ``FLUSH_EVERY``-th call also applies the buffer, so the
  median is the record, the mean includes the amortized apply);
  ``observe_applied``: observe then ``flush()`` every call (sketch record,
  correction windows, AIMD: what one observation costs in all, off the hot
  path); and the sketch's ``add`` alone, Cython and pure Python.

Each benchmark checks what it computed. ``extra_info`` records which
implementation ran (``cython`` or ``python``).
"""
from __future__ import annotations

import itertools

import pytest

from pykernels.policy import SLO, Policy, ops
from pykernels.policy import scan as _scan
from pykernels.policy import sketch as _sketch
from pykernels.policy.simulate import SYNTHETIC_GROUPS, synthetic_profile

OP = ops.Linear(384, 1536)


@pytest.fixture(scope="module")
def policy():
    pol = Policy(SLO(p99_ms=1.0, max_rel_error=1e-2), synthetic_profile())
    pol.plan(OP, queued=3, arrival_rate=5000.0)  # cost model fitted, table built
    return pol


def _info(benchmark, what):
    benchmark.extra_info.update({"policy_op": what, "scan": _scan.IMPLEMENTATION,
                                 "sketch": _sketch.IMPLEMENTATION})


def test_plan_hot(benchmark, policy):
    _info(benchmark, "plan_hot")
    plan = benchmark(policy.plan, OP, queued=3, arrival_rate=5000.0)
    assert plan.feasible and plan.predicted_p99_ms <= 0.92


def test_plan_new_queue_state(benchmark, policy):
    _info(benchmark, "plan_new_queue_state")
    rates = itertools.count()

    def decide():
        i = next(rates)
        return policy.plan(OP, queued=i % 17, arrival_rate=1000.0 + i % 1_000_000)
    plan = benchmark(decide)
    assert plan.feasible and len(plan.alternatives) == len(SYNTHETIC_GROUPS) - 1


def test_plan_first_call(benchmark, policy):
    _info(benchmark, "plan_first_call")

    def drop():
        policy._tables.clear()
        policy._plans.clear()
        policy.cost_model._memo.clear()
    plan = benchmark.pedantic(policy.plan, args=(OP,), kwargs={"queued": 3, "arrival_rate": 5000.0},
                              setup=drop, rounds=200, warmup_rounds=2)
    assert plan == policy.plan(OP, queued=3, arrival_rate=5000.0)


def test_observe(benchmark, policy):
    _info(benchmark, "observe")
    plan = policy.plan(OP, queued=3, arrival_rate=5000.0)
    sec = plan.service_p50_ms / 1e3
    before = policy.observed(plan)["n"]
    benchmark(policy.observe, plan, sec)
    stats = policy.observed(plan)
    assert stats["n"] > before and abs(stats["p50_ms"] - plan.service_p50_ms) <= 0.01 * plan.service_p50_ms


def test_observe_applied(benchmark, policy):
    _info(benchmark, "observe_applied")
    plan = policy.plan(OP, queued=3, arrival_rate=5000.0)
    sec = plan.service_p50_ms / 1e3
    before = policy.observed(plan)["n"]

    def observe_and_apply():
        policy.observe(plan, sec)
        policy.flush()
    benchmark(observe_and_apply)
    stats = policy.observed(plan)
    assert stats["n"] > before and abs(stats["p50_ms"] - plan.service_p50_ms) <= 0.01 * plan.service_p50_ms


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_sketch_add(benchmark, impl):
    cls = _sketch.CQuantileSketch if impl == "cython" else _sketch.PyQuantileSketch
    if cls is None:
        pytest.skip("the Cython sketch is not built")
    benchmark.extra_info.update({"policy_op": "sketch_add", "sketch": impl})
    s = cls(0.01)
    benchmark(s.add, 0.00123)
    assert s.count >= 1 and abs(s.quantile(0.5) - 0.00123) <= 0.01 * 0.00123
