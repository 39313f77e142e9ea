"""Command line of the policy engine: ``python -m pykernels.policy COMMAND``.

  calibrate [--quick|--full] [--from-benchmark FILE] [--path P] [--budget S] [--no-progress]
  plan --op linear --k 384 --n 1536 [--p99-ms 5] [--p50-ms X] [--min-throughput X]
       [--max-rel-error 1e-2] [--arrival-rate R] [--queued Q] [--path P]
  heldout [--path P] [--no-progress]   measure held-out shapes, report the cost
                                       model's prediction error on them
  show [--path P]                      print the cached profile's summary
  simulate [--requests N] [--load F] [--seed S] [--warm] [--service-peak]
                                       open-loop simulation: SLO attainment and
                                       throughput of the policy vs static plans

``calibrate_main``, ``plan_main`` and ``heldout_main`` take an argv list, so the
``pykernels`` CLI can delegate its ``calibrate`` and ``plan`` commands here.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from pykernels import work as ops
from .cost import FEATURES, CostModel, cross_validate, heldout_error
from .planner import Policy
from .profile import Profile, ProfileWarning, default_path
from .slo import SLO


def _load(path, progress: bool) -> Profile:
    with warnings.catch_warnings():
        warnings.simplefilter("always", ProfileWarning)
        prof = Profile.load(path, recalibrate=True, progress=progress)
    return prof


def calibrate_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pykernels calibrate",
                                 description="Measure kernel service times and save the profile.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="quick", action="store_true", default=True,
                   help="under a minute (default)")
    g.add_argument("--full", dest="quick", action="store_false", help="thorough (minutes)")
    ap.add_argument("--from-benchmark", metavar="FILE",
                    help="build/refresh from `pytest bench/ --benchmark-json=FILE --benchmark-save-data`")
    ap.add_argument("--path", help=f"profile file (default {default_path()})")
    ap.add_argument("--budget", type=float, help="time budget in seconds")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    if a.from_benchmark:
        base = Profile.load(a.path)
        with warnings.catch_warnings(record=True) as caught:  # printed without the source line
            warnings.simplefilter("always", ProfileWarning)
            prof = Profile.from_pytest_benchmark(a.from_benchmark, base=base)
        for w in caught:
            print(f"pykernels calibrate: warning: {w.message}", file=sys.stderr)
    else:
        prof = Profile.calibrate(quick=a.quick, progress=a.progress, budget_s=a.budget)
    path = prof.save(a.path)
    print(f"{prof!r} saved to {path}")
    return 0


def plan_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pykernels plan",
                                 description="Print the policy's plan for one op and its explanation.")
    ap.add_argument("--op", default="linear", choices=sorted(ops.op_types()))
    for f in ("k", "n", "hq", "hkv", "d", "s-q", "s-kv", "kv-len"):
        ap.add_argument(f"--{f}", type=int)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--precision", help="fix the precision (default: the planner chooses)")
    ap.add_argument("--p99-ms", type=float)
    ap.add_argument("--p50-ms", type=float)
    ap.add_argument("--min-throughput", type=float)
    ap.add_argument("--max-rel-error", type=float, default=1e-4)
    ap.add_argument("--arrival-rate", type=float)
    ap.add_argument("--queued", type=int, default=0)
    ap.add_argument("--path", help="profile file (default: the cached one)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    try:
        spec = {"kind": a.op, "k": a.k, "n": a.n, "hq": a.hq, "hkv": a.hkv, "d": a.d,
                "s_q": a.s_q, "s_kv": a.s_kv, "kv_len": a.kv_len, "causal": a.causal,
                "precision": a.precision}
        op = ops.from_spec({k: v for k, v in spec.items() if v is not None})
        slo = SLO(p99_ms=a.p99_ms, p50_ms=a.p50_ms, min_throughput=a.min_throughput,
                  max_rel_error=a.max_rel_error)
    except KeyError as e:
        ap.error(f"--op {a.op} needs --{str(e.args[0]).replace('_', '-')}")
    except (TypeError, ValueError) as e:
        ap.error(f"bad op or SLO: {e}")
    policy = Policy(slo, _load(a.path, a.progress))
    try:
        plan = policy.plan(op, queued=a.queued, arrival_rate=a.arrival_rate)
    except ValueError as e:
        print(f"pykernels plan: {e}", file=sys.stderr)
        return 1
    print(f"op: {op.key}   SLO: {slo.describe()}")
    print(f"variant={plan.variant} precision={plan.precision} threads={plan.threads} "
          f"batch_size={plan.batch_size} max_wait_ms={plan.max_wait_ms:.3f} "
          f"predicted_p50_ms={plan.predicted_p50_ms:.3f} predicted_p99_ms={plan.predicted_p99_ms:.3f} "
          f"feasible={plan.feasible}")
    print(plan.explain())
    return 0


BETWEEN_BATCHES = (3, 12, 24, 48, 96, 192)


def heldout_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykernels.policy heldout",
                                 description="Prediction error of the cost model on shapes and "
                                             "batches the profile never measured.")
    ap.add_argument("--path", help="training profile (default: the cached one, calibrated if missing)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds for the held-out run")
    ap.add_argument("--same-run", action="store_true",
                    help="measure the training and held-out cells in one interleaved run (so "
                         "load drift between runs on a shared machine does not count as model "
                         "error), then split them; --path is then ignored")
    ap.add_argument("--precisions", help="comma-separated precisions to measure (default: all)")
    ap.add_argument("--kinds", default="linear",
                    help="op kinds for --same-run, comma-separated (default: linear)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    precs = a.precisions.split(",") if a.precisions else None
    if a.same_run:
        work, train_cells, held_cells, between_cells = [], set(), set(), set()
        for kind in a.kinds.split(","):
            d = ops.calibration_defaults(kind)
            if d is None or not ops.candidates(kind):
                continue
            qb = tuple(d["quick_batches"])
            between_b = tuple(b for b in BETWEEN_BATCHES if qb[0] < b < qb[-1] and b not in qb)
            for o in d["quick_shapes"]:
                work.append((o, sorted(set(qb) | set(between_b))))
                train_cells |= {(o.key, b) for b in qb}
                between_cells |= {(o.key, b) for b in between_b}
            for o in d["heldout_shapes"]:
                work.append((o, list(d["heldout_batches"])))
                held_cells |= {(o.key, b) for b in d["heldout_batches"]}
        every = Profile.calibrate(quick=True, progress=a.progress, ops=work, precisions=precs,
                                  budget_s=a.budget)

        def part(cells):
            ms = [m for m in every.measurements if (m.op, m.batch) in cells]
            return Profile(ms, ops={m.op: every.ops[m.op] for m in ms}, key=every.key,
                           precision_error=every.precision_error)
        train, held, between = part(train_cells), part(held_cells), part(between_cells)
    else:
        train = _load(a.path, a.progress)
        held = Profile.calibrate(quick=True, progress=a.progress, heldout=True, precisions=precs,
                                 budget_s=a.budget / 2)
        between = Profile.calibrate(quick=True, progress=a.progress, ops=list(train.ops.values()),
                                    batches=list(BETWEEN_BATCHES), precisions=precs,
                                    budget_s=a.budget / 2)
    print(f"training profile: {train!r}")
    print(f"held-out shapes: {held!r}")
    print("shapes never measured (fitted model):\n" + heldout_error(train, held).summary())
    control = heldout_error(train, between)
    print("measured shapes at batches between the buckets (interpolation):\n" + control.summary())
    if control.rows and not a.same_run:
        import numpy as np
        drift = float(np.median([r.measured_p50_ms / r.predicted_p50_ms for r in control.rows]))
        print(f"drift: on the profile's own shapes this run measured {drift:.2f}x the profile's "
              f"times (median); errors far from 1x here are load changes since the profile was "
              f"measured, not model error -- --same-run measures the model alone")
    print("leave-one-shape-out on the training profile:\n" + cross_validate(train).summary())
    return 0


def show_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykernels.policy show")
    ap.add_argument("--path")
    a = ap.parse_args(argv)
    prof = Profile.load(a.path)
    if prof is None:
        print(f"no usable profile at {a.path or default_path()}")
        return 1
    print(repr(prof))
    cm = CostModel(prof)
    for g in cm.groups():
        c = cm.coefficients(*g)
        print(f"  {g[0]:>9} {g[1]:>10} {g[2]:>5} t={g[3]}: "
              + ", ".join(f"{n}={v:.4g}" for n, v in zip(FEATURES, c)))
    return 0


def simulate_main(argv: Optional[List[str]] = None) -> int:
    from .simulate import main as sim_main
    return sim_main(argv)


COMMANDS = {"calibrate": calibrate_main, "plan": plan_main, "heldout": heldout_main,
            "show": show_main, "simulate": simulate_main}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
