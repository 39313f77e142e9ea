"""encoder_layer: one post-LN BERT layer in one C++ call (pykernels._encoder).

Checked on every ISA path (one subprocess per path, as test_encoder_kernels.py)
against (1) the same layer spelled out as one kernel call per step (QKV linear,
varlen_attention, out-proj linear, add_layer_norm, FFN up linear + GELU, FFN
down linear, add_layer_norm) and (2) a float64 NumPy layer, for fp32, bf16,
int8 and a mix of precisions per projection, both variants and auto, 1 and 2
threads, and ragged lengths that make several row chunks (empty sequences
and a sequence longer than a chunk included).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import (ISA_ORDER, assert_batch_passed, check_items, current_isa, run_batch_items,
                      run_call_under_isa, supported_isas)

import pykernels as pk
import pykernels._encoder as enc
from pykernels import _gemm

LENGTHS = {"one": [9], "ragged": [1, 150, 0, 37, 70, 3], "equal": [33] * 4}
# Per projection: qkv, out, up, down.
PRECISIONS = {"fp32": ("fp32",) * 4, "bf16": ("bf16",) * 4, "int8": ("int8",) * 4,
              "mixed": ("int8", "fp32", "bf16", "int8")}


def make_layer(h=48, heads=3, f=80, precisions=("fp32",) * 4, seed=0):
    """Random weights (in, out) float32, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    shapes = {"qkv": (h, 3 * h), "out": (h, h), "up": (h, f), "down": (f, h)}
    raw = {k: (rng.standard_normal(s) / math.sqrt(s[0])).astype(np.float32)
           for k, s in shapes.items()}
    bias = {k: (0.1 * rng.standard_normal(s[1])).astype(np.float32) for k, s in shapes.items()}
    ln = [((1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
           (0.1 * rng.standard_normal(h)).astype(np.float32)) for _ in range(2)]
    packed = {k: pk.pack(raw[k], precision=p) for k, p in zip(shapes, precisions)}
    return dict(h=h, heads=heads, f=f, raw=raw, bias=bias, ln=ln, packed=packed)


def fused(L, x, cu, **kw):
    w, b = L["packed"], L["bias"]
    y = x.copy()
    enc.encoder_layer(y, cu, L["heads"], w["qkv"], b["qkv"], w["out"], b["out"], L["ln"][0],
                      w["up"], b["up"], w["down"], b["down"], L["ln"][1], **kw)
    return y


def steps(L, x, cu, activation="gelu", variant="auto", threads=None):
    w, b = L["packed"], L["bias"]
    kw = dict(variant=variant, threads=threads)
    x = x.copy()
    qkv = _gemm.linear(x, w["qkv"], b["qkv"], **kw)
    ctx = enc.varlen_attention(qkv, cu, L["heads"], threads=threads)
    proj = _gemm.linear(ctx, w["out"], b["out"], **kw)
    enc.add_layer_norm(proj, x, *L["ln"][0], 1e-12, out=x, threads=threads)
    up = _gemm.linear(x, w["up"], b["up"], activation=activation, **kw)
    proj = _gemm.linear(up, w["down"], b["down"], **kw)
    enc.add_layer_norm(proj, x, *L["ln"][1], 1e-12, out=x, threads=threads)
    return x


def reference64(L, x, lens):
    """The layer in float64 from the float32 weights (erf GELU)."""
    from math import erf
    h, nh = L["h"], L["heads"]
    d = h // nh
    raw = {k: v.astype(np.float64) for k, v in L["raw"].items()}
    bias = {k: v.astype(np.float64) for k, v in L["bias"].items()}

    def ln(v, g, b):
        m = v.mean(-1, keepdims=True)
        var = ((v - m) ** 2).mean(-1, keepdims=True)
        return (v - m) / np.sqrt(var + 1e-12) * g + b

    x = x.astype(np.float64)
    qkv = x @ raw["qkv"] + bias["qkv"]
    ctx = np.zeros((x.shape[0], h))
    s0 = 0
    for n in lens:
        for hd in range(nh):
            q = qkv[s0:s0 + n, hd * d:(hd + 1) * d]
            k = qkv[s0:s0 + n, h + hd * d:h + (hd + 1) * d]
            v = qkv[s0:s0 + n, 2 * h + hd * d:2 * h + (hd + 1) * d]
            s = q @ k.T / math.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True)) if n else s
            if n:
                p /= p.sum(-1, keepdims=True)
                ctx[s0:s0 + n, hd * d:(hd + 1) * d] = p @ v
        s0 += n
    x = ln(ctx @ raw["out"] + bias["out"] + x, *[a.astype(np.float64) for a in L["ln"][0]])
    u = x @ raw["up"] + bias["up"]
    u = 0.5 * u * (1 + np.vectorize(erf)(u / math.sqrt(2)))
    return ln(u @ raw["down"] + bias["down"] + x, *[a.astype(np.float64) for a in L["ln"][1]])


