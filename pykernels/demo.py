"""`pykernels demo`: MiniLM under a mixed interactive + bulk workload, served
by pykernels' policy and by the static configurations users would set up.

Workload (open loop for queries, closed loop for the indexer):
* interactive: Poisson arrivals of short queries (about 8-15 tokens), each
  with a p99 latency target (``--p99-ms``);
* bulk: an indexing client that keeps ``--bulk-outstanding`` documents in
  flight and submits a new one whenever one completes.
One steady phase by default; ``--phases`` runs four in one go (``PHASES``):
short documents, long documents, a query burst at 3x the rate, and a slowdown
(a competing CPU-bound process pinned to one core for a few seconds).

Servers (each gets the same workload, one after the other):
* priority-b{N}-{variant}-d{ms}: Triton's dynamic batcher with two priority
  levels (an interactive request always leaves the queue first), a static
  batch size N, max_queue_delay 0 or 5 ms, the latency or throughput kernels;
* reference rows, one FIFO for both classes: static-latency (batch 1),
  static-throughput (batch 64), fixed-delay (32 items, 10 ms), aimd (Clipper);
* pykernels: ``DynamicBatcher`` with SLO classes planned by
  ``pykernels.policy.Policy`` from service times and embedding cosines
  measured at start-up; the planner picks variant, threads, batch and
  precision (fp32 or int8, within each class's ``--accuracy`` budget) per
  batch. pykernels-fp32: the same with fp32 only.

Reported per server and phase: query p50/p99 (arrival to completion, queue
included, from the *scheduled* arrival so a lagging generator hides nothing),
SLO attainment (refused queries count as misses), bulk documents/s, and for
pykernels the precision mix. The best static configuration meeting 99% is
marked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
ATTAIN = 0.99  # the share of queries within the p99 target a configuration must reach
REFERENCE = ("static-latency", "static-throughput", "fixed-delay", "aimd")
POLICIES = ("pykernels", "pykernels-fp32")
# Static priority configurations: every batch size x variant x max_queue_delay
# ("all"), or one row per batch size with the kernels' own size heuristic and
# no delay ("quick", about a minute at 9 s each).
BATCHES = (1, 2, 4, 8, 16, 64)
DEFAULT_ACCURACY = {"interactive": 0.999, "bulk": 0.99}


def make_texts(rng, n: int, lo: int, hi: int) -> list:
    """n texts of lo..hi words (each word of WORDS is one token; a text adds
    [CLS] and [SEP])."""
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1)))) for _ in range(n)]


def priority_name(batch: int, variant: str, delay_ms: float) -> str:
    return f"priority-b{batch}-{variant[:3]}-d{delay_ms:g}"


def static_configs(which: str) -> List[Tuple[str, int, str, float]]:
    """(name, batch, variant, max_queue_delay ms) of the static priority rows."""
    if which == "none":
        return []
    if which == "quick":
        return [(priority_name(b, "auto", 0), b, "auto", 0.0) for b in BATCHES]
    if which != "all":
        raise ValueError(f"baselines must be quick, all or none, got {which!r}")
    return [(priority_name(b, v, d), b, v, d) for b in BATCHES for v in ("latency", "throughput")
            for d in (0.0, 5.0)]


# ---------------------------------------------------------------------------
# Phases
@dataclass(frozen=True)
class Phase:
    """One stretch of the workload: queries at ``rate_mult`` x the base rate,
    bulk documents of ``doc_words`` words, optionally a competing CPU-bound
    process on one core for its first ``slowdown_s`` seconds."""

    name: str
    seconds: float
    rate_mult: float = 1.0
    doc_words: Tuple[int, int] = (8, 75)
    slowdown_s: float = 0.0


def make_phases(phases: bool, seconds: float) -> List[Phase]:
    """The schedule: one steady phase of ``seconds``, or (``phases``) the four
    phases of ``seconds`` each. Token counts: short 8-24, long 60-200 (words + 2)."""
    if not phases:
        return [Phase("steady", seconds)]
    return [Phase("short", seconds, doc_words=(6, 22)),
            Phase("long", seconds, doc_words=(58, 198)),
            Phase("burst", seconds, rate_mult=3.0),
            Phase("slowdown", seconds, slowdown_s=min(5.0, 0.6 * seconds))]


def phase_bounds(phases: Sequence[Phase]) -> List[Tuple[float, float]]:
    out, t = [], 0.0
    for p in phases:
        out.append((t, t + p.seconds))
        t += p.seconds
    return out


def query_arrivals(phases: Sequence[Phase], rate: float, seed: int = 1) -> List[float]:
    """Poisson arrival offsets (s) over the phases, each at its own rate: the
    same list for every server."""
    rng = np.random.default_rng(seed)
    out = []
    for (t0, t1), p in zip(phase_bounds(phases), phases):
        t = t0
        while True:
            t += rng.exponential(1.0 / (rate * p.rate_mult))
            if t >= t1:
                break
            out.append(t)
    return out


def start_competitor(seconds: float) -> subprocess.Popen:
    """A CPU-bound process pinned to core 0 that spins for ``seconds``."""
    code = ("import os, time\n"
            "try:\n    os.sched_setaffinity(0, {0})\nexcept (AttributeError, OSError):\n    pass\n"
            f"end = time.monotonic() + {float(seconds)!r}\n"
            "while time.monotonic() < end:\n    pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


# ---------------------------------------------------------------------------
# Static servers: one worker thread, a batch of at most ``batch`` items.
class StaticServer:
    """A static batcher. ``priority``: interactive requests always leave the
    queue first and a batch is filled in priority order (Triton's
    priority_levels); otherwise one FIFO for both classes. A batch waits at
    most ``max_wait_s`` after its first request to fill. ``aimd_target_ms``:
    the batch size follows Clipper's AIMD on batch service time."""

    def __init__(self, encode, *, batch: int, max_wait_s: float, variant: str, threads: int,
                 priority: bool = False, aimd_target_ms: Optional[float] = None):
        self.encode = encode
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.variant = variant
        self.threads = threads
        self.priority = priority
        self.aimd_target_ms = aimd_target_ms
        self._queues = {"interactive": deque(), "bulk": deque()}
        self._cv = threading.Condition()
        self._stop = False
        self._recent: deque = deque(maxlen=8)
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def submit(self, item, cls):
        fut: Future = Future()
        q = self._queues[cls] if self.priority else self._queues["bulk"]
        with self._cv:
            q.append((item, fut, time.monotonic()))
            self._cv.notify()
        return fut

    def _queued(self) -> int:
        return len(self._queues["interactive"]) + len(self._queues["bulk"])

    def take(self, limit: int) -> list:
        """Pop up to ``limit`` requests, interactive first (caller holds the lock)."""
        out = []
        for q in (self._queues["interactive"], self._queues["bulk"]):
            while q and len(out) < limit:
                out.append(q.popleft())
        return out

    def _run(self):
        while True:
            with self._cv:
                while not self._queued() and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queued():
                    return
                limit = max(1, int(self.batch))
                first = min(q[0][2] for q in self._queues.values() if q)
                while self._queued() < limit and not self._stop:
                    left = first + self.max_wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                items = self.take(limit)
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
        self._worker.join(timeout=60)


