"""The ``pykernels`` command line (also ``python -m pykernels``).

Subcommands live in ``COMMANDS``: name -> (add_arguments, run). ``add_arguments``
fills the subcommand's ``argparse`` parser; ``run(args) -> int`` does the work
and returns the exit code; the first line of ``run``'s docstring is the help
text. A new subcommand (``demo``, ``calibrate``, ``plan``, ``serve``) is one
entry in that dict.

``pykernels bench SUITE`` works the same way one level down: ``BENCH_SUITES``
maps a suite name (``gemm``, ``linear``, ``attention``) to
(add_arguments, run). The options every suite shares (``--quick``,
``--threads``, ``--json``, ``--peak-gflops``, ``--budget``) are added by
``_add_common_bench_arguments``; a suite adds its own (``--shapes``).

The timing, baseline and machine helpers here (``measure``, ``machine_record``,
``GEMM_TARGETS``) are also used by the pytest-benchmark suites in ``bench/``,
so the CLI table and the pytest-benchmark JSON measure the same shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from ._argtypes import positive_float, positive_int

# --------------------------------------------------------------------------
# Machine record: what a figure was measured on (printed by `info`, written
# into every --json file and into pytest-benchmark's machine_info).
# --------------------------------------------------------------------------

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> Optional[dict]:
    """The commit of the source tree pykernels was imported from, or None.

    Returns {"id": sha, "dirty": bool} when the package sits in a git
    checkout (editable install or PYTHONPATH), None for an installed wheel.
    """
    try:
        sha = subprocess.run(["git", "-C", _REPO_ROOT, "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", _REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5)
        return {"id": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info_dict() -> dict:
    import pykernels as pk

    d = dataclasses.asdict(pk.cpu_info())
    d["features"] = sorted(d["features"])
    return d


def blas_info() -> List[dict]:
    """The BLAS libraries loaded in this process (threadpoolctl), or []."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads",
            "threading_layer", "architecture")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


def machine_record() -> dict:
    """Everything a benchmark figure depends on, as plain JSON-able data."""
    import pykernels as pk

    rec = {
        "pykernels_version": pk.__version__,
        "git_commit": git_commit(),
        "cpu_info": cpu_info_dict(),
        "num_threads": pk.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("PYKERNELS_ISA", "PYKERNELS_NUM_THREADS",
                                               "PYKERNELS_PEAK_GFLOPS", "OMP_NUM_THREADS",
                                               "OPENBLAS_NUM_THREADS")},
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "platform": platform.platform(),
    }
    try:
        import scipy
        rec["scipy_version"] = scipy.__version__
    except ImportError:
        rec["scipy_version"] = None
    rec["blas"] = blas_info()
    return rec


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

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


def rel_error(got, ref64) -> float:
    """Relative Frobenius error of ``got`` against a float64 reference."""
    got = np.asarray(got, dtype=np.float64)
    denom = float(np.linalg.norm(ref64))
    diff = float(np.linalg.norm(got - ref64))
    if denom == 0.0:
        return diff
    return diff / denom


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


def write_bench_json(path: str, suite: str, *, torch, have_tpc: bool, peak_core: float,
                     peak_src: str, quick: bool, budget: float, min_reps: int, rel_tol,
                     results: List[dict], summary: List[dict], **extra) -> None:
    """The ``--json`` document every ``pykernels bench`` suite writes
    (schema ``pykernels-bench/1``): the machine, the settings, the records."""
    doc = {
        "schema": "pykernels-bench/1",
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "machine": machine_record(),
        "torch_version": getattr(torch, "__version__", None),
        "numpy_version": np.__version__,
        "git_commit": git_commit(),
        "cpu_info": cpu_info_dict(),
        "blas_threads_limited": have_tpc,
        "peak_gflops_per_core": peak_core,
        "peak_source": peak_src,
        "quick": bool(quick),
        "budget_s": budget,
        "min_reps": min_reps,
        "rel_tol": rel_tol,
        "results": results,
        "summary": summary,
    }
    doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def _timing_settings(args, isa: str) -> Tuple[float, int, float, str]:
    """(budget in seconds per record, minimum repetitions, peak GFLOP/s per core,
    where that peak comes from) for a ``pykernels bench`` suite's ``args``."""
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.3)
    min_reps = 3 if args.quick else 5
    peak_core, peak_src = peak_per_core(isa, args.peak_gflops)
    return budget, min_reps, peak_core, peak_src


def finish_bench(path: Optional[str], failed: bool, out, suite: str, **doc) -> int:
    """The end of every ``pykernels bench`` suite: write the ``--json`` document
    (``write_bench_json(path, suite, **doc)``) when ``path`` is given, and return
    the exit status, 1 when a pykernels result was wrong or did not run."""
    if path:
        write_bench_json(path, suite, **doc)
        print(f"wrote {path}", file=out)
    if failed:
        print("FAILED: a pykernels result was wrong or did not run (see rows marked WRONG/ERROR)",
              file=sys.stderr)
        return 1
    return 0


# fp32 GEMM error grows like sqrt(K)*eps: at K=4096, 64 * 6e-8 ~ 4e-6, so 1e-4
# leaves a 25x margin for every target shape and still catches a wrong tile.
GEMM_REL_TOL = 1e-4


def fmt_time(s: Optional[float]) -> str:
    """3 significant figures in us, ms or s: '1.60 us', '34.2 us', '5.65 ms'."""
    if s is None or not math.isfinite(s):
        return "-"
    for scale, unit in ((1e6, "us"), (1e3, "ms"), (1.0, "s")):
        v = s * scale
        if v < 1000 or unit == "s":
            if v < 10:
                return f"{v:.2f} {unit}"
            if v < 100:
                return f"{v:.1f} {unit}"
            return f"{v:.0f} {unit}"
    return "-"


@contextlib.contextmanager
def blas_threads(n: int, *, numpy_only: bool = False):
    """Limit the BLAS pools in this process to ``n`` threads for the block.

    Yields True when the limit was applied (threadpoolctl importable), False
    when the libraries keep their default thread count.

    ``numpy_only=True``: NumPy's BLAS at ``n`` and every other BLAS in the
    process (SciPy wheels bring their own OpenBLAS) at 1. Two OpenBLAS pools at
    2 threads on a 2-core machine fight: the idle pool's workers spin after a
    wake-up and take the core the busy pool waits on (measured here: a
    64x384x384 np.matmul went from 0.2 ms to 48 ms once SciPy's OpenBLAS was
    loaded at 2 threads). NumPy's library is the one whose path lies in the
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


# --------------------------------------------------------------------------
# Peak FLOP rate (for "% of peak")
# --------------------------------------------------------------------------

# fp32 FMA peak per core, GFLOP/s, assumed from the ISA when not given:
# avx512: 2 FMA ports x 16 lanes x 2 flops x ~2.75 GHz = 176 (measured with a
# register-only vfmadd231ps loop on the Xeon in MACHINE.md); avx2: 2 x 8 x 2 x
# ~3.1 GHz = 100; generic: what the compiler's SSE2 auto-vectorization can
# reach, ~a quarter of avx2.
ASSUMED_PEAK_PER_CORE = {"avx512": 176.0, "avx2": 100.0, "generic": 25.0}


def peak_per_core(isa: str, override: Optional[float]) -> Tuple[float, str]:
    """(GFLOP/s per core, where it came from)."""
    if override is not None:
        return float(override), "--peak-gflops"
    env = os.environ.get("PYKERNELS_PEAK_GFLOPS")
    if env:
        try:
            return float(env), "PYKERNELS_PEAK_GFLOPS"
        except ValueError:
            print(f"warning: ignoring PYKERNELS_PEAK_GFLOPS={env!r} (not a number)",
                  file=sys.stderr)
    return ASSUMED_PEAK_PER_CORE.get(isa, 25.0), "assumed"


# --------------------------------------------------------------------------
# bench gemm
# --------------------------------------------------------------------------

class GemmShape(NamedTuple):
    m: int
    k: int
    n: int
    threads: Optional[int]  # None: the run's thread count (--threads or the default)
    big: bool = False       # skipped by --quick

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n}"


# The targets of issue 2, in its order. threads=None runs at the default
# thread count (2 on the target machine); small cubes are pinned to 1 thread as
# the targets state.
GEMM_TARGETS: Tuple[GemmShape, ...] = (
    GemmShape(1, 4096, 4096, None),
    GemmShape(4, 4096, 4096, None),
    GemmShape(16, 4096, 4096, None),
    GemmShape(8, 1024, 1024, None),
    GemmShape(32, 32, 32, 1),
    GemmShape(64, 64, 64, 1),
    GemmShape(128, 128, 128, 1),
    GemmShape(128, 128, 128, 2),
    GemmShape(1024, 1024, 1024, None),
    GemmShape(2048, 2048, 2048, None, big=True),
    GemmShape(256, 4096, 4096, None, big=True),
)

# A smoke set: small, with edges that are not multiples of any tile size.
GEMM_QUICK: Tuple[GemmShape, ...] = (
    GemmShape(1, 256, 256, None),
    GemmShape(8, 64, 64, 1),
    GemmShape(32, 32, 32, 1),
    GemmShape(37, 70, 45, None),
)


def parse_gemm_shapes(text: str) -> List[GemmShape]:
    """``"MxKxN[@T],..."`` -> shapes; ``@T`` pins that shape's thread count."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        threads = None
        if "@" in item:
            item, t = item.split("@", 1)
            try:
                threads = int(t)
            except ValueError:
                raise ValueError(f"bad thread count {t!r} in shape {item}@{t}") from None
            if threads < 1:
                raise ValueError(f"thread count must be >= 1 in {item}@{t}")
        parts = item.split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            dims = []
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"bad shape {item!r}: expected MxKxN with positive integers, "
                             f"for example 8x1024x1024 (optionally @threads)")
        shapes.append(GemmShape(dims[0], dims[1], dims[2], threads))
    if not shapes:
        raise ValueError("--shapes is empty")
    return shapes


class GemmCase(NamedTuple):
    impl: str                 # "pykernels" | "numpy" | "scipy" | "torch"
    variant: Optional[str]    # pykernels: "latency" | "throughput"; baselines: None
    b: str                    # "packed" | "raw"

    @property
    def label(self) -> str:
        if self.impl == "pykernels":
            return f"{self.variant} {self.b}"
        return self.impl


