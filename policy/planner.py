"""Planner: chooses (variant, precision, threads, batch_size, max_wait_ms) from an SLO.

``Policy(slo, profile).plan(op, queued=0, arrival_rate=None)`` is a pure
function of (op, profile, SLO, queue state, feedback state): no clock, no I/O,
deterministic, so it is tested with tables of cases.

The model of one request's latency (all in ms, s50/s99 = predicted service
time p50/p99 of a batch of b, corrected by feedback):

* arrival rate lambda: ``arrival_rate`` (items/s), else ``slo.min_throughput``
  (a bulk class must sustain at least that), else none (sporadic requests).
* with a stream (lambda > 0): a batch waits at most ``max_wait = (b-1)/lambda``
  to fill; the batch server is utilized ``rho = lambda * s50 / b``; batches of
  b Poisson arrivals come Erlang-b spaced, so Kingman's mean wait is
  ``W = s50 * rho / (1 - rho) * (1/b + cs^2) / 2`` (cs^2 from the measured
  p99/p50 as a lognormal) and its p99 ``W / rho * ln(100 rho)`` (exponential
  tail); ``queued`` items ahead add ``floor(queued / b)`` batches.
  ``p99 = drain + max(max_wait, queueing p99) + s99``. Checked against an
  open-loop simulation of Poisson arrivals with dynamic batching: every plan
  predicted feasible met its p99, predictions ~5-15% above the simulated p99.
* without a stream: the ``max(queued, 1)`` waiting items are served in batches
  of b, no waiting: ``p99 = (ceil(n / b) - 1) * s50 + s99``.

Feasible: p99 <= (1 - slack) * p99_ms and p50 <= (1 - slack) * p50_ms (Clipper
keeps 8% of the budget as slack), throughput ``b / s50 >= min_throughput``,
``rho <= rho_max``, and every precision the plan uses within max_rel_error
(a measured error is an estimate on random data: up to ``ERROR_TOLERANCE``
(10%) over the budget still counts as within it, so ``max_rel_error=1e-2``
admits an int8 path measured at 1.01e-2).
Among feasible plans the tightest fit wins: the highest throughput; plans
within ``throughput_tolerance`` (2%) of it are equivalent and the one with the
lowest predicted p99 (the most headroom) is taken, then fewer threads, then the
more accurate precision. When nothing is feasible the plan with the lowest
predicted p99 is returned with ``feasible=False`` (the highest throughput if the
SLO has no latency target).

Feedback (``observe``): service times only (queue time is the caller's). Per
(op, variant, precision, threads) the last ``window`` ratios observed/predicted
p50 correct the predictions: p50 scales by their median, p99 becomes at least
predicted p50 times their 99th percentile (the recent tail, as Clockwork plans
on the p99 of recent runs); the cost model's prior holds until
``min_observations``. As a safety net, per op, AIMD caps the batch size: a
service time past the p99 budget multiplies the cap by ``backoff`` (0.9), and
``probe_after`` consecutive observations with headroom raise it additively.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import ops as _ops
from .cost import CostModel
from .ops import Op, precision_error, precision_rank
from .profile import Profile
from .slo import SLO

VARIANT_ORDER = ("latency", "throughput")
# Measured precision errors are estimates (random data, one shape): this much
# over max_rel_error still counts as within it.
ERROR_TOLERANCE = 1.1


@dataclass(frozen=True)
class Alternative:
    """A plan that lost, with why."""

    variant: str
    precision: str
    threads: int
    batch_size: int
    predicted_p99_ms: float
    throughput: float
    feasible: bool
    why: str


@dataclass(frozen=True)
class Plan:
    """What to run: kernel variant, precision and threads, batches of up to
    ``batch_size`` items formed for at most ``max_wait_ms``; the predicted
    request latency (queueing, batch formation and service) and whether it
    meets the SLO. ``explain()`` says why in sentences with the numbers."""

    variant: str
    precision: str
    threads: int
    batch_size: int
    max_wait_ms: float
    predicted_p50_ms: float
    predicted_p99_ms: float
    feasible: bool
    alternatives: Tuple[Alternative, ...] = ()
    reason: str = ""
    op: Optional[Op] = None
    service_p50_ms: float = 0.0
    service_p99_ms: float = 0.0
    throughput: float = 0.0
    utilization: Optional[float] = None
    arrival_rate: Optional[float] = None
    queued: int = 0
    rel_error: float = 0.0
    slo: Optional[SLO] = None
    p99_budget_ms: Optional[float] = None
    notes: Tuple[str, ...] = field(default=(), repr=False)

    def explain(self) -> str:
        s = []
        th = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        wait = (f", waiting at most {_ms(self.max_wait_ms)} for a batch to fill"
                if self.max_wait_ms > 0 else ", without waiting for more items")
        lead = "Plan" if self.feasible else "No plan meets the SLO; best effort"
        s.append(f"{lead}: run the {self.variant} kernels in {self.precision} on {th}, "
                 f"in batches of up to {self.batch_size}{wait}.")
        s.append(f"A batch of {self.batch_size} is predicted to take {_ms(self.service_p50_ms)} "
                 f"(p50) and {_ms(self.service_p99_ms)} (p99); with queueing and batch formation "
                 f"a request is predicted at p50 {_ms(self.predicted_p50_ms)} and p99 "
                 f"{_ms(self.predicted_p99_ms)}.")
        slo = self.slo
        if slo is not None and slo.p99_ms is not None:
            if self.predicted_p99_ms <= (self.p99_budget_ms or slo.p99_ms):
                head = 1.0 - self.predicted_p99_ms / slo.p99_ms
                s.append(f"That meets the p99 target of {_ms(slo.p99_ms)} with {head:.0%} headroom "
                         f"(plans must stay under {_ms(self.p99_budget_ms)}, the target less a "
                         f"slack margin).")
            else:
                s.append(f"That misses the p99 target of {_ms(slo.p99_ms)} (planning budget "
                         f"{_ms(self.p99_budget_ms)}) by {_ms(self.predicted_p99_ms - (self.p99_budget_ms or slo.p99_ms))}.")
        if slo is not None and slo.p50_ms is not None:
            ok = "meets" if self.predicted_p50_ms <= slo.p50_ms else "misses"
            s.append(f"The predicted p50 {ok} the p50 target of {_ms(slo.p50_ms)}.")
        tp = f"It sustains {_rate(self.throughput)} items/s"
        if self.arrival_rate:
            tp += f", {self.utilization:.0%} busy at {_rate(self.arrival_rate)} items/s offered"
        if slo is not None and slo.min_throughput is not None:
            ok = "above" if self.throughput >= slo.min_throughput else "below"
            tp += f", {ok} the floor of {_rate(slo.min_throughput)} items/s"
        if self.queued:
            tp += f", with {self.queued} items already queued"
        s.append(tp + ".")
        if slo is not None:
            within = "within" if self.rel_error <= slo.max_rel_error * ERROR_TOLERANCE else "over"
            s.append(f"{self.precision} adds a relative error of about {self.rel_error:.1g}, "
                     f"{within} the accuracy budget of {slo.max_rel_error:g}.")
        s.extend(self.notes)
        if self.alternatives:
            a = self.alternatives[0]
            s.append(f"It beat {len(self.alternatives)} other kernel choices; the runner-up was "
                     f"{a.variant}/{a.precision} on {a.threads} thread{'s' if a.threads != 1 else ''} "
                     f"at batch {a.batch_size}: {a.why}.")
        return " ".join(s)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "unbounded (overloaded)"
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 1:
        return f"{x:.3g} ms"
    return f"{x * 1000:.3g} us"


@dataclass(frozen=True)
class _Eval:
    variant: str
    precision: str
    threads: int
    batch: int
    s50: float
    s99: float
    p50: float
    p99: float
    throughput: float
    rho: Optional[float]
    max_wait: float
    rel_error: float
    failures: Tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.failures

    def failure_texts(self, slo: SLO, slack: float, rho_max: float, lam: Optional[float]) -> List[str]:
        out = []
        for f in self.failures:
            if f == "rho":
                out.append(f"{self.rho:.0%} busy at {_rate(lam)} items/s (limit {rho_max:.0%})")
            elif f == "p99":
                out.append(f"predicted p99 {_ms(self.p99)} exceeds the {_ms(slo.p99_ms * (1 - slack))} budget")
            elif f == "p50":
                out.append(f"predicted p50 {_ms(self.p50)} exceeds the {_ms(slo.p50_ms * (1 - slack))} budget")
            elif f == "throughput":
                out.append(f"{self.throughput:,.0f} items/s is below the {_rate(slo.min_throughput)} floor")
            elif f == "accuracy":
                out.append(f"relative error {self.rel_error:.1g} exceeds the {slo.max_rel_error:g} budget")
        return out


class Policy:
    """Plans kernel calls and batches for one SLO class, learning from feedback.

    slo: the targets. profile: a Profile; None loads the cached one lazily
    (calibrating quickly if none is cached or it is stale). Tunables:
    max_batch (largest batch considered), slack (fraction of the latency
    targets held back), rho_max (highest planned utilization),
    throughput_tolerance (plans this close to the best throughput count as
    equal, and the lowest p99 wins), window / min_observations (feedback),
    backoff / probe_after (AIMD on the batch cap).
    """

    def __init__(self, slo: SLO, profile: Optional[Profile] = None, *, max_batch: int = 256,
                 slack: float = 0.08, rho_max: float = 0.9, throughput_tolerance: float = 0.02,
                 window: int = 20, min_observations: int = 5, backoff: float = 0.9,
                 probe_after: int = 4, progress: bool = True):
        if not isinstance(slo, SLO):
            raise TypeError(f"slo must be a pykernels.policy.SLO, got {type(slo).__name__}")
        if profile is not None and not isinstance(profile, Profile):
            raise TypeError(f"profile must be a Profile or None, got {type(profile).__name__}")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not 0 <= slack < 1:
            raise ValueError(f"slack must be in [0, 1), got {slack!r}")
        if not 0 < rho_max < 1:
            raise ValueError(f"rho_max must be in (0, 1), got {rho_max!r}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff!r}")
        self.slo = slo
        self.max_batch = max_batch
        self.slack = float(slack)
        self.rho_max = float(rho_max)
        self.throughput_tolerance = float(throughput_tolerance)
        self.window = int(window)
        self.min_observations = int(min_observations)
        self.backoff = float(backoff)
        self.probe_after = int(probe_after)
        self.progress = progress
        self._profile = profile
        self._cost: Optional[CostModel] = None
        self._lock = threading.RLock()
        self._ratios: Dict[tuple, collections.deque] = {}
        self._corr: Dict[tuple, Tuple[float, float, int]] = {}  # group -> (p50 scale, tail, stamp)
        self._op_ratios: Dict[str, collections.deque] = {}
        self._op_corr: Dict[str, Tuple[float, float]] = {}
        self._op_count: Dict[str, int] = {}
        self._last_seen: Dict[tuple, int] = {}
        self._cells: Dict[tuple, collections.deque] = {}
        self._caps: Dict[str, int] = {}
        self._streak: Dict[str, int] = {}
        self._plans: Dict[tuple, Plan] = {}
        self._buckets: Dict[Op, tuple] = {}
        self._choices: Dict[tuple, Optional[str]] = {}
        self.chooser_calls = 0
        self.choice_counts: collections.Counter = collections.Counter()

    # --- profile ------------------------------------------------------------
    @property
    def profile(self) -> Profile:
        if self._profile is None:
            with self._lock:
                if self._profile is None:
                    self._profile = Profile.load(recalibrate=True, progress=self.progress)
        return self._profile

    @property
    def cost_model(self) -> CostModel:
        if self._cost is None:
            prof = self.profile
            with self._lock:
                if self._cost is None:
                    self._cost = CostModel(prof)
        return self._cost

    # --- planning -----------------------------------------------------------
    def plan(self, op: Op, *, queued: int = 0, arrival_rate: Optional[float] = None) -> Plan:
        """Choose how to serve ``op``. queued: items waiting now. arrival_rate:
        items per second arriving (None: unknown; a throughput floor in the SLO
        then stands for it)."""
        if not isinstance(op, Op):
            raise TypeError(f"op must be a pykernels.policy.ops op, got {type(op).__name__}")
        if isinstance(queued, bool) or not isinstance(queued, (int, np.integer)) or queued < 0:
            raise ValueError(f"queued must be an int >= 0, got {queued!r}")
        if arrival_rate is not None:
            if isinstance(arrival_rate, bool) or not isinstance(arrival_rate, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(arrival_rate) or arrival_rate < 0:
                raise ValueError(f"arrival_rate must be a finite number >= 0 or None, got {arrival_rate!r}")
            arrival_rate = float(arrival_rate)
        return self._plan(op, int(queued), arrival_rate, None, None)

    def plan_call(self, op: Op, batch: int, *, threads: Optional[int] = None) -> Plan:
        """Plan one call of exactly ``batch`` items already in hand (what the
        ``variant="auto"`` chooser asks): no batching decision, no waiting."""
        return self._plan(op, int(batch), None, int(batch), threads)

    def _plan(self, op, queued, arrival_rate, fixed_batch, fixed_threads) -> Plan:
        cm = self.cost_model
        with self._lock:
            ck = (op, queued, arrival_rate, fixed_batch, fixed_threads)
            hit = self._plans.get(ck)
            if hit is not None:
                return hit
            plan = self._compute(cm, op, queued, arrival_rate, fixed_batch, fixed_threads)
            if len(self._plans) > 4096:
                self._plans.clear()
            self._plans[ck] = plan
            return plan

    def _rel_error(self, cm: CostModel, op: Op, v: str, p: str, t: int) -> float:
        measured = cm.profile.precision_error
        return max(precision_error(x, measured) for x in cm.precisions_used(op, v, p, t))

    def _batch_grid(self, cm: CostModel, op: Op, queued: int, lam: Optional[float], cap: int) -> List[int]:
        top = min(self.max_batch, cap)
        if not lam:
            top = min(top, max(queued, 1))
        grid = {1, top}
        b = 2
        while b < top:
            grid.add(b)
            b *= 2
        # measured buckets of the op's shape (in items)
        buckets = self._buckets.get(op)
        if buckets is None:
            buckets = ()
            if len(op.parts()) == 1:
                base_key, per = op.base().key, max(1, op.units(1))
                buckets = tuple(sorted({m.batch // per for m in cm.profile.measurements
                                        if m.op == base_key and m.batch % per == 0}))
            self._buckets[op] = buckets
        grid.update(b for b in buckets if b <= top)
        if not lam and queued > 1:
            grid.add(min(queued, top))
        return sorted(grid)

    def _correction(self, op_key: str, v, p, t) -> Optional[Tuple[float, float]]:
        """(p50 scale, recent tail ratio) for a kernel choice: its own recent
        observations while fresh, else the op's pooled recent observations
        (a machine-wide slowdown shows on every kernel choice, and a choice
        observed slow long ago must not stay condemned forever)."""
        c = self._corr.get((op_key, v, p, t))
        if c is not None and self._op_count.get(op_key, 0) - c[2] <= 2 * self.window:
            return c[0], c[1]
        return self._op_corr.get(op_key)

    def _corrected(self, cm: CostModel, op: Op, v, p, t, b) -> Optional[Tuple[float, float]]:
        pred = cm.predict(op, v, p, t, b)
        if pred is None:
            return None
        c = self._correction(op.key, v, p, t)
        if c is None:
            return pred.p50_ms, pred.p99_ms
        c50, hi = c
        s50 = pred.p50_ms * c50
        s99 = max(pred.p99_ms * c50, pred.p50_ms * hi, s50)
        return s50, s99

    def _evaluate(self, cm, op, v, p, t, b, queued, lam, err) -> Optional[_Eval]:
        pred = self._corrected(cm, op, v, p, t, b)
        if pred is None:
            return None
        s50, s99 = pred
        slo = self.slo
        tp = b / s50 * 1e3
        fails = []
        if lam:
            rho = lam / tp
            max_wait = (b - 1) / lam * 1e3
            drain = (queued // b) * s50
            if rho >= 1.0:
                p50 = p99 = math.inf
            else:
                # Kingman: batches of b Poisson arrivals come Erlang-b spaced
                # (ca^2 = 1/b); service variability from the measured tail
                # (lognormal: sigma = ln(p99/p50) / 2.326). Waiting-time tail
                # P(W > t) ~ rho * exp(-rho t / mean wait).
                cs2 = (math.log(max(s99 / s50, 1.0)) / 2.326) ** 2
                wmean = s50 * rho / (1.0 - rho) * (1.0 / b + cs2) / 2.0
                wq99 = wmean / rho * max(0.0, math.log(100.0 * rho))
                wq50 = wmean / rho * max(0.0, math.log(2.0 * rho))
                p99 = drain + max(max_wait, wq99) + s99
                p50 = drain + max(max_wait / 2.0, wq50) + s50
            if rho > self.rho_max:
                fails.append("rho")
        else:
            rho = None
            max_wait = 0.0
            nb = -(-max(queued, 1) // b)
            p99 = (nb - 1) * s50 + s99
            p50 = (-(-nb // 2) - 1) * s50 + s50
        if slo.p99_ms is not None and not p99 <= slo.p99_ms * (1 - self.slack):
            fails.append("p99")
        if slo.p50_ms is not None and not p50 <= slo.p50_ms * (1 - self.slack):
            fails.append("p50")
        if slo.min_throughput is not None and tp < slo.min_throughput:
            fails.append("throughput")
        if err > slo.max_rel_error * ERROR_TOLERANCE:
            fails.append("accuracy")
        return _Eval(v, p, t, b, s50, s99, p50, p99, tp, rho, max_wait, err, tuple(fails))

    def _compute(self, cm, op, queued, arrival_rate, fixed_batch, fixed_threads) -> Plan:
        slo = self.slo
        cands = cm.candidates(op)
        if fixed_threads is not None:
            narrowed = [c for c in cands if c[2] == fixed_threads]
            if not narrowed and cands:  # nearest measured thread count
                near = min({c[2] for c in cands}, key=lambda t: (abs(t - fixed_threads), t))
                narrowed = [c for c in cands if c[2] == near]
            cands = narrowed
        if not cands:
            raise ValueError(f"the profile has no measurements to predict {op.key}"
                             + (f" at precision {op.precision}" if op.precision else "")
                             + "; calibrate it with Profile.calibrate(ops=[...]) or add cells")
        errs = {c: self._rel_error(cm, op, *c) for c in cands}
        limit = slo.max_rel_error * ERROR_TOLERANCE
        allowed = [c for c in cands if errs[c] <= limit]
        notes = []
        excluded = sorted({c[1] for c in cands if errs[c] > limit}, key=precision_rank)
        if excluded:
            notes.append("Excluded by the accuracy budget of {:g}: {}.".format(
                slo.max_rel_error, ", ".join(f"{p} (error ~{min(errs[c] for c in cands if c[1] == p):.1g})"
                                             for p in excluded)))
        if not allowed:
            best = min(errs.values())
            allowed = [c for c in cands if errs[c] == best]
            notes.append("No precision fits the accuracy budget; the most accurate one is used.")
        if fixed_batch is not None:
            lam = None  # one call with its items in hand
        elif arrival_rate is None:
            lam = slo.min_throughput  # a throughput floor stands for the offered load
        else:
            lam = arrival_rate or None
        cap = self._caps.get(op.key, self.max_batch) if fixed_batch is None else fixed_batch
        if fixed_batch is None and op.key in self._caps:
            notes.append(f"Feedback capped the batch at {self._caps[op.key]} after observed "
                         f"service times ran past the p99 budget.")
        grid = [fixed_batch] if fixed_batch is not None else self._batch_grid(cm, op, queued, lam, cap)
        evals: List[_Eval] = []
        for c in allowed:
            for b in grid:
                e = self._evaluate(cm, op, c[0], c[1], c[2], b, queued, lam, errs[c])
                if e is not None:
                    evals.append(e)
        if not evals:
            raise ValueError(f"no prediction available for {op.key}")
        feasible = [e for e in evals if e.feasible]
        if feasible:
            best_tp = max(e.throughput for e in feasible)
            near = [e for e in feasible if e.throughput >= best_tp * (1 - self.throughput_tolerance)]
            chosen = min(near, key=_tiebreak)
            reason = (f"highest throughput ({chosen.throughput:,.0f} items/s, within "
                      f"{self.throughput_tolerance:.0%} of the best) with the most p99 headroom among "
                      f"{len(feasible)} feasible plans")
            rank = sorted(feasible, key=lambda e: (-e.throughput, _tiebreak(e))) + sorted(
                (e for e in evals if not e.feasible), key=lambda e: (e.p99, -e.throughput) + _tiebreak(e))
        else:
            if slo.p99_ms is not None:
                key = lambda e: (e.p99, -e.throughput) + _tiebreak(e)  # noqa: E731
                what = "the lowest predicted p99"
            elif slo.p50_ms is not None:
                key = lambda e: (e.p50, -e.throughput) + _tiebreak(e)  # noqa: E731
                what = "the lowest predicted p50"
            else:
                key = lambda e: (-e.throughput,) + _tiebreak(e)  # noqa: E731
                what = "the highest throughput"
            chosen = min(evals, key=key)
            why = chosen.failure_texts(slo, self.slack, self.rho_max, lam)
            reason = (f"infeasible: no plan meets {slo.describe()} ({'; '.join(why)}); "
                      f"this one has {what}")
            rank = sorted(evals, key=key)
        # Alternatives: the best plan of every other kernel choice.
        alts, seen = [], {(chosen.variant, chosen.precision, chosen.threads)}
        for e in rank:
            g = (e.variant, e.precision, e.threads)
            if g in seen:
                continue
            seen.add(g)
            why = ("; ".join(e.failure_texts(slo, self.slack, self.rho_max, lam))
                   if not e.feasible else _why(e, chosen))
            alts.append(Alternative(e.variant, e.precision, e.threads, e.batch, e.p99,
                                    e.throughput, e.feasible, why))
        budget = slo.p99_ms * (1 - self.slack) if slo.p99_ms is not None else None
        return Plan(
            variant=chosen.variant, precision=chosen.precision, threads=chosen.threads,
            batch_size=chosen.batch, max_wait_ms=chosen.max_wait,
            predicted_p50_ms=chosen.p50, predicted_p99_ms=chosen.p99,
            feasible=chosen.feasible, alternatives=tuple(alts), reason=reason, op=op,
            service_p50_ms=chosen.s50, service_p99_ms=chosen.s99, throughput=chosen.throughput,
            utilization=chosen.rho, arrival_rate=lam, queued=queued, rel_error=chosen.rel_error,
            slo=slo, p99_budget_ms=budget, notes=tuple(notes))

    # --- feedback -----------------------------------------------------------
    def observe(self, plan: Plan, seconds: float, *, batch: Optional[int] = None) -> None:
        """Record the measured *service* time (seconds) of one batch run with
        ``plan`` (queue time excluded). ``batch``: items actually in the batch,
        if fewer than ``plan.batch_size``. Thread-safe."""
        if not isinstance(plan, Plan) or plan.op is None:
            raise TypeError("observe() takes a Plan returned by this policy's plan()")
        sec = float(seconds)
        if not math.isfinite(sec) or sec < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        b = int(batch) if batch is not None else plan.batch_size
        if b < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        op = plan.op
        pred = self.cost_model.predict(op, plan.variant, plan.precision, plan.threads, b)
        if pred is None:
            return
        ms = sec * 1e3
        gk = (op.key, plan.variant, plan.precision, plan.threads)
        ratio = ms / pred.p50_ms
        with self._lock:
            n = self._op_count[op.key] = self._op_count.get(op.key, 0) + 1
            changed = n % self.window == 0  # staleness of kernel-choice corrections
            last = self._last_seen.get(gk)
            self._last_seen[gk] = n
            if last is not None and n - last > 2 * self.window:
                # This kernel choice's evidence has expired (the op was served
                # by others meanwhile): start its window afresh.
                self._ratios.pop(gk, None)
                self._corr.pop(gk, None)
            for store, corr, k, stamp in ((self._ratios, self._corr, gk, (n,)),
                                          (self._op_ratios, self._op_corr, op.key, ())):
                w = store.get(k)
                if w is None:
                    w = store[k] = collections.deque(maxlen=self.window)
                w.append(ratio)
                if len(w) >= self.min_observations:
                    srt = sorted(w)
                    new = (_snap(_quantile(srt, 0.5)), _snap(_quantile(srt, 0.99)))
                    old = corr.get(k)
                    if old is None or old[:2] != new:
                        changed = True
                    corr[k] = new + stamp
            cell = self._cells.get(gk + (b,))
            if cell is None:
                cell = self._cells[gk + (b,)] = collections.deque(maxlen=self.window)
            cell.append(ms)
            changed |= self._aimd(plan, ms, b)
            if changed:  # plans depend on feedback only through these
                self._plans.clear()
                self._choices.clear()

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

    def batch_cap(self, op: Op) -> Optional[int]:
        """The AIMD batch cap for ``op`` (None: not backed off)."""
        with self._lock:
            return self._caps.get(op.key)

    def correction(self, op: Op, variant: str, precision: str, threads: int):
        """(p50 scale, recent p99 ratio) applied to this kernel choice's
        predictions, both relative to the predicted p50; None before
        ``min_observations``."""
        with self._lock:
            return self._correction(op.key, variant, precision, threads)

    def observed(self, plan: Plan, batch: Optional[int] = None) -> dict:
        """Recent observed service times of the plan's cell: n, p50_ms, p99_ms."""
        b = batch or plan.batch_size
        with self._lock:
            w = list(self._cells.get((plan.op.key, plan.variant, plan.precision, plan.threads, b), ()))
        if not w:
            return {"n": 0, "p50_ms": None, "p99_ms": None}
        return {"n": len(w), "p50_ms": float(np.median(w)), "p99_ms": float(np.percentile(w, 99))}

    def reset_feedback(self) -> None:
        with self._lock:
            self._ratios.clear()
            self._corr.clear()
            self._op_ratios.clear()
            self._op_corr.clear()
            self._op_count.clear()
            self._last_seen.clear()
            self._cells.clear()
            self._caps.clear()
            self._streak.clear()
            self._plans.clear()
            self._choices.clear()

    # --- variant="auto" hook ------------------------------------------------
    def choose(self, op_name: str, m: int, k: int, n: int, precision: str) -> Optional[str]:
        """The chooser installed by ``active()``: variant for one kernel call,
        or None to let the kernel's size heuristic decide. Never raises.
        ``chooser_calls`` and ``choice_counts`` (answers given, None included)
        count its use; under concurrent calls the counts are approximate."""
        self.chooser_calls += 1
        key = (op_name, m, k, n, precision)
        hit = self._choices.get(key, self)
        if hit is not self:
            self.choice_counts[hit] += 1
            return hit
        choice = None
        try:
            mapped = _ops.op_for_call(op_name, m, k, n, precision,
                                      tuple(self.cost_model.profile.ops.values()))
            if mapped is not None:
                op, batch = mapped
                threads = _call_threads(m * k * n)
                plan = self.plan_call(op, batch, threads=threads)
                if plan.variant in VARIANT_ORDER:
                    choice = plan.variant
        except Exception:
            choice = None
        with self._lock:
            if len(self._choices) > 4096:
                self._choices.clear()
            self._choices[key] = choice
        self.choice_counts[choice] += 1
        return choice

    @contextlib.contextmanager
    def active(self):
        """``with policy.active():`` -- ``variant="auto"`` kernel calls follow
        this policy (the previous chooser is restored on exit). The profile is
        loaded on entry, so no kernel call ever waits for a calibration."""
        from pykernels import _gemm
        self.cost_model  # noqa: B018 - load eagerly
        with _HOOK_LOCK:
            prev = _gemm._active_chooser
            _gemm._active_chooser = self.choose
        try:
            yield self
        finally:
            with _HOOK_LOCK:
                _gemm._active_chooser = prev


_HOOK_LOCK = threading.Lock()


def _call_threads(macs: int) -> Optional[int]:
    """Threads a kernel call with threads=None uses. Mirrors pykernels' rule
    (csrc/bindings/module.cc, resolve_threads): below 64^3 multiply-adds one
    thread, else the default thread count."""
    try:
        import pykernels
        return pykernels.get_num_threads() if macs >= 64 * 64 * 64 else 1
    except Exception:  # pragma: no cover
        return None


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


def _tiebreak(e: _Eval):
    return (e.p99, e.threads, precision_rank(e.precision), e.batch,
            VARIANT_ORDER.index(e.variant) if e.variant in VARIANT_ORDER else 99, e.variant)


def _why(e: _Eval, chosen: _Eval) -> str:
    if e.throughput < chosen.throughput:
        return f"lower throughput ({e.throughput:,.0f} vs {chosen.throughput:,.0f} items/s)"
    return f"similar throughput but a higher predicted p99 ({_ms(e.p99)} vs {_ms(chosen.p99)})"


__all__ = ["Alternative", "Plan", "Policy"]
