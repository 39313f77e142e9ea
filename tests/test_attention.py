"""pykernels.attention / decode_attention against a float64 NumPy reference.

Every ISA path runs: the default (best) one in this process, the others in a
few subprocesses with ``PYKERNELS_ISA`` set, each running a batch of cases and
reporting one JSON line (the kernel table is resolved once at import).

Tolerance (derived; ``attention_tolerance``)
--------------------------------------------
The inputs are exact fp32 (or bf16) values; every error is a rounding of the
kernel's fp32 arithmetic (unit roundoff u = eps32/2, eps32 = 2^-23):

* logits: s_j = scale * q . k_j is a D-term dot product (plus the rounding of
  q * scale * log2 e when Q is staged). Its absolute error is at most
  eps32 * (c sqrt(D) + 3) * a_j with a_j = scale * sum_d |q_d k_jd| (the
  probabilistic sqrt(D) bound of Higham & Mary; c = 2 with FMA, 4 on the
  generic path, which rounds a*b + c twice).
* weights: p_j = 2^(s_j - m) picks up the logit error (relative, since
  d(e^s) / e^s = ds), the exp2 polynomial's error (< 3e-7, test_exp2_accuracy)
  and the rounding of s_j - m. Normalizing by sum p doubles a common relative
  error bound: |w'_j - w_j| <= 2 (ds + e_exp + 4 eps32) w_j.
* accumulation: sum_j p_j v_j and sum_j p_j over n visible keys, the split-KV
  merge and the final division: eps32 (c sqrt(n) + 8) relative to
  sum_j w_j |v_j|.

      |out - ref| <= [2 (eps32 (c sqrt(D) + 3) max_j a_j + 3e-7 + 4 eps32)
                      + eps32 (c sqrt(n) + 8)] * sum_j w_j |v_j|

A row that sees no key has a zero bound: it must be exactly 0. With logits in
the thousands a_j is large and the bound grows with it, as it must: fp32 holds a
logit of 3000 to within ~2e-4.

bf16 against the fp32 originals: rounding q, k and v to bf16 (8-bit
significand, unit roundoff 2^-9) moves each logit by at most 2 * 2^-9 * a_j and
each value by 2^-9 |v|, so the bound gains 2 * 2^-8 * max_j a_j + 2^-9 (times
sum_j w_j |v_j|). Against the bf16-rounded inputs themselves the fp32 bound
holds: the kernel converts exactly and computes in fp32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pykernels as pk
from pykernels.testing import attention_reference64 as reference
from conftest import build_native_driver

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
EPS32 = float(np.finfo(np.float32).eps)
# Measured 1.64e-7 (FMA) and 1.90e-7 (generic, two roundings per step); see
# vexp2 in csrc/kernels/common/attention_impl.inc.
EXP2_MAX_REL = {"generic": 2.5e-7, "avx2": 2e-7, "avx512": 2e-7}
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
ISA_ORDER = ("generic", "avx2", "avx512")
VARIANTS = ("latency", "throughput")


def current_isa() -> str:
    return pk.cpu_info().isa


def supported_isas() -> tuple:
    best = pk.cpu_info().supported_isa
    return ISA_ORDER[: ISA_ORDER.index(best) + 1]


# ---------------------------------------------------------------------------
# reference and tolerance
# ---------------------------------------------------------------------------

def attention_tolerance(mag, amax, nvis, d, isa, bf16_inputs=False):
    c = 4.0 if isa == "generic" else 2.0
    ds = EPS32 * (c * np.sqrt(d) + 3.0) * amax
    rel = 2.0 * (ds + 3e-7 + 4 * EPS32) + EPS32 * (c * np.sqrt(np.maximum(nvis, 1)) + 8.0)
    if bf16_inputs:  # against fp32 originals, see the module docstring
        rel = rel + 2.0 * 2.0**-8 * amax + 2.0**-9
    return rel * mag


def mismatch(got, ref_tuple, d, isa, bf16_inputs=False):
    """(worst err/tol ratio, message); ratio <= 1 passes."""
    ref, mag, amax, nvis = ref_tuple
    got = np.asarray(got)
    if got.dtype != np.float32:
        return np.inf, f"dtype {got.dtype}"
    if got.shape != ref.shape:
        return np.inf, f"shape {got.shape}, expected {ref.shape}"
    if got.size == 0:
        return 0.0, ""
    err = np.abs(got.astype(np.float64) - ref)
    tol = attention_tolerance(mag, amax, nvis, d, isa, bf16_inputs)
    ratio = np.where(err == 0, 0.0, err / np.maximum(tol, 1e-300))
    ratio = np.where(np.isnan(got), np.inf, ratio)
    idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    worst = float(ratio[idx])
    return worst, (f"worst at {idx}: got {got[idx]!r}, expected {ref[idx]!r}, "
                   f"|err| {err[idx]:.3g}, tol {tol[idx]:.3g}")


def assert_close(got, ref_tuple, d, isa=None, bf16_inputs=False):
    worst, msg = mismatch(got, ref_tuple, d, isa or current_isa(), bf16_inputs)
    assert worst <= 1.0, msg


def randn(rng, shape, dtype=np.float32, scale=1.0):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return x.astype(dtype) if dtype != np.float32 else x


def paged_copy(rng, kc, vc, lens, block_size, extra_blocks=3):
    """Scatter a contiguous cache (B, Hkv, S, D) into random physical blocks."""
    b, hkv, s, d = kc.shape
    mb = -(-s // block_size)
    nblk = b * mb + extra_blocks
    table = rng.permutation(nblk)[: b * mb].reshape(b, mb).astype(np.int32)
    kp = np.zeros((nblk, hkv, block_size, d), kc.dtype)
    vp = np.zeros_like(kp)
    # unused slots hold NaN: a read past kv_lens would show in the output
    kp[...] = np.nan
    vp[...] = np.nan
    for bi in range(b):
        for i in range(mb):
            lo, hi = i * block_size, min(s, (i + 1) * block_size)
            kp[table[bi, i], :, : hi - lo] = kc[bi, :, lo:hi]
            vp[table[bi, i], :, : hi - lo] = vc[bi, :, lo:hi]
    for bi in range(b):  # table entries past kv_lens may be garbage (vLLM pads)
        used = -(-int(lens[bi]) // block_size)
        table[bi, used:] = -7
    return kp, vp, table


# ---------------------------------------------------------------------------
# A batch of cases: run in-process, and per ISA in subprocesses
# ---------------------------------------------------------------------------

CASES = [
    # (B, Hq, Hkv, Sq, Skv, D, causal, lens, dtype)
    (1, 1, 1, 1, 1, 8, False, None, "fp32"),
    (2, 4, 2, 5, 37, 32, True, "rand", "fp32"),
    (1, 8, 1, 70, 150, 64, True, None, "fp32"),      # MQA, causal Sq < Skv
    (2, 8, 8, 1, 600, 128, False, "rand", "fp32"),    # decode-like MHA, split-KV
    (1, 4, 4, 33, 33, 17, True, "rand", "fp32"),      # odd D
    (1, 2, 1, 3, 300, 200, False, None, "bf16"),      # D = 200, bf16
    (2, 16, 2, 9, 257, 80, True, "rand", "bf16"),     # GQA 8, D = 80
    (1, 6, 3, 130, 130, 96, False, "rand", "fp32"),   # 2 query tiles, D = 96
    (3, 4, 4, 1, 700, 64, False, "rand", "bf16"),
]


def run_case(case, variant, isa, seed=0):
    b, hq, hkv, sq, skv, d, causal, lens, dt = case
    rng = np.random.default_rng(seed)
    dtype = BF16 if dt == "bf16" else np.float32
    q = randn(rng, (b, hq, sq, d), dtype)
    k = randn(rng, (b, hkv, skv, d), dtype)
    v = randn(rng, (b, hkv, skv, d), dtype)
    kv_lens = None
    if lens == "rand":
        kv_lens = rng.integers(0, skv + 1, b)
        kv_lens[0] = skv
    got = pk.attention(q, k, v, causal=causal, kv_lens=kv_lens, variant=variant)
    return mismatch(got, reference(q, k, v, causal=causal, kv_lens=kv_lens), d, isa)


def isa_batch() -> dict:
    """Every case x variant, plus decode (contiguous, paged) and exp2, on the
    ISA of this process. Returns {label: [worst ratio, message]}."""
    isa = current_isa()
    res = {}
    for n, case in enumerate(CASES):
        for var in VARIANTS:
            worst, msg = run_case(case, var, isa, seed=n)
            res[f"attention-{n}-{var}"] = [worst, msg]
    rng = np.random.default_rng(1)
    for dt in ("fp32", "bf16"):
        dtype = BF16 if dt == "bf16" else np.float32
        b, hq, hkv, s, d = 3, 8, 2, 300, 64
        q = randn(rng, (b, hq, d), dtype)
        kc, vc = randn(rng, (b, hkv, s, d), dtype), randn(rng, (b, hkv, s, d), dtype)
        lens = np.array([300, 17, 0])
        ref = reference(q[:, :, None], kc, vc, kv_lens=lens)
        ref = tuple(x[:, :, 0] for x in ref)
        kp, vp, table = paged_copy(rng, kc, vc, lens, 16)
        for var in VARIANTS:
            got = pk.decode_attention(q, kc, vc, lens, variant=var)
            res[f"decode-{dt}-{var}"] = list(mismatch(got, ref, d, isa))
            got_p = pk.decode_attention(q, kp, vp, lens, block_table=table, variant=var)
            res[f"paged-{dt}-{var}"] = [0.0 if np.array_equal(got, got_p) else np.inf,
                                        "paged differs from contiguous"]
    res["exp2"] = [exp2_max_rel_error() / EXP2_MAX_REL[isa], "exp2 relative error"]
    return res


def exp2_max_rel_error() -> float:
    x = np.linspace(-126.0, 0.0, 1 << 21, dtype=np.float32)
    x = np.concatenate([x, -np.linspace(0, 1, 4097, dtype=np.float32)])
    y = pk._core.attention_exp2(x).astype(np.float64)
    ref = np.exp2(x.astype(np.float64))
    return float(np.max(np.abs(y - ref) / ref))


def _subprocess_env(isa):
    env = dict(os.environ)
    env["PYKERNELS_ISA"] = isa
    path = [REPO_ROOT, TESTS_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _run_batch_in(isa):
    code = ("import json, test_attention as t; "
            "print(json.dumps(t.isa_batch()))")
    proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(isa), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"PYKERNELS_ISA={isa} subprocess exited {proc.returncode}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_every_isa_every_variant(isa):
    """The case batch, both variants, decode (contiguous = paged) and exp2 on each ISA."""
    if isa not in supported_isas():
        pytest.skip(f"this CPU supports up to {supported_isas()[-1]!r}")
    res = isa_batch() if isa == current_isa() else _run_batch_in(isa)
    bad = {k: v for k, v in res.items() if not (v[0] <= 1.0)}
    assert not bad, f"{isa}: {bad}"


def test_same_results_across_isas():
    """The generic path is the oracle: every ISA agrees with it to the bound."""
    isas = supported_isas()
    if len(isas) < 2:
        pytest.skip("only one ISA on this machine")
    code = ("import json, numpy as np, pykernels as pk, test_attention as t\n"
            "rng = np.random.default_rng(5)\n"
            "q = t.randn(rng, (2, 8, 20, 64)); k = t.randn(rng, (2, 2, 90, 64)); "
            "v = t.randn(rng, (2, 2, 90, 64))\n"
            "o = pk.attention(q, k, v, causal=True, kv_lens=np.array([90, 40]), variant='throughput')\n"
            "print(json.dumps(o.ravel().tolist()))")
    outs = {}
    for isa in isas:
        proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(isa),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[isa] = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    for isa in isas[1:]:
        np.testing.assert_allclose(outs[isa], outs["generic"], rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------
# In-process: masks, GQA, head dims, decode, numerics
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask", ["padding", "causal_sq_lt_skv", "causal_padding",
                                  "causal_square"])
def test_masks(variant, mask):
    rng = np.random.default_rng(11)
    b, hq, hkv, sq, skv, d = 3, 4, 2, 24, 80, 32
    if mask == "causal_square":
        sq = skv
    q, k, v = randn(rng, (b, hq, sq, d)), randn(rng, (b, hkv, skv, d)), randn(rng, (b, hkv, skv, d))
    causal = mask.startswith("causal")
    lens = np.array([80, 50, 7]) if mask in ("padding", "causal_padding") else None
    got = pk.attention(q, k, v, causal=causal, kv_lens=lens, variant=variant)
    assert_close(got, reference(q, k, v, causal=causal, kv_lens=lens), d)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fully_masked_rows_are_zero(variant):
    """Causal with Sq > L_b: the first Sq - L_b rows see no key; L_b = 0 sees none."""
    rng = np.random.default_rng(3)
    b, h, sq, skv, d = 3, 2, 12, 12, 16
    q, k, v = randn(rng, (b, h, sq, d)), randn(rng, (b, h, skv, d)), randn(rng, (b, h, skv, d))
    lens = np.array([12, 5, 0])
    got = pk.attention(q, k, v, causal=True, kv_lens=lens, variant=variant)
    assert np.isfinite(got).all()
    assert not got[1, :, : sq - 5].any()  # rows 0..6 of batch 1 see nothing
    assert not got[2].any()
    assert_close(got, reference(q, k, v, causal=True, kv_lens=lens), d)
    # padding to zero keys (non-causal) and Skv = 0
    z = pk.attention(q, k, v, kv_lens=np.array([0, 0, 0]), variant=variant)
    assert not z.any() and np.isfinite(z).all()
    e = pk.attention(q, k[:, :, :0], v[:, :, :0], variant=variant)
    assert e.shape == q.shape and not e.any()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 4), (8, 2), (16, 2), (8, 1)],
                         ids=["mha", "gqa2", "gqa4", "gqa8", "mqa"])
def test_gqa(variant, hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    b, sq, skv, d = 2, 19, 150, 64
    q, k, v = randn(rng, (b, hq, sq, d)), randn(rng, (b, hkv, skv, d)), randn(rng, (b, hkv, skv, d))
    lens = np.array([150, 93])
    got = pk.attention(q, k, v, causal=True, kv_lens=lens, variant=variant)
    assert_close(got, reference(q, k, v, causal=True, kv_lens=lens), d)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 17, 200, 256, 1])
def test_head_dims(d, dtype):
    rng = np.random.default_rng(d)
    dt = BF16 if dtype == "bf16" else np.float32
    q, k, v = randn(rng, (1, 4, 20, d), dt), randn(rng, (1, 2, 70, d), dt), randn(rng, (1, 2, 70, d), dt)
    for variant in VARIANTS:
        got = pk.attention(q, k, v, causal=True, variant=variant)
        assert_close(got, reference(q, k, v, causal=True), d)
    qd = q[:, :, 0]
    got = pk.decode_attention(qd, k, v, np.array([53]))
    ref = tuple(x[:, :, 0] for x in reference(qd[:, :, None], k, v, kv_lens=[53]))
    assert_close(got, ref, d)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 7])
def test_decode_paged_equals_contiguous(variant, dtype, block_size):
    rng = np.random.default_rng(block_size)
    dt = BF16 if dtype == "bf16" else np.float32
    b, hq, hkv, s, d = 4, 8, 2, 200, 64
    q = randn(rng, (b, hq, d), dt)
    kc, vc = randn(rng, (b, hkv, s, d), dt), randn(rng, (b, hkv, s, d), dt)
    lens = np.array([200, 1, 77, 128])
    got = pk.decode_attention(q, kc, vc, lens, variant=variant)
    ref = tuple(x[:, :, 0] for x in reference(q[:, :, None], kc, vc, kv_lens=lens))
    assert_close(got, ref, d)
    kp, vp, table = paged_copy(rng, kc, vc, lens, block_size)
    got_p = pk.decode_attention(q, kp, vp, lens, block_table=table, variant=variant)
    np.testing.assert_array_equal(got_p, got)  # same keys, same order, same arithmetic


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_long_split_kv(variant):
    """One sequence, MQA: the latency variant splits 3000 keys across threads."""
    rng = np.random.default_rng(8)
    q = randn(rng, (1, 4, 128))
    kc, vc = randn(rng, (1, 1, 3000, 128)), randn(rng, (1, 1, 3000, 128))
    for threads in (1, 2, 3):
        got = pk.decode_attention(q, kc, vc, np.array([2999]), variant=variant, threads=threads)
        ref = tuple(x[:, :, 0] for x in reference(q[:, :, None], kc, vc, kv_lens=[2999]))
        assert_close(got, ref, 128)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_against_fp32_inputs(variant):
    """bf16 inputs vs the fp32 originals: the bf16 rounding bound (docstring)."""
    rng = np.random.default_rng(21)
    q, k, v = randn(rng, (2, 8, 16, 128)), randn(rng, (2, 2, 300, 128)), randn(rng, (2, 2, 300, 128))
    lens = np.array([300, 111])
    ref = reference(q, k, v, causal=True, kv_lens=lens)  # fp32 originals
    got = pk.attention(q.astype(BF16), k.astype(BF16), v.astype(BF16), causal=True, kv_lens=lens,
                       variant=variant)
    assert_close(got, ref, 128, bf16_inputs=True)
    # mixed: fp32 queries over a bf16 cache
    got2 = pk.attention(q, k.astype(BF16), v.astype(BF16), causal=True, kv_lens=lens, variant=variant)
    assert_close(got2, ref, 128, bf16_inputs=True)
    assert_close(got2, reference(q, k.astype(BF16), v.astype(BF16), causal=True, kv_lens=lens), 128)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("magnitude", [1e3, 3e4])
def test_logits_in_the_thousands(variant, magnitude):
    """Logits of +-1000s (and +-30000s): finite, within the bound, max-subtracted."""
    rng = np.random.default_rng(4)
    d = 64
    q = randn(rng, (2, 4, 10, d), scale=np.sqrt(magnitude))
    k = randn(rng, (2, 2, 300, d), scale=np.sqrt(magnitude))
    v = randn(rng, (2, 2, 300, d))
    got = pk.attention(q, k, v, scale=1.0 / np.sqrt(d), causal=True, kv_lens=np.array([300, 5]),
                       variant=variant)
    assert np.isfinite(got).all()
    ref = reference(q, k, v, causal=True, kv_lens=np.array([300, 5]))
    assert np.abs(ref[0]).max() > 0.1
    assert_close(got, ref, d)


def test_exp2_accuracy():
    """The vectorized 2^x: max relative error over [-126, 0] as stated in the .inc."""
    err = exp2_max_rel_error()
    assert err <= EXP2_MAX_REL[current_isa()], err
    x = np.array([0.0, -1.0, -0.5, -126.0, -126.6, -127.0, -200.0, -np.inf, np.nan], np.float32)
    y = pk._core.attention_exp2(x)
    assert y[0] == 1.0 and y[1] == 0.5
    assert y[5] == 0.0 and y[6] == 0.0 and y[7] == 0.0  # flush below 2^-126.5; -inf -> 0
    assert np.isnan(y[8])


def test_nan_propagates():
    rng = np.random.default_rng(6)
    q, k, v = randn(rng, (1, 2, 4, 32)), randn(rng, (1, 2, 20, 32)), randn(rng, (1, 2, 20, 32))
    q[0, 1, 2, 5] = np.nan
    for variant in VARIANTS:
        got = pk.attention(q, k, v, variant=variant)
        assert np.isnan(got[0, 1, 2]).all()
        assert np.isfinite(np.delete(got.reshape(8, 32), 6, axis=0)).all()


def test_views_scale_and_out():
    """Strided views (a (B, S, H, D) layout transposed), explicit scale, out=,
    read-only inputs, and an out that aliases q (computed as NumPy would)."""
    rng = np.random.default_rng(9)
    b, s, h, d = 2, 30, 4, 32
    qs = randn(rng, (b, s, h, d))
    ks = randn(rng, (b, s + 5, 2, d))
    vs = randn(rng, (b, s + 5, 2, d))
    q, k, v = qs.transpose(0, 2, 1, 3), ks.transpose(0, 2, 1, 3)[:, :, ::-1], vs.transpose(0, 2, 1, 3)[:, :, ::-1]
    for x in (q, k, v):
        x.flags.writeable = False
    ref = reference(q, k, v, causal=True, scale=0.3)
    for variant in VARIANTS:
        out = np.full((b, s, h, d), 7.0, np.float32).transpose(0, 2, 1, 3)
        res = pk.attention(q, k, v, causal=True, scale=0.3, out=out, variant=variant)
        assert res is out
        assert_close(out, ref, d)
    qq = np.ascontiguousarray(q)
    want = pk.attention(qq, k, v, causal=True)
    res = pk.attention(qq, k, v, causal=True, out=qq)  # out aliases q
    assert res is qq
    np.testing.assert_array_equal(qq, want)


def test_threads_and_variants_agree():
    rng = np.random.default_rng(13)
    q, k, v = randn(rng, (2, 8, 40, 64)), randn(rng, (2, 2, 400, 64)), randn(rng, (2, 2, 400, 64))
    ref = reference(q, k, v, causal=True)
    for variant in VARIANTS + ("auto",):
        for threads in (1, 2, 4):
            got = pk.attention(q, k, v, causal=True, variant=variant, threads=threads)
            assert_close(got, ref, 64)
    # one head, one sequence: the query tile is cut so every thread gets tasks
    q1, k1, v1 = q[:1, :1], k[:1, :1], v[:1, :1]
    ref1 = reference(q1, k1, v1, causal=True, kv_lens=[333])
    for variant in VARIANTS:
        for threads in (2, 8):
            got = pk.attention(q1, k1, v1, causal=True, kv_lens=np.array([333]), variant=variant,
                               threads=threads)
            assert_close(got, ref1, 64)


def test_concurrent_calls():
    """Python threads calling at once get exactly their serial results."""
    rng = np.random.default_rng(17)
    jobs = []
    for n in range(6):
        sq = 1 if n % 2 else 33
        q = randn(rng, (2, 8, sq, 64), BF16 if n % 3 == 0 else np.float32)
        k = randn(rng, (2, 4, 500 + 37 * n, 64))
        v = randn(rng, (2, 4, 500 + 37 * n, 64))
        lens = np.array([500 + 37 * n, 100 + n])
        variant = VARIANTS[n % 2]
        jobs.append((q, k, v, lens, variant))
    serial = [pk.attention(q, k, v, causal=True, kv_lens=lens, variant=var, threads=2)
              for q, k, v, lens, var in jobs]
    errors = []

    def worker(i):
        try:
            for _ in range(8):
                q, k, v, lens, var = jobs[i]
                got = pk.attention(q, k, v, causal=True, kv_lens=lens, variant=var, threads=2)
                if not np.array_equal(got, serial[i]):
                    errors.append(f"job {i} differs")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_registry():
    entries = [e for e in pk.kernels() if e.op in ("attention", "decode_attention")]
    keys = {(e.op, e.variant, e.precision) for e in entries}
    assert keys == {(op, var, prec) for op in ("attention", "decode_attention")
                    for var in VARIANTS for prec in ("fp32", "bf16")}
    isa = current_isa()
    names = {e.name for e in entries}
    assert f"attention_{isa}_f32_flash" in names
    assert f"decode_attention_{isa}_bf16_splitkv" in names
    assert all(e.isa == isa for e in entries)


def test_auto_asks_the_policy_chooser(monkeypatch, request):
    from pykernels import _attention, _gemm

    calls, threads_run = [], []

    def chooser(call):
        calls.append(call)
        return "throughput", 1

    class Core:  # records the thread count each kernel call runs with
        def __getattr__(self, name):
            return getattr(_gemm._core, name)

        def attention(self, *a):
            threads_run.append(a[-1])
            return _gemm._core.attention(*a)

        def decode_attention(self, *a):
            threads_run.append(a[-1])
            return _gemm._core.decode_attention(*a)

    monkeypatch.setattr(_attention, "_core", Core())
    prev = pk.set_variant_chooser(chooser)
    request.addfinalizer(lambda: pk.set_variant_chooser(prev))
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, (2, 4, 3, 32)), randn(rng, (2, 2, 50, 32)), randn(rng, (2, 2, 50, 32))
    ref = pk.attention(q, k, v, variant="latency")
    np.testing.assert_allclose(pk.attention(q, k, v), ref, rtol=1e-5, atol=1e-6)
    pk.decode_attention(q[:, :, 0], k.astype(BF16), v.astype(BF16), np.array([50, 20]))
    pk.attention(q, k, v, threads=2)  # the caller's threads stand
    att = dict(batch=2, q_heads=4, kv_heads=2, kv_len=50, head_dim=32)
    assert calls == [pk.KernelCall("attention", "fp32", None, q_len=3, **att),
                     pk.KernelCall("decode_attention", "bf16", None, q_len=1, **att),
                     pk.KernelCall("attention", "fp32", 2, q_len=3, **att)]
    # threads=0 is the binding's "default"; the policy's 1 replaced it, the caller's 2 stood
    assert threads_run == [0, 1, 1, 2]


def test_empty_dimensions():
    f = np.float32
    out = pk.attention(np.zeros((0, 4, 3, 8), f), np.zeros((0, 2, 5, 8), f), np.zeros((0, 2, 5, 8), f))
    assert out.shape == (0, 4, 3, 8) and out.dtype == np.float32
    out = pk.attention(np.zeros((1, 4, 0, 8), f), np.zeros((1, 2, 5, 8), f), np.zeros((1, 2, 5, 8), f))
    assert out.shape == (1, 4, 0, 8)
    out = pk.attention(np.zeros((1, 4, 3, 0), f), np.zeros((1, 2, 5, 0), f), np.zeros((1, 2, 5, 0), f))
    assert out.shape == (1, 4, 3, 0)
    out = pk.decode_attention(np.zeros((0, 4, 8), f), np.zeros((0, 2, 5, 8), f),
                              np.zeros((0, 2, 5, 8), f), np.zeros(0, np.int64))
    assert out.shape == (0, 4, 8)


# ---------------------------------------------------------------------------
# Bad input: clear errors, nothing read out of bounds, inputs untouched
# ---------------------------------------------------------------------------

def _qkv(rng=None, b=2, hq=4, hkv=2, sq=3, skv=10, d=16):
    rng = rng or np.random.default_rng(0)
    return randn(rng, (b, hq, sq, d)), randn(rng, (b, hkv, skv, d)), randn(rng, (b, hkv, skv, d))


def test_bad_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"float64.*astype\(np.float32\)"):
        pk.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="float16"):
        pk.attention(q, k.astype(np.float16), v.astype(np.float16))
    with pytest.raises(TypeError, match="share one dtype"):
        pk.attention(q, k, v.astype(BF16))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        pk.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="kv_lens"):
        pk.attention(q, k, v, kv_lens=np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="int32"):
        pk.decode_attention(q[:, :, 0], k, v, np.array([3, 3]), block_table=np.zeros((2, 1), np.float32))


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 16\).*\(2, 3, 10, 16\)"):
        pk.attention(q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))  # 4 % 3
    with pytest.raises(ValueError, match=r"k \(2, 2, 10, 16\) and v \(2, 2, 9, 16\)"):
        pk.attention(q, k, v[:, :, :9])
    with pytest.raises(ValueError, match=r"batch sizes.*\(2, 4, 3, 16\).*\(1, 2, 10, 16\)"):
        pk.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="head dims"):
        pk.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="4-D"):
        pk.attention(q[0], k, v)
    big = np.zeros((1, 1, 2, 300), np.float32)
    with pytest.raises(ValueError, match="D = 300"):
        pk.attention(big, big, big)
    with pytest.raises(ValueError, match="unit stride"):
        pk.attention(q[..., ::2], k[..., ::2], v[..., ::2])


def test_bad_kv_lens():
    q, k, v = _qkv()
    for lens in ([3, 11], [-1, 4]):
        with pytest.raises(ValueError, match=r"kv_lens\[\d\] = -?\d+ is outside \[0, 10\]"):
            pk.attention(q, k, v, kv_lens=np.array(lens))
    with pytest.raises(ValueError, match=r"kv_lens has shape \(3,\)"):
        pk.attention(q, k, v, kv_lens=np.array([1, 2, 3]))
    qd = q[:, :, 0]
    with pytest.raises(ValueError, match=r"outside \[0, 10\]"):
        pk.decode_attention(qd, k, v, np.array([10, 11]))


def test_out_of_range_block_ids_are_rejected():
    """Every block id covering [0, kv_lens[b]) is checked before any read."""
    rng = np.random.default_rng(0)
    b, hq, hkv, d, bs, nblk = 2, 4, 2, 16, 4, 6
    q = randn(rng, (b, hq, d))
    kp, vp = randn(rng, (nblk, hkv, bs, d)), randn(rng, (nblk, hkv, bs, d))
    table = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    lens = np.array([12, 9])
    before = [x.copy() for x in (q, kp, vp, table)]
    ok = pk.decode_attention(q, kp, vp, lens, block_table=table)
    assert np.isfinite(ok).all()
    for bad in (6, 1 << 30, -1, -(1 << 31)):
        t = table.copy()
        t[1, 2] = bad  # covers keys 8..11 of sequence 1 (kv_lens 9)
        with pytest.raises(ValueError, match=rf"block_table\[1, 2\] = {bad} .*\[0, 6\)"):
            pk.decode_attention(q, kp, vp, lens, block_table=t)
    # entries past kv_lens are never read, so they may hold anything
    t = table.copy()
    t[1, 2] = 99
    got = pk.decode_attention(q, kp, vp, np.array([12, 8]), block_table=t)
    assert np.isfinite(got).all()
    # kv_lens beyond what the table can address
    with pytest.raises(ValueError, match=r"kv_lens\[0\] = 13 .*max_blocks \* block_size"):
        pk.decode_attention(q, kp, vp, np.array([13, 1]), block_table=table)
    with pytest.raises(ValueError, match="kv_lens is required"):
        pk.decode_attention(q, kp, vp, None, block_table=table)
    with pytest.raises(ValueError, match="block_table has shape"):
        pk.decode_attention(q, kp, vp, lens, block_table=table[:1])
    for x, y in zip(before, (q, kp, vp, table)):
        np.testing.assert_array_equal(x, y)


def test_bad_out_variant_threads():
    q, k, v = _qkv()
    before = [x.copy() for x in (q, k, v)]
    with pytest.raises(ValueError, match=r"out has shape \(2, 4, 3, 8\), expected \(2, 4, 3, 16\)"):
        pk.attention(q, k, v, out=np.zeros((2, 4, 3, 8), np.float32))
    with pytest.raises(ValueError, match="out has dtype float64"):
        pk.attention(q, k, v, out=np.zeros(q.shape))
    ro = np.zeros(q.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pk.attention(q, k, v, out=ro)
    with pytest.raises(ValueError, match="unit stride"):
        pk.attention(q, k, v, out=np.zeros(q.shape[:-1] + (32,), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="variant"):
        pk.attention(q, k, v, variant="fast")
    with pytest.raises(ValueError, match="threads"):
        pk.attention(q, k, v, threads=0)
    with pytest.raises(ValueError, match=r"out has shape"):
        pk.decode_attention(q[:, :, 0], k, v, None, out=np.zeros((2, 4, 15), np.float32))
    for x, y in zip(before, (q, k, v)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# The AVX-512 unit under SIMDe: the real attention_avx512.cc, on any x86-64
# ---------------------------------------------------------------------------

EMU_SOURCES = ["tests/native/attention_avx512_simde.cc", "csrc/kernels/avx512/attention_avx512.cc",
               "csrc/runtime/threadpool.cc", "csrc/runtime/workspace.cc", "csrc/runtime/cpu.cc"]
EMU_DEPS = ["tests/native/simde_shim/immintrin.h", "csrc/kernels/common/attention_impl.inc",
            "csrc/kernels/common/attention_tiles.inc",
            "csrc/kernels/common/attention_varlen.inc", "csrc/include/pykernels/encoder.h",
            "csrc/kernels/avx512/vec_avx512.inc",
            "csrc/kernels/avx512/attention_avx512_tiles.h",
            "csrc/include/pykernels/attention.h", "csrc/include/pykernels/runtime.h",
            "csrc/include/pykernels/prefetch.h"]


def _emu_binary():
    """The driver over the AVX-512 attention unit compiled against SIMDe (~15 s
    to build at -O0); SIMDe comes with the test extra (simde-py)."""
    simde_py = pytest.importorskip("simde_py", reason="simde-py (the test extra) provides SIMDe")
    return build_native_driver(
        "attention_avx512_simde", EMU_SOURCES, EMU_DEPS, flags=("-O0", "-w"),
        include_dirs=(os.path.join(REPO_ROOT, "tests", "native", "simde_shim"),
                      simde_py.get_include()))


EMU_CASES = [
    # (B, Hq, Hkv, Sq, Skv, D, causal, lens, variant, threads, bf16, big caches)
    (2, 4, 2, 5, 37, 32, True, True, "latency", 2, False, False),
    (1, 8, 1, 70, 150, 64, True, False, "throughput", 2, False, False),   # 4-vector score tile
    (1, 8, 1, 70, 150, 64, True, False, "throughput", 1, False, True),    # 48 KiB / 2 MiB plan
    (2, 8, 8, 1, 600, 128, False, True, "latency", 2, False, False),      # dot 1x8, split-KV
    (2, 16, 4, 1, 300, 80, False, True, "throughput", 2, True, False),    # dot 4x4, D = 5 zmm
    (1, 4, 4, 33, 33, 17, True, True, "throughput", 1, False, False),     # D pads to 32
    (1, 6, 3, 130, 130, 96, False, True, "latency", 2, False, False),     # D = 6 zmm
    (1, 2, 1, 3, 300, 200, False, False, "latency", 1, True, False),      # D = 200 -> 208
    (1, 32, 4, 9, 200, 128, True, False, "throughput", 2, True, True),    # G=8: 64- and 8-row tiles
]


def test_avx512_unit_under_simde(tmp_path):
    exe = _emu_binary()
    for n, (b, hq, hkv, sq, skv, d, causal, has_lens, variant, threads, bf16, big) in enumerate(EMU_CASES):
        rng = np.random.default_rng(100 + n)
        dt = BF16 if bf16 else np.float32
        q, k, v = randn(rng, (b, hq, sq, d), dt), randn(rng, (b, hkv, skv, d), dt), randn(rng, (b, hkv, skv, d), dt)
        lens = None
        if has_lens:
            lens = rng.integers(0, skv + 1, b).astype(np.int64)
            lens[0] = skv
            lens.tofile(tmp_path / "lens.bin")
        for name, x in (("q", q), ("k", k), ("v", v)):
            np.ascontiguousarray(x).view(np.uint16 if bf16 else np.float32).tofile(tmp_path / f"{name}.bin")
        args = [exe] + [str(int(x)) for x in (b, hq, hkv, sq, skv, d, causal, has_lens,
                                              VARIANTS.index(variant), threads, bf16)] + [str(tmp_path)]
        env = dict(os.environ)
        env.pop("EMU_BIG_CACHES", None)
        if big:
            env["EMU_BIG_CACHES"] = "1"
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, f"case {n}: {proc.stderr[-2000:]}"
        got = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(q.shape)
        worst, msg = mismatch(got, reference(q, k, v, causal=causal, kv_lens=lens), d, "avx512")
        assert worst <= 1.0, f"case {n} {EMU_CASES[n]}: {msg}"
