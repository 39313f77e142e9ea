"""The Cython modules and their pure-Python twins agree: the quantile sketch
(``policy/_sketch.pyx`` vs ``policy/sketch.py``) bucket for bucket and quantile
for quantile, and the planner's per-decision scan (``policy/_scan.pyx`` vs
``policy/scan.py``) cell for cell. Also: defined edge behaviour, no lost counts
under threads, and the fallback to the twin when the compiled module is missing."""
import math
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest

from pykernels.policy import SLO, Policy, ops
from pykernels.policy import scan as S
from pykernels.policy import sketch as K

needs_cython = pytest.mark.skipif(K.CQuantileSketch is None or S.c_scan is None,
                                  reason="the Cython modules are not built")

EDGES = [0.0, 5e-324, 1e-300, 1e-9, 1.0000001e-9, 1e-6, 1.0, 2.0, 3.0, 1e9, 1e300,
         1.7976931348623157e308]


def stream(seed, n=20_000):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(rng.choice(EDGES))
        elif r < 0.5:
            out.append(rng.lognormvariate(-7, 2))
        elif r < 0.8:
            out.append(rng.expovariate(100.0))
        else:
            out.append(rng.uniform(0.0, 10.0))
    return out


@needs_cython
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("accuracy", [0.01, 0.05])
def test_sketch_twins_agree_on_random_streams_with_edges(seed, accuracy):
    c, p = K.CQuantileSketch(accuracy), K.PyQuantileSketch(accuracy)
    rng = random.Random(seed + 100)
    for x in stream(seed):
        cnt = rng.choice([1, 1, 1, 2, 7])
        c.add(x, cnt)
        p.add(x, cnt)
    assert c.bucket_counts() == p.bucket_counts()
    assert c.zero_count == p.zero_count > 0
    assert (c.count, c.sum, c.min, c.max) == (p.count, p.sum, p.min, p.max)
    qs = [0.0, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999, 1.0] + \
        [rng.random() for _ in range(50)]
    for q in qs:
        assert c.quantile(q) == p.quantile(q), q
    assert c.quantiles(qs) == p.quantiles(qs)
    assert c.quantile(1.0) == 1.7976931348623157e308  # the largest double, clamped to max


@needs_cython
def test_sketch_twins_merge_across_implementations():
    xs = stream(5, 5000)
    a, b = K.CQuantileSketch(), K.PyQuantileSketch()
    whole = K.PyQuantileSketch()
    for i, x in enumerate(xs):
        (a if i % 2 else b).add(x)
        whole.add(x)
    a2 = K.CQuantileSketch()
    a2.merge(a)
    a2.merge(b)
    b.merge(a)
    assert a2.bucket_counts() == b.bucket_counts() == whole.bucket_counts()
    assert a2.quantiles([0.5, 0.99]) == b.quantiles([0.5, 0.99]) == whole.quantiles([0.5, 0.99])
    with pytest.raises(ValueError):
        a2.merge(K.PyQuantileSketch(0.05))


@pytest.mark.parametrize("impl", ["python", "cython"])
def test_sketch_edge_values_are_defined(impl):
    if impl == "cython" and K.CQuantileSketch is None:
        pytest.skip("the Cython sketch is not built")
    cls = K.CQuantileSketch if impl == "cython" else K.PyQuantileSketch
    s = cls()
    assert s.quantile(0.5) is None and s.mean is None and len(s) == 0
    for bad in (-1.0, -0.0 - 1e-300, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            s.add(bad)
    assert s.count == 0  # a rejected value records nothing
    with pytest.raises(ValueError):
        s.add(1.0, -1)
    with pytest.raises(TypeError):
        s.add(1.0, 1.5)
    s.add(1.0, 0)
    s.add(1.0, np.int64(3))
    assert s.count == 3
    s.add(0.0)
    s.add(1e-12)  # below min_value: the zero bucket, reported as 0
    assert s.zero_count == 2 and s.quantile(0.0) == 0.0
    assert abs(s.quantile(1.0) - 1.0) <= 0.01
    for q in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError):
            s.quantile(q)
    with pytest.raises(ValueError):
        cls(0.0)
    with pytest.raises(ValueError):
        cls(0.01, min_value=0.0)


