"""Work descriptions: what the policy plans for, as pure data, and the registry that runs it.

An op (``Linear``, ``Attention``, ``Decode``, or a ``Model`` of parts) is a
frozen, hashable description of the work per batch item: its FLOPs, bytes,
profile key and spec. How an op kind runs is a backend in a registry keyed by
kind, built on the kernels ``pykernels.kernels()`` lists; ``op_for_call`` maps
a ``variant="auto"`` kernel call to (op, batch). Imports only the kernel layer.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

import pykernels
from pykernels._bf16 import bf16_dtype

# Nominal relative error each precision adds (relative Frobenius error of the
# output against a float64 reference): fp32 accumulates ~sqrt(K)*eps; bf16 has
# an 8-bit mantissa (2^-9 ~ 2e-3 per element, ~4e-3 measured through a GEMM);
# int8 is symmetric per channel (~1e-2); int8_7bit has the same weights and
# twice the activation rounding step (~2e-2). The profile may carry measured
# values, which take precedence. Ordered from most to least accurate.
PRECISION_REL_ERROR: Dict[str, float] = {
    "fp32": 1e-6,
    "fp16": 5e-4,
    "bf16": 4e-3,
    "int8": 1e-2,
    "int8_7bit": 2e-2,
}
PRECISIONS: Tuple[str, ...] = tuple(PRECISION_REL_ERROR)

# Bytes per stored weight/activation element.
_WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8_7bit": 1}


def precision_rank(precision: str) -> int:
    """Position in accuracy order (0 = most accurate); unknown precisions last."""
    try:
        return PRECISIONS.index(precision)
    except ValueError:
        return len(PRECISIONS)


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _precision(value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value not in _WEIGHT_BYTES:
        raise ValueError(f"precision must be one of {sorted(_WEIGHT_BYTES)} or None, got {value!r}")
    return value


class Op:
    """Base of all ops. Subclasses are frozen dataclasses registered with @register_op."""

    kind: ClassVar[str] = ""
    # Name of the batch field in pytest-benchmark extra_info and profile specs.
    batch_field: ClassVar[str] = "batch"

    precision: Optional[str] = None

    # --- identity -----------------------------------------------------------
    @property
    def key(self) -> str:
        """Profile key of this op's shape (precision and batch excluded)."""
        k = self.__dict__.get("_key")
        if k is None:
            k = self._make_key()
            object.__setattr__(self, "_key", k)  # cached; not a dataclass field
        return k

    def _make_key(self) -> str:
        fields_ = ",".join(f"{k}={v}" for k, v in self._shape_items())
        return f"{self.kind}({fields_})"

    def _shape_items(self) -> List[Tuple[str, object]]:
        raise NotImplementedError

    def spec(self) -> dict:
        """JSON-able description; ``from_spec(op.spec()) == op``."""
        d = {"kind": self.kind}
        d.update(self._shape_items())
        if self.precision is not None:
            d["precision"] = self.precision
        return d

    # --- measurement shape --------------------------------------------------
    def base(self) -> "Op":
        """The shape as measured in a profile (precision and per-item multipliers dropped)."""
        return self

    def units(self, batch: int) -> int:
        """Batch size of ``base()`` that ``batch`` items of this op amount to."""
        return int(batch)

    def parts(self) -> Tuple["Op", ...]:
        """Leaf ops this op runs, in order (``(self,)`` for a single kernel call)."""
        return (self,)

    # --- work ---------------------------------------------------------------
    def flops(self, batch: int = 1) -> float:
        raise NotImplementedError

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        raise NotImplementedError

    def tiled_flops(self, batch: int = 1, tile: Optional[Tuple[int, int]] = None) -> float:
        """FLOPs as a kernel with register tile ``tile`` = (MR, NR) executes them
        (edge tiles padded): the step shape of latency versus batch. Defaults
        to ``flops``."""
        return self.flops(batch)

    def flops_per_item(self) -> float:
        return self.flops(1)

    def bytes_per_item(self, precision: str = "fp32") -> float:
        """Bytes one more item adds (weights shared across the batch are not counted)."""
        return self.bytes(2, precision) - self.bytes(1, precision)


