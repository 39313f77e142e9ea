"""Measured peaks of this machine: instruction rates and read bandwidth.

``measure_peaks()`` runs register-only probes compiled in the translation unit
of the ISA in use (fp32 FMA on every path; on AVX2 also the int8 schemes'
``vpmaddwd`` and ``vpmaddubsw`` steps; on AVX-512 also ``vdpbf16ps`` and
``vpdpbusd`` where the CPU has them) on 1 and on all threads, and times
sequential reads of L2-, L3- and DRAM-sized working sets. The result is cached
per CPU model, ISA and thread count in the user cache directory, so only the
first call (a few seconds) measures.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional

from . import _core

# 2: the int8 probes stopped measuring GCC's stack traffic (AVX2 vpmaddwd
# 60-79 -> 144-157 GOP/s per core on Zen 3): figures cached by version 1
# would halve every int8 peak.
_CACHE_VERSION = 2


@dataclass(frozen=True)
class Rate:
    """A rate on one thread and on ``Peaks.threads`` threads."""

    one_thread: float
    all_threads: float


@dataclass(frozen=True)
class Peaks:
    """Measured peaks (best of 7 runs: other processes only slow a probe down).

    ``ops``: G operations/s per probe, keyed by probe name: ``"fp32_fma"``
    (GFLOP/s, an FMA counts 2), ``"int16_vpmaddwd"``, ``"int8_vpmaddubsw"``,
    ``"int8_vpdpbusd"`` (GOP/s, a multiply-add counts 2, including the adds the
    kernels' schemes need), ``"bf16_dpbf16ps"`` (GFLOP/s). ``read_gbs``: GB/s of
    sequential reads keyed ``"l2"``, ``"l3"``, ``"dram"``; ``working_set``
    their sizes in bytes (per thread for l2, in total otherwise).
    """

    cpu_model: str
    isa: str
    threads: int
    ops: dict
    read_gbs: dict
    working_set: dict

    @property
    def fp32_gflops(self) -> float:
        """fp32 FMA GFLOP/s on all threads: the denominator of "% of peak"."""
        return self.ops["fp32_fma"].all_threads

    @property
    def dram_gbs(self) -> float:
        """DRAM read GB/s on all threads: the roof of weight-streaming kernels."""
        return self.read_gbs["dram"].all_threads


def _cache_path(model: str, isa: str, threads: int) -> Optional[str]:
    try:
        import platformdirs
    except ImportError:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-")[:80] or "cpu"
    return os.path.join(platformdirs.user_cache_dir("pykernels"),
                        f"peaks-v{_CACHE_VERSION}-{slug}-{isa}-t{threads}.json")


def _from_dict(d: dict) -> Peaks:
    return Peaks(cpu_model=d["cpu_model"], isa=d["isa"], threads=int(d["threads"]),
                 ops={k: Rate(**v) for k, v in d["ops"].items()},
                 read_gbs={k: Rate(**v) for k, v in d["read_gbs"].items()},
                 working_set={k: int(v) for k, v in d["working_set"].items()})


def cached_peaks() -> Optional[Peaks]:
    """The cached peaks of this CPU model and ISA without measuring: those of
    the current thread count, else of any thread count (the one-thread rates do
    not depend on it); None when nothing is cached."""
    info = _core.cpu_info()
    path = _cache_path(info["model"], info["isa"], _core.get_num_threads())
    if path is None:
        return None
    folder = os.path.dirname(path)
    prefix = os.path.basename(path).rsplit("-t", 1)[0] + "-t"
    try:
        others = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json"))
    except OSError:
        return None
    for name in [os.path.basename(path)] + others:
        try:
            with open(os.path.join(folder, name)) as f:
                return _from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def measure_peaks(refresh: bool = False, seconds: float = 0.02) -> Peaks:
    """The machine's measured peaks (see ``Peaks``), from the cache unless
    ``refresh`` or none is cached for this CPU model, ISA and thread count.
    ``seconds``: length of one timed run (7 per probe and thread count)."""
    if not isinstance(seconds, (int, float)) or not 0.001 <= seconds <= 10:
        raise ValueError(f"seconds must be a number in [0.001, 10], got {seconds!r}")
    info = _core.cpu_info()
    threads = _core.get_num_threads()
    path = _cache_path(info["model"], info["isa"], threads)
    if path and not refresh:
        try:
            with open(path) as f:
                return _from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: measure again
    r = _core.measure_peaks(float(seconds))
    l2 = info["l2_bytes"]
    l3 = info["l3_bytes"] or 8 << 20
    peaks = Peaks(
        cpu_model=info["model"], isa=r["isa"], threads=r["threads"],
        ops={name: Rate(one / 1e9, all_ / 1e9) for name, one, all_ in r["ops"]},
        read_gbs={name: Rate(one / 1e9, all_ / 1e9) for name, one, all_ in r["read"]},
        working_set={"l2": l2 // 2, "l3": l3 // 2, "dram": max(8 * l3, 256 << 20)},
    )
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(asdict(peaks), f)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache directory costs a re-measure, nothing else
    return peaks
