"""The demo's workload: texts, the static configurations users set, and the
phase schedule (query rate, document lengths, a competing process)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import List, Sequence, Tuple

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


