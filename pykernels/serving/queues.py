"""The batcher's records: refusals (Overloaded, TooLarge), a queued request,
a class's deadline-ordered queue, its state (policy, op, unit of size), and
the job the worker runs next."""
from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Mapping
from typing import List, Optional

from .metrics import ClassStats

class Overloaded(Exception):
    """The request was refused at submit: its deadline cannot be met given the
    work ahead of it, or the queue is full. ``retry_after_s``: seconds after
    which the backlog is predicted to have drained enough to accept it.
    ``cls``: the request's class."""

    def __init__(self, message: str, *, retry_after_s: float = 0.0, cls: Optional[str] = None):
        super().__init__(message)
        self.retry_after_s = max(0.0, float(retry_after_s))
        self.cls = cls


class ResultCountError(ValueError):
    """fn broke its contract (one result per item): the whole batch fails, as
    no item is to blame."""


class TooLarge(Overloaded):
    """A group of items (``submit_many``) that even an idle batcher is predicted
    to serve past its class's p99 target, though one item alone fits: retrying
    cannot help; send it in a class without a latency target (bulk) or split
    it. ``retry_after_s`` is inf."""

    def __init__(self, message: str, *, cls: Optional[str] = None):
        super().__init__(message, retry_after_s=0.0, cls=cls)
        self.retry_after_s = math.inf


class Request:
    """One queued item. ``size``: its work in reference items of its class's
    op (1.0 without a ``size`` function); ``cum``: the queue's running sum of
    sizes up to and including it (set by ``DeadlineQueue.append``)."""
    __slots__ = ("item", "future", "arrival", "deadline", "cls", "size", "cum")

    def __init__(self, item, future, arrival, deadline, cls, size: float = 1.0):
        self.cls = cls
        self.item = item
        self.future = future
        self.arrival = arrival
        self.deadline = deadline
        self.size = size
        self.cum = 0.0


def deadline_of(r: Request) -> float:
    return r.deadline


def cum_of(r: Request) -> float:
    return r.cum


class DeadlineQueue:
    """FIFO with O(1) pops from the front and bisection on deadlines (which are
    non-decreasing within a class: arrivals are stamped under the lock), and
    running sums of the requests' sizes, so the work of the first k queued
    requests and the requests that fit a batch's work are O(1) and O(log n)."""

    __slots__ = ("_items", "_head", "_base")

    def __init__(self):
        self._items: List[Request] = []
        self._head = 0
        self._base = 0.0  # running sum of the sizes popped so far

    def __len__(self) -> int:
        return len(self._items) - self._head

    def append(self, r: Request) -> None:
        items = self._items
        r.cum = (items[-1].cum if len(items) > self._head else self._base) + r.size
        items.append(r)

    def peek(self) -> Request:
        return self._items[self._head]

    def pop(self, n: int) -> List[Request]:
        out = self._items[self._head:self._head + n]
        self._head += len(out)
        if out:
            self._base = out[-1].cum
        if self._head == len(self._items):
            self._items.clear()
            self._head = 0
            self._base = 0.0  # restart the sums: no rounding drift over a long run
        elif self._head > 4096 and 2 * self._head > len(self._items):
            del self._items[:self._head]
            self._head = 0
        return out

    def pop_all(self) -> List[Request]:
        return self.pop(len(self))

    def remove(self, r: Request) -> bool:
        """Take ``r`` out of the queue (a cancelled request); False if it is not
        queued (already taken by the worker). Bisects on its deadline, then
        scans the requests that share it."""
        items = self._items
        i = bisect.bisect_left(items, r.deadline, lo=self._head, key=deadline_of)
        while i < len(items) and items[i].deadline == r.deadline:
            if items[i] is r:
                del items[i]
                for later in items[i:]:  # O(n), as the del
                    later.cum -= r.size
                return True
            i += 1
        return False

    def work(self, k: Optional[int] = None) -> float:
        """Summed size of the first ``k`` queued requests (all: None)."""
        n = len(self)
        k = n if k is None else min(k, n)
        if k <= 0:
            return 0.0
        return self._items[self._head + k - 1].cum - self._base

    def fitting(self, work: float) -> int:
        """How many requests from the head a batch of at most ``work`` takes:
        at least one (a request larger than a batch still runs, alone)."""
        if not len(self):
            return 0
        k = bisect.bisect_right(self._items, self._base + work * (1 + 1e-9), lo=self._head,
                                key=cum_of) - self._head
        return max(1, k)

    def count_due_by(self, deadline: float) -> int:
        """Queued requests whose deadline is <= ``deadline``."""
        return bisect.bisect_right(self._items, deadline, lo=self._head, key=deadline_of) - self._head