# ---------------------------------------------------------------------------
# Op types registry
# ---------------------------------------------------------------------------
_OP_TYPES: Dict[str, type] = {}
_KIND_ALIASES: Dict[str, str] = {}


def register_op(kind: str, *aliases: str):
    """Class decorator: register an op type under ``kind`` (and aliases used in
    ``pykernels.kernels()`` or benchmark ``extra_info``)."""

    def deco(cls):
        cls.kind = kind
        _OP_TYPES[kind] = cls
        _KIND_ALIASES[kind] = kind
        for a in aliases:
            _KIND_ALIASES[a] = kind
        return cls

    return deco


def op_kind(name: str) -> Optional[str]:
    """Canonical op kind for a name or alias (``"gemm"`` -> ``"linear"``), or None."""
    return _KIND_ALIASES.get(name)


def op_types() -> Dict[str, type]:
    return dict(_OP_TYPES)


def from_spec(spec: dict) -> Op:
    """Rebuild an op from ``spec()`` output or from benchmark ``extra_info``
    (extra keys such as variant, threads or the batch field are ignored)."""
    if not isinstance(spec, dict):
        raise ValueError(f"op spec must be a dict, got {type(spec).__name__}")
    kind = op_kind(str(spec.get("kind", spec.get("op", ""))))
    if kind is None:
        raise ValueError(f"unknown op kind in {spec!r}; known: {sorted(_KIND_ALIASES)}")
    return _OP_TYPES[kind].from_params(spec)


