"""The bf16 schemes: "widen" (widen_fma, or widen_scalar on generic; every ISA) and "dpbf16ps" (vdpbf16ps, avx512
path with AVX512_BF16), chosen by ``pk.set_bf16_scheme`` or by "auto" from the
measured rates.

On every ISA path: each scheme the path offers computes ``linear`` within the
bf16 contract's bound (gemm.h, docs/kernels.md) of a float64 product of the
bf16-rounded inputs, over edge rows, N not a multiple of 16, odd K, both
variants, 1 and 2 threads, bias and activations; ``kernels()`` and
``get_bf16_scheme()`` report the scheme in use; an unavailable scheme is a
ValueError naming the choice. The "auto" rule is tested on given rates, so no
test depends on what this CPU measures. (The dpbf16ps tiles themselves run here
only under SIMDe: tests/test_avx512_simde.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_call_under_isa

SHAPES = [(1, 1, 1), (5, 17, 33), (6, 64, 16), (7, 301, 100), (13, 128, 130), (64, 257, 70)]
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def contract_bound(x, w, bias, z):
    """The bf16 contract's bound around act64(z): gamma_n times the magnitude
    of the summed terms, n = 2K + 8 roundings, 1.2 for an activation's slope,
    plus 1e-6 (|z| + 1) for the activation's own approximation."""
    k = x.shape[1]
    nu = (2 * k + 8) * 2.0 ** -24
    gamma = nu / (1 - nu)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)) + np.abs(bias)
    return 1.2 * gamma * mag + 1e-6 * (np.abs(z) + 1.0)


def check_schemes() -> dict:
    """Run in a child under one PYKERNELS_ISA: every offered scheme vs float64."""
    import pykernels as pk
    from pykernels import _core
    from pykernels.testing import act64, bf16_round

    out = {"isa": pk.cpu_info().isa, "offered": [], "errors": {}, "cases": [],
           "pending_after_import": pk._runtime._bf16["pending"]}
    rng = np.random.default_rng(3)
    # fp32 calls and packing do not decide the bf16 scheme
    w0 = rng.standard_normal((8, 8), dtype=np.float32)
    pk.pack(w0, precision="bf16")
    pk.linear(np.ones((2, 8), np.float32), pk.pack(w0))
    out["pending_after_fp32"] = pk._runtime._bf16["pending"]
    auto_scheme = pk.get_bf16_scheme()
    out["auto"] = auto_scheme
    out["pending_after_get"] = pk._runtime._bf16["pending"]
    for scheme in ("widen", "dpbf16ps"):
        try:
            prev = pk.set_bf16_scheme(scheme)
        except ValueError as e:
            out["errors"][scheme] = str(e)
            continue
        assert prev == "auto", prev
        out["offered"].append(scheme)
        bf16 = [e for e in pk.kernels() if e.op == "linear" and e.precision == "bf16"]
        name = pk.get_bf16_scheme()
        assert name.startswith(scheme), (name, scheme)
        assert {e.scheme for e in bf16} == {name}, bf16
        assert all(name in e.name for e in bf16), [e.name for e in bf16]
        if scheme == "widen":  # its own name is accepted too (what get_bf16_scheme returned)
            assert pk.set_bf16_scheme(name) == "widen" and pk.get_bf16_scheme() == name
        for (m, k, n) in SHAPES:
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            bias = rng.standard_normal(n).astype(np.float32)
            pw = pk.pack(w, precision="bf16")
            x16, w16 = bf16_round(x), bf16_round(w)
            z = x16.astype(np.float64) @ w16.astype(np.float64) + bias
            worst = 0.0
            for act in ACTS:
                ref = act64(act, z)
                bound = contract_bound(x16, w16, bias, z)
                for variant in ("latency", "throughput"):
                    for threads in (1, 2):
                        y = pk.linear(x, pw, bias, activation=act, variant=variant, threads=threads)
                        worst = max(worst, float(np.max(np.abs(y - ref) / bound)))
            out["cases"].append({"scheme": scheme, "shape": [m, k, n], "worst": worst})
        assert pk.set_bf16_scheme("auto") in (scheme, name)
    out["restored"] = pk.get_bf16_scheme() == auto_scheme
    out["dot_available"] = bool(_core.bf16_dot_available())
    return out


