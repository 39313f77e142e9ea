"""PlanObserveAdapter: the service-time interface of ``Policy`` for any policy.

A server sizes batches on ``predict_service_ms`` and feeds ``observe``. A
``Policy`` predicts from its cost model and corrections; a policy that only
has ``plan(op, queued=, arrival_rate=)`` and ``observe(plan, seconds)`` is
wrapped in this adapter, which learns a ``ServiceLine`` per kernel choice from
what it observes and caches its plans until the next observation or for at
most ``max_age_s`` on the injected clock. A wrapped policy's ``plan`` and
``observe`` may be slow: it learns from every observation but forwards them
within a ``duty`` fraction of the time.
"""
from __future__ import annotations

import collections
import inspect
import math
import time
from typing import Callable, Dict, Optional

class ServiceLine:
    """Service time of a batch of n items learned from observations:
    ``t(n) = a + c n + r``. (a, c): least squares over the last ``window``
    batches, the slope pulled toward a prior per-item time ``c_prior`` with
    the weight of a spread of sizes equal to their mean (so batches of one size
    only, which cannot tell a fixed cost from a per-item cost, keep the prior
    slope and learn the fixed cost; varied sizes let the data decide); through
    the origin if the intercept comes out negative. r: the 90th percentile of
    the residuals (>= 0), the recent tail. Units are the caller's."""

    __slots__ = ("obs", "fit", "min_obs")

    def __init__(self, window: int = 32, min_obs: int = 3):
        self.obs: collections.deque = collections.deque(maxlen=window)
        self.fit: Optional[tuple] = None
        self.min_obs = min_obs

    def add(self, n: int, t: float, c_prior: float) -> None:
        self.obs.append((n, t))
        if len(self.obs) >= self.min_obs:
            self._refit(c_prior)

    def _refit(self, c_prior: float) -> None:
        obs = self.obs
        k = len(obs)
        mn = sum(n for n, _ in obs) / k
        mt = sum(t for _, t in obs) / k
        sxx = sum((n - mn) ** 2 for n, _ in obs)
        sxy = sum((n - mn) * (t - mt) for n, t in obs)
        lam = mn * mn if c_prior > 0 else 0.0
        c = (sxy + lam * c_prior) / (sxx + lam) if sxx + lam > 0 else mt / mn
        c = max(c, 0.0)
        a = mt - c * mn
        if a < 0:
            a = 0.0
            c = sum(t * n for n, t in obs) / sum(n * n for n, _ in obs)
        res = sorted(t - (a + c * n) for n, t in obs)
        r = max(0.0, res[min(k - 1, int(0.9 * k))])
        self.fit = (a, c, r)

    def est(self, n: int, tail: bool = True) -> float:
        a, c, r = self.fit
        return a + c * n + (r if tail else 0.0)


def _kernel_key(plan) -> tuple:
    return (getattr(plan, "variant", None), getattr(plan, "precision", None),
            getattr(plan, "threads", None))


def _batch_service_ms(plan) -> Optional[float]:
    """The plan's predicted service time of a full batch, ms."""
    for attr in ("service_p99_ms", "predicted_p99_ms"):
        v = getattr(plan, attr, None)
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v) and v > 0:
                return v
    return None


def _accepts_batch_kw(observe) -> bool:
    try:
        params = inspect.signature(observe).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "batch" or p.kind is p.VAR_KEYWORD for p in params)


class PlanObserveAdapter:
    """Wraps ``policy`` (with ``plan`` and ``observe``) and adds
    ``predict_service_ms`` and ``service_fit``. ``observe(plan, seconds,
    batch=n)`` learns the line, then forwards (without ``batch`` if the
    policy's observe does not take it; its exceptions propagate) unless the
    last forward took d less than ``d / duty`` ago (then it counts it in
    ``observe_skipped``)."""

    def __init__(self, policy, *, clock: Callable[[], float] = time.monotonic,
                 max_age_s: float = 0.25, duty: float = 1.0):
        self.policy = policy
        self._clock = clock
        self._max_age_s = float(max_age_s)
        self._duty_gap = (1.0 - duty) / duty
        self._forward_after = -math.inf
        self.observe_skipped = 0
        self._batch_kw = _accepts_batch_kw(getattr(policy, "observe", None))
        self._lines: Dict[tuple, ServiceLine] = {}
        self._plans: Dict[tuple, tuple] = {}  # (op, queued, rate) -> (plan, time planned)

    def plan(self, op, *, queued: int = 0, arrival_rate: Optional[float] = None):
        key = (op, queued, arrival_rate)
        now = self._clock()
        hit = self._plans.get(key)
        if hit is not None and now - hit[1] < self._max_age_s:
            return hit[0]
        plan = self.policy.plan(op, queued=queued, arrival_rate=arrival_rate)
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[key] = (plan, now)
        return plan

    def observe(self, plan, seconds: float, *, batch: Optional[int] = None) -> None:
        n = batch if batch is not None else max(1, int(getattr(plan, "batch_size", 1) or 1))
        key = _kernel_key(plan)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = ServiceLine()
        line.add(n, seconds * 1e3, self._prior_ms(plan, 1))
        self._plans.clear()  # feedback may change the policy's plans
        t0 = self._clock()
        if t0 < self._forward_after:
            self.observe_skipped += 1
            return
        try:
            if self._batch_kw:
                self.policy.observe(plan, seconds, batch=batch)
            else:
                self.policy.observe(plan, seconds)
        finally:
            t1 = self._clock()
            self._forward_after = t1 + (t1 - t0) * self._duty_gap

    @staticmethod
    def _prior_ms(plan, n: int) -> float:
        """The plan's prediction for a full batch, scaled linearly to n items."""
        full = _batch_service_ms(plan)
        if full is None:
            return 0.0
        return full * n / max(1, int(getattr(plan, "batch_size", 1) or 1))

    def _line(self, plan) -> Optional[ServiceLine]:
        line = self._lines.get(_kernel_key(plan))
        return line if line is not None and line.fit is not None else None

    def predict_service_ms(self, plan, batch: Optional[int] = None, *, tail: bool = True) -> float:
        """Service time (ms) of a batch of ``batch`` items: the fitted line once
        3 batches of this kernel choice were observed, else the plan's own
        prediction scaled to ``batch`` items."""
        n = max(1, int(getattr(plan, "batch_size", 1) or 1)) if batch is None else batch
        if n <= 0:
            return 0.0
        line = self._line(plan)
        return line.est(n, tail) if line is not None else self._prior_ms(plan, n)

    def service_fit(self, plan) -> Optional[dict]:
        """The fitted line of the plan's kernel choice (ms): fixed_ms +
        per_item_ms * n + tail_ms, and how many batches it is fitted to."""
        line = self._line(plan)
        if line is None:
            return None
        a, c, r = line.fit
        return {"fixed_ms": a, "per_item_ms": c, "tail_ms": r, "batches": len(line.obs)}


__all__ = ["PlanObserveAdapter", "ServiceLine"]