@register_op("linear", "gemm")
@dataclass(frozen=True)
class Linear(Op):
    """``x @ w`` (+ bias, activation) with w of shape (K, N).

    One batch item is ``rows_per_item`` rows of x (1 for a request that is one
    vector; the sequence length when the op is part of a transformer forward).
    ``precision`` fixes the weight's precision; None lets the planner choose.
    """

    k: int
    n: int
    precision: Optional[str] = None
    rows_per_item: int = 1
    batch_field: ClassVar[str] = "m"

    def __post_init__(self):
        object.__setattr__(self, "k", _pos_int("k", self.k))
        object.__setattr__(self, "n", _pos_int("n", self.n))
        object.__setattr__(self, "precision", _precision(self.precision))
        object.__setattr__(self, "rows_per_item", _pos_int("rows_per_item", self.rows_per_item))

    def _shape_items(self):
        items = [("k", self.k), ("n", self.n)]
        if self.rows_per_item != 1:
            items.append(("rows_per_item", self.rows_per_item))
        return items

    def _make_key(self) -> str:
        return f"linear(k={self.k},n={self.n})" if self.rows_per_item == 1 else super()._make_key()

    @classmethod
    def from_params(cls, p: dict) -> "Linear":
        return cls(int(p["k"]), int(p["n"]), p.get("precision"), int(p.get("rows_per_item", 1)))

    def base(self) -> "Linear":
        if self.precision is None and self.rows_per_item == 1:
            return self
        return Linear(self.k, self.n)

    def units(self, batch: int) -> int:
        return int(batch) * self.rows_per_item

    def flops(self, batch: int = 1) -> float:
        return 2.0 * self.units(batch) * self.k * self.n

    def tiled_flops(self, batch: int = 1, tile: Optional[Tuple[int, int]] = None) -> float:
        if not tile:
            return self.flops(batch)
        mr, nr = tile
        m = self.units(batch)
        return 2.0 * (-(-m // mr) * mr) * self.k * (-(-self.n // nr) * nr)

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        m = self.units(batch)
        wb = _WEIGHT_BYTES.get(precision, 4)
        scales = 4.0 * self.n if _WEIGHT_BYTES.get(precision) == 1 else 0.0  # int8 scales
        return self.k * self.n * wb + scales + 4.0 * m * (self.k + self.n)


def _causal_pairs(s_q: int, s_kv: int) -> int:
    # Query row i sees keys j <= i + s_kv - s_q (SPEC, attention with causal=True).
    total = 0
    off = s_kv - s_q
    if s_q <= 4096:
        for i in range(s_q):
            total += min(s_kv, max(0, i + off + 1))
        return total
    i = np.arange(s_q, dtype=np.int64)
    return int(np.clip(i + off + 1, 0, s_kv).sum())


@register_op("attention")
@dataclass(frozen=True)
class Attention(Op):
    """Multi-head / grouped-query attention over one sequence per batch item:
    q (Hq, Sq, D), k and v (Hkv, Skv, D)."""

    hq: int
    hkv: int
    d: int
    s_q: int
    s_kv: int
    causal: bool = False
    precision: Optional[str] = None

    def __post_init__(self):
        for name in ("hq", "hkv", "d", "s_q", "s_kv"):
            object.__setattr__(self, name, _pos_int(name, getattr(self, name)))
        if self.hq % self.hkv:
            raise ValueError(f"hq ({self.hq}) must be a multiple of hkv ({self.hkv})")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "precision", _precision(self.precision))

    def _shape_items(self):
        return [("hq", self.hq), ("hkv", self.hkv), ("d", self.d), ("s_q", self.s_q),
                ("s_kv", self.s_kv), ("causal", self.causal)]

    @classmethod
    def from_params(cls, p: dict) -> "Attention":
        causal = p.get("causal", False)
        if isinstance(causal, str):
            causal = causal.strip().lower() in ("1", "true", "yes")
        return cls(int(p["hq"]), int(p["hkv"]), int(p["d"]), int(p["s_q"]), int(p["s_kv"]),
                   bool(causal), p.get("precision"))

    def base(self) -> "Attention":
        if self.precision is None:
            return self
        return Attention(self.hq, self.hkv, self.d, self.s_q, self.s_kv, self.causal)

    def flops(self, batch: int = 1) -> float:
        pairs = _causal_pairs(self.s_q, self.s_kv) if self.causal else self.s_q * self.s_kv
        return 4.0 * batch * self.hq * self.d * pairs

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        e = _WEIGHT_BYTES.get(precision, 4)
        per = self.hq * self.s_q * self.d * (e + 4) + 2 * self.hkv * self.s_kv * self.d * e
        return float(batch) * per


@register_op("decode", "decode_attention")
@dataclass(frozen=True)
class Decode(Op):
    """Decode attention: one new query token per sequence against a KV cache of
    ``kv_len`` positions; q (Hq, D), caches (Hkv, kv_len, D)."""

    hq: int
    hkv: int
    d: int
    kv_len: int
    precision: Optional[str] = None

    def __post_init__(self):
        for name in ("hq", "hkv", "d", "kv_len"):
            object.__setattr__(self, name, _pos_int(name, getattr(self, name)))
        if self.hq % self.hkv:
            raise ValueError(f"hq ({self.hq}) must be a multiple of hkv ({self.hkv})")
        object.__setattr__(self, "precision", _precision(self.precision))

    def _shape_items(self):
        return [("hq", self.hq), ("hkv", self.hkv), ("d", self.d), ("kv_len", self.kv_len)]

    @classmethod
    def from_params(cls, p: dict) -> "Decode":
        return cls(int(p["hq"]), int(p["hkv"]), int(p["d"]), int(p["kv_len"]), p.get("precision"))

    def base(self) -> "Decode":
        if self.precision is None:
            return self
        return Decode(self.hq, self.hkv, self.d, self.kv_len)

    def flops(self, batch: int = 1) -> float:
        return 4.0 * batch * self.hq * self.kv_len * self.d

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        e = _WEIGHT_BYTES.get(precision, 4)
        return float(batch) * (2 * self.hkv * self.kv_len * self.d * e + self.hq * self.d * (e + 4))


@register_op("model")
@dataclass(frozen=True)
class Model(Op):
    """A whole forward: a sequence of ops run one after another per batch.

    ``Model(ops=[Linear(384, 1152, rows_per_item=128), Attention(...), ...])``.
    A batch of B items runs every op with batch B. Predictions are the sum of
    the parts'; one plan (variant, precision, threads, batch) serves the whole
    forward. ``name`` keys feedback and profiles; it defaults to the parts' keys.
    """

    ops: Tuple[Op, ...] = field(default_factory=tuple)
    name: Optional[str] = None
    precision: Optional[str] = None

    def __post_init__(self):
        ops_ = tuple(self.ops)
        if not ops_:
            raise ValueError("Model needs at least one op")
        for o in ops_:
            if not isinstance(o, Op) or isinstance(o, Model):
                raise ValueError(f"Model ops must be leaf ops (Linear, Attention, Decode, ...), got {o!r}")
        object.__setattr__(self, "ops", ops_)
        object.__setattr__(self, "precision", _precision(self.precision))

    def _make_key(self) -> str:
        if self.name:
            return f"model({self.name})"
        return "model(" + ";".join(_part_key(o) for o in self.ops) + ")"

    def _shape_items(self):
        return [("name", self.name)]

    def spec(self) -> dict:
        d = {"kind": "model", "name": self.name, "ops": [o.spec() for o in self.ops]}
        if self.precision is not None:
            d["precision"] = self.precision
        return d

    @classmethod
    def from_params(cls, p: dict) -> "Model":
        return cls(tuple(from_spec(o) for o in p["ops"]), p.get("name"), p.get("precision"))

    def parts(self) -> Tuple[Op, ...]:
        return self.ops

    def flops(self, batch: int = 1) -> float:
        return sum(o.flops(batch) for o in self.ops)

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        return sum(o.bytes(batch, o.precision or precision) for o in self.ops)


def _part_key(o: Op) -> str:
    k = o.key
    return k if o.precision is None else f"{k}@{o.precision}"


# ---------------------------------------------------------------------------
# Backends: how each op kind runs on pykernels' kernels
# ---------------------------------------------------------------------------
Prepare = Callable[["Op", str, str, int, int, dict], Callable[[], object]]


@dataclass(frozen=True)
class Backend:
    """Runs one op kind with the kernels of one ``pykernels.kernels()`` op name.

    prepare(op, variant, precision, threads, units, cache) builds inputs for
    ``units`` batch items of ``op.base()`` and returns a zero-argument callable
    that runs the kernel once; ``cache`` is a dict shared within one calibration
    (for packed weights). ``precisions`` limits the precisions served (None: all
    the registry lists); ``available()`` says whether the Python entry point
    exists; the highest ``priority`` wins for a (variant, precision).
    ``rel_error(op, precision, cache)`` optionally measures the output error.
    """

    kind: str
    kernel_op: str
    prepare: Prepare
    precisions: Optional[Tuple[str, ...]] = None
    available: Callable[[], bool] = lambda: True
    priority: int = 0
    rel_error: Optional[Callable[["Op", str, dict], float]] = None


_BACKENDS: Dict[str, List[Backend]] = {}
# kernel op name (KernelCall.op) -> fn(call) -> (op, batch) | None
_CALLS: Dict[str, Callable[..., Optional[Tuple[Op, int]]]] = {}
# Shapes and batch buckets calibrated by default, per kind: (quick, full).
_CALIBRATION: Dict[str, dict] = {}


def register_backend(kind: str, kernel_op: str, prepare: Prepare, *,
                     precisions: Optional[Sequence[str]] = None,
                     available: Optional[Callable[[], bool]] = None,
                     priority: int = 0,
                     rel_error=None) -> Backend:
    """Register how op ``kind`` runs on the kernels ``pykernels.kernels()`` lists
    under ``kernel_op``. Returns the backend (pass it to ``unregister_backend``)."""
    if kind not in _OP_TYPES:
        raise ValueError(f"unknown op kind {kind!r}; register the op type first")
    b = Backend(kind, kernel_op, prepare, tuple(precisions) if precisions else None,
                available or (lambda: True), priority, rel_error)
    lst = _BACKENDS.setdefault(kind, [])
    lst.append(b)
    lst.sort(key=lambda x: -x.priority)
    return b


def unregister_backend(backend: Backend) -> None:
    lst = _BACKENDS.get(backend.kind, [])
    if backend in lst:
        lst.remove(backend)


def register_call(kernel_op: str, fn) -> None:
    """Map a kernel call seen by the ``variant="auto"`` chooser (a
    ``pykernels.KernelCall`` whose ``op`` is ``kernel_op``) to ``(op, batch)``
    for the planner: ``fn(call)``, returning None when it cannot."""
    _CALLS[kernel_op] = fn


def op_for_call(call) -> Optional[Tuple[Op, int]]:
    """(op, batch) the planner reasons about for one ``pykernels.KernelCall``,
    or None for a kernel no op describes."""
    fn = _CALLS.get(call.op)
    return None if fn is None else fn(call)


def register_calibration(kind: str, *, quick_shapes, full_shapes, quick_batches, full_batches,
                         heldout_shapes=(), heldout_batches=()) -> None:
    """Default shapes and batch buckets ``Profile.calibrate`` measures for ``kind``."""
    _CALIBRATION[kind] = dict(quick_shapes=tuple(quick_shapes), full_shapes=tuple(full_shapes),
                              quick_batches=tuple(quick_batches), full_batches=tuple(full_batches),
                              heldout_shapes=tuple(heldout_shapes),
                              heldout_batches=tuple(heldout_batches))


def calibration_defaults(kind: str) -> Optional[dict]:
    return _CALIBRATION.get(kind)


def kernel_table():
    """``pykernels.kernels()``, or [] when the extension cannot be imported."""
    try:
        return list(pykernels.kernels())
    except Exception:  # pragma: no cover - extension missing or mid-rebuild
        return []


def candidates(kind: str, table=None) -> Dict[Tuple[str, str], Backend]:
    """(variant, precision) -> backend that runs op ``kind`` on this machine."""
    table = kernel_table() if table is None else table
    if kind == "model":
        return {}
    out: Dict[Tuple[str, str], Backend] = {}
    for b in _BACKENDS.get(kind, []):
        try:
            if not b.available():
                continue
        except Exception:
            continue
        for e in table:
            if e.op != b.kernel_op:
                continue
            if b.precisions is not None and e.precision not in b.precisions:
                continue
            out.setdefault((e.variant, e.precision), b)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], precision_rank(kv[0][1]))))


