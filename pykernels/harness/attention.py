"""``pykernels bench attention``: ``attention`` (causal prefill, padded batch)
and ``decode_attention`` (contiguous and paged KV cache) in fp32 and bf16,
both variants, against torch SDPA and a NumPy baseline. Shapes, the problem
(inputs, paged copies, float64 references from ``pykernels.testing``), the
runner, its tables and the per-shape speed targets (``ATTENTION_GOALS``).

Contract: a pykernels result is checked against float64 within
``ATTENTION_REL_TOL`` before it is timed; ``run_bench_attention(args)``
returns the exit status.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

import pykernels as pk

from .._argtypes import positive_int
from .._bf16 import bf16_dtype as _bf16_dtype
from ..testing import attention_ref64, rel_error
from .results import (baseline_cell, best_record, cell_time, finish_bench, fmt_time,
                      group_records, machine_line, split_choices, to_numpy32)
from .timing import (add_rates, have_threadpoolctl, import_torch, numpy_blas_threads,
                     time_checked, timing_settings, torch_threads)


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


# The attention target shapes (docs/benchmarks.md): decode B in {1, 8}, Hq=32,
# Hkv in {32, 8}, D=128, L in {512, 2048, 8192}; causal prefill B=1, H=32,
# D=128, S in {512, 2048}; MiniLM (all-MiniLM-L6-v2 attention: H=12, D=32) B=32, S=128 padded to mixed
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

# The speed targets: (shape, what is compared, at least). "torch fp32"
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


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
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


def run_bench_attention(args) -> int:
    """attention and decode_attention (fp32/bf16, both variants) vs torch SDPA and NumPy."""
    try:
        kinds = split_choices(args.kinds, ATTENTION_KINDS, "kind")
        precisions = split_choices(args.precisions, ATTENTION_PRECISIONS, "precision")
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
    budget, min_reps, peak_core, peak_src = timing_settings(args, info.isa)
    torch = None if args.no_baselines else import_torch()
    have_tpc = have_threadpoolctl()

    out = sys.stdout
    print(f"pykernels bench attention: {machine_line(info, pk.__version__)}, "
          f"{threads} threads; load average {os.getloadavg()[0]:.2f}", file=out)
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
    goals = attention_goals(summary)
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
        r = best_record(row, impl=impl, precision=precision)
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
            shape.label if i == 0 else "", shape.d if i == 0 else "", label, cell_time(rec),
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
    for key, recs in group_records(results, keys).items():
        entry = dict(zip(keys, key))
        entry.update(best={}, paged={}, bf16_vs_fp32=None, baselines={})
        for p in precisions:
            lay = "contiguous" if entry["kind"] == "decode" else None
            b = best_record(recs, impl="pykernels", precision=p, layout=lay)
            entry["best"][p] = None if b is None else {
                k: b.get(k) for k in ("variant", "median_s", "gflops", "gbytes_per_s")}
            if entry["kind"] == "decode":
                pb = best_record(recs, impl="pykernels", precision=p, layout="paged")
                entry["paged"][p] = None if pb is None else {
                    k: pb.get(k) for k in ("variant", "median_s", "gflops", "gbytes_per_s")}
        f32, b16 = entry["best"].get("fp32"), entry["best"].get("bf16")
        if f32 and b16:
            entry["bf16_vs_fp32"] = f32["median_s"] / b16["median_s"]
        for impl, p in [("numpy", "fp32")] + [("torch", p) for p in precisions]:
            rec = best_record(recs, impl=impl, precision=p)
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
            line += "  " + baseline_cell(e["baselines"].get(lbl))
        print(line, file=out)


def attention_goals(summary: List[dict]) -> List[dict]:
    """The ATTENTION_GOALS whose shapes were measured, each with its measured ratio."""
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
    print("targets (baseline median / our best of the same precision; our bf16 vs "
          "our fp32 = our fp32 median / our bf16 median)", file=out)
    for g in goals:
        ratio = "-" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        what = ("our bf16 vs our fp32" if g["compare"] == "bf16 vs fp32" else
                f"vs {g['compare']} SDPA")
        print(f"  {g['shape']:<23} {what:<20} >= {g['target']:.1f}x: {ratio:>6}  {verdict}",
              file=out)