# Against the step-by-step form: the same GEMM entry points on the same rows
# (a row's result does not depend on the other rows of the call), so only
# the auto variant's choice by the call's size (a chunk of fewer rows may
# take the latency kernels where the whole batch took the throughput ones)
# changes the fp32 summation order: ~1e-6 on these O(1) normalized outputs.
# int8 re-quantizes each row at every projection, so such a 1-ulp change can
# move a rounding of one activation by one step (1/127 of the row's max):
# 2e-2 there. Against float64 (fp32 weights): K <= 80 products per output and
# LayerNorm's division by the row's standard deviation (~1): 1e-4.
def check_layer(isa, lens_name, prec, variant, threads):
    lens = LENGTHS[lens_name]
    L = make_layer(precisions=PRECISIONS[prec], seed=len(lens) + threads)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((sum(lens), L["h"])).astype(np.float32)
    x0 = x.copy()
    cu = enc.cu_seqlens(lens)
    got = fused(L, x, cu, variant=variant, threads=threads)
    assert np.array_equal(x, x0), "the input copy was modified"
    assert np.all(np.isfinite(got))
    want = steps(L, x, cu, variant=variant, threads=threads)
    tol = 2e-2 if "int8" in PRECISIONS[prec] else (2e-3 if "bf16" in PRECISIONS[prec] else 1e-5)
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= tol, f"{isa} {lens_name} {prec} {variant} t={threads}: fused vs steps {err:.3g}"
    if prec == "fp32":
        err = float(np.max(np.abs(got - reference64(L, x, lens)), initial=0.0))
        assert err <= 1e-4, f"{isa} {lens_name} {variant} t={threads}: vs float64 {err:.3g}"
    return None


def isa_checks():
    for lens_name in LENGTHS:
        for prec in PRECISIONS:
            for variant in ("auto", "latency", "throughput"):
                for threads in (1, 2):
                    yield (f"{lens_name}-{prec}-{variant}-t{threads}",
                           lambda isa, a=(lens_name, prec, variant, threads): check_layer(isa, *a))


