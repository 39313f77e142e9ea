"""GEMM, linear and weight packing: argument checks, then one call into C++.

Strings of the public API (variant, precision, activation) become the
binding's enums here, once; the array checks of the hot path run in C++. See
docs/kernels.md for the binding boundary and why the small-call path is kept
this way.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator

import numpy as np

from . import _chooser, _core, _interop
from ._chooser import KernelCall
from ._core import Activation, Precision, Variant
from ._runtime import _bf16 as _bf16_scheme, _resolve_bf16, get_num_threads

_F32 = np.dtype(np.float32)
_ND = np.ndarray  # `type(x) is _ND` first: the NumPy path pays one type test for interop
PANEL_COLS = _core.PANEL_COLS    # columns per packed panel
MAX_THREADS = _core.MAX_THREADS  # the thread pool's limit per call

# The public strings -> the binding's enums, by the enums' own names.
_VARIANT = dict(Variant.__members__)      # latency, throughput, auto
_PRECISION = dict(Precision.__members__)  # fp32, bf16, int8, int8_7bit
# activation=None is the public spelling of Activation.none
_ACTIVATION = {None: Activation.none,
               **{k: v for k, v in Activation.__members__.items() if v != Activation.none}}
VARIANTS = tuple(_VARIANT)
PRECISIONS = tuple(_PRECISION)
ACTIVATIONS = tuple(_ACTIVATION)
_AUTO = Variant.auto  # C++ picks by size (no policy)
# Compare members with `is`: they are singletons (from __members__), while a
# pybind11 enum's __eq__ is a call into C++ that costs ~0.3 us per call.


def _bad_choice(what: str, value, choices: tuple) -> ValueError:
    return ValueError(f"{what} must be one of {choices}, got {value!r}")


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


def policy_variant(call_fields: dict, threads: int):
    """(Variant, threads) for a variant="auto" call under the installed
    chooser (pykernels._chooser), given the call's KernelCall fields.
    ``threads``: the caller's count, 0 when it passed None; only then may the
    chooser's thread count replace it. Without a chooser, or when it has no
    answer: (_AUTO, threads), the size heuristic in C++."""
    chooser = _chooser.active
    if chooser is None:
        return _AUTO, threads
    variant, th = chooser(KernelCall(threads=threads or None, **call_fields))
    if threads == 0 and th is not None:
        threads = min(int(th), MAX_THREADS) if th >= 1 else 0
    return (_AUTO if variant is None else _VARIANT[variant]), threads


_SAVE_FORMAT = "pykernels.PackedWeight"
_SAVE_VERSION = 1

_PACKED_DTYPE = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16),
                 "int8": np.dtype(np.int8), "int8_7bit": np.dtype(np.int8)}
# The precisions stored as int8 panels with per-column scales: "int8" and
# "int8_7bit" (the same weights; activations quantized to 7 bits per call).
INT8_PRECISIONS = ("int8", "int8_7bit")


def _packed_shape(k: int, n: int, precision: str) -> tuple:
    # k-group of the packed layout: every precision stores 64 bytes per panel per group
    step = _core.k_step(_PRECISION[precision])
    k_padded = -(-k // step) * step
    return (-(-n // PANEL_COLS), k_padded * PANEL_COLS)


class PackedWeight:
    """A weight matrix prepacked once for repeated ``x @ w``.

    ``shape`` is (K, N) whatever the layout it was packed from; ``precision``
    is "fp32", "bf16", "int8" or "int8_7bit"; ``rel_error`` is the relative Frobenius
    error of the stored weight against the original. The packed bytes are the
    same for both kernel variants and every ISA, so a PackedWeight made on one
    machine runs on any other.

    Pickling is for trusted, in-cluster transport (pickle can execute code when
    loading untrusted data); the payload is validated on load, so a truncated
    or altered one raises ValueError instead of reaching a kernel.
    """

    __slots__ = ("_shape", "_precision", "_rel_error", "_data", "_scale", "_code", "__weakref__")

    def __init__(self, shape, precision, data, rel_error, scale=None):
        self._shape = (int(shape[0]), int(shape[1]))
        self._precision = precision
        self._code = _PRECISION[precision]  # the binding's Precision
        self._data = data
        self._scale = scale
        self._rel_error = float(rel_error)

    # Read-only: the kernels size their reads from these.
    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def rel_error(self) -> float:
        return self._rel_error

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes + (0 if self._scale is None else self._scale.nbytes))

    def __repr__(self) -> str:
        return (f"PackedWeight(shape={self.shape}, precision={self.precision!r}, "
                f"nbytes={self.nbytes}, rel_error={self.rel_error:.3g})")

    def with_precision(self, precision: str) -> "PackedWeight":
        """This weight under the other int8 precision ("int8" <-> "int8_7bit"),
        sharing the packed data and scales (no copy): the two differ only in
        how ``linear`` quantizes the activations. Returns self when
        ``precision`` is this weight's; any other change needs ``pack``."""
        if precision == self._precision:
            return self
        if self._precision not in INT8_PRECISIONS or precision not in INT8_PRECISIONS:
            raise ValueError(f"with_precision switches between {INT8_PRECISIONS} only; "
                             f"pack the weight again for {self._precision!r} -> {precision!r}")
        return PackedWeight(self._shape, precision, self._data, self._rel_error, self._scale)

    # ---- safe persistence ---------------------------------------------------
    def save(self, path) -> None:
        """Write to ``path`` as a NumPy ``.npz`` archive (no pickled objects):
        the packed data, the int8 scales, and a JSON header with format name,
        version, shape, precision, rel_error and a SHA-256 of the arrays.
        ``PackedWeight.load`` validates every field before use."""
        header = {"format": _SAVE_FORMAT, "version": _SAVE_VERSION, "shape": list(self._shape),
                  "precision": self._precision, "rel_error": self._rel_error,
                  "layout": f"panels{PANEL_COLS}", "sha256": self._digest()}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                  "data": self._data}
        if self._scale is not None:
            arrays["scale"] = self._scale
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "PackedWeight":
        """Read a file written by ``save``; ValueError if anything is off."""
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                if not {"header", "data"} <= files:
                    raise ValueError("missing arrays")
                header = json.loads(bytes(z["header"]).decode())
                data = z["data"]
                scale = z["scale"] if "scale" in files else None
        except (OSError, EOFError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a PackedWeight file ({e})") from None
        except (ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid PackedWeight file ({e})") from None
        except Exception as e:  # zipfile.BadZipFile and friends
            raise ValueError(f"{path}: not a valid PackedWeight file ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict) or header.get("format") != _SAVE_FORMAT:
            raise ValueError(f"{path}: not a PackedWeight file (format {header.get('format') if isinstance(header, dict) else None!r})")
        if header.get("version") != _SAVE_VERSION:
            raise ValueError(f"{path}: PackedWeight file version {header.get('version')!r} is not supported")
        if header.get("layout") != f"panels{PANEL_COLS}":
            raise ValueError(f"{path}: unknown packed layout {header.get('layout')!r}")
        precision = header.get("precision")
        shape = header.get("shape")
        # isinstance first: a JSON list or object is unhashable, and the dict
        # lookup would raise TypeError instead of the ValueError promised above.
        if not isinstance(precision, str) or precision not in _PRECISION:
            raise ValueError(f"{path}: unknown precision {precision!r}")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(type(v) is int and 0 < v < 2**40 for v in shape)):
            raise ValueError(f"{path}: bad shape {shape!r}")
        rel_error = header.get("rel_error")
        if not isinstance(rel_error, (int, float)) or not np.isfinite(rel_error) or rel_error < 0:
            raise ValueError(f"{path}: bad rel_error {rel_error!r}")
        k, n = shape
        if data.dtype != _PACKED_DTYPE[precision] or data.shape != _packed_shape(k, n, precision):
            raise ValueError(f"{path}: packed data {data.dtype}{data.shape} does not match "
                             f"{precision} shape {(k, n)}")
        if precision in INT8_PRECISIONS:
            if scale is None or scale.dtype != _F32 or scale.shape != (n,):
                raise ValueError(f"{path}: int8 scales missing or of the wrong shape")
            if not np.all(np.isfinite(scale)) or np.any(scale < 0):
                raise ValueError(f"{path}: int8 scales must be finite and >= 0")
        elif scale is not None:
            raise ValueError(f"{path}: unexpected scales for precision {precision!r}")
        pw = cls((k, n), precision, np.ascontiguousarray(data), rel_error,
                 None if scale is None else np.ascontiguousarray(scale))
        if header.get("sha256") != pw._digest():
            raise ValueError(f"{path}: checksum mismatch (the file is corrupted)")
        return pw

    def _digest(self) -> str:
        h = hashlib.sha256(self._data.tobytes())
        if self._scale is not None:
            h.update(self._scale.tobytes())
        return h.hexdigest()

    def __reduce__(self):
        scale = None if self._scale is None else self._scale.tobytes()
        return (_unpickle_packed, (2, self.shape, self.precision, self._data.tobytes(),
                                   self.rel_error, scale))


def _unpickle_packed(version, shape, precision, payload, rel_error, scale=None):
    # Every field is checked for type before use: a forged payload must raise
    # ValueError (the documented answer for a corrupted pickle), never the
    # TypeError / OverflowError that hashing a list or int(inf) would give.
    if type(version) is not int or version != 2:
        raise ValueError(f"PackedWeight pickle version {version!r} is not supported")
    if not isinstance(precision, str) or precision not in _PRECISION:
        raise ValueError(f"corrupted PackedWeight pickle: unknown precision {precision!r}")
    try:
        k, n = (operator.index(v) for v in shape)  # integers only: no int(1e300), int(inf)
    except (TypeError, ValueError):
        raise ValueError(f"corrupted PackedWeight pickle: bad shape {shape!r}") from None
    if k <= 0 or n <= 0 or k >= 2**40 or n >= 2**40:  # the bound PackedWeight.load uses
        raise ValueError(f"corrupted PackedWeight pickle: bad shape {shape!r}")
    # rel_error is NaN for a weight packed from non-finite values (see pack), so
    # NaN is legitimate here; a non-number or a negative value is not.
    if (isinstance(rel_error, bool) or not isinstance(rel_error, (int, float, np.floating))
            or rel_error < 0):
        raise ValueError(f"corrupted PackedWeight pickle: bad rel_error {rel_error!r}")
    dtype = _PACKED_DTYPE[precision]
    pshape = _packed_shape(k, n, precision)
    expected = pshape[0] * pshape[1] * dtype.itemsize
    if not isinstance(payload, bytes) or len(payload) != expected:
        got = len(payload) if isinstance(payload, bytes) else type(payload).__name__
        raise ValueError(f"corrupted PackedWeight pickle: {got} payload bytes, "
                         f"expected {expected} for {precision} shape {(k, n)}")
    data = np.frombuffer(payload, dtype=dtype).reshape(pshape).copy()
    scale_arr = None
    if precision in INT8_PRECISIONS:
        if not isinstance(scale, bytes) or len(scale) != 4 * n:
            raise ValueError("corrupted PackedWeight pickle: int8 scales missing or truncated")
        scale_arr = np.frombuffer(scale, dtype=_F32).copy()
        if not np.all(np.isfinite(scale_arr)) or np.any(scale_arr < 0):
            raise ValueError("corrupted PackedWeight pickle: int8 scales must be finite and >= 0")
    return PackedWeight((k, n), precision, data, rel_error, scale_arr)


def pack(w, *, precision: str = "fp32", layout: str = "kn") -> PackedWeight:
    """Prepack a weight for ``x @ w`` (``gemm``) or ``linear``.

    w: (K, N) with ``layout="kn"`` or (N, K) with ``layout="nk"`` (as
    ``torch.nn.Linear.weight``); float32, any strides; not modified.
    precision: "fp32" (exact copy), "bf16" (round to nearest even), "int8"
    (symmetric per output column: scale = max|w[:, n]| / 127; needs finite w)
    or "int8_7bit": the same int8 weights, with the activations quantized per
    row to 7 bits (|a| <= 63) at call time instead of 8 -- twice the
    activation rounding error, for about twice int8's speed on AVX2 CPUs
    without VNNI (the vpmaddubsw scheme); the same results, at int8's speed,
    elsewhere. ``PackedWeight.with_precision`` switches between the two
    without repacking.
    """
    if layout not in ("kn", "nk"):
        raise ValueError(f"layout must be 'kn' or 'nk', got {layout!r}")
    if not isinstance(precision, str) or precision not in _PRECISION:
        raise _bad_choice("precision", precision, PRECISIONS)
    if type(w) is not _ND:
        w, _ = _interop.to_numpy("w", w)
    _check_matrix("w", w)
    wk = w if layout == "kn" else w.T
    k, n = wk.shape
    if k == 0 or n == 0:
        raise ValueError(f"cannot pack an empty weight of shape {w.shape}")
    data = np.empty(_packed_shape(k, n, precision), dtype=_PACKED_DTYPE[precision])
    if precision == "fp32":
        _core.pack_f32(w=wk, out=data.reshape(-1, k, PANEL_COLS), threads=get_num_threads())
        return PackedWeight((k, n), "fp32", data, 0.0)
    scale = None
    if precision in INT8_PRECISIONS:
        if not np.isfinite(wk).all():
            raise ValueError("int8 packing needs finite weights (found NaN or Inf)")
        scale = np.empty(n, dtype=_F32)
    err2, ref2 = _core.pack_lowp(w=wk, precision=_PRECISION[precision], out=data, scale=scale)
    # NaN/Inf weights make the sums NaN: report NaN (IEEE), never "exact".
    rel = float(np.sqrt(err2 / ref2)) if ref2 > 0 else (0.0 if ref2 == 0 else float("nan"))
    return PackedWeight((k, n), precision, data, rel, scale)


def linear(x, w, bias=None, *, activation=None, out=None, variant: str = "auto", threads=None):
    """``activation(x @ w + bias)`` with bias and activation fused into the
    kernel's epilogue (no second pass over the output).

    x: (..., K) float32. w: a PackedWeight (any precision) or a (K, N)
    float32 array. bias: None or (N,) float32. activation: None, "relu",
    "gelu" (erf form), "gelu_tanh" or "silu". Returns float32 (..., N), or
    writes ``out`` (C-contiguous float32 of that shape) and returns it.
    With an int8 weight, each row of x is quantized on the fly to int8
    (scale max|row| / 127; max|row| / 63 with an "int8_7bit" weight); a row
    holding Inf or NaN yields NaN in that row.
    """
    if activation is not None and not isinstance(activation, str):
        raise _bad_choice("activation", activation, ACTIVATIONS)
    act = _ACTIVATION.get(activation)
    if act is None:
        raise _bad_choice("activation", activation, ACTIVATIONS)
    code = _VARIANT.get(variant)
    if code is None:
        raise _bad_choice("variant", variant, VARIANTS)
    threads = 0 if threads is None else _check_threads(threads)
    if (type(x) is not _ND or (type(w) is not PackedWeight and type(w) is not _ND)
            or (bias is not None and type(bias) is not _ND)
            or (out is not None and type(out) is not _ND)):
        (x2, w2, b2), out2, finish = _interop.adapt(("x", "w", "bias"), (x, w, bias), out)
        if x2 is not x or w2 is not w or b2 is not bias or out2 is not out:
            return finish(linear(x2, w2, b2, activation=activation, out=out2, variant=variant,
                                 threads=None if threads == 0 else threads))
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray of float32, got {type(x).__name__}; "
                        "use np.asarray(x, dtype=np.float32)")
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., K), got {x.shape}")
    if type(w) is PackedWeight:
        k, n = w.shape
        precision = w.precision
        if precision == "bf16" and _bf16_scheme["pending"]:
            _resolve_bf16()  # set_bf16_scheme("auto"): decided at the first bf16 call
    else:
        _check_matrix("w", w)
        k, n = w.shape
        precision = "fp32"
    if x.shape[-1] != k:
        raise ValueError(f"shapes {x.shape} and {(k, n)} are not aligned: x has {x.shape[-1]} "
                         f"features but w has {k} rows")
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x if x.ndim == 2 else x.reshape(m, k)  # (m, k) explicit: -1 fails when k == 0
    if x.dtype is not _F32 and x.dtype != _F32:
        raise _type_error("x", x)
    out2 = None
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != lead + (n,):
            raise ValueError(f"out must be a float32 array of shape {lead + (n,)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        out2 = out if out.ndim == 2 else out.reshape(m, n)
    if code is _AUTO and _chooser.active is not None:
        code, threads = policy_variant(dict(op="linear", precision=precision, m=m, k=k, n=n), threads)
    # Positional on purpose: keyword arguments cost more in pybind11's dispatcher
    # than a small product (docs/kernels.md). The order is the binding's:
    # a, b, out, alpha, beta, variant, threads, bias, activation, packed,
    # precision, col_scale, k, n.
    if type(w) is PackedWeight:
        res = _core.matmul(x2, None, out2, 1.0, 0.0, code, threads, bias, act,
                           w._data, w._code, w._scale, k, n)
    else:
        res = _core.matmul(x2, w, out2, 1.0, 0.0, code, threads, bias, act)
    if res is None:  # out overlaps x or w: compute into a temporary
        tmp = np.empty((m, n), dtype=_F32)
        linear(x2, w, bias, activation=activation, out=tmp, variant=variant,
               threads=None if threads == 0 else threads)
        out2[...] = tmp
        return out
    if out is not None:
        return out
    return res if x.ndim == 2 else res.reshape(lead + (n,))


def _gemm_py(a, b, *, out=None, alpha: float = 1.0, beta: float = 0.0,
             variant: str = "auto", threads=None):
    """``out = alpha * a @ b + beta * out`` in float32.

    a: (M, K) float32, any strides (C or Fortran order, transposed, sliced,
    negative or zero strides). b: (K, N) float32 or a PackedWeight.
    out: (M, N) float32 with unit stride along its last axis, or None (a new
    array; ``beta`` then has nothing to scale). An ``out`` that overlaps an
    input is handled as NumPy does. Arrays at an odd byte address
    (``flags.aligned`` False) work too: such an input is copied to an aligned
    buffer, such an ``out`` is computed in a temporary. Returns the result.

    Shape, dtype and ``out`` checks run in the C++ binding (they cost ~2 us in
    Python, more than a 32x32x32 product); their messages follow the SPEC.
    """
    # pk.gemm is the builtin made below: it runs the common call itself and
    # hands everything else (other input types, a chooser, overlapping out,
    # any error) to this function.
    if (type(a) is not _ND or (type(b) is not _ND and type(b) is not PackedWeight)
            or (out is not None and type(out) is not _ND)):
        (a2, b2), out2, finish = _interop.adapt(("a", "b"), (a, b), out)
        if a2 is not a or b2 is not b or out2 is not out:
            return finish(gemm(a2, b2, out=out2, alpha=alpha, beta=beta, variant=variant,
                               threads=threads))
    code = _VARIANT.get(variant)
    if code is None:
        raise _bad_choice("variant", variant, VARIANTS)
    if threads is not None:
        threads = _check_threads(threads)
    else:
        threads = 0
    if code is _AUTO and _chooser.active is not None:
        code, threads = _auto_variant(a, b, threads)
    if type(b) is PackedWeight:
        if b.precision != "fp32":
            raise ValueError(f"gemm takes an fp32 PackedWeight, got {b.precision!r}; use linear()")
        k, n = b.shape
        res = _core.matmul(a, None, out, alpha, beta, code, threads, None, Activation.none,
                           b._data, Precision.fp32, None, k, n)
    else:  # positional, as in linear
        res = _core.matmul(a, b, out, alpha, beta, code, threads)
    if res is None:  # out overlaps a or b: compute into a copy, then write back
        tmp = out.copy()
        gemm(a, b, out=tmp, alpha=alpha, beta=beta, variant=variant,
             threads=None if threads == 0 else threads)
        out[...] = tmp
        return out
    return res


# The builtin entry point (csrc/bindings/gemm.cc, gemm_entry): the common call
# without the Python frame and pybind11's dispatch (~0.2-0.4 us of a ~1.2 us
# 32x32x32 call); _gemm_py's docstring and gemm's signature.
# (Named gemm, so the TypeErrors of a bad call name the API function.)
_gemm_py.__name__ = _gemm_py.__qualname__ = "gemm"
gemm = _core.make_gemm(_gemm_py)


def _check_threads(threads) -> int:
    """A per-call thread count: an int >= 1, capped at MAX_THREADS."""
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    return threads if threads <= MAX_THREADS else MAX_THREADS


def _auto_variant(a, b, threads: int):
    shape_a = getattr(a, "shape", None)
    shape_b = b.shape if type(b) is PackedWeight else getattr(b, "shape", None)
    if not shape_a or len(shape_a) != 2 or not shape_b or len(shape_b) != 2:
        return _AUTO, threads  # the binding raises the precise error
    precision = b.precision if type(b) is PackedWeight else "fp32"
    return policy_variant(dict(op="gemm", precision=precision, m=shape_a[0], k=shape_a[1],
                               n=shape_b[1]), threads)
