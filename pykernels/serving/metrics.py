"""Per-class serving statistics and their Prometheus text exposition.

A ``ClassStats`` counts outcomes and records three latencies per completed
request, each in its own quantile sketch (seconds):

* queue: arrival (``submit``) to the start of the batch that served it, which
  includes waiting for the batch to fill and for other batches ahead;
* service: start to end of that batch's ``fn(items, plan)`` call;
* total: arrival to end, queue + service, what the SLO is about.

SLO attainment is the fraction of completed requests whose total latency is
within the class's p99 target; goodput counts the same requests against every
request the class saw (rejected and failed ones too).
"""
from __future__ import annotations

import collections
import math
from typing import Dict, Optional

from .sketch import QuantileSketch

QUANTILES = (0.5, 0.95, 0.99)
KINDS = ("queue", "service", "total")
OUTCOMES = ("completed", "failed", "rejected", "cancelled")


class ClassStats:
    """Counters and latency sketches for one SLO class. Not thread-safe: the
    batcher updates and reads it under its lock."""

    def __init__(self, name: str, p99_target_s: Optional[float], *, relative_accuracy: float = 0.01,
                 window_s: float = 10.0):
        self.name = name
        self.p99_target_s = p99_target_s
        self.window_s = float(window_s)
        self.accepted = 0
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.cancelled = 0
        self.within_slo = 0
        self.batches = 0
        self.batched_items = 0
        self.chunked_batches = 0
        self.first_arrival: Optional[float] = None
        self.last_completion: Optional[float] = None
        self.latency = {k: QuantileSketch(relative_accuracy) for k in KINDS}
        self._recent = collections.deque()  # (end time, items completed) per batch, last window_s

    def record_batch(self, start: float, end: float, arrivals, chunked: bool) -> None:
        """A batch that succeeded: ``arrivals`` are its requests' arrival times."""
        n = len(arrivals)
        service = max(0.0, end - start)
        self.batches += 1
        self.batched_items += n
        self.chunked_batches += bool(chunked)
        self.completed += n
        lat = self.latency
        lat["service"].add(service, n)
        q, t = lat["queue"].add, lat["total"].add
        target = self.p99_target_s
        within = 0
        for a in arrivals:
            wait = max(0.0, start - a)
            q(wait)
            total = wait + service
            t(total)
            if target is not None and total <= target:
                within += 1
        self.within_slo += within
        self.last_completion = end
        self._recent.append((end, n))
        self._trim(end)

    def record_failed_batch(self, n: int) -> None:
        self.batches += 1
        self.batched_items += n
        self.failed += n

    def _trim(self, now: float) -> None:
        r = self._recent
        while r and r[0][0] < now - self.window_s:
            r.popleft()

    def snapshot(self, now: float, *, queued: int = 0, in_flight: int = 0) -> dict:
        self._trim(now)
        lat = {}
        for kind, sk in self.latency.items():
            qs = sk.quantiles(QUANTILES)
            lat[kind] = {
                "p50": _ms(qs[0.5]), "p95": _ms(qs[0.95]), "p99": _ms(qs[0.99]),
                "mean": _ms(sk.mean), "max": _ms(sk.max if sk.count else None),
            }
        elapsed = (now - self.first_arrival) if self.first_arrival is not None else 0.0
        recent_span = min(self.window_s, elapsed)
        recent_items = sum(n for _, n in self._recent)
        total = self.accepted + self.rejected
        target = self.p99_target_s
        return {
            "slo_p99_ms": target * 1e3 if target is not None else None,
            "count": total,
            "accepted": self.accepted,
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "queued": queued,
            "in_flight": in_flight,
            "batches": self.batches,
            "mean_batch_size": self.batched_items / self.batches if self.batches else None,
            "chunked_batches": self.chunked_batches,
            "latency_ms": lat,
            "samples": self.latency["total"].count,
            "throughput": self.completed / elapsed if elapsed > 0 else 0.0,
            "throughput_recent": recent_items / recent_span if recent_span > 0 else 0.0,
            "slo_attainment": (self.within_slo / self.completed
                               if target is not None and self.completed else None),
            "goodput": (self.within_slo / total if target is not None and total else None),
        }


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


# --- Prometheus text exposition (format 0.0.4) -------------------------------

def _prom_escape(value) -> str:
    """A label value escaped for the text format: backslash, newline, double quote."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prom_labels(**kv) -> str:
    """``{k="v",...}``: a label set in the text format (also used by serving.service)."""
    return "{" + ",".join(f'{k}="{_prom_escape(v)}"' for k, v in kv.items()) + "}"


def prom_number(x) -> str:
    """A sample value in the text format: ints as they are, None and NaN as NaN,
    infinities as +Inf/-Inf, other floats by repr (also used by serving.service)."""
    if x is None:
        return "NaN"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(x)


def render_prometheus(batcher_name: str, stats: Dict[str, ClassStats], snapshots: Dict[str, dict]) -> str:
    """Text exposition of every class: counters, latency summaries, gauges."""
    out = []

    def family(name, typ, help_):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")

    b = batcher_name
    family("pykernels_requests_total", "counter",
           "Requests by SLO class and outcome (completed, failed, rejected at submit, cancelled).")
    for cls, st in stats.items():
        for outcome in OUTCOMES:
            out.append(f"pykernels_requests_total{prom_labels(batcher=b, **{'class': cls}, outcome=outcome)} "
                       f"{getattr(st, outcome)}")
    family("pykernels_request_latency_seconds", "summary",
           "Request latency by SLO class and kind: queue (arrival to batch start), service "
           "(batch run), total (arrival to result). Quantiles from a DDSketch (1% relative error).")
    for cls, st in stats.items():
        for kind in KINDS:
            sk = st.latency[kind]
            qs = sk.quantiles(QUANTILES)
            for q in QUANTILES:
                out.append(f"pykernels_request_latency_seconds"
                           f"{prom_labels(batcher=b, **{'class': cls}, kind=kind, quantile=repr(q))} "
                           f"{prom_number(qs[q])}")
            lab = prom_labels(batcher=b, **{"class": cls}, kind=kind)
            out.append(f"pykernels_request_latency_seconds_sum{lab} {prom_number(sk.sum)}")
            out.append(f"pykernels_request_latency_seconds_count{lab} {sk.count}")
    family("pykernels_batches_total", "counter", "Batches run by SLO class.")
    for cls, st in stats.items():
        out.append(f"pykernels_batches_total{prom_labels(batcher=b, **{'class': cls})} {st.batches}")
    gauges = (
        ("pykernels_queue_depth", "queued", "Requests waiting in the queue."),
        ("pykernels_throughput_items_per_second", "throughput",
         "Completed items per second since the class's first request."),
        ("pykernels_recent_throughput_items_per_second", "throughput_recent",
         "Completed items per second over the recent window."),
        ("pykernels_slo_attainment_ratio", "slo_attainment",
         "Fraction of completed requests within the class's p99 target (NaN without a target)."),
        ("pykernels_goodput_ratio", "goodput",
         "Fraction of all requests (rejected and failed included) completed within the p99 target."),
    )
    for name, key, help_ in gauges:
        family(name, "gauge", help_)
        for cls in stats:
            out.append(f"{name}{prom_labels(batcher=b, **{'class': cls})} {prom_number(snapshots[cls][key])}")
    return "\n".join(out) + "\n"