def isa_batch(isa: str) -> dict:
    return run_batch_items(check_items(isa_checks()), isa, {})


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_isa(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU does not support {isa}")
    res = (isa_batch(isa) if isa == current_isa()
           else run_call_under_isa(isa, "test_encoder_layer",
                                   f"test_encoder_layer.isa_batch({isa!r})"))
    assert_batch_passed(res, isa, "encoder_layer")


def test_gelu_tanh_and_scratch_reuse():
    L = make_layer(precisions=PRECISIONS["fp32"])
    lens = LENGTHS["ragged"]
    cu = enc.cu_seqlens(lens)
    x = np.random.default_rng(5).standard_normal((sum(lens), L["h"])).astype(np.float32)
    scratch = enc.encoder_layer_scratch(x.shape[0], L["h"], L["f"], threads=2)
    scratch[:] = np.nan  # never read before written
    a = fused(L, x, cu, activation="gelu_tanh", threads=2, scratch=scratch)
    b = fused(L, x, cu, activation="gelu_tanh", threads=2, scratch=scratch)
    assert np.array_equal(a, b)
    want = steps(L, x, cu, activation="gelu_tanh", threads=2)
    assert np.max(np.abs(a - want)) <= 1e-5
    assert np.max(np.abs(a - fused(L, x, cu, threads=2))) > 1e-6  # the activation mattered


def test_empty_batch():
    L = make_layer()
    x = np.empty((0, L["h"]), np.float32)
    assert fused(L, x, enc.cu_seqlens([0, 0])).shape == (0, L["h"])


def _layer_args(L, x, cu):
    w, b = L["packed"], L["bias"]
    return [x, cu, L["heads"], w["qkv"], b["qkv"], w["out"], b["out"], L["ln"][0],
            w["up"], b["up"], w["down"], b["down"], L["ln"][1]]


def test_bad_inputs():
    L = make_layer()
    x = np.zeros((10, L["h"]), np.float32)
    cu = enc.cu_seqlens([4, 6])
    args = _layer_args(L, x, cu)
    bad = list(args)
    bad[3] = L["raw"]["qkv"]  # a raw array, not a PackedWeight
    with pytest.raises(TypeError, match="PackedWeight"):
        enc.encoder_layer(*bad)
    bad = list(args)
    bad[3], bad[5] = L["packed"]["out"], L["packed"]["qkv"]  # swapped shapes
    with pytest.raises(ValueError, match="shape"):
        enc.encoder_layer(*bad)
    bad = list(args)
    bad[4] = L["bias"]["out"]  # bias of the wrong length
    with pytest.raises(ValueError, match="qkv bias"):
        enc.encoder_layer(*bad)
    with pytest.raises(ValueError, match="heads"):
        enc.encoder_layer(*(args[:2] + [5] + args[3:]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        enc.encoder_layer(*([x, enc.cu_seqlens([4, 5])] + args[2:]))
    with pytest.raises(ValueError, match="scratch holds"):
        enc.encoder_layer(*args, scratch=np.empty(10, np.float32))
    scratch_over_x = np.empty(10 * L["h"] + 10**5, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        enc.encoder_layer(*([scratch_over_x[:10 * L["h"]].reshape(10, L["h"])] + args[1:]),
                          scratch=scratch_over_x)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        enc.encoder_layer(*([ro] + args[1:]))
    with pytest.raises(ValueError, match="activation"):
        enc.encoder_layer(*args, activation="tanh")
    with pytest.raises(ValueError, match="variant"):
        enc.encoder_layer(*args, variant="fast")


def test_releases_the_gil():
    """Python code runs in another thread while layer calls are in progress:
    with the GIL held the main loop could not advance until a call returned."""
    import threading

    L = make_layer(h=384, heads=12, f=1536)
    lens = [200] * 24
    x = np.random.default_rng(4).standard_normal((sum(lens), 384)).astype(np.float32)
    cu = enc.cu_seqlens(lens)
    scratch = enc.encoder_layer_scratch(x.shape[0], 384, 1536, threads=1)
    started, done = threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(3):
            enc.encoder_layer(*_layer_args(L, x, cu), threads=1, scratch=scratch)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    count = 0
    while not done.is_set():
        count += 1
    t.join()
    assert count > 1000, count


def test_a_bf16_layer_decides_the_auto_bf16_scheme(monkeypatch):
    # set_bf16_scheme("auto") is decided at the first bf16 call: the fused layer
    # reads the dispatch table directly, so it must decide it as linear does
    from pykernels import _runtime
    monkeypatch.setitem(_runtime._bf16, "pending", True)
    L = make_layer(precisions=("bf16",) * 4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 48), dtype=np.float32)
    cu = np.array([0, 3, 7], np.int64)
    fused(L, x, cu)
    assert not _runtime._bf16["pending"]
    assert pk.get_bf16_scheme() in {e.scheme for e in pk.kernels()
                                    if e.precision == "bf16" and e.op == "linear"}


def test_a_zero_stride_x_claiming_2_52_rows_is_refused():
    # the scratch size multiplies the rows by 4H + F: refused long before int64 wraps
    L = make_layer()
    w, b = L["packed"], L["bias"]
    x = np.lib.stride_tricks.as_strided(np.zeros(48, np.float32), shape=(2**52, 48),
                                        strides=(0, 4), writeable=True)
    cu = np.array([0, 2**52], np.int64)
    with pytest.raises(ValueError, match="rows"):
        enc.encoder_layer(x, cu, 3, w["qkv"], b["qkv"], w["out"], b["out"], L["ln"][0],
                          w["up"], b["up"], w["down"], b["down"], L["ln"][1],
                          scratch=np.zeros(1000, np.float32))