OUR_GEMM_CASES = (
    GemmCase("pykernels", "latency", "packed"),
    GemmCase("pykernels", "latency", "raw"),
    GemmCase("pykernels", "throughput", "packed"),
)
BASELINE_GEMM_CASES = (
    GemmCase("numpy", None, "raw"),
    GemmCase("scipy", None, "raw"),
    GemmCase("torch", None, "raw"),
)


class GemmProblem:
    """Inputs, the prepacked weight, output buffers and the float64 reference."""

    def __init__(self, m: int, k: int, n: int, seed: int = 0):
        import pykernels as pk

        rng = np.random.default_rng(seed)
        self.m, self.k, self.n = m, k, n
        self.a = rng.standard_normal((m, k), dtype=np.float32)
        self.b = rng.standard_normal((k, n), dtype=np.float32)
        self.packed = pk.pack(self.b)
        self.ref = self.a.astype(np.float64) @ self.b.astype(np.float64)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    @property
    def bytes_moved(self) -> int:
        """Bytes of A, B and C touched at least once (the memory-bound floor)."""
        return 4 * (self.m * self.k + self.k * self.n + self.m * self.n)

    def call(self, case: GemmCase, threads: int, torch=None) -> Callable[[], np.ndarray]:
        """A no-argument callable computing a @ b into a preallocated output.

        Every implementation writes into its own preallocated buffer, as a
        serving loop would; the callables are ``functools.partial`` objects so
        the Python overhead measured is the library's, not a lambda's.
        """
        import pykernels as pk

        out = np.empty((self.m, self.n), dtype=np.float32)
        if case.impl == "pykernels":
            b = self.packed if case.b == "packed" else self.b
            return functools.partial(pk.gemm, self.a, b, out=out, variant=case.variant,
                                     threads=threads)
        if case.impl == "numpy":
            return functools.partial(np.matmul, self.a, self.b, out=out)
        if case.impl == "scipy":
            from scipy.linalg.blas import sgemm

            # Fortran BLAS on C-order data without copies: C^T = B^T A^T, where
            # b.T, a.T and out.T are Fortran-contiguous views. (Passing a and b
            # directly would make f2py copy both to Fortran order per call.)
            ct = out.T
            fn = functools.partial(sgemm, 1.0, self.b.T, self.a.T, beta=0.0, c=ct,
                                   overwrite_c=1)

            def scipy_call(fn=fn, out=out):
                fn()
                return out
            return scipy_call
        if case.impl == "torch":
            ta = torch.from_numpy(self.a)
            tb = torch.from_numpy(self.b)
            tout = torch.from_numpy(out)
            mm = functools.partial(torch.matmul, ta, tb, out=tout)

            def torch_call(mm=mm, out=out):
                mm()
                return out
            return torch_call
        raise ValueError(f"unknown impl {case.impl!r}")


def _thread_plan(shapes, threads_opt: Optional[int], default_threads: int):
    """(shape, threads) pairs: --threads overrides every shape; else a pinned
    count wins and the rest run at the default. Duplicates are dropped."""
    seen, plan = set(), []
    for s in shapes:
        t = threads_opt if threads_opt is not None else (s.threads or default_threads)
        key = (s.m, s.k, s.n, t)
        if key not in seen:
            seen.add(key)
            plan.append((s, t))
    return plan


def _add_gemm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", metavar="MxKxN[@T],...",
                   help="shapes to time instead of the issue's targets, for example "
                        "'8x1024x1024,128x128x128@1' (@T pins that shape's thread count)")
    p.add_argument("--no-baselines", action="store_true",
                   help="time pykernels only (no NumPy/SciPy/torch)")


def run_bench_gemm(args) -> int:
    """fp32 GEMM: latency and throughput variants against NumPy, SciPy BLAS and torch."""
    import pykernels as pk

    info = pk.cpu_info()
    default_threads = pk.get_num_threads()
    if args.shapes:
        try:
            shapes = parse_gemm_shapes(args.shapes)
        except ValueError as e:
            print(f"pykernels bench gemm: error: {e}", file=sys.stderr)
            return 2
    else:
        shapes = [s for s in GEMM_TARGETS if not (args.quick and s.big)]
    plan = _thread_plan(shapes, args.threads, default_threads)
    budget, min_reps, peak_core, peak_src = _timing_settings(args, info.isa)

    torch = None if args.no_baselines else import_torch()
    baselines = [] if args.no_baselines else [
        c for c in BASELINE_GEMM_CASES if c.impl != "torch" or torch is not None]
    cases = list(OUR_GEMM_CASES) + baselines
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench gemm: fp32, isa {info.isa} ({info.vendor} {info.model}, "
          f"{info.cores} cores), pykernels {pk.__version__}", file=out)
    base_note = [f"NumPy {np.__version__}"]
    if not args.no_baselines:
        try:
            import scipy
            base_note.append(f"SciPy {scipy.__version__}")
        except ImportError:
            pass
        base_note.append(f"torch {torch.__version__}" if torch is not None else
                         "torch not installed")
    print("baselines: " + ", ".join(base_note) + "; " +
          ("BLAS threads limited to each row's count with threadpoolctl"
           if have_tpc else
           "threadpoolctl not installed: NumPy/SciPy used their default threads"), file=out)
    if peak_src == "assumed":
        print(f"peak: {peak_core:g} GFLOP/s per core, assumed for {info.isa}; "
              f"set the measured figure with --peak-gflops or PYKERNELS_PEAK_GFLOPS", file=out)
    else:
        print(f"peak: {peak_core:g} GFLOP/s per core (from {peak_src})", file=out)
    print(f"timing: median over >= {min_reps} samples in {budget:g} s per case after "
          f"warm-up; every result checked against float64 (rel. error < {GEMM_REL_TOL:g})",
          file=out)
    out.flush()

    print(file=out)
    print(_ROW_FMT.format("shape", "thr", "pykernels", "median", "GFLOP/s", "%peak",
                          "GB/s", "NumPy", "NumPy/ours"), file=out)
    results: List[dict] = []
    failed = False
    prev_blas = False
    for shape, threads in plan:
        prob = GemmProblem(shape.m, shape.k, shape.n)
        row: Dict[str, dict] = {}
        for case in cases:
            # OpenBLAS workers spin ~0.1 s after a call before sleeping; on a
            # 2-core machine they would steal a core from the next case.
            if prev_blas and case.impl == "pykernels":
                time.sleep(0.15)
            prev_blas = case.impl in ("numpy", "scipy", "torch")
            rec = {"op": "gemm", "m": shape.m, "k": shape.k, "n": shape.n,
                   "threads": threads, "impl": case.impl, "variant": case.variant,
                   "precision": "fp32", "b": case.b, "isa": info.isa,
                   "flops": prob.flops}
            limit = (blas_threads(threads) if case.impl in ("numpy", "scipy") else
                     torch_threads(torch, threads) if case.impl == "torch" else None)
            time_checked(rec, functools.partial(prob.call, case, threads, torch),
                         lambda got, ref=prob.ref: (rel_error(got, ref), GEMM_REL_TOL),
                         budget=budget, min_reps=min_reps, limit=limit)
            add_rates(rec, prob.flops, prob.bytes_moved, peak_core, threads)
            if case.impl == "pykernels" and not (rec.get("ok") and "median_s" in rec):
                failed = True
            row[case.label] = rec
            results.append(rec)
        _print_gemm_rows(shape, threads, row, out)
        out.flush()
        del prob

    summary = _gemm_summary(results, baselines)
    _print_gemm_summary(summary, baselines, out)

    return finish_bench(args.json, failed, out, "gemm", torch=torch, have_tpc=have_tpc,
                        peak_core=peak_core, peak_src=peak_src, quick=args.quick, budget=budget,
                        min_reps=min_reps, rel_tol=GEMM_REL_TOL, results=results,
                        summary=summary)


