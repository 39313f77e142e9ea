"""The ``variant="auto"`` hook: how a layer above (the policy) chooses the
kernel variant and thread count of a kernel call.

A chooser is installed with :func:`set_variant_chooser` and called once per
``variant="auto"`` call with a :class:`KernelCall`, the call's shape as data.
It returns ``(variant, threads)``: variant ``"latency"`` | ``"throughput"``, or
None to leave it to the kernel's size rule; threads an int >= 1 when the
caller passed none (``call.threads is None``), else None (the caller's count
stands). ``precision`` is the weight's (or K/V cache's) as passed: a chooser
never repacks behind the caller's back.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from . import _core


@dataclass(frozen=True)
class KernelCall:
    """One kernel call, as the chooser sees it.

    gemm / linear: ``m`` rows of the activation, ``k`` inner, ``n`` output
    columns. attention: ``batch`` sequences of ``q_len`` queries over
    ``kv_len`` keys with ``q_heads`` / ``kv_heads`` heads of ``head_dim``.
    decode_attention: the same with ``q_len`` = 1 and ``kv_len`` the longest
    cached length of the batch.
    """

    op: str                          # "gemm" | "linear" | "attention" | "decode_attention"
    precision: str                   # "fp32" | "bf16" | "int8"
    threads: Optional[int] = None    # the caller's count, None when it passed none
    m: int = 0
    k: int = 0
    n: int = 0
    batch: int = 0
    q_heads: int = 0
    kv_heads: int = 0
    q_len: int = 0
    kv_len: int = 0
    head_dim: int = 0
    causal: bool = False


VariantChooser = Callable[[KernelCall], Tuple[Optional[str], Optional[int]]]

# Read once per variant="auto" call (one module attribute read); written only
# through set_variant_chooser.
active: Optional[VariantChooser] = None
_lock = threading.Lock()


def set_variant_chooser(chooser: Optional[VariantChooser]) -> Optional[VariantChooser]:
    """Install ``chooser`` for ``variant="auto"`` calls (None removes it);
    returns the previous one so a caller can restore it."""
    global active
    if chooser is not None and not callable(chooser):
        raise TypeError(f"chooser must be callable or None, got {type(chooser).__name__}")
    with _lock:
        prev, active = active, chooser
        # pk.gemm's builtin entry point runs variant="auto" itself only while
        # no chooser is installed
        _core.set_chooser_active(chooser is not None)
    return prev


def get_variant_chooser() -> Optional[VariantChooser]:
    """The installed chooser, or None."""
    return active
