"""Timing for the benchmark harness: ``measure`` (median wall time under a
budget), ``time_checked`` (check a result once, then time it), thread limits
for the baselines (``blas_threads``, ``torch_threads``) and the fp32 peak the
"% of peak" column is taken against.

Contract: nothing here prints a table or knows a suite; a record is a plain
dict that ``time_checked`` and ``add_rates`` fill in place.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

import pykernels as pk

class Timing(NamedTuple):
    median_s: float
    min_s: float
    samples: int   # timed samples the median is taken over
    calls: int     # timed calls in all (a sample may batch several tiny calls)


# A sample covers at least this long, so the ~50 ns cost of reading the clock
# stays under 0.5% even for a 1.6 us call (32^3): tiny calls are timed in
# batches and a sample is the batch mean.
_MIN_SAMPLE_S = 20e-6
_MAX_SAMPLES = 20000


def measure(fn: Callable[[], object], *, budget_s: float = 0.3, min_reps: int = 5,
            warmup_s: Optional[float] = None) -> Timing:
    """Median wall time of ``fn()``: warm up, then sample until the budget runs out.

    Warm-up is at least two calls and ~15% of the budget (first-touch page
    faults, pool threads waking, the CPU clock ramping). Then at least
    ``min_reps`` samples are taken, more until ``budget_s`` has passed.
    """
    clock = time.perf_counter
    if warmup_s is None:
        warmup_s = 0.15 * budget_s
    t0 = clock()
    fn()
    fn()
    n = 2
    while clock() - t0 < warmup_s:
        fn()
        n += 1
    est = (clock() - t0) / n
    inner = max(1, int(_MIN_SAMPLE_S / est)) if est > 0 else 1
    samples: List[float] = []
    deadline = clock() + budget_s
    while len(samples) < min_reps or (clock() < deadline and len(samples) < _MAX_SAMPLES):
        if inner == 1:
            t = clock()
            fn()
            samples.append(clock() - t)
        else:
            t = clock()
            for _ in range(inner):
                fn()
            samples.append((clock() - t) / inner)
    samples.sort()
    mid = len(samples) // 2
    med = samples[mid] if len(samples) % 2 else 0.5 * (samples[mid - 1] + samples[mid])
    return Timing(med, samples[0], len(samples), len(samples) * inner)


def time_checked(rec: dict, make_fn: Callable[[], Callable[[], object]],
                 check: Callable[[object], Tuple[float, float]], *, budget: float,
                 min_reps: int, limit=None) -> dict:
    """Check one implementation's output once, then time it; fills and returns ``rec``.

    ``make_fn()`` builds the no-argument callable; ``check(result)`` returns
    (rel. error, tolerance) of its first result; ``limit`` is a context manager
    (``blas_threads``, ``torch_threads``) held around both, whose value goes to
    ``rec["threads_limited"]``. An exception while building or checking (a
    baseline that cannot run) is recorded as ``error``, not raised; a wrong
    result is recorded with ``ok=False`` and not timed. A timed record gets
    ``median_s``, ``min_s``, ``samples`` and ``calls``; the caller adds rates.
    """
    with contextlib.ExitStack() as stack:
        if limit is not None:
            rec["threads_limited"] = bool(stack.enter_context(limit))
        try:
            fn = make_fn()
            err, tol = check(fn())
        except Exception as e:  # a baseline that cannot run is reported, not fatal
            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
            return rec
        rec["rel_error"] = err
        rec["rel_tol"] = tol
        rec["ok"] = bool(err <= tol)
        if not rec["ok"]:
            return rec
        t = measure(fn, budget_s=budget, min_reps=min_reps)
    rec.update(median_s=t.median_s, min_s=t.min_s, samples=t.samples, calls=t.calls)
    return rec


def add_rates(rec: dict, flops: float, nbytes: Optional[float], peak_core: float,
              threads: int) -> dict:
    """GFLOP/s, GB/s (when ``nbytes`` is given) and % of the ``threads``-core
    fp32 peak of a timed record, in place."""
    if "median_s" in rec:
        t = rec["median_s"]
        rec["gflops"] = flops / t / 1e9
        if nbytes is not None:
            rec["gbytes_per_s"] = nbytes / t / 1e9
        rec["pct_peak"] = 100.0 * flops / t / 1e9 / (peak_core * threads)
    return rec


def have_threadpoolctl() -> bool:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


# The peak probe (pykernels info --peak) of each instruction scheme a kernel
# reports in pk.kernels(): the roofline of that precision on this machine.
SCHEME_PROBE = {"fma": "fp32_fma", "widen_fma": "fp32_fma", "dpbf16ps": "bf16_dpbf16ps",
                "vpmaddwd": "int16_vpmaddwd", "vpmaddubsw": "int8_vpmaddubsw",
                "vpdpbusd": "int8_vpdpbusd"}


def precision_peaks(isa: str, peak_core: float, peak_src: str) -> Dict[Tuple[str, str], Tuple[float, str]]:
    """{(precision, variant): (G ops/s per core, probe name)} for the linear
    kernels in use: the measured one-thread rate of the probe of each kernel's
    scheme. Where the fp32 peak was given by hand or assumed, or the scheme has
    no probe on this ISA (AVX-VNNI's ymm vpdpbusd), the fp32 figure stands in
    and the probe is named "fp32_fma"."""
    measured = {}
    if peak_src.startswith("measured"):
        try:
            peaks = measured_peaks()
            if peaks.isa == isa:
                measured = {name: r.one_thread for name, r in peaks.ops.items()
                            if r.one_thread > 0}
        except Exception:  # noqa: BLE001 - a failed probe must not stop a benchmark
            measured = {}
    out = {}
    for e in pk.kernels():
        if e.op != "linear":
            continue
        probe = SCHEME_PROBE.get(e.scheme, "fp32_fma")
        if probe in measured and probe != "fp32_fma":
            out[(e.precision, e.variant)] = (measured[probe], probe)
        else:
            out[(e.precision, e.variant)] = (peak_core, "fp32_fma")
    return out


def timing_settings(args, isa: str) -> Tuple[float, int, float, str]:
    """(budget in seconds per record, minimum repetitions, peak GFLOP/s per core,
    where that peak comes from) for a ``pykernels bench`` suite's ``args``."""
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.3)
    min_reps = 3 if args.quick else 5
    peak_core, peak_src = peak_per_core(isa, args.peak_gflops)
    return budget, min_reps, peak_core, peak_src


