"""``pykernels bench linear``: ``linear`` (x @ w + b) in fp32, bf16, int8 and int8_7bit,
both variants, against NumPy and torch (F.linear fp32/bf16, dynamic qint8),
plus the fused bias+GELU overhead over the bare product. Shapes, the problem
(inputs, prepacked weights, float64 references), the runner and its tables.

Contract: a pykernels result is checked against float64 within
``LINEAR_REL_TOL`` of its precision before it is timed;
``run_bench_linear(args)`` returns the exit status.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

import pykernels as pk

from ..testing import act64, linear_reference64, rel_error
from .gemm import GemmShape, parse_gemm_shapes, thread_plan
from .results import (baseline_cell, best_record, cell_time, finish_bench, fmt_time,
                      group_records, machine_line, runnable_baselines, split_choices,
                      to_numpy32)
from .timing import (add_rates, have_threadpoolctl, import_torch, numpy_blas_threads,
                     precision_peaks, time_checked, timing_settings, torch_threads)


# The linear target shapes (docs/benchmarks.md): K = N = 4096 rows, the MiniLM
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
# Named shape sets for --shapes. "encoder": what the main job runs: a bulk
# batch of 64 documents of ~80 tokens is M ~ 5,000 rows through each MiniLM
# projection; a query is M ~ 16.
NAMED_SHAPES = {
    "encoder": tuple(GemmShape(m, k, n, None, big=m >= 4096)
                     for k, n in _MINILM_KN for m in (16, 5120)),
    "targets": LINEAR_TARGETS,
}
# A smoke set: small, with edges that are not multiples of any tile or k-group.
LINEAR_QUICK: Tuple[GemmShape, ...] = (
    GemmShape(1, 384, 384, None),
    GemmShape(32, 384, 1152, None),
    GemmShape(37, 70, 45, None),
)
# Target: fused bias+GELU costs <= 5% over the bare GEMM at M=256, K=N=4096.
LINEAR_FUSED_TARGET = GemmShape(256, 4096, 4096, None)
LINEAR_FUSED_QUICK = GemmShape(64, 384, 384, None)
LINEAR_FUSED_MAX_OVERHEAD = 0.05

LINEAR_PRECISIONS = ("fp32", "bf16", "int8", "int8_7bit")
# The accuracy contract of linear (relative Frobenius error vs float64 on
# Gaussian data): what a pykernels result is checked against. Baselines get
# the same bound for their precision, except torch's dynamic int8, which
# quantizes per tensor with 7-bit activations (reduce_range) and is only
# checked for computing the same product (rel. error < 0.1).
LINEAR_REL_TOL = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2, "int8_7bit": 5e-2}
LINEAR_BASELINE_REL_TOL = {"fp32": 1e-5, "bf16": 1e-2, "int8": 1e-1}


class LinearCase(NamedTuple):
    impl: str                 # "pykernels" | "numpy" | "torch"
    precision: str            # "fp32" | "bf16" | "int8" | "int8_7bit"
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
        # SciPy (erf for GELU) may load its own OpenBLAS: load it now, before any
        # thread limit is set, so numpy_blas_threads sees and parks it.
        import scipy.special  # noqa: F401

        rng = np.random.default_rng(seed)
        self.m, self.k, self.n = m, k, n
        self.x = rng.standard_normal((m, k), dtype=np.float32)
        self.w = rng.standard_normal((k, n), dtype=np.float32)     # (K, N): x @ w
        self.bias = rng.standard_normal(n, dtype=np.float32)
        self.packed = {p: pk.pack(self.w, precision=p) for p in precisions}
        self.ref = linear_reference64(self.x, self.w, self.bias)
        self._ref_gelu = None
        self._torch = {}

    def ref_for(self, activation: Optional[str]) -> np.ndarray:
        if activation is None:
            return self.ref
        if activation != "gelu":
            raise ValueError(f"no reference for activation {activation!r}")
        if self._ref_gelu is None:
            self._ref_gelu = act64("gelu", self.ref)
        return self._ref_gelu

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def bytes_moved(self, precision: str) -> int:
        """Bytes of x, the weight (in its stored precision) and the output touched
        once: the memory-bound floor (M = 1 is weight-bandwidth bound)."""
        wbytes = {"fp32": 4, "bf16": 2, "int8": 1, "int8_7bit": 1}[precision]
        return 4 * self.m * self.k + wbytes * self.k * self.n + 4 * self.m * self.n

    def call(self, case: LinearCase, threads: int, torch=None, *, bias: bool = True,
             activation: Optional[str] = None) -> Callable[[], np.ndarray]:
        """A no-argument callable computing activation(x @ w + b) (bias optional),
        returning a float32 NumPy array (or an array-like the check converts).

        pykernels and NumPy write into a preallocated output, as a serving loop
        would; torch returns a new tensor per call (F.linear has no ``out=``)."""
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


def add_linear_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", metavar="MxKxN[@T],...|NAME",
                   help="shapes to time instead of the target shapes, for example "
                        "'1x384x1152,256x384x1536@1' (@T pins that shape's thread count), or a "
                        f"named set: {', '.join(NAMED_SHAPES)} (encoder: the MiniLM projections "
                        "at a query's 16 rows and a bulk batch's 5120)")
    p.add_argument("--precisions", metavar="P,...", default=",".join(LINEAR_PRECISIONS),
                   help="pykernels precisions to time (default: fp32,bf16,int8,int8_7bit)")
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
                      *, budget: float, min_reps: int, peaks: Dict[Tuple[str, str], Tuple[float, str]],
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
    # % of the peak of the instruction scheme this precision runs on (a
    # baseline: of our kernel's scheme for its precision, the roofline we know)
    peak, probe = peaks.get((case.precision, case.variant or "throughput"),
                            peaks[("fp32", "throughput")])
    rec["peak_probe"] = probe
    return add_rates(rec, prob.flops, prob.bytes_moved(case.precision), peak, threads)


def run_bench_linear(args) -> int:
    """linear (x @ w + b) in fp32, bf16 and int8: both variants vs NumPy and torch."""
    info = pk.cpu_info()
    default_threads = pk.get_num_threads()
    try:
        precisions = split_choices(args.precisions, LINEAR_PRECISIONS, "precision")
        if args.shapes and args.shapes.strip().lower() in NAMED_SHAPES:
            shapes = list(NAMED_SHAPES[args.shapes.strip().lower()])
        elif args.shapes:
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
    plan = thread_plan(shapes, args.threads, default_threads)
    budget, min_reps, peak_core, peak_src = timing_settings(args, info.isa)
    peaks = precision_peaks(info.isa, peak_core, peak_src)

    torch = None if args.no_baselines else import_torch()
    ours = [c for c in OUR_LINEAR_CASES if c.precision in precisions]
    baselines = runnable_baselines(BASELINE_LINEAR_CASES, torch, not args.no_baselines)
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench linear: x @ w + b, {machine_line(info, pk.__version__)}",
          file=out)
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
    print(f"peak: {peak_core:g} GFLOP/s per core ({peak_from}); %peak of each precision is "
          "taken against its scheme's probe per core: " + ", ".join(
              f"{p} {v} {peaks[(p, v)][1]} {peaks[(p, v)][0]:.1f}"
              for p, v in sorted(peaks) if p in precisions), file=out)
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
                              min_reps=min_reps, peaks=peaks)
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
                                      peaks, include_numpy=not args.no_baselines)
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
            shape.label if i == 0 else "", threads if i == 0 else "", label, cell_time(rec),
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
    our fp32 of the same variant (the "bf16 >= 1.8x our fp32 latency" ratios),
    and each baseline's median over our best of the same precision
    (> 1 means pykernels is faster)."""
    summary = []
    for (m, k, n, t), recs in group_records(results, ("m", "k", "n", "threads")).items():
        entry = {"m": m, "k": k, "n": n, "threads": t, "best": {}, "vs_fp32": {},
                 "baselines": {}}
        for p in precisions:
            best = best_record(recs, impl="pykernels", precision=p)
            entry["best"][p] = None if best is None else {
                "variant": best["variant"], "median_s": best["median_s"],
                "gflops": best["gflops"]}
            if best is not None and p != "fp32":
                f32 = best_record(recs, impl="pykernels", precision="fp32", variant=best["variant"])
                entry["vs_fp32"][p] = (f32["median_s"] / best["median_s"]) if f32 else None
        for c in BASELINE_LINEAR_CASES:
            rec = best_record(recs, impl=c.impl, precision=c.precision)
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
            line += "  " + baseline_cell(e["baselines"].get(lbl))
        print(line, file=out)


def _bench_fused_overhead(shape: GemmShape, threads: int, precisions, isa: str, budget: float,
                          min_reps: int, peaks: Dict[Tuple[str, str], Tuple[float, str]],
                          include_numpy: bool) -> List[dict]:
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
                              peaks=peaks, activation=act, bias=bias)
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
          f"(fused median / bare median; target <= "
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

