"""Planner: chooses (variant, precision, threads, batch_size, max_wait_ms) from an SLO.

``Policy(slo, profile).plan(op, queued=0, arrival_rate=None)`` is a pure
function of (op, profile, SLO, queue state, feedback state): no clock, no I/O,
deterministic, so it is tested with tables of cases.

The model of one request's latency (all in ms, s50/s99 = predicted service
time p50/p99 of a batch of b, corrected by feedback):

* arrival rate lambda: ``arrival_rate`` (items/s), else ``slo.min_throughput``
  (a bulk class must sustain at least that), else none (sporadic requests).
* with a stream (lambda > 0), dynamic batching (a batch is dispatched when
  the server is free, with up to b items, after at most max_wait): the
  ``max(queued, 1)`` items waiting need ``b - max(queued, 1)`` more, and a
  batch fills while the previous one runs, so ``max_wait = max(0, (b -
  max(queued, 1)) / lambda - s50)``; the server is utilized ``rho = lambda *
  s50 / b``; a request finds a batch in service with probability rho and
  waits its residual, whose p99 is ``s50 * max(0, 1 - 0.01 / rho)``; with
  probability about rho it also finds a queue: batches of b Poisson arrivals
  come Erlang-b spaced, so Kingman's mean wait is ``W = s50 * rho / (1 -
  rho) * (1/b + cs^2) / 2`` (cs^2 from the measured p99/p50 as a lognormal)
  and its p99 ``W / rho * ln(100 rho)`` (exponential tail). The queued items
  beyond the batch the last of them joins add ``floor((queued - 1) / b)``
  batches. ``p99 = drain + max(max_wait, residual p99 + rho * queueing p99)
  + s99``. Checked against policy.simulate (Poisson arrivals, lognormal
  service, fixed plans with that max_wait, rho < 0.9, two machine-shaped
  curves, 213 cases): median 4% above the simulated p99, 10th percentile
  +1%, lowest 0.84x (small batches at rho >= 0.6); policy runs meet a 3 x T1
  p99 target for >= 99% of requests at 50-90% of peak load, not at 30%
  (91-93%: caps of 2-4 without waiting would serve it, but a batch size
  here is also the size waited for; see ``simulate``).
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import pykernels
from pykernels import work as _ops
from pykernels.work import Op, precision_error, precision_rank

from . import scan as _scan
from .cost import CostModel
from .profile import Profile
from .sketch import QuantileSketch
from .slo import SLO

VARIANT_ORDER = ("latency", "throughput")
# Measured precision errors are estimates (random data, one shape): this much
# over max_rel_error still counts as within it.
ERROR_TOLERANCE = 1.1
# Relative accuracy of the per-cell service-time sketches (observed()).
SKETCH_ACCURACY = 0.01
# observe() buffers; the buffer is applied at this length (and before any
# decision or read of the feedback state).
FLUSH_EVERY = 64


@dataclass(frozen=True)
class Alternative:
    """A plan that lost (the best plan of another kernel choice), with ``why``."""

    variant: str
    precision: str
    threads: int
    batch_size: int
    predicted_p99_ms: float
    throughput: float
    feasible: bool
    # what ``why`` is worded from (formatted on demand: most plans are never explained)
    _why: tuple = field(default=(), repr=False, compare=False, hash=False)

    @property
    def why(self) -> str:
        """Why it lost: the targets it misses, or how it compares with the plan chosen."""
        if not self._why:
            return ""
        fails, rho, p50, p99, err, slo, slack, rho_max, lam, chosen_tp, chosen_p99 = self._why
        if fails:
            return "; ".join(_failure_texts(fails, rho, p50, p99, self.throughput, err, slo,
                                            slack, rho_max, lam))
        if self.throughput < chosen_tp:
            return f"lower throughput ({self.throughput:,.0f} vs {chosen_tp:,.0f} items/s)"
        return (f"similar throughput but a higher predicted p99 ({_ms(p99)} vs "
                f"{_ms(chosen_p99)})")


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
    # the cost model's uncorrected p50 of this batch (what observe() compares against)
    prior_p50_ms: float = field(default=0.0, repr=False)

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


def _failure_texts(fails: int, rho, p50, p99, tp, err, slo: SLO, slack: float, rho_max: float,
                   lam: Optional[float]) -> List[str]:
    out = []
    if fails & _scan.FAIL_RHO:
        out.append(f"{rho:.0%} busy at {_rate(lam)} items/s (limit {rho_max:.0%})")
    if fails & _scan.FAIL_P99:
        out.append(f"predicted p99 {_ms(p99)} exceeds the {_ms(slo.p99_ms * (1 - slack))} budget")
    if fails & _scan.FAIL_P50:
        out.append(f"predicted p50 {_ms(p50)} exceeds the {_ms(slo.p50_ms * (1 - slack))} budget")
    if fails & _scan.FAIL_TP:
        out.append(f"{tp:,.0f} items/s is below the {_rate(slo.min_throughput)} floor")
    if fails & _scan.FAIL_ACC:
        out.append(f"relative error {err:.1g} exceeds the {slo.max_rel_error:g} budget")
    return out


_new = object.__new__


def _fast(cls, fields: dict):
    """A frozen dataclass instance from all its fields, without the generated
    ``__init__`` (which costs ~0.25 us a field through ``object.__setattr__``):
    the planner builds a Plan and its alternatives per decision."""
    o = _new(cls)
    o.__dict__.update(fields)
    return o


class _Alternatives(Sequence):
    """``Plan.alternatives``: a tuple of ``Alternative`` built on first use
    (a decision costs a few microseconds; building every runner-up costs
    more, and most plans are never inspected). Compares, hashes and pickles
    as the tuple it stands for."""

    __slots__ = ("_args", "_items")

    def __init__(self, *args):
        self._args = args
        self._items = None

    def _tuple(self) -> Tuple[Alternative, ...]:
        items = self._items
        if items is None:
            picks, groups, bs, tp, errs, grp, slo, slack, rho_max, lam, ctp, cp99 = self._args
            out = []
            for i, ap50, ap99, arho, _wait, afails in picks[1:]:
                g = grp[i]
                av, ap, at = groups[g]
                out.append(_fast(Alternative, {
                    "variant": av, "precision": ap, "threads": at, "batch_size": bs[i],
                    "predicted_p99_ms": ap99, "throughput": tp[i], "feasible": not afails,
                    "_why": (afails, None if arho != arho else arho, ap50, ap99, errs[g], slo,
                             slack, rho_max, lam, ctp, cp99)}))
            items = self._items = tuple(out)
        return items

    def __getitem__(self, i):
        return self._tuple()[i]

    def __len__(self) -> int:
        return len(self._args[0]) - 1

    def __iter__(self):
        return iter(self._tuple())

    def __eq__(self, other):
        if isinstance(other, (_Alternatives, tuple)):
            return self._tuple() == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash(self._tuple())

    def __repr__(self) -> str:
        return repr(self._tuple())

    def __reduce__(self):
        return (tuple, (self._tuple(),))


def _variant_rank(v: str) -> int:
    return VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99


class _Table:
    """Everything about (op, thread restriction) that does not depend on the
    queue state: the kernel choices allowed, their errors and tie-break ranks,
    and per batch size their corrected service p50/p99. Built once, dropped
    when the op's feedback corrections change; ``Policy._grid`` turns it into
    the cell arrays the per-decision scan reads."""

    __slots__ = ("op", "groups", "errs", "k1", "k2", "gfail", "notes", "buckets", "rows", "grids")

    def __init__(self, op, groups, errs, gfail, notes, buckets):
        self.op = op
        self.groups = groups
        self.errs = errs
        # tie-break ranks: (threads, precision rank), then (variant rank, variant)
        r1 = {k: i for i, k in enumerate(sorted({(g[2], precision_rank(g[1])) for g in groups}))}
        r2 = {k: i for i, k in enumerate(sorted({(_variant_rank(g[0]), g[0]) for g in groups}))}
        self.k1 = np.array([r1[(g[2], precision_rank(g[1]))] for g in groups], dtype=np.int64)
        self.k2 = np.array([r2[(_variant_rank(g[0]), g[0])] for g in groups], dtype=np.int64)
        self.gfail = np.array(gfail, dtype=np.int64)
        self.notes = tuple(notes)
        self.buckets = buckets
        self.rows: Dict[int, list] = {}
        self.grids: Dict[tuple, tuple] = {}


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
        self._keep = 1.0 - self.slack
        self._reason_head = "highest throughput ("
        self._reason_mid = (f" items/s, within {self.throughput_tolerance:.0%} of the best) with "
                            f"the most p99 headroom among ")
        self._profile = profile
        self._cost: Optional[CostModel] = None
        self._lock = threading.RLock()
        self._pending: collections.deque = collections.deque()  # observe() -> flush
        self._ratios: Dict[tuple, collections.deque] = {}
        self._corr: Dict[tuple, Tuple[float, float, int]] = {}  # group -> (p50 scale, tail, stamp)
        self._op_ratios: Dict[str, collections.deque] = {}
        self._op_corr: Dict[str, Tuple[float, float]] = {}
        self._op_count: Dict[str, int] = {}
        self._last_seen: Dict[tuple, int] = {}
        self._cells: Dict[tuple, QuantileSketch] = {}
        self._caps: Dict[str, int] = {}
        self._streak: Dict[str, int] = {}
        self._plans: Dict[tuple, Plan] = {}
        self._tables: Dict[tuple, _Table] = {}
        self._choices: Dict[tuple, object] = {}
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
        then stands for it).

        Cost: a few microseconds per decision once the op's candidate table
        is built (bench/test_bench_policy.py), less on a repeated queue state."""
        if type(queued) is not int or queued < 0:
            if isinstance(queued, bool) or not isinstance(queued, (int, np.integer)) or queued < 0:
                raise ValueError(f"queued must be an int >= 0, got {queued!r}")
            queued = int(queued)
        if arrival_rate is not None and (type(arrival_rate) is not float
                                         or not 0.0 <= arrival_rate < math.inf):
            if isinstance(arrival_rate, bool) or not isinstance(arrival_rate, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(arrival_rate) or arrival_rate < 0:
                raise ValueError(f"arrival_rate must be a finite number >= 0 or None, got {arrival_rate!r}")
            arrival_rate = float(arrival_rate)
        if not isinstance(op, Op):
            raise TypeError(f"op must be a pykernels.policy.ops op, got {type(op).__name__}")
        return self._plan(op, queued, arrival_rate, None, None)

    def plan_call(self, op: Op, batch: int, *, threads: Optional[int] = None) -> Plan:
        """Plan one call of exactly ``batch`` items already in hand (what the
        ``variant="auto"`` chooser asks): no batching decision, no waiting."""
        return self._plan(op, int(batch), None, int(batch), threads)

    def _plan(self, op, queued, arrival_rate, fixed_batch, fixed_threads) -> Plan:
        cm = self._cost if self._cost is not None else self.cost_model
        with self._lock:
            if self._pending:
                self._flush_locked()
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

    # The candidate table: built once per (op, thread restriction) and feedback state.
    def _table(self, cm: CostModel, op: Op, fixed_threads: Optional[int]) -> _Table:
        tk = (op, fixed_threads)
        tab = self._tables.get(tk)
        if tab is not None:
            return tab
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
        buckets = ()
        if len(op.parts()) == 1:  # measured buckets of the op's shape (in items)
            base_key, per = op.base().key, max(1, op.units(1))
            buckets = tuple(sorted({m.batch // per for m in cm.profile.measurements
                                    if m.op == base_key and m.batch % per == 0}))
        tab = _Table(op, allowed, [errs[c] for c in allowed],
                     [_scan.FAIL_ACC if errs[c] > limit else 0 for c in allowed], notes, buckets)
        if len(self._tables) > 1024:
            self._tables.clear()
        self._tables[tk] = tab
        return tab

    def _row(self, cm: CostModel, tab: _Table, b: int) -> list:
        """Corrected (s50, s99) and the prior p50 of every kernel choice at batch b (None: no prediction)."""
        row = tab.rows.get(b)
        if row is None:
            row = tab.rows[b] = [self._corrected(cm, tab.op, v, p, t, b) for v, p, t in tab.groups]
        return row

    def _grid(self, cm: CostModel, tab: _Table, top: int, fixed: bool) -> tuple:
        """Cell arrays over the batch grid up to ``top`` (or the one batch ``top``
        when ``fixed``): every kernel choice, then batch ascending."""
        gk = (top, fixed)
        g = tab.grids.get(gk)
        if g is not None:
            return g
        if fixed:
            batches = [top]
        else:
            grid = {1, top}
            b = 2
            while b < top:
                grid.add(b)
                b *= 2
            grid.update(b for b in tab.buckets if b <= top)
            batches = sorted(grid)
        rows = {b: self._row(cm, tab, b) for b in batches}
        cells = [(gi, b, rows[b][gi]) for gi in range(len(tab.groups)) for b in batches
                 if rows[b][gi] is not None]
        # service variability as a lognormal: sigma = ln(p99/p50) / 2.326
        cs2 = [(math.log(max(c[2][1] / c[2][0], 1.0)) / 2.326) ** 2 for c in cells]
        g = tab.grids[gk] = (
            _scan.make_cells([float(c[1]) for c in cells], [c[2][0] for c in cells],
                             [c[2][1] for c in cells], cs2,
                             [c[1] / c[2][0] * 1e3 for c in cells], [c[0] for c in cells],
                             tab.k1, tab.k2, tab.gfail),
            [c[1] for c in cells], [c[2][0] for c in cells], [c[2][1] for c in cells],
            [c[1] / c[2][0] * 1e3 for c in cells], [c[0] for c in cells],
            [c[2][2] for c in cells])
        return g

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
            return pred.p50_ms, pred.p99_ms, pred.p50_ms
        c50, hi = c
        s50 = pred.p50_ms * c50
        s99 = max(pred.p99_ms * c50, pred.p50_ms * hi, s50)
        return s50, s99, pred.p50_ms

    def _compute(self, cm, op, queued, arrival_rate, fixed_batch, fixed_threads) -> Plan:
        slo = self.slo
        tab = self._table(cm, op, fixed_threads)
        if fixed_batch is not None:
            lam = None  # one call with its items in hand
        elif arrival_rate is None:
            lam = slo.min_throughput  # a throughput floor stands for the offered load
        else:
            lam = arrival_rate or None
        notes = tab.notes
        if fixed_batch is not None:
            top, fixed = fixed_batch, True
        else:
            cap = self._caps.get(op.key)
            if cap is not None:
                notes = notes + (f"Feedback capped the batch at {cap} after observed "
                                 f"service times ran past the p99 budget.",)
            top, fixed = min(self.max_batch, self.max_batch if cap is None else cap), False
            if not lam:
                top = min(top, max(queued, 1))
        cells, bs, s50, s99, tp, grp, prior = self._grid(cm, tab, top, fixed)
        if not bs:
            raise ValueError(f"no prediction available for {op.key}")
        if slo.p99_ms is not None:
            mode = _scan.MODE_P99
        elif slo.p50_ms is not None:
            mode = _scan.MODE_P50
        else:
            mode = _scan.MODE_TP
        keep = self._keep
        nfeas, picks = _scan.scan(
            cells, lam or 0.0, queued,
            math.inf if slo.p99_ms is None else slo.p99_ms * keep,
            math.inf if slo.p50_ms is None else slo.p50_ms * keep,
            -math.inf if slo.min_throughput is None else slo.min_throughput,
            self.rho_max, self.throughput_tolerance, mode)
        j, cp50, cp99, rho, wait, fails = picks[0]
        gi = grp[j]
        v, p, t = tab.groups[gi]
        ctp = tp[j]
        if nfeas:
            reason = f"{self._reason_head}{ctp:,.0f}{self._reason_mid}{nfeas} feasible plans"
        else:
            what = ("the lowest predicted p99" if mode == _scan.MODE_P99 else
                    "the lowest predicted p50" if mode == _scan.MODE_P50 else "the highest throughput")
            why = _failure_texts(fails, None if rho != rho else rho, cp50, cp99, ctp, tab.errs[gi],
                                 slo, self.slack, self.rho_max, lam)
            reason = (f"infeasible: no plan meets {slo.describe()} ({'; '.join(why)}); "
                      f"this one has {what}")
        alts = _Alternatives(picks, tab.groups, bs, tp, tab.errs, grp, slo, self.slack,
                             self.rho_max, lam, ctp, cp99) if len(picks) > 1 else ()
        return _fast(Plan, {
            "variant": v, "precision": p, "threads": t, "batch_size": bs[j],
            "max_wait_ms": wait, "predicted_p50_ms": cp50,
            "predicted_p99_ms": cp99, "feasible": not fails, "alternatives": alts,
            "reason": reason, "op": op, "service_p50_ms": s50[j],
            "service_p99_ms": s99[j], "throughput": ctp,
            "utilization": None if rho != rho else rho, "arrival_rate": lam, "queued": queued,
            "rel_error": tab.errs[gi], "slo": slo,
            "p99_budget_ms": slo.p99_ms * keep if slo.p99_ms is not None else None,
            "notes": notes, "prior_p50_ms": prior[j]})

    def _invalidate(self, op_key: str) -> None:
        """Feedback for ``op_key`` changed: drop its tables and every cached plan."""
        for k in [k for k in self._tables if k[0].key == op_key]:
            del self._tables[k]
        self._plans.clear()
        self._choices.clear()

    # --- feedback -----------------------------------------------------------
    def observe(self, plan: Plan, seconds: float, *, batch: Optional[int] = None) -> None:
        """Record the measured *service* time (seconds) of one batch run with
        ``plan`` (queue time excluded). ``batch``: items actually in the batch,
        if fewer than ``plan.batch_size``. Thread-safe: concurrent calls lose
        no observation.

        The record path only appends to a buffer (well under a microsecond,
        bench/test_bench_policy.py). The buffer is applied -- every
        ``FLUSH_EVERY`` observations, and before any ``plan()``,
        ``observed()``, ``correction()``, ``batch_cap()`` or ``flush()`` -- so
        every decision sees every observation made before it: each time goes
        into the quantile sketch of the plan's cell (kernel choice and batch;
        ``observed()`` reads it) and, as a ratio to the cost model's
        prediction, into the recent windows that correct predictions; AIMD
        adjusts the batch cap."""
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
        pending = self._pending
        pending.append((plan, seconds, batch))  # deque.append: atomic under the GIL
        if len(pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Apply the buffered observations now (``observe()`` defers them)."""
        if self._pending:
            with self._lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        pending = self._pending
        touched = {}
        invalid = set()
        while True:
            try:  # popleft is atomic: appends racing with the flush are kept
                plan, sec, batch = pending.popleft()
            except IndexError:
                break
            self._apply(plan, sec, batch, touched, invalid)
        for k, (store, corr, stamp) in touched.items():
            if self._correct(store, corr, k, stamp):
                invalid.add(k if stamp is None else k[0])
        for key in invalid:  # plans depend on feedback only through these
            self._invalidate(key)

    def _apply(self, plan: Plan, sec: float, batch: Optional[int], touched: dict,
               invalid: set) -> None:
        """One observation (under the lock): sketch, windows, AIMD."""
        b = plan.batch_size if batch is None else batch
        op = plan.op
        if b == plan.batch_size and plan.prior_p50_ms > 0:
            prior = plan.prior_p50_ms
        else:
            pred = self.cost_model.predict(op, plan.variant, plan.precision, plan.threads, b)
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
        n = self._op_count[key] = self._op_count.get(key, 0) + 1
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
        if self.slo.p99_ms is not None and plan.feasible and self._aimd(plan, ms, b):
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

    def batch_cap(self, op: Op) -> Optional[int]:
        """The AIMD batch cap for ``op`` (None: not backed off)."""
        with self._lock:
            self._flush_locked()
            return self._caps.get(op.key)

    def correction(self, op: Op, variant: str, precision: str, threads: int):
        """(p50 scale, recent p99 ratio) applied to this kernel choice's
        predictions, both relative to the predicted p50; None before
        ``min_observations``."""
        with self._lock:
            self._flush_locked()
            return self._correction(op.key, variant, precision, threads)

    def observed(self, plan: Plan, batch: Optional[int] = None) -> dict:
        """Observed service times of the plan's cell (kernel choice and batch)
        since the policy was made or its feedback reset, from a quantile sketch
        (relative error ``SKETCH_ACCURACY``): n, p50_ms, p99_ms, p999_ms, max_ms."""
        b = batch or plan.batch_size
        with self._lock:
            self._flush_locked()
            sk = self._cells.get((plan.op.key, plan.variant, plan.precision, plan.threads, b))
            if sk is None or sk.count == 0:
                return {"n": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
            q = sk.quantiles((0.5, 0.99, 0.999))
            return {"n": sk.count, "p50_ms": q[0.5], "p99_ms": q[0.99], "p999_ms": q[0.999],
                    "max_ms": sk.max}

    def reset_feedback(self) -> None:
        with self._lock:
            self._pending.clear()
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
            self._tables.clear()
            self._choices.clear()

    # --- variant="auto" hook ------------------------------------------------
    def choose(self, call: "pykernels.KernelCall") -> Tuple[Optional[str], Optional[int]]:
        """The chooser installed by ``active()``: (variant, threads) for one
        ``variant="auto"`` kernel call, or None in either place to leave it to
        the kernel (its size heuristic, the caller's or the default thread
        count). ``call.threads``: the caller's thread count, or None -- only
        then does the policy choose the threads too (among those the profile
        measured). ``call.precision`` is the weight's (or the K/V cache's) as
        the caller passed it: the policy plans that precision and never
        repacks behind the caller's back. Never raises. ``chooser_calls`` and
        ``choice_counts`` (variants given, None included) count its use;
        under concurrent calls the counts are approximate."""
        self.chooser_calls += 1
        threads = call.threads
        key = call
        hit = self._choices.get(key, self)
        if hit is not self:
            self.choice_counts[hit[0]] += 1
            return hit
        choice = (None, None)
        try:
            mapped = _ops.op_for_call(call)
            if mapped is not None:
                op, batch = mapped
                plan = self.plan_call(op, batch, threads=threads)
                if plan.variant in VARIANT_ORDER:
                    choice = (plan.variant, plan.threads if threads is None else None)
        except Exception:
            choice = (None, None)
        with self._lock:
            if len(self._choices) > 4096:
                self._choices.clear()
            self._choices[key] = choice
        self.choice_counts[choice[0]] += 1
        return choice

    @contextlib.contextmanager
    def active(self):
        """``with policy.active():`` -- ``variant="auto"`` kernel calls follow
        this policy (the previous chooser is restored on exit). The profile is
        loaded on entry, so no kernel call ever waits for a calibration."""
        self.cost_model  # noqa: B018 - load eagerly
        prev = pykernels.set_variant_chooser(self.choose)
        try:
            yield self
        finally:
            pykernels.set_variant_chooser(prev)


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


__all__ = ["Alternative", "Plan", "Policy"]
