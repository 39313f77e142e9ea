"""pykernels: hand-written C++ CPU kernels for AI inference.

GEMM and attention in a latency and a throughput variant, in fp32, bf16 and
int8, plus a policy engine (``pykernels.policy``) that picks variant,
precision, batch size and threads from SLO targets.
"""
from . import _core

if _core.init_error:  # e.g. PYKERNELS_ISA=bogus, or a path this CPU lacks
    raise ValueError(_core.init_error)

from ._attention import attention, decode_attention
from ._chooser import KernelCall, get_variant_chooser, set_variant_chooser
from ._gemm import PackedWeight, gemm, linear, pack
from ._peaks import Peaks, measure_peaks
from ._runtime import (
    CpuInfo,
    KernelEntry,
    cpu_info,
    explain_bf16_scheme,
    fork_join_us,
    get_bf16_scheme,
    get_int8_scheme,
    get_num_threads,
    kernels,
    set_bf16_scheme,
    set_int8_scheme,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "CpuInfo",
    "KernelCall",
    "KernelEntry",
    "PackedWeight",
    "Peaks",
    "attention",
    "cpu_info",
    "decode_attention",
    "explain_bf16_scheme",
    "fork_join_us",
    "gemm",
    "get_bf16_scheme",
    "get_int8_scheme",
    "get_num_threads",
    "get_variant_chooser",
    "kernels",
    "linear",
    "measure_peaks",
    "pack",
    "set_bf16_scheme",
    "set_int8_scheme",
    "set_num_threads",
    "set_variant_chooser",
]
