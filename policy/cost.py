"""Cost model: predicted p50 and p99 service time of any op at any batch size.

``CostModel(profile).predict(op, variant, precision, threads, batch)`` reads
the profile's measured tables (interpolated between batch buckets, so every
measured step is kept) and falls back to a per-group non-negative least-squares
fit on ``FEATURES`` for shapes never measured; the tail is the measured
p99/p50 ratio, never a constant. A ``Model`` is the sum of its parts.
``heldout_error`` and ``cross_validate`` report the error on unseen shapes.
How and why, with the measured errors: docs/policy.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from pykernels import work as _ops
from pykernels.work import Model, Op, precision_rank
from .profile import Profile

FEATURES = ("constant_ms", "ms_per_gflop", "ms_per_tiled_gflop", "ms_per_mb_in", "ms_per_mb_out",
            "ms_per_mb_weight")
# A group measured on fewer shapes is fitted on (constant, GFLOP) only.
MIN_SHAPES_FULL_FIT = 3
_WORK_ONLY = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True)
class Prediction:
    """Predicted service time of one call (a batch) in milliseconds.

    source: "measured" (a profile cell), "interpolated" (between buckets),
    "extrapolated" (beyond the buckets, scaled by the fit), "fitted" (shape
    never measured) or "sum" (a Model, from its parts).
    """

    p50_ms: float
    p99_ms: float
    source: str


def _fit(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS of y on the columns of a, minimising relative error (rows weighted
    by 1/y). (Huber re-weighting against interference-inflated cells was
    tried: no better on this machine's held-out cells, so kept simple.)"""
    from scipy.optimize import nnls  # imported here: scipy.optimize takes ~1 s to import

    w = 1.0 / y
    coef, _ = nnls(a * w[:, None], y * w)
    return coef


@dataclass(frozen=True)
class _Fit:
    coef: Tuple[float, ...]
    tile: Optional[Tuple[int, int]]
    log_p50: np.ndarray  # sorted, for tail lookup
    ratio: np.ndarray
    n: int
    shapes: Tuple[Op, ...] = ()  # measured shapes, when too few for the full fit


def _features(op: Op, units: int, precision: str, tile=None) -> np.ndarray:
    weight = op.bytes(0, precision)  # what a call reads whatever the batch
    if isinstance(op, _ops.Linear):
        m = op.units(units)
        mb_in, mb_out = 4.0 * m * op.k, 4.0 * m * op.n
    else:
        mb_in, mb_out = op.bytes(units, precision) - weight, 0.0
    return np.array([1.0, op.flops(units) / 1e9, op.tiled_flops(units, tile) / 1e9,
                     mb_in / 1e6, mb_out / 1e6, weight / 1e6])


