"""Cost model: table lookup, interpolation between batch buckets, the NNLS fit for
shapes never measured, measured tails, and the held-out error functions."""
import numpy as np
import pytest

from pykernels.policy import CostModel, Profile, cross_validate, heldout_error, ops

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHAPES = (ops.Linear(128, 256), ops.Linear(384, 384), ops.Linear(384, 1536), ops.Linear(1536, 384))
# ms = overhead + ms/GFLOP * GFLOP + ms/MB * MB (weight and activations alike)
COEF = {"latency": (0.004, 12.0, 0.02), "throughput": (0.03, 8.0, 0.03)}


def formula(op, variant, batch, precision="fp32"):
    c0, c1, c2 = COEF[variant]
    return c0 + c1 * op.flops(batch) / 1e9 + c2 * op.bytes(batch, precision) / 1e6


def tail(p50):
    return 2.0 if p50 < 0.05 else 1.25


def formula_profile(shapes=SHAPES, batches=BATCHES, noise=None):
    rng = np.random.default_rng(0)
    p = Profile(source="formula")
    for op in shapes:
        for v in COEF:
            for b in batches:
                t = formula(op, v, b)
                if noise:
                    t *= 1 + rng.uniform(-noise, noise)
                p.add(op, v, "fp32", 1, b, t, t * tail(t))
    return p


def test_measured_cells_are_read_back():
    p = formula_profile()
    cm = CostModel(p)
    op = SHAPES[2]
    pr = cm.predict(op, "latency", "fp32", 1, 16)
    assert pr.source == "measured"
    assert pr.p50_ms == pytest.approx(formula(op, "latency", 16))
    assert pr.p99_ms == pytest.approx(pr.p50_ms * tail(pr.p50_ms))


def test_fit_recovers_coefficients():
    cm = CostModel(formula_profile())
    c = cm.coefficients("linear", "throughput", "fp32", 1)
    assert all(x >= 0 for x in c)  # NNLS
    # without a kernel tile, FLOPs and tiled FLOPs are the same column: their sum is identified
    assert c[0] == pytest.approx(0.03, rel=1e-6)
    assert c[1] + c[2] == pytest.approx(8.0, rel=1e-6)
    # bytes split by what they scale with: activations in, outputs, the weight
    assert c[3:] == pytest.approx((0.03, 0.03, 0.03), rel=1e-6)


def test_fit_separates_per_output_cost_from_flops():
    """A kernel that pays per output element (int8 dequantization, the
    epilogue) is slower on narrow-N shapes than FLOPs say; with activations
    in, outputs and the weight as separate columns the fit carries that to
    a new shape."""
    def t(op, b):
        m = op.units(b)
        return 0.01 + 10.0 * op.flops(b) / 1e9 + 0.5 * 4 * m * op.n / 1e6

    prof = Profile()
    for op in SHAPES:
        for b in BATCHES:
            prof.add(op, "throughput", "int8", 1, b, t(op, b), 1.2 * t(op, b))
    cm = CostModel(prof)
    new = ops.Linear(768, 384)
    for b in (3, 24, 192):
        assert cm.predict(new, "throughput", "int8", 1, b).p50_ms == pytest.approx(t(new, b), rel=1e-6)


def test_a_group_measured_on_one_shape_scales_new_shapes_by_work():
    """One attention shape cannot tell FLOPs from bytes (both grow with the
    batch alone): the fit keeps overhead and GFLOP, so a shorter sequence
    costs its (quadratic) share of the work, not its (linear) share of bytes."""
    a128 = ops.Attention(12, 12, 32, 128, 128, False)
    prof = Profile()
    for b in (1, 2, 4, 8):
        x = 0.005 + 20.0 * a128.flops(b) / 1e9
        prof.add(a128, "throughput", "fp32", 1, b, x, 1.2 * x)
    cm = CostModel(prof)
    c = cm.coefficients("attention", "throughput", "fp32", 1)
    assert c[2:] == (0.0, 0.0, 0.0, 0.0)
    a64 = ops.Attention(12, 12, 32, 64, 64, False)
    pr = cm.predict(a64, "throughput", "fp32", 1, 3)
    assert pr.source == "fitted"
    assert pr.p50_ms == pytest.approx(0.005 + 20.0 * a64.flops(3) / 1e9, rel=1e-6)


def test_a_new_shape_follows_the_measured_curve_of_a_lone_shape():
    """Decode measured on one KV length: per-sequence cost steps up past 4
    sequences (the cache no longer holds the KV). A new KV length keeps that
    step, scaled by its work."""
    d512 = ops.Decode(32, 8, 128, 512)

    def t(op, b):
        per = 0.2 if b <= 4 else 0.8  # ms per sequence at kv_len 512
        return 0.01 + per * b * op.kv_len / 512

    prof = Profile()
    for b in (1, 4, 16):
        prof.add(d512, "latency", "fp32", 1, b, t(d512, b), 1.3 * t(d512, b))
    cm = CostModel(prof)
    d768 = ops.Decode(32, 8, 128, 768)
    for b in (1, 4, 16):
        assert cm.predict(d768, "latency", "fp32", 1, b).p50_ms == pytest.approx(t(d768, b), rel=0.02)


@pytest.mark.parametrize("batch", [3, 5, 12, 100, 200])
def test_interpolation_between_buckets(batch):
    op = SHAPES[1]
    cm = CostModel(formula_profile())
    pr = cm.predict(op, "latency", "fp32", 1, batch)
    assert pr.source == "interpolated"
    assert pr.p50_ms == pytest.approx(formula(op, "latency", batch), rel=1e-9)