def _best(recs: List[dict], **match) -> Optional[dict]:
    """The fastest correct, timed record whose fields equal ``match``, or None."""
    ok = [r for r in recs if r.get("ok") and "median_s" in r
          and all(r.get(k) == v for k, v in match.items())]
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def _group(results: List[dict], keys: Tuple[str, ...]) -> Dict[tuple, List[dict]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


_ROW_FMT = "{:<15} {:>3}  {:<18} {:>9} {:>8} {:>6} {:>7}  {:>9} {:>10}"


def _cell_time(rec: Optional[dict]) -> str:
    if rec is None:
        return "-"
    if "error" in rec:
        return "ERROR"
    if not rec.get("ok", False):
        return "WRONG"
    return fmt_time(rec["median_s"])


def _print_gemm_rows(shape: GemmShape, threads: int, row: Dict[str, dict], out) -> None:
    np_rec = row.get("numpy")
    np_ok = np_rec is not None and np_rec.get("ok") and "median_s" in np_rec
    first = True
    for label, rec in row.items():
        if rec["impl"] != "pykernels":
            continue
        timed = rec.get("ok") and "median_s" in rec
        ratio = (f"{np_rec['median_s'] / rec['median_s']:.2f}x" if timed and np_ok else "-")
        print(_ROW_FMT.format(
            shape.label if first else "", threads if first else "", label, _cell_time(rec),
            f"{rec['gflops']:.1f}" if timed else "-",
            f"{rec['pct_peak']:.0f}%" if timed else "-",
            f"{rec['gbytes_per_s']:.1f}" if timed else "-",
            _cell_time(np_rec) if first else "", ratio), file=out)
        if not timed:
            why = rec.get("error") or f"rel. error {rec.get('rel_error', float('nan')):.3g}"
            print(f"{'':20}^ {label}: {why}", file=out)
        first = False


def _gemm_summary(results: List[dict], baselines) -> List[dict]:
    """Per (shape, threads): the fastest correct pykernels case and its ratio
    to each baseline (baseline median / ours; > 1 means pykernels is faster)."""
    summary = []
    for (m, k, n, t), recs in _group(results, ("m", "k", "n", "threads")).items():
        best = _best(recs, impl="pykernels")
        entry = {"m": m, "k": k, "n": n, "threads": t,
                 "best": None if best is None else {
                     "variant": best["variant"], "b": best["b"], "median_s": best["median_s"],
                     "gflops": best["gflops"], "pct_peak": best["pct_peak"]},
                 "baselines": {}}
        for c in baselines:
            rec = _best(recs, impl=c.impl)
            if rec is None:
                entry["baselines"][c.impl] = None
                continue
            entry["baselines"][c.impl] = {
                "median_s": rec["median_s"], "gflops": rec["gflops"],
                "ratio": rec["median_s"] / best["median_s"] if best else None}
        summary.append(entry)
    return summary


def _baseline_cell(b: Optional[dict], ratio_width: int = 6) -> str:
    """A summary cell for one baseline (``None``: it did not run): its median and
    its median / our best, 10 + ``ratio_width`` characters wide."""
    if b is None:
        return f"{'-':>{10 + ratio_width}}"
    ratio = f"{b['ratio']:.2f}x" if b["ratio"] is not None else "-"
    return f"{fmt_time(b['median_s']):>9} {ratio:>{ratio_width}}"


def _print_gemm_summary(summary: List[dict], baselines, out) -> None:
    print(file=out)
    print("best of pykernels vs each baseline (baseline median / ours: > 1 means pykernels "
          "is faster)", file=out)
    names = [c.impl for c in baselines]
    head = "{:<15} {:>3}  {:<18} {:>9} {:>8}".format("shape", "thr", "best ours", "median",
                                                      "GFLOP/s")
    display = {"numpy": "NumPy", "scipy": "SciPy", "torch": "torch"}
    head += "".join(f"  {display.get(n, n):>17}" for n in names)
    print(head, file=out)
    for e in summary:
        best = e["best"]
        line = "{:<15} {:>3}  {:<18} {:>9} {:>8}".format(
            f"{e['m']}x{e['k']}x{e['n']}", e["threads"],
            f"{best['variant']} {best['b']}" if best else "-",
            fmt_time(best["median_s"]) if best else "-",
            f"{best['gflops']:.1f}" if best else "-")
        for n in names:
            line += "  " + _baseline_cell(e["baselines"].get(n), ratio_width=7)
        print(line, file=out)


# --------------------------------------------------------------------------
# bench linear
# --------------------------------------------------------------------------

# Shapes of issue 3: the foundation issue's K = N = 4096 rows, the MiniLM
# (all-MiniLM-L6-v2) projections K=384 -> N=1152 (QKV), 384 (attention out),
# 1536 (FFN up) and K=1536 -> N=384 (FFN down) at M from 1 to 4096 rows, and
# the 2048^3 target. threads=None: the run's thread count (2 on the target).
_MINILM_KN = ((384, 1152), (384, 384), (384, 1536), (1536, 384))
LINEAR_TARGETS: Tuple[GemmShape, ...] = (
    GemmShape(1, 4096, 4096, None),
    GemmShape(16, 4096, 4096, None),
    GemmShape(256, 4096, 4096, None, big=True),
) + tuple(GemmShape(m, k, n, None, big=m >= 4096)
          for k, n in _MINILM_KN for m in (1, 32, 256, 4096)) + (
    GemmShape(2048, 2048, 2048, None, big=True),
)
# A smoke set: small, with edges that are not multiples of any tile or k-group.
LINEAR_QUICK: Tuple[GemmShape, ...] = (
    GemmShape(1, 384, 384, None),
    GemmShape(32, 384, 1152, None),
    GemmShape(37, 70, 45, None),
)
# "Fused bias+GELU costs <= 5% over the bare GEMM at M=256, K=N=4096" (issue 3).
LINEAR_FUSED_TARGET = GemmShape(256, 4096, 4096, None)
LINEAR_FUSED_QUICK = GemmShape(64, 384, 384, None)
LINEAR_FUSED_MAX_OVERHEAD = 0.05

LINEAR_PRECISIONS = ("fp32", "bf16", "int8")
# The accuracy contract of issue 3 (relative Frobenius error vs float64 on
# Gaussian data): what a pykernels result is checked against. Baselines get
# the same bound for their precision, except torch's dynamic int8, which
# quantizes per tensor with 7-bit activations (reduce_range) and is only
# checked for computing the same product (rel. error < 0.1).
LINEAR_REL_TOL = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2}
LINEAR_BASELINE_REL_TOL = {"fp32": 1e-5, "bf16": 1e-2, "int8": 1e-1}


class LinearCase(NamedTuple):
    impl: str                 # "pykernels" | "numpy" | "torch"
    precision: str            # "fp32" | "bf16" | "int8"
    variant: Optional[str]    # pykernels: "latency" | "throughput"; baselines: None

    @property
    def label(self) -> str:
        if self.impl == "pykernels":
            return f"{self.precision} {self.variant}"
        return f"{self.impl} {self.precision}"


OUR_LINEAR_CASES = tuple(LinearCase("pykernels", p, v) for p in LINEAR_PRECISIONS
                         for v in ("latency", "throughput"))
BASELINE_LINEAR_CASES = (
    LinearCase("numpy", "fp32", None),   # x @ w, + b (then the activation) in NumPy
    LinearCase("torch", "fp32", None),   # torch.nn.functional.linear, float32
    LinearCase("torch", "bf16", None),   # torch.nn.functional.linear, bfloat16 tensors
    LinearCase("torch", "int8", None),   # torch.ao.quantization.quantize_dynamic(Linear)
)


def gelu_numpy(v: np.ndarray) -> np.ndarray:
    """GELU (erf form) in place on a float32 array, as a NumPy user would write it."""
    from scipy.special import erf

    t = erf(v * np.float32(1.0 / math.sqrt(2.0)))
    t += np.float32(1.0)
    v *= np.float32(0.5)
    v *= t
    return v


class LinearProblem:
    """Inputs of one linear shape, the prepacked weights of every precision,
    the float64 references (bare ``x @ w + b`` and with GELU), built once and
    shared by every implementation timed on it."""

    def __init__(self, m: int, k: int, n: int, seed: int = 0,
                 precisions: Tuple[str, ...] = LINEAR_PRECISIONS):
        import pykernels as pk
        # SciPy (erf for GELU) may load its own OpenBLAS: load it now, before any
        # thread limit is set, so numpy_blas_threads sees and parks it.
        import scipy.special  # noqa: F401

        rng = np.random.default_rng(seed)
        self.m, self.k, self.n = m, k, n
        self.x = rng.standard_normal((m, k), dtype=np.float32)
        self.w = rng.standard_normal((k, n), dtype=np.float32)     # (K, N): x @ w
        self.bias = rng.standard_normal(n, dtype=np.float32)
        self.packed = {p: pk.pack(self.w, precision=p) for p in precisions}
        self.ref = self.x.astype(np.float64) @ self.w.astype(np.float64)
        self.ref += self.bias
        self._ref_gelu = None
        self._torch = {}

    def ref_for(self, activation: Optional[str]) -> np.ndarray:
        if activation is None:
            return self.ref
        if activation != "gelu":
            raise ValueError(f"no reference for activation {activation!r}")
        if self._ref_gelu is None:
            from scipy.special import erf

            self._ref_gelu = 0.5 * self.ref * (1.0 + erf(self.ref / math.sqrt(2.0)))
        return self._ref_gelu

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def bytes_moved(self, precision: str) -> int:
        """Bytes of x, the weight (in its stored precision) and the output touched
        once: the memory-bound floor (M = 1 is weight-bandwidth bound)."""
        wbytes = {"fp32": 4, "bf16": 2, "int8": 1}[precision]
        return 4 * self.m * self.k + wbytes * self.k * self.n + 4 * self.m * self.n

    def call(self, case: LinearCase, threads: int, torch=None, *, bias: bool = True,
             activation: Optional[str] = None) -> Callable[[], np.ndarray]:
        """A no-argument callable computing activation(x @ w + b) (bias optional),
        returning a float32 NumPy array (or an array-like the check converts).

        pykernels and NumPy write into a preallocated output, as a serving loop
        would; torch returns a new tensor per call (F.linear has no ``out=``)."""
        import pykernels as pk

        b = self.bias if bias else None
        if case.impl == "pykernels":
            out = np.empty((self.m, self.n), dtype=np.float32)
            return functools.partial(pk.linear, self.x, self.packed[case.precision], b,
                                     activation=activation, out=out, variant=case.variant,
                                     threads=threads)
        if case.impl == "numpy":
            if case.precision != "fp32":
                raise ValueError("the NumPy baseline is fp32 only")
            out = np.empty((self.m, self.n), dtype=np.float32)
            x, w = self.x, self.w

            def numpy_linear(out=out):
                np.matmul(x, w, out=out)
                if b is not None:
                    out += b
                if activation == "gelu":
                    gelu_numpy(out)
                elif activation is not None:
                    raise ValueError(f"NumPy baseline: activation {activation!r}")
                return out
            return numpy_linear
        if case.impl == "torch":
            return self._torch_call(torch, case.precision, b is not None, activation)
        raise ValueError(f"unknown impl {case.impl!r}")

    def _torch_call(self, torch, precision: str, bias: bool, activation: Optional[str]):
        if torch is None:
            raise ValueError("torch is not installed")
        F = torch.nn.functional
        key = (precision, bias)
        if key not in self._torch:
            tx = torch.from_numpy(self.x)
            tw = torch.from_numpy(np.ascontiguousarray(self.w.T))   # (N, K): Linear.weight
            tb = torch.from_numpy(self.bias) if bias else None
            if precision == "fp32":
                self._torch[key] = (tx, tw, tb)
            elif precision == "bf16":
                self._torch[key] = tuple(None if t is None else t.to(torch.bfloat16)
                                         for t in (tx, tw, tb))
            elif precision == "int8":
                lin = torch.nn.Linear(self.k, self.n, bias=bias)
                with torch.no_grad():
                    lin.weight.copy_(tw)
                    if bias:
                        lin.bias.copy_(tb)
                with warnings.catch_warnings():  # torch.ao.quantization is deprecated
                    warnings.simplefilter("ignore")
                    q = torch.ao.quantization.quantize_dynamic(
                        torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
                self._torch[key] = (tx, q, None)
            else:
                raise ValueError(f"no torch baseline for {precision!r}")
        a, wq, tb = self._torch[key]
        act = None if activation is None else {"gelu": F.gelu}[activation]

        if precision == "int8":
            def torch_int8():
                with torch.inference_mode():
                    y = wq(a)
                    return y if act is None else act(y)
            return torch_int8

        def torch_linear():
            with torch.inference_mode():
                y = F.linear(a, wq, tb)
                return y if act is None else act(y)
        return torch_linear


def to_numpy32(result) -> np.ndarray:
    """A kernel's result as float32 NumPy (torch tensors of any dtype included)."""
    if isinstance(result, np.ndarray):
        return result
    if hasattr(result, "detach"):  # torch.Tensor
        return result.detach().float().numpy()
    return np.asarray(result, dtype=np.float32)


def _add_linear_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", metavar="MxKxN[@T],...",
                   help="shapes to time instead of the issue's targets, for example "
                        "'1x384x1152,256x384x1536@1' (@T pins that shape's thread count)")
    p.add_argument("--precisions", metavar="P,...", default=",".join(LINEAR_PRECISIONS),
                   help="pykernels precisions to time (default: fp32,bf16,int8)")
    p.add_argument("--fused-shape", metavar="MxKxN",
                   help="shape of the fused bias+GELU overhead check (default "
                        f"{LINEAR_FUSED_TARGET.label}, {LINEAR_FUSED_QUICK.label} with --quick)")
    p.add_argument("--no-fused", action="store_true",
                   help="skip the fused bias+GELU overhead check")
    p.add_argument("--no-baselines", action="store_true",
                   help="time pykernels only (no NumPy/torch)")


