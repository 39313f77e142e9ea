"""The planner's per-decision loop: evaluate every precomputed (kernel choice,
batch) cell under the current queue state, pick the plan, rank the runners-up.

Two implementations with one contract: ``py_scan`` (this file, pure Python:
the twin and the fallback) and the Cython ``pykernels.policy._scan.scan``
(``policy/_scan.pyx``). ``scan`` is the compiled one when it imports, else the
twin. They compute the same numbers with the same floating-point operations in
the same order (the C library's ``log``, no FMA contraction), so their results
are identical; ``tests/test_policy_sketch.py`` checks it on random tables.

``make_cells(b, s50, s99, cs2, tp, grp, k1, k2, gfail)`` copies a table's
cells once (one entry per cell, cells ordered by kernel choice then batch; the
order breaks exact ties, as ``min`` over a list does):

  b, s50, s99, cs2, tp   batch size, corrected service p50/p99 (ms), squared
                         coefficient of variation of service (lognormal from
                         p99/p50), throughput b / s50 (items/s)
  grp                    the cell's kernel choice (group) index
  k1, k2, gfail          per group: tie-break ranks (threads then precision
                         rank; variant), and FAIL_ACC if its precision is over
                         the accuracy budget (else 0)

``scan(cells, lam, queued, p99_budget, p50_budget, min_tp, rho_max, tol, mode)``
evaluates them for one decision:

  lam, queued            arrival rate (items/s; 0: no stream), items waiting
  p99_budget, p50_budget latency budgets in ms (inf: no target)
  min_tp                 throughput floor (-inf: none)
  rho_max, tol, mode     utilization limit, throughput tolerance, what an
                         infeasible plan minimises (MODE_P99/P50/TP)

and returns ``(nfeasible, picks)``: picks[0] is the chosen cell, then the best
cell of every other kernel choice, best first, each as
``(cell, p50, p99, rho, max_wait, fails)``: predicted request latency p50/p99
(ms), utilization (NaN without a stream), longest wait to fill the batch (ms),
FAIL_* bits. ``picks`` is empty when there are no cells. A cells object holds
scratch space: one scan at a time (the planner calls it under its lock).

The latency model is documented in ``planner.py``.
"""
from __future__ import annotations

import math

FAIL_RHO, FAIL_P99, FAIL_P50, FAIL_TP, FAIL_ACC = 1, 2, 4, 8, 16
MODE_P99, MODE_P50, MODE_TP = 0, 1, 2


class PyCells:
    """A table's cells for ``py_scan`` (plain lists)."""

    __slots__ = ("b", "s50", "s99", "cs2", "tp", "grp", "k1", "k2", "gfail",
                 "p50o", "p99o", "rhoo", "waito", "failo")

    def __init__(self, b, s50, s99, cs2, tp, grp, k1, k2, gfail):
        n = len(b)
        self.b = [float(x) for x in b]
        self.s50 = [float(x) for x in s50]
        self.s99 = [float(x) for x in s99]
        self.cs2 = [float(x) for x in cs2]
        self.tp = [float(x) for x in tp]
        self.grp = [int(x) for x in grp]
        self.k1 = [int(x) for x in k1]
        self.k2 = [int(x) for x in k2]
        self.gfail = [int(x) for x in gfail]
        if not all(len(x) == n for x in (self.s50, self.s99, self.cs2, self.tp, self.grp)) \
                or len(self.k2) != len(self.k1) or len(self.gfail) != len(self.k1) \
                or not all(0 <= g < len(self.k1) for g in self.grp):
            raise ValueError("make_cells: inconsistent array lengths or group index")
        self.p50o = [0.0] * n
        self.p99o = [0.0] * n
        self.rhoo = [0.0] * n
        self.waito = [0.0] * n
        self.failo = [0] * n

    def __len__(self):
        return len(self.b)


