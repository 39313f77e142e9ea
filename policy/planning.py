"""Planning: the pure decision of how to serve an op.

``Planner.decide`` maps (op, cost model, SLO, queue state, feedback state) to
a ``Plan``: deterministic, no clock, no I/O, no locks, so it is tested with
tables of cases. The feedback state enters as ``corrected`` (the corrected
service time of a kernel choice at a batch) and ``cap`` (the AIMD batch cap).
The latency model and the selection rule are described in docs/policy.md.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from pykernels.work import Op, precision_error, precision_rank

from . import scan as _scan
from .cost import CostModel
from .plan import ERROR_TOLERANCE, Plan, _Alternatives, _failure_texts, _fast
from .slo import SLO, error_cosine

VARIANT_ORDER = ("latency", "throughput")

# corrected(cm, op, variant, precision, threads, batch) -> (s50, s99, prior p50) in ms, or None
Corrected = Callable[..., Optional[Tuple[float, float, float]]]

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


class Planner:
    """The decision rule of one SLO class: its targets and tunables, and the
    pure functions from (op, cost model, queue state, feedback state) to a
    ``Plan``. Tables and grids memoize those functions for one feedback state:
    the caller drops them when that state changes."""

    def __init__(self, slo: SLO, *, max_batch: int, slack: float, rho_max: float,
                 throughput_tolerance: float):
        self.slo = slo
        self.max_batch = max_batch
        self.slack = slack
        self.rho_max = rho_max
        self.throughput_tolerance = throughput_tolerance
        self._keep = 1.0 - slack
        self._reason_head = "highest throughput ("
        self._reason_mid = (f" items/s, within {throughput_tolerance:.0%} of the best) with "
                            f"the most p99 headroom among ")

    @staticmethod
    def _rel_error(cm: CostModel, op: Op, v: str, p: str, t: int) -> float:
        measured = cm.profile.precision_error
        return max(precision_error(x, measured) for x in cm.precisions_used(op, v, p, t))

    def table(self, cm: CostModel, op: Op, fixed_threads: Optional[int]) -> _Table:
        """The kernel choices allowed for ``op`` (restricted to ``fixed_threads``
        or the nearest measured thread count), their errors and notes."""
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
        if slo.min_cosine is not None:  # the budget as stated: cosine of the outputs to fp32's
            worst = {}
            for c in cands:
                worst[c[1]] = max(worst.get(c[1], 0.0), errs[c])
            notes.append("Accuracy budget: cosine to fp32 >= {:g}; measured cosine: {}.".format(
                slo.min_cosine, ", ".join(
                    f"{p} {error_cosine(e):.5g}" + (" (excluded)" if p in excluded else "")
                    for p, e in sorted(worst.items(), key=lambda kv: precision_rank(kv[0])))))
        elif excluded:
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
        return _Table(op, allowed, [errs[c] for c in allowed],
                      [_scan.FAIL_ACC if errs[c] > limit else 0 for c in allowed], notes, buckets)

    @staticmethod
    def _row(cm: CostModel, tab: _Table, b: int, corrected: Corrected) -> list:
        """Corrected (s50, s99) and the prior p50 of every kernel choice at batch b (None: no prediction)."""
        row = tab.rows.get(b)
        if row is None:
            row = tab.rows[b] = [corrected(cm, tab.op, v, p, t, b) for v, p, t in tab.groups]
        return row

    def _grid(self, cm: CostModel, tab: _Table, top: int, fixed: bool, corrected: Corrected) -> tuple:
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
        rows = {b: self._row(cm, tab, b, corrected) for b in batches}
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

    def decide(self, cm: CostModel, tab: _Table, queued: int, arrival_rate: Optional[float],
               fixed_batch: Optional[int], cap: Optional[int], corrected: Corrected) -> Plan:
        """The plan for ``tab.op`` with ``queued`` items waiting and
        ``arrival_rate`` items/s offered (or exactly ``fixed_batch`` items in
        hand), under the AIMD ``cap`` and the ``corrected`` service times."""
        slo = self.slo
        op = tab.op
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
            if cap is not None:
                notes = notes + (f"Feedback capped the batch at {cap} after observed "
                                 f"service times ran past the p99 budget.",)
            top, fixed = min(self.max_batch, self.max_batch if cap is None else cap), False
            if not lam:
                top = min(top, max(queued, 1))
        cells, bs, s50, s99, tp, grp, prior = self._grid(cm, tab, top, fixed, corrected)
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


__all__ = ["Planner", "VARIANT_ORDER"]