def _linear_record(case: LinearCase, shape: GemmShape, threads: int, isa: str,
                   activation: Optional[str], bias: bool) -> dict:
    return {"op": "linear", "m": shape.m, "k": shape.k, "n": shape.n, "threads": threads,
            "impl": case.impl, "variant": case.variant, "precision": case.precision,
            "activation": activation, "bias": bias, "isa": isa,
            "flops": 2 * shape.m * shape.k * shape.n}


def _time_linear_case(prob: LinearProblem, case: LinearCase, threads: int, torch, rec: dict,
                      *, budget: float, min_reps: int, peak_core: float,
                      activation: Optional[str] = None, bias: bool = True) -> dict:
    """Check one implementation's output once, then time it; fills and returns rec."""
    ref = prob.ref_for(activation) if bias else (
        prob.ref - prob.bias if activation is None else None)
    tol = (LINEAR_REL_TOL if case.impl == "pykernels" else
           LINEAR_BASELINE_REL_TOL)[case.precision]
    limit = (numpy_blas_threads(threads) if case.impl == "numpy" else
             torch_threads(torch, threads) if case.impl == "torch" else None)
    time_checked(rec, functools.partial(prob.call, case, threads, torch, bias=bias,
                                        activation=activation),
                 lambda got: (rel_error(to_numpy32(got), ref) if ref is not None else 0.0, tol),
                 budget=budget, min_reps=min_reps, limit=limit)
    return add_rates(rec, prob.flops, prob.bytes_moved(case.precision), peak_core, threads)


def run_bench_linear(args) -> int:
    """linear (x @ w + b) in fp32, bf16 and int8: both variants vs NumPy and torch."""
    import pykernels as pk

    info = pk.cpu_info()
    default_threads = pk.get_num_threads()
    try:
        precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
        bad = [p for p in precisions if p not in LINEAR_PRECISIONS]
        if bad or not precisions:
            raise ValueError(f"bad precision {bad[0] if bad else args.precisions!r}: expected "
                             f"a comma-separated subset of {','.join(LINEAR_PRECISIONS)}")
        if args.shapes:
            shapes = parse_gemm_shapes(args.shapes)
        else:
            shapes = [s for s in (LINEAR_QUICK if args.quick else LINEAR_TARGETS)]
        fused_shape = None
        if not args.no_fused:
            if args.fused_shape:
                parsed = parse_gemm_shapes(args.fused_shape)
                if len(parsed) != 1:
                    raise ValueError("--fused-shape takes one MxKxN shape")
                fused_shape = parsed[0]
            else:
                fused_shape = LINEAR_FUSED_QUICK if args.quick else LINEAR_FUSED_TARGET
    except ValueError as e:
        print(f"pykernels bench linear: error: {e}", file=sys.stderr)
        return 2
    plan = _thread_plan(shapes, args.threads, default_threads)
    budget, min_reps, peak_core, peak_src = _timing_settings(args, info.isa)

    torch = None if args.no_baselines else import_torch()
    ours = [c for c in OUR_LINEAR_CASES if c.precision in precisions]
    baselines = [] if args.no_baselines else [
        c for c in BASELINE_LINEAR_CASES if c.impl != "torch" or torch is not None]
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench linear: x @ w + b, isa {info.isa} ({info.vendor} {info.model}, "
          f"{info.cores} cores), pykernels {pk.__version__}", file=out)
    base_note = [f"NumPy {np.__version__} (fp32 x @ w, + b)"]
    if not args.no_baselines:
        base_note.append(f"torch {torch.__version__} (F.linear fp32 and bf16, "
                         "quantize_dynamic qint8 Linear)" if torch is not None else
                         "torch not installed")
    print("baselines: " + ", ".join(base_note) + "; " +
          ("BLAS threads limited to each row's count with threadpoolctl"
           if have_tpc else
           "threadpoolctl not installed: NumPy used its default threads"), file=out)
    peak_from = f"assumed for {info.isa}" if peak_src == "assumed" else f"from {peak_src}"
    print(f"peak: {peak_core:g} GFLOP/s per core ({peak_from})", file=out)
    print(f"timing: median over >= {min_reps} samples in {budget:g} s per case after warm-up; "
          "weights prepacked once; every result checked against float64 (rel. error <= "
          + ", ".join(f"{p} {LINEAR_REL_TOL[p]:g}" for p in LINEAR_PRECISIONS) + ")", file=out)
    out.flush()

    print(file=out)
    print(_LIN_ROW_FMT.format("shape", "thr", "impl", "median", "GFLOP/s", "%peak", "GB/s",
                              "rel.err", "NumPy/x"), file=out)
    results: List[dict] = []
    failed = False
    prev_impl = None
    cases = ours + baselines
    for shape, threads in plan:
        prob = LinearProblem(shape.m, shape.k, shape.n, precisions=precisions)
        row: List[dict] = []
        for case in cases:
            # OpenBLAS and torch (OpenMP) workers spin after a call before
            # sleeping; on a 2-core machine they would steal a core from the
            # next implementation timed.
            if prev_impl in ("numpy", "torch") and case.impl != prev_impl:
                time.sleep(0.15)
            prev_impl = case.impl
            rec = _linear_record(case, shape, threads, info.isa, None, True)
            _time_linear_case(prob, case, threads, torch, rec, budget=budget,
                              min_reps=min_reps, peak_core=peak_core)
            if case.impl == "pykernels" and not (rec.get("ok") and "median_s" in rec):
                failed = True
            row.append(rec)
            results.append(rec)
        _print_linear_rows(shape, threads, row, out)
        out.flush()
        del prob

    summary = _linear_summary(results, precisions)
    _print_linear_summary(summary, precisions, torch is not None and not args.no_baselines, out)

    fused: List[dict] = []
    if fused_shape is not None:
        t = args.threads if args.threads is not None else (fused_shape.threads or default_threads)
        fused = _bench_fused_overhead(fused_shape, t, precisions, info.isa, budget, min_reps,
                                      peak_core, include_numpy=not args.no_baselines)
        if any(not f["ok"] for f in fused if f["impl"] == "pykernels"):
            failed = True
        _print_fused(fused, fused_shape, t, out)

    return finish_bench(args.json, failed, out, "linear", torch=torch, have_tpc=have_tpc,
                        peak_core=peak_core, peak_src=peak_src, quick=args.quick, budget=budget,
                        min_reps=min_reps, rel_tol=dict(LINEAR_REL_TOL), results=results,
                        summary=summary, fused=fused)


_LIN_ROW_FMT = "{:<16} {:>3}  {:<22} {:>9} {:>8} {:>6} {:>7} {:>9} {:>8}"


def _print_linear_rows(shape: GemmShape, threads: int, row: List[dict], out) -> None:
    np_rec = next((r for r in row if r["impl"] == "numpy"), None)
    np_ok = np_rec is not None and np_rec.get("ok") and "median_s" in np_rec
    for i, rec in enumerate(row):
        timed = rec.get("ok") and "median_s" in rec
        label = (f"{rec['precision']} {rec['variant']}" if rec["impl"] == "pykernels"
                 else f"{rec['impl']} {rec['precision']}")
        ratio = (f"{np_rec['median_s'] / rec['median_s']:.2f}x"
                 if timed and np_ok and rec is not np_rec else "")
        err = rec.get("rel_error")
        print(_LIN_ROW_FMT.format(
            shape.label if i == 0 else "", threads if i == 0 else "", label, _cell_time(rec),
            f"{rec['gflops']:.1f}" if timed else "-",
            f"{rec['pct_peak']:.0f}%" if timed else "-",
            f"{rec['gbytes_per_s']:.1f}" if timed else "-",
            f"{err:.2g}" if err is not None else "-", ratio), file=out)
        if not timed:
            why = rec.get("error") or (f"rel. error {rec.get('rel_error', float('nan')):.3g} > "
                                       f"{rec.get('rel_tol', float('nan')):g}")
            print(f"{'':21}^ {label}: {why}", file=out)




def _linear_summary(results: List[dict], precisions) -> List[dict]:
    """Per (shape, threads): our best variant of each precision, its speed-up over
    our fp32 of the same variant (the issue's "bf16 >= 1.8x our fp32 latency"
    ratios), and each baseline's median over our best of the same precision
    (> 1 means pykernels is faster)."""
    summary = []
    for (m, k, n, t), recs in _group(results, ("m", "k", "n", "threads")).items():
        entry = {"m": m, "k": k, "n": n, "threads": t, "best": {}, "vs_fp32": {},
                 "baselines": {}}
        for p in precisions:
            best = _best(recs, impl="pykernels", precision=p)
            entry["best"][p] = None if best is None else {
                "variant": best["variant"], "median_s": best["median_s"],
                "gflops": best["gflops"]}
            if best is not None and p != "fp32":
                f32 = _best(recs, impl="pykernels", precision="fp32", variant=best["variant"])
                entry["vs_fp32"][p] = (f32["median_s"] / best["median_s"]) if f32 else None
        for c in BASELINE_LINEAR_CASES:
            rec = _best(recs, impl=c.impl, precision=c.precision)
            ours = entry["best"].get(c.precision)
            entry["baselines"][c.label] = None if rec is None else {
                "median_s": rec["median_s"], "rel_error": rec["rel_error"],
                "ratio": rec["median_s"] / ours["median_s"] if ours else None}
        summary.append(entry)
    return summary


