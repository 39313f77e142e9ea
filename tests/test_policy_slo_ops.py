"""SLO validation, op descriptions and the op/kernel registry of pykernels.policy."""
import dataclasses
import math

import pytest

from pykernels import KernelCall
from pykernels.policy import SLO, ops


# --- SLO --------------------------------------------------------------------
def test_slo_defaults_admit_fp32_only():
    s = SLO()
    assert s.p99_ms is None and s.p50_ms is None and s.min_throughput is None
    assert s.max_rel_error == 1e-4
    assert ops.PRECISION_REL_ERROR["fp32"] <= s.max_rel_error
    assert all(ops.PRECISION_REL_ERROR[p] > s.max_rel_error for p in ("bf16", "int8"))


@pytest.mark.parametrize("kwargs", [
    dict(p99_ms=-1), dict(p99_ms=math.nan), dict(p99_ms=0), dict(p99_ms=math.inf),
    dict(p50_ms=-0.5), dict(p50_ms=math.nan),
    dict(min_throughput=-10), dict(min_throughput=math.nan),
    dict(max_rel_error=-1e-3), dict(max_rel_error=math.nan), dict(max_rel_error=None),
    dict(p99_ms="5"), dict(p99_ms=True),
    dict(p50_ms=10, p99_ms=5),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_slo_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SLO(**kwargs)


def test_slo_is_frozen_and_normalized():
    s = SLO(p99_ms=5, p50_ms=2, min_throughput=100, max_rel_error=math.inf)
    assert isinstance(s.p99_ms, float) and s.p99_ms == 5.0
    assert s.max_rel_error == math.inf
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.p99_ms = 1.0
    assert s == SLO(p99_ms=5.0, p50_ms=2.0, min_throughput=100.0, max_rel_error=math.inf)
    assert hash(s) == hash(SLO(p99_ms=5.0, p50_ms=2.0, min_throughput=100.0, max_rel_error=math.inf))
    assert "p99 <= 5 ms" in s.describe()


# --- ops --------------------------------------------------------------------
def test_linear_work():
    op = ops.Linear(384, 1536)
    assert op.key == "linear(k=384,n=1536)"
    assert op.flops(1) == 2 * 384 * 1536
    assert op.flops(8) == 8 * op.flops(1)
    # the weight is read once per call, the activations once per row
    assert op.bytes(1) == 384 * 1536 * 4 + 4 * (384 + 1536)
    assert op.bytes_per_item() == 4 * (384 + 1536)
    assert op.bytes(1, "int8") < op.bytes(1, "bf16") < op.bytes(1, "fp32")
    # tile quantization: 1..6 rows cost one 6-row tile
    assert op.tiled_flops(1, (6, 16)) == op.tiled_flops(6, (6, 16)) < op.tiled_flops(7, (6, 16))
    assert op.tiled_flops(3) == op.flops(3)


def test_linear_rows_per_item_maps_to_base_shape():
    op = ops.Linear(384, 384, precision="bf16", rows_per_item=128)
    assert op.base() == ops.Linear(384, 384)
    assert op.units(2) == 256
    assert op.flops(2) == ops.Linear(384, 384).flops(256)


def test_attention_and_decode_work():
    a = ops.Attention(12, 12, 32, 128, 128, causal=False)
    c = ops.Attention(12, 12, 32, 128, 128, causal=True)
    assert a.flops(1) == 4 * 12 * 32 * 128 * 128
    assert c.flops(1) == 4 * 12 * 32 * (128 * 129 // 2)
    assert a.bytes(2) == 2 * a.bytes(1)
    d = ops.Decode(32, 8, 128, 1024)
    assert d.flops(4) == 4 * 4 * 32 * 1024 * 128
    with pytest.raises(ValueError):
        ops.Attention(12, 5, 32, 8, 8, False)  # hq not a multiple of hkv


@pytest.mark.parametrize("bad", [
    lambda: ops.Linear(0, 4), lambda: ops.Linear(4, -1), lambda: ops.Linear(4, 4, "fp64"),
    lambda: ops.Linear(4.5, 4), lambda: ops.Decode(8, 8, 64, 0), lambda: ops.Model(ops=[]),
])
def test_ops_validate(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("op", [
    ops.Linear(384, 1536), ops.Linear(64, 32, "int8", rows_per_item=4),
    ops.Attention(12, 4, 32, 16, 64, True, "bf16"), ops.Decode(32, 8, 128, 512),
    ops.Model(ops=[ops.Linear(384, 1152, rows_per_item=8), ops.Attention(12, 12, 32, 8, 8, False)],
              name="mini"),
], ids=lambda o: o.key)
def test_spec_round_trip_and_hashable(op):
    back = ops.from_spec(op.spec())
    assert back == op and hash(back) == hash(op) and back.key == op.key


def test_model_sums_parts():
    parts = [ops.Linear(384, 1152, rows_per_item=8), ops.Linear(384, 384, rows_per_item=8)]
    m = ops.Model(ops=parts)
    assert m.parts() == tuple(parts)
    assert m.flops(3) == sum(p.flops(3) for p in parts)
    assert m.bytes(3) == sum(p.bytes(3) for p in parts)


def test_from_spec_accepts_benchmark_aliases():
    assert ops.from_spec({"op": "gemm", "k": 8, "n": 16, "m": 4}) == ops.Linear(8, 16)
    assert ops.from_spec({"op": "decode_attention", "hq": 8, "hkv": 8, "d": 64, "kv_len": 32}) \
        == ops.Decode(8, 8, 64, 32)
    with pytest.raises(ValueError):
        ops.from_spec({"op": "conv2d"})


def test_registry_lists_gemm_for_linear():
    cands = ops.candidates("linear")
    assert ("latency", "fp32") in cands and ("throughput", "fp32") in cands
    # a kernel that is not registered is simply not a candidate
    assert ("latency", "int8") not in cands or any(e.op == "linear" and e.precision == "int8"
                                                    for e in ops.kernel_table())


def test_registry_new_backend_joins_by_registering():
    Entry = type(ops.kernel_table()[0])
    table = ops.kernel_table() + [
        Entry(op="linear", variant="throughput", precision="int8", isa="avx2", kernel="gemm",
              scheme="vpmaddwd", mr=6, nr=16, k_step=4),
        Entry(op="fake_decode", variant="latency", precision="fp32", isa="generic", kernel="fake",
              scheme="scalar", mr=1, nr=1, k_step=1),
    ]
    calls = []
    real = ops.candidates("decode", table).get(("latency", "fp32"))
    b = ops.register_backend("decode", "fake_decode",
                             lambda op, v, p, t, u, cache: (lambda: calls.append(u)), priority=100)
    try:
        assert ops.candidates("decode", table)[("latency", "fp32")] is b  # highest priority wins
        run = ops.runner(ops.Decode(8, 8, 64, 16), "latency", "fp32", 1, 3, table=table)
        run()
        assert calls == [3]
        # the linear backend on pykernels.linear serves int8 only if pykernels.linear exists
        import pykernels
        assert (("throughput", "int8") in ops.candidates("linear", table)) == hasattr(pykernels, "linear")
    finally:
        ops.unregister_backend(b)
    assert ops.candidates("decode", table).get(("latency", "fp32")) is real


def test_kernel_tiles_read_registry_fields():
    Entry = type(ops.kernel_table()[0])
    table = [Entry(op="gemm", variant="latency", precision="fp32", isa="avx512", kernel="gemm",
                   scheme="fma", mr=6, nr=64, k_step=1),
             Entry(op="linear", variant="throughput", precision="int8", isa="avx512", kernel="gemm",
                   scheme="vpdpbusd", mr=6, nr=64, k_step=4),
             Entry(op="attention", variant="latency", precision="fp32", isa="avx2", kernel="attention",
                   scheme="splitkv")]
    records = ops.tile_records(table)
    tiles = ops.kernel_tiles(records)
    assert tiles[("linear", "latency", "fp32")] == (6, 64)
    assert tiles[("linear", "throughput", "int8")] == (6, 64)
    assert ("attention", "latency", "fp32") not in tiles
    # every tiled kernel of this machine's registry reaches the cost model
    here = ops.kernel_tiles(ops.tile_records())
    for e in ops.kernel_table():
        if e.mr is not None and ops.op_kind(e.op):
            assert here[(ops.op_kind(e.op), e.variant, e.precision)] == (e.mr, e.nr)


def test_op_for_call_maps_gemm_calls():
    op, batch = ops.op_for_call(KernelCall("gemm", "fp32", m=7, k=64, n=32))
    assert op == ops.Linear(64, 32, "fp32") and batch == 7
    assert ops.op_for_call(KernelCall("unknown_kernel", "fp32", m=1, k=2, n=3)) is None


def test_op_for_call_reads_attention_geometry_from_the_call():
    # the call carries heads, lengths and causality: nothing is guessed back
    call = KernelCall("attention", "bf16", batch=3, q_heads=12, kv_heads=4, q_len=128, kv_len=256,
                      head_dim=32, causal=True)
    op, batch = ops.op_for_call(call)
    assert op == ops.Attention(12, 4, 32, 128, 256, True, "bf16") and batch == 3
    call = KernelCall("decode_attention", "fp32", batch=4, q_heads=32, kv_heads=8, q_len=1,
                      kv_len=512, head_dim=128)
    op, batch = ops.op_for_call(call)
    assert op == ops.Decode(32, 8, 128, 512, "fp32") and batch == 4
    empty = KernelCall("decode_attention", "fp32", batch=0, q_heads=32, kv_heads=8, q_len=1,
                       kv_len=700, head_dim=128)
    assert ops.op_for_call(empty) is None
