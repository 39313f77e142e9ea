# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython twin of ``pykernels.policy.sketch.PyQuantileSketch``: the same API,
the same bucket math (``ceil(log(x) * (1 / log(gamma)))`` with the C library's
``log``, representative ``2 * gamma**i / (gamma + 1)`` clamped to [min, max]),
the same edge behaviour; see ``policy/sketch.py`` for the method and the
contract. Buckets live in a dense array of counts over the occupied index
range, grown (doubling) when a record lands outside it.

``add`` runs as C statements without releasing the GIL, so concurrent calls
from Python threads never lose a count.
"""
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport ceil, floor, log, pow, INFINITY
from libc.string cimport memcpy, memset

import operator


cdef class QuantileSketch:
    """Quantiles with relative error at most ``relative_accuracy`` (Cython)."""

    cdef readonly double relative_accuracy
    cdef readonly double min_value
    cdef readonly long long count
    cdef readonly double sum
    cdef readonly double min
    cdef readonly double max
    cdef double _gamma
    cdef double _inv_log_gamma
    cdef long long _zero
    cdef long long *_counts   # _counts[j] counts bucket _offset + j
    cdef Py_ssize_t _offset
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _lo       # lowest / highest occupied index (valid when _lo <= _hi)
    cdef Py_ssize_t _hi

    def __cinit__(self, relative_accuracy=0.01, *, min_value=1e-9):
        cdef double a = float(relative_accuracy)
        if not (0.0 < a < 1.0):
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        cdef double mv = float(min_value)
        if not (mv > 0 and mv < INFINITY):
            raise ValueError(f"min_value must be a finite number > 0, got {min_value!r}")
        self.relative_accuracy = a
        self.min_value = mv
        self._gamma = (1.0 + a) / (1.0 - a)
        self._inv_log_gamma = 1.0 / log(self._gamma)
        self._zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = INFINITY
        self.max = -INFINITY
        self._counts = NULL
        self._offset = 0
        self._cap = 0
        self._lo = 1
        self._hi = 0

    def __dealloc__(self):
        PyMem_Free(self._counts)

    cdef int _grow(self, Py_ssize_t i) except -1:
        """Make index i addressable, keeping every count: a new array twice the
        occupied span (at least 128 buckets), centred on it."""
        cdef Py_ssize_t lo = i, hi = i, cap = 128, off
        cdef long long *new
        if self._lo <= self._hi:
            lo = i if i < self._lo else self._lo
            hi = i if i > self._hi else self._hi
        while cap < 2 * (hi - lo + 1):
            cap *= 2
        off = lo - (cap - (hi - lo + 1)) // 2
        new = <long long *>PyMem_Malloc(cap * sizeof(long long))
        if new == NULL:
            raise MemoryError()
        memset(new, 0, cap * sizeof(long long))
        if self._lo <= self._hi:
            memcpy(new + (self._lo - off), self._counts + (self._lo - self._offset),
                   (self._hi - self._lo + 1) * sizeof(long long))
        PyMem_Free(self._counts)
        self._counts = new
        self._offset = off
        self._cap = cap
        return 0

    cdef inline int _add_to_bucket(self, Py_ssize_t i, long long count) except -1:
        """Adds count to bucket i, growing the array and the occupied range."""
        if i < self._offset or i >= self._offset + self._cap:
            self._grow(i)
        self._counts[i - self._offset] += count
        if self._lo > self._hi:
            self._lo = i
            self._hi = i
        elif i < self._lo:
            self._lo = i
        elif i > self._hi:
            self._hi = i
        return 0

    cdef inline int _record(self, double x, long long count) except -1:
        cdef Py_ssize_t i
        if x <= self.min_value:
            self._zero += count
        else:
            self._add_to_bucket(<Py_ssize_t>ceil(log(x) * self._inv_log_gamma), count)
        self.count += count
        self.sum += x * <double>count
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x
        return 0

    def add(self, double x, count=1):
        """Record ``count`` occurrences of ``x`` (finite, >= 0)."""
        cdef long long c
        if not (0.0 <= x < INFINITY):  # NaN too
            raise ValueError(f"QuantileSketch records finite values >= 0, got {x!r}")
        if type(count) is not int:
            count = operator.index(count)  # NumPy ints too; a float is a TypeError
        c = count
        if c <= 0:
            if c == 0:
                return
            raise ValueError(f"count must be >= 0, got {count!r}")
        self._record(x, c)

    def extend(self, values):
        for x in values:
            self.add(x)

    def bucket_counts(self):
        """{bucket index: count} of the occupied buckets (the zero bucket not included)."""
        cdef Py_ssize_t i
        out = {}
        for i in range(self._lo, self._hi + 1):
            if self._counts[i - self._offset]:
                out[i] = self._counts[i - self._offset]
        return out

    @property
    def zero_count(self):
        """Records at or below ``min_value`` (reported as 0)."""
        return self._zero

    def merge(self, other):
        """Add every record of ``other`` (either implementation, same accuracy
        and min_value) to this sketch."""
        from .sketch import _check_mergeable
        _check_mergeable(self, other)
        if other.count == 0:
            return
        cdef long long c
        for i, n in other.bucket_counts().items():
            c = n
            self._add_to_bucket(i, c)
        self._zero += other.zero_count
        self.count += other.count
        self.sum += other.sum
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max

    cdef double _value(self, Py_ssize_t i):
        cdef double g = self._gamma
        cdef double v = 2.0 * pow(g, <double>i) / (g + 1.0)
        if v < self.min:
            v = self.min
        if v > self.max:
            v = self.max
        return v

    def quantile(self, double q):
        """The q-quantile (0 <= q <= 1) within the relative error; None when empty."""
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return None
        cdef long long rank = <long long>floor(q * <double>(self.count - 1))
        if rank < self._zero:
            return 0.0
        cdef long long seen = self._zero
        cdef Py_ssize_t i
        for i in range(self._lo, self._hi + 1):
            seen += self._counts[i - self._offset]
            if seen > rank:
                return self._value(i)
        return self.max

    def quantiles(self, qs):
        """Several quantiles (one pass over the buckets), keyed by q."""
        qs = sorted(set(float(q) for q in qs))
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return {q: None for q in qs}
        out = {}
        cdef long long seen = self._zero, rank
        cdef Py_ssize_t i = self._lo, last = self._lo - 1
        cdef double dq
        for q in qs:
            dq = q
            rank = <long long>floor(dq * <double>(self.count - 1))
            if rank < self._zero:
                out[q] = 0.0
                continue
            while seen <= rank and i <= self._hi:
                if self._counts[i - self._offset]:
                    seen += self._counts[i - self._offset]
                    last = i
                i += 1
            out[q] = self._value(last) if last >= self._lo else self.max
        return out

    @property
    def mean(self):
        return self.sum / self.count if self.count else None

    def __len__(self):
        return self.count

    def __repr__(self):
        return (f"{type(self).__name__}(relative_accuracy={self.relative_accuracy}, "
                f"count={self.count}, buckets={len(self.bucket_counts())})")
