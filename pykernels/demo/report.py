"""The demo's tables: every configuration, per phase, the best static one
meeting the SLO marked, and pykernels against its targets."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .workload import ATTAIN

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


