"""What a batch costs: the batcher's service-time predictions by *work*.

A policy predicts the service time of a batch of n items of its class's op,
the item the profile measured (``predict_service_ms(plan, n)``). Requests
differ in size -- a 200-token document costs about fourteen 14-token queries
in a ragged forward -- so the batcher prices a batch by its work: each item's
size in reference items of its class's op (``size(item) / unit``; 1.0 each
without a ``size`` function), and a batch of work w at the equivalent batch
w, between the policy's integer predictions:

- w >= 1: linear between the predictions at floor(w) and floor(w) + 1;
- 0 < w < 1: the line through the predictions at 1 and 2 (a per-call fixed
  cost F plus P per item: F + wP), never below w times the prediction at 1.

The profile keeps its meaning (measured on reference items), and the
policy's feedback too: the batcher observes a batch of work w as the time a
batch of its n items would take at reference size (the measured time x
predicted(n) / predicted(w)). Functions, not methods: the batcher calls them
under its lock with the class state and the plan.
"""
from __future__ import annotations

import math

# Work this close to an integer (relative) is that integer: sums of sizes
# carry float rounding, and a residue of 1e-12 items must not be priced as one
# more call's fixed cost.
_EPS = 1e-9


def at(c, plan, n: int, tail: bool = True) -> float:
    """The policy's predicted service time (s) of a batch of n reference items."""
    if n <= 0 or plan is None:
        return 0.0
    return c.policy.predict_service_ms(plan, n, tail=tail) / 1e3


def batch_s(c, plan, work: float, tail: bool = True) -> float:
    """Predicted service time (s) of one batch of ``work`` reference items."""
    if work <= _EPS or plan is None:
        return 0.0
    n = int(work + _EPS * max(1.0, work))
    if abs(work - n) <= _EPS * max(1.0, work):
        return at(c, plan, n, tail)
    if n >= 1:
        lo = at(c, plan, n, tail)
        return lo + (work - n) * (at(c, plan, n + 1, tail) - lo)
    e1, e2 = at(c, plan, 1, tail), at(c, plan, 2, tail)
    return max(work * e1, e1 - (1.0 - work) * (e2 - e1))


def batch_work(c, plan, bound_s: float, sized: bool) -> float:
    """Reference items per batch: the plan's batch size, and for a chunked
    class cut to the chunk bound (the largest batch predicted to fit it; at
    least one item when items are unsized, any positive work when sized: the
    queue then takes the requests that fit, at least one)."""
    bs = max(1, int(getattr(plan, "batch_size", 1) or 1)) if plan is not None else 1
    if not c.chunked:
        return float(bs)
    bound = bound_s * (1 + 1e-6)  # clock rounding must not cost an item
    if batch_s(c, plan, bs) <= bound:
        return float(bs)
    lo, hi = 1, bs  # predictions grow with the batch: bisect
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(c, plan, mid) <= bound:
            lo = mid
        else:
            hi = mid
    if not sized:
        return float(lo)
    e_lo, e_hi = at(c, plan, lo), at(c, plan, lo + 1)
    if e_lo <= bound:  # between lo and lo + 1, on the line the prediction follows there
        return lo + (min(1.0, (bound - e_lo) / (e_hi - e_lo)) if e_hi > e_lo else 1.0)
    # one reference item is over the bound: less work, on the line F + wP
    x = bound / e_lo
    if e_hi > e_lo:
        x = min(x, 1.0 - (e_lo - bound) / (e_hi - e_lo))
    return max(x, _EPS)


def drain_s(c, plan, work: float, per_batch: float, tail: bool = True) -> float:
    """Predicted time to serve ``work`` queued reference items of class c in
    batches of ``per_batch`` (the tail allowance counted once, not once per
    batch; none with tail=False)."""
    if work <= _EPS:
        return 0.0
    full, rest = divmod(work, per_batch)
    if rest >= per_batch * (1 - _EPS):
        full, rest = full + 1, 0.0
    t = full * batch_s(c, plan, per_batch, tail=False) + batch_s(c, plan, rest, tail=False)
    if not tail:
        return t
    return t + at(c, plan, 1) - at(c, plan, 1, tail=False)


def normalized_s(c, plan, seconds: float, n: int, work: float) -> float:
    """The measured time of a batch of n items of ``work`` reference items as
    the time of n reference items (what the policy's feedback compares with
    its prediction for a batch of n)."""
    if work <= _EPS or abs(work - n) <= _EPS * n:
        return seconds
    w = batch_s(c, plan, work, tail=False)
    return seconds * at(c, plan, n, tail=False) / w if w > 0 and math.isfinite(w) else seconds


class WallRatio:
    """How much longer the worker really takes per batch than the predictions
    admission sums: the wall time from one batch's start to the next one's,
    for batches run back to back (the worker never waited between them), over
    the p50 (mean-raised) service time predicted for the first one.

    A policy learns from *service* times (``fn`` alone), and its correction
    is a recent p50 / mean. Under load the worker's cycle is longer and comes
    in bursts: deciding and planning, setting the futures and running their
    callbacks, waiting for the GIL against the threads that submit, and
    stretches where a competing process holds the cores (bench/overload.py,
    4 client threads at 5x capacity on 2 cores at load 7: batches predicted
    at 1.2 ms ran 16-80 ms in clusters; admission let requests in behind 40
    queued items predicted at 25 ms that took 230 ms). Admission scales the
    work it predicts ahead of a request by the ``quantile`` (0.9) of this
    ratio over runs of ``run`` (16) consecutive batches of the last
    ``window`` (256): the queue ahead drains as the slow runs of the recent
    past did, not as the mean batch. Never below 1: a fast streak must not
    make admission bolder than the policy."""

    __slots__ = ("_pairs", "_ratio", "_stale", "min_pairs", "run", "quantile")

    def __init__(self, window: int = 256, run: int = 16, quantile: float = 0.9,
                 min_pairs: int = 2):
        import collections
        self._pairs = collections.deque(maxlen=window)
        self._ratio = 1.0
        self._stale = 0
        self.min_pairs = min_pairs
        self.run = run
        self.quantile = quantile

    def add(self, wall_s: float, predicted_s: float) -> None:
        if not (predicted_s > 0 and wall_s >= 0 and math.isfinite(wall_s)):
            return
        self._pairs.append((wall_s, predicted_s))
        self._stale += 1
        # recomputed every few batches (O(window)), at once while evidence is scarce
        if self._stale >= 4 or len(self._pairs) <= self.run:
            self._refresh()

    def _refresh(self) -> None:
        self._stale = 0
        pairs = self._pairs
        n = len(pairs)
        if n < self.min_pairs:
            self._ratio = 1.0
            return
        m = min(self.run, n)
        cw = [0.0]
        cp = [0.0]
        for w, p in pairs:
            cw.append(cw[-1] + w)
            cp.append(cp[-1] + p)
        runs = sorted((cw[i + m] - cw[i]) / (cp[i + m] - cp[i]) for i in range(n - m + 1))
        self._ratio = max(1.0, runs[min(len(runs) - 1, int(self.quantile * len(runs)))])

    @property
    def ratio(self) -> float:
        """Wall over predicted, >= 1 (1 before ``min_pairs`` pairs)."""
        return self._ratio
