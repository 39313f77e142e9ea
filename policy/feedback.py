"""Feedback: what observed service times teach a policy.

``Feedback`` holds, per (op, kernel choice), the recent ratios of observed to
predicted service time (the corrections the planner applies), a quantile
sketch per (kernel choice, batch), and the AIMD batch cap per op. It is fed
service times only (never queue time). Not locked: ``Policy`` serializes every
call except ``record``, an atomic append to a buffer that ``apply`` drains.
"""
from __future__ import annotations

import collections
import math
from typing import Dict, List, Optional, Set, Tuple

from pykernels.work import Op

from .cost import CostModel
from .plan import Plan
from .sketch import QuantileSketch
from .slo import SLO

# Relative accuracy of the per-cell service-time sketches (observed()).
SKETCH_ACCURACY = 0.01
# record() buffers; the buffer is applied at this length (and before any
# decision or read of the feedback state).
FLUSH_EVERY = 64


def check_observation(plan, seconds, batch) -> Tuple[float, Optional[int]]:
    """Validated (seconds, batch) of one ``observe()`` call."""
    if type(plan) is not Plan and not isinstance(plan, Plan) or plan.op is None:
        raise TypeError("observe() takes a Plan returned by this policy's plan()")
    if type(seconds) is not float:
        seconds = float(seconds)
    if not 0.0 <= seconds < math.inf:  # NaN too
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    if batch is not None:
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        batch = int(batch)
    return seconds, batch


