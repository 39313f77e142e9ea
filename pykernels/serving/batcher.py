"""DynamicBatcher: SLO classes, earliest-deadline-first batches, admission control.

    from pykernels.policy import SLO, Policy
    from pykernels.serving import DynamicBatcher, Overloaded

    classes = {"interactive": SLO(p99_ms=50), "bulk": SLO(min_throughput=200)}
    with DynamicBatcher(encode, policy=lambda slo: Policy(slo, profile), classes=classes,
                        op=model_op) as batcher:
        fut = batcher.submit(text, "interactive")     # concurrent.futures.Future
        emb = await batcher.infer(text, "bulk")       # from an asyncio server
        print(batcher.metrics()["interactive"]["latency_ms"]["total"]["p99"])

``fn(items, plan) -> results``: one call per batch, ``results`` in the order of
``items`` (a list, or anything ``list()`` accepts with the same length). ``plan``
is the class's plan (variant, precision, threads); the batch may hold fewer
items than ``plan.batch_size``.

Design and reasoning: docs/serving.md, "The batcher".

``start=False`` creates no thread: the caller drives the batcher with
``step()`` (one batch at most, in the calling thread), which with a fake clock
makes every decision deterministic in tests.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

from pykernels.policy.adapter import PlanObserveAdapter

from . import pricing
from .metrics import render_prometheus
from .queues import (ClassState, Job, Overloaded, Request, ResultCountError, TooLarge,
                     policy_for, queued_bucket, rate_bucket, recent_rate, unit_for)

log = logging.getLogger("pykernels.serving")

CLOSED_MESSAGE = "batcher closed before this request ran"
# A group is refused for good (TooLarge) only when its typical service time on an
# idle batcher is over twice its class's p99 target: learned service times grow
# with the machine's load (x2.7 measured between load 2 and 11 on 2 cores), and
# a group that misses by less may fit once it drops (429, retryable).
GROUP_MARGIN = 2.0


class DynamicBatcher:
    """Batches requests of several SLO classes for ``fn(items, plan)``.

    fn: called from the worker thread with a list of items and the plan the
        batch runs under; returns one result per item, in order.
    policy: a policy for every class (anything with ``plan(op, queued=,
        arrival_rate=)`` and ``observe(plan, seconds)``, such as
        ``pykernels.policy.Policy``), a dict class -> policy, or a factory
        ``slo -> policy`` called once per class (so each class plans for its
        own SLO: ``policy=lambda slo: Policy(slo, profile)``).
    classes: dict class name -> SLO (``p99_ms`` sets deadlines and admission;
        the policy reads the rest).
    op: what the policy plans (a ``pykernels.policy.ops`` op), or a dict
        class -> op; passed through to ``policy.plan``.
    clock: seconds, monotonic (``time.monotonic``); inject a fake one in tests.
    max_queue: requests waiting (all classes) beyond which submit refuses.
    chunk_fraction / chunk_bound_ms: the chunk bound (see the module doc).
    relaxed_deadline_s: deadline offset of classes without a p99 target.
    replan_interval_s: how long a wrapped policy's plan is reused for the same
        queue state (a ``Policy`` caches its own plans until feedback changes them).
    policy_duty: the largest fraction of time spent in ``policy.plan`` and
        ``policy.observe`` per class (1.0: plan on every new queue state and
        observe every batch).
    start: start the worker thread (False: drive it with ``step()``).
    name: label in metrics, Prometheus output and the thread's name.
    size / unit_size: price requests by their real size (docs/serving.md,
        "Sizes"): ``size(item)`` is an item's work in any additive unit (e.g.
        its tokens, or its forward's FLOPs) and ``unit_size`` (a number, or a
        dict class -> number; default: the class op's ``flops()``) the work of
        one item of the class's op as the profile measured it. Batches,
        chunks, admission and in-flight predictions then count work, not
        items. None: every item counts as one reference item.
    """

    def __init__(self, fn: Callable[[List[Any], Any], Sequence[Any]], *, policy, classes: Mapping,
                 op=None, clock: Callable[[], float] = time.monotonic, max_queue: int = 65536,
                 chunk_fraction: float = 0.25, chunk_bound_ms: Optional[float] = None,
                 relaxed_deadline_s: float = 10.0, replan_interval_s: float = 0.25,
                 rate_window_s: float = 1.0, metrics_window_s: float = 10.0,
                 relative_accuracy: float = 0.01, policy_duty: float = 0.05,
                 start: bool = True, name: str = "batcher",
                 size: Optional[Callable[[Any], float]] = None, unit_size=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(items, plan), got {type(fn).__name__}")
        if not isinstance(classes, Mapping) or not classes:
            raise ValueError("classes must be a non-empty dict: class name -> SLO, "
                             "e.g. {'interactive': SLO(p99_ms=50), 'bulk': SLO(min_throughput=100)}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if not 0 < chunk_fraction <= 1:
            raise ValueError(f"chunk_fraction must be in (0, 1], got {chunk_fraction!r}")
        if chunk_bound_ms is not None and not chunk_bound_ms > 0:
            raise ValueError(f"chunk_bound_ms must be > 0 or None, got {chunk_bound_ms!r}")
        if not 0 < policy_duty <= 1:
            raise ValueError(f"policy_duty must be in (0, 1], got {policy_duty!r}")
        if not relaxed_deadline_s > 0:
            raise ValueError(f"relaxed_deadline_s must be > 0, got {relaxed_deadline_s!r}")
        if size is not None and not callable(size):
            raise TypeError(f"size must be callable as size(item) -> work, got {type(size).__name__}")
        self._fn = fn
        self._size = size
        self._clock = clock
        self.max_queue = max_queue
        self.name = str(name)
        self.replan_interval_s = float(replan_interval_s)
        self.rate_window_s = float(rate_window_s)
        self._duty_gap = (1.0 - policy_duty) / policy_duty
        stats_kw = {"relative_accuracy": relative_accuracy, "window_s": metrics_window_s}

        self._classes: Dict[str, ClassState] = {}
        for cname, slo in classes.items():
            if not isinstance(cname, str):
                raise TypeError(f"class names must be strings, got {cname!r}")
            pol = policy_for(policy, cname, slo)
            if not callable(getattr(pol, "predict_service_ms", None)):
                pol = PlanObserveAdapter(pol, clock=clock, max_age_s=replan_interval_s,
                                         duty=policy_duty)
            cop = op.get(cname) if isinstance(op, Mapping) else op
            self._classes[cname] = ClassState(cname, slo, pol, cop, relaxed_deadline_s, stats_kw)
            if size is not None:
                self._classes[cname].unit = unit_for(unit_size, cname, cop)

        targets = [c.p99_s for c in self._classes.values() if c.p99_s is not None]
        tightest = min(targets) if targets else None
        if chunk_bound_ms is not None:
            self.chunk_bound_s: Optional[float] = float(chunk_bound_ms) / 1e3
        else:
            self.chunk_bound_s = chunk_fraction * tightest if tightest is not None else None
        for c in self._classes.values():
            c.tight = tightest is not None and c.p99_s == tightest
            c.chunked = self.chunk_bound_s is not None and not c.tight
        self._any_chunked = any(c.chunked for c in self._classes.values())
        self._default_cls = "interactive" if "interactive" in self._classes else next(iter(self._classes))

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queued = 0
        self._closed = False
        self._drain = True
        self._last_chunked = False
        self._in_flight: Optional[tuple] = None  # (class, predicted end, start)
        # admission's predictions against the worker's real cycle (pricing.WallRatio)
        self._wall = pricing.WallRatio()
        self._prev_start: Optional[tuple] = None  # (start of the last batch, its p50 prediction)
        self._waited = True  # the worker waited since the last batch started
        self._thread: Optional[threading.Thread] = None
        if start:
            self._thread = threading.Thread(target=self._worker, name=f"pykernels-{self.name}",
                                            daemon=True)
            self._thread.start()

    # --- predictions (under the lock unless noted; pricing.py) ---------------
    @staticmethod
    def _est(c: ClassState, plan, work: float, tail: bool = True) -> float:
        """Predicted service time (s) of one batch of ``work`` reference items
        under ``plan``, the policy's (tail=False: its p50 rather than its tail)."""
        return pricing.batch_s(c, plan, work, tail)

    def _work_cap(self, c: ClassState, plan) -> float:
        """Reference items per batch: the plan's batch size, cut to the chunk bound."""
        return pricing.batch_work(c, plan, self.chunk_bound_s or 0.0, self._size is not None)

    def _limit(self, c: ClassState, plan) -> int:
        """Items the next batch takes from the class's queue (at least one);
        with an empty queue, reference items per batch (floored)."""
        cap = self._work_cap(c, plan)
        return c.queue.fitting(cap) if len(c.queue) else max(1, int(cap))

    def _drain_s(self, c: ClassState, plan, work: float, tail: bool = True) -> float:
        """Predicted time to serve ``work`` queued reference items of class c
        in batches of its work cap (pricing.drain_s)."""
        if work <= 0:
            return 0.0
        return pricing.drain_s(c, plan, work, self._work_cap(c, plan), tail)

    # --- plans (outside the lock) --------------------------------------------
    def _rate(self, c: ClassState, now: float) -> Optional[float]:
        return recent_rate(c.arrivals, now, self.rate_window_s)

    def _plan_for(self, c: ClassState, queued: int, rate: Optional[float], now: float):
        """The policy's plan for the class's queue state, bucketed so that the
        policy's plan cache serves repeated states."""
        if c.plan is not None and now < c.plan_after:
            return c.plan  # over the planning budget: keep the latest plan a little longer
        t0 = self._clock()
        plan = c.policy.plan(c.op, queued=queued_bucket(queued), arrival_rate=rate_bucket(rate))
        t1 = self._clock()
        c.plan_after = t1 + (t1 - t0) * self._duty_gap
        c.plan = plan
        return plan

    # --- submit ---------------------------------------------------------------
    def submit(self, item: Any, cls: Optional[str] = None) -> concurrent.futures.Future:
        """Queue ``item`` in class ``cls`` (default: "interactive" if there is
        such a class, else the first class). Returns a Future of its result.
        Raises ``Overloaded`` at once when the request's deadline cannot be met
        or the queue is full, ``RuntimeError`` after ``close()``, ``ValueError``
        for an unknown class. Thread-safe. Cancelling the future while it is
        queued takes it out of the queue at once."""
        return self.submit_many([item], cls)[0]

    def submit_many(self, items: Sequence[Any], cls: Optional[str] = None
                    ) -> List[concurrent.futures.Future]:
        """Queue ``items`` as one unit with one deadline (a request of several
        texts): all are admitted or none is. Returns one Future per item.
        An idle batcher (nothing queued or running) admits any group of a
        latency class whose single item fits the target. Otherwise raises ``TooLarge`` (an ``Overloaded`` with
        ``retry_after_s`` inf) when the group's typical (p50) service time on
        an idle batcher is over ``GROUP_MARGIN`` (2) times the class's p99
        target although one item alone would meet it, or when the group is larger than ``max_queue``; ``Overloaded`` when the work ahead or a full
        queue refuses it now (``retry_after_s``: the predicted time until it
        would be admitted); otherwise as ``submit``."""
        items = list(items)
        n = len(items)
        if n == 0:
            return []
        c = self._class(cls)
        if self._closed:
            raise RuntimeError(f"DynamicBatcher {self.name!r} is closed; it accepts no new requests")
        if n > self.max_queue:
            with self._lock:
                c.stats.rejected += n
            raise TooLarge(f"{n} items in one group exceed max_queue={self.max_queue}", cls=c.name)
        # sizes in reference items of the class's op (outside the lock: a user
        # function, e.g. a tokenizer)
        sizes = [float(self._size(it)) / c.unit for it in items] if self._size else [1.0] * n
        bad = next((s for s in sizes if not (math.isfinite(s) and s > 0)), None)
        if bad is not None:  # a NaN, inf, zero or negative size would break every prediction
            raise ValueError(f"size= must return a finite number > 0 for every item, got "
                             f"{bad * c.unit!r}")
        work = sum(sizes)
        now = self._clock()
        if c.plan is None or c.p99_s is not None:
            with self._lock:
                queued, rate = len(c.queue) + n, self._rate(c, now)
            self._plan_for(c, queued, rate, now)  # cached; may call the policy
        futs = [concurrent.futures.Future() for _ in range(n)]
        reqs = []
        with self._cond:
            if self._closed:
                raise RuntimeError(f"DynamicBatcher {self.name!r} is closed; it accepts no new requests")
            now = self._clock()
            st = c.stats
            if st.first_arrival is None:
                st.first_arrival = now
            idle_batcher = self._in_flight is None and self._queued == 0
            # typical (p50) service times: a group is refused for good only when
            # one item fits the target and the group misses it even untailed
            one_fits = (c.p99_s is not None and n > 1
                        and self._drain_s(c, c.plan, max(sizes), tail=False) <= c.p99_s)
            if one_fits and not idle_batcher:
                idle = self._drain_s(c, c.plan, work, tail=False)
                if idle > GROUP_MARGIN * c.p99_s:
                    st.rejected += n
                    raise TooLarge(
                        f"class {c.name!r}: {n} items are predicted to take {idle * 1e3:.3g} ms "
                        f"even on an idle server, over the p99 target of {c.p99_s * 1e3:.3g} ms; "
                        "send them in a class without a latency target (bulk) or in smaller "
                        "groups", cls=c.name)
            if self._queued + n > self.max_queue:
                st.rejected += n
                backlog = self._backlog_s(now)
                # the queue drains in deadline order: the group fits once the
                # excess has been served, a share of the backlog
                excess = self._queued + n - self.max_queue
                raise Overloaded(
                    f"queue full: {self._queued} requests waiting (max_queue={self.max_queue})",
                    retry_after_s=backlog * excess / max(1, self._queued), cls=c.name)
            deadline = now + c.offset_s
            if c.p99_s is not None:
                finish = now + self._ahead_s(c, deadline, now, work)
                # An idle batcher admits a probe once the class has observed
                # batches: a learned prediction that says even an empty queue
                # misses (e.g. after one slow outlier) could otherwise never be
                # corrected, as refused requests produce no observations. With
                # no observations yet, the plan's prior decides.
                # A group of a class that can serve one item, or a single
                # request however large (priced by its size), is admitted by an
                # idle batcher: its size alone must never refuse it forever.
                probe = idle_batcher and (
                    st.batches > 0 or one_fits
                    or (n == 1 and self._drain_s(c, c.plan, 1.0, tail=False) <= c.p99_s))
                if finish > deadline and not probe:
                    st.rejected += n
                    raise Overloaded(
                        f"class {c.name!r}: predicted completion in {(finish - now) * 1e3:.3g} ms "
                        f"misses the p99 target of {c.p99_s * 1e3:.3g} ms "
                        f"({self._queued} requests queued)",
                        retry_after_s=finish - deadline, cls=c.name)
            for item, fut, sz in zip(items, futs, sizes):
                r = Request(item, fut, now, deadline, c.name, sz)
                c.queue.append(r)
                c.arrivals.append(now)
                reqs.append(r)
            self._queued += n
            st.accepted += n
            self._cond.notify()
        for r in reqs:  # outside the lock: a future already cancelled calls back at once
            r.future.add_done_callback(self._unqueue_if_cancelled(r))
        return futs

    def _unqueue_if_cancelled(self, r: Request):
        def done(fut):
            if not fut.cancelled():
                return
            with self._cond:
                k = self._classes[r.cls]
                if k.queue.remove(r):
                    self._queued -= 1
                    k.stats.cancelled += 1
                    self._cond.notify_all()
        return done

    def _ahead_s(self, c: ClassState, deadline: float, now: float, work: float = 1.0) -> float:
        """Predicted time from now until new requests of class c with this
        deadline and ``work`` reference items have been served (see
        "Admission" in docs/serving.md)."""
        fl = self._in_flight
        t = self._in_flight_left(now)
        # A request of the tightest class, once ready, runs after at most one chunk
        # of looser classes' due work (none if a chunk is in flight): EDF, but
        # never two chunks in a row while a tight batch is ready. Their work not
        # yet due never runs first (it may while this request waits to fill a
        # batch, which the latest start time allows for).
        chunk_in_flight = fl is not None and fl[0].chunked
        one_chunk = 0.0
        t_queued = 0.0
        for k in self._classes.values():
            q = len(k.queue)
            if k is c:
                t_queued += self._drain_s(k, k.plan, k.queue.work() + work)
            elif q:
                due = k.queue.count_due_by(deadline)
                if not due:
                    continue
                if c.tight and k.chunked:
                    if not chunk_in_flight:
                        head = k.queue.work(min(due, self._limit(k, k.plan)))
                        one_chunk = max(one_chunk, self._est(k, k.plan, head))
                else:
                    t_queued += self._drain_s(k, k.plan, k.queue.work(due))
        # the queued work as long as the worker really takes for it, under load too
        return t + (t_queued + one_chunk) * self._wall.ratio

    def _in_flight_left(self, now: float) -> float:
        """Predicted time left of the batch in flight. Past its predicted end,
        as long again as it has run: service times under load are heavy
        tailed (a batch predicted at 1.2 ms ran 80 ms, bench/overload.py), and
        for such a (Pareto-like) tail the expected remaining time grows with
        the time already spent; admission must not read a stalled batch as
        one about to finish."""
        fl = self._in_flight
        if fl is None:
            return 0.0
        return fl[1] - now if now < fl[1] else now - fl[2]

    def _backlog_s(self, now: float) -> float:
        t = self._in_flight_left(now)
        q = sum(self._drain_s(k, k.plan, k.queue.work()) for k in self._classes.values())
        return t + q * self._wall.ratio

    async def infer(self, item: Any, cls: Optional[str] = None) -> Any:
        """``await batcher.infer(item, cls)``: submit and wait without blocking
        the event loop. Raises ``Overloaded`` at once when refused; cancelling
        the awaiting task cancels the request if it has not started."""
        return await asyncio.wrap_future(self.submit(item, cls))

    def _class(self, cls: Optional[str]) -> ClassState:
        name = self._default_cls if cls is None else cls
        c = self._classes.get(name)
        if c is None:
            raise ValueError(f"unknown class {cls!r}; this batcher serves {list(self._classes)}")
        return c

    # --- the worker -------------------------------------------------------------
    def _worker(self) -> None:
        try:
            while True:
                job = self._next_job(block=True)
                if job is None:
                    return
                self._run(job)
        except BaseException as e:  # a bug in the batcher: fail everything, lose nothing
            log.exception("pykernels.serving worker %r crashed", self.name)
            with self._cond:
                self._closed, self._drain = True, False
                pending = [r for k in self._classes.values() for r in k.queue.pop_all()]
                self._queued = 0
            self._fail(pending, RuntimeError(f"batcher worker crashed: {e!r}"))
            raise

    def step(self) -> int:
        """Run at most one ready batch in the calling thread (batchers created
        with ``start=False``). Returns how many requests it resolved (0: nothing
        was ready)."""
        if self._thread is not None:
            raise RuntimeError("step() drives batchers created with start=False; this one has a worker")
        job = self._next_job(block=False)
        if job is None:
            return 0
        self._run(job)
        return len(job.reqs)

    def _finished(self) -> bool:
        return self._closed and (not self._drain or self._queued == 0)

    def _next_job(self, block: bool) -> Optional[Job]:
        while True:
            with self._cond:
                if self._finished():
                    return None
                now = self._clock()
                waiting = [(k, len(k.queue), self._rate(k, now))
                           for k in self._classes.values() if len(k.queue)]
                if not waiting:
                    self._waited = True
                    if not block:
                        return None
                    self._cond.wait()
                    continue
            plans, errors = {}, {}
            for k, n, rate in waiting:  # outside the lock: a plan may take milliseconds
                try:
                    plans[k.name] = self._plan_for(k, n, rate, now)
                except Exception as e:  # noqa: BLE001 - reaches the futures
                    errors[k.name] = e
            with self._cond:
                if self._finished():
                    return None
                now = self._clock()
                for name, err in errors.items():
                    reqs = self._classes[name].queue.pop_all()
                    if reqs:
                        self._queued -= len(reqs)
                        return Job(self._classes[name], reqs, None, err)
                job, wake = self._decide(now, plans)
                if job is not None:
                    return job
                if wake is not None and wake <= now:
                    continue  # the batch taken was all cancelled: decide again
                self._waited = True
                if not block:
                    return None
                # wait for the earliest ready time, a submit or close; re-check at
                # least every 50 ms (the clock may be a fake one that jumps)
                timeout = None if wake is None else min(max(wake - now, 1e-4), 0.05)
                self._cond.wait(timeout)

    def _decide(self, now: float, plans: dict):
        """Under the lock: the job to run now, or (None, time of the next ready batch)."""
        cands = [k for k in self._classes.values() if len(k.queue)]
        if not cands:
            return None, None
        cands.sort(key=lambda k: k.queue.peek().deadline)
        closing = self._closed and self._drain
        ready, wake = [], math.inf
        for k in cands:
            plan = plans.get(k.name, k.plan)
            cap = self._work_cap(k, plan)
            lim = k.queue.fitting(cap)
            n = len(k.queue)
            if closing or lim < n or k.queue.work() >= cap * (1 - 1e-9):  # a full batch
                ready.append((k, plan, lim))
                continue
            head = k.queue.peek()
            mw = getattr(plan, "max_wait_ms", 0.0) or 0.0
            mw = float(mw) / 1e3 if math.isfinite(float(mw)) else self.rate_window_s
            at = head.arrival + max(0.0, mw)
            if k.p99_s is not None:
                latest = head.deadline - self._est(k, plan, cap)
                if k.tight and self._any_chunked:
                    latest -= self.chunk_bound_s
                at = min(at, latest)
            if at <= now:
                ready.append((k, plan, lim))
            else:
                wake = min(wake, at)
        if not ready:
            return None, wake
        pick = ready[0]  # earliest deadline first ...
        if self._last_chunked:  # ... but never two chunks in a row while a tight batch is ready
            pick = next((r for r in ready if r[0].tight), pick)
        k, plan, lim = pick
        reqs = k.queue.pop(lim)
        self._queued -= len(reqs)
        live = []
        for r in reqs:
            if r.future.set_running_or_notify_cancel():
                live.append(r)
            else:
                k.stats.cancelled += 1
        if not live:
            return None, now  # all were cancelled: decide again at once
        k.in_flight += len(live)
        work = sum(r.size for r in live)
        self._in_flight = (k, now + self._est(k, plan, work) * self._wall.ratio, now)
        self._last_chunked = k.chunked
        bs = getattr(plan, "batch_size", lim) or lim
        return Job(k, live, plan, cut=k.chunked and self._work_cap(k, plan) < bs, work=work,
                   predicted=self._est(k, plan, work, tail=False)), None

    def _run(self, job: Job) -> None:
        k, reqs, plan = job.cls, job.reqs, job.plan
        if job.error is not None:  # planning failed for this class
            self._fail(reqs, job.error)
            return
        items = [r.item for r in reqs]
        t0 = self._clock()
        prev = self._prev_start
        if prev is not None and not self._waited:  # back to back: one worker cycle
            with self._lock:
                self._wall.add(t0 - prev[0], prev[1])
        self._prev_start, self._waited = (t0, job.predicted), False
        err: Optional[BaseException] = None
        results: list = []
        try:
            results = self._call(items, plan)
        except Exception as e:  # noqa: BLE001 - isolated below: it fails its culprits only
            err = e
        except BaseException as e:  # noqa: BLE001 - goes to this batch's futures only
            err = e
        outcomes = None  # per item (ok, result or exception) when the batch failed
        if isinstance(err, Exception) and not isinstance(err, ResultCountError) and len(items) > 1:
            outcomes = self._isolate(items, plan)
        t1 = self._clock()
        service = max(0.0, t1 - t0)
        n = len(reqs)
        if outcomes is not None:
            ok = [r for r, o in zip(reqs, outcomes) if o[0]]
        else:
            ok = reqs if err is None else []
        with self._cond:
            k.in_flight -= n
            self._in_flight = None
            if ok:
                k.stats.record_batch(t0, t1, [r.arrival for r in ok], chunked=job.cut)
            if len(ok) < n:
                k.stats.record_failed_batch(n - len(ok))
                if ok:
                    k.stats.batches -= 1  # one batch, recorded by both calls
            self._cond.notify_all()
        if outcomes is not None:
            for r, (good, v) in zip(reqs, outcomes):
                if good:
                    r.future.set_result(v)
                else:
                    r.future.set_exception(v)
        elif err is None:
            for r, res in zip(reqs, results):
                r.future.set_result(res)
            if self._size is not None:  # as n reference items (pricing.py)
                with self._lock:
                    service = pricing.normalized_s(k, plan, service, n, job.work)
            self._observe(k, plan, service, n)
        else:
            for r in reqs:
                r.future.set_exception(err)

    def _call(self, items: list, plan) -> list:
        results = list(self._fn(items, plan))
        if len(results) != len(items):
            raise ResultCountError(f"fn returned {len(results)} results for a batch of {len(items)} "
                               "items; it must return one result per item, in order")
        return results

    def _isolate(self, items: list, plan) -> list:
        """After ``fn`` raised on a batch: find the items that fail by bisection
        (halves that succeed keep their results), so one bad item fails only
        itself. A batch of n with one culprit costs about 2 log2(n) more calls;
        their times are not fed back (they are not batches of the plan)."""
        out: list = [None] * len(items)
        stack = [(0, len(items) // 2), (len(items) // 2, len(items))]
        while stack:
            lo, hi = stack.pop()
            try:
                out[lo:hi] = [(True, r) for r in self._call(items[lo:hi], plan)]
            except Exception as e:  # noqa: BLE001 - a culprit, or a half holding one
                if hi - lo == 1:
                    out[lo] = (False, e)
                else:
                    mid = (lo + hi) // 2
                    stack += [(lo, mid), (mid, hi)]
        return out

    def _observe(self, k: ClassState, plan, seconds: float, n: int) -> None:
        try:
            k.policy.observe(plan, seconds, batch=n)
        except Exception:  # noqa: BLE001 - feedback must not break serving
            k.observe_errors += 1
            if k.observe_errors == 1:
                log.warning("policy.observe failed for class %r (further failures are counted "
                            "in metrics()['%s']['observe_errors'])", k.name, k.name, exc_info=True)

    def _fail(self, reqs: List[Request], exc: BaseException) -> None:
        """Fail requests that have not run: stats first, then the futures (a
        future the caller cancelled stays cancelled and is counted so)."""
        live = []
        failed, cancelled = collections.Counter(), collections.Counter()
        for r in reqs:
            f = r.future
            if f.running() or f.set_running_or_notify_cancel():
                live.append(r)
                failed[r.cls] += 1
            else:
                cancelled[r.cls] += 1
        with self._cond:
            for name, n in failed.items():
                self._classes[name].stats.failed += n
            for name, n in cancelled.items():
                self._classes[name].stats.cancelled += n
        for r in live:
            r.future.set_exception(exc)

    # --- close ------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting requests (``submit`` then raises ``RuntimeError``).
        drain=True: serve every accepted request, then stop the worker.
        drain=False: fail every queued request with ``RuntimeError("batcher
        closed before this request ran")``; the batch in flight completes.
        Joins the worker (up to ``timeout`` seconds) unless called from it.
        Idempotent; close(drain=False) after close(drain=True) still fails
        what is left."""
        with self._cond:
            self._closed = True
            if not drain:
                self._drain = False
            pending = []
            if not self._drain:
                for k in self._classes.values():
                    pending += k.queue.pop_all()
                self._queued = 0
            self._cond.notify_all()
        if pending:
            self._fail(pending, RuntimeError(CLOSED_MESSAGE))
        t = self._thread
        if t is not None:
            if t is not threading.current_thread():
                t.join(timeout)
        elif self._drain:
            while self.step():
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=True)

    # --- metrics ------------------------------------------------------------------
    def _snapshots(self) -> Dict[str, dict]:
        now = self._clock()
        out = {}
        for k in self._classes.values():
            snap = k.stats.snapshot(now, queued=len(k.queue), in_flight=k.in_flight)
            plan = k.plan
            snap["plan"] = None if plan is None else {
                a: getattr(plan, a, None)
                for a in ("variant", "precision", "threads", "batch_size", "max_wait_ms",
                          "predicted_p99_ms", "feasible")}
            snap["chunk_limit"] = self._limit(k, plan) if (k.chunked and plan is not None) else None
            fit = getattr(k.policy, "service_fit", None)
            snap["service_fit"] = fit(plan) if (fit is not None and plan is not None) else None
            snap["observe_errors"] = k.observe_errors
            snap["observe_skipped"] = getattr(k.policy, "observe_skipped", 0)
            out[k.name] = snap
        return out

    def metrics(self) -> Dict[str, dict]:
        """Per class: count (every submit), accepted, completed, failed,
        rejected, cancelled, queued, in_flight, batches, mean_batch_size,
        latency_ms {queue, service, total} x {p50, p95, p99, mean, max}
        (from 1%-relative-error sketches), samples, throughput (completed
        items/s since the class's first request), throughput_recent (over the
        last metrics_window_s), slo_attainment (completed within the p99
        target / completed; None without a target), goodput (completed within
        the target / count), the current plan, chunk_limit (batch cap from the
        chunk bound, None for the tightest class), service_fit (the learned
        service time of a batch of n: fixed_ms + per_item_ms * n + tail_ms;
        None before 3 batches of the current kernel choice, and for a
        policy that predicts service times itself), observe_errors,
        observe_skipped (batches not fed back to stay within policy_duty)."""
        with self._lock:
            return self._snapshots()

    def prometheus(self) -> str:
        """Prometheus text exposition (format 0.0.4) of the same numbers,
        latencies in seconds, labelled by batcher name and class."""
        with self._lock:
            snaps = self._snapshots()
            return render_prometheus(self.name, {n: k.stats for n, k in self._classes.items()}, snaps)

    @property
    def classes(self) -> Dict[str, Any]:
        return {n: k.slo for n, k in self._classes.items()}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"DynamicBatcher(name={self.name!r}, classes={list(self._classes)}, "
                f"queued={self._queued}, {state})")
