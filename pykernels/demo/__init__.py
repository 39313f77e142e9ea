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
  precision (fp32, int8 or int8_7bit, within each class's ``--accuracy`` budget) per
  batch. pykernels-fp32: the same with fp32 only.

Reported per server and phase: query p50/p99 (arrival to completion, queue
included, from the *scheduled* arrival so a lagging generator hides nothing),
SLO attainment (refused queries count as misses), bulk documents/s, and for
pykernels the precision mix. The best static configuration meeting 99% is
marked.
"""
from .main import add_demo_arguments, parse_accuracy, run_demo, run_demo_cli
from .report import best_static, mark_best, print_phases, print_table, print_targets
from .run import RunResult, measure_profile, run_policy
from .servers import FifoServer, PolicyServer, StaticServer
from .workload import (ATTAIN, BATCHES, BULK_BATCH, DEFAULT_ACCURACY, POLICIES, REFERENCE, WORDS,
                       Phase, make_phases, make_texts, phase_bounds, priority_name, query_arrivals,
                       start_competitor, static_configs)

__all__ = [
    "ATTAIN", "BATCHES", "BULK_BATCH", "DEFAULT_ACCURACY", "FifoServer", "POLICIES", "Phase",
    "PolicyServer", "REFERENCE", "RunResult", "StaticServer", "WORDS", "add_demo_arguments",
    "best_static", "make_phases", "make_texts", "mark_best", "measure_profile",
    "parse_accuracy", "phase_bounds", "print_phases", "print_table", "print_targets",
    "priority_name", "query_arrivals", "run_demo", "run_demo_cli", "run_policy",
    "start_competitor", "static_configs",
]
