"""Precision as a planning lever: accuracy budgets stated as the least cosine
of an embedding to fp32's (``SLO(min_cosine=)``), measured cosines in the
profile, and the planner choosing precision per class. Behaviour only."""
import math

import pytest

from pykernels.policy import SLO, Policy, ops
from pykernels.policy.simulate import SYNTHETIC_GROUPS, synthetic_profile
from pykernels.policy.slo import cosine_error, error_cosine

OP = ops.Linear(384, 1536)
GROUPS = {k: v for k, v in SYNTHETIC_GROUPS.items() if k[1] in ("fp32", "int8")}
# cosines of MiniLM embeddings to fp32's measured on calibration texts (Zen 3)
COSINES = {"fp32": 1.0, "int8": 0.9957}


def profile():
    prof = synthetic_profile(GROUPS)
    prof.precision_error.update({p: cosine_error(c) for p, c in COSINES.items()})
    return prof


@pytest.mark.parametrize("cos,err", [(1.0, 0.0), (0.99, math.sqrt(0.02)), (0.999, math.sqrt(0.002)),
                                     (0.9999, math.sqrt(0.0002))])
def test_min_cosine_sets_the_relative_error_budget(cos, err):
    slo = SLO(min_cosine=cos)
    assert slo.max_rel_error == pytest.approx(err)
    assert error_cosine(slo.max_rel_error) == pytest.approx(cos)
    assert f"cosine to fp32 >= {cos:g}" in slo.describe()


@pytest.mark.parametrize("bad", [1.5, -2, float("nan"), "0.9", True])
def test_min_cosine_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="min_cosine"):
        SLO(min_cosine=bad)


def test_bulk_runs_int8_when_its_budget_admits_it():
    plan = Policy(SLO(min_cosine=0.99), profile()).plan(OP, queued=64)
    assert plan.precision == "int8", plan.explain()
    text = plan.explain()
    assert "cosine to fp32 >= 0.99" in text and "int8 0.9957" in text


@pytest.mark.parametrize("cos", [0.999, 0.9999])
def test_a_tight_budget_keeps_fp32(cos):
    plan = Policy(SLO(min_cosine=cos), profile()).plan(OP, queued=64)
    assert plan.precision == "fp32", plan.explain()
    assert "int8 0.9957 (excluded)" in plan.explain()


def test_classes_plan_their_own_precision_on_one_profile():
    prof = profile()
    queries = Policy(SLO(p99_ms=0.5, min_cosine=0.999), prof).plan(OP, queued=1, arrival_rate=500)
    bulk = Policy(SLO(min_cosine=0.99), prof).plan(OP, queued=64)
    assert (queries.precision, bulk.precision) == ("fp32", "int8")


def test_under_a_burst_queries_drop_precision_only_within_their_budget():
    prof = profile()
    # fp32 cannot carry this rate within the p99 target; int8 can
    rate = 20_000
    loose = Policy(SLO(p99_ms=2.0, min_cosine=0.99), prof).plan(OP, queued=8, arrival_rate=rate)
    tight = Policy(SLO(p99_ms=2.0, min_cosine=0.999), prof).plan(OP, queued=8, arrival_rate=rate)
    calm = Policy(SLO(p99_ms=2.0, min_cosine=0.99), prof).plan(OP, queued=0, arrival_rate=100)
    assert loose.precision == "int8" and loose.feasible, loose.explain()
    assert tight.precision == "fp32", tight.explain()
    assert calm.feasible



# --- two int8 precisions: exact 8-bit activations, or 7-bit ones at ~2x on AVX2 ----------
GROUPS7 = {**GROUPS, ("latency", "int8_7bit", 2): (0.022, 0.0020),
           ("throughput", "int8_7bit", 2): (0.110, 0.0006)}
COSINES7 = {**COSINES, "int8_7bit": 0.9935}


def profile7():
    prof = synthetic_profile(GROUPS7)
    prof.precision_error.update({p: cosine_error(c) for p, c in COSINES7.items()})
    return prof


@pytest.mark.parametrize("cos,want", [(0.99, "int8_7bit"), (0.995, "int8"), (0.999, "fp32")])
def test_the_accuracy_budget_chooses_between_the_int8_schemes(cos, want):
    plan = Policy(SLO(min_cosine=cos), profile7()).plan(OP, queued=64)
    assert plan.precision == want, plan.explain()
    if want != "int8_7bit":
        assert "int8_7bit 0.9935 (excluded)" in plan.explain()


def test_int8_7bit_nominal_error_is_between_int8_and_the_loosest_budgets():
    from pykernels.work import PRECISION_REL_ERROR, PRECISIONS, precision_rank
    assert precision_rank("int8") < precision_rank("int8_7bit") < len(PRECISIONS)
    assert PRECISION_REL_ERROR["int8"] < PRECISION_REL_ERROR["int8_7bit"]


# --- admission prediction: a queue drains in means, not medians -----------------
def test_predicted_drain_time_follows_the_mean_of_skewed_service_times():
    from pykernels.policy.simulate import synthetic_profile as sp
    fp32 = sp({k: v for k, v in SYNTHETIC_GROUPS.items() if k[1] == "fp32"})
    policy = Policy(SLO(p99_ms=3.0), fp32, window=20, min_observations=5)
    plan = policy.plan(OP, arrival_rate=20_000)
    p50 = plan.service_p50_ms
    # 15 batches at the predicted median, 5 preempted ones at 5x: median 1x, mean 2x
    for i in range(20):
        policy.observe(plan, (5 if i % 4 == 3 else 1) * p50 / 1e3)
    assert policy.correction(OP, plan.variant, plan.precision, plan.threads)[0] == pytest.approx(1.0)
    assert policy.predict_service_ms(plan, tail=False) == pytest.approx(2 * p50, rel=0.03)
    assert policy.predict_service_ms(plan) >= policy.predict_service_ms(plan, tail=False)


def test_steady_service_times_keep_the_median():
    from pykernels.policy.simulate import synthetic_profile as sp
    fp32 = sp({k: v for k, v in SYNTHETIC_GROUPS.items() if k[1] == "fp32"})
    policy = Policy(SLO(p99_ms=3.0), fp32, min_observations=5)
    plan = policy.plan(OP, arrival_rate=20_000)
    for _ in range(10):
        policy.observe(plan, 1.5 * plan.service_p50_ms / 1e3)
    assert policy.predict_service_ms(plan, tail=False) == pytest.approx(1.5 * plan.service_p50_ms,
                                                                        rel=0.02)


# --- the accuracy flag's parser (pykernels serve --accuracy, pykernels demo --accuracy) ---
def test_parse_min_cosines():
    from pykernels.policy.slo import parse_min_cosines
    assert parse_min_cosines("interactive=0.999,bulk=0.99", ("interactive", "bulk")) == \
        {"interactive": 0.999, "bulk": 0.99}
    assert parse_min_cosines("bulk=1", ("interactive", "bulk")) == {"bulk": 1.0}
    for bad in ("batch=0.9", "bulk", "bulk=x", "bulk=0", "bulk=1.01"):
        with pytest.raises(ValueError, match="accuracy"):
            parse_min_cosines(bad, ("interactive", "bulk"))
