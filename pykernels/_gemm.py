"""fp32 GEMM and weight packing: argument checks, then one call into C++.

Validation happens here, once; the C++ kernels trust their contract. The small
call path (32x32x32) is kept lean: identity checks on dtype objects, no
``np.asarray`` conversions, no copies.
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._runtime import get_num_threads

_F32 = np.dtype(np.float32)
PANEL_COLS = 16  # csrc/include/pykernels/gemm.h: kPanelCols

VARIANTS = ("auto", "latency", "throughput")
_VARIANT_CODE = {"latency": 0, "throughput": 1}

# Below this many multiply-adds a second thread costs more (fork/join ~1-5 us)
# than it saves; above it both cores share the call.
_PARALLEL_MIN_MACS = 64 * 64 * 64
# variant="auto" without a policy: the latency kernels (no packing of A, B
# streamed once) win up to this many rows; the blocked kernels beyond.
_LATENCY_MAX_ROWS = 32

# The policy engine installs a chooser here (``with policy.active():``). It is
# called as chooser(op, m, k, n, precision) for variant="auto" calls and returns
# a variant name ("latency" | "throughput") or None to fall back to the size
# heuristic. Kept as a plain module global: one attribute read per call.
_active_chooser = None


def _type_error(name: str, arr) -> TypeError:
    if not isinstance(arr, np.ndarray):
        return TypeError(
            f"{name} must be a numpy.ndarray of float32, got {type(arr).__name__}; "
            f"use np.asarray({name}, dtype=np.float32)"
        )
    return TypeError(
        f"{name} has dtype {arr.dtype}, expected float32; convert with "
        f"{name}.astype(np.float32)"
    )


def _check_matrix(name: str, arr) -> None:
    if type(arr) is not np.ndarray or arr.dtype is not _F32:
        if not isinstance(arr, np.ndarray) or arr.dtype != _F32:
            raise _type_error(name, arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")


def resolve_threads(threads, macs: int) -> int:
    if threads is None:
        return get_num_threads() if macs >= _PARALLEL_MIN_MACS else 1
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    return threads


def resolve_variant(variant, op: str, m: int, k: int, n: int, precision: str) -> int:
    """Variant code for the C++ side: 0 latency, 1 throughput."""
    code = _VARIANT_CODE.get(variant)
    if code is not None:
        return code
    if variant != "auto":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if _active_chooser is not None:
        choice = _active_chooser(op, m, k, n, precision)
        if choice is not None:
            return _VARIANT_CODE[choice]
    return 0 if m <= _LATENCY_MAX_ROWS else 1


class PackedWeight:
    """A weight matrix prepacked once for repeated ``x @ w``.

    ``shape`` is (K, N) whatever the layout it was packed from. The packed
    bytes are the same for both kernel variants and every ISA, so a
    PackedWeight made on one machine runs on any other.
    """

    __slots__ = ("shape", "precision", "rel_error", "_data", "__weakref__")

    def __init__(self, shape, precision, data, rel_error):
        self.shape = (int(shape[0]), int(shape[1]))
        self.precision = precision
        self._data = data
        self.rel_error = float(rel_error)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def __repr__(self) -> str:
        return (f"PackedWeight(shape={self.shape}, precision={self.precision!r}, "
                f"nbytes={self.nbytes}, rel_error={self.rel_error:.3g})")

    # Pickle (trusted, in-cluster transport). Validated on load so a truncated
    # or altered payload raises instead of feeding a kernel a short buffer.
    def __reduce__(self):
        return (_unpickle_packed, (1, self.shape, self.precision, self._data.tobytes(),
                                   self.rel_error))


def _unpickle_packed(version, shape, precision, payload, rel_error):
    if version != 1:
        raise ValueError(f"PackedWeight pickle version {version} is not supported")
    k, n = shape
    if precision != "fp32":
        raise ValueError(f"PackedWeight pickle has unknown precision {precision!r}")
    expected = -(-n // PANEL_COLS) * k * PANEL_COLS * 4
    if not isinstance(payload, bytes) or len(payload) != expected:
        raise ValueError(
            f"corrupted PackedWeight pickle: {len(payload)} payload bytes, "
            f"expected {expected} for shape {shape}")
    data = np.frombuffer(payload, dtype=_F32).reshape(-1, k, PANEL_COLS).copy()
    return PackedWeight(shape, precision, data, rel_error)


def pack(w, *, precision: str = "fp32", layout: str = "kn") -> PackedWeight:
    """Prepack a weight for ``x @ w``.

    w: (K, N) with ``layout="kn"`` or (N, K) with ``layout="nk"`` (as
    ``torch.nn.Linear.weight``); float32, any strides. The input is not modified.
    """
    if layout not in ("kn", "nk"):
        raise ValueError(f"layout must be 'kn' or 'nk', got {layout!r}")
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32', got {precision!r}")
    _check_matrix("w", w)
    wk = w if layout == "kn" else w.T
    k, n = wk.shape
    if k == 0 or n == 0:
        raise ValueError(f"cannot pack an empty weight of shape {w.shape}")
    data = np.empty((-(-n // PANEL_COLS), k, PANEL_COLS), dtype=_F32)
    _core.pack_f32(wk, data, get_num_threads())
    return PackedWeight((k, n), "fp32", data, 0.0)


def gemm(a, b, *, out=None, alpha: float = 1.0, beta: float = 0.0,
         variant: str = "auto", threads=None):
    """``out = alpha * a @ b + beta * out`` in float32.

    a: (M, K) float32, any strides. b: (K, N) float32 or a PackedWeight.
    out: (M, N) float32 with unit stride along its last axis, or None (a new
    array; ``beta`` then has nothing to scale). Returns ``out``.
    """
    _check_matrix("a", a)
    m, k = a.shape
    packed = None
    if type(b) is PackedWeight:
        if b.precision != "fp32":
            raise ValueError(f"gemm takes an fp32 PackedWeight, got {b.precision!r}; use linear()")
        packed = b._data
        kb, n = b.shape
        b_arr = None
    else:
        _check_matrix("b", b)
        kb, n = b.shape
        b_arr = b
    if kb != k:
        raise ValueError(f"shapes {a.shape} and {(kb, n)} are not aligned: "
                         f"a has {k} columns but b has {kb} rows")
    alpha = float(alpha)
    beta = float(beta)
    code = resolve_variant(variant, "gemm", m, k, n, "fp32")
    nthreads = resolve_threads(threads, m * n * k)
    target = None
    if out is None:
        out = np.empty((m, n), dtype=_F32)
        beta = 0.0
    else:
        _check_out(out, m, n)
        if (np.may_share_memory(out, a) or (b_arr is not None and np.may_share_memory(out, b_arr))):
            # NumPy semantics for overlapping out=: compute, then write back.
            target = out
            out = out.copy() if beta != 0.0 else np.empty((m, n), dtype=_F32)
    if m == 0 or n == 0:
        return out if target is None else target
    if k == 0:
        if beta == 0.0:
            out[...] = 0.0
        else:
            out *= beta
    else:
        _core.gemm_f32(a, b_arr, packed, out, alpha, beta, code, nthreads, None, 0)
    if target is not None:
        target[...] = out
        return target
    return out


def _check_out(out, m: int, n: int) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != _F32:
        raise ValueError(f"out must be a float32 numpy array of shape {(m, n)}, got "
                         f"{type(out).__name__ if not isinstance(out, np.ndarray) else out.dtype}")
    if out.shape != (m, n):
        raise ValueError(f"out has shape {out.shape}, expected {(m, n)}")
    if n > 1 and out.strides[1] != 4:
        raise ValueError("out must have unit stride along its last axis "
                         f"(strides {out.strides}); pass a C-contiguous array")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
