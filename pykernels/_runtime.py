"""CPU information, thread control and the kernel registry."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Tuple

from . import _core, _peaks


@dataclass(frozen=True)
class CpuInfo:
    """What the machine supports and which kernel path is in use.

    ``isa`` is the path every kernel runs (``"avx512"``, ``"avx2"`` or
    ``"generic"``), chosen once at import from CPUID and XCR0 and capped by
    ``PYKERNELS_ISA``; ``supported_isa`` is the best path this CPU allows.
    """

    isa: str
    supported_isa: str
    features: frozenset
    cores: int
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    vendor: str
    model: str
    gemm_blocking: dict


def cpu_info() -> CpuInfo:
    d = _core.cpu_info()
    return CpuInfo(
        isa=d["isa"],
        supported_isa=d["supported_isa"],
        features=frozenset(d["features"]),
        cores=d["cores"],
        l1d_bytes=d["l1d_bytes"],
        l2_bytes=d["l2_bytes"],
        l3_bytes=d["l3_bytes"],
        vendor=d["vendor"],
        model=d["model"],
        gemm_blocking=dict(d["gemm_blocking"]),
    )


def get_num_threads() -> int:
    """Default number of threads a kernel call may use (the caller included)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the default thread count; ``threads=`` on a call overrides it."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads expects an int >= 1, got {n!r}")
    _core.set_num_threads(min(n, _core.MAX_THREADS))


_DTYPE_TAG = {"fp32": "f32", "bf16": "bf16", "int8": "i8", "int8_7bit": "i8a7"}


@dataclass(frozen=True)
class KernelEntry:
    """One registered kernel: (op, variant, precision) and what runs it.

    The identity is structured data, filled by the C++ tables from the
    constants the kernels are compiled from: ``kernel`` (the kernel family:
    ``linear`` runs the ``gemm`` kernels with a fused epilogue), ``isa``,
    ``scheme`` (the instruction scheme, e.g. ``fma``, ``vpmaddwd``,
    ``vpdpbusd``; for attention the algorithm, ``splitkv`` or ``flash``),
    the register tile ``mr`` x ``nr`` and ``k_step`` (consecutive k per packed
    group); the last three are None where the tile is not fixed (attention).
    ``name`` is derived from these fields for printing; read the fields, never
    parse the name.
    """

    op: str
    variant: str
    precision: str
    isa: str
    kernel: str
    scheme: str
    mr: Optional[int] = None
    nr: Optional[int] = None
    k_step: Optional[int] = None
    name: str = field(init=False)

    def __post_init__(self):
        parts = [self.kernel, self.isa, _DTYPE_TAG.get(self.precision, self.precision), self.scheme]
        if self.mr is not None:  # tiled kernels: both variants share the scheme, so mark latency
            if self.variant == "latency":
                parts.append("lat")
            parts.append(f"{self.mr}x{self.nr}")
        object.__setattr__(self, "name", "_".join(parts))

    @property
    def tile(self) -> Optional[tuple]:
        """(MR, NR) of the register tile, or None."""
        return None if self.mr is None else (self.mr, self.nr)


def kernels() -> list:
    """The registry: one entry per (op, variant, precision) with its fields
    (the bf16 entries show the scheme in use: ``set_bf16_scheme("auto")`` is
    resolved first)."""
    if _bf16["pending"]:
        _resolve_bf16()
    return [KernelEntry(**e) for e in _core.kernel_table()]