def _print_linear_summary(summary: List[dict], precisions, with_torch: bool, out) -> None:
    print(file=out)
    print("best of pykernels per precision (L = latency, T = throughput); 'x fp32' is our "
          "fp32 median of the same variant / this one; baselines: their median and their "
          "median / our best of the same precision (> 1 means pykernels is faster)", file=out)
    base_labels = ["numpy fp32"] + (["torch fp32", "torch bf16", "torch int8"] if with_torch
                                    else [])
    head = "{:<16} {:>3}".format("shape", "thr")
    for p in precisions:
        head += f"  {p + ' best':>11}" + (f" {'x fp32':>6}" if p != "fp32" else "")
    for b in base_labels:
        head += f"  {b:>16}"
    print(head, file=out)
    for e in summary:
        line = "{:<16} {:>3}".format(f"{e['m']}x{e['k']}x{e['n']}", e["threads"])
        for p in precisions:
            b = e["best"].get(p)
            cell = "-" if b is None else f"{b['variant'][0].upper()} {fmt_time(b['median_s'])}"
            line += f"  {cell:>11}"
            if p != "fp32":
                v = e["vs_fp32"].get(p)
                line += f" {(f'{v:.2f}x' if v else '-'):>6}"
        for lbl in base_labels:
            line += "  " + _baseline_cell(e["baselines"].get(lbl))
        print(line, file=out)


def _bench_fused_overhead(shape: GemmShape, threads: int, precisions, isa: str, budget: float,
                          min_reps: int, peak_core: float, include_numpy: bool) -> List[dict]:
    """Median of linear(x, w, b, activation="gelu") over the bare linear(x, w)
    (no bias, no activation), per precision and variant; the two are timed in
    alternation, twice each, and the lower median of each kept, so a drift in
    machine load does not land on one side only. NumPy's x @ w then + b and GELU
    (two more passes over the output) is shown for comparison."""
    prob = LinearProblem(shape.m, shape.k, shape.n, precisions=precisions)
    cases = [c for c in OUR_LINEAR_CASES if c.precision in precisions]
    if include_numpy:
        cases.append(LinearCase("numpy", "fp32", None))
    rows = []
    for case in cases:
        recs = {}
        for kind in ("bare", "fused", "bare", "fused"):
            bias, act = (False, None) if kind == "bare" else (True, "gelu")
            rec = _linear_record(case, shape, threads, isa, act, bias)
            _time_linear_case(prob, case, threads, None, rec, budget=budget, min_reps=min_reps,
                              peak_core=peak_core, activation=act, bias=bias)
            prev = recs.get(kind)
            if prev is None or not rec.get("ok") or (
                    prev.get("ok") and rec.get("median_s", math.inf) < prev["median_s"]):
                recs[kind] = rec
        bare, fused = recs["bare"], recs["fused"]
        ok = bool(bare.get("ok") and fused.get("ok") and "median_s" in bare
                  and "median_s" in fused)
        entry = {"impl": case.impl, "precision": case.precision, "variant": case.variant,
                 "m": shape.m, "k": shape.k, "n": shape.n, "threads": threads, "ok": ok,
                 "bare": bare, "fused": fused}
        if ok:
            entry["ratio"] = fused["median_s"] / bare["median_s"]
        rows.append(entry)
        if case.impl == "numpy":
            time.sleep(0.15)
    return rows


def _print_fused(rows: List[dict], shape: GemmShape, threads: int, out) -> None:
    print(file=out)
    print(f"fused bias+GELU overhead vs bare linear at {shape.label}, {threads} threads "
          f"(fused median / bare median; issue target <= "
          f"{1 + LINEAR_FUSED_MAX_OVERHEAD:.2f}x for pykernels at "
          f"{LINEAR_FUSED_TARGET.label})", file=out)
    print("{:<22} {:>9} {:>9} {:>8} {:>9}".format("impl", "bare", "fused", "ratio", "overhead"),
          file=out)
    for r in rows:
        label = (f"{r['precision']} {r['variant']}" if r["impl"] == "pykernels"
                 else f"{r['impl']} {r['precision']} (+b, GELU)")
        if not r["ok"]:
            bad = r["bare"] if not r["bare"].get("ok") else r["fused"]
            why = bad.get("error") or f"rel. error {bad.get('rel_error', float('nan')):.3g}"
            print(f"{label:<22} {'WRONG' if 'error' not in bad else 'ERROR':>9}  {why}", file=out)
            continue
        print("{:<22} {:>9} {:>9} {:>7.3f}x {:>+8.1f}%".format(
            label, fmt_time(r["bare"]["median_s"]), fmt_time(r["fused"]["median_s"]),
            r["ratio"], 100.0 * (r["ratio"] - 1.0)), file=out)


# --------------------------------------------------------------------------
# bench attention
# --------------------------------------------------------------------------

class AttnShape(NamedTuple):
    """One attention benchmark shape. ``kind``: "decode" (decode_attention, one
    query token per sequence, a full KV cache of length ``skv``), "causal"
    (causal prefill, Sq = Skv) or "padded" (non-causal, mixed kv_lens: the
    MiniLM encoder's padded batch)."""
    kind: str
    b: int
    hq: int
    hkv: int
    sq: int            # 1 for decode
    skv: int
    d: int
    big: bool = False  # skipped by --no-big

    @property
    def op(self) -> str:
        return "decode_attention" if self.kind == "decode" else "attention"

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    @property
    def padded(self) -> bool:
        return self.kind == "padded"

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"decode B={self.b} H{self.hq}/{self.hkv} L{self.skv}"
        heads = f"H{self.hq}" if self.hq == self.hkv else f"H{self.hq}/{self.hkv}"
        return f"{self.kind} B={self.b} {heads} S{self.sq}"


# The shapes of issue 4: decode B in {1, 8}, Hq=32, Hkv in {32, 8}, D=128,
# L in {512, 2048, 8192}; causal prefill B=1, H=32, D=128, S in {512, 2048};
# MiniLM (all-MiniLM-L6-v2 attention: H=12, D=32) B=32, S=128 padded to mixed
# lengths. B=8 L=8192 Hkv=32 streams 2 GiB of fp32 K/V per call (and the run
# holds fp32, bf16 and paged copies: ~7.5 GiB): big, skipped by --no-big.
ATTENTION_TARGETS: Tuple[AttnShape, ...] = (
    *(AttnShape("decode", b, 32, hkv, 1, L, 128, big=(b == 8 and L == 8192))
      for b in (1, 8) for hkv in (32, 8) for L in (512, 2048, 8192)),
    AttnShape("causal", 1, 32, 32, 512, 512, 128),
    AttnShape("causal", 1, 32, 32, 2048, 2048, 128),
    AttnShape("padded", 32, 12, 12, 128, 128, 32),
)
# A smoke set: every kind, GQA, a KV length and head count off any tile size.
ATTENTION_QUICK: Tuple[AttnShape, ...] = (
    AttnShape("decode", 2, 8, 2, 1, 200, 64),
    AttnShape("causal", 1, 4, 4, 96, 96, 64),
    AttnShape("padded", 4, 12, 12, 32, 32, 32),
)
ATTENTION_KINDS = ("decode", "causal", "padded")
ATTENTION_PRECISIONS = ("fp32", "bf16")

# The targets of issue 4: (shape, what is compared, at least). "torch fp32"
# and "torch bf16": torch SDPA's median over our best of that precision
# (contiguous cache); "bf16 vs fp32": our best fp32 median over our best bf16.
ATTENTION_GOALS: Tuple[Tuple[AttnShape, str, float], ...] = (
    (AttnShape("decode", 1, 32, 32, 1, 2048, 128), "torch fp32", 1.0),
    (AttnShape("decode", 1, 32, 32, 1, 2048, 128), "bf16 vs fp32", 1.7),
    (AttnShape("decode", 1, 32, 8, 1, 8192, 128), "torch fp32", 2.5),
    (AttnShape("decode", 1, 32, 8, 1, 8192, 128), "torch bf16", 2.5),
    (AttnShape("decode", 8, 32, 32, 1, 2048, 128), "torch fp32", 1.5),
    (AttnShape("causal", 1, 32, 32, 2048, 2048, 128), "torch fp32", 1.0),
    (AttnShape("causal", 1, 32, 32, 2048, 2048, 128), "torch bf16", 1.6),
    (AttnShape("causal", 1, 32, 32, 2048, 2048, 128), "bf16 vs fp32", 0.9),
    (AttnShape("padded", 32, 12, 12, 128, 128, 32), "torch fp32", 1.5),
)

# Our results are checked against a float64 reference on the same (bf16-
# rounded where bf16) inputs: softmax and accumulation are fp32, so the error
# is ~sqrt(D) eps32 times the logit magnitude (~1e-6 here); 1e-4 catches a
# wrong tile or mask. torch bf16 computes in bf16 (P and the output rounded to
# an 8-bit mantissa): it is only checked for computing the same thing.
ATTENTION_REL_TOL = 1e-4
ATTENTION_BASELINE_REL_TOL = {"fp32": 1e-4, "bf16": 2e-2}
# vLLM's default block size.
ATTENTION_BLOCK_SIZE = 16


def _bf16_dtype():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class AttnCase(NamedTuple):
    impl: str                 # "pykernels" | "numpy" | "torch"
    precision: str            # "fp32" | "bf16"
    variant: Optional[str]    # pykernels: "latency" | "throughput"; baselines: None
    layout: Optional[str]     # decode, pykernels: "contiguous" | "paged"; else None

    @property
    def label(self) -> str:
        if self.impl == "pykernels":
            return " ".join(x for x in (self.precision, self.variant, self.layout) if x)
        return f"{self.impl} {self.precision}" + (" sdpa" if self.impl == "torch" else "")