class CostModel:
    """Predictions from a Profile. Immutable once built; cheap to query (memoized)."""

    def __init__(self, profile: Profile, *, exclude_ops: Iterable[str] = ()):
        self.profile = profile
        excl = set(exclude_ops)
        tables: Dict[Tuple[str, str, str, int], List] = {}
        rows: Dict[Tuple[str, str, str, int], List] = {}
        for m in profile.measurements:
            if m.op in excl:
                continue
            op = profile.ops[m.op]
            tables.setdefault((m.op, m.variant, m.precision, m.threads), []).append(m)
            rows.setdefault((op.kind, m.variant, m.precision, m.threads), []).append((op, m))
        self._tables = {
            k: (np.array([m.batch for m in v], dtype=float),
                np.array([m.p50_ms for m in v]),
                np.array([m.p99_ms / m.p50_ms for m in v]))
            for k, v in ((k, sorted(v, key=lambda m: m.batch)) for k, v in tables.items())
        }
        tiles = _ops.kernel_tiles((profile.key or {}).get("kernel_tiles") or ())
        self._fits: Dict[Tuple[str, str, str, int], _Fit] = {}
        for g, cells in sorted(rows.items()):
            prec = g[2]
            tile = tiles.get(g[:3])
            a = np.array([_features(op, m.batch, prec, tile) for op, m in cells])
            y = np.array([m.p50_ms for _, m in cells])
            if len({op.key for op, _ in cells}) < MIN_SHAPES_FULL_FIT:
                a = a * _WORK_ONLY  # zero columns: NNLS leaves their coefficients at 0
            try:
                coef = _fit(a, y)
            except Exception:  # pragma: no cover - degenerate input
                coef = np.zeros(a.shape[1])
            if not np.any(coef > 0):
                # Proportional to work as a last resort.
                coef = np.zeros(a.shape[1])
                coef[1] = float(np.median(y / np.maximum(a[:, 1], 1e-12)))
            order = np.argsort(np.log(y))
            ratios = np.array([m.p99_ms / m.p50_ms for _, m in cells])
            few = tuple(sorted({op.key: op for op, _ in cells}.values(), key=lambda o: o.key))
            self._fits[g] = _Fit(tuple(float(c) for c in coef), tile, np.log(y)[order], ratios[order],
                                 len(cells), few if len(few) < MIN_SHAPES_FULL_FIT else ())
        self._memo: Dict[tuple, Optional[Prediction]] = {}

    # --- what can be predicted ---------------------------------------------
    def groups(self, kind: Optional[str] = None) -> List[Tuple[str, str, str, int]]:
        """(kind, variant, precision, threads) with a fit, sorted."""
        return sorted(g for g in self._fits if kind is None or g[0] == kind)

    def coefficients(self, kind: str, variant: str, precision: str, threads: int):
        """Fitted coefficients named by ``FEATURES``, or None."""
        f = self._fits.get((kind, variant, precision, threads))
        return None if f is None else f.coef

    def _part_precision(self, part: Op, variant: str, precision: str, threads: int) -> Optional[str]:
        if part.precision is not None:
            p = part.precision
        else:
            p = precision
        if (part.kind, variant, p, threads) in self._fits:
            return p
        if part.precision is None and (part.kind, variant, "fp32", threads) in self._fits:
            return "fp32"  # e.g. attention stays fp32 while the linears run int8
        return None

    def candidates(self, op: Op) -> List[Tuple[str, str, int]]:
        """(variant, precision, threads) this model can predict ``op`` with, in
        a deterministic order (variant, precision by accuracy, threads)."""
        parts = op.parts()
        kinds = {p.kind for p in parts}
        combos = {(v, p, t) for (k, v, p, t) in self._fits if k in kinds}
        if op.precision is not None:
            combos = {c for c in combos if c[1] == op.precision}
        out = []
        for v, p, t in combos:
            if all(self._part_precision(part, v, p, t) is not None for part in parts):
                # A free-precision part must be able to run p itself somewhere,
                # or the precision is not really in use.
                if any(part.precision is None and (part.kind, v, p, t) in self._fits
                       for part in parts) or all(part.precision is not None for part in parts) \
                        or p == "fp32":
                    out.append((v, p, t))
        return sorted(out, key=lambda c: (c[0], precision_rank(c[1]), c[1], c[2]))

    def precisions_used(self, op: Op, variant: str, precision: str, threads: int) -> Tuple[str, ...]:
        return tuple(sorted({self._part_precision(p, variant, precision, threads) or precision
                             for p in op.parts()}, key=precision_rank))

    # --- predictions --------------------------------------------------------
    def fitted_p50(self, op: Op, variant: str, precision: str, threads: int, units: int) -> Optional[float]:
        f = self._fits.get((op.kind, variant, precision, threads))
        if f is None:
            return None
        x = _features(op, units, precision, f.tile)
        return max(float(np.dot(f.coef, x)), 1e-6)

    def _tail(self, kind, variant, precision, threads, p50: float) -> float:
        f = self._fits[(kind, variant, precision, threads)]
        if f.n == 0:
            return 1.0
        i = int(np.searchsorted(f.log_p50, math.log(p50)))
        lo, hi = max(0, i - 2), min(f.n, i + 2)
        # three nearest in log p50
        idx = sorted(range(lo, hi), key=lambda j: abs(f.log_p50[j] - math.log(p50)))[:3]
        return float(np.median(f.ratio[idx]))

    def predict(self, op: Op, variant: str, precision: str, threads: int, batch: int) -> Optional[Prediction]:
        """p50/p99 service time of one call running ``batch`` items of ``op``, or None
        if the profile has nothing to predict from."""
        key = (op, variant, precision, threads, batch)
        hit = self._memo.get(key, self)
        if hit is not self:
            return hit
        if isinstance(op, Model) or len(op.parts()) > 1:
            pred = None
            s50 = s99 = 0.0
            for part in op.parts():
                pp = self._part_precision(part, variant, precision, threads)
                r = None if pp is None else self._predict_leaf(part, variant, pp, threads, batch)
                if r is None:
                    break
                s50 += r.p50_ms
                s99 += r.p99_ms
            else:
                pred = Prediction(s50, s99, "sum")
        else:
            pp = op.precision or precision
            pred = self._predict_leaf(op, variant, pp, threads, batch)
        if len(self._memo) > 200_000:
            self._memo.clear()
        self._memo[key] = pred
        return pred

    def _curve_scale(self, shapes, variant, precision, threads, units: int) -> float:
        """measured / fitted at ``units`` of the group's few measured shapes
        (geometric mean): with one or two shapes a new shape follows their
        measured curve over the batch (cache steps included), scaled by its
        share of the work."""
        logs = []
        for other in shapes:
            got = self._predict_leaf(other, variant, precision, threads, units)
            fit = self.fitted_p50(other, variant, precision, threads, units)
            if got is not None and fit:
                logs.append(math.log(got.p50_ms / fit))
        return math.exp(sum(logs) / len(logs)) if logs else 1.0

    def _predict_leaf(self, op: Op, variant, precision, threads, batch) -> Optional[Prediction]:
        base = op.base()
        u = op.units(batch)
        if (base.kind, variant, precision, threads) not in self._fits:
            return None
        tab = self._tables.get((base.key, variant, precision, threads))
        if tab is None:
            p50 = self.fitted_p50(base, variant, precision, threads, u)
            shapes = self._fits[(base.kind, variant, precision, threads)].shapes
            if shapes:
                p50 *= self._curve_scale(shapes, variant, precision, threads, u)
            return Prediction(p50, p50 * self._tail(base.kind, variant, precision, threads, p50),
                              "fitted")
        bs, p50s, ratios = tab
        i = int(np.searchsorted(bs, u))
        if i < len(bs) and bs[i] == u:
            return Prediction(float(p50s[i]), float(p50s[i] * ratios[i]), "measured")
        if 0 < i < len(bs):
            # Linear in the fitted model's time between the two buckets: exact on
            # the buckets, monotone, and any tile step the fit knows of falls
            # where the tiles say, not spread evenly over the interval.
            b0, b1 = bs[i - 1], bs[i]
            f = (u - b0) / (b1 - b0)
            g0 = self.fitted_p50(base, variant, precision, threads, int(b0))
            g1 = self.fitted_p50(base, variant, precision, threads, int(b1))
            if g1 > g0:
                gu = self.fitted_p50(base, variant, precision, threads, u)
                f = min(1.0, max(0.0, (gu - g0) / (g1 - g0)))
            p50 = float(p50s[i - 1] + f * (p50s[i] - p50s[i - 1]))
            r = float(ratios[i - 1] + f * (ratios[i] - ratios[i - 1]))
            return Prediction(p50, p50 * r, "interpolated")
        j = 0 if i == 0 else len(bs) - 1
        edge = int(bs[j])
        fe = self.fitted_p50(base, variant, precision, threads, edge)
        fu = self.fitted_p50(base, variant, precision, threads, u)
        scale = fu / fe if fe and fu else u / edge
        p50 = float(p50s[j] * scale)
        return Prediction(p50, p50 * float(ratios[j]), "extrapolated")


