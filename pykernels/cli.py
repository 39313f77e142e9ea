"""The ``pykernels`` command line (also ``python -m pykernels``).

Subcommands live in ``COMMANDS``: name -> (add_arguments, run). ``add_arguments``
fills the subcommand's ``argparse`` parser; ``run(args) -> int`` does the work
and returns the exit code; the first line of ``run``'s docstring is the help
text. A new subcommand (``demo``, ``calibrate``, ``plan``, ``serve``) is one
entry in that dict.

``pykernels bench SUITE`` works the same way one level down: ``BENCH_SUITES``
maps a suite name (``gemm`` now; ``linear`` and ``attention`` as they land) to
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
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

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
def blas_threads(n: int):
    """Limit NumPy's and SciPy's BLAS pools to ``n`` threads for the block.

    Yields True when the limit was applied (threadpoolctl importable), False
    when the libraries keep their default thread count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield True


@contextlib.contextmanager
def torch_threads(torch, n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
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
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.3)
    min_reps = 3 if args.quick else 5
    peak_core, peak_src = peak_per_core(info.isa, args.peak_gflops)

    torch = None if args.no_baselines else import_torch()
    baselines = [] if args.no_baselines else [
        c for c in BASELINE_GEMM_CASES if c.impl != "torch" or torch is not None]
    cases = list(OUR_GEMM_CASES) + baselines
    have_tpc = True
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        have_tpc = False

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
            with contextlib.ExitStack() as stack:
                if case.impl in ("numpy", "scipy"):
                    rec["threads_limited"] = stack.enter_context(blas_threads(threads))
                elif case.impl == "torch":
                    stack.enter_context(torch_threads(torch, threads))
                    rec["threads_limited"] = True
                try:
                    fn = prob.call(case, threads, torch)
                    err = rel_error(fn(), prob.ref)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}")
                    row[case.label] = rec
                    results.append(rec)
                    if case.impl == "pykernels":
                        failed = True
                    continue
                rec["rel_error"] = err
                rec["ok"] = bool(err < GEMM_REL_TOL)
                if not rec["ok"]:
                    if case.impl == "pykernels":
                        failed = True
                    row[case.label] = rec
                    results.append(rec)
                    continue
                t = measure(fn, budget_s=budget, min_reps=min_reps)
            rec.update(median_s=t.median_s, min_s=t.min_s, samples=t.samples, calls=t.calls,
                       gflops=prob.flops / t.median_s / 1e9,
                       gbytes_per_s=prob.bytes_moved / t.median_s / 1e9,
                       pct_peak=100.0 * prob.flops / t.median_s / 1e9 / (peak_core * threads))
            row[case.label] = rec
            results.append(rec)
        _print_gemm_rows(shape, threads, row, out)
        out.flush()
        del prob

    summary = _gemm_summary(results, baselines)
    _print_gemm_summary(summary, baselines, out)

    if args.json:
        doc = {
            "schema": "pykernels-bench/1",
            "suite": "gemm",
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
            "quick": bool(args.quick),
            "budget_s": budget,
            "min_reps": min_reps,
            "rel_tol": GEMM_REL_TOL,
            "results": results,
            "summary": summary,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}", file=out)
    if failed:
        print("FAILED: a pykernels result was wrong or did not run (see rows marked WRONG/ERROR)",
              file=sys.stderr)
        return 1
    return 0


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
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault((r["m"], r["k"], r["n"], r["threads"]), []).append(r)
    summary = []
    for (m, k, n, t), recs in groups.items():
        ours = [r for r in recs if r["impl"] == "pykernels" and r.get("ok") and "median_s" in r]
        best = min(ours, key=lambda r: r["median_s"]) if ours else None
        entry = {"m": m, "k": k, "n": n, "threads": t,
                 "best": None if best is None else {
                     "variant": best["variant"], "b": best["b"], "median_s": best["median_s"],
                     "gflops": best["gflops"], "pct_peak": best["pct_peak"]},
                 "baselines": {}}
        for c in baselines:
            rec = next((r for r in recs if r["impl"] == c.impl), None)
            if rec is None or not rec.get("ok") or "median_s" not in rec:
                entry["baselines"][c.impl] = None
                continue
            entry["baselines"][c.impl] = {
                "median_s": rec["median_s"], "gflops": rec["gflops"],
                "ratio": rec["median_s"] / best["median_s"] if best else None}
        summary.append(entry)
    return summary


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
            b = e["baselines"].get(n)
            if b is None:
                line += f"  {'-':>17}"
            else:
                ratio = f"{b['ratio']:.2f}x" if b["ratio"] is not None else "-"
                line += f"  {fmt_time(b['median_s']):>9} {ratio:>7}"
        print(line, file=out)


# --------------------------------------------------------------------------
# bench: suites
# --------------------------------------------------------------------------

# suite name -> (add_arguments, run). Add "linear" and "attention" here.
BENCH_SUITES: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                              Callable[[argparse.Namespace], int]]] = {
    "gemm": (_add_gemm_arguments, run_bench_gemm),
}


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _add_common_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and only the smaller target shapes")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="run every shape at N threads (default: each target's own count, "
                        "else pykernels.get_num_threads())")
    p.add_argument("--json", metavar="PATH",
                   help="also write machine-readable results (with cpu_info, commit, "
                        "versions) to PATH")
    p.add_argument("--peak-gflops", type=_positive_float, metavar="G",
                   help="fp32 FMA peak per core in GFLOP/s for the %%peak column "
                        "(default: $PYKERNELS_PEAK_GFLOPS, else assumed from the ISA: "
                        + ", ".join(f"{k} {v:g}" for k, v in ASSUMED_PEAK_PER_CORE.items())
                        + ")")
    p.add_argument("--budget", type=_positive_float, metavar="SECONDS",
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
    cols = ("op", "variant", "precision", "isa", "name")
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
COMMANDS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info_arguments, run_info),
    "bench": (_add_bench_arguments, run_bench),
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
