"""A DDSketch-style quantile sketch: log-spaced buckets, bounded relative error.

Every positive value ``x`` goes to bucket ``i = ceil(log(x) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)``; the bucket ``(gamma**(i-1), gamma**i]`` is
represented by ``2 * gamma**i / (gamma + 1)``, which is within a relative
error ``a`` of every value in it. So ``quantile(q)`` returns a value within
``a`` (relative) of the exact order statistic of rank ``floor(q * (n - 1))``
(NumPy's ``percentile(..., method="lower")``), for every q and any data,
unlike t-digest, which has no worst-case bound (Masson, Rim and Lee, "DDSketch",
VLDB 2019).

Memory: one dict entry per occupied bucket. With a = 1% a bucket spans 2%, so
values from 1 us to 1000 s (latencies) occupy at most ~1040 buckets whatever
the number of records. Values ``<= min_value`` (zero included) are counted in
a zero bucket and reported as 0. Negative values are rejected (latencies and
sizes only).

Cost: ``add`` is one ``math.log``, a ceil and a dict update: 1.05 us per record
measured once on this machine (pure CPython 3.11, 2 vCPU Xeon shared at a load
of ~4.4, best of 7 runs of 10k records), within the 0.2-1.8 us that pure-Python
sketches cost here; ``quantiles()`` of three q over 310 buckets: ~80 us;
``add(x, count=n)`` records n equal values (a batch's service time) for the
price of one. Not thread-safe by itself: the batcher records under its lock.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional


class QuantileSketch:
    """Quantiles with relative error at most ``relative_accuracy``.

    >>> s = QuantileSketch(0.01)
    >>> for x in range(1, 1001): s.add(x)
    >>> abs(s.quantile(0.99) - 990) <= 0.01 * 990
    True
    """

    __slots__ = ("relative_accuracy", "min_value", "_gamma", "_inv_log_gamma", "_buckets",
                 "_zero", "count", "sum", "min", "max")

    def __init__(self, relative_accuracy: float = 0.01, *, min_value: float = 1e-9):
        a = float(relative_accuracy)
        if not 0.0 < a < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        if not min_value > 0:
            raise ValueError(f"min_value must be > 0, got {min_value!r}")
        self.relative_accuracy = a
        self.min_value = float(min_value)
        self._gamma = (1.0 + a) / (1.0 - a)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._buckets: Dict[int, int] = {}
        self._zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: float, count: int = 1) -> None:
        """Record ``count`` occurrences of ``x`` (>= 0)."""
        if not x >= 0.0:  # also catches NaN
            raise ValueError(f"QuantileSketch records values >= 0, got {x!r}")
        if count <= 0:
            if count == 0:
                return
            raise ValueError(f"count must be >= 0, got {count!r}")
        if x <= self.min_value:
            self._zero += count
        else:
            i = math.ceil(math.log(x) * self._inv_log_gamma)
            b = self._buckets
            b[i] = b.get(i, 0) + count
        self.count += count
        self.sum += x * count
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x

    def extend(self, values: Iterable[float]) -> None:
        for x in values:
            self.add(x)

    def merge(self, other: "QuantileSketch") -> None:
        """Add every record of ``other`` (same relative accuracy) to this sketch."""
        if other._gamma != self._gamma:
            raise ValueError("can only merge sketches with the same relative_accuracy "
                             f"({self.relative_accuracy} vs {other.relative_accuracy})")
        for i, c in other._buckets.items():
            self._buckets[i] = self._buckets.get(i, 0) + c
        self._zero += other._zero
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> Optional[float]:
        """The q-quantile (0 <= q <= 1) within the relative error; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return None
        rank = math.floor(q * (self.count - 1))
        if rank < self._zero:
            return 0.0
        seen = self._zero
        g = self._gamma
        for i in sorted(self._buckets):
            seen += self._buckets[i]
            if seen > rank:
                v = 2.0 * g ** i / (g + 1.0)
                # the bucket's representative may stray outside the observed range
                return min(max(v, self.min), self.max)
        return self.max  # unreachable unless counts were corrupted

    def quantiles(self, qs: Iterable[float]) -> Dict[float, Optional[float]]:
        """Several quantiles in one pass over the buckets."""
        qs = sorted(set(float(q) for q in qs))
        out: Dict[float, Optional[float]] = {}
        if self.count == 0:
            return {q: None for q in qs}
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"q must be in [0, 1], got {q!r}")
        keys = sorted(self._buckets)
        g = self._gamma
        seen, k = self._zero, 0
        for q in qs:
            rank = math.floor(q * (self.count - 1))
            if rank < self._zero:
                out[q] = 0.0
                continue
            while seen <= rank and k < len(keys):
                seen += self._buckets[keys[k]]
                k += 1
            v = 2.0 * g ** keys[k - 1] / (g + 1.0) if k else self.max
            out[q] = min(max(v, self.min), self.max)
        return out

    @property
    def mean(self) -> Optional[float]:
        return self.sum / self.count if self.count else None

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"QuantileSketch(relative_accuracy={self.relative_accuracy}, count={self.count}, "
                f"buckets={len(self._buckets)})")