FifoServer = StaticServer  # the name the FIFO reference rows had


class PolicyServer:
    """The pykernels DynamicBatcher behind the same submit() as the baselines.

    ops: class -> op the policy plans (precision None: the planner's choice);
    accuracy: class -> the least cosine to fp32's embeddings. Every batch's
    (time, class, precision, items) goes to ``self.batches``."""

    def __init__(self, model, profile, p99_ms: float, ops: dict, accuracy: dict):
        from .policy import SLO, Policy
        from .serving import DynamicBatcher

        self.batches: list = []
        by_op = {id(op): cls for cls, op in ops.items()}
        classes = {"interactive": SLO(p99_ms=p99_ms, min_cosine=accuracy["interactive"]),
                   "bulk": SLO(min_cosine=accuracy["bulk"])}

        def run(items, plan):
            out = model.encode(items, batch_size=len(items), variant=plan.variant,
                               threads=plan.threads, precision=plan.precision)
            self.batches.append((time.monotonic(), by_op.get(id(plan.op), "?"), plan.precision,
                                 len(items)))
            return list(out)

        self.policies: dict = {}

        def make(slo):
            pol = Policy(slo, profile)
            self.policies[slo] = pol
            return pol

        self.batcher = DynamicBatcher(run, policy=make, classes=classes, op=ops, name="demo")
        for slo, pol in self.policies.items():  # build the cost models before the clock starts
            pol.plan(ops["interactive" if slo.p99_ms is not None else "bulk"], queued=1)

    def submit(self, item, cls):
        return self.batcher.submit(item, cls)

    def close(self):
        self.batcher.close(drain=True)


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
    from .serving import Overloaded

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
    for f in pending:
        try:
            f.result(timeout=60)
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
    from .policy import Profile

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