class Feedback:
    """Corrections, AIMD caps and sketches learned from observed service times.

    window / min_observations: the recent ratios a correction is taken from
    and how many it needs; backoff / probe_after: AIMD on the batch cap."""

    def __init__(self, slo: SLO, *, max_batch: int, slack: float, window: int,
                 min_observations: int, backoff: float, probe_after: int):
        self.slo = slo
        self.max_batch = max_batch
        self.slack = slack
        self.window = window
        self.min_observations = min_observations
        self.backoff = backoff
        self.probe_after = probe_after
        self.pending: collections.deque = collections.deque()  # record() -> apply()
        self._ratios: Dict[tuple, collections.deque] = {}
        self._corr: Dict[tuple, Tuple[float, float, int]] = {}  # group -> (p50 scale, tail, stamp)
        self._op_ratios: Dict[str, collections.deque] = {}
        self._op_corr: Dict[str, Tuple[float, float]] = {}
        # mean of each window's ratios (keys: kernel-choice tuples and op keys)
        self._means: Dict[object, float] = {}
        self.op_count: Dict[str, int] = {}
        self._last_seen: Dict[tuple, int] = {}
        self._cells: Dict[tuple, QuantileSketch] = {}
        self._caps: Dict[str, int] = {}
        self._streak: Dict[str, int] = {}

    def record(self, plan: Plan, seconds: float, batch: Optional[int]) -> bool:
        """Buffer one observation (validated by the caller); True when the
        buffer should be applied now."""
        pending = self.pending
        pending.append((plan, seconds, batch))  # deque.append: atomic under the GIL
        return len(pending) >= FLUSH_EVERY

    def apply(self, cm: CostModel) -> Set[str]:
        """Apply the buffered observations; returns the op keys whose
        corrections or cap changed (their plans are stale)."""
        pending = self.pending
        touched: dict = {}
        invalid: Set[str] = set()
        while True:
            try:  # popleft is atomic: appends racing with apply are kept
                plan, sec, batch = pending.popleft()
            except IndexError:
                break
            self._apply(cm, plan, sec, batch, touched, invalid)
        for k, (store, corr, stamp) in touched.items():
            if self._correct(store, corr, k, stamp):
                invalid.add(k if stamp is None else k[0])
        return invalid

    def _apply(self, cm: CostModel, plan: Plan, sec: float, batch: Optional[int], touched: dict,
               invalid: set) -> None:
        """One observation: sketch, windows, AIMD."""
        b = plan.batch_size if batch is None else batch
        op = plan.op
        if b == plan.batch_size and plan.prior_p50_ms > 0:
            prior = plan.prior_p50_ms
        else:
            pred = cm.predict(op, plan.variant, plan.precision, plan.threads, b)
            if pred is None:
                return
            prior = pred.p50_ms
        ms = sec * 1e3
        key = op.key
        gk = (key, plan.variant, plan.precision, plan.threads)
        ratio = ms / prior
        cell = self._cells.get(gk + (b,))
        if cell is None:
            cell = self._cells[gk + (b,)] = QuantileSketch(SKETCH_ACCURACY)
        cell.add(ms)
        n = self.op_count[key] = self.op_count.get(key, 0) + 1
        if n % self.window == 0:  # staleness of kernel-choice corrections
            invalid.add(key)
        last = self._last_seen.get(gk)
        self._last_seen[gk] = n
        if last is not None and n - last > 2 * self.window:
            # This kernel choice's evidence has expired (the op was served
            # by others meanwhile): start its window afresh.
            self._ratios.pop(gk, None)
            self._corr.pop(gk, None)
        self._window_append(self._ratios, gk, ratio)
        touched[gk] = (self._ratios, self._corr, n)
        self._window_append(self._op_ratios, key, ratio)
        touched[key] = (self._op_ratios, self._op_corr, None)
        if self._aimd(plan, ms, b):
            invalid.add(key)

    def _window_append(self, store, k, ratio: float) -> None:
        w = store.get(k)
        if w is None:
            w = store[k] = collections.deque(maxlen=self.window)
        w.append(ratio)

    def _correct(self, store, corr, k, stamp) -> bool:
        """Recompute a window's correction (p50 scale, tail ratio) once its
        observations are in; returns whether it changed."""
        w = store.get(k)
        if w is None or len(w) < self.min_observations:
            return False
        srt = sorted(w)
        self._means[k] = _snap(sum(srt) / len(srt))
        new = (_snap(_quantile(srt, 0.5)), _snap(_quantile(srt, 0.99)))
        old = corr.get(k)
        corr[k] = new if stamp is None else new + (stamp,)
        return old is None or old[:2] != new

    def _aimd(self, plan: Plan, ms: float, b: int) -> bool:
        """AIMD on the op's batch cap; returns whether the cap changed."""
        target = self.slo.p99_ms
        if target is None or not plan.feasible:
            return False  # a plan already predicted to miss says nothing new by missing
        key = plan.op.key
        nonservice = max(0.0, plan.predicted_p99_ms - plan.service_p99_ms) \
            if math.isfinite(plan.predicted_p99_ms) else 0.0
        budget = target * (1 - self.slack) - nonservice
        if ms > budget:
            cur = self._caps.get(key, self.max_batch)
            base = min(cur, b)
            nb = int(base * self.backoff)
            self._caps[key] = max(1, nb if nb < base else base - 1)
            self._streak[key] = 0
            return True
        if key in self._caps and ms <= 0.8 * budget:
            self._streak[key] = self._streak.get(key, 0) + 1
            if self._streak[key] >= self.probe_after:
                self._streak[key] = 0
                cap = self._caps[key] + max(1, self.max_batch // 64)
                if cap >= self.max_batch:
                    del self._caps[key]
                else:
                    self._caps[key] = cap
                return True
        return False

    # --- reads (after apply) ----------------------------------------------------
    def cap(self, op_key: str) -> Optional[int]:
        """The AIMD batch cap of an op (None: not backed off)."""
        return self._caps.get(op_key)

    def correction(self, op_key: str, v, p, t) -> Optional[Tuple[float, float]]:
        """(p50 scale, recent tail ratio) for a kernel choice: its own recent
        observations while fresh, else the op's pooled recent observations
        (a machine-wide slowdown shows on every kernel choice, and a choice
        observed slow long ago must not stay condemned forever)."""
        c = self._corr.get((op_key, v, p, t))
        if c is not None and self.op_count.get(op_key, 0) - c[2] <= 2 * self.window:
            return c[0], c[1]
        return self._op_corr.get(op_key)

    def mean_scale(self, op_key: str, v, p, t) -> Optional[float]:
        """Mean ratio of observed to predicted p50 over the recent window the
        correction comes from (same freshness rule), None before
        ``min_observations``. Service times are skewed (a preempted batch runs
        several times its median), so a queue of n batches drains in about n
        means, not n medians."""
        gk = (op_key, v, p, t)
        c = self._corr.get(gk)
        if c is not None and self.op_count.get(op_key, 0) - c[2] <= 2 * self.window:
            return self._means.get(gk)
        return self._means.get(op_key)

    def corrected(self, cm: CostModel, op: Op, v, p, t, b) -> Optional[Tuple[float, float, float]]:
        """Corrected service (p50, p99) of a batch of b and the cost model's
        uncorrected p50, in ms; None when the cost model cannot predict it."""
        pred = cm.predict(op, v, p, t, b)
        if pred is None:
            return None
        c = self.correction(op.key, v, p, t)
        if c is None:
            return pred.p50_ms, pred.p99_ms, pred.p50_ms
        c50, hi = c
        s50 = pred.p50_ms * c50
        s99 = max(pred.p99_ms * c50, pred.p50_ms * hi, s50)
        return s50, s99, pred.p50_ms

    def observed(self, plan: Plan, batch: Optional[int] = None) -> dict:
        b = batch or plan.batch_size
        sk = self._cells.get((plan.op.key, plan.variant, plan.precision, plan.threads, b))
        if sk is None or sk.count == 0:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
        q = sk.quantiles((0.5, 0.99, 0.999))
        return {"n": sk.count, "p50_ms": q[0.5], "p99_ms": q[0.99], "p999_ms": q[0.999],
                "max_ms": sk.max}

    def reset(self) -> None:
        for store in (self.pending, self._ratios, self._corr, self._op_ratios, self._op_corr,
                      self._means, self.op_count, self._last_seen, self._cells, self._caps, self._streak):
            store.clear()


_SNAP = math.log(1.02)


def _snap(x: float) -> float:
    """Round a correction factor to a 2% geometric grid: plans change when the
    evidence does, not with every observation's noise."""
    return math.exp(round(math.log(x) / _SNAP) * _SNAP) if x > 0 else 0.0


def _quantile(srt: List[float], q: float) -> float:
    """Quantile of sorted values, linear between order statistics (NumPy's default)."""
    pos = q * (len(srt) - 1)
    i = int(pos)
    if i + 1 >= len(srt):
        return srt[-1]
    return srt[i] + (pos - i) * (srt[i + 1] - srt[i])


__all__ = ["FLUSH_EVERY", "SKETCH_ACCURACY", "Feedback", "check_observation"]
