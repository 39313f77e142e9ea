"""Calibration: measures the service times a ``Profile`` holds, on this machine.

``measure(...)`` runs every requested (op shape, variant, precision, threads,
batch) cell in interleaved passes within a time budget and returns what it
measured as plain data; ``Profile.calibrate`` turns that into a profile. A cell
a kernel rejects is skipped and reported in the failures.
"""
from __future__ import annotations

import gc
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import pykernels
from pykernels import work as _ops
from pykernels.work import Op

QUICK_BUDGET_S = 25.0
FULL_BUDGET_S = 600.0


def measure(quick: bool = True, progress: bool = True, ops: Optional[Sequence[Op]] = None,
            *, batches: Optional[Sequence[int]] = None,
            threads: Optional[Sequence[int]] = None,
            variants: Optional[Sequence[str]] = None,
            precisions: Optional[Sequence[str]] = None,
            budget_s: Optional[float] = None,
            min_reps: Optional[int] = None, max_reps: Optional[int] = None,
            heldout: bool = False) -> Tuple[Dict[str, Op], List[tuple], Dict[str, float], List[str]]:
    """Measure service times; the arguments are ``Profile.calibrate``'s.

    Returns (ops by key, cells, relative error per precision, failures): a
    cell is (op key, variant, precision, threads, batch, p50_ms, p99_ms,
    samples); a failure names a cell that was not measured and why."""
    table = _ops.kernel_table()
    budget = float(budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else FULL_BUDGET_S))
    lo = int(min_reps if min_reps is not None else (9 if quick else 40))
    hi = int(max_reps if max_reps is not None else (300 if quick else 3000))
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {lo}, {hi}")
    nthreads = pykernels.get_num_threads()
    thread_list = sorted({int(t) for t in (threads or (1, nthreads))})

    # (base op, units list) work items
    work: List[Tuple[Op, List[int]]] = []

    def add_work(op: Op, items: Sequence[int]):
        for part in op.parts():
            units = sorted({part.units(b) for b in items})
            work.append((part.base(), units))

    if ops is None:
        for kind in sorted(_ops.op_types()):
            d = _ops.calibration_defaults(kind)
            if d is None or not _ops.candidates(kind, table):
                continue
            shapes = d["heldout_shapes"] if heldout else d["quick_shapes" if quick else "full_shapes"]
            bl = batches or (d["heldout_batches"] if heldout else d["quick_batches" if quick else "full_batches"])
            for s in shapes:
                add_work(s, bl)
    else:
        for item in ops:
            op, own = (item if isinstance(item, tuple) and len(item) == 2 else (item, None))
            if not isinstance(op, Op):
                raise TypeError(f"ops must be pykernels.policy.ops objects or (op, batches) "
                                f"pairs, got {item!r}")
            d = _ops.calibration_defaults(op.parts()[0].kind) or {}
            bl = own or batches or d.get("quick_batches" if quick else "full_batches") or (1, 8, 64)
            add_work(op, bl)

    cells = []
    for base, units in work:
        cands = _ops.candidates(base.kind, table)
        for (variant, precision), backend in cands.items():
            if variants is not None and variant not in variants:
                continue
            if precisions is not None and precision not in precisions:
                continue
            for t in thread_list:
                for u in units:
                    cells.append((base, variant, precision, t, u, backend))
    # Deduplicate (a shape listed twice) keeping order.
    seen = set()
    cells = [c for c in cells if not ((c[0].key,) + c[1:5] in seen or seen.add((c[0].key,) + c[1:5]))]

    ops_seen: Dict[str, Op] = {}
    cells_out: List[tuple] = []
    errors: Dict[str, float] = {}
    # Interleaved passes: every cell runs a slice of its repetitions in each
    # pass, so a burst of interference from other processes on a shared
    # machine spreads over many cells' tails instead of shifting one cell's
    # median.
    passes = 3 if quick else 5
    bar = _Progress(len(cells) * (passes + 1), progress)
    cache: dict = {}
    failures = []
    prepared = []  # [cell, fn, reps_per_pass, samples list]
    try:
        t_start = time.perf_counter()
        for c in cells:
            base, variant, precision, t, u, backend = c
            if time.perf_counter() - t_start > 2 * budget:
                failures.append(f"{base.key} {variant}/{precision} t={t} b={u}: "
                                "not measured, the time budget ran out during warm-up")
                bar.step()
                continue
            try:
                fn = backend.prepare(base, variant, precision, t, u, cache)
                fn()
                t0 = time.perf_counter_ns()
                fn()
                est = max(time.perf_counter_ns() - t0, 1)
            except Exception as e:  # a kernel that rejects a shape: skip the cell
                failures.append(f"{base.key} {variant}/{precision} t={t} b={u}: {e}")
                bar.step()
                continue
            prepared.append([c, fn, est, []])
            bar.step("warm-up")
        # Each pass gets an equal share of what is left of the budget and
        # re-estimates run times from the samples so far (a busy machine
        # makes the warm-up estimate optimistic). Past 1.5x the budget,
        # remaining passes are dropped (at least one always runs).
        lo_pass, hi_pass = -(-lo // passes), -(-hi // passes)
        done_passes = 0
        for i in range(passes):
            elapsed = time.perf_counter() - t_start
            if i > 0 and elapsed > 1.5 * budget:
                break
            share = max(0.0, budget - elapsed) / (passes - i)
            est = [float(np.median(np.concatenate(e[3]))) / 1e3 if e[3] else e[2] / 1e9
                   for e in prepared]
            reps = _allocate(est, share, lo_pass, hi_pass, 1)
            order = list(zip(prepared, reps))
            if i % 2:
                order.reverse()
            for (c, fn, _, samples), r in order:
                try:
                    samples.append(_measure(fn, r))
                except Exception as e:
                    failures.append(f"{c[0].key} {c[1]}/{c[2]} t={c[3]} b={c[4]}: {e}")
                bar.step(f"pass {i + 1}/{passes} {c[0].key} {c[1]}/{c[2]} t={c[3]} b={c[4]}")
            done_passes += 1
        if done_passes < passes:
            bar.done = bar.total - 1
            bar.step(f"time budget reached after {done_passes} of {passes} passes")
        for c, fn, _, samples in prepared:
            if len(samples) != done_passes:
                continue
            base, variant, precision, t, u, _ = c
            ms = np.concatenate(samples)
            ops_seen.setdefault(base.key, base)
            p50 = float(np.median(ms))
            p99 = float(np.percentile(ms, 99))
            cells_out.append((base.key, variant, precision, t, u, max(p50, 1e-6),
                              max(p99, p50, 1e-6), len(ms)))
        del prepared
        # Accuracy actually spent by each precision (output error on random data).
        for base in {b.key: b for b, *_ in cells}.values():
            for (variant, precision), backend in _ops.candidates(base.kind, table).items():
                if backend.rel_error is None or precision in errors:
                    continue
                if precisions is not None and precision not in precisions:
                    continue
                try:
                    errors[precision] = backend.rel_error(base, precision, cache)
                except Exception:
                    pass
    finally:
        bar.close()
    return ops_seen, cells_out, errors, failures


class _Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, enabled: bool, label: str = "calibrating"):
        self.total = max(1, total)
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self._last_pct = -1

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        pct = int(100 * self.done / self.total)
        if not self.tty and pct // 10 == self._last_pct // 10 and self.done != self.total:
            return
        self._last_pct = pct
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"{self.label} [{bar}] {pct:3d}% {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.1f}s {what}")
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _allocate(est_s: List[float], budget_s: float, lo: int, hi: int, passes: int) -> List[int]:
    """Repetitions per cell, each in [lo, hi], that fill ``budget_s`` given each
    cell's estimated run time: every cell gets the same time share x (reps =
    x / est, clamped), x found by bisection. On a slow or busy machine the
    floor ``lo`` gives way (down to one run per pass) rather than overrun."""
    est = np.maximum(np.asarray(est_s, dtype=float), 1e-7)
    if est.size == 0:
        return []

    def total(x, floor):
        return float(np.sum(np.clip(np.floor(x / est), floor, hi) * est))
    floor = lo
    if total(0.0, floor) > budget_s:
        floor = max(passes, int(lo * budget_s / max(total(0.0, lo), 1e-12)))
    a, b = 0.0, float(hi * est.max())
    for _ in range(50):
        mid = (a + b) / 2
        if total(mid, floor) > budget_s:
            b = mid
        else:
            a = mid
    return [int(r) for r in np.clip(np.floor(a / est), floor, hi)]


def _measure(fn, reps: int) -> np.ndarray:
    """Service times (ms) of ``reps`` back-to-back runs of fn, GC paused."""
    out = np.empty(reps, dtype=np.float64)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        clock = time.perf_counter_ns
        for i in range(reps):
            t0 = clock()
            fn()
            out[i] = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    return out / 1e6



__all__ = ["FULL_BUDGET_S", "QUICK_BUDGET_S", "measure"]