def measure_cosines(model, texts: Sequence[str]) -> Dict[str, float]:
    """The least cosine of each precision's embeddings to fp32's on ``texts``."""
    ref = model.encode(texts, precision="fp32")
    return {p: (1.0 if p == "fp32" else float(np.min(np.sum(model.encode(texts, precision=p) * ref,
                                                             axis=1))))
            for p in model.precisions}


def parse_accuracy(text: Optional[str]) -> dict:
    """"interactive=0.999,bulk=0.99" -> {class: least cosine to fp32}."""
    out = dict(DEFAULT_ACCURACY)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        cls, _, val = part.partition("=")
        cls = cls.strip()
        if cls not in out:
            raise ValueError(f"--accuracy: unknown class {cls!r}; the demo serves "
                             f"{', '.join(out)}")
        try:
            c = float(val)
        except ValueError:
            raise ValueError(f"--accuracy: {part!r} is not class=cosine (e.g. bulk=0.99)") from None
        if not 0.0 < c <= 1.0:
            raise ValueError(f"--accuracy: the cosine of {cls!r} must be in (0, 1], got {c}")
        out[cls] = c
    return out


def run_demo(*, duration: float = 9.0, rate: float = 20.0, p99_ms: float = 100.0,
             outstanding: int = 128, precision: str = "fp32", quick: bool = False,
             json_path: Optional[str] = None, progress: bool = True, policies=None,
             baselines: str = "quick", phases: bool = False, accuracy: Optional[dict] = None,
             plot_path: Optional[str] = None) -> list:
    from .models import MiniLM
    from .models.minilm import encoder_op
    from .policy.slo import cosine_error

    out = sys.stdout
    accuracy = dict(accuracy or DEFAULT_ACCURACY)
    rng = np.random.default_rng(0)
    model = MiniLM.load(precision=precision, precisions=("fp32", "int8"))
    sched = make_phases(phases, duration)
    queries = make_texts(rng, 256, 6, 13)
    docs_by_phase = [make_texts(rng, 512, *p.doc_words) for p in sched]
    statics = static_configs(baselines)
    names = policies or ([n for n, *_ in statics] + list(REFERENCE) + list(POLICIES))

    def encode(texts, variant, threads):
        return list(model.encode(texts, batch_size=len(texts), variant=variant, threads=threads))

    print(f"pykernels demo: all-MiniLM-L6-v2 (baselines {precision}; pykernels holds "
          f"{', '.join(model.precisions)}, weights {model.weight_bytes() / 2**20:.1f} MiB vs "
          f"{model.weight_bytes(precision) / 2**20:.1f} MiB); interactive Poisson {rate:g}/s with "
          f"p99 target {p99_ms:g} ms; bulk indexer with {outstanding} documents in flight; "
          f"phases {', '.join(f'{p.name} {p.seconds:g} s' for p in sched)} per server", file=out)
    t0 = time.perf_counter()
    calib = queries[:16] + [d for docs in docs_by_phase for d in docs[:16]]
    cosines = measure_cosines(model, calib)
    ops = {"interactive": encoder_op(model, 14, None), "bulk": encoder_op(model, 56, None)}
    all_docs = [d for docs in docs_by_phase for d in docs]
    order = np.random.default_rng(2).permutation(len(all_docs))
    profile = measure_profile(
        model, {ops["interactive"]: queries[:32], ops["bulk"]: [all_docs[i] for i in order[:64]]},
        model.precisions, [("latency", 2), ("throughput", 2)],
        [1, 2, 4] if quick else [1, 2, 4, 8], reps=2 if quick else 3)
    profile.precision_error.update({p: cosine_error(c) for p, c in cosines.items()})
    print(f"measured service times and embedding cosines to fp32 ("
          f"{', '.join(f'{p} {c:.5f}' for p, c in cosines.items())}; accuracy budgets "
          f"{', '.join(f'{k} >= {v:g}' for k, v in accuracy.items())}) in "
          f"{time.perf_counter() - t0:.1f} s", file=out)

    makers = {
        "static-latency": lambda: StaticServer(encode, batch=1, max_wait_s=0, variant="latency",
                                               threads=2),
        "static-throughput": lambda: StaticServer(encode, batch=BULK_BATCH, max_wait_s=0.05,
                                                  variant="throughput", threads=2),
        "fixed-delay": lambda: StaticServer(encode, batch=32, max_wait_s=0.010, variant="auto",
                                            threads=2),
        "aimd": lambda: StaticServer(encode, batch=4, max_wait_s=0.005, variant="auto", threads=2,
                                     aimd_target_ms=p99_ms),
        "pykernels": lambda: PolicyServer(model, profile, p99_ms, ops, accuracy),
        "pykernels-fp32": lambda: PolicyServer(model, profile, p99_ms, ops,
                                               {k: 1.0 for k in accuracy}),
    }
    for name, b, variant, delay in static_configs("all"):
        makers[name] = (lambda b=b, v=variant, d=delay: StaticServer(
            encode, batch=b, max_wait_s=d / 1e3, variant=v, threads=2, priority=True))
    for name, b, variant, delay in static_configs("quick"):
        makers[name] = (lambda b=b, v=variant, d=delay: StaticServer(
            encode, batch=b, max_wait_s=d / 1e3, variant=v, threads=2, priority=True))
    runs = []
    for name in names:
        kind = "pykernels" if name in POLICIES else "reference" if name in REFERENCE else "static"
        server = makers[name]()
        res = run_policy(name, server, queries, docs_by_phase, phases=sched, rate=rate,
                         outstanding=outstanding, p99_ms=p99_ms, progress=progress, kind=kind)
        if isinstance(server, PolicyServer) and name == "pykernels":
            pol = server.policies
            for slo, policy in pol.items():
                cls = "interactive" if slo.p99_ms is not None else "bulk"
                plan = policy.plan(ops[cls], queued=4 if cls == "interactive" else 64,
                                   arrival_rate=rate if cls == "interactive" else None)
                print(f"\n[{cls}] {plan.explain()}", file=out)
        runs.append(res)
    results = [r.summary() for r in runs]
    best = mark_best(results)
    print_table(results, p99_ms, out)
    if phases:
        print_phases(results, sched, p99_ms, out)
    print_targets(results, best, sched, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"p99_target_ms": p99_ms, "rate": rate, "duration_s": duration,
                       "precision": precision, "accuracy": accuracy, "cosines": cosines,
                       "phases": [p.__dict__ for p in sched], "best_static": best,
                       "results": [r for r in results if r["policy"] in REFERENCE + ("pykernels",)],
                       "rows": results}, f, indent=2)
    if plot_path:
        from .demo_plot import plot_runs
        plot_runs(runs, sched, p99_ms, plot_path)
        print(f"\nwrote {plot_path}", file=out)
    return results


