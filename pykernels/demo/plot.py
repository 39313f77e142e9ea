"""``pykernels demo --plot``: query latency CDFs per server, bulk throughput
over time with the phases shaded, and pykernels' precision mix over time."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .run import RunResult
from .workload import Phase, phase_bounds

SHADES = ("#f2f2f2", "#e0ecf8", "#fbeee0", "#f8e0e0", "#e8f4e4")


def shown(runs: Sequence[RunResult], best: Sequence[str] = ()) -> list:
    """The runs worth a line: pykernels' rows, the reference rows, the best
    static ones, or if no static one met the SLO the one that came closest
    (every static row would make the figure unreadable)."""
    statics = [r for r in runs if r.kind == "static"]
    near = set(best)
    if statics and not near:
        near.add(max(statics, key=lambda r: r.summary()["slo_attainment"]).policy)
    keep = [r for r in runs if r.kind in ("pykernels", "reference") or r.policy in near]
    return keep or list(runs)


def plot_runs(runs: Sequence[RunResult], phases: Sequence[Phase], p99_ms: float, path: str,
              best: Sequence[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = shown(runs, best)
    bounds = phase_bounds(phases)
    end = bounds[-1][1]
    fig, (ax_cdf, ax_tp, ax_mix) = plt.subplots(3, 1, figsize=(10, 11),
                                                gridspec_kw={"height_ratios": [3, 3, 1.4]})
    for r in runs:
        lat = np.sort([ms for _, ms in r.queries])
        if not len(lat):
            continue
        shown_lat = np.where(np.isfinite(lat), lat, np.nan)  # refused: never reach the top
        ax_cdf.step(shown_lat, np.arange(1, len(lat) + 1) / len(lat), where="post",
                    label=r.policy, lw=2.2 if r.kind == "pykernels" else 1.2)
    ax_cdf.axvline(p99_ms, color="k", ls="--", lw=1)
    ax_cdf.axhline(0.99, color="grey", ls=":", lw=1)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("query latency, arrival to completion (ms)")
    ax_cdf.set_ylabel("fraction of queries")
    ax_cdf.set_title(f"query latency CDF (target: 99% within {p99_ms:g} ms)")
    ax_cdf.legend(fontsize=8, loc="lower right")

    edges = np.arange(0.0, end + 1.0, 1.0)
    for ax in (ax_tp, ax_mix):
        for i, ((t0, t1), p) in enumerate(zip(bounds, phases)):
            ax.axvspan(t0, t1, color=SHADES[i % len(SHADES)], zorder=0)
    for (t0, t1), p in zip(bounds, phases):
        ax_tp.text((t0 + t1) / 2, 1.0, p.name, transform=ax_tp.get_xaxis_transform(),
                   ha="center", va="bottom", fontsize=9)
        if p.slowdown_s:
            ax_tp.axvspan(t0, t0 + p.slowdown_s, color="#d62728", alpha=0.12, zorder=0)
    for r in runs:
        counts, _ = np.histogram(r.bulk, bins=edges)
        ax_tp.plot(edges[:-1] + 0.5, counts, label=r.policy,
                   lw=2.2 if r.kind == "pykernels" else 1.2)
    ax_tp.set_xlim(0, end)
    ax_tp.set_ylabel("bulk documents/s")
    ax_tp.legend(fontsize=8, loc="upper right")

    pk = next((r for r in runs if r.policy == "pykernels"), None)
    if pk is not None and pk.batches:
        for cls, hatch in (("bulk", None), ("interactive", "//")):
            by = {}
            for t, c, prec, n in pk.batches:
                if c == cls:
                    by.setdefault(prec, np.zeros(len(edges) - 1))
                    k = min(int(t), len(edges) - 2)
                    by[prec][k] += n
            total = sum(by.values()) if by else None
            if total is None:
                continue
            frac = sum((v for p, v in by.items() if p.startswith("int8")),
                       np.zeros_like(total)) / np.maximum(total, 1)  # int8 and int8_7bit
            ax_mix.plot(edges[:-1] + 0.5, frac, drawstyle="steps-mid",
                        label=f"{cls}: int8 share of items", ls="-" if hatch is None else "--")
    ax_mix.set_xlim(0, end)
    ax_mix.set_ylim(-0.05, 1.05)
    ax_mix.set_xlabel("time in the run (s)")
    ax_mix.set_ylabel("pykernels\nint8 share")
    ax_mix.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
