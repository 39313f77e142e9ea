# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython twin of ``pykernels.policy.scan`` (``PyCells`` / ``py_scan``): the
same contract, the same floating-point operations in the same order (see
``policy/scan.py``). ``Cells`` copies a table once into C arrays, so a scan
converts no buffers: a decision costs about a microsecond."""
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport INFINITY, NAN, ceil, floor, log

cdef enum:
    FAIL_RHO = 1
    FAIL_P99 = 2
    FAIL_P50 = 4
    FAIL_TP = 8
    MODE_P99 = 0
    MODE_P50 = 1


cdef inline double _max(double a, double b) noexcept nogil:
    # Python's max(a, b) returns a unless b > a
    return b if b > a else a


cdef double *_doubles(values, Py_ssize_t n) except NULL:
    cdef double *p = <double *>PyMem_Malloc((n if n else 1) * sizeof(double))
    cdef Py_ssize_t i
    if p == NULL:
        raise MemoryError()
    for i in range(n):
        p[i] = values[i]
    return p


cdef long *_longs(values, Py_ssize_t n) except NULL:
    cdef long *p = <long *>PyMem_Malloc((n if n else 1) * sizeof(long))
    cdef Py_ssize_t i
    if p == NULL:
        raise MemoryError()
    for i in range(n):
        p[i] = values[i]
    return p


cdef class Cells:
    """A table's cells for ``scan`` (C arrays, plus scratch for the results)."""

    cdef Py_ssize_t n, ng
    cdef double *b
    cdef double *s50
    cdef double *s99
    cdef double *cs2
    cdef double *tp
    cdef long *grp
    cdef long *k1
    cdef long *k2
    cdef long *gfail
    cdef double *p50o
    cdef double *p99o
    cdef double *rhoo
    cdef double *waito
    cdef long *failo
    cdef long *best
    cdef long *order

    def __cinit__(self, b, s50, s99, cs2, tp, grp, k1, k2, gfail):
        cdef Py_ssize_t n = len(b), ng = len(k1), j
        if (len(s50) != n or len(s99) != n or len(cs2) != n or len(tp) != n or len(grp) != n
                or len(k2) != ng or len(gfail) != ng):
            raise ValueError("make_cells: inconsistent array lengths or group index")
        self.n = n
        self.ng = ng
        self.b = _doubles(b, n)
        self.s50 = _doubles(s50, n)
        self.s99 = _doubles(s99, n)
        self.cs2 = _doubles(cs2, n)
        self.tp = _doubles(tp, n)
        self.grp = _longs(grp, n)
        self.k1 = _longs(k1, ng)
        self.k2 = _longs(k2, ng)
        self.gfail = _longs(gfail, ng)
        for j in range(n):
            if self.grp[j] < 0 or self.grp[j] >= ng:
                raise ValueError("make_cells: inconsistent array lengths or group index")
        self.p50o = _doubles([0.0] * n, n)
        self.p99o = _doubles([0.0] * n, n)
        self.rhoo = _doubles([0.0] * n, n)
        self.waito = _doubles([0.0] * n, n)
        self.failo = _longs([0] * n, n)
        self.best = _longs([0] * ng, ng)
        self.order = _longs([0] * ng, ng)

    def __dealloc__(self):
        PyMem_Free(self.b)
        PyMem_Free(self.s50)
        PyMem_Free(self.s99)
        PyMem_Free(self.cs2)
        PyMem_Free(self.tp)
        PyMem_Free(self.grp)
        PyMem_Free(self.k1)
        PyMem_Free(self.k2)
        PyMem_Free(self.gfail)
        PyMem_Free(self.p50o)
        PyMem_Free(self.p99o)
        PyMem_Free(self.rhoo)
        PyMem_Free(self.waito)
        PyMem_Free(self.failo)
        PyMem_Free(self.best)
        PyMem_Free(self.order)

    def __len__(self):
        return self.n


cdef inline bint _tie_less(Cells c, Py_ssize_t i, Py_ssize_t j) noexcept:
    if c.p99o[i] != c.p99o[j]:
        return c.p99o[i] < c.p99o[j]
    cdef long gi = c.grp[i], gj = c.grp[j]
    if c.k1[gi] != c.k1[gj]:
        return c.k1[gi] < c.k1[gj]
    if c.b[i] != c.b[j]:
        return c.b[i] < c.b[j]
    return c.k2[gi] < c.k2[gj]