def attention_cases(shape: AttnShape, precisions, *, paged: bool = True,
                    baselines: bool = True, torch=None) -> List[AttnCase]:
    """Ours (precision x variant, x layout for decode), then NumPy fp32 and
    torch SDPA in each precision."""
    layouts = ((("contiguous", "paged") if paged else ("contiguous",))
               if shape.kind == "decode" else (None,))
    cases = [AttnCase("pykernels", p, v, lay) for p in precisions
             for lay in layouts for v in ("latency", "throughput")]
    if baselines:
        cases.append(AttnCase("numpy", "fp32", None, None))
        if torch is not None:
            cases += [AttnCase("torch", p, None, None) for p in precisions]
    return cases


def numpy_attention(q, k, v, *, causal: bool = False, kv_lens=None, scale=None):
    """Attention as a NumPy user would write it, in the inputs' float dtype:
    q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D). The query heads of a group are
    stacked against their shared K/V head (no np.repeat copy of K/V), an
    additive 0/-inf mask, softmax in place, two batched BLAS matmuls. Rows that
    see no key return zeros."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    dt = q.dtype
    scale = (1.0 / math.sqrt(d)) if scale is None else scale
    s = q.reshape(b, hkv, g * sq, d) @ np.swapaxes(k, -1, -2)    # (B, Hkv, g*Sq, Skv)
    s *= dt.type(scale)
    if causal or kv_lens is not None:
        L = np.full(b, skv) if kv_lens is None else np.asarray(kv_lens)
        j = np.arange(skv)
        ok = j[None, None, :] < L[:, None, None]                  # (B, 1, Skv)
        if causal:
            i = np.arange(sq)
            ok = ok & (j[None, None, :] <= i[None, :, None] + (L - sq)[:, None, None])
        bias = np.where(ok, dt.type(0), dt.type(-np.inf)).astype(dt)
        s5 = s.reshape(b, hkv, g, sq, skv)
        s5 += bias.reshape(b, 1, 1, bias.shape[1], skv)
    m = s.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0
    s -= m
    np.exp(s, out=s)
    den = s.sum(axis=-1, keepdims=True)
    den[den == 0] = 1
    o = s @ v
    o /= den
    return o.reshape(b, hq, sq, d)


def attention_ref64(q, k, v, *, causal: bool = False, kv_lens=None) -> np.ndarray:
    """The float64 oracle, one (batch item, KV head) at a time so the largest
    shapes (2 GiB of K/V) need no float64 copy of the whole cache."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    out = np.zeros((b, hq, sq, d))
    for bi in range(b):
        L = skv if kv_lens is None else int(kv_lens[bi])
        for h in range(hkv):
            qq = np.asarray(q[bi, h * g:(h + 1) * g], np.float64).reshape(g * sq, d)
            kk = np.asarray(k[bi, h, :L], np.float64)
            vv = np.asarray(v[bi, h, :L], np.float64)
            s = (qq @ kk.T) / math.sqrt(d)
            if causal:
                i = np.tile(np.arange(sq), g)
                s[np.arange(L)[None, :] > (i + L - sq)[:, None]] = -np.inf
            m = s.max(axis=-1, keepdims=True)
            m[~np.isfinite(m)] = 0
            p = np.exp(s - m)
            den = p.sum(axis=-1, keepdims=True)
            den[den == 0] = 1
            out[bi, h * g:(h + 1) * g] = ((p @ vv) / den).reshape(g, sq, d)
    return out


class AttnProblem:
    """Inputs of one attention shape in fp32 and bf16 (contiguous, and paged
    for decode), kv_lens, the float64 references, built on first use and
    shared by every implementation timed on the shape."""

    def __init__(self, shape: AttnShape, seed: int = 0,
                 block_size: int = ATTENTION_BLOCK_SIZE):
        s = shape
        rng = np.random.default_rng(seed)
        self.shape, self.block_size = s, block_size
        self.q = rng.standard_normal((s.b, s.hq, s.sq, s.d), dtype=np.float32)
        self.k = rng.standard_normal((s.b, s.hkv, s.skv, s.d), dtype=np.float32)
        self.v = rng.standard_normal((s.b, s.hkv, s.skv, s.d), dtype=np.float32)
        if s.padded:  # mixed lengths in [S/4, S], the first sequence full
            self.lens = rng.integers(s.skv // 4, s.skv + 1, s.b).astype(np.int64)
            self.lens[0] = s.skv
        elif s.kind == "decode":
            self.lens = np.full(s.b, s.skv, np.int64)
        else:
            self.lens = None
        self._perm = rng.permutation(s.b * -(-s.skv // block_size))
        self._inputs: Dict[str, tuple] = {"fp32": (self.q, self.k, self.v)}
        self._paged: Dict[str, tuple] = {}
        self._ref: Dict[str, np.ndarray] = {}
        self._torch: Dict[str, tuple] = {}

    def inputs(self, precision: str):
        """(q, k, v) in ``precision`` (bf16: rounded from the fp32 inputs)."""
        if precision not in self._inputs:
            bf = _bf16_dtype()
            self._inputs[precision] = tuple(x.astype(bf) for x in (self.q, self.k, self.v))
        return self._inputs[precision]

    def paged(self, precision: str):
        """(k_pool, v_pool, block_table): the cache in (num_blocks, Hkv,
        block_size, D) blocks at shuffled physical positions, as a vLLM block
        allocator leaves them after some churn."""
        if precision not in self._paged:
            s, bs = self.shape, self.block_size
            nb = -(-s.skv // bs)
            pools = []
            for x in self.inputs(precision)[1:]:
                if nb * bs != s.skv:
                    x = np.concatenate([x, np.zeros((s.b, s.hkv, nb * bs - s.skv, s.d),
                                                    x.dtype)], axis=2)
                blocks = x.reshape(s.b, s.hkv, nb, bs, s.d).transpose(0, 2, 1, 3, 4)
                pool = np.empty((s.b * nb, s.hkv, bs, s.d), x.dtype)
                pool[self._perm] = blocks.reshape(s.b * nb, s.hkv, bs, s.d)
                pools.append(pool)
            table = self._perm.reshape(s.b, nb).astype(np.int32)
            self._paged[precision] = (pools[0], pools[1], table)
        return self._paged[precision]

    def ref(self, precision: str) -> np.ndarray:
        """float64 attention of the inputs in ``precision``, shaped like our output."""
        if precision not in self._ref:
            q, k, v = self.inputs(precision)
            r = attention_ref64(q, k, v, causal=self.shape.causal,
                                kv_lens=self.lens if self.shape.kind != "decode" else None)
            self._ref[precision] = r[:, :, 0] if self.shape.kind == "decode" else r
        return self._ref[precision]

    @property
    def flops(self) -> int:
        """2 matmuls x 2 flops x the (query, key) pairs that are not masked."""
        s = self.shape
        if s.causal:
            pairs = sum(min(s.skv, i + s.skv - s.sq + 1) for i in range(s.sq)) * s.b
        elif self.lens is not None:
            pairs = s.sq * int(np.sum(self.lens))
        else:
            pairs = s.b * s.sq * s.skv
        return 4 * s.hq * pairs * s.d

    def kv_bytes(self, precision: str) -> int:
        """K and V bytes a call must read at least once (decode: the GB/s floor)."""
        s = self.shape
        keys = int(np.sum(self.lens)) if self.lens is not None else s.b * s.skv
        return 2 * keys * s.hkv * s.d * (2 if precision == "bf16" else 4)

    def call(self, case: AttnCase, threads: int, torch=None) -> Callable[[], object]:
        """A no-argument callable computing the shape's attention with ``case``.

        pykernels writes into a preallocated output, as a serving loop would;
        NumPy and torch return a new array per call (SDPA has no ``out=``)."""
        import pykernels as pk

        s = self.shape
        if case.impl == "pykernels":
            q, k, v = self.inputs(case.precision)
            if s.kind == "decode":
                q = q[:, :, 0]
                out = np.empty((s.b, s.hq, s.d), np.float32)
                table = None
                if case.layout == "paged":
                    k, v, table = self.paged(case.precision)
                return functools.partial(pk.decode_attention, q, k, v, self.lens,
                                         block_table=table, out=out, variant=case.variant,
                                         threads=threads)
            out = np.empty((s.b, s.hq, s.sq, s.d), np.float32)
            return functools.partial(pk.attention, q, k, v, causal=s.causal,
                                     kv_lens=self.lens, out=out, variant=case.variant,
                                     threads=threads)
        if case.impl == "numpy":
            if case.precision != "fp32":
                raise ValueError("the NumPy baseline is fp32 only")
            fn = functools.partial(numpy_attention, self.q, self.k, self.v, causal=s.causal,
                                   kv_lens=self.lens if s.padded else None)
            if s.kind == "decode":
                return lambda: fn()[:, :, 0]
            return fn
        if case.impl == "torch":
            return self._torch_call(torch, case.precision)
        raise ValueError(f"unknown impl {case.impl!r}")

    def _torch_call(self, torch, precision: str):
        if torch is None:
            raise ValueError("torch is not installed")
        s = self.shape
        if precision not in self._torch:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            q, k, v = (torch.from_numpy(x).to(dt) for x in (self.q, self.k, self.v))
            mask = None
            if s.padded:  # boolean key-padding mask, True = attend: (B, 1, 1, Skv)
                j = torch.arange(s.skv)
                mask = (j[None, :] < torch.from_numpy(self.lens)[:, None])[:, None, None, :]
            self._torch[precision] = (q, k, v, mask)
        q, k, v, mask = self._torch[precision]
        kw = {"enable_gqa": True} if s.hq != s.hkv else {}
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                                 attn_mask=mask, is_causal=s.causal, **kw)
        if s.kind == "decode":
            return lambda: sdpa()[:, :, 0]
        return sdpa


def _add_attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", metavar="K,...", default=",".join(ATTENTION_KINDS),
                   help="which shapes: decode (decode_attention over a KV cache), causal "
                        "(causal prefill), padded (MiniLM batch with mixed lengths); "
                        "default all")
    p.add_argument("--precisions", metavar="P,...", default=",".join(ATTENTION_PRECISIONS),
                   help="precisions of Q/K/V to time (default: fp32,bf16)")
    p.add_argument("--block-size", type=positive_int, default=ATTENTION_BLOCK_SIZE,
                   metavar="N", help="tokens per block of the paged decode cache "
                                     f"(default {ATTENTION_BLOCK_SIZE}, as vLLM)")
    p.add_argument("--no-paged", action="store_true",
                   help="decode: time the contiguous cache only")
    p.add_argument("--no-big", action="store_true",
                   help="skip decode B=8 L=8192 Hkv=32 (2 GiB of fp32 K/V per call; the run "
                        "holds ~7.5 GiB of copies)")
    p.add_argument("--no-baselines", action="store_true",
                   help="time pykernels only (no NumPy/torch)")


def _split_choices(text: str, choices, what: str) -> Tuple[str, ...]:
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in got if x not in choices]
    if bad or not got:
        raise ValueError(f"bad {what} {bad[0] if bad else text!r}: expected a comma-separated "
                         f"subset of {','.join(choices)}")
    return got


def run_bench_attention(args) -> int:
    """attention and decode_attention (fp32/bf16, both variants) vs torch SDPA and NumPy."""
    import pykernels as pk

    try:
        kinds = _split_choices(args.kinds, ATTENTION_KINDS, "kind")
        precisions = _split_choices(args.precisions, ATTENTION_PRECISIONS, "precision")
        if "bf16" in precisions:
            _bf16_dtype()
    except ValueError as e:
        print(f"pykernels bench attention: error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("pykernels bench attention: error: bf16 needs ml_dtypes (pip install ml_dtypes), "
              "or pass --precisions fp32", file=sys.stderr)
        return 2
    info = pk.cpu_info()
    threads = args.threads if args.threads is not None else pk.get_num_threads()
    pool = ATTENTION_QUICK if args.quick else ATTENTION_TARGETS
    shapes = [s for s in pool if s.kind in kinds and not (args.no_big and s.big)]
    budget, min_reps, peak_core, peak_src = _timing_settings(args, info.isa)
    torch = None if args.no_baselines else import_torch()
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench attention: isa {info.isa} ({info.vendor} {info.model}, "
          f"{info.cores} cores), pykernels {pk.__version__}, {threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", file=out)
    if not args.no_baselines:
        note = (f"torch {torch.__version__} F.scaled_dot_product_attention (fp32 and bf16 "
                "tensors, enable_gqa=True for GQA, is_causal, boolean mask when padded), "
                f"{threads} threads" if torch is not None else "torch not installed")
        print(f"baselines: NumPy {np.__version__} fp32 (grouped batched matmuls, softmax in "
              f"place; BLAS at {threads} threads"
              + ("" if have_tpc else ": threadpoolctl not installed, default threads")
              + f"), {note}", file=out)
    print(f"timing: median over >= {min_reps} samples in {budget:g} s per case after warm-up; "
          f"every pykernels result checked against float64 (rel. error <= "
          f"{ATTENTION_REL_TOL:g}); paged decode: {args.block_size}-token blocks, shuffled; "
          f"peak {peak_core:g} GFLOP/s per core "
          f"({'assumed for ' + info.isa if peak_src == 'assumed' else 'from ' + peak_src})",
          file=out)
    print("ratios: torch/x = torch SDPA of the same precision / this row, NumPy/x = NumPy "
          "fp32 / this row (> 1: this row is faster); GB/s = K+V bytes / median (decode)",
          file=out)
    out.flush()

    print(file=out)
    print(_ATT_ROW_FMT.format("shape", "D", "impl", "median", "GFLOP/s", "%peak", "GB/s",
                              "rel.err", "torch/x", "NumPy/x"), file=out)
    results: List[dict] = []
    failed = False
    prev_impl = None
    for shape in shapes:
        prob = AttnProblem(shape, block_size=args.block_size)
        row: List[dict] = []
        for case in attention_cases(shape, precisions, paged=not args.no_paged,
                                    baselines=not args.no_baselines, torch=torch):
            # OpenBLAS and torch (OpenMP) workers, and our latency pool's,
            # spin after a call before sleeping; on a 2-core machine they
            # would steal a core from the next implementation timed.
            if prev_impl is not None and case.impl != prev_impl:
                time.sleep(0.15)
            prev_impl = case.impl
            rec = {"op": shape.op, "kind": shape.kind, "b": shape.b, "hq": shape.hq,
                   "hkv": shape.hkv, "sq": shape.sq, "skv": shape.skv, "d": shape.d,
                   "causal": shape.causal, "padded": shape.padded,
                   "kv_lens": None if prob.lens is None else prob.lens.tolist(),
                   "threads": threads, "impl": case.impl, "variant": case.variant,
                   "precision": case.precision, "layout": case.layout, "isa": info.isa,
                   "flops": prob.flops, "kv_bytes": prob.kv_bytes(case.precision)}
            if case.layout == "paged":
                rec["block_size"] = args.block_size
            tol = (ATTENTION_REL_TOL if case.impl == "pykernels" else
                   ATTENTION_BASELINE_REL_TOL[case.precision])
            limit = (numpy_blas_threads(threads) if case.impl == "numpy" else
                     torch_threads(torch, threads) if case.impl == "torch" else None)
            time_checked(rec, functools.partial(prob.call, case, threads, torch),
                         lambda got, ref=functools.partial(prob.ref, case.precision), tol=tol:
                         (rel_error(to_numpy32(got), ref()), tol),
                         budget=budget, min_reps=min_reps, limit=limit)
            add_rates(rec, prob.flops, rec["kv_bytes"] if shape.kind == "decode" else None,
                      peak_core, threads)
            if case.impl == "pykernels" and not (rec.get("ok") and "median_s" in rec):
                failed = True
            row.append(rec)
            results.append(rec)
        _print_attention_rows(shape, row, out)
        out.flush()
        del prob

    summary = _attention_summary(results, precisions)
    _print_attention_summary(summary, precisions, torch is not None, out)
    goals = _attention_goals(summary)
    if goals:
        _print_attention_goals(goals, out)
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=out)

    return finish_bench(args.json, failed, out, "attention", torch=torch, have_tpc=have_tpc,
                        peak_core=peak_core, peak_src=peak_src, quick=args.quick,
                        budget=budget, min_reps=min_reps,
                        rel_tol={"pykernels": ATTENTION_REL_TOL,
                                 "baselines": dict(ATTENTION_BASELINE_REL_TOL)},
                        results=results, summary=summary, targets=goals,
                        threads=threads, block_size=args.block_size,
                        load_average=list(os.getloadavg()))


