"""Driving one server through the phases, recording every query and
document, and the start-up measurements the policy plans on."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ..policy import Profile
from ..serving import Overloaded
from .workload import Phase, phase_bounds, query_arrivals, start_competitor

# ---------------------------------------------------------------------------
@dataclass
class RunResult:
    policy: str
    phases: List[Phase]
    p99_target_ms: float
    queries: list = field(default_factory=list)   # (scheduled offset s, latency ms; inf: refused/failed)
    bulk: list = field(default_factory=list)      # completion offsets (s)
    batches: list = field(default_factory=list)   # (offset s, class, precision, items)
    bulk_refused: int = 0
    cpu_util: float = 0.0
    kind: str = "static"

    def window(self, t0: float, t1: float) -> dict:
        lat = np.array([ms for t, ms in self.queries if t0 <= t < t1])
        sent = len(lat)
        ok = lat[np.isfinite(lat)]
        pct = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: float("inf"))
        mix: Dict[str, Dict[str, float]] = {}
        for t, cls, prec, n in self.batches:
            if t0 <= t < t1:
                mix.setdefault(cls, {}).setdefault(prec, 0)
                mix[cls][prec] += n
        for cls, d in mix.items():
            tot = sum(d.values())
            mix[cls] = {p: n / tot for p, n in sorted(d.items())}
        return {
            "interactive_sent": sent,
            "interactive_p50_ms": pct(50),
            "interactive_p99_ms": pct(99),
            "slo_attainment": float(np.sum(ok <= self.p99_target_ms)) / max(1, sent),
            "interactive_refused": int(np.sum(~np.isfinite(lat))),
            "bulk_docs_per_s": sum(1 for t in self.bulk if t0 <= t < t1) / max(t1 - t0, 1e-9),
            "precision_mix": mix,
        }

    def summary(self) -> dict:
        bounds = phase_bounds(self.phases)
        out = {"policy": self.policy, "kind": self.kind}
        out.update(self.window(0.0, bounds[-1][1]))
        out["bulk_refused"] = self.bulk_refused
        out["cpu_util"] = self.cpu_util
        out["phases"] = {p.name: self.window(t0, t1) for p, (t0, t1) in zip(self.phases, bounds)}
        for p, (t0, _) in zip(self.phases, bounds):
            if p.slowdown_s > 0:  # how fast feedback notices: the first second of the slowdown
                out["slowdown_first_s_attainment"] = self.window(t0, t0 + 1.0)["slo_attainment"]
        return out


def run_policy(name, server, queries, docs_by_phase, *, phases, rate, outstanding, p99_ms,
               progress=True, kind="static") -> RunResult:
    """Drive ``server`` with the workload of ``phases``; docs_by_phase[i]: the
    documents the indexer sends in phase i."""

    res = RunResult(name, list(phases), p99_ms, kind=kind)
    bounds = phase_bounds(phases)
    duration = bounds[-1][1]
    arrivals = query_arrivals(phases, rate)
    lock = threading.Lock()
    stop = threading.Event()
    pending: list = []
    t_start = time.monotonic()
    cpu0 = time.process_time()

    def phase_at(t: float) -> int:
        for i, (_, t1) in enumerate(bounds):
            if t < t1:
                return i
        return len(bounds) - 1

    def interactive():
        for i, off in enumerate(arrivals):
            delay = t_start + off - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            try:
                fut = server.submit(queries[i % len(queries)], "interactive")
            except Overloaded:
                with lock:
                    res.queries.append((off, float("inf")))
                continue

            def done(f, off=off):
                ms = (time.monotonic() - t_start - off) * 1e3
                with lock:
                    res.queries.append((off, ms if f.exception() is None else float("inf")))
            fut.add_done_callback(done)
            pending.append(fut)

    sem = threading.Semaphore(outstanding)

    def bulk():
        i = 0
        while not stop.is_set() and time.monotonic() - t_start < duration:
            if not sem.acquire(timeout=0.05):
                continue
            docs = docs_by_phase[phase_at(time.monotonic() - t_start)]
            try:
                fut = server.submit(docs[i % len(docs)], "bulk")
            except Overloaded:
                sem.release()
                res.bulk_refused += 1
                time.sleep(0.005)
                continue
            i += 1

            def done(f):
                t = time.monotonic() - t_start
                if f.exception() is None and t <= duration:
                    with lock:
                        res.bulk.append(t)
                sem.release()
            fut.add_done_callback(done)

    live = progress and sys.stderr.isatty()
    threads = [threading.Thread(target=interactive, daemon=True),
               threading.Thread(target=bulk, daemon=True)]
    for th in threads:
        th.start()
    started = set()
    competitors = []
    try:
        while time.monotonic() - t_start < duration:
            el = time.monotonic() - t_start
            i = phase_at(el)
            if phases[i].slowdown_s > 0 and i not in started:
                started.add(i)
                competitors.append(start_competitor(phases[i].slowdown_s))
            time.sleep(0.05)
            if live:
                with lock:
                    lat = [ms for _, ms in res.queries]
                p99 = np.percentile(lat, 99) if lat else float("nan")
                sys.stderr.write(f"\r  {name:<24} {el:5.1f}/{duration:.0f} s {phases[i].name:<8} "
                                 f"queries {len(lat):5d}  p99 {p99:8.1f} ms  bulk {len(res.bulk):6d}  ")
                sys.stderr.flush()
    finally:
        stop.set()
        for proc in competitors:  # only the processes this run started
            proc.kill()
            proc.wait()
    for th in threads:
        th.join()
    # Queries that arrived in the window are waited for (they count with their
    # real latency); the closed-loop bulk client stops counting at the window end.
    # At most 30 s in all: a query still queued then fails at close() and
    # counts as a miss.
    wait_until = time.monotonic() + 30.0
    for f in pending:
        try:
            f.result(timeout=max(0.0, wait_until - time.monotonic()))
        except Exception:  # noqa: BLE001 - counted by the callback
            pass
    res.cpu_util = (time.process_time() - cpu0) / (time.monotonic() - t_start) / (os.cpu_count() or 1)
    server.close()
    res.batches = [(t - t_start, c, p, n) for t, c, p, n in getattr(server, "batches", ())]
    if live:
        sys.stderr.write("\n")
    elif progress:
        sys.stderr.write(f"  {name}: done ({len(res.queries)} queries, {len(res.bulk)} documents)\n")
    return res


# ---------------------------------------------------------------------------
def measure_profile(model, texts_by_op: dict, precisions, configs, batches, reps: int):
    """A ``Profile`` of whole ``model.encode`` calls per (op, variant,
    precision, threads, batch). Each op's texts are those it serves, so a
    batch of mixed lengths is measured with the padding it really carries."""

    profile = Profile()
    for op, texts in texts_by_op.items():
        for prec in precisions:
            for variant, threads in configs:
                model.encode(texts[:2], batch_size=2, variant=variant, threads=threads,
                             precision=prec)  # warm
                for b in batches:
                    times = []
                    for r in range(reps):
                        batch = [texts[(r * b + i) % len(texts)] for i in range(b)]
                        t0 = time.perf_counter()
                        model.encode(batch, batch_size=b, variant=variant, threads=threads,
                                     precision=prec)
                        times.append((time.perf_counter() - t0) * 1e3)
                    times.sort()
                    profile.add(op, variant, prec, threads, b, times[len(times) // 2],
                                max(times[-1], times[len(times) // 2]), samples=reps)
    return profile