def test_interpolation_keeps_measured_steps():
    # A step-shaped curve (1..6 rows share one tile): flat, then a jump.
    op = ops.Linear(256, 256)
    p = Profile()
    for b, t in ((1, 1.0), (2, 1.0), (4, 1.0), (8, 2.0), (16, 3.0)):
        p.add(op, "throughput", "fp32", 1, b, t, 1.5 * t)
    cm = CostModel(p)
    for b, t in ((1, 1.0), (2, 1.0), (4, 1.0), (8, 2.0), (16, 3.0)):
        assert cm.predict(op, "throughput", "fp32", 1, b).p50_ms == pytest.approx(t)
    assert cm.predict(op, "throughput", "fp32", 1, 3).p50_ms == pytest.approx(1.0, rel=0.05)
    mid = [cm.predict(op, "throughput", "fp32", 1, b).p50_ms for b in range(1, 17)]
    assert all(1.0 - 1e-9 <= x <= 3.0 + 1e-9 for x in mid)
    assert mid == sorted(mid)  # monotone across the steps
    assert all(cm.predict(op, "throughput", "fp32", 1, b).p99_ms ==
               pytest.approx(1.5 * cm.predict(op, "throughput", "fp32", 1, b).p50_ms) for b in range(1, 17))


def test_extrapolation_beyond_buckets_follows_the_fit():
    op = SHAPES[0]
    cm = CostModel(formula_profile(batches=(4, 8, 16, 32)))
    hi = cm.predict(op, "throughput", "fp32", 1, 512)
    lo = cm.predict(op, "throughput", "fp32", 1, 1)
    assert hi.source == lo.source == "extrapolated"
    assert hi.p50_ms == pytest.approx(formula(op, "throughput", 512), rel=1e-6)
    assert lo.p50_ms == pytest.approx(formula(op, "throughput", 1), rel=1e-6)


def test_unmeasured_shape_uses_the_fit_and_a_measured_tail():
    cm = CostModel(formula_profile())
    small = ops.Linear(64, 64)
    big = ops.Linear(2048, 2048)
    s = cm.predict(small, "latency", "fp32", 1, 1)
    b = cm.predict(big, "latency", "fp32", 1, 64)
    assert s.source == b.source == "fitted"
    assert s.p50_ms == pytest.approx(formula(small, "latency", 1), rel=1e-6)
    assert b.p50_ms == pytest.approx(formula(big, "latency", 64), rel=1e-6)
    # tails come from the measured cells nearest in p50: heavy for tiny calls, light for big ones
    assert s.p99_ms / s.p50_ms == pytest.approx(2.0)
    assert b.p99_ms / b.p50_ms == pytest.approx(1.25)


def test_unknown_groups_are_not_predicted():
    cm = CostModel(formula_profile())
    assert cm.predict(SHAPES[0], "latency", "int8", 1, 4) is None
    assert cm.predict(SHAPES[0], "latency", "fp32", 2, 4) is None
    assert cm.predict(ops.Decode(8, 8, 64, 128), "latency", "fp32", 1, 4) is None
    assert cm.candidates(ops.Decode(8, 8, 64, 128)) == []
    assert cm.candidates(SHAPES[0]) == [("latency", "fp32", 1), ("throughput", "fp32", 1)]
    assert cm.candidates(ops.Linear(8, 8, precision="bf16")) == []


def test_model_is_the_sum_of_its_parts():
    cm = CostModel(formula_profile())
    parts = [ops.Linear(384, 1536, rows_per_item=4), ops.Linear(1536, 384, rows_per_item=4)]
    m = ops.Model(ops=parts, name="ffn")
    pr = cm.predict(m, "throughput", "fp32", 1, 8)
    assert pr.source == "sum"
    assert pr.p50_ms == pytest.approx(sum(formula(p.base(), "throughput", 32) for p in parts))
    assert pr.p99_ms == pytest.approx(sum(cm.predict(p, "throughput", "fp32", 1, 8).p99_ms for p in parts))


def test_heldout_error_is_zero_on_an_exact_formula():
    train = formula_profile()
    held = formula_profile(shapes=(ops.Linear(256, 768), ops.Linear(512, 512)), batches=(1, 3, 24, 192))
    rep = heldout_error(train, held)
    assert rep.n == 2 * 2 * 4 and rep.skipped == 0
    assert rep.median < 1e-6 and rep.p90 < 1e-6
    assert set(rep.by_source()) == {"fitted"}
    assert "cells" in rep.summary()


def test_heldout_error_reports_noise():
    train = formula_profile()
    held = formula_profile(shapes=(ops.Linear(256, 768),), noise=0.2)
    rep = heldout_error(train, held)
    assert 0.02 < rep.median < 0.2 and rep.max <= 0.2 / 0.8 + 1e-9


def test_heldout_error_counts_what_it_cannot_predict():
    held = Profile().add(ops.Linear(8, 8), "latency", "int8", 1, 1, 0.1)
    rep = heldout_error(formula_profile(), held)
    assert rep.n == 0 and rep.skipped == 1 and np.isnan(rep.median)


def test_cross_validate_leaves_one_shape_out():
    rep = cross_validate(formula_profile())
    assert rep.n == len(SHAPES) * 2 * len(BATCHES)
    assert {r.source for r in rep.rows} == {"fitted"}
    assert rep.median < 1e-6
