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
# Codes understood by the binding; _AUTO lets C++ pick by size (no policy).
_AUTO = 2
_VARIANT_CODE = {"latency": 0, "throughput": 1, "auto": _AUTO}

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


def policy_variant(op: str, m: int, k: int, n: int, precision: str) -> int:
    """Variant code from the active policy, or _AUTO (size heuristic in C++)."""
    chooser = _active_chooser
    if chooser is None:
        return _AUTO
    choice = chooser(op, m, k, n, precision)
    return _AUTO if choice is None else _VARIANT_CODE[choice]


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

    a: (M, K) float32, any strides (C or Fortran order, transposed, sliced,
    negative or zero strides). b: (K, N) float32 or a PackedWeight.
    out: (M, N) float32 with unit stride along its last axis, or None (a new
    array; ``beta`` then has nothing to scale). An ``out`` that overlaps an
    input is handled as NumPy does. Returns the result.

    Shape, dtype and ``out`` checks run in the C++ binding (they cost ~2 us in
    Python, more than a 32x32x32 product); their messages follow the SPEC.
    """
    code = _VARIANT_CODE.get(variant)
    if code is None:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if code == _AUTO and _active_chooser is not None:
        code = _auto_variant(a, b)
    if threads is not None:
        threads = _check_threads(threads)
    else:
        threads = 0
    if type(b) is PackedWeight:
        if b.precision != "fp32":
            raise ValueError(f"gemm takes an fp32 PackedWeight, got {b.precision!r}; use linear()")
        k, n = b.shape
        res = _core.gemm_f32(a, None, b._data, k, n, out, alpha, beta, code, threads)
    else:
        res = _core.gemm_f32(a, b, None, 0, 0, out, alpha, beta, code, threads)
    if res is None:  # out overlaps a or b: compute into a copy, then write back
        tmp = out.copy()
        gemm(a, b, out=tmp, alpha=alpha, beta=beta, variant=variant,
             threads=None if threads == 0 else threads)
        out[...] = tmp
        return out
    return res


def _check_threads(threads) -> int:
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    return threads


def _auto_variant(a, b) -> int:
    shape_a = getattr(a, "shape", None)
    shape_b = b.shape if type(b) is PackedWeight else getattr(b, "shape", None)
    if not shape_a or len(shape_a) != 2 or not shape_b or len(shape_b) != 2:
        return _AUTO  # the binding raises the precise error
    precision = b.precision if type(b) is PackedWeight else "fp32"
    return policy_variant("gemm", shape_a[0], shape_a[1], shape_b[1], precision)


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