def tile_records(table=None) -> List[List]:
    """[op, variant, precision, mr, nr] of every registry entry with a fixed
    register tile, read from the entries' fields (JSON-friendly, for a
    profile's key)."""
    table = kernel_table() if table is None else table
    return sorted([e.op, e.variant, e.precision, int(e.mr), int(e.nr)]
                  for e in table if getattr(e, "mr", None) is not None)


def kernel_tiles(records: Sequence[Sequence]) -> Dict[Tuple[str, str, str], Tuple[int, int]]:
    """(kind, variant, precision) -> register tile (MR, NR) from
    ``tile_records()`` rows."""
    out = {}
    for rec in records:
        if len(rec) != 5:
            continue
        op, variant, precision, mr, nr = rec
        kind = op_kind(op)
        if kind:
            out.setdefault((kind, variant, precision), (int(mr), int(nr)))
    return out


def kernel_names(table=None) -> List[str]:
    table = kernel_table() if table is None else table
    return sorted(f"{e.op}/{e.variant}/{e.precision}/{e.isa}/{e.name}" for e in table)


def runner(op: Op, variant: str, precision: str, threads: int, batch: int,
           cache: Optional[dict] = None, table=None) -> Callable[[], object]:
    """Zero-argument callable running ``batch`` items of ``op`` once."""
    cache = {} if cache is None else cache
    if isinstance(op, Model):
        runs = [runner(p, variant, p.precision or precision, threads, batch, cache, table)
                for p in op.parts()]

        def run_all():
            for r in runs:
                r()
        return run_all
    backend = candidates(op.kind, table).get((variant, precision))
    if backend is None:
        raise ValueError(f"no {variant}/{precision} kernel for {op.kind} on this machine")
    return backend.prepare(op.base(), variant, precision, threads, op.units(batch), cache)