def best_static(results: Sequence[dict], phase: Optional[str] = None) -> Optional[dict]:
    """The static priority row with the most bulk documents/s among those with
    >= 99% of queries within the target (over the run, or in ``phase``)."""
    rows = [r for r in results if r["kind"] == "static"]
    get = (lambda r: r) if phase is None else (lambda r: r["phases"][phase])
    ok = [r for r in rows if get(r)["slo_attainment"] >= ATTAIN]
    return max(ok, key=lambda r: get(r)["bulk_docs_per_s"]) if ok else None


def mark_best(results: list) -> dict:
    """Mark each row's ``best_static`` flag; {"run": name, phase: name} (None: no static met 99%)."""
    best = best_static(results)
    for r in results:
        r["best_static"] = best is not None and r is best
    out = {"run": best["policy"] if best else None}
    for ph in results[0]["phases"] if results else ():
        b = best_static(results, ph)
        out[ph] = b["policy"] if b else None
    return out


def _fmt_mix(mix: dict) -> str:
    return " ".join(f"{cls[0]}:" + "/".join(f"{p}{100 * f:.0f}%" for p, f in d.items())
                    for cls, d in sorted(mix.items()) if cls != "?")


def print_table(results, p99_ms, out=sys.stdout):
    print("", file=out)
    hdr = (f"{'server':<24} {'queries':>7} {'p50 ms':>8} {'p99 ms':>8} {'SLO met':>8} "
           f"{'refused':>7} {'bulk docs/s':>11} {'CPU':>5}  precision (i: queries, b: bulk)")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in results:
        mark = " *" if r.get("best_static") else ""
        print(f"{(r['policy'] + mark):<24} {r['interactive_sent']:>7d} "
              f"{r['interactive_p50_ms']:>8.1f} {r['interactive_p99_ms']:>8.1f} "
              f"{100 * r['slo_attainment']:>7.1f}% {r['interactive_refused']:>7d} "
              f"{r['bulk_docs_per_s']:>11.1f} {100 * r['cpu_util']:>4.0f}%  "
              f"{_fmt_mix(r['precision_mix'])}", file=out)
    print(f"* the best static priority configuration with >= {100 * ATTAIN:g}% of queries "
          f"within {p99_ms:g} ms (most bulk documents/s)", file=out)