# ---------------------------------------------------------------------------
# Prediction error on held-out shapes
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorRow:
    op: str
    variant: str
    precision: str
    threads: int
    batch: int
    measured_p50_ms: float
    predicted_p50_ms: float
    measured_p99_ms: float
    predicted_p99_ms: float
    source: str

    @property
    def abs_error(self) -> float:
        return abs(self.predicted_p50_ms - self.measured_p50_ms) / self.measured_p50_ms

    @property
    def abs_error_p99(self) -> float:
        return abs(self.predicted_p99_ms - self.measured_p99_ms) / self.measured_p99_ms


@dataclass(frozen=True)
class ErrorReport:
    """Relative prediction error |predicted - measured| / measured over cells."""

    rows: Tuple[ErrorRow, ...]
    skipped: int = 0

    @property
    def n(self) -> int:
        return len(self.rows)

    def _q(self, q, p99=False) -> float:
        if not self.rows:
            return math.nan
        e = [r.abs_error_p99 if p99 else r.abs_error for r in self.rows]
        return float(np.percentile(e, q))

    @property
    def median(self) -> float:
        return self._q(50)

    @property
    def p90(self) -> float:
        return self._q(90)

    @property
    def max(self) -> float:
        return self._q(100)

    @property
    def median_p99(self) -> float:
        return self._q(50, p99=True)

    @property
    def p90_p99(self) -> float:
        return self._q(90, p99=True)

    def by(self, *fields: str) -> Dict[tuple, "ErrorReport"]:
        """Split by row fields, e.g. ``by("variant", "threads")``."""
        out: Dict[tuple, list] = {}
        for r in self.rows:
            out.setdefault(tuple(getattr(r, f) for f in fields), []).append(r)
        return {k: ErrorReport(tuple(v)) for k, v in sorted(out.items())}

    def by_source(self) -> Dict[str, "ErrorReport"]:
        return {k[0]: v for k, v in self.by("source").items()}

    def summary(self) -> str:
        if not self.rows:
            return "no held-out cells could be predicted"
        lines = [f"{self.n} cells: p50 error median {self.median:.1%}, p90 {self.p90:.1%}, "
                 f"max {self.max:.1%}; p99 error median {self.median_p99:.1%}, p90 {self.p90_p99:.1%}"]
        for src, rep in self.by_source().items():
            lines.append(f"  {src:>12}: {rep.n} cells, p50 error median {rep.median:.1%}, "
                         f"p90 {rep.p90:.1%}")
        for (v, p, t), rep in self.by("variant", "precision", "threads").items():
            lines.append(f"  {v:>10}/{p}/t={t}: {rep.n} cells, p50 error median {rep.median:.1%}, "
                         f"p90 {rep.p90:.1%}")
        if self.skipped:
            lines.append(f"  ({self.skipped} cells had no prediction: kernel group not in the profile)")
        return "\n".join(lines)

    __str__ = summary