# --- linear -----------------------------------------------------------------
def _rng(op: Op):
    return np.random.default_rng(zlib.crc32(op.key.encode()))


def _weight(op: Linear, precision: str, cache: dict):
    key = ("w", op.k, op.n, precision)
    w = cache.get(key)
    if w is None:
        raw = cache.get(("raw", op.k, op.n))
        if raw is None:
            raw = _rng(op).standard_normal((op.k, op.n), dtype=np.float32)
            cache[("raw", op.k, op.n)] = raw
        w = pykernels.pack(raw, precision=precision)
        cache[key] = w
    return w


def _cached(cache: dict, key, make):
    """Inputs shared by every cell of one calibration with the same shape."""
    v = cache.get(key)
    if v is None:
        v = cache[key] = make()
    return v


def _linear_io(op, units, cache):
    return _cached(cache, ("io", op.key, units), lambda: (
        _rng(op).standard_normal((units, op.k), dtype=np.float32),
        np.empty((units, op.n), dtype=np.float32)))


def _prepare_linear_gemm(op, variant, precision, threads, units, cache):
    w = _weight(op, "fp32", cache)
    x, out = _linear_io(op, units, cache)
    gemm = pykernels.gemm

    def run():
        gemm(x, w, out=out, variant=variant, threads=threads)
    return run


