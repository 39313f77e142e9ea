"""int8 linear against onnxruntime's DynamicQuantizeMatMul (not a pytest suite).

    pip install --target /tmp/ortlib onnxruntime onnx     # optional, never a dependency
    PYTHONPATH=/tmp/ortlib python bench/compare_onnxruntime.py [--threads 2] [--shapes 1,16]

Issue 3's anchors: M = 1 and M = 16 with K = N = 4096. The ONNX graph is one
com.microsoft DynamicQuantizeMatMul node whose int8 weights and per-column
scales are exactly pykernels' symmetric per-column quantization, so both sides
dequantize the same weights and quantize activations per call. Same thread
count (ORT intra-op threads), same run; medians; the relative Frobenius error
of each against float64 is printed next to its time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import pykernels as pk


def _session(wq: np.ndarray, scale: np.ndarray, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = wq.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale", "b_zp"], ["Y"],
                            domain="com.microsoft")
    graph = helper.make_graph(
        [node], "dqmm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(wq, "B"),
                     numpy_helper.from_array(scale.astype(np.float32), "b_scale"),
                     numpy_helper.from_array(np.zeros(n, np.int8), "b_zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.__version__, ort.InferenceSession(model.SerializeToString(), so,
                                                 providers=["CPUExecutionProvider"])


def _median_s(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="1,16", help="comma-separated M values (K = N = 4096)")
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    k = n = 4096
    w = rng.standard_normal((k, n), dtype=np.float32)
    # pykernels' weight quantization: symmetric per column, scale = max|w| / 127
    scale = np.abs(w).max(axis=0) / 127.0
    wq = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    version, sess = _session(wq, scale, args.threads)
    pw = pk.pack(w, precision="int8")
    print(f"onnxruntime {version} DynamicQuantizeMatMul vs pykernels int8 linear, "
          f"K = N = {k}, {args.threads} threads")
    for m in (int(s) for s in args.shapes.split(",")):
        x = rng.standard_normal((m, k), dtype=np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        err = lambda y: float(np.linalg.norm(y - ref) / np.linalg.norm(ref))  # noqa: E731
        t_ort = _median_s(lambda: sess.run(None, {"A": x}), args.reps)
        t_ours, variant = min((_median_s(lambda v=v: pk.linear(x, pw, variant=v, threads=args.threads),
                                         args.reps), v) for v in ("latency", "throughput"))
        print(f"M={m:4d}: onnxruntime {t_ort * 1e6:9.1f} us (rel err {err(sess.run(None, {'A': x})[0]):.3g})"
              f" | pykernels {variant:10s} {t_ours * 1e6:9.1f} us (rel err {err(pk.linear(x, pw)):.3g})"
              f" | onnxruntime / pykernels = {t_ort / t_ours:.2f}x")


if __name__ == "__main__":
    main()
