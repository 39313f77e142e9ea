"""A DDSketch-style quantile sketch: log-spaced buckets, bounded relative error.

Two implementations with one API and one bucket math: ``PyQuantileSketch``
(this file, pure Python: the twin and the fallback) and the Cython
``pykernels.policy._sketch.QuantileSketch`` (``policy/_sketch.pyx``, built by
setup.py). ``QuantileSketch`` is the compiled one when its extension module
imports, else the twin (``IMPLEMENTATION`` says which). Both must agree bucket
for bucket and quantile for quantile; ``tests/test_policy_sketch.py`` checks it
on random streams with edge values.

Bucket math. Every value ``x > min_value`` goes to bucket
``i = ceil(log(x) * (1 / log(gamma)))`` with ``gamma = (1 + a) / (1 - a)``
(``log`` is the C library's, as ``math.log`` calls it, so both implementations
compute the same index); bucket ``(gamma**(i-1), gamma**i]`` is represented by
``2 * gamma**i / (gamma + 1)``, within a relative error ``a`` of every value in
it. So ``quantile(q)`` returns a value within ``a`` (relative) of the exact
order statistic of rank ``floor(q * (n - 1))`` (NumPy's
``percentile(..., method="lower")``), for every q and any data, unlike t-digest,
which has no worst-case bound (Masson, Rim and Lee, "DDSketch", VLDB 2019). The
representative is clamped to the observed [min, max].

Defined behaviour at the edges:

* ``0 <= x <= min_value`` (zero, denormals, anything below 1e-9 by default):
  counted in a zero bucket and reported as 0.0.
* any finite ``x`` up to the largest double: its bucket (index <= ~35,500 at
  a = 1%).
* NaN, negative values and +-inf: ``ValueError`` (latencies and sizes only);
  nothing is recorded.
* ``count`` is an int >= 0 (0 records nothing); ``quantile`` of an empty
  sketch is None.

Memory: the twin keeps a dict entry per occupied bucket; the Cython sketch a
dense array over [lowest, highest] occupied index (8 bytes a bucket). With
a = 1% a bucket spans 2%, so values from 1 us to 1000 s (latencies in seconds)
span ~1040 buckets whatever the number of records.

Threads: the Cython ``add`` is a few C statements that never release the GIL,
so concurrent ``add`` calls lose nothing; the twin's ``add`` is not atomic.
``Policy.observe`` and the serving metrics record under their own locks either
way.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, Iterable, Optional, Tuple


def _check_accuracy(relative_accuracy, min_value) -> Tuple[float, float]:
    a = float(relative_accuracy)
    if not 0.0 < a < 1.0:
        raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
    mv = float(min_value)
    if not (mv > 0 and math.isfinite(mv)):
        raise ValueError(f"min_value must be a finite number > 0, got {min_value!r}")
    return a, mv


class PyQuantileSketch:
    """Quantiles with relative error at most ``relative_accuracy`` (pure Python).

    >>> s = PyQuantileSketch(0.01)
    >>> for x in range(1, 1001): s.add(x)
    >>> abs(s.quantile(0.99) - 990) <= 0.01 * 990
    True
    """

    __slots__ = ("relative_accuracy", "min_value", "_gamma", "_inv_log_gamma", "_buckets",
                 "_zero", "count", "sum", "min", "max")

    def __init__(self, relative_accuracy: float = 0.01, *, min_value: float = 1e-9):
        a, mv = _check_accuracy(relative_accuracy, min_value)
        self.relative_accuracy = a
        self.min_value = mv
        self._gamma = (1.0 + a) / (1.0 - a)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._buckets: Dict[int, int] = {}
        self._zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: float, count: int = 1) -> None:
        """Record ``count`` occurrences of ``x`` (finite, >= 0)."""
        x = float(x)
        if not 0.0 <= x < math.inf:  # also catches NaN
            raise ValueError(f"QuantileSketch records finite values >= 0, got {x!r}")
        if type(count) is not int:
            count = operator.index(count)  # NumPy ints too; a float is a TypeError
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

    def bucket_counts(self) -> Dict[int, int]:
        """{bucket index: count} of the occupied buckets (the zero bucket not included)."""
        return {i: c for i, c in sorted(self._buckets.items()) if c}

    @property
    def zero_count(self) -> int:
        """Records at or below ``min_value`` (reported as 0)."""
        return self._zero

    def merge(self, other) -> None:
        """Add every record of ``other`` (either implementation, same accuracy
        and min_value) to this sketch."""
        _check_mergeable(self, other)
        if other.count == 0:
            return
        for i, c in other.bucket_counts().items():
            self._buckets[i] = self._buckets.get(i, 0) + c
        self._zero += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value(self, i: int) -> float:
        g = self._gamma
        try:
            v = 2.0 * g ** i / (g + 1.0)
        except OverflowError:  # near the largest double; C's pow gives inf, clamped to max
            v = math.inf
        return min(max(v, self.min), self.max)

    def quantile(self, q: float) -> Optional[float]:
        """The q-quantile (0 <= q <= 1) within the relative error; None when empty."""
        q = float(q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return None
        rank = math.floor(q * (self.count - 1))
        if rank < self._zero:
            return 0.0
        seen = self._zero
        for i in sorted(self._buckets):
            seen += self._buckets[i]
            if seen > rank:
                return self._value(i)
        return self.max  # unreachable unless counts were corrupted

    def quantiles(self, qs: Iterable[float]) -> Dict[float, Optional[float]]:
        """Several quantiles (one pass over the buckets), keyed by q."""
        qs = sorted(set(float(q) for q in qs))
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return {q: None for q in qs}
        out: Dict[float, Optional[float]] = {}
        keys = sorted(self._buckets)
        seen, k = self._zero, 0
        for q in qs:
            rank = math.floor(q * (self.count - 1))
            if rank < self._zero:
                out[q] = 0.0
                continue
            while seen <= rank and k < len(keys):
                seen += self._buckets[keys[k]]
                k += 1
            out[q] = self._value(keys[k - 1]) if k else self.max
        return out

    @property
    def mean(self) -> Optional[float]:
        return self.sum / self.count if self.count else None

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(relative_accuracy={self.relative_accuracy}, "
                f"count={self.count}, buckets={len(self._buckets)})")


def _check_mergeable(a, b) -> None:
    if not hasattr(b, "bucket_counts") or not hasattr(b, "relative_accuracy"):
        raise TypeError(f"can only merge a quantile sketch, got {type(b).__name__}")
    if b.relative_accuracy != a.relative_accuracy or b.min_value != a.min_value:
        raise ValueError("can only merge sketches with the same relative_accuracy and min_value "
                         f"({a.relative_accuracy}, {a.min_value} vs "
                         f"{b.relative_accuracy}, {b.min_value})")


try:
    from ._sketch import QuantileSketch as CQuantileSketch
except ImportError:  # not built (e.g. a source checkout without build_ext): the twin serves
    CQuantileSketch = None

QuantileSketch = CQuantileSketch if CQuantileSketch is not None else PyQuantileSketch
IMPLEMENTATION = "cython" if CQuantileSketch is not None else "python"

__all__ = ["CQuantileSketch", "IMPLEMENTATION", "PyQuantileSketch", "QuantileSketch"]