def test_each_offered_scheme_meets_the_bf16_contract(isa):
    r = run_call_under_isa(isa, "test_bf16_scheme", "test_bf16_scheme.check_schemes()")
    assert r["isa"] == isa
    # import, packing and fp32 calls leave "auto" undecided; the first bf16 use decides
    assert r["pending_after_import"] and r["pending_after_fp32"]
    assert not r["pending_after_get"]
    assert r["auto"] in ("widen_fma", "widen_scalar", "dpbf16ps")
    if r["dot_available"]:
        assert r["offered"] == ["widen", "dpbf16ps"]
    else:
        assert r["offered"] == ["widen"]
        assert r["auto"].startswith("widen")
        assert "not available" in r["errors"]["dpbf16ps"] and "widen" in r["errors"]["dpbf16ps"]
    assert isa == "avx512" or not r["dot_available"]
    assert r["restored"]
    assert len(r["cases"]) == len(SHAPES) * len(r["offered"])
    for c in r["cases"]:
        assert c["worst"] <= 1.0, c


def test_auto_rule_on_given_rates():
    from pykernels._runtime import BF16_DOT_MIN_RATIO, choose_bf16_scheme
    assert choose_bf16_scheme(117.0, 234.0) == "dpbf16ps"     # Zen 4 (issue 14): 2.0x
    assert choose_bf16_scheme(351.0, 173.0) == "widen"        # Sapphire Rapids: 0.49x
    assert choose_bf16_scheme(100.0, 100.0 * BF16_DOT_MIN_RATIO) == "dpbf16ps"
    assert choose_bf16_scheme(100.0, 100.0 * BF16_DOT_MIN_RATIO - 1.0) == "widen"
    assert choose_bf16_scheme(100.0, None) == "widen"
    assert choose_bf16_scheme(0.0, 50.0) == "widen"


def _fake_peaks(fp32, dot):
    from pykernels._peaks import Peaks, Rate
    ops = {"fp32_fma": Rate(fp32, 2 * fp32)}
    if dot is not None:
        ops["bf16_dpbf16ps"] = Rate(dot, 2 * dot)
    return Peaks(cpu_model="test", isa="avx512", threads=2, ops=ops, read_gbs={}, working_set={})


def test_auto_reads_cached_peaks_and_measures_only_without_them(monkeypatch):
    from pykernels import _runtime
    calls = []

    def fake_measure(names, seconds):
        calls.append((tuple(names), seconds))
        return [("fp32_fma", 100e9), ("bf16_dpbf16ps", 210e9)]

    monkeypatch.setattr(_runtime._core, "bf16_dot_available", lambda: True)
    monkeypatch.setattr(_runtime._core, "measure_probes", fake_measure)
    monkeypatch.setattr(_runtime._peaks, "cached_peaks", lambda: _fake_peaks(117.0, 234.0))
    scheme, reason = _runtime._auto_bf16()
    assert scheme == "dpbf16ps" and "cached peaks" in reason and "2.00x" in reason
    monkeypatch.setattr(_runtime._peaks, "cached_peaks", lambda: _fake_peaks(351.0, 173.0))
    assert _runtime._auto_bf16()[0] == "widen"
    assert calls == []
    # nothing cached, or a cache without the bf16 probe: time just the two probes
    for cached in (None, _fake_peaks(117.0, None)):
        monkeypatch.setattr(_runtime._peaks, "cached_peaks", lambda c=cached: c)
        scheme, reason = _runtime._auto_bf16()
        assert scheme == "dpbf16ps" and "measured now" in reason
    assert [c[0] for c in calls] == [("fp32_fma", "bf16_dpbf16ps")] * 2
    assert all(s <= 0.01 for _, s in calls)
    # without the instruction nothing is read or measured
    monkeypatch.setattr(_runtime._core, "bf16_dot_available", lambda: False)
    monkeypatch.setattr(_runtime._peaks, "cached_peaks", lambda: pytest.fail("read peaks"))
    assert _runtime._auto_bf16()[0] == "widen"
    assert len(calls) == 2


def test_bad_scheme_names_are_value_errors():
    import pykernels as pk
    for bad in ("dpbf16", "", "fma"):
        with pytest.raises(ValueError, match="not available.*'widen'"):
            pk.set_bf16_scheme(bad)
    for bad in (None, 3):
        with pytest.raises(ValueError, match="auto"):
            pk.set_bf16_scheme(bad)
    assert pk.get_bf16_scheme() in ("widen_fma", "widen_scalar", "dpbf16ps")


def test_measure_probes_times_only_the_named_probes():
    from pykernels import _core
    r = _core.measure_probes(["fp32_fma"], 0.001)
    assert [name for name, _ in r] == ["fp32_fma"]
    assert math.isfinite(r[0][1]) and r[0][1] > 0
    assert _core.measure_probes(["no_such_probe"], 0.001) == []
