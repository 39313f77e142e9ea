"""MiniLM bulk encoding: padded ``MiniLM.encode`` vs the ragged forward (not a pytest suite).

    python bench/compare_ragged_encoder.py [--threads 2] [--rounds 3] [--peak 193.5]

1. Bulk: 512 documents ``f"document {i}: " + "kernels batching latency throughput
   policy " * (3 + i % 12)`` at batch 64: ``MiniLM.encode(batch_size=64)`` (sorts
   by length, pads each batch to its longest) against
   ``models._ragged.encode_ragged(batch_size=64)`` (batches in the given order,
   no padding), timed in interleaved rounds; docs/s, and GFLOP/s over the real
   FLOPs (projections 2*(4h^2 + 2hf) per token and layer, attention 4*L*h per
   token and layer for a sequence of L tokens; padding not counted) as a
   percentage of the fp32 peak given by --peak (Zen 3, 2 cores: 193.5).
2. Raggedness: ``ragged_forward`` on 64 sequences of 5..200 tokens against 64
   sequences of equal length with the same total token count.
Prints the machine (ISA, CPU, commit) first. Each figure: median of the rounds.
``--skip-bulk`` runs part 2 only.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import pykernels as pk  # noqa: E402
from pykernels.models import MiniLM  # noqa: E402
from pykernels.models import _ragged  # noqa: E402


def real_flops(model, lens) -> float:
    h, f, layers = model.hidden, int(model.config["intermediate_size"]), len(model.layers)
    lens = np.asarray(lens, dtype=np.float64)
    proj = 2.0 * (4 * h * h + 2 * h * f) * lens.sum()
    attn = 4.0 * h * (lens * lens).sum()
    return layers * (proj + attn)


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak", type=float, default=193.5, help="fp32 peak GFLOP/s of the cores used")
    ap.add_argument("--skip-bulk", action="store_true", help="only the ragged vs equal comparison")
    args = ap.parse_args()
    info = pk.cpu_info()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"isa={info.isa} cpu={info.model!r} threads={args.threads} commit={commit}")
    model = MiniLM.load()
    th = args.threads

    if not args.skip_bulk:
        bulk(model, th, args)
    ragged_vs_equal(model, th, args)


def bulk(model, th, args) -> None:
    docs = [f"document {i}: " + "kernels batching latency throughput policy " * (3 + i % 12)
            for i in range(512)]
    _, lens = model.tokenize(docs)
    flops = real_flops(model, lens)
    old = lambda: model.encode(docs, batch_size=64, threads=th)  # noqa: E731
    new = lambda: _ragged.encode_ragged(model, docs, batch_size=64, threads=th)  # noqa: E731
    a, b = old(), new()  # warm, and check
    cos = float(np.min(np.sum(a.astype(np.float64) * b, axis=1)))
    wall = {"encode (padded)": [], "ragged": []}
    cpu = {"encode (padded)": [], "ragged": []}
    for _ in range(args.rounds):  # interleaved
        for name, fn in (("encode (padded)", old), ("ragged", new)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in wall:
        t, c = float(np.median(wall[name])), float(np.median(cpu[name]))
        gf = flops / t / 1e9
        print(f"bulk 512 docs, batch 64, {th} threads: {name:16s} {t * 1e3:8.1f} ms "
              f"{512 / t:7.1f} docs/s  {gf:6.1f} GFLOP/s real = {100 * gf / args.peak:4.1f}% of "
              f"{args.peak} peak; CPU {c * 1e3:8.1f} ms = {flops / c / 1e9:5.1f} GFLOP per "
              "CPU-second")
    t_old, t_new = wall["encode (padded)"], wall["ragged"]
    print(f"  tokens {int(lens.sum())}, min cosine ragged vs padded {cos:.7f}, "
          f"speedup {np.median(t_old) / np.median(t_new):.2f}x")



def ragged_vs_equal(model, th, args) -> None:
    """ragged_forward on 64 sequences of 5..200 tokens vs 64 of equal length,
    the same total; wall and process CPU time (CPU time is less sensitive to
    other processes taking the cores), rounds interleaved."""
    rng = np.random.default_rng(0)
    rl = rng.integers(5, 201, 64)
    total = int(rl.sum())
    el = np.full(64, total // 64)
    el[: total - el.sum()] += 1
    inputs = {}
    for name, ls in (("ragged 5..200", rl), ("equal", el)):
        cu = _ragged._encoder.cu_seqlens(ls)
        inputs[name] = (ls, rng.integers(1000, 30000, int(cu[-1])).astype(np.int64), cu)
        _ragged.ragged_forward(model, inputs[name][1], cu, threads=th)  # warm
    wall = {k: [] for k in inputs}
    cpu = {k: [] for k in inputs}
    for _ in range(args.rounds + 2):  # interleaved, so load changes hit both alike
        for name, (ls, ids, cu) in inputs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            _ragged.ragged_forward(model, ids, cu, threads=th)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name, (ls, _, _) in inputs.items():
        w, c = float(np.median(wall[name])), float(np.median(cpu[name]))
        print(f"ragged_forward 64 seqs {name:14s} ({total} tokens): {w * 1e3:7.1f} ms wall "
              f"{c * 1e3:7.1f} ms CPU  {real_flops(model, ls) / w / 1e9:6.1f} GFLOP/s real")
    r = "ragged 5..200"
    print(f"  ragged / equal: wall {np.median(wall[r]) / np.median(wall['equal']):.3f}x, "
          f"CPU {np.median(cpu[r]) / np.median(cpu['equal']):.3f}x "
          f"(FLOPs ragged/equal: {real_flops(model, rl) / real_flops(model, el):.3f}x)")

if __name__ == "__main__":
    main()
