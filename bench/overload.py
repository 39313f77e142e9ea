"""The serving batcher under 5x overload: sent, accepted, rejected, lost, p99.

    python bench/overload.py [--seconds 5] [--factor 5] [--p99-ms 50] [--json]

The load/fault figures. One SLO class ("interactive", p99 target
``--p99-ms``) in front of a real kernel: each request is ``--rows`` rows of
activations for ``pk.linear`` with a (K, N) fp32 weight, batched by
``DynamicBatcher`` under a ``Policy`` calibrated for that op on this machine
(a few seconds). Steps:

1. Capacity: the batcher's own throughput when saturated, measured with a
   backlog of requests in a class without a deadline (nothing refused).
2. Overload: open-loop Poisson arrivals at ``--factor`` times that capacity
   for ``--seconds``, from client threads that never wait for results.

Figures: requests sent, accepted (a future returned), rejected (``Overloaded``
raised at submit: the clean refusal), lost (accepted but never completed with
the right result; must be 0), and the latency percentiles of the accepted
requests (submit to result). Every result is checked against NumPy. Not a
test: nothing here asserts a timing; the exit status is non-zero only if a
request was lost, a refusal was not clean, or the counts do not add up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

import pykernels as pk
from pykernels.policy import SLO, Policy, Profile, ops
from pykernels.serving import DynamicBatcher, Overloaded

F32 = np.float32


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="overload phase length")
    ap.add_argument("--factor", type=float, default=5.0, help="offered load / capacity")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="the class's p99 target")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=8, help="rows of x per request")
    ap.add_argument("--clients", type=int, default=4, help="submitting threads")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    rng = np.random.default_rng(0)
    w = pk.pack(rng.standard_normal((args.k, args.n)).astype(F32))
    pool = rng.standard_normal((64, args.rows, args.k)).astype(F32)   # request payloads
    ref = (pool.astype(np.float64) @ pk.gemm(np.eye(args.k, dtype=F32), w).astype(np.float64))

    op = ops.Linear(args.k, args.n, rows_per_item=args.rows)
    say(f"calibrating {op.key} ...")
    profile = Profile.calibrate(quick=True, progress=False, ops=[(op, (1, 2, 4, 8, 16, 32))],
                                precisions=("fp32",), budget_s=3.0)

    def fn(items, plan):
        x = np.stack([pool[i] for i in items]).reshape(-1, args.k)
        y = pk.linear(x, w, variant=plan.variant, threads=plan.threads)
        return list(y.reshape(len(items), args.rows, args.n))

    classes = {"interactive": SLO(p99_ms=args.p99_ms), "bulk": SLO()}
    policy = lambda slo: Policy(slo, profile)  # noqa: E731 - one Policy per class

    # 1. capacity: a saturated bulk backlog (bulk has no deadline: nothing refused)
    with DynamicBatcher(fn, policy=policy, classes=classes, op=op, name="capacity") as b:
        for i in range(20):  # warm-up: first calls, service-time model
            b.submit(i % 64, "bulk").result()
        n_cap = 3000
        t0 = time.monotonic()
        futs = [b.submit(i % 64, "bulk") for i in range(n_cap)]
        for f in futs:
            f.result()
        capacity = n_cap / (time.monotonic() - t0)
    rate = args.factor * capacity
    say(f"capacity {capacity:.0f} requests/s; offering {rate:.0f}/s for {args.seconds:g} s")

    # 2. overload: open-loop Poisson arrivals, never waiting for results
    lock = threading.Lock()
    accepted, latencies = [], []
    counts = {"sent": 0, "rejected": 0, "unclean_rejections": 0}
    b = DynamicBatcher(fn, policy=policy, classes=classes, op=op, name="overload")

    def on_done(t_submit):
        def cb(_f):
            t = time.monotonic()
            with lock:
                latencies.append((t - t_submit) * 1e3)
        return cb

    def client(seed):
        r = np.random.default_rng(seed)
        t_next = start = time.monotonic()
        per_client = rate / args.clients
        while True:
            t_next += r.exponential(1.0 / per_client)
            if t_next - start >= args.seconds:
                return
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            item = int(r.integers(64))
            t_submit = time.monotonic()
            try:
                f = b.submit(item, "interactive")
            except Overloaded as e:
                clean = e.cls == "interactive" and e.retry_after_s >= 0
                with lock:
                    counts["sent"] += 1
                    counts["rejected"] += 1
                    counts["unclean_rejections"] += not clean
                continue
            f.add_done_callback(on_done(t_submit))
            with lock:
                counts["sent"] += 1
                accepted.append((item, f))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close(drain=True)  # serves every accepted request

    lost = failed = wrong = 0
    for item, f in accepted:
        if not f.done():
            lost += 1
        elif f.exception() is not None:
            failed += 1
        elif not np.allclose(f.result(), ref[item], rtol=1e-4, atol=1e-3):
            wrong += 1
    lost_total = lost + failed + wrong
    lat = np.array(latencies) if latencies else np.array([np.nan])
    m = b.metrics()["interactive"]
    figures = {
        "sent": counts["sent"], "accepted": len(accepted), "rejected": counts["rejected"],
        "lost": lost_total, "lost_detail": {"never_completed": lost, "failed": failed,
                                            "wrong_result": wrong},
        "unclean_rejections": counts["unclean_rejections"],
        "accepted_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "accepted_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "accepted_max_ms": round(float(np.max(lat)), 2),
        "p99_target_ms": args.p99_ms,
        "capacity_per_s": round(capacity, 1), "offered_per_s": round(rate, 1),
        "achieved_offered_per_s": round(counts["sent"] / args.seconds, 1),
        "batcher_metrics": {k: m[k] for k in ("accepted", "completed", "rejected", "failed")},
        "op": op.key, "isa": pk.cpu_info().isa, "threads": pk.get_num_threads(),
        "commit": _commit(),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>22}: {v}")
    ok = (lost_total == 0 and counts["unclean_rejections"] == 0
          and figures["accepted"] + figures["rejected"] == figures["sent"]
          and m["completed"] == len(accepted) and m["rejected"] == counts["rejected"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