def queued_bucket(n: int) -> int:
    """Queue length as the planner sees it: exact up to 4, then rounded down to a
    power of two, so plans can be cached (never more than is queued)."""
    return n if n <= 4 else 1 << (n.bit_length() - 1)


def recent_rate(a: collections.deque, now: float, window_s: float) -> Optional[float]:
    """Accepted arrivals per second: (n - 1) / (last - first) over the n
    arrivals ``a`` of the last ``window_s`` (older ones are dropped from
    ``a``); None below two."""
    horizon = now - window_s
    while a and a[0] < horizon:
        a.popleft()
    n = len(a)
    if n < 2:
        return None
    span = a[-1] - a[0]
    return (n - 1) / span if span > 0 else None


def rate_bucket(rate: Optional[float]) -> Optional[float]:
    """Arrival rate rounded to a quarter octave (about +-9%)."""
    if rate is None or rate <= 0:
        return None
    return 2.0 ** (round(math.log2(rate) * 4) / 4)


def policy_for(policy, cname, slo):
    """The policy of class ``cname``: from a dict, one shared, or a factory."""
    if isinstance(policy, Mapping):
        if cname not in policy:
            raise ValueError(f"policy has no entry for class {cname!r} "
                             f"(it has {sorted(policy)}); give one per class")
        pol = policy[cname]
    elif hasattr(policy, "plan"):
        pol = policy
    elif callable(policy):
        pol = policy(slo)
    else:
        raise TypeError("policy must be a policy (with .plan and .observe), a dict class -> "
                        f"policy, or a factory slo -> policy; got {type(policy).__name__}")
    if not (callable(getattr(pol, "plan", None)) and callable(getattr(pol, "observe", None))):
        raise TypeError(f"the policy of class {cname!r} needs plan(op, queued=, arrival_rate=) "
                        f"and observe(plan, seconds); got {type(pol).__name__}")
    return pol


def unit_for(unit_size, cname: str, op) -> float:
    """The work of one reference item of class ``cname`` (``size=``'s unit)."""
    u = unit_size.get(cname) if isinstance(unit_size, Mapping) else unit_size
    if u is None:
        flops = getattr(op, "flops", None)
        u = flops() if callable(flops) else None
    if u is None or not float(u) > 0 or not math.isfinite(float(u)):
        raise ValueError(f"class {cname!r}: with size= the batcher needs unit_size, the work "
                         f"of one item of the class's op as the profile measured it "
                         f"(got {u!r}; the op {type(op).__name__} has no flops())")
    return float(u)


class ClassState:
    """State of one SLO class (guarded by the batcher's lock). ``policy``
    answers plans and service-time predictions and takes the observations."""

    def __init__(self, name, slo, policy, op, relaxed_deadline_s, stats_kw):
        self.name = name
        self.slo = slo
        self.policy = policy
        self.op = op
        p99 = getattr(slo, "p99_ms", None)
        self.p99_s: Optional[float] = float(p99) / 1e3 if p99 is not None else None
        self.offset_s = self.p99_s if self.p99_s is not None else float(relaxed_deadline_s)
        self.tight = False      # its p99 target is the tightest
        self.chunked = False    # its batches are cut to the chunk bound
        self.queue = DeadlineQueue()
        self.arrivals: collections.deque = collections.deque(maxlen=512)
        self.in_flight = 0
        self.plan = None        # the latest plan (admission and metrics read it)
        self.observe_errors = 0
        self.unit = 1.0         # work of one reference item, in size()'s unit
        self.plan_after = -math.inf     # planning budget: no new plan() before this time
        self.stats = ClassStats(name, self.p99_s, **stats_kw)


class Job:
    __slots__ = ("cls", "reqs", "plan", "error", "cut", "work", "predicted")

    def __init__(self, cls, reqs, plan, error=None, cut=False, work=None, predicted=0.0):
        self.predicted = predicted  # p50 service time predicted at dispatch (s)
        self.cut = cut  # the batch limit was cut to the chunk bound
        self.work = float(len(reqs)) if work is None else work  # in reference items
        self.cls = cls
        self.reqs = reqs
        self.plan = plan
        self.error = error