_ATT_ROW_FMT = "{:<23} {:>3}  {:<26} {:>9} {:>8} {:>6} {:>6} {:>8} {:>7} {:>7}"


def _print_attention_rows(shape: AttnShape, row: List[dict], out) -> None:
    def med(impl, precision):
        r = _best(row, impl=impl, precision=precision)
        return r["median_s"] if r else None

    np_med = med("numpy", "fp32")
    for i, rec in enumerate(row):
        timed = rec.get("ok") and "median_s" in rec
        label = AttnCase(rec["impl"], rec["precision"], rec["variant"], rec["layout"]).label
        t_med = med("torch", rec["precision"])
        tr = (f"{t_med / rec['median_s']:.2f}x" if timed and t_med and rec["impl"] != "torch"
              else "")
        nr = (f"{np_med / rec['median_s']:.2f}x" if timed and np_med and rec["impl"] != "numpy"
              else "")
        err = rec.get("rel_error")
        print(_ATT_ROW_FMT.format(
            shape.label if i == 0 else "", shape.d if i == 0 else "", label, _cell_time(rec),
            f"{rec['gflops']:.1f}" if timed else "-",
            f"{rec['pct_peak']:.0f}%" if timed else "-",
            f"{rec['gbytes_per_s']:.1f}" if timed and "gbytes_per_s" in rec else "-",
            f"{err:.2g}" if err is not None else "-", tr, nr), file=out)
        if not timed:
            why = rec.get("error") or (f"rel. error {rec.get('rel_error', float('nan')):.3g} > "
                                       f"{rec.get('rel_tol', float('nan')):g}")
            print(f"{'':28}^ {label}: {why}", file=out)


def _attention_summary(results: List[dict], precisions) -> List[dict]:
    """Per shape: our best of each precision over variants on the contiguous
    cache (what torch and NumPy see), the best paged one, our fp32 over our bf16,
    and each baseline's median over our best of the same precision (> 1 means
    pykernels is faster; NumPy is fp32 and is compared with our fp32)."""
    keys = ("kind", "b", "hq", "hkv", "sq", "skv", "d", "threads")
    summary = []
    for key, recs in _group(results, keys).items():
        entry = dict(zip(keys, key))
        entry.update(best={}, paged={}, bf16_vs_fp32=None, baselines={})
        for p in precisions:
            lay = "contiguous" if entry["kind"] == "decode" else None
            b = _best(recs, impl="pykernels", precision=p, layout=lay)
            entry["best"][p] = None if b is None else {
                k: b.get(k) for k in ("variant", "median_s", "gflops", "gbytes_per_s")}
            if entry["kind"] == "decode":
                pb = _best(recs, impl="pykernels", precision=p, layout="paged")
                entry["paged"][p] = None if pb is None else {
                    k: pb.get(k) for k in ("variant", "median_s", "gflops", "gbytes_per_s")}
        f32, b16 = entry["best"].get("fp32"), entry["best"].get("bf16")
        if f32 and b16:
            entry["bf16_vs_fp32"] = f32["median_s"] / b16["median_s"]
        for impl, p in [("numpy", "fp32")] + [("torch", p) for p in precisions]:
            rec = _best(recs, impl=impl, precision=p)
            ours = entry["best"].get(p)
            entry["baselines"][f"{impl} {p}"] = None if rec is None else {
                "median_s": rec["median_s"], "rel_error": rec["rel_error"],
                "gbytes_per_s": rec.get("gbytes_per_s"),
                "ratio": rec["median_s"] / ours["median_s"] if ours else None}
        summary.append(entry)
    return summary


