"""Policy: plans kernel calls and batches for one SLO class and learns from feedback.

A facade over three jobs: ``planning`` (the pure decision), ``feedback``
(observed service times: corrections, AIMD, sketches) and the profile and
cost model it plans on. It owns the lock and the caches (plans, candidate
tables, service-time predictions, ``variant="auto"`` choices), dropped when
the feedback changes them.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from typing import Dict, Optional, Tuple

import numpy as np

import pykernels
from pykernels import work as _ops
from pykernels.work import Op

from .cost import CostModel
from .feedback import FLUSH_EVERY, SKETCH_ACCURACY, Feedback, check_observation
from .plan import ERROR_TOLERANCE, Alternative, Plan
from .planning import VARIANT_ORDER, Planner, _Table
from .profile import Profile
from .slo import SLO


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
        self._planner = Planner(slo, max_batch=max_batch, slack=self.slack, rho_max=self.rho_max,
                                throughput_tolerance=self.throughput_tolerance)
        self._feedback = Feedback(slo, max_batch=max_batch, slack=self.slack, window=self.window,
                                  min_observations=self.min_observations, backoff=self.backoff,
                                  probe_after=self.probe_after)
        # caches, dropped when the feedback they were computed from changes
        self._plans: Dict[tuple, Plan] = {}
        self._tables: Dict[tuple, _Table] = {}
        self._choices: Dict[tuple, object] = {}
        self._service: Dict[tuple, Optional[tuple]] = {}  # predict_service_ms
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
            if self._feedback.pending:
                self._flush_locked()
            ck = (op, queued, arrival_rate, fixed_batch, fixed_threads)
            hit = self._plans.get(ck)
            if hit is not None:
                return hit
            tk = (op, fixed_threads)
            tab = self._tables.get(tk)
            if tab is None:
                tab = self._planner.table(cm, op, fixed_threads)
                if len(self._tables) > 1024:
                    self._tables.clear()
                self._tables[tk] = tab
            cap = None if fixed_batch is not None else self._feedback.cap(op.key)
            plan = self._planner.decide(cm, tab, queued, arrival_rate, fixed_batch, cap,
                                        self._feedback.corrected)
            if len(self._plans) > 4096:
                self._plans.clear()
            self._plans[ck] = plan
            return plan

    def predict_service_ms(self, plan: Plan, batch: Optional[int] = None, *,
                           tail: bool = True) -> float:
        """Predicted service time (ms) of one batch of ``batch`` items (default
        ``plan.batch_size``) run with ``plan``'s kernel choice: the cost model
        corrected by the observed service times (``tail``: the p99, else the
        p50, raised to the recent *mean* when observed times run skewed: what
        a server sums over the batches queued ahead, which drain in about n
        means, not n medians). The one service-time model a server should size
        batches and admit requests on; ``observe()`` is what teaches it."""
        b = plan.batch_size if batch is None else int(batch)
        if b <= 0:
            return 0.0
        cm = self._cost if self._cost is not None else self.cost_model
        key = (plan.op, plan.variant, plan.precision, plan.threads, b)
        with self._lock:
            if self._feedback.pending:
                self._flush_locked()
            got = self._service.get(key, self)
            if got is self:
                got = self._feedback.corrected(cm, *key)
                if got is not None:
                    mean = self._feedback.mean_scale(plan.op.key, *key[1:4])
                    got = got + (got[0] if mean is None else max(got[0], got[2] * mean),)
                if len(self._service) > 4096:
                    self._service.clear()
                self._service[key] = got
        if got is None:  # the cost model has no cell for it: scale the plan's own batch
            full = plan.service_p99_ms if tail else plan.service_p50_ms
            return full * b / max(1, plan.batch_size)
        return got[1] if tail else got[3]

    def _invalidate(self, op_key: str) -> None:
        """Feedback for ``op_key`` changed: drop its tables and every cached plan."""
        for k in [k for k in self._tables if k[0].key == op_key]:
            del self._tables[k]
        self._plans.clear()
        self._choices.clear()
        self._service.clear()

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
        seconds, batch = check_observation(plan, seconds, batch)
        if self._feedback.record(plan, seconds, batch):
            self.flush()

    def flush(self) -> None:
        """Apply the buffered observations now (``observe()`` defers them)."""
        if self._feedback.pending:
            with self._lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        for key in self._feedback.apply(self.cost_model):  # plans depend on feedback only here
            self._invalidate(key)

    def batch_cap(self, op: Op) -> Optional[int]:
        """The AIMD batch cap for ``op`` (None: not backed off)."""
        with self._lock:
            self._flush_locked()
            return self._feedback.cap(op.key)

    def correction(self, op: Op, variant: str, precision: str, threads: int):
        """(p50 scale, recent p99 ratio) applied to this kernel choice's
        predictions, both relative to the predicted p50; None before
        ``min_observations``."""
        with self._lock:
            self._flush_locked()
            return self._feedback.correction(op.key, variant, precision, threads)

    def observed(self, plan: Plan, batch: Optional[int] = None) -> dict:
        """Observed service times of the plan's cell (kernel choice and batch)
        since the policy was made or its feedback reset, from a quantile sketch
        (relative error ``SKETCH_ACCURACY``): n, p50_ms, p99_ms, p999_ms, max_ms."""
        with self._lock:
            self._flush_locked()
            return self._feedback.observed(plan, batch)

    @property
    def _op_count(self) -> Dict[str, int]:
        """Observations applied per op key (read by tests)."""
        with self._lock:
            self._flush_locked()
            return dict(self._feedback.op_count)

    def reset_feedback(self) -> None:
        with self._lock:
            self._feedback.reset()
            self._plans.clear()
            self._tables.clear()
            self._choices.clear()
            self._service.clear()

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


__all__ = ["Alternative", "Plan", "Policy", "ERROR_TOLERANCE", "FLUSH_EVERY", "SKETCH_ACCURACY",
           "VARIANT_ORDER"]