@contextlib.contextmanager
def blas_threads(n: int, *, numpy_only: bool = False):
    """Limit the BLAS pools in this process to ``n`` threads for the block.

    Yields True when the limit was applied (threadpoolctl importable), False
    when the libraries keep their default thread count.

    ``numpy_only=True``: NumPy's BLAS at ``n`` and every other BLAS in the
    process (SciPy wheels bring their own OpenBLAS) at 1: two OpenBLAS pools at
    2 threads on a 2-core machine fight, the idle pool's spinning workers taking
    the core the busy pool waits on (docs/benchmarks.md). NumPy's library is the one whose path lies in the
    numpy package (numpy or numpy.libs); if none does, every BLAS gets ``n``.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        yield False
        return
    libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    mine = libs
    if numpy_only:
        np_dir = os.path.dirname(os.path.abspath(np.__file__))
        mine = [lib for lib in libs if os.path.abspath(lib.filepath).startswith(
            (np_dir + os.sep, np_dir + ".libs"))] or libs
    saved = [(lib, lib.num_threads) for lib in libs]
    try:
        for lib in libs:
            lib.set_num_threads(n if lib in mine else 1)
        yield True
    finally:
        for lib, t in saved:
            lib.set_num_threads(t)


def numpy_blas_threads(n: int):
    """``blas_threads(n, numpy_only=True)``: NumPy's BLAS at ``n``, any other at 1."""
    return blas_threads(n, numpy_only=True)


@contextlib.contextmanager
def torch_threads(torch, n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield True
    finally:
        torch.set_num_threads(prev)


def import_torch():
    """torch if importable, else None (never an error: it is an optional baseline)."""
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return None
    return torch


# fp32 FMA peak per core, GFLOP/s, assumed from the ISA when not given:
# avx512: 2 FMA ports x 16 lanes x 2 flops x ~2.75 GHz = 176 (measured with a
# register-only vfmadd231ps loop on the Xeon in MACHINE.md); avx2: 2 x 8 x 2 x
# ~3.1 GHz = 100; generic: what the compiler's SSE2 auto-vectorization can
# reach, ~a quarter of avx2.
ASSUMED_PEAK_PER_CORE = {"avx512": 176.0, "avx2": 100.0, "generic": 25.0}


@functools.lru_cache(maxsize=1)
def measured_peaks():
    """``pk.measure_peaks()`` once per process: without a cache directory it
    would re-run the probes (seconds) for each table, and the fp32 and int8
    denominators of one table would come from different runs."""
    return pk.measure_peaks()


def peak_per_core(isa: str, override: Optional[float]) -> Tuple[float, str]:
    """(GFLOP/s per core, where it came from): --peak-gflops, else
    PYKERNELS_PEAK_GFLOPS, else this machine's measured fp32 FMA peak on one
    thread (``pykernels.measure_peaks()``, cached per CPU after its first run),
    else a figure assumed for the ISA."""
    if override is not None:
        return float(override), "--peak-gflops"
    env = os.environ.get("PYKERNELS_PEAK_GFLOPS")
    if env:
        try:
            return float(env), "PYKERNELS_PEAK_GFLOPS"
        except ValueError:
            print(f"warning: ignoring PYKERNELS_PEAK_GFLOPS={env!r} (not a number)",
                  file=sys.stderr)
    try:
        peaks = measured_peaks()
        if peaks.isa == isa and peaks.ops["fp32_fma"].one_thread > 0:
            return peaks.ops["fp32_fma"].one_thread, "measured (pykernels info --peak)"
    except Exception as e:  # noqa: BLE001 - a failed probe must not stop a benchmark
        print(f"warning: measuring the peak failed ({e}); using the figure assumed for {isa}",
              file=sys.stderr)
    return ASSUMED_PEAK_PER_CORE.get(isa, 25.0), "assumed"

