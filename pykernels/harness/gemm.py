"""``pykernels bench gemm``: fp32 GEMM, both variants, against NumPy, SciPy
BLAS and torch. The shapes (``GEMM_TARGETS``, ``GEMM_QUICK``,
``parse_gemm_shapes``, shared with the linear suite), the problem (inputs, the
prepacked weight, the float64 reference), the runner and its tables.

Contract: every timed result was first checked against float64
(``GEMM_REL_TOL``); ``run_bench_gemm(args)`` returns the exit status.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

import pykernels as pk

from ..testing import linear_reference64, rel_error
from .results import (baseline_cell, best_record, cell_time, finish_bench, fmt_time,
                      group_records, machine_line, runnable_baselines)
from .timing import (add_rates, blas_threads, have_threadpoolctl, import_torch, time_checked,
                     timing_settings, torch_threads)

# fp32 GEMM error grows like sqrt(K)*eps: at K=4096, 64 * 6e-8 ~ 4e-6, so 1e-4
# leaves a 25x margin for every target shape and still catches a wrong tile.
GEMM_REL_TOL = 1e-4


class GemmShape(NamedTuple):
    m: int
    k: int
    n: int
    threads: Optional[int]  # None: the run's thread count (--threads or the default)
    big: bool = False       # skipped by --quick

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n}"


# The GEMM target shapes (docs/benchmarks.md). threads=None runs at the default
# thread count (2 on the target machine); small cubes are pinned to 1 thread.
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
    variant: Optional[str]    # pykernels: "auto" | "latency" | "throughput"; baselines: None
    b: str                    # "packed" | "raw"

    @property
    def label(self) -> str:
        if self.impl == "pykernels":
            return f"{self.variant} {self.b}"
        return self.impl


# "auto raw" first: what `pk.gemm(a, b)` does with no options (the size rule
# of pk::auto_variant picks a variant), the figure a new user sees.
OUR_GEMM_CASES = (
    GemmCase("pykernels", "auto", "raw"),
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
        rng = np.random.default_rng(seed)
        self.m, self.k, self.n = m, k, n
        self.a = rng.standard_normal((m, k), dtype=np.float32)
        self.b = rng.standard_normal((k, n), dtype=np.float32)
        self.packed = pk.pack(self.b)
        self.ref = linear_reference64(self.a, self.b)

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


def thread_plan(shapes, threads_opt: Optional[int], default_threads: int):
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


def add_gemm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", metavar="MxKxN[@T],...",
                   help="shapes to time instead of the target shapes, for example "
                        "'8x1024x1024,128x128x128@1' (@T pins that shape's thread count)")
    p.add_argument("--no-baselines", action="store_true",
                   help="time pykernels only (no NumPy/SciPy/torch)")


def run_bench_gemm(args) -> int:
    """fp32 GEMM: latency and throughput variants against NumPy, SciPy BLAS and torch."""
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
    plan = thread_plan(shapes, args.threads, default_threads)
    budget, min_reps, peak_core, peak_src = timing_settings(args, info.isa)

    torch = None if args.no_baselines else import_torch()
    baselines = runnable_baselines(BASELINE_GEMM_CASES, torch, not args.no_baselines)
    cases = list(OUR_GEMM_CASES) + baselines
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench gemm: fp32, {machine_line(info, pk.__version__)}", file=out)
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


_ROW_FMT = "{:<15} {:>3}  {:<18} {:>9} {:>8} {:>6} {:>7}  {:>9} {:>10}"


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
            shape.label if first else "", threads if first else "", label, cell_time(rec),
            f"{rec['gflops']:.1f}" if timed else "-",
            f"{rec['pct_peak']:.0f}%" if timed else "-",
            f"{rec['gbytes_per_s']:.1f}" if timed else "-",
            cell_time(np_rec) if first else "", ratio), file=out)
        if not timed:
            why = rec.get("error") or f"rel. error {rec.get('rel_error', float('nan')):.3g}"
            print(f"{'':20}^ {label}: {why}", file=out)
        first = False


def _gemm_summary(results: List[dict], baselines) -> List[dict]:
    """Per (shape, threads): the fastest correct pykernels case and its ratio
    to each baseline (baseline median / ours; > 1 means pykernels is faster)."""
    summary = []
    for (m, k, n, t), recs in group_records(results, ("m", "k", "n", "threads")).items():
        best = best_record(recs, impl="pykernels")
        entry = {"m": m, "k": k, "n": n, "threads": t,
                 "best": None if best is None else {
                     "variant": best["variant"], "b": best["b"], "median_s": best["median_s"],
                     "gflops": best["gflops"], "pct_peak": best["pct_peak"]},
                 "baselines": {}}
        for c in baselines:
            rec = best_record(recs, impl=c.impl)
            if rec is None:
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
            line += "  " + baseline_cell(e["baselines"].get(n), ratio_width=7)
        print(line, file=out)