def print_phases(results, sched, p99_ms, out=sys.stdout):
    print(f"\nper phase: % of queries within {p99_ms:g} ms / bulk docs/s "
          f"(+ = best static meeting {100 * ATTAIN:g}% in that phase)", file=out)
    print(f"{'server':<24} " + " ".join(f"{p.name:>16}" for p in sched), file=out)
    best = {p.name: best_static(results, p.name) for p in sched}
    for r in results:
        cells = []
        for p in sched:
            w = r["phases"][p.name]
            mark = "+" if best[p.name] is r else " "
            cells.append(f"{100 * w['slo_attainment']:6.1f}%/{w['bulk_docs_per_s']:6.1f}{mark}")
        print(f"{r['policy']:<24} " + " ".join(f"{c:>16}" for c in cells), file=out)
    for r in results:
        if r["kind"] == "pykernels":
            print(f"{r['policy']} precision mix: " + "; ".join(
                f"{p.name} {_fmt_mix(r['phases'][p.name]['precision_mix']) or '-'}" for p in sched),
                file=out)


def print_targets(results, best, sched, out=sys.stdout):
    by = {r["policy"]: r for r in results}
    pk = by.get("pykernels")
    if pk is None:
        return
    lines = []
    b = by.get(best["run"]) if best.get("run") else None
    ratio = (f"{pk['bulk_docs_per_s'] / b['bulk_docs_per_s']:.2f}x {b['policy']}" if b
             else "no static configuration met 99%")
    lines.append(f"whole run: {100 * pk['slo_attainment']:.1f}% within target (>= 99%), bulk "
                 f"{ratio} (target >= 1.3x)")
    if len(sched) > 1:
        for p in sched:
            w = pk["phases"][p.name]
            bp = by.get(best.get(p.name)) if best.get(p.name) else None
            rr = (f"{w['bulk_docs_per_s'] / max(bp['phases'][p.name]['bulk_docs_per_s'], 1e-9):.2f}x "
                  f"{bp['policy']}" if bp else "no static met 99%")
            lines.append(f"phase {p.name}: {100 * w['slo_attainment']:.1f}% within target, bulk "
                         f"{rr} (targets >= 99%, >= 1.0x)")
    if "slowdown_first_s_attainment" in pk:
        lines.append(f"first second of the slowdown: {100 * pk['slowdown_first_s_attainment']:.1f}% "
                     f"within target (target >= 95%)")
    f32 = by.get("pykernels-fp32")
    if f32 is not None:
        ph = sched[0].name
        lines.append(f"int8 lever, phase {ph}: bulk {pk['phases'][ph]['bulk_docs_per_s']:.1f} vs "
                     f"{f32['phases'][ph]['bulk_docs_per_s']:.1f} docs/s fp32-only "
                     f"({pk['phases'][ph]['bulk_docs_per_s'] / max(f32['phases'][ph]['bulk_docs_per_s'], 1e-9):.2f}x, target >= 2x)")
    print("\npykernels against the targets:", file=out)
    for line in lines:
        print("  " + line, file=out)


