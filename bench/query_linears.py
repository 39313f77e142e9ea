"""The projections of one MiniLM query, cold and warm (not a pytest suite).

    python bench/query_linears.py [--threads 2] [--rows 16] [--precision fp32] [--rounds 9]

A query of ~14 tokens runs 24 packed-weight ``linear`` calls: 6 layers x
(qkv 384x1152, out 384x384, up 384x1536 + gelu, down 1536x384), M = rows. The
24 weights are distinct, as in the model: 42 MB in fp32, more than a 32 MiB L3,
so in the forward each call reads its weight from DRAM ("cold"). This script
builds 24 random weights of those shapes and times:

* cold: the 24 calls in forward order, each weight read once per pass;
* warm: each shape's call repeated 24 times on one weight (what
  ``pykernels bench linear --shapes encoder`` times), summed x 6 layers.

The difference is what the DRAM stream costs the forward; the warm sum is the
compute side. Rounds interleave cold and warm; medians. With --threads 1 the
clock is ``time.thread_time`` (robust to other processes on the machine), else
``time.perf_counter``. Prints the load average first: quote it with the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import pykernels as pk

# (K, N, activation) of the four projections of a MiniLM layer
SHAPES = ((384, 1152, None), (384, 384, None), (384, 1536, "gelu"), (1536, 384, None))
LAYERS = 6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8", "int8_7bit"))
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    pk.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    calls = []  # (weight, bias, activation, x, out), in forward order
    xs = {k: rng.standard_normal((args.rows, k), dtype=np.float32) for k in (384, 1536)}
    for _ in range(LAYERS):
        for k, n, act in SHAPES:
            w = pk.pack(rng.standard_normal((k, n), dtype=np.float32) * 0.05,
                        precision=args.precision)
            calls.append((w, rng.standard_normal(n, dtype=np.float32), act, xs[k],
                          np.empty((args.rows, n), dtype=np.float32)))

    def cold() -> None:
        for w, b, act, x, out in calls:
            pk.linear(x, w, b, activation=act, out=out)

    def warm(i: int) -> None:
        w, b, act, x, out = calls[i]
        for _ in range(len(calls)):
            pk.linear(x, w, b, activation=act, out=out)

    cold()
    t_cold, t_warm = [], [[] for _ in SHAPES]
    for _ in range(args.rounds):
        t0 = clock()
        cold()
        t_cold.append(clock() - t0)
        for i in range(len(SHAPES)):
            t0 = clock()
            warm(i)
            t_warm[i].append((clock() - t0) / len(calls))
    c = statistics.median(t_cold)
    w = [statistics.median(t) for t in t_warm]
    flops = sum(2 * args.rows * k * n for k, n, _ in SHAPES) * LAYERS
    print(f"load average {os.getloadavg()[0]:.2f}; threads {args.threads}, M = {args.rows}, "
          f"{args.precision}")
    print(f"cold, 24 calls: {c * 1e3:.2f} ms ({flops / c / 1e9:.0f} GFLOP/s)")
    for (k, n, _), t in zip(SHAPES, w):
        print(f"warm {args.rows}x{k}x{n}: {t * 1e6:.0f} us "
              f"({2 * args.rows * k * n / t / 1e9:.0f} GFLOP/s)")
    print(f"warm sum x {LAYERS} layers: {LAYERS * sum(w) * 1e3:.2f} ms; "
          f"cold / warm {c / (LAYERS * sum(w)):.2f}")


if __name__ == "__main__":
    main()