# ---------------------------------------------------------------------------
# bf16 scheme: "widen" (bf16 pairs widened to fp32 and multiplied by fp32 FMA:
# widen_fma, or widen_scalar on the generic path; every ISA) or
# "dpbf16ps" (vdpbf16ps on the packed pairs; avx512 with AVX512_BF16). "auto"
# picks by the measured per-core rates, never by CPU name: dpbf16ps where
# vdpbf16ps runs at >= BF16_DOT_MIN_RATIO x the fp32 FMA rate (issue 14: Zen 4
# 234 vs 117 GFLOP/s = 2.0x), widen where it is slower (Sapphire/Emerald
# Rapids 173 vs 351 = 0.49x). The widening tile runs at the FMA rate (its
# conversion is paid once per B strip), so dpbf16ps gains in proportion to the
# ratio; 1.5 rather than 1.0 keeps a CPU measured near parity, where the gain
# would be small and run-to-run noise could flip the choice, on one scheme.
# The choice is made lazily, at the first bf16 linear / kernels() /
# get_bf16_scheme(), from the cached peaks (pykernels.measure_peaks) or, when
# none are cached, by timing just those two probes on one thread (1 ms runs,
# best of 7: 21-32 ms measured on the AVX2 Zen 3 under load); import and
# other calls never measure.

BF16_SCHEMES = ("auto", "widen", "dpbf16ps")
BF16_DOT_MIN_RATIO = 1.5
_BF16_PROBES = ("fp32_fma", "bf16_dpbf16ps")

_bf16_lock = threading.Lock()
# setting: what set_bf16_scheme was given; pending: "auto" not yet resolved;
# reason: why the scheme in use was chosen (pykernels info prints it).
_bf16 = {"setting": "auto", "pending": True, "reason": ""}


def choose_bf16_scheme(fp32_gflops: float, dpbf16_gflops: Optional[float]) -> str:
    """The "auto" rule on measured per-core rates (GFLOP/s, a product-add
    counting 2 for both): ``"dpbf16ps"`` when ``dpbf16_gflops`` is at least
    ``BF16_DOT_MIN_RATIO`` times ``fp32_gflops``, else ``"widen"`` (also
    when the CPU has no vdpbf16ps: ``dpbf16_gflops`` None)."""
    if dpbf16_gflops is None or not fp32_gflops > 0:
        return "widen"
    return "dpbf16ps" if dpbf16_gflops >= BF16_DOT_MIN_RATIO * fp32_gflops else "widen"


def _bf16_rates() -> Tuple[float, float, str]:
    """(fp32 FMA, vdpbf16ps) GFLOP/s on one thread and where they came from."""
    p = _peaks.cached_peaks()
    if p is not None and all(n in p.ops for n in _BF16_PROBES):
        return p.ops["fp32_fma"].one_thread, p.ops["bf16_dpbf16ps"].one_thread, "cached peaks"
    rates = {name: ops / 1e9 for name, ops in _core.measure_probes(list(_BF16_PROBES), 0.001)}
    return rates.get("fp32_fma", 0.0), rates.get("bf16_dpbf16ps", 0.0), "measured now"


def _auto_bf16() -> Tuple[str, str]:
    if not _core.bf16_dot_available():
        return "widen", "auto: vdpbf16ps not available on this CPU / isa path"
    fp32, dot, source = _bf16_rates()
    scheme = choose_bf16_scheme(fp32, dot)
    ratio = dot / fp32 if fp32 > 0 else 0.0
    return scheme, (f"auto: vdpbf16ps {dot:.1f} vs fp32 FMA {fp32:.1f} GFLOP/s per core = "
                    f"{ratio:.2f}x, {'>=' if scheme == 'dpbf16ps' else '<'} "
                    f"{BF16_DOT_MIN_RATIO}x ({source})")


def _resolve_bf16() -> None:
    with _bf16_lock:
        if not _bf16["pending"]:
            return
        scheme, reason = _auto_bf16()
        _core.set_bf16_scheme(scheme)
        _bf16.update(pending=False, reason=reason)


