"""The bfloat16 dtype (``ml_dtypes.bfloat16``), loaded on first need.

Importing ml_dtypes costs ~1.1 s (its extension's init with NumPy 2.4), so
``import pykernels`` does not import it. A bfloat16 array can exist only once
its owner has imported ml_dtypes, so ``is_bf16`` answers False without importing
it while ``ml_dtypes`` is not in ``sys.modules``.

Contract: ``bf16_dtype()`` imports ml_dtypes, registers the dtype with the
binding (``_core.set_bf16_dtype``, exactly once) and returns it; ImportError
without ml_dtypes. ``sync()`` registers it when ml_dtypes is loaded: the
attention binding calls it first, since it recognises bf16 only by the
registered descriptor (anything unregistered is the dtype TypeError).
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from . import _core

_dtype = None  # np.dtype(ml_dtypes.bfloat16) once registered with the binding
_lock = threading.Lock()  # serving threads may meet their first bf16 array together


def bf16_dtype() -> np.dtype:
    """``np.dtype(ml_dtypes.bfloat16)``, importing ml_dtypes and registering it
    with the binding at the first call."""
    global _dtype
    if _dtype is None:
        with _lock:
            if _dtype is None:
                import ml_dtypes  # ~1.1 s at the first call: why not at module level

                dt = np.dtype(ml_dtypes.bfloat16)
                _core.set_bf16_dtype(dt)
                _dtype = dt
    return _dtype


def sync() -> None:
    """Register the dtype if ml_dtypes is loaded (a bf16 array may then exist);
    otherwise import nothing."""
    if _dtype is None and "ml_dtypes" in sys.modules:
        bf16_dtype()


def is_bf16(dtype) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16``; imports nothing new."""
    if _dtype is None:
        if "ml_dtypes" not in sys.modules:
            return False
        bf16_dtype()
    return dtype == _dtype