def py_scan(cells, lam, queued, p99_budget, p50_budget, min_tp, rho_max, tol, mode):
    b, s50, s99, cs2, tp, grp = cells.b, cells.s50, cells.s99, cells.cs2, cells.tp, cells.grp
    k1, k2, gfail = cells.k1, cells.k2, cells.gfail
    p50o, p99o, rhoo, waito, failo = cells.p50o, cells.p99o, cells.rhoo, cells.waito, cells.failo
    lam = float(lam)
    queued = float(queued)
    n = len(b)
    inf = math.inf
    nfeas = 0
    best_tp = -inf
    for j in range(n):
        bj = b[j]
        a50 = s50[j]
        a99 = s99[j]
        f = gfail[grp[j]]
        if lam > 0.0:
            rho = lam / tp[j]
            wait = max(0.0, (bj - max(queued, 1.0)) / lam * 1e3 - a50)
            drain = math.floor(max(queued - 1.0, 0.0) / bj) * a50
            if rho >= 1.0:
                p50 = inf
                p99 = inf
            else:
                wmean = a50 * rho / (1.0 - rho) * (1.0 / bj + cs2[j]) / 2.0
                wq99 = wmean / rho * max(0.0, math.log(100.0 * rho))
                wq50 = wmean / rho * max(0.0, math.log(2.0 * rho))
                q99 = a50 * max(0.0, 1.0 - 0.01 / rho) + rho * wq99
                q50 = a50 * max(0.0, 1.0 - 0.5 / rho) + rho * wq50
                p99 = drain + max(wait, q99) + a99
                p50 = drain + max(wait / 2.0, q50) + a50
            if rho > rho_max:
                f |= FAIL_RHO
        else:
            rho = math.nan
            wait = 0.0
            nb = math.ceil(max(queued, 1.0) / bj)
            p99 = (nb - 1.0) * a50 + a99
            p50 = (math.ceil(nb / 2.0) - 1.0) * a50 + a50
        if not p99 <= p99_budget:
            f |= FAIL_P99
        if not p50 <= p50_budget:
            f |= FAIL_P50
        if tp[j] < min_tp:
            f |= FAIL_TP
        p50o[j] = p50
        p99o[j] = p99
        rhoo[j] = rho
        waito[j] = wait
        failo[j] = f
        if f == 0:
            nfeas += 1
            if tp[j] > best_tp:
                best_tp = tp[j]
    if n == 0:
        return 0, []

    def tie_less(i, j):
        # (p99, threads/precision rank, batch, variant rank)
        if p99o[i] != p99o[j]:
            return p99o[i] < p99o[j]
        gi, gj = grp[i], grp[j]
        if k1[gi] != k1[gj]:
            return k1[gi] < k1[gj]
        if b[i] != b[j]:
            return b[i] < b[j]
        return k2[gi] < k2[gj]

    def rank_less(i, j):
        """Rank order: feasible by (-tp, tie), then the rest by the fallback key."""
        if nfeas:
            fi, fj = failo[i] == 0, failo[j] == 0
            if fi != fj:
                return fi
            if fi:
                if tp[i] != tp[j]:
                    return tp[i] > tp[j]
                return tie_less(i, j)
            first = MODE_P99
        else:
            first = mode
        if first == MODE_P99:
            if p99o[i] != p99o[j]:
                return p99o[i] < p99o[j]
        elif first == MODE_P50:
            if p50o[i] != p50o[j]:
                return p50o[i] < p50o[j]
        if tp[i] != tp[j]:
            return tp[i] > tp[j]
        return tie_less(i, j)

    chosen = -1
    if nfeas:
        thr = best_tp * (1.0 - tol)
        for j in range(n):
            if failo[j] == 0 and tp[j] >= thr and (chosen < 0 or tie_less(j, chosen)):
                chosen = j
    else:
        for j in range(n):
            if chosen < 0 or rank_less(j, chosen):
                chosen = j
    # best cell of every other group, then those in rank order (insertion sort)
    ng = len(k1)
    best = [-1] * ng
    for j in range(n):
        g = grp[j]
        if best[g] < 0 or rank_less(j, best[g]):
            best[g] = j
    cg = grp[chosen]
    order = []
    for g in range(ng):
        j = best[g]
        if j < 0 or g == cg:
            continue
        i = len(order)
        order.append(j)
        while i > 0 and rank_less(j, order[i - 1]):
            order[i] = order[i - 1]
            i -= 1
        order[i] = j
    return nfeas, [(j, p50o[j], p99o[j], rhoo[j], waito[j], failo[j]) for j in [chosen] + order]


try:
    from ._scan import Cells as CCells, scan as c_scan
except ImportError:  # not built: the twin serves
    CCells = c_scan = None

if c_scan is not None:
    make_cells, scan, IMPLEMENTATION = CCells, c_scan, "cython"
else:
    make_cells, scan, IMPLEMENTATION = PyCells, py_scan, "python"

__all__ = ["CCells", "FAIL_ACC", "FAIL_P50", "FAIL_P99", "FAIL_RHO", "FAIL_TP", "IMPLEMENTATION",
           "MODE_P50", "MODE_P99", "MODE_TP", "PyCells", "c_scan", "make_cells", "py_scan", "scan"]
