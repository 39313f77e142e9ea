"""Plan and Alternative: the data a policy decision returns.

A ``Plan`` says what to run (variant, precision, threads, batch size, wait),
what it is predicted to cost and whether it meets the SLO; ``explain()`` words
the reasons with the numbers. Frozen, hashable and picklable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from pykernels.work import Op

from . import scan as _scan
from .slo import SLO

# Measured precision errors are estimates (random data, one shape): this much
# over max_rel_error still counts as within it.
ERROR_TOLERANCE = 1.1

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


__all__ = ["Alternative", "Plan"]