def _prepare_linear(op, variant, precision, threads, units, cache):
    w = _weight(op, precision, cache)
    x, out = _linear_io(op, units, cache)
    linear = pykernels.linear

    def run():
        linear(x, w, out=out, variant=variant, threads=threads)
    return run


def _linear_rel_error(op, precision, cache):
    w = _weight(op, precision, cache)
    raw = cache[("raw", op.k, op.n)]
    x = np.random.default_rng(1).standard_normal((16, op.k), dtype=np.float32)
    ref = x.astype(np.float64) @ raw.astype(np.float64)
    if precision == "fp32" and not hasattr(pykernels, "linear"):
        got = pykernels.gemm(x, w, variant="throughput")
    else:
        got = pykernels.linear(x, w, variant="throughput")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


register_backend("linear", "gemm", _prepare_linear_gemm, precisions=("fp32",), priority=0,
                 rel_error=_linear_rel_error)
register_backend("linear", "linear", _prepare_linear, priority=10,
                 available=lambda: hasattr(__import__("pykernels"), "linear"),
                 rel_error=_linear_rel_error)


def _precision_of(call) -> Optional[str]:
    return call.precision if call.precision in _WEIGHT_BYTES else None


def _linear_call(call):
    # gemm / linear: one batch item is one row of the activation
    if call.m < 1 or call.k < 1 or call.n < 1:
        return None
    return Linear(call.k, call.n, _precision_of(call)), call.m


def _attention_call(call):
    # one batch item is one sequence; the call carries its whole geometry
    if min(call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len, call.head_dim) < 1:
        return None
    return (Attention(call.q_heads, call.kv_heads, call.head_dim, call.q_len, call.kv_len,
                      bool(call.causal), _precision_of(call)), call.batch)


def _decode_call(call):
    # one batch item is one sequence's new token over its cache
    if min(call.batch, call.q_heads, call.kv_heads, call.kv_len, call.head_dim) < 1:
        return None
    return Decode(call.q_heads, call.kv_heads, call.head_dim, call.kv_len, _precision_of(call)), call.batch


register_call("gemm", _linear_call)
register_call("linear", _linear_call)
register_call("attention", _attention_call)
register_call("decode_attention", _decode_call)


# --- attention / decode -----------------------------------------------------
def _dtype(precision: str):
    if precision == "fp32":
        return np.float32
    if precision == "bf16":
        return bf16_dtype()
    if precision == "fp16":
        return np.float16
    raise ValueError(f"attention has no {precision} inputs")


def _prepare_attention(op, variant, precision, threads, units, cache):
    def make():
        rng = _rng(op)
        dt = _dtype(precision)
        return (rng.standard_normal((units, op.hq, op.s_q, op.d), dtype=np.float32).astype(dt),
                rng.standard_normal((units, op.hkv, op.s_kv, op.d), dtype=np.float32).astype(dt),
                rng.standard_normal((units, op.hkv, op.s_kv, op.d), dtype=np.float32).astype(dt),
                np.empty((units, op.hq, op.s_q, op.d), dtype=np.float32))
    q, k, v, out = _cached(cache, ("io", op.key, units, precision), make)
    attention = pykernels.attention

    def run():
        attention(q, k, v, causal=op.causal, out=out, variant=variant, threads=threads)
    return run


