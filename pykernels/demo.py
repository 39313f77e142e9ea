"""`pykernels demo`: MiniLM under a mixed interactive + bulk workload, served
under five policies side by side.

Workload (open loop for queries, closed loop for the indexer):
* interactive: Poisson arrivals of short queries (about 8-16 tokens), each
  with a p99 latency target (``--p99-ms``);
* bulk: an indexing client that keeps ``--bulk-outstanding`` documents of
  10-90 tokens in flight and submits a new one whenever one completes.

Policies (each gets the same workload, one after the other):
* static-latency: FIFO, batch 1, latency kernels;
* static-throughput: FIFO, batches of 64, throughput kernels;
* fixed-delay: FIFO, up to 32 items, waits at most 10 ms to fill a batch
  (Triton's dynamic batcher with max_queue_delay);
* aimd: FIFO, batch size grows by 1 while recent batches meet the p99 target
  and shrinks by 10% on a miss (Clipper);
* pykernels: ``DynamicBatcher`` with SLO classes (earliest deadline first,
  bulk work cut into chunks bounded by a quarter of the p99 target, admission
  control) planned by ``pykernels.policy.Policy`` from service times measured
  at start-up.

Reported per policy: interactive p50/p99 (from arrival to completion, queue
included) and SLO attainment (refused requests count as misses), bulk
documents/s, CPU utilization of the process. Latency is measured from the
*scheduled* arrival time, so a generator that falls behind cannot hide load.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

WORDS = (
    "the of and to in is for on that with as by at from this be are or it an was which "
    "kernel latency throughput batch model query index document search vector embedding "
    "cache memory core thread policy request server client answer result score rank "
    "machine learning inference sentence token layer attention weight matrix product "
    "fast slow large small simple complex modern classic data system network storage "
    "user service time price market river mountain city garden music history science "
    "energy water light color story paper book film game travel food health sport"
).split()

BULK_BATCH = 64


def make_texts(rng, n: int, lo: int, hi: int) -> list:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1)))) for _ in range(n)]


# ---------------------------------------------------------------------------
# Baseline servers: one FIFO queue for both classes, one worker thread.
class FifoServer:
    def __init__(self, encode, *, batch: int, max_wait_s: float, variant: str, threads: int,
                 aimd_target_ms: float | None = None):
        self.encode = encode
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.variant = variant
        self.threads = threads
        self.aimd_target_ms = aimd_target_ms
        self._q: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._recent: deque = deque(maxlen=8)
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def submit(self, item, cls):
        fut: Future = Future()
        with self._cv:
            self._q.append((item, fut, time.monotonic()))
            self._cv.notify()
        return fut

    def _run(self):
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if self._stop and not self._q:
                    return
                limit = max(1, int(self.batch))
                first_arrival = self._q[0][2]
                while len(self._q) < limit and not self._stop:
                    left = first_arrival + self.max_wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                items = [self._q.popleft() for _ in range(min(limit, len(self._q)))]
            t0 = time.perf_counter()
            try:
                out = self.encode([it[0] for it in items], self.variant, self.threads)
                for (_, fut, _), row in zip(items, out):
                    fut.set_result(row)
            except Exception as e:  # noqa: BLE001 - fail this batch's futures only
                for _, fut, _ in items:
                    fut.set_exception(e)
            ms = (time.perf_counter() - t0) * 1e3
            if self.aimd_target_ms is not None:
                self._recent.append(ms)
                # Clipper's AIMD: additive increase while batches meet the target,
                # multiplicative decrease (10%) on a miss.
                if max(self._recent) <= self.aimd_target_ms * 0.5:
                    self.batch = min(BULK_BATCH, self.batch + 1)
                elif ms > self.aimd_target_ms * 0.5:
                    self.batch = max(1, int(self.batch * 0.9))
                    self._recent.clear()

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._worker.join(timeout=30)


class PolicyServer:
    """The pykernels DynamicBatcher behind the same submit() as the baselines."""

    def __init__(self, encode, model, profile, p99_ms: float):
        from .models.minilm import encoder_op
        from .policy import SLO, Policy
        from .serving import DynamicBatcher

        classes = {"interactive": SLO(p99_ms=p99_ms), "bulk": SLO()}
        self.batcher = DynamicBatcher(
            lambda items, plan: encode(items, plan.variant, plan.threads),
            policy=lambda slo: Policy(slo, profile),
            classes=classes,
            op={"interactive": encoder_op(model, 14), "bulk": encoder_op(model, 56)},
            name="demo")

    def submit(self, item, cls):
        return self.batcher.submit(item, cls)

    def close(self):
        self.batcher.close(drain=True)


# ---------------------------------------------------------------------------
@dataclass
class RunResult:
    policy: str
    interactive_ms: list = field(default_factory=list)
    interactive_sent: int = 0
    interactive_refused: int = 0
    interactive_failed: int = 0
    bulk_done: int = 0
    bulk_refused: int = 0
    seconds: float = 0.0
    cpu_util: float = 0.0
    p99_target_ms: float = 0.0

    def summary(self) -> dict:
        lat = np.array(self.interactive_ms) if self.interactive_ms else np.array([np.inf])
        met = int(np.sum(lat <= self.p99_target_ms)) if self.interactive_ms else 0
        return {
            "policy": self.policy,
            "interactive_sent": self.interactive_sent,
            "interactive_p50_ms": float(np.percentile(lat, 50)),
            "interactive_p99_ms": float(np.percentile(lat, 99)),
            "slo_attainment": met / max(1, self.interactive_sent),
            "interactive_refused": self.interactive_refused,
            "bulk_docs_per_s": self.bulk_done / max(self.seconds, 1e-9),
            "bulk_refused": self.bulk_refused,
            "cpu_util": self.cpu_util,
        }


def run_policy(name, server, queries, docs, *, duration, rate, outstanding, p99_ms,
               progress=True) -> RunResult:
    from .serving import Overloaded

    res = RunResult(name, p99_target_ms=p99_ms)
    lock = threading.Lock()
    stop = threading.Event()
    pending: list = []
    rng = np.random.default_rng(1)
    t_start = time.monotonic()
    cpu0 = time.process_time()

    def interactive():
        t = t_start
        i = 0
        while True:
            t += rng.exponential(1.0 / rate)
            if t - t_start >= duration:
                return
            delay = t - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            scheduled = t
            res.interactive_sent += 1
            try:
                fut = server.submit(queries[i % len(queries)], "interactive")
            except Overloaded:
                res.interactive_refused += 1
                continue
            i += 1

            def done(f, scheduled=scheduled):
                with lock:
                    if f.exception() is None:
                        res.interactive_ms.append((time.monotonic() - scheduled) * 1e3)
                    else:
                        res.interactive_failed += 1
            fut.add_done_callback(done)
            pending.append(fut)

    sem = threading.Semaphore(outstanding)

    def bulk():
        i = 0
        while not stop.is_set() and time.monotonic() - t_start < duration:
            if not sem.acquire(timeout=0.05):
                continue
            try:
                fut = server.submit(docs[i % len(docs)], "bulk")
            except Overloaded:
                sem.release()
                res.bulk_refused += 1
                time.sleep(0.005)
                continue
            i += 1

            def done(f):
                if f.exception() is None and time.monotonic() - t_start <= duration:
                    with lock:
                        res.bulk_done += 1
                sem.release()
            fut.add_done_callback(done)

    live = progress and sys.stderr.isatty()
    threads = [threading.Thread(target=interactive, daemon=True),
               threading.Thread(target=bulk, daemon=True)]
    for th in threads:
        th.start()
    while time.monotonic() - t_start < duration:
        time.sleep(0.25)
        if live:
            el = time.monotonic() - t_start
            with lock:
                lat = list(res.interactive_ms)
            p99 = np.percentile(lat, 99) if lat else float("nan")
            sys.stderr.write(f"\r  {name:<18} {el:5.1f}/{duration:.0f} s  queries {len(lat):5d}  "
                             f"p99 {p99:8.1f} ms  bulk docs {res.bulk_done:6d}   ")
            sys.stderr.flush()
    stop.set()
    for th in threads:
        th.join()
    res.seconds = duration
    # Queries that arrived in the window are waited for (they count with their
    # real latency); the closed-loop bulk client stops counting at the window end.
    for f in pending:
        try:
            f.result(timeout=60)
        except Exception:  # noqa: BLE001 - counted by the callback
            pass
    res.cpu_util = (time.process_time() - cpu0) / (time.monotonic() - t_start) / (os.cpu_count() or 1)
    server.close()
    if live:
        sys.stderr.write("\n")
    elif progress:
        sys.stderr.write(f"  {name}: done ({len(res.interactive_ms)} queries, "
                         f"{res.bulk_done} documents)\n")
    return res


def run_demo(*, duration: float = 9.0, rate: float = 20.0, p99_ms: float = 100.0,
             outstanding: int = 128, precision: str = "fp32", quick: bool = False,
             json_path: str | None = None, progress: bool = True, policies=None) -> list:
    from .models import MiniLM
    from .serving.service import measure_encoder

    out = sys.stdout
    rng = np.random.default_rng(0)
    model = MiniLM.load(precision=precision)
    queries = make_texts(rng, 256, 6, 13)
    docs = make_texts(rng, 512, 8, 75)

    def encode(texts, variant, threads):
        return list(model.encode(texts, batch_size=len(texts), variant=variant, threads=threads))

    print(f"pykernels demo: all-MiniLM-L6-v2 ({precision}); interactive Poisson {rate:g}/s "
          f"with p99 target {p99_ms:g} ms; bulk indexer with {outstanding} documents in "
          f"flight; {duration:g} s per policy", file=out)
    t0 = time.perf_counter()
    tok = {14: queries[:16], 56: [d for d in docs if 40 <= len(d.split()) <= 60][:16] or docs[:16]}
    batches = [1, 2, 4] if quick else [1, 2, 4, 8, 16]
    profile = measure_encoder(model, tok, [("latency", 2), ("throughput", 2), ("throughput", 1)],
                              batches, reps=2 if quick else 3)
    print(f"measured service times for the policy in {time.perf_counter() - t0:.1f} s", file=out)

    makers = {
        "static-latency": lambda: FifoServer(encode, batch=1, max_wait_s=0, variant="latency",
                                             threads=2),
        "static-throughput": lambda: FifoServer(encode, batch=BULK_BATCH, max_wait_s=0.05,
                                                variant="throughput", threads=2),
        "fixed-delay": lambda: FifoServer(encode, batch=32, max_wait_s=0.010, variant="auto",
                                          threads=2),
        "aimd": lambda: FifoServer(encode, batch=4, max_wait_s=0.005, variant="auto", threads=2,
                                   aimd_target_ms=p99_ms),
        "pykernels": lambda: PolicyServer(encode, model, profile, p99_ms),
    }
    names = policies or list(makers)
    results = []
    for name in names:
        res = run_policy(name, makers[name](), queries, docs, duration=duration, rate=rate,
                         outstanding=outstanding, p99_ms=p99_ms, progress=progress)
        results.append(res.summary())
    print_table(results, p99_ms, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"p99_target_ms": p99_ms, "rate": rate, "duration_s": duration,
                       "precision": precision, "results": results}, f, indent=2)
    return results


def print_table(results, p99_ms, out=sys.stdout):
    print("", file=out)
    hdr = (f"{'policy':<18} {'queries':>7} {'p50 ms':>8} {'p99 ms':>8} {'SLO met':>8} "
           f"{'refused':>7} {'bulk docs/s':>11} {'CPU':>5}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in results:
        print(f"{r['policy']:<18} {r['interactive_sent']:>7d} {r['interactive_p50_ms']:>8.1f} "
              f"{r['interactive_p99_ms']:>8.1f} {100 * r['slo_attainment']:>7.1f}% "
              f"{r['interactive_refused']:>7d} {r['bulk_docs_per_s']:>11.1f} "
              f"{100 * r['cpu_util']:>4.0f}%", file=out)
    by = {r["policy"]: r for r in results}
    if "pykernels" in by and "static-throughput" in by:
        pk, st = by["pykernels"], by["static-throughput"]
        share = (f"{100 * pk['bulk_docs_per_s'] / st['bulk_docs_per_s']:.0f}%"
                 if st["bulk_docs_per_s"] > 0 else "n/a (static-throughput completed none)")
        print(f"\npykernels: {100 * pk['slo_attainment']:.1f}% of queries within {p99_ms:g} ms "
              f"(target >= 99%), bulk throughput {share} of static-throughput "
              f"(target >= 90%; static-throughput met the SLO for "
              f"{100 * st['slo_attainment']:.1f}%).", file=out)


def add_demo_arguments(p):
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per policy (default 9; 2 with --quick)")
    p.add_argument("--rate", type=float, default=20.0, help="interactive queries per second")
    p.add_argument("--p99-ms", type=float, default=100.0, help="interactive p99 target (ms)")
    p.add_argument("--bulk-outstanding", type=int, default=128,
                   help="documents the indexer keeps in flight")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    p.add_argument("--quick", action="store_true", help="short run (CI smoke)")
    p.add_argument("--policies", default=None,
                   help="comma-separated subset of static-latency,static-throughput,"
                        "fixed-delay,aimd,pykernels")
    p.add_argument("--json", dest="json_path", default=None, help="write results as JSON")
    p.add_argument("--no-progress", action="store_true")


def run_demo_cli(args) -> int:
    """Mixed interactive + bulk MiniLM workload under five serving policies."""
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 9.0)
    policies = args.policies.split(",") if args.policies else None
    known = ("static-latency", "static-throughput", "fixed-delay", "aimd", "pykernels")
    for name in policies or ():
        if name not in known:
            print(f"pykernels demo: unknown policy {name!r}; choose from {', '.join(known)}",
                  file=sys.stderr)
            return 2
    run_demo(duration=duration, rate=args.rate, p99_ms=args.p99_ms,
             outstanding=args.bulk_outstanding, precision=args.precision, quick=args.quick,
             json_path=args.json_path, progress=not args.no_progress, policies=policies)
    return 0
