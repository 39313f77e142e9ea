"""A model's whole forward as one measured unit of work (op kind ``"forward"``).

``WholeForward(forward)`` wraps the ``work.Model`` a model describes itself
with (its kernel calls per batch item) into a leaf op: a profile records its
service time measured end to end (tokenizer and NumPy glue included) instead
of summing the kernels' cells. FLOPs and bytes are the wrapped description's,
so there is one description of the model; this only changes how it is measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import work


@work.register_op("forward", "encoder")
@dataclass(frozen=True)
class WholeForward(work.Op):
    """``forward`` (a ``work.Model``) measured as one call per batch.

    ``precision`` fixes the precision the measurements are recorded under
    (the model's weights'); None leaves it to the planner."""

    forward: work.Model
    precision: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.forward, work.Model):
            raise ValueError(f"WholeForward wraps a work.Model, got {self.forward!r}")
        if self.precision is not None and self.precision not in work.PRECISIONS:
            raise ValueError(f"precision must be one of {work.PRECISIONS} or None, "
                             f"got {self.precision!r}")

    def _shape_items(self):
        return [("forward", self.forward.key)]

    def _make_key(self) -> str:
        return f"forward({self.forward.key})"

    def spec(self) -> dict:
        d = {"kind": self.kind, "forward": self.forward.spec()}
        if self.precision is not None:
            d["precision"] = self.precision
        return d

    @classmethod
    def from_params(cls, p: dict) -> "WholeForward":
        return cls(work.from_spec(p["forward"]), p.get("precision"))

    def base(self) -> "WholeForward":
        return self if self.precision is None else WholeForward(self.forward)

    def flops(self, batch: int = 1) -> float:
        return self.forward.flops(batch)

    def bytes(self, batch: int = 1, precision: str = "fp32") -> float:
        return self.forward.bytes(batch, precision)


__all__ = ["WholeForward"]
