"""``pykernels demo``: arguments and the run (start-up measurements, every
server in turn, the report, JSON and plot)."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

import numpy as np

from ..models import MiniLM
from ..models.minilm import encoder_op
from ..policy.slo import cosine_error, parse_min_cosines
from ..serving import EncoderWork
from ..serving.service import ACCURACY_PRECISIONS
from .plot import plot_runs
from .report import mark_best, print_phases, print_table, print_targets
from .run import measure_profile, run_policy
from .servers import PolicyServer, StaticServer
from .workload import (BULK_BATCH, DEFAULT_ACCURACY, POLICIES, REFERENCE, make_phases, make_texts,
                       static_configs)

# Tokens of the text each class's op stands for: the typical query (6-13
# words) and a bulk document between the short (8-24) and long (60-200) phases.
REF_TOKENS = {"interactive": 14, "bulk": 56}


def parse_accuracy(text: Optional[str]) -> dict:
    """"interactive=0.999,bulk=0.99" -> {class: least cosine to fp32}, the
    defaults for classes not named."""
    out = dict(DEFAULT_ACCURACY)
    out.update(parse_min_cosines(text or "", tuple(DEFAULT_ACCURACY)))
    return out


def run_demo(*, duration: float = 9.0, rate: float = 20.0, p99_ms: float = 100.0,
             outstanding: int = 128, precision: str = "fp32", quick: bool = False,
             json_path: Optional[str] = None, progress: bool = True, policies=None,
             baselines: str = "quick", phases: bool = False, accuracy: Optional[dict] = None,
             plot_path: Optional[str] = None) -> list:
    """Run every server in ``policies`` (default: the ``baselines`` static
    configurations, the reference rows, pykernels and pykernels-fp32) through
    the workload; print the tables and return one summary dict per server."""
    out = sys.stdout
    accuracy = dict(accuracy or DEFAULT_ACCURACY)
    rng = np.random.default_rng(0)
    model = MiniLM.load(precision=precision, precisions=ACCURACY_PRECISIONS)
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
    cosines = model.min_cosines(calib)
    ops = {"interactive": encoder_op(model, REF_TOKENS["interactive"], None),
           "bulk": encoder_op(model, REF_TOKENS["bulk"], None)}
    # The profile is measured on texts of each op's reference length (a word is
    # a token, plus [CLS] and [SEP]); the policy's batcher prices every request
    # by its real tokens' work in units of that text (serving.EncoderWork).
    mrng = np.random.default_rng(2)
    measured = {cls: make_texts(mrng, n, REF_TOKENS[cls] - 2, REF_TOKENS[cls] - 2)
                for cls, n in (("interactive", 32), ("bulk", 64))}
    sizer = EncoderWork(model)
    units = {cls: sizer.mean_work(texts) for cls, texts in measured.items()}
    profile = measure_profile(
        model, {ops[cls]: texts for cls, texts in measured.items()},
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
        "pykernels": lambda: PolicyServer(model, profile, p99_ms, ops, accuracy,
                                          size=sizer, unit_size=units),
        "pykernels-fp32": lambda: PolicyServer(model, profile, p99_ms, ops,
                                               {k: 1.0 for k in accuracy},
                                               size=sizer, unit_size=units),
    }
    for name, b, variant, delay in static_configs("all") + static_configs("quick"):
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
                       # "results": the reference rows and pykernels, as before the
                       # static priority rows existed; "rows": every server run
                       "results": [r for r in results if r["policy"] in REFERENCE + ("pykernels",)],
                       "rows": results}, f, indent=2)
    if plot_path:
        plot_runs(runs, sched, p99_ms, plot_path, best=[b for b in best.values() if b])
        print(f"\nwrote {plot_path}", file=out)
    return results


def add_demo_arguments(p):
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per server, or per phase with --phases (default 9, 10 with "
                        "--phases; 2 with --quick)")
    p.add_argument("--rate", type=float, default=20.0, help="interactive queries per second")
    p.add_argument("--p99-ms", type=float, default=100.0, help="interactive p99 target (ms)")
    p.add_argument("--bulk-outstanding", type=int, default=128,
                   help="documents the indexer keeps in flight")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8", "int8_7bit"), default="fp32",
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

