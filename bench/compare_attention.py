"""One short attention timing comparison (not a pytest suite).

    python bench/compare_attention.py [--rounds 3] [--budget 0.25]

Decode (B=1, Hq=32, Hkv=8, D=128, L=2048) and causal prefill (B=1, H=8,
S=1024, D=64), fp32 and bf16 K/V/Q: pykernels latency and throughput at 1 and
2 threads against the NumPy implementation of ``pykernels bench attention``
(grouped BLAS matmuls + softmax, fp32). The implementations are timed in
interleaved rounds so a change of machine load hits all of them alike; each
figure is the median over all samples. NumPy's BLAS is pinned to one thread
(OPENBLAS_NUM_THREADS=1 unless set): on a contended 2-core machine OpenBLAS's
second thread slows small batched matmuls by orders of magnitude, which would
flatter pykernels.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import pykernels as pk  # noqa: E402
from pykernels.harness.attention import numpy_attention  # noqa: E402

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    BF16 = None


def cases():
    rng = np.random.default_rng(0)
    out = []
    # decode
    b, hq, hkv, d, L = 1, 32, 8, 128, 2048
    q = rng.standard_normal((b, hq, d), dtype=np.float32)
    k = rng.standard_normal((b, hkv, L, d), dtype=np.float32)
    v = rng.standard_normal((b, hkv, L, d), dtype=np.float32)
    lens = np.full(b, L, np.int64)
    for prec in ("fp32", "bf16"):
        qq, kk, vv = (q, k, v) if prec == "fp32" else (q.astype(BF16), k.astype(BF16), v.astype(BF16))
        o = np.empty((b, hq, d), np.float32)
        name = f"decode B={b} Hq={hq} Hkv={hkv} D={d} L={L} {prec}"
        impls = {}
        for var in ("latency", "throughput"):
            for t in (1, 2):
                impls[f"{var} t{t}"] = (lambda qq=qq, kk=kk, vv=vv, var=var, t=t, o=o:
                                        pk.decode_attention(qq, kk, vv, lens, out=o, variant=var,
                                                            threads=t))
        q32, k32, v32 = (np.asarray(x, np.float32) for x in (qq, kk, vv))
        impls["numpy t1"] = lambda q32=q32, k32=k32, v32=v32: numpy_attention(q32[:, :, None], k32,
                                                                              v32)
        out.append((name, impls, kk.nbytes + vv.nbytes, None))
    # prefill
    b, h, s, d = 1, 8, 1024, 64
    q = rng.standard_normal((b, h, s, d), dtype=np.float32)
    k = rng.standard_normal((b, h, s, d), dtype=np.float32)
    v = rng.standard_normal((b, h, s, d), dtype=np.float32)
    flops = 4 * b * h * (s * (s + 1) // 2) * d  # causal: the visible half
    for prec in ("fp32", "bf16"):
        qq, kk, vv = (q, k, v) if prec == "fp32" else (q.astype(BF16), k.astype(BF16), v.astype(BF16))
        o = np.empty((b, h, s, d), np.float32)
        name = f"prefill causal B={b} H={h} S={s} D={d} {prec}"
        impls = {}
        for var in ("latency", "throughput"):
            for t in (1, 2):
                impls[f"{var} t{t}"] = (lambda qq=qq, kk=kk, vv=vv, var=var, t=t, o=o:
                                        pk.attention(qq, kk, vv, causal=True, out=o, variant=var,
                                                     threads=t))
        q32, k32, v32 = (np.asarray(x, np.float32) for x in (qq, kk, vv))
        impls["numpy t1"] = lambda q32=q32, k32=k32, v32=v32: numpy_attention(q32, k32, v32, causal=True)
        out.append((name, impls, None, flops))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds per impl per round")
    args = ap.parse_args()
    info = pk.cpu_info()
    print(f"pykernels {pk.__version__}, isa {info.isa}, {info.cores} cores, "
          f"L1d {info.l1d_bytes // 1024} KiB, L2 {info.l2_bytes // 1024} KiB; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, impls, nbytes, flops in cases():
        samples = {k: [] for k in impls}
        for fn in impls.values():
            fn()
        for _ in range(args.rounds):
            for key, fn in impls.items():
                end = time.perf_counter() + args.budget
                while True:
                    t = time.perf_counter()
                    fn()
                    samples[key].append(time.perf_counter() - t)
                    if time.perf_counter() > end:
                        break
        print(name)
        base = float(np.median(samples["numpy t1"]))
        for key, ts in samples.items():
            med = float(np.median(ts))
            extra = f"{nbytes / med / 1e9:6.1f} GB/s" if nbytes else f"{flops / med / 1e9:6.1f} GFLOP/s"
            print(f"  {key:14s} {med * 1e3:9.3f} ms  {extra}  x{base / med:6.1f} vs numpy")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