def heldout_error(train: Profile, heldout: Profile) -> ErrorReport:
    """Error of predictions from ``train`` on the cells of ``heldout`` (measured
    separately, e.g. ``Profile.calibrate(heldout=True)``: shapes and batches the
    training profile does not contain)."""
    rows, skipped = _error_rows(CostModel(train), heldout, heldout.measurements)
    return ErrorReport(tuple(rows), skipped)


def _error_rows(model: "CostModel", profile: Profile, measurements) -> Tuple[List["ErrorRow"], int]:
    """(rows of measured vs predicted, count the model could not predict)."""
    rows, skipped = [], 0
    for m in measurements:
        pred = model.predict(profile.ops[m.op], m.variant, m.precision, m.threads, m.batch)
        if pred is None:
            skipped += 1
            continue
        rows.append(ErrorRow(m.op, m.variant, m.precision, m.threads, m.batch, m.p50_ms,
                             pred.p50_ms, m.p99_ms, pred.p99_ms, pred.source))
    return rows, skipped


def cross_validate(profile: Profile) -> ErrorReport:
    """Leave-one-shape-out: each measured shape is predicted by a model fitted
    on the other shapes of the profile (its cells are then all "fitted")."""
    rows, skipped = [], 0
    for key in sorted(profile.ops):
        kind = profile.ops[key].kind
        if sum(1 for o in profile.ops.values() if o.kind == kind) < 2:
            continue
        r, s = _error_rows(CostModel(profile, exclude_ops=(key,)), profile,
                           [m for m in profile.measurements if m.op == key])
        rows += r
        skipped += s
    return ErrorReport(tuple(rows), skipped)


__all__ = ["CostModel", "ErrorReport", "ErrorRow", "FEATURES", "Prediction", "cross_validate",
           "heldout_error"]