def _summary_label(e: dict) -> str:
    return AttnShape(e["kind"], e["b"], e["hq"], e["hkv"], e["sq"], e["skv"], e["d"]).label


def _print_attention_summary(summary: List[dict], precisions, with_torch: bool, out) -> None:
    print(file=out)
    print("best of pykernels per precision on the contiguous cache (L = latency, T = "
          "throughput) with GB/s for decode; 'paged' = best paged median / best contiguous "
          "(fp32); 'bf16 x' = our fp32 / our bf16; baselines: median and baseline / our best "
          "of the same precision (NumPy: vs our fp32)", file=out)
    base = ["numpy fp32"] + ([f"torch {p}" for p in precisions] if with_torch else [])
    head = "{:<23} {:>3}".format("shape", "D")
    for p in precisions:
        head += f"  {p + ' best':>11} {'GB/s':>5}"
    head += f" {'paged':>6}" + (f" {'bf16 x':>6}" if len(precisions) > 1 else "")
    for b in base:
        head += f"  {b:>16}"
    print(head, file=out)
    for e in summary:
        line = "{:<23} {:>3}".format(_summary_label(e), e["d"])
        for p in precisions:
            b = e["best"].get(p)
            cell = "-" if b is None else f"{b['variant'][0].upper()} {fmt_time(b['median_s'])}"
            gbs = b.get("gbytes_per_s") if b else None
            line += f"  {cell:>11} {(f'{gbs:.1f}' if gbs else '-'):>5}"
        pg, ct = e["paged"].get("fp32"), e["best"].get("fp32")
        paged = f"{pg['median_s'] / ct['median_s']:.2f}x" if pg and ct else "-"
        line += f" {paged:>6}"
        if len(precisions) > 1:
            v = e["bf16_vs_fp32"]
            line += f" {(f'{v:.2f}x' if v else '-'):>6}"
        for lbl in base:
            line += "  " + _baseline_cell(e["baselines"].get(lbl))
        print(line, file=out)


def _attention_goals(summary: List[dict]) -> List[dict]:
    """The issue-4 targets whose shapes were measured, each with its measured ratio."""
    goals = []
    for shape, what, at_least in ATTENTION_GOALS:
        e = next((e for e in summary if (e["kind"], e["b"], e["hq"], e["hkv"], e["sq"],
                                         e["skv"], e["d"]) == shape[:7]), None)
        if e is None:
            continue
        if what == "bf16 vs fp32":
            ratio = e["bf16_vs_fp32"]
        else:
            b = e["baselines"].get(what)
            ratio = b["ratio"] if b else None
        goals.append({"shape": shape.label, "d": shape.d, "threads": e["threads"],
                      "compare": what, "target": at_least, "ratio": ratio,
                      "met": None if ratio is None else bool(ratio >= at_least)})
    return goals


def _print_attention_goals(goals: List[dict], out) -> None:
    print(file=out)
    print("issue 4 targets (baseline median / our best of the same precision; our bf16 vs "
          "our fp32 = our fp32 median / our bf16 median)", file=out)
    for g in goals:
        ratio = "-" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        what = ("our bf16 vs our fp32" if g["compare"] == "bf16 vs fp32" else
                f"vs {g['compare']} SDPA")
        print(f"  {g['shape']:<23} {what:<20} >= {g['target']:.1f}x: {ratio:>6}  {verdict}",
              file=out)


# --------------------------------------------------------------------------
# bench: suites
# --------------------------------------------------------------------------

# suite name -> (add_arguments, run).
BENCH_SUITES: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                              Callable[[argparse.Namespace], int]]] = {
    "gemm": (_add_gemm_arguments, run_bench_gemm),
    "linear": (_add_linear_arguments, run_bench_linear),
    "attention": (_add_attention_arguments, run_bench_attention),
}


def _add_common_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and only the smaller target shapes")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="run every shape at N threads (default: each target's own count, "
                        "else pykernels.get_num_threads())")
    p.add_argument("--json", metavar="PATH",
                   help="also write machine-readable results (with cpu_info, commit, "
                        "versions) to PATH")
    p.add_argument("--peak-gflops", type=positive_float, metavar="G",
                   help="fp32 FMA peak per core in GFLOP/s for the %%peak column "
                        "(default: $PYKERNELS_PEAK_GFLOPS, else assumed from the ISA: "
                        + ", ".join(f"{k} {v:g}" for k, v in ASSUMED_PEAK_PER_CORE.items())
                        + ")")
    p.add_argument("--budget", type=positive_float, metavar="SECONDS",
                   help="timing budget per case (default 0.3, 0.05 with --quick)")


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (add_args, run) in BENCH_SUITES.items():
        sp = sub.add_parser(name, help=_first_line(run.__doc__),
                            description=_first_line(run.__doc__))
        _add_common_bench_arguments(sp)
        add_args(sp)
        sp.set_defaults(_bench_run=run)


def run_bench(args) -> int:
    """Time kernels against NumPy/OpenBLAS, SciPy BLAS and PyTorch."""
    return args._bench_run(args)


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def _fmt_bytes(n: int) -> str:
    if n <= 0:
        return "?"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument("--no-fork-join", action="store_true",
                   help="skip measuring the thread pool's fork/join cost")


def run_info(args) -> int:
    """CPU features, the ISA in use, threads, the kernel registry and the pool's cost."""
    import pykernels as pk

    rec = machine_record()
    rec["kernels"] = [dataclasses.asdict(e) for e in pk.kernels()]
    fj = []
    if not args.no_fork_join:
        for threads in sorted({2, pk.get_num_threads()}):
            fj.append({"threads": threads,
                       "spin_us": pk.fork_join_us(threads, spin=True),
                       "park_us": pk.fork_join_us(threads, spin=False)})
    rec["fork_join"] = fj
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    ci = rec["cpu_info"]
    env = rec["env"]
    commit = rec["git_commit"]
    lines = [
        f"pykernels {rec['pykernels_version']}"
        + (f" (commit {commit['id'][:12]}{', modified' if commit['dirty'] else ''})"
           if commit else "")
        + f", Python {rec['python']}, NumPy {rec['numpy_version']}",
        f"cpu            {ci['vendor']} {ci['model']}",
        f"isa            {ci['isa']} in use; supported: {ci['supported_isa']}"
        + (f" (capped by PYKERNELS_ISA={env['PYKERNELS_ISA']})" if env["PYKERNELS_ISA"] else ""),
        f"features       {' '.join(ci['features']) or '-'}",
        f"cores          {ci['cores']}",
        f"caches         L1d {_fmt_bytes(ci['l1d_bytes'])}, L2 {_fmt_bytes(ci['l2_bytes'])}, "
        f"L3 {_fmt_bytes(ci['l3_bytes'])}",
        "gemm blocking  " + ", ".join(f"{k}={v}" for k, v in ci["gemm_blocking"].items()),
        f"threads        {rec['num_threads']}"
        + (f" (PYKERNELS_NUM_THREADS={env['PYKERNELS_NUM_THREADS']})"
           if env["PYKERNELS_NUM_THREADS"] else " (set with PYKERNELS_NUM_THREADS)"),
    ]
    for f in fj:
        lines.append(f"fork/join      {f['spin_us']:.2f} us spinning, {f['park_us']:.2f} us "
                     f"parked ({f['threads']} threads; median cost of one empty parallel "
                     f"region)")
    for lib in rec["blas"]:
        lines.append(f"numpy blas     {lib['internal_api']} {lib['version']} "
                     f"({lib['num_threads']} threads, {lib['threading_layer']}, "
                     f"{lib['architecture']})")
    lines.append("kernels")
    ks = rec["kernels"]
    ks = [dict(k, tile="-" if k["mr"] is None else f"{k['mr']}x{k['nr']}") for k in ks]
    cols = ("op", "variant", "precision", "isa", "scheme", "tile", "name")
    widths = [max([len(c)] + [len(str(k[c])) for k in ks]) for c in cols]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for k in ks:
        lines.append("  " + "  ".join(str(k[c]).ljust(w) for c, w in zip(cols, widths)))
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------
# The command table and main
# --------------------------------------------------------------------------

# subcommand -> (add_arguments, run). run(args) returns the exit code; the first
# line of its docstring is the help. `demo`, `calibrate`, `plan` and `serve`
# are added here as they land.
def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments
    add_demo_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    """The main job: MiniLM under mixed interactive + bulk traffic, five serving policies."""
    from .demo import run_demo_cli
    return run_demo_cli(args)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .serving.http import add_serve_arguments
    add_serve_arguments(p)


def run_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible embeddings server (MiniLM behind the SLO-aware batcher)."""
    from .serving.http import run_serve as _run
    return _run(args)


def _add_passthrough(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="arguments of the policy command (see --help after the command)")


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine's kernels into a policy profile (or --from-benchmark JSON)."""
    from .policy.__main__ import calibrate_main
    return calibrate_main(args.rest)


def run_plan(args: argparse.Namespace) -> int:
    """Show the plan the policy makes for an op and an SLO, with its explanation."""
    from .policy.__main__ import plan_main
    return plan_main(args.rest)


COMMANDS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info_arguments, run_info),
    "bench": (_add_bench_arguments, run_bench),
    "demo": (_add_demo_arguments, run_demo),
    "serve": (_add_serve_arguments, run_serve),
    "calibrate": (_add_passthrough, run_calibrate),
    "plan": (_add_passthrough, run_plan),
}


def _first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykernels",
        description="pykernels: hand-written C++ CPU kernels for AI inference.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=_first_line(run.__doc__),
                            description=_first_line(run.__doc__))
        add_args(sp)
        sp.set_defaults(_run=run)
    return parser


def _version() -> str:
    try:
        import pykernels
        return f"pykernels {pykernels.__version__}"
    except Exception as e:  # the version flag must work even if the extension does not load
        return f"pykernels (import failed: {e})"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pykernels`` and ``python -m pykernels``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The policy commands own their argument parsers: hand them argv as is
    # (an argparse REMAINDER positional cannot start with an option).
    passthrough = {"calibrate": "calibrate_main", "plan": "plan_main"}
    if argv and argv[0] in passthrough:
        from .policy import __main__ as policy_cli
        try:
            return int(getattr(policy_cli, passthrough[argv[0]])(argv[1:]) or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pykernels info | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