def test_sketch_quantiles_within_relative_error():
    rng = np.random.default_rng(3)
    x = rng.lognormal(-6, 1.5, 30_000)
    s = K.QuantileSketch(0.01)
    for v in x.tolist():
        s.add(v)
    for q in (0.01, 0.5, 0.9, 0.99, 0.999):
        exact = float(np.percentile(x, 100 * q, method="lower"))
        assert abs(s.quantile(q) - exact) <= 0.01 * exact


@needs_cython
def test_cython_sketch_loses_no_counts_under_threads():
    s = K.CQuantileSketch()
    n, k = 20_000, 8
    barrier = threading.Barrier(k)

    def worker(i):
        barrier.wait()
        for j in range(n):
            s.add(1e-3 * (1 + (i * n + j) % 97))
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert s.count == n * k and sum(s.bucket_counts().values()) == n * k


def test_policy_observe_loses_no_counts_under_threads():
    """observe() from 8 threads at once: every observation reaches its cell's
    sketch and the op's count."""
    prof = ops_profile()
    policy = Policy(SLO(p99_ms=5.0), prof)
    plans = [policy.plan_call(OP, b) for b in (1, 4, 16)]
    n, k = 1500, 8
    barrier = threading.Barrier(k)

    def worker(i):
        barrier.wait()
        for j in range(n):
            p = plans[(i + j) % 3]
            policy.observe(p, p.service_p50_ms * (1 + 0.01 * (j % 7)) / 1e3)
            if j % 50 == 0:
                policy.plan(OP, queued=j % 9, arrival_rate=1000.0 + j)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    policy.flush()  # observe() buffers; apply what is pending
    assert policy._op_count[OP.key] == n * k
    assert sum(policy.observed(p)["n"] for p in plans) == n * k


OP = ops.Linear(256, 512)


def ops_profile():
    from pykernels.policy import Profile
    prof = Profile(source="synthetic")
    for (v, p, t), (c0, c1) in {("latency", "fp32", 1): (0.02, 0.010),
                                ("latency", "fp32", 2): (0.03, 0.006),
                                ("throughput", "fp32", 1): (0.10, 0.004),
                                ("throughput", "fp32", 2): (0.15, 0.002),
                                ("throughput", "bf16", 2): (0.12, 0.0012),
                                ("latency", "int8", 2): (0.02, 0.003)}.items():
        for b in (1, 2, 4, 8, 16, 32, 64, 128):
            x = c0 + c1 * b
            prof.add(OP, v, p, t, b, x, (1.2 + 0.3 * (b % 3)) * x)
    return prof


# --- the planner's scan ----------------------------------------------------------
def random_table(rng, ng, nb):
    cells = [(g, b) for g in range(ng) for b in sorted(rng.sample(range(1, 300), nb))]
    s50 = [rng.choice([0.05, 0.1, 0.2]) * (1 + b * rng.random() * 0.05) for g, b in cells]
    s99 = [x * rng.choice([1.0, 1.3, 2.5]) for x in s50]
    cs2 = [(math.log(max(h / l, 1.0)) / 2.326) ** 2 for l, h in zip(s50, s99)]
    tp = [b / x * 1e3 for (g, b), x in zip(cells, s50)]
    k1 = [rng.randrange(3) for _ in range(ng)]
    k2 = [rng.randrange(2) for _ in range(ng)]
    gfail = [S.FAIL_ACC if rng.random() < 0.2 else 0 for _ in range(ng)]
    return ([float(b) for _, b in cells], s50, s99, cs2, tp, [g for g, _ in cells], k1, k2, gfail)