def add_demo_arguments(p):
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per server, or per phase with --phases (default 9, 10 with "
                        "--phases; 2 with --quick)")
    p.add_argument("--rate", type=float, default=20.0, help="interactive queries per second")
    p.add_argument("--p99-ms", type=float, default=100.0, help="interactive p99 target (ms)")
    p.add_argument("--bulk-outstanding", type=int, default=128,
                   help="documents the indexer keeps in flight")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="precision of the static baselines' weights")
    p.add_argument("--quick", action="store_true", help="short run (CI smoke)")
    p.add_argument("--baselines", choices=("quick", "all", "none"), default=None,
                   help="static priority configurations: quick (one per batch size, default), "
                        "all (batch x variant x max_queue_delay), none")
    p.add_argument("--phases", action="store_true",
                   help="four phases in one run: short docs, long docs, query burst, slowdown")
    p.add_argument("--accuracy", default=None,
                   help="least cosine to fp32 per class, e.g. interactive=0.999,bulk=0.99")
    p.add_argument("--policies", default=None,
                   help="comma-separated servers to run (default: the baselines, the reference "
                        "rows static-latency,static-throughput,fixed-delay,aimd, and "
                        "pykernels,pykernels-fp32)")
    p.add_argument("--json", dest="json_path", default=None, help="write results as JSON")
    p.add_argument("--plot", dest="plot_path", default=None,
                   help="draw latency CDFs, bulk throughput and precision mix (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")


def run_demo_cli(args) -> int:
    """Mixed interactive + bulk MiniLM workload under static configurations and pykernels."""
    phases = getattr(args, "phases", False)
    duration = (args.duration if args.duration is not None
                else 2.0 if args.quick else 10.0 if phases else 9.0)
    baselines = getattr(args, "baselines", None) or "quick"
    policies = args.policies.split(",") if args.policies else None
    if policies is None and args.quick:
        policies = [n for n, *_ in static_configs(baselines)] + list(REFERENCE) + ["pykernels"]
    known = ([n for n, *_ in static_configs("all") + static_configs("quick")]
             + list(REFERENCE) + list(POLICIES))
    for name in policies or ():
        if name not in known:
            print(f"pykernels demo: unknown server {name!r}; choose from {', '.join(known)}",
                  file=sys.stderr)
            return 2
    try:
        accuracy = parse_accuracy(getattr(args, "accuracy", None))
    except ValueError as e:
        print(f"pykernels demo: {e}", file=sys.stderr)
        return 2
    plot_path = getattr(args, "plot_path", None)
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pykernels demo: --plot needs matplotlib (pip install 'pykernels[plot]')",
                  file=sys.stderr)
            return 2
    run_demo(duration=duration, rate=args.rate, p99_ms=args.p99_ms,
             outstanding=args.bulk_outstanding, precision=args.precision, quick=args.quick,
             json_path=args.json_path, progress=not args.no_progress, policies=policies,
             baselines=baselines, phases=phases, accuracy=accuracy, plot_path=plot_path)
    return 0
