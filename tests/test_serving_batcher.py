"""DynamicBatcher behaviour: batch formation, max wait, EDF across classes, the
chunk bound, admission control, failures, close, asyncio, metrics, the
quantile sketch, Prometheus text and concurrency.

Most tests drive the batcher on a fake clock with ``start=False`` and
``step()`` (every decision deterministic); ``fn`` advances the fake clock by
the service time it stands for. The real-thread tests use a fn that finishes
at once (or sleeps a millisecond) and assert behaviour, never timings.
"""
import asyncio
import math
import re
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from pykernels.policy import SLO
from pykernels.serving import CLOSED_MESSAGE, DynamicBatcher, Overloaded, QuantileSketch


# --- fakes -----------------------------------------------------------------------
class FakeClock:
    """Seconds, advanced by hand (thread-safe enough: float assignment)."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance_ms(self, ms: float) -> None:
        self.t += ms / 1e3


@dataclass(frozen=True)
class FakePlan:
    variant: str = "latency"
    precision: str = "fp32"
    threads: int = 1
    batch_size: int = 4
    max_wait_ms: float = 0.0
    predicted_p50_ms: float = 1.0
    predicted_p99_ms: float = 1.0
    feasible: bool = True
    service_p99_ms: float = 1.0  # predicted service time of a full batch

    def explain(self) -> str:
        return f"fake plan: batch {self.batch_size}, wait {self.max_wait_ms} ms"


class FakePolicy:
    """Always the same plan; records plan() and observe() calls."""

    def __init__(self, batch_size=4, max_wait_ms=0.0, service_ms=1.0):
        self.p = FakePlan(batch_size=batch_size, max_wait_ms=max_wait_ms,
                          service_p99_ms=service_ms, predicted_p99_ms=service_ms,
                          predicted_p50_ms=service_ms)
        self.plans = []
        self.observed = []
        self.lock = threading.Lock()

    def plan(self, op, *, queued=0, arrival_rate=None):
        with self.lock:
            self.plans.append((op, queued, arrival_rate))
        return self.p

    def observe(self, plan, seconds, batch=None):
        with self.lock:
            self.observed.append((plan, seconds, batch))


class Recorder:
    """fn that records (class tag, items) per batch and advances the fake clock
    by ms_per_item * len(items) (+ ms_per_batch)."""

    def __init__(self, clock=None, ms_per_item=0.0, ms_per_batch=0.0, hook=None):
        self.clock = clock
        self.ms_per_item = ms_per_item
        self.ms_per_batch = ms_per_batch
        self.batches = []
        self.hook = hook

    def __call__(self, items, plan):
        self.batches.append(list(items))
        if self.hook is not None:
            self.hook(len(self.batches), items)
        if self.clock is not None:
            self.clock.advance_ms(self.ms_per_batch + self.ms_per_item * len(items))
        return [("done", x) for x in items]


def manual(fn, classes, policy, clock, **kw):
    return DynamicBatcher(fn, policy=policy, classes=classes, clock=clock, start=False,
                          replan_interval_s=0.0, **kw)


# --- batch formation ---------------------------------------------------------------
def test_batches_up_to_batch_size_then_waits_max_wait():
    clock = FakeClock()
    fn = Recorder()
    b = manual(fn, {"interactive": SLO(p99_ms=1000)}, FakePolicy(batch_size=4, max_wait_ms=5), clock)
    futs = [b.submit(i) for i in range(10)]
    assert b.step() == 4 and b.step() == 4
    assert b.step() == 0, "2 items < batch 4 must wait for max_wait"
    clock.advance_ms(4.9)
    assert b.step() == 0
    clock.advance_ms(0.1)
    assert b.step() == 2
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert [f.result(0) for f in futs] == [("done", i) for i in range(10)]


def test_max_wait_is_measured_from_the_oldest_request():
    clock = FakeClock()
    fn = Recorder()
    b = manual(fn, {"interactive": SLO(p99_ms=1000)}, FakePolicy(batch_size=8, max_wait_ms=10), clock)
    b.submit("a")
    clock.advance_ms(6)
    b.submit("b")
    clock.advance_ms(3.9)
    assert b.step() == 0
    clock.advance_ms(0.1)  # 10 ms after "a" (only 4 ms after "b")
    assert b.step() == 2
    q = b.metrics()["interactive"]["latency_ms"]["queue"]
    assert q["max"] == pytest.approx(10.0, rel=1e-9)
    assert q["p50"] == pytest.approx(4.0, rel=0.01)  # lower median of {4, 10} within 1%


def test_latest_start_time_overrides_a_long_max_wait():
    # p99 20 ms, a plan that would wait 100 ms; a batch of 8 is predicted at 4 ms:
    # the batch must start by deadline - 4 ms = 16 ms after the oldest arrival.
    clock = FakeClock()
    fn = Recorder(clock, ms_per_batch=3)
    b = manual(fn, {"interactive": SLO(p99_ms=20)},
               FakePolicy(batch_size=8, max_wait_ms=100, service_ms=4), clock)
    f = b.submit("x")
    clock.advance_ms(15.9)
    assert b.step() == 0
    clock.advance_ms(0.1)
    assert b.step() == 1
    assert f.result(0) == ("done", "x")
    assert b.metrics()["interactive"]["slo_attainment"] == 1.0


# --- earliest deadline first -----------------------------------------------------------
def test_edf_order_across_classes():
    clock = FakeClock()
    order = []

    def fn(items, plan):
        order.extend(items)
        return items

    pol = FakePolicy(batch_size=1, max_wait_ms=0, service_ms=0.1)
    b = manual(fn, {"loose": SLO(p99_ms=100), "tight": SLO(p99_ms=30), "bulk": SLO(min_throughput=1)},
               pol, clock)
    b.submit("bulk-0", "bulk")          # deadline +10 s (relaxed)
    b.submit("loose-0", "loose")        # deadline 100
    clock.advance_ms(10)
    b.submit("tight-10", "tight")       # deadline 40
    b.submit("loose-10", "loose")       # deadline 110
    clock.advance_ms(50)
    b.submit("tight-60", "tight")       # deadline 90
    while b.step():
        pass
    assert order == ["tight-10", "tight-60", "loose-0", "loose-10", "bulk-0"]


def test_aged_bulk_runs_before_fresh_interactive_but_interleaves():
    clock = FakeClock()
    order = []

    def fn(items, plan):
        order.append((plan.variant, len(items)))
        return items

    pols = {"interactive": FakePolicy(batch_size=1, service_ms=0.1),
            "bulk": FakePolicy(batch_size=100, service_ms=100)}  # 1 ms/item -> chunks of 2 (2.5 ms bound)
    pols["bulk"].p = FakePlan(variant="bulk", batch_size=100, service_p99_ms=100, predicted_p99_ms=100)
    b = manual(fn, {"interactive": SLO(p99_ms=10), "bulk": SLO(min_throughput=1)}, pols, clock,
               relaxed_deadline_s=1.0)
    for i in range(6):
        b.submit(i, "bulk")
    clock.advance_ms(2000)  # bulk aged past its relaxed deadline
    for i in range(3):
        b.submit(100 + i, "interactive")
    while b.step():
        pass
    # bulk is due first (EDF), but after each bulk chunk a ready interactive request runs
    assert order == [("bulk", 2), ("latency", 1), ("bulk", 2), ("latency", 1), ("bulk", 2),
                     ("latency", 1)]


# --- the chunk bound -----------------------------------------------------------------------
def test_bulk_is_chunked_so_interactive_waits_at_most_the_bound():
    clock = FakeClock()
    waits = {}
    b = None

    def hook(n, items):
        if n == 1:  # an interactive request arrives while the first bulk chunk runs
            waits["fut"] = b.submit("q", "interactive")

    fn = Recorder(clock, ms_per_item=1.0, hook=hook)  # exactly the predicted 1 ms per item
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = manual(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO(min_throughput=10)}, pols, clock)
    assert b.chunk_bound_s == pytest.approx(0.010)  # a quarter of the 40 ms target
    bulk = [b.submit(i, "bulk") for i in range(100)]
    while b.step():
        pass
    sizes = [len(x) for x in fn.batches]
    assert sizes[0] == 10 and sizes[1] == 1, sizes          # chunk of 10 ms, then the interactive one
    assert fn.batches[1] == ["q"]
    assert max(sizes) <= 10 and sum(sizes) == 101
    m = b.metrics()
    assert m["interactive"]["latency_ms"]["queue"]["max"] <= 10.0 * 1.0000001
    assert m["bulk"]["chunk_limit"] == 10 and m["bulk"]["chunked_batches"] == 10
    assert waits["fut"].result(0) == ("done", "q")
    assert [f.result(0) for f in bulk] == [("done", i) for i in range(100)]


def test_chunk_size_learns_from_observed_service_times():
    # the plan says 1 ms per item, the fn takes 2 ms: after the first chunks overrun,
    # the fitted service time cuts them until they meet the 10 ms bound again: 5 items
    clock = FakeClock()
    fn = Recorder(clock, ms_per_item=2.0)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = manual(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    for i in range(300):
        b.submit(i, "bulk")
    while b.step():
        pass
    sizes = [len(x) for x in fn.batches]
    assert sizes[:3] == [10, 10, 10]  # 20 ms each: the plan's prior was wrong
    assert sum(sizes) == 300
    assert all(s == 5 for s in sizes[-20:-1]), sizes
    fit = b.metrics()["bulk"]["service_fit"]  # right where it is used: 5 items take 10 ms
    assert fit["fixed_ms"] + 5 * fit["per_item_ms"] + fit["tail_ms"] == pytest.approx(10.0, rel=0.01)


def test_chunk_size_learns_a_fixed_cost_per_batch():
    # 3 ms per batch + 0.5 ms per item, the plan says 1 ms per item: chunks sized
    # on the fitted line stay within the 10 ms bound, close to the best 14 items
    clock = FakeClock()
    fn = Recorder(clock, ms_per_batch=3.0, ms_per_item=0.5)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = manual(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    for i in range(300):
        b.submit(i, "bulk")
    while b.step():
        pass
    sizes = [len(x) for x in fn.batches]
    assert sizes[:3] == [10, 10, 10]  # 8 ms each: the prior, proportional to the plan
    assert all(12 <= s <= 14 for s in sizes[3:-1]), sizes
    assert b.metrics()["bulk"]["latency_ms"]["service"]["max"] <= 10.0 * (1 + 1e-6)


def test_tightest_class_is_not_chunked():
    clock = FakeClock()
    fn = Recorder()
    b = manual(fn, {"interactive": SLO(p99_ms=400)}, FakePolicy(batch_size=64, service_ms=300), clock)
    for i in range(64):
        b.submit(i)
    assert b.chunk_bound_s == pytest.approx(0.1)
    assert b.step() == 64


def test_interactive_waits_for_at_most_one_bulk_chunk_in_real_time():
    # real threads and clock: fn sleeps 0.2 ms per item; chunk bound 10 ms.
    # Asserted on the order of the batches fn saw, not on timings: a query that
    # is in the queue sees at most one bulk chunk start before it (the one the
    # worker may have taken just before the query arrived), however slowly
    # this shared machine runs the threads.
    starts = []  # (time fn started, "q" or "bulk", items)

    def fn(items, plan):
        starts.append((time.monotonic(), "q" if items == ["q"] else "bulk", len(items)))
        time.sleep(2e-4 * len(items))
        return items

    pols = {"interactive": FakePolicy(batch_size=1, service_ms=0.2),
            "bulk": FakePolicy(batch_size=256, service_ms=51.2)}
    # a 1 s target so that admission admits every query however loaded the
    # machine is (this test is about the order, not admission), the 10 ms bound set
    b = DynamicBatcher(fn, policy=pols, classes={"interactive": SLO(p99_ms=1000), "bulk": SLO()},
                       chunk_bound_ms=10)
    try:
        bulk = [b.submit(i, "bulk") for i in range(2000)]
        inter, queued_at = [], []
        for _ in range(10):
            time.sleep(0.02)
            inter.append(b.submit("q", "interactive"))
            queued_at.append(time.monotonic())  # the query is in the queue by now
        assert [f.result(10) for f in inter] == ["q"] * 10
        b.close()
        assert all(f.done() for f in bulk)
        m = b.metrics()
        limit = m["bulk"]["chunk_limit"]
        assert limit <= 50  # 10 ms at the planned 0.2 ms per item
        assert m["bulk"]["chunked_batches"] > 0
        q_starts = [t for t, kind, _ in starts if kind == "q"]
        assert len(q_starts) == 10
        for a, s in zip(queued_at, q_starts):
            ahead = [t for t, kind, _ in starts if kind == "bulk" and a < t < s]
            assert len(ahead) <= 1, (a, s, ahead)
    finally:
        b.close()


# --- sizes: requests priced by their real work -------------------------------------------
class TokenRecorder(Recorder):
    """fn whose service time is ms_per_token per token of its items, items
    being (name, tokens)."""

    def __init__(self, clock, ms_per_token, ms_per_batch=0.0):
        super().__init__(clock)
        self.ms_per_token = ms_per_token
        self.ms_per_batch_fixed = ms_per_batch

    def __call__(self, items, plan):
        self.batches.append(list(items))
        self.clock.advance_ms(self.ms_per_batch_fixed + self.ms_per_token * sum(t for _, t in items))
        return [("done", x) for x in items]


def sized(fn, classes, pols, clock, unit=10.0):
    return manual(fn, classes, pols, clock, size=lambda item: item[1], unit_size=unit)


def test_a_size_that_is_not_finite_and_positive_is_refused_at_submit():
    # a NaN/inf/zero/negative size would break every prediction in the worker
    clock = FakeClock()
    fn = TokenRecorder(clock, ms_per_token=0.1)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = sized(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    for bad in (float("nan"), float("inf"), 0.0, -3.0):
        for cls in ("interactive", "bulk"):
            with pytest.raises(ValueError, match="size="):
                b.submit(("x", bad), cls)
    with pytest.raises(ValueError, match="size="):
        b.submit_many([("ok", 5), ("bad", float("nan"))], "bulk")
    assert b.metrics()["bulk"]["queued"] == 0
    fut = b.submit(("ok", 5), "bulk")
    while b.step():
        pass
    assert fut.result(timeout=0) == ("done", ("ok", 5))


def test_a_chunk_of_long_documents_is_cut_shorter_than_one_of_short_ones():
    # reference item: 10 tokens at 1 ms; chunk bound 10 ms (a quarter of 40 ms)
    clock = FakeClock()
    fn = TokenRecorder(clock, ms_per_token=0.1)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = sized(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    for i in range(40):
        b.submit((f"short{i}", 5), "bulk")     # half a reference item: 0.5 ms
    for i in range(8):
        b.submit((f"long{i}", 40), "bulk")     # four reference items: 4 ms
    while b.step():
        pass
    sizes = [len(x) for x in fn.batches]
    assert sizes[:2] == [20, 20], sizes        # 20 x 0.5 ms = the 10 ms bound
    assert set(sizes[2:]) == {2}, sizes        # 2 x 4 ms fit, a third would be 12 ms
    # every chunk ran within the bound on the token-priced clock
    assert max(sum(t for _, t in x) * 0.1 for x in fn.batches) <= 10.0 + 1e-9
    # without sizes every document counts as one reference item: 10 per chunk
    clock2 = FakeClock()
    fn2 = TokenRecorder(clock2, ms_per_token=0.1)
    pols2 = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
             "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b2 = manual(fn2, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols2, clock2)
    for i in range(20):
        b2.submit((f"long{i}", 40), "bulk")
    b2.step()
    assert len(fn2.batches[0]) == 10  # 40 ms of real work: four times the bound


def test_a_document_larger_than_a_chunk_runs_alone():
    clock = FakeClock()
    fn = TokenRecorder(clock, ms_per_token=0.1)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = sized(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    b.submit(("huge", 300), "bulk")            # 30 ms: over the 10 ms bound
    b.submit(("small", 5), "bulk")
    assert b.step() == 1 and fn.batches[0] == [("huge", 300)]
    assert b.step() == 1


def test_admission_refuses_by_real_size():
    # batches of one reference item (10 tokens) predicted at 2 ms; target 21 ms
    def admitted(tokens):
        clock = FakeClock()
        b = sized(TokenRecorder(clock, ms_per_token=0.2), {"interactive": SLO(p99_ms=21)},
                  FakePolicy(batch_size=1, service_ms=2.0), clock)
        n = 0
        with pytest.raises(Overloaded):
            for i in range(100):
                b.submit((i, tokens))
                n += 1
        return n

    assert admitted(10) == 10   # 10 x 2 ms = 20 ms fit, the 11th would end at 22 ms
    assert admitted(40) == 2    # 8 ms each: two fit, a third ends at 24 ms
    # half-size queries: the plan's batch of one reference item holds two of
    # them (1 ms each): 21 x 1 ms fit the 21 ms target, the 22nd does not
    assert admitted(5) == 21


def test_admission_prices_a_query_behind_the_bulk_chunk_in_flight_by_its_size():
    def query_during_first_chunk(tokens):
        clock = FakeClock()
        got = {}
        b = None

        class Fn(TokenRecorder):
            def __call__(self, items, plan):
                if not self.batches:  # a query arrives while the first chunk runs
                    try:
                        got["fut"] = b.submit(("q", 10), "interactive")
                    except Overloaded as e:
                        got["refused"] = e
                return super().__call__(items, plan)

        pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
                "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
        b = sized(Fn(clock, ms_per_token=0.1), {"interactive": SLO(p99_ms=12), "bulk": SLO()},
                  pols, clock)
        for i in range(10):
            b.submit((f"doc{i}", tokens), "bulk")
        b.step()
        return got

    # bound 3 ms: the chunk is one 30-token document (3 ms) + the query's 1 ms: admitted
    assert "fut" in query_during_first_chunk(30)
    # a 200-token document is a chunk alone, predicted at 20 ms: the query would miss 12 ms
    refused = query_during_first_chunk(200)["refused"]
    assert refused.retry_after_s == pytest.approx(0.009)  # 20 + 1 ms vs 12 ms


def test_observed_service_time_is_normalized_to_reference_items():
    clock = FakeClock()
    pol = FakePolicy(batch_size=8, service_ms=8.0)  # 1 ms per 10-token reference item
    b = sized(TokenRecorder(clock, ms_per_token=0.1), {"bulk": SLO()}, pol, clock)
    b.submit(("a", 40), "bulk")
    b.submit(("b", 40), "bulk")                 # 8 ms for two documents of 4 items each
    b.close()
    (plan, seconds, batch), = pol.observed
    assert batch == 2
    assert seconds == pytest.approx(0.002)      # as two reference items would take


def test_size_needs_a_unit():
    with pytest.raises(ValueError, match="unit_size"):
        DynamicBatcher(Recorder(), policy=FakePolicy(), classes={"bulk": SLO()}, start=False,
                       size=len)


# --- admission control -------------------------------------------------------------------
def test_admission_refuses_what_cannot_meet_its_deadline():
    clock = FakeClock()
    fn = Recorder(clock, ms_per_item=2.0)
    # batches of 1 predicted at 2 ms: the k-th request waiting finishes at 2k ms
    b = manual(fn, {"interactive": SLO(p99_ms=11)}, FakePolicy(batch_size=1, service_ms=2.0), clock)
    futs = [b.submit(i) for i in range(5)]
    with pytest.raises(Overloaded) as e:
        b.submit(5)
    assert e.value.retry_after_s == pytest.approx(0.001)  # 12 ms predicted vs the 11 ms deadline
    assert e.value.cls == "interactive"
    assert b.step() == 1          # one served: room for one more
    futs.append(b.submit(5))
    while b.step():
        pass
    assert [f.result(0) for f in futs] == [("done", i) for i in range(6)]
    m = b.metrics()["interactive"]
    assert (m["count"], m["accepted"], m["completed"], m["rejected"]) == (7, 6, 6, 1)
    assert m["slo_attainment"] == 1.0
    assert m["goodput"] == pytest.approx(6 / 7)


def test_admission_counts_work_ahead_from_other_classes():
    clock = FakeClock()
    pols = {"a": FakePolicy(batch_size=1, service_ms=4.0), "b": FakePolicy(batch_size=1, service_ms=4.0)}
    b = manual(Recorder(clock), {"a": SLO(p99_ms=10), "b": SLO(p99_ms=10)}, pols, clock)
    b.submit(0, "a")
    b.submit(1, "b")  # 4 + 4 = 8 ms <= 10
    with pytest.raises(Overloaded):
        b.submit(2, "a")  # 12 ms: the "b" request (same deadline, earlier) is ahead too


def _fill(b, cls="interactive"):
    """Submit until refused; how many were admitted."""
    n = 0
    try:
        while n < 1000:
            b.submit(n, cls)
            n += 1
    except Overloaded:
        return n
    return n


def test_admission_learns_the_workers_real_cycle():
    # batches of 1 served in the predicted 1 ms, but the worker takes 4 ms from
    # one batch's start to the next (3 ms between them: the GIL, callbacks)
    clock = FakeClock()
    b = manual(Recorder(clock, ms_per_item=1.0), {"interactive": SLO(p99_ms=22)},
               FakePolicy(batch_size=1, service_ms=1.0), clock)
    assert _fill(b) == 22          # 22 x 1 ms predicted
    while b.step():
        clock.advance_ms(3.0)
    m = b.metrics()["interactive"]
    assert m["latency_ms"]["total"]["max"] > 22  # the last ones missed the target ...
    clock.advance_ms(100)
    assert _fill(b) == 5           # ... so admission now counts 4 ms per batch: 5 x 4 ms
    while b.step():
        pass


def test_admission_reads_a_stalled_batch_in_flight_as_not_about_to_end():
    def admitted_during(stall_ms):
        clock = FakeClock()
        got = {}
        b = None

        def hook(n, items):
            if n == 1:
                clock.advance_ms(stall_ms)  # the batch predicted at 1 ms is still running
                try:
                    got["fut"] = b.submit("q")
                except Overloaded as e:
                    got["refused"] = e

        b = manual(Recorder(clock, hook=hook), {"interactive": SLO(p99_ms=15)},
                   FakePolicy(batch_size=1, service_ms=1.0), clock)
        b.submit("first")
        b.step()
        return got

    assert "fut" in admitted_during(0.5)     # 0.5 ms left + 1 ms: admitted
    assert "fut" in admitted_during(10.0)    # late: 10 ms more assumed + 1 ms
    assert "refused" in admitted_during(20.0)  # 20 ms more + 1 ms > 15 ms


def test_max_queue_refuses_any_class():
    clock = FakeClock()
    b = manual(Recorder(), {"bulk": SLO()}, FakePolicy(batch_size=8, max_wait_ms=50), clock, max_queue=3)
    futs = [b.submit(i, "bulk") for i in range(3)]
    with pytest.raises(Overloaded, match="queue full"):
        b.submit(3, "bulk")
    b.close(drain=True)
    assert [f.result(0) for f in futs] == [("done", i) for i in range(3)]
    assert b.metrics()["bulk"]["rejected"] == 1


def test_overload_5x_refuses_at_submit_and_loses_nothing():
    """Issue 8's overload figures as behaviour (bench/overload.py prints them
    for a real kernel): every request is either accepted or refused cleanly at
    submit (Overloaded with its class and retry_after_s, no future), and lost
    == 0: every accepted one completes with its own result. No timing assertion."""
    # capacity ~1 item/ms (fn sleeps 1 ms per item); 4 threads offer ~5 items/ms
    def fn(items, plan):
        time.sleep(1e-3 * len(items))
        return [x * 2 for x in items]

    b = DynamicBatcher(fn, policy=FakePolicy(batch_size=4, service_ms=4.0),
                       classes={"interactive": SLO(p99_ms=20)}, name="overload")
    accepted, rejected = [], []
    lock = threading.Lock()

    def client(t):
        for i in range(250):
            x = t * 1000 + i
            try:
                f = b.submit(x)
            except Overloaded as e:
                assert e.retry_after_s >= 0 and e.cls == "interactive"
                with lock:
                    rejected.append(x)
            else:
                with lock:
                    accepted.append((x, f))
            if i % 5 == 4:
                time.sleep(0.004)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close(drain=True)
    assert len(accepted) + len(rejected) == 1000
    assert rejected, "5x the capacity must be refused in part"
    assert accepted
    # close(drain=True) has returned: every accepted future must be done already
    lost = [x for x, f in accepted
            if not f.done() or f.exception() is not None or f.result() != 2 * x]
    assert lost == [], f"{len(lost)} accepted requests lost: {lost[:10]}"
    m = b.metrics()["interactive"]
    assert m["rejected"] == len(rejected)
    assert m["completed"] == m["accepted"] == len(accepted)
    assert m["failed"] == 0 and m["queued"] == 0


# --- failures ------------------------------------------------------------------------------
def test_exception_in_fn_fails_only_that_batch():
    clock = FakeClock()

    def fn(items, plan):
        if "bad" in items:
            raise KeyError("bad item")
        return [x.upper() for x in items]

    b = manual(fn, {"interactive": SLO(p99_ms=100)}, FakePolicy(batch_size=2), clock)
    futs = [b.submit(x) for x in ("a", "bad", "c", "d")]
    assert b.step() == 2 and b.step() == 2
    # the batch ("a", "bad") is bisected: "bad" fails alone, "a" completes
    with pytest.raises(KeyError, match="bad item"):
        futs[1].result(0)
    assert futs[0].result(0) == "A"
    assert [f.result(0) for f in futs[2:]] == ["C", "D"]
    m = b.metrics()["interactive"]
    assert (m["completed"], m["failed"]) == (3, 1)


def test_wrong_number_of_results_fails_the_batch():
    b = manual(lambda items, plan: items[:-1], {"interactive": SLO(p99_ms=100)},
               FakePolicy(batch_size=3), FakeClock())
    futs = [b.submit(i) for i in range(3)]
    b.step()
    for f in futs:
        with pytest.raises(ValueError, match="2 results for a batch of 3"):
            f.result(0)


def test_planning_error_reaches_the_futures():
    class Broken(FakePolicy):
        def plan(self, op, *, queued=0, arrival_rate=None):
            if queued > 1:
                raise ValueError("no profile for this op")
            return self.p

    b = manual(Recorder(), {"bulk": SLO()}, Broken(batch_size=4), FakeClock())
    futs = [b.submit(i, "bulk") for i in range(3)]
    b.step()
    for f in futs:
        with pytest.raises(ValueError, match="no profile"):
            f.result(0)
    assert b.metrics()["bulk"]["failed"] == 3


def test_cancelled_request_is_skipped_and_counted():
    fn = Recorder()
    b = manual(fn, {"interactive": SLO(p99_ms=100)}, FakePolicy(batch_size=4), FakeClock())
    futs = [b.submit(i) for i in range(3)]
    assert futs[1].cancel()
    b.close()
    assert fn.batches == [[0, 2]]
    assert futs[0].result(0) == ("done", 0) and futs[1].cancelled()
    assert b.metrics()["interactive"]["cancelled"] == 1


# --- close -----------------------------------------------------------------------------------
def test_close_drain_finishes_everything_without_waiting_for_batches():
    pol = FakePolicy(batch_size=64, max_wait_ms=60_000)  # would wait a minute to fill
    b = DynamicBatcher(lambda items, plan: [x + 1 for x in items], policy=pol,
                       classes={"interactive": SLO(p99_ms=120_000), "bulk": SLO()})
    futs = [b.submit(i, "bulk" if i % 3 else "interactive") for i in range(50)]
    t0 = time.monotonic()
    b.close(drain=True)
    assert time.monotonic() - t0 < 30  # far less than the minute the plan would wait
    assert [f.result(0) for f in futs] == list(range(1, 51))
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)
    b.close()  # idempotent
    assert not b._thread.is_alive()


def test_close_without_drain_fails_pending_and_completes_the_batch_in_flight():
    started, release = threading.Event(), threading.Event()

    def fn(items, plan):
        started.set()
        release.wait(5)
        return items

    b = DynamicBatcher(fn, policy=FakePolicy(batch_size=2), classes={"interactive": SLO(p99_ms=10_000)})
    first = [b.submit(i) for i in range(2)]
    assert started.wait(5)
    pending = [b.submit(i) for i in range(2, 7)]
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    for f in pending:
        with pytest.raises(RuntimeError, match=CLOSED_MESSAGE):
            f.result(timeout=5)
    release.set()
    closer.join(5)
    assert [f.result(0) for f in first] == [0, 1]
    m = b.metrics()["interactive"]
    assert (m["completed"], m["failed"], m["queued"]) == (2, 5, 0)


def test_close_without_drain_in_manual_mode():
    b = manual(Recorder(), {"interactive": SLO(p99_ms=100)}, FakePolicy(batch_size=4, max_wait_ms=50),
               FakeClock())
    futs = [b.submit(i) for i in range(3)]
    b.close(drain=False)
    for f in futs:
        with pytest.raises(RuntimeError, match="batcher closed before this request ran"):
            f.result(0)


def test_context_manager_drains():
    with DynamicBatcher(lambda items, plan: items, policy=FakePolicy(batch_size=8, max_wait_ms=10_000),
                        classes={"interactive": SLO(p99_ms=60_000)}) as b:
        futs = [b.submit(i) for i in range(5)]
    assert b.closed and [f.result(0) for f in futs] == list(range(5))


# --- asyncio ------------------------------------------------------------------------------------
def test_asyncio_infer():
    pol = FakePolicy(batch_size=8, max_wait_ms=1)
    b = DynamicBatcher(lambda items, plan: [x * x for x in items], policy=pol,
                       classes={"interactive": SLO(p99_ms=5_000), "bulk": SLO()})

    async def main():
        got = await asyncio.gather(*(b.infer(i, "bulk" if i % 2 else "interactive") for i in range(20)))
        return got

    try:
        assert asyncio.run(main()) == [i * i for i in range(20)]
    finally:
        b.close()


def test_asyncio_infer_raises_overloaded_at_once():
    b = DynamicBatcher(lambda items, plan: items, policy=FakePolicy(batch_size=1, service_ms=50),
                       classes={"interactive": SLO(p99_ms=10)})

    async def main():
        with pytest.raises(Overloaded):
            await b.infer("x")

    try:
        asyncio.run(main())
        assert b.metrics()["interactive"]["rejected"] == 1
    finally:
        b.close()


# --- feedback ------------------------------------------------------------------------------------
def test_observe_gets_service_time_only():
    clock = FakeClock()
    pol = FakePolicy(batch_size=4, max_wait_ms=10)
    b = manual(Recorder(clock, ms_per_batch=3.0), {"interactive": SLO(p99_ms=100)}, pol, clock)
    b.submit(1)
    b.submit(2)
    clock.advance_ms(10)  # 10 ms of queue time
    assert b.step() == 2
    assert len(pol.observed) == 1
    plan, seconds, batch = pol.observed[0]
    assert plan is pol.p and batch == 2
    assert seconds == pytest.approx(0.003)
    lat = b.metrics()["interactive"]["latency_ms"]
    assert lat["queue"]["max"] == pytest.approx(10.0) and lat["service"]["max"] == pytest.approx(3.0)
    assert lat["total"]["max"] == pytest.approx(13.0)


def test_expensive_policy_calls_stay_within_the_duty_cycle():
    clock = FakeClock()

    class Slow(FakePolicy):  # each observe() costs 1 ms, as much as a batch
        def observe(self, plan, seconds, batch=None):
            super().observe(plan, seconds, batch)
            clock.advance_ms(1.0)

    pol = Slow(batch_size=1, service_ms=1.0)
    b = manual(Recorder(clock, ms_per_batch=1.0), {"bulk": SLO()}, pol, clock)
    for i in range(200):
        b.submit(i, "bulk")
    while b.step():
        pass
    m = b.metrics()["bulk"]
    assert m["completed"] == 200
    assert len(pol.observed) + m["observe_skipped"] == 200
    # after a 1 ms observe the next waits 19 ms (5% of the time): about one batch in 20
    assert 8 <= len(pol.observed) <= 13
    assert all(s == pytest.approx(0.001) for _, s, _ in pol.observed)  # service time only


def test_observe_without_batch_keyword_and_observe_errors_do_not_break_serving():
    class Old:
        def __init__(self):
            self.calls = []

        def plan(self, op, *, queued=0, arrival_rate=None):
            return FakePlan(batch_size=2)

        def observe(self, plan, seconds):
            self.calls.append(seconds)
            raise RuntimeError("feedback store is down")

    pol = Old()
    b = manual(Recorder(), {"interactive": SLO(p99_ms=100)}, pol, FakeClock())
    futs = [b.submit(i) for i in range(4)]
    b.step()
    b.step()
    assert [f.result(0) for f in futs] == [("done", i) for i in range(4)]
    assert len(pol.calls) == 2 and b.metrics()["interactive"]["observe_errors"] == 2


def test_policy_forms_dict_and_factory():
    made = {}

    def factory(slo):
        made[slo.p99_ms] = FakePolicy(batch_size=3)
        return made[slo.p99_ms]

    b = manual(Recorder(), {"interactive": SLO(p99_ms=50), "bulk": SLO(p99_ms=500)}, factory, FakeClock(),
               op="the-op")
    b.submit(1)
    b.submit(2, "bulk")
    b.close()
    assert set(made) == {50.0, 500.0}
    assert all(p.plans and p.plans[0][0] == "the-op" for p in made.values())
    with pytest.raises(ValueError, match="no entry for class 'bulk'"):
        manual(Recorder(), {"interactive": SLO(p99_ms=50), "bulk": SLO()},
               {"interactive": FakePolicy()}, FakeClock())
    with pytest.raises(TypeError):
        manual(Recorder(), {"interactive": SLO()}, object(), FakeClock())


def test_unknown_class_is_a_value_error():
    b = manual(Recorder(), {"interactive": SLO(p99_ms=50)}, FakePolicy(), FakeClock())
    with pytest.raises(ValueError, match="unknown class 'bulk'"):
        b.submit(1, "bulk")


def test_with_the_real_policy_engine():
    from pykernels.policy import Policy, Profile, ops

    op = ops.Linear(384, 1536)
    prof = Profile(source="synthetic")
    for v, p, t, c0, c1 in (("latency", "fp32", 1, 0.03, 0.012), ("throughput", "fp32", 1, 0.15, 0.0045)):
        for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            x = c0 + c1 * bs
            prof.add(op, v, p, t, bs, x, 1.3 * x)
    clock = FakeClock()
    seen = []

    def fn(items, plan):
        seen.append((plan.variant, len(items)))
        clock.advance_ms(plan.service_p50_ms * len(items) / plan.batch_size)
        return items

    b = manual(fn, {"interactive": SLO(p99_ms=2.0), "bulk": SLO(min_throughput=50_000)},
               lambda slo: Policy(slo, prof), clock, op=op)
    for i in range(300):
        b.submit(i, "bulk")
    f = b.submit("q", "interactive")
    while b.step():
        pass
    b.close()
    assert f.result(0) == "q"
    m = b.metrics()
    assert m["bulk"]["completed"] == 300 and m["bulk"]["observe_errors"] == 0
    assert m["interactive"]["observe_errors"] == 0
    assert seen[0] == ("latency", 1)  # the interactive request first (EDF)
    assert m["bulk"]["plan"]["variant"] == "throughput"
    assert m["bulk"]["chunk_limit"] < m["bulk"]["plan"]["batch_size"]


def test_plans_see_queue_length_and_arrival_rate_and_are_cached():
    clock = FakeClock()
    pol = FakePolicy(batch_size=4, max_wait_ms=1000)
    b = DynamicBatcher(Recorder(), policy=pol, classes={"interactive": SLO(p99_ms=60_000)},
                       clock=clock, start=False)  # default replan interval (0.25 s)
    for i in range(100):
        b.submit(i)
        clock.advance_ms(1)  # 1000 requests/s
    assert len(pol.plans) < 20, "plans are cached per queue-length and rate bucket"
    op, queued, rate = pol.plans[-1]
    assert queued == 64  # 100 queued, rounded down to a power of two
    assert rate == pytest.approx(1000.0, rel=0.1)  # quarter-octave buckets
    b.close()


# --- metrics, sketch, Prometheus ----------------------------------------------------------------
def test_metrics_fields_and_slo_attainment():
    clock = FakeClock()
    b = manual(Recorder(clock, ms_per_batch=3.0), {"interactive": SLO(p99_ms=5), "bulk": SLO()},
               FakePolicy(batch_size=1, service_ms=3.0), clock, relaxed_deadline_s=60.0)
    futs = [b.submit(i) for i in range(1)]
    clock.advance_ms(1)
    while b.step():
        pass  # total 4 ms: within 5 ms
    futs.append(b.submit(1))
    clock.advance_ms(2.5)
    b.step()  # total 5.5 ms: a miss
    for i in range(4):
        b.submit(i, "bulk")
    while b.step():
        pass
    m = b.metrics()
    want = {"slo_p99_ms", "count", "accepted", "completed", "failed", "rejected", "cancelled", "queued",
            "in_flight", "batches", "mean_batch_size", "chunked_batches", "latency_ms", "samples",
            "throughput", "throughput_recent", "slo_attainment", "goodput", "plan", "chunk_limit",
            "observe_errors"}
    assert want <= set(m["interactive"]) and want <= set(m["bulk"])
    i = m["interactive"]
    assert i["completed"] == 2 and i["slo_attainment"] == 0.5
    assert set(i["latency_ms"]) == {"queue", "service", "total"}
    for kind in i["latency_ms"].values():
        assert {"p50", "p95", "p99"} <= set(kind)
    assert i["latency_ms"]["service"]["p99"] == pytest.approx(3.0, rel=0.01)
    assert i["latency_ms"]["total"]["p99"] == pytest.approx(4.0, rel=0.01)  # lower of {4, 5.5}
    assert i["latency_ms"]["total"]["max"] == pytest.approx(5.5)
    assert m["bulk"]["slo_attainment"] is None and m["bulk"]["completed"] == 4
    assert m["bulk"]["throughput"] > 0


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "pareto", "with_zeros"])
def test_sketch_matches_numpy_percentile_within_relative_error(dist):
    rng = np.random.default_rng(7)
    n = 20_000
    x = {"lognormal": rng.lognormal(-6, 1.5, n), "uniform": rng.uniform(1e-4, 2.0, n),
         "pareto": rng.pareto(1.2, n) + 1e-3,
         "with_zeros": np.where(rng.random(n) < 0.2, 0.0, rng.exponential(1e-2, n))}[dist]
    a = 0.01
    s = QuantileSketch(a)
    half = QuantileSketch(a)
    for v in x[: n // 2].tolist():
        s.add(v)
    for v in x[n // 2:].tolist():
        half.add(v)
    s.merge(half)
    qs = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
    many = s.quantiles(qs)
    for q in qs:
        exact = float(np.percentile(x, 100 * q, method="lower"))  # rank floor(q (n - 1))
        got = s.quantile(q)
        assert got == many[q]
        assert abs(got - exact) <= a * exact + 1e-12, (q, got, exact)
    assert s.count == n and s.sum == pytest.approx(float(x.sum()))
    assert s.min == x.min() and s.max == x.max()


def test_sketch_edge_cases():
    s = QuantileSketch()
    assert s.quantile(0.5) is None and s.mean is None
    s.add(3.0, count=5)
    assert s.quantile(0.0) == s.quantile(1.0) == 3.0
    with pytest.raises(ValueError):
        s.add(-1.0)
    with pytest.raises(ValueError):
        s.add(float("nan"))
    with pytest.raises(ValueError):
        s.quantile(1.5)
    with pytest.raises(ValueError):
        s.merge(QuantileSketch(0.05))
    with pytest.raises(ValueError):
        QuantileSketch(0.0)


LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                  r'(NaN|[+-]Inf|-?[0-9.eE+-]+)$')


def test_prometheus_text_parses():
    clock = FakeClock()
    b = manual(Recorder(clock, ms_per_batch=2.0), {"interactive": SLO(p99_ms=50), 'we"ird\\cls': SLO()},
               FakePolicy(batch_size=2, service_ms=2.0), clock, name="emb")
    for i in range(5):
        b.submit(i)
        b.submit(i, 'we"ird\\cls')
    b.close()
    text = b.prometheus()
    assert text.endswith("\n")
    typed = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# "):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE") and len(parts) == 4
            if parts[1] == "TYPE":
                typed[parts[2]] = parts[3]
            continue
        mm = LINE.match(line)
        assert mm, f"not a sample line: {line!r}"
        float(mm.group(3).replace("Inf", "inf"))
        samples.append(line)
        base = re.sub(r"_(sum|count)$", "", mm.group(1))
        assert base in typed, f"{mm.group(1)} has no TYPE line"
    assert typed["pykernels_requests_total"] == "counter"
    assert typed["pykernels_request_latency_seconds"] == "summary"
    assert ('pykernels_requests_total{batcher="emb",class="interactive",outcome="completed"} 5'
            in samples)
    assert any(s.startswith('pykernels_request_latency_seconds{batcher="emb",class="interactive",'
                            'kind="total",quantile="0.99"}') for s in samples)
    assert 'class="we\\"ird\\\\cls"' in text
    assert 'pykernels_slo_attainment_ratio{batcher="emb",class="interactive"} 1.0' in samples


# --- concurrency -----------------------------------------------------------------------------------
def test_many_submitting_threads_lose_nothing():
    pol = FakePolicy(batch_size=64, max_wait_ms=0.5)
    calls = []

    def fn(items, plan):
        calls.append(len(items))
        return [(x, threading.get_ident()) for x in items]

    b = DynamicBatcher(fn, policy=pol, classes={"interactive": SLO(p99_ms=60_000), "bulk": SLO()},
                       name="threads")
    n_threads, per = 8, 1250
    futs = [None] * (n_threads * per)
    barrier = threading.Barrier(n_threads)

    def client(t):
        barrier.wait()
        for i in range(per):
            k = t * per + i
            futs[k] = b.submit(k, "bulk" if k % 2 else "interactive")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close(drain=True)
    assert [f.result(0)[0] for f in futs] == list(range(n_threads * per))
    assert sum(calls) == n_threads * per and max(calls) <= 64
    m = b.metrics()
    assert m["interactive"]["completed"] + m["bulk"]["completed"] == n_threads * per
    assert m["interactive"]["rejected"] == m["bulk"]["rejected"] == 0
    assert not math.isnan(m["bulk"]["throughput"])


def test_idle_batcher_admits_a_probe_after_a_slow_outlier():
    """Regression (found by the server tests): one slow first batch made every
    later prediction miss the target, so every request was refused and no new
    observation could correct it. An idle batcher with observations admits."""
    clock = FakeClock()
    durations = iter([200.0, 10.0, 10.0] + [10.0] * 50)

    def fn(items, plan):
        clock.advance_ms(next(durations))
        return items

    b = manual(fn, {"interactive": SLO(p99_ms=50)}, FakePolicy(batch_size=1, service_ms=10), clock)
    served = 0
    for i in range(20):
        fut = b.submit(i)  # must not raise Overloaded: the batcher is idle each time
        assert b.step() == 1
        assert fut.result(timeout=1) == i
        served += 1
    assert served == 20 and b.metrics()["interactive"]["rejected"] == 0


def test_an_idle_batcher_admits_one_request_larger_than_the_target():
    # a class that serves its reference item within the target must not refuse a
    # single long text forever: an idle batcher runs it (its size alone is no reason)
    clock = FakeClock()
    fn = TokenRecorder(clock, ms_per_token=0.1)
    pols = {"interactive": FakePolicy(batch_size=1, service_ms=1.0),
            "bulk": FakePolicy(batch_size=64, service_ms=64.0)}
    b = sized(fn, {"interactive": SLO(p99_ms=40), "bulk": SLO()}, pols, clock)
    fut = b.submit(("long", 800), "interactive")   # 80 reference items: 80 ms > 40 ms
    while b.step():
        pass
    assert fut.result(timeout=0) == ("done", ("long", 800))