def _prepare_decode(op, variant, precision, threads, units, cache):
    def make():
        rng = _rng(op)
        dt = _dtype(precision)
        return (rng.standard_normal((units, op.hq, op.d), dtype=np.float32).astype(dt),
                rng.standard_normal((units, op.hkv, op.kv_len, op.d), dtype=np.float32).astype(dt),
                rng.standard_normal((units, op.hkv, op.kv_len, op.d), dtype=np.float32).astype(dt),
                np.full((units,), op.kv_len, dtype=np.int32),
                np.empty((units, op.hq, op.d), dtype=np.float32))
    q, kc, vc, lens, out = _cached(cache, ("io", op.key, units, precision), make)
    decode = pykernels.decode_attention

    def run():
        decode(q, kc, vc, lens, out=out, variant=variant, threads=threads)
    return run


register_backend("attention", "attention", _prepare_attention,
                 available=lambda: hasattr(__import__("pykernels"), "attention"))
register_backend("decode", "decode_attention", _prepare_decode,
                 available=lambda: hasattr(__import__("pykernels"), "decode_attention"))

# MiniLM-L6 (hidden 384, FFN 1536, 12 heads of 32) and typical LLM layers.
register_calibration(
    "linear",
    quick_shapes=[Linear(384, 384), Linear(384, 1536), Linear(1536, 384), Linear(128, 256)],
    full_shapes=[Linear(384, 384), Linear(384, 1152), Linear(384, 1536), Linear(1536, 384),
                 Linear(128, 256), Linear(768, 768), Linear(1024, 4096), Linear(4096, 1024)],
    quick_batches=[1, 2, 4, 8, 16, 32, 64, 128, 256],
    full_batches=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512],
    heldout_shapes=[Linear(256, 768), Linear(512, 512), Linear(768, 384), Linear(384, 1152)],
    heldout_batches=[1, 3, 8, 24, 64, 192],
)
register_calibration(
    "attention",
    quick_shapes=[Attention(12, 12, 32, 128, 128, False)],
    full_shapes=[Attention(12, 12, 32, 128, 128, False), Attention(12, 12, 32, 256, 256, False),
                 Attention(32, 8, 128, 512, 512, True)],
    quick_batches=[1, 2, 4, 8, 16],
    full_batches=[1, 2, 4, 8, 16, 32, 64],
    heldout_shapes=[Attention(12, 12, 32, 64, 64, False)],
    heldout_batches=[1, 3, 8],
)
register_calibration(
    "decode",
    quick_shapes=[Decode(32, 8, 128, 512)],
    # KV caches are big (B * Hkv * kv_len * D * 8 bytes for k and v in fp32) and
    # every cell's inputs stay alive through the interleaved passes: <= ~400 MB.
    full_shapes=[Decode(32, 8, 128, 512), Decode(32, 8, 128, 1024), Decode(32, 32, 128, 512)],
    quick_batches=[1, 4, 16],
    full_batches=[1, 2, 4, 8, 16],
    heldout_shapes=[Decode(32, 8, 128, 768)],
    heldout_batches=[1, 8],
)


def precision_error(precision: str, measured: Optional[Dict[str, float]] = None) -> float:
    """Relative error a precision adds: measured if known, else the nominal table."""
    if measured and precision in measured:
        return float(measured[precision])
    return PRECISION_REL_ERROR.get(precision, math.inf)


__all__ = [
    "Attention", "Backend", "Decode", "Linear", "Model", "Op", "PRECISIONS",
    "PRECISION_REL_ERROR", "calibration_defaults", "candidates", "from_spec", "kernel_names",
    "kernel_tiles", "tile_records",
    "kernel_table", "op_for_call", "op_kind", "op_types", "precision_error", "register_backend",
    "register_calibration", "register_call", "register_op", "runner", "unregister_backend",
]
