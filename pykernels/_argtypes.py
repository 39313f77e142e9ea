"""``argparse`` types shared by ``pykernels`` (bench) and ``pykernels serve``.

Each parses one option value and raises ``argparse.ArgumentTypeError`` naming
the bad value, which argparse turns into a usage error (exit status 2). A
module of its own, so that neither command imports the other to parse a number:
the bench does not load the server, the server does not load the bench.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

T = TypeVar("T", int, float)


def _parse(text: str, convert: Callable[[str], T], expected: str) -> T:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _parse(text, int, "an integer >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """A number > 0 (``inf`` is accepted)."""
    v = _parse(text, float, "a number > 0")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def finite_positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _parse(text, float, "a number > 0")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {v}")
    return v


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    v = _parse(text, int, "a port number")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0: any free port), got {v}")
    return v
