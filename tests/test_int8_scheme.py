"""7-bit activations on int8 weights: the precision "int8_7bit" (every ISA;
the vpmaddubsw scheme on AVX2 without VNNI) and the process-wide opt-in
``set_int8_scheme("vpmaddubsw")`` for "int8" weights (AVX2 and generic only).

Checked on every ISA path (the generic path runs its scalar model, AVX2 the
vpmaddubsw kernels, AVX-512 vpmaddwd or vpdpbusd on 7-bit activations): the
results are bit-identical to a float64 model of the scheme (7-bit per-row
activation quantization, exact integer sums, the kernels' float32
dequantization order), and within the stated error bound of the float64
product.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_json_under_isa

SHAPES = [(1, 64, 48), (3, 100, 33), (7, 257, 70), (33, 128, 40), (64, 512, 256)]

_CHILD = r"""
import json
import numpy as np
import pykernels as pk
from pykernels.testing import quantize_rows

def unpack_i8(pw):
    k, n = pw.shape
    data = pw._data.reshape(-1, (k + 3) // 4, 16, 4)       # [panel][k/4][col][k mod 4]
    wq = data.transpose(1, 3, 0, 2).reshape(-1, data.shape[0] * 16)[:k, :n]
    return wq.astype(np.float64)

out = {"available": True, "cases": []}
rng = np.random.default_rng(7)
for (m, k, n) in SHAPES_PLACEHOLDER:
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[0, :] *= 50.0                                      # rows of different scales
    w = rng.standard_normal((k, n), dtype=np.float32)
    pw = pk.pack(w, precision="int8")
    res = {}
    if MODE_PLACEHOLDER == "precision":
        # packed as int8_7bit, or an int8 weight switched without repacking
        p7 = pk.pack(w, precision="int8_7bit")
        assert p7.precision == "int8_7bit" and np.array_equal(p7._data, pw._data)
        shared = pw.with_precision("int8_7bit")
        assert shared._data is pw._data and shared._scale is pw._scale
        assert pk.get_int8_scheme() == [e.scheme for e in pk.kernels() if e.precision == "int8"][0]
        for variant in ("latency", "throughput"):
            for threads in (1, 2):
                res[(variant, threads)] = pk.linear(x, p7, variant=variant, threads=threads)
                res[(variant, threads, "shared")] = pk.linear(x, shared, variant=variant,
                                                              threads=threads)
    else:
        default = pk.get_int8_scheme()
        try:
            prev = pk.set_int8_scheme("vpmaddubsw")
        except ValueError:
            out["available"] = False
            break
        try:
            assert pk.get_int8_scheme() == "vpmaddubsw"
            assert all(e.scheme == "vpmaddubsw" for e in pk.kernels() if e.precision == "int8")
            for variant in ("latency", "throughput"):
                for threads in (1, 2):
                    res[(variant, threads)] = pk.linear(x, pw, variant=variant, threads=threads)
        finally:
            pk.set_int8_scheme(prev)
        assert pk.get_int8_scheme() == default
    amax = np.abs(x).max(axis=1, keepdims=True)
    xq = quantize_rows(x, 63)[0].astype(np.float64)   # the library's rule (pykernels.testing)
    assert np.abs(xq).max() <= 63
    sa = (amax / np.float32(63)).astype(np.float32)
    model = (xq @ unpack_i8(pw)).astype(np.float32) * pw._scale * sa
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # error bound: per element sum_k |a_k - a~_k| |w_k| + |a~_k| |w_k - w~_k|, with
    # |a - a~| <= amax / 126 and |w - w~| <= scale / 2 (plus float32 rounding)
    bound = (amax / 126.0) @ np.abs(w).sum(0, keepdims=True) \
        + (np.abs(x) @ np.full((k, n), 0.5) + amax / 126.0 * k * 0.5) * pw._scale \
        + 1e-5 * np.abs(exact) + 1e-30
    case = {"shape": [m, k, n], "bitexact": True, "within_bound": True}
    for key, y in res.items():
        case["bitexact"] &= bool(np.array_equal(y, model))
        case["within_bound"] &= bool(np.all(np.abs(y - exact) <= bound))
    out["cases"].append(case)
print(json.dumps(out))
"""


def _child(mode: str) -> str:
    return _CHILD.replace("SHAPES_PLACEHOLDER", repr(SHAPES)).replace("MODE_PLACEHOLDER",
                                                                        repr(mode))


def test_int8_7bit_precision_matches_its_model(isa):
    r = run_json_under_isa(isa, _child("precision"))
    assert r["available"], isa
    assert len(r["cases"]) == len(SHAPES)
    for c in r["cases"]:
        assert c["bitexact"], c
        assert c["within_bound"], c


def test_vpmaddubsw_matches_its_model(isa):
    r = run_json_under_isa(isa, _child("scheme"))
    if isa == "avx512":
        assert not r["available"]  # not offered there: VNNI or vpmaddwd instead
        return
    assert r["available"], isa
    assert len(r["cases"]) == len(SHAPES)
    for c in r["cases"]:
        assert c["bitexact"], c
        assert c["within_bound"], c


def test_unknown_scheme_is_a_value_error():
    import pykernels as pk
    with pytest.raises(ValueError, match="not available"):
        pk.set_int8_scheme("vnni9000")
    assert pk.get_int8_scheme() in ("vpmaddwd", "vpdpbusd", "scalar_u8s8")


def test_int8_7bit_is_a_registered_precision():
    import pykernels as pk
    entries = [e for e in pk.kernels() if e.precision == "int8_7bit"]
    assert {(e.op, e.variant) for e in entries} == {("linear", "latency"), ("linear", "throughput")}
    assert all(e.k_step == 4 for e in entries)  # the int8 packed format


def test_with_precision_only_switches_between_the_int8_precisions():
    import pykernels as pk
    w = np.ones((8, 16), dtype=np.float32)
    f32 = pk.pack(w)
    assert f32.with_precision("fp32") is f32
    with pytest.raises(ValueError, match="pack the weight again"):
        f32.with_precision("int8_7bit")
    i8 = pk.pack(w, precision="int8")
    with pytest.raises(ValueError, match="pack the weight again"):
        i8.with_precision("bf16")
    assert i8.with_precision("int8_7bit").with_precision("int8").precision == "int8"


def test_int8_7bit_round_trips_through_save_and_pickle(tmp_path):
    import pickle

    import pykernels as pk
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 20), dtype=np.float32)
    x = rng.standard_normal((5, 40), dtype=np.float32)
    pw = pk.pack(w, precision="int8_7bit")
    pw.save(tmp_path / "w.npz")
    for back in (pk.PackedWeight.load(tmp_path / "w.npz"), pickle.loads(pickle.dumps(pw))):
        assert back.precision == "int8_7bit"
        np.testing.assert_array_equal(pk.linear(x, back), pk.linear(x, pw))


def test_int8_7bit_rejects_non_finite_weights_and_keeps_inputs():
    import pykernels as pk
    w = np.ones((4, 16), dtype=np.float32)
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        pk.pack(w, precision="int8_7bit")
    pw = pk.pack(np.ones((4, 16), dtype=np.float32), precision="int8_7bit")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    keep = x.copy()
    pk.linear(x, pw)
    np.testing.assert_array_equal(x, keep)
