"""CPU information, thread control and the kernel registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import _core


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


_DTYPE_TAG = {"fp32": "f32", "bf16": "bf16", "int8": "i8"}


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
    """The registry: one entry per (op, variant, precision) with its fields."""
    return [KernelEntry(**e) for e in _core.kernel_table()]


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