cdef inline bint _rank_less(Cells c, long nfeas, long mode, Py_ssize_t i, Py_ssize_t j) noexcept:
    cdef bint fi, fj
    cdef long first
    if nfeas:
        fi = c.failo[i] == 0
        fj = c.failo[j] == 0
        if fi != fj:
            return fi
        if fi:
            if c.tp[i] != c.tp[j]:
                return c.tp[i] > c.tp[j]
            return _tie_less(c, i, j)
        first = MODE_P99
    else:
        first = mode
    if first == MODE_P99:
        if c.p99o[i] != c.p99o[j]:
            return c.p99o[i] < c.p99o[j]
    elif first == MODE_P50:
        if c.p50o[i] != c.p50o[j]:
            return c.p50o[i] < c.p50o[j]
    if c.tp[i] != c.tp[j]:
        return c.tp[i] > c.tp[j]
    return _tie_less(c, i, j)


def scan(Cells c not None, double lam, double queued, double p99_budget, double p50_budget,
         double min_tp, double rho_max, double tol, long mode):
    cdef Py_ssize_t n = c.n, ng = c.ng, j, i, g, m = 0, chosen = -1, cg
    cdef long nfeas = 0, f
    cdef double best_tp = -INFINITY, bj, a50, a99, rho, wait, drain, p50, p99
    cdef double wmean, wq99, wq50, q99, q50, nb, thr
    for j in range(n):
        bj = c.b[j]
        a50 = c.s50[j]
        a99 = c.s99[j]
        f = c.gfail[c.grp[j]]
        if lam > 0.0:
            rho = lam / c.tp[j]
            wait = _max(0.0, (bj - _max(queued, 1.0)) / lam * 1e3 - a50)
            drain = floor(_max(queued - 1.0, 0.0) / bj) * a50
            if rho >= 1.0:
                p50 = INFINITY
                p99 = INFINITY
            else:
                wmean = a50 * rho / (1.0 - rho) * (1.0 / bj + c.cs2[j]) / 2.0
                wq99 = wmean / rho * _max(0.0, log(100.0 * rho))
                wq50 = wmean / rho * _max(0.0, log(2.0 * rho))
                q99 = a50 * _max(0.0, 1.0 - 0.01 / rho) + rho * wq99
                q50 = a50 * _max(0.0, 1.0 - 0.5 / rho) + rho * wq50
                p99 = drain + _max(wait, q99) + a99
                p50 = drain + _max(wait / 2.0, q50) + a50
            if rho > rho_max:
                f |= FAIL_RHO
        else:
            rho = NAN
            wait = 0.0
            nb = ceil(_max(queued, 1.0) / bj)
            p99 = (nb - 1.0) * a50 + a99
            p50 = (ceil(nb / 2.0) - 1.0) * a50 + a50
        if not p99 <= p99_budget:
            f |= FAIL_P99
        if not p50 <= p50_budget:
            f |= FAIL_P50
        if c.tp[j] < min_tp:
            f |= FAIL_TP
        c.p50o[j] = p50
        c.p99o[j] = p99
        c.rhoo[j] = rho
        c.waito[j] = wait
        c.failo[j] = f
        if f == 0:
            nfeas += 1
            if c.tp[j] > best_tp:
                best_tp = c.tp[j]
    if n == 0:
        return 0, []
    if nfeas:
        thr = best_tp * (1.0 - tol)
        for j in range(n):
            if c.failo[j] == 0 and c.tp[j] >= thr and (chosen < 0 or _tie_less(c, j, chosen)):
                chosen = j
    else:
        for j in range(n):
            if chosen < 0 or _rank_less(c, nfeas, mode, j, chosen):
                chosen = j
    for g in range(ng):
        c.best[g] = -1
    for j in range(n):
        g = c.grp[j]
        if c.best[g] < 0 or _rank_less(c, nfeas, mode, j, c.best[g]):
            c.best[g] = j
    cg = c.grp[chosen]
    for g in range(ng):
        j = c.best[g]
        if j < 0 or g == cg:
            continue
        i = m
        while i > 0 and _rank_less(c, nfeas, mode, j, c.order[i - 1]):
            c.order[i] = c.order[i - 1]
            i -= 1
        c.order[i] = j
        m += 1
    picks = [(chosen, c.p50o[chosen], c.p99o[chosen], c.rhoo[chosen], c.waito[chosen],
              c.failo[chosen])]
    for i in range(m):
        j = c.order[i]
        picks.append((j, c.p50o[j], c.p99o[j], c.rhoo[j], c.waito[j], c.failo[j]))
    return nfeas, picks
