"""Service-level objectives: latency targets, a throughput floor and an accuracy budget."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional


def _check(name: str, value, *, allow_inf: bool = False, allow_zero: bool = False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} is NaN; give a positive number or None")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} is infinite; use None for 'no target'")
    if v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def cosine_error(cosine: float) -> float:
    """The distance ``|a - b|`` between unit vectors whose cosine is ``cosine``:
    the relative error of a unit embedding at that cosine to its reference."""
    return math.sqrt(max(0.0, 2.0 * (1.0 - float(cosine))))


def error_cosine(rel_error: float) -> float:
    """Inverse of ``cosine_error``."""
    return 1.0 - 0.5 * float(rel_error) ** 2


@dataclass(frozen=True)
class SLO:
    """What a class of requests needs.

    p99_ms, p50_ms: latency targets in milliseconds for one request, queueing
        and batch formation included (None: no target).
    min_throughput: items per second the plan must sustain (None: no floor).
    max_rel_error: accuracy budget, the relative (Frobenius) error a precision
        may add; it decides which precisions are allowed. The default 1e-4
        admits fp32 only; 1e-2 admits bf16 and int8. ``float("inf")`` admits all.
    min_cosine: the accuracy budget stated for embeddings instead: the least
        cosine of an output to fp32's. When given it sets ``max_rel_error`` to
        ``sqrt(2 (1 - min_cosine))``, the distance between two unit vectors at
        that cosine (0.99 -> 0.141, 0.999 -> 0.0447, 0.9999 -> 0.0141), so a
        profile whose ``precision_error`` was measured as that distance on
        calibration texts (``cosine_error``) decides with it.
    """

    p99_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    min_throughput: Optional[float] = None
    max_rel_error: float = 1e-4
    min_cosine: Optional[float] = None

    def __post_init__(self):
        if self.min_cosine is not None:
            c = self.min_cosine
            if isinstance(c, bool) or not isinstance(c, Real) or not -1.0 <= float(c) <= 1.0:
                raise ValueError(f"min_cosine must be a number in [-1, 1] or None, got {c!r}")
            object.__setattr__(self, "min_cosine", float(c))
            object.__setattr__(self, "max_rel_error", cosine_error(float(c)))
        object.__setattr__(self, "p99_ms", _check("p99_ms", self.p99_ms))
        object.__setattr__(self, "p50_ms", _check("p50_ms", self.p50_ms))
        object.__setattr__(self, "min_throughput", _check("min_throughput", self.min_throughput))
        if self.max_rel_error is None:
            raise ValueError("max_rel_error must be a number >= 0 (float('inf') admits every precision)")
        object.__setattr__(self, "max_rel_error",
                           _check("max_rel_error", self.max_rel_error, allow_inf=True, allow_zero=True))
        if self.p50_ms is not None and self.p99_ms is not None and self.p50_ms > self.p99_ms:
            raise ValueError(f"p50_ms ({self.p50_ms}) cannot exceed p99_ms ({self.p99_ms})")

    def describe(self) -> str:
        parts = []
        if self.p99_ms is not None:
            parts.append(f"p99 <= {self.p99_ms:g} ms")
        if self.p50_ms is not None:
            parts.append(f"p50 <= {self.p50_ms:g} ms")
        if self.min_throughput is not None:
            parts.append(f"throughput >= {self.min_throughput:g} items/s")
        if self.min_cosine is not None:
            parts.append(f"cosine to fp32 >= {self.min_cosine:g}")
        else:
            parts.append(f"relative error <= {self.max_rel_error:g}")
        return ", ".join(parts)


def parse_min_cosines(text: str, classes) -> dict:
    """``"interactive=0.999,bulk=0.99"`` -> {class: least cosine to fp32}, for
    the classes named in ``classes``; ValueError names the bad part."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        cls, sep, val = part.partition("=")
        cls = cls.strip()
        if not sep:
            raise ValueError(f"accuracy: {part!r} is not class=cosine (e.g. bulk=0.99)")
        if cls not in classes:
            raise ValueError(f"accuracy: unknown class {cls!r}; classes are {', '.join(classes)}")
        try:
            c = float(val)
        except ValueError:
            raise ValueError(f"accuracy: {part!r} is not class=cosine (e.g. bulk=0.99)") from None
        if not 0.0 < c <= 1.0:
            raise ValueError(f"accuracy: the cosine of {cls!r} must be in (0, 1], got {c}")
        out[cls] = c
    return out