@needs_cython
def test_scan_twins_agree_on_random_tables():
    rng = random.Random(11)
    for trial in range(400):
        args = random_table(rng, rng.randint(1, 9), rng.randint(1, 8))
        if rng.random() < 0.3:  # exact ties in service times and throughput
            args = (args[0], [0.1] * len(args[0]), [0.13] * len(args[0])) + args[3:]
        c, p = S.CCells(*args), S.PyCells(*args)
        for _ in range(5):
            q = (rng.choice([0.0, 0.0, 100.0, 5e3, 5e4, 1e6]), float(rng.choice([0, 1, 7, 300])),
                 rng.choice([math.inf, 0.3, 1.0, 10.0]), rng.choice([math.inf, 0.2]),
                 rng.choice([-math.inf, 1e4, 1e6]), 0.9, rng.choice([0.0, 0.02]),
                 rng.choice([S.MODE_P99, S.MODE_P50, S.MODE_TP]))
            got_c, got_p = S.c_scan(c, *q), S.py_scan(p, *q)
            assert repr(got_c) == repr(got_p), (trial, q)  # repr: NaN == NaN
            assert len(got_c[1]) == len(set(args[5]))  # the chosen + one per other group


def test_scan_handles_empty_and_rejects_inconsistent_tables():
    impls = [(S.PyCells, S.py_scan)] + ([(S.CCells, S.c_scan)] if S.c_scan else [])
    for cells, scan in impls:
        assert scan(cells([], [], [], [], [], [], [0], [0], [0]), 0.0, 0.0, math.inf, math.inf,
                    -math.inf, 0.9, 0.02, 0) == (0, [])
        with pytest.raises(ValueError):
            cells([1.0], [0.1], [0.1], [0.0], [1e4], [3], [0], [0], [0])  # group 3 of 1
        with pytest.raises(ValueError):
            cells([1.0, 2.0], [0.1], [0.1], [0.0], [1e4], [0], [0], [0], [0])


@needs_cython
def test_planner_gives_the_same_plans_on_either_scan(monkeypatch):
    slos = [SLO(p99_ms=t, max_rel_error=e) for t in (0.1, 0.5, 2.0) for e in (1e-4, 1e-2)] + \
        [SLO(min_throughput=5e4, max_rel_error=1e-2), SLO(p50_ms=0.2)]
    states = [(q, r) for q in (0, 3, 40) for r in (None, 500.0, 5e3, 4e4)]
    prof = ops_profile()
    compiled = [Policy(s, prof).plan(OP, queued=q, arrival_rate=r) for s in slos for q, r in states]
    monkeypatch.setattr(S, "scan", S.py_scan)
    monkeypatch.setattr(S, "make_cells", S.PyCells)
    twin = [Policy(s, prof).plan(OP, queued=q, arrival_rate=r) for s in slos for q, r in states]
    assert compiled == twin
    assert [p.explain() for p in compiled] == [p.explain() for p in twin]


def test_fallback_to_the_twins_when_the_compiled_modules_are_missing():
    code = ("import sys; sys.modules['pykernels.policy._sketch'] = None; "
            "sys.modules['pykernels.policy._scan'] = None\n"
            "from pykernels.policy import sketch, scan, SLO, Policy, ops, Profile\n"
            "assert sketch.IMPLEMENTATION == scan.IMPLEMENTATION == 'python'\n"
            "assert sketch.QuantileSketch is sketch.PyQuantileSketch\n"
            "prof = Profile(source='t')\n"
            "op = ops.Linear(8, 8)\n"
            "for b in (1, 2, 4): prof.add(op, 'latency', 'fp32', 1, b, 0.01 * b, 0.02 * b)\n"
            "pol = Policy(SLO(p99_ms=1.0), prof)\n"
            "p = pol.plan(op, queued=2)\n"
            "pol.observe(p, 0.00002)\n"
            "print(p.feasible, pol.observed(p)['n'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1"]