def set_bf16_scheme(scheme: str) -> str:
    """Choose how ``linear`` multiplies bf16 weights; returns the previous
    setting (pass it back to restore).

    ``"auto"`` (the default): by the measured rates, see
    ``choose_bf16_scheme``; decided at the first bf16 use. ``"widen"`` (or its
    name in ``kernels()``: ``"widen_fma"``, ``"widen_scalar"`` on the generic
    path): the packed bf16 pairs are widened to fp32 and multiplied by fp32 FMA
    (every ISA). ``"dpbf16ps"``: ``vdpbf16ps`` multiplies the pairs directly (avx512
    path on CPUs with AVX512_BF16; ValueError elsewhere). Both compute the
    products of the bf16-rounded inputs exactly and sum them in fp32; they
    differ in summation order, and ``dpbf16ps`` flushes denormals to zero
    (docs/kernels.md states the bound). The packed weights are the same: no
    repacking. Process-wide; call it between kernel calls. ``kernels()``
    reports the scheme in use.
    """
    if not isinstance(scheme, str):
        raise ValueError(f"bf16 scheme must be one of {BF16_SCHEMES}, got {scheme!r}")
    with _bf16_lock:
        previous = _bf16["setting"]
        if scheme == "auto":
            _bf16.update(setting="auto", pending=True, reason="")
        else:
            _core.set_bf16_scheme(scheme)  # ValueError naming the choices if unavailable
            _bf16.update(setting=scheme, pending=False, reason="set by set_bf16_scheme")
    return previous


def get_bf16_scheme() -> str:
    """The instruction scheme bf16 ``linear`` calls use now (``"widen_fma"``,
    ``"widen_scalar"`` on the generic path, or ``"dpbf16ps"``; resolves
    ``"auto"`` if it is still pending)."""
    if _bf16["pending"]:
        _resolve_bf16()
    for e in _core.kernel_table():
        if e["op"] == "linear" and e["precision"] == "bf16":
            return e["scheme"]
    raise RuntimeError("no bf16 kernel in the registry")


def explain_bf16_scheme() -> str:
    """One line: the bf16 scheme in use and why (what ``pykernels info`` prints)."""
    scheme = get_bf16_scheme()
    return f"{scheme} ({_bf16['reason']})"


INT8_SCHEMES = ("default", "vpmaddubsw")


def set_int8_scheme(scheme: str) -> str:
    """Choose how ``linear`` multiplies int8 weights; returns the previous
    scheme's name (pass it back to restore).

    ``scheme``: ``"default"``, ``"vpmaddubsw"``, or a name this function
    returned (the default scheme's own name). ``"default"``: the exact scheme the CPU was given at import (``vpmaddwd``
    on AVX2, ``vpdpbusd`` on VNNI CPUs): activations quantized per row to 8
    bits (step max|row| / 127). ``"vpmaddubsw"`` (AVX2 and generic paths, for
    CPUs without VNNI): activations quantized to 7 bits (step max|row| / 63, so
    about twice the activation rounding error) so that ``vpmaddubsw``'s int16
    pair sums cannot saturate (2 * 255 * 63 = 32130 < 32767); the int32 sums
    are exact and the speed is about twice ``vpmaddwd``'s at compute-bound
    sizes. The packed weights are the same for both: no repacking.
    Process-wide, like ``set_num_threads``; call it between kernel calls, not
    while another thread runs one. ``kernels()`` reports the scheme in use.
    """
    if not isinstance(scheme, str):
        raise ValueError(f"scheme must be one of {INT8_SCHEMES}, got {scheme!r}")
    return _core.set_int8_scheme(scheme)  # ValueError naming the choices if unavailable


def get_int8_scheme() -> str:
    """The instruction scheme int8 ``linear`` calls use now (e.g. ``"vpmaddwd"``)."""
    for e in _core.kernel_table():
        if e["op"] == "linear" and e["precision"] == "int8":
            return e["scheme"]
    raise RuntimeError("no int8 kernel in the registry")


def fork_join_us(threads: int = 2, spin: bool = True, reps: int = 2000) -> float:
    """Median cost in microseconds of one parallel region in which ``threads``
    threads all take part (each task waits for the others, so the fork really
    reaches every worker). ``spin``: workers spin between regions (latency
    variant) rather than park (throughput variant)."""
    for name, v in (("threads", threads), ("reps", reps)):
        if type(v) is not int or not 1 <= v <= 1_000_000:
            raise ValueError(f"{name} must be an int in [1, 1000000], got {v!r}")
    return _core.fork_join_ns(threads=min(threads, _core.MAX_THREADS), spin=bool(spin),
                              reps=reps) / 1000.0
