"""`pykernels bench attention`: a --quick run with a tiny budget through the
command line (a subprocess, as a user runs it), checking the table and the
--json structure; usage errors. No timing is asserted: timings live in bench/.
The float64 reference and the NumPy baseline the bench checks against are
tested here against each other on the mask rules (padding, causal, GQA).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_cli import run

OURS = {(p, v, lay) for p in ("fp32", "bf16") for v in ("latency", "throughput")
        for lay in ("contiguous", "paged")}


def test_bench_attention_quick_table_and_json(tmp_path):
    from pykernels.harness.attention import ATTENTION_QUICK

    out = tmp_path / "attn.json"
    r = run("-m", "pykernels", "bench", "attention", "--quick", "--budget", "0.005",
            "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WRONG" not in r.stdout and "ERROR" not in r.stdout, r.stdout
    for needle in ("load average", "torch/x", "NumPy/x", "GB/s", "best of pykernels",
                   "fp32 latency contiguous", "bf16 throughput paged", "numpy fp32"):
        assert needle in r.stdout, needle
    for s in ATTENTION_QUICK:
        # one row in the per-case table, one in the summary
        assert len([ln for ln in r.stdout.splitlines() if ln.startswith(s.label)]) == 2, s.label

    doc = json.loads(out.read_text())
    assert doc["suite"] == "attention" and doc["quick"] is True
    for key in ("machine", "cpu_info", "git_commit", "results", "summary", "targets",
                "threads", "load_average", "rel_tol", "block_size"):
        assert key in doc, key
    assert doc["targets"] == []  # the quick shapes are not the target shapes
    recs = doc["results"]
    kinds = {rec["kind"] for rec in recs}
    assert kinds == {"decode", "causal", "padded"}
    decode_ours = {(rec["precision"], rec["variant"], rec["layout"]) for rec in recs
                   if rec["impl"] == "pykernels" and rec["kind"] == "decode"}
    assert decode_ours == OURS
    prefill_ours = {(rec["precision"], rec["variant"], rec["layout"]) for rec in recs
                    if rec["impl"] == "pykernels" and rec["kind"] != "decode"}
    assert prefill_ours == {(p, v, None) for p in ("fp32", "bf16")
                            for v in ("latency", "throughput")}
    assert ("numpy", "fp32") in {(rec["impl"], rec["precision"]) for rec in recs}
    for rec in recs:
        assert rec["threads"] == doc["threads"]
        assert rec["ok"], rec
        assert rec["rel_error"] <= rec["rel_tol"]
        assert rec["median_s"] > 0 and rec["gflops"] > 0 and rec["flops"] > 0
        assert ("gbytes_per_s" in rec) == (rec["kind"] == "decode")
        if rec["kind"] == "padded":
            assert len(rec["kv_lens"]) == rec["b"] and len(set(rec["kv_lens"])) > 1
        if rec["impl"] == "torch":  # only when torch is importable
            assert doc["torch_version"] is not None
    assert len(doc["summary"]) == len(ATTENTION_QUICK)
    for e in doc["summary"]:
        assert e["best"]["fp32"]["median_s"] > 0 and e["best"]["bf16"]["median_s"] > 0
        assert e["bf16_vs_fp32"] > 0
        assert e["baselines"]["numpy fp32"]["ratio"] > 0
        assert (e["kind"] == "decode") == bool(e["paged"])


def test_bench_attention_filters(tmp_path):
    """--kinds, --precisions, --no-paged, --no-baselines and --threads narrow the run."""
    out = tmp_path / "attn.json"
    r = run("-m", "pykernels", "bench", "attention", "--quick", "--budget", "0.005",
            "--kinds", "decode", "--precisions", "bf16", "--no-paged", "--no-baselines",
            "--threads", "1", "--block-size", "7", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert {(rec["impl"], rec["kind"], rec["precision"], rec["layout"], rec["threads"])
            for rec in doc["results"]} == {("pykernels", "decode", "bf16", "contiguous", 1)}
    assert len(doc["results"]) == 2  # latency and throughput


@pytest.mark.parametrize("argv, needle", [
    (["--kinds", "decode,bogus"], "bad kind 'bogus'"),
    (["--precisions", "int8"], "bad precision 'int8'"),
    (["--threads", "0"], "--threads"),
    (["--block-size", "0"], "--block-size"),
], ids=["bad-kind", "bad-precision", "bad-threads", "bad-block-size"])
def test_bench_attention_usage_errors(argv, needle):
    r = run("-m", "pykernels", "bench", "attention", "--quick", *argv)
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("causal, padded, hq, hkv, sq, skv", [
    (False, False, 4, 4, 5, 9), (True, False, 4, 2, 7, 7), (True, False, 8, 2, 3, 11),
    (False, True, 6, 6, 8, 8), (True, True, 4, 1, 4, 10),
], ids=["full", "causal-gqa2", "causal-chunk-gqa4", "padded", "causal-padded-mqa"])
def test_numpy_baseline_matches_reference(causal, padded, hq, hkv, sq, skv):
    """The NumPy baseline (grouped heads, additive mask) and the float64 oracle
    agree, including a causal row that sees no key (zeros)."""
    from pykernels.harness.attention import numpy_attention
    from pykernels.testing import attention_ref64

    rng = np.random.default_rng(1)
    b, d = 3, 16
    q = rng.standard_normal((b, hq, sq, d))
    k = rng.standard_normal((b, hkv, skv, d))
    v = rng.standard_normal((b, hkv, skv, d))
    lens = np.array([skv, 1, skv // 2]) if padded else None
    ref = attention_ref64(q, k, v, causal=causal, kv_lens=lens)
    got = numpy_attention(q, k, v, causal=causal, kv_lens=lens)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # a direct per-head loop with np.repeat'ed K/V
    g = hq // hkv
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    for bi in range(b):
        L = skv if lens is None else lens[bi]
        for h in range(hq):
            s = q[bi, h] @ kr[bi, h, :L].T / np.sqrt(d)
            if causal:
                s[np.arange(L)[None, :] > np.arange(sq)[:, None] + L - sq] = -np.inf
            for i in range(sq):
                row = s[i]
                if np.all(np.isinf(row)):
                    np.testing.assert_array_equal(ref[bi, h, i], 0.0)
                    continue
                p = np.exp(row - row.max())
                np.testing.assert_allclose(ref[bi, h, i], p @ vr[bi, h, :L] / p.sum(),
                                           rtol=1e-10, atol=1e-12)


def test_targets_are_read_from_the_summary():
    """The attention target lines take the ratio of the matching summary entry:
    baseline / ours for torch, our fp32 / our bf16 for 'bf16 vs fp32'."""
    from pykernels.harness.attention import ATTENTION_GOALS
    from pykernels.harness.attention import attention_goals as _attention_goals

    shape = ATTENTION_GOALS[0][0]  # decode B=1 H32/32 L2048
    entry = {"kind": shape.kind, "b": shape.b, "hq": shape.hq, "hkv": shape.hkv,
             "sq": shape.sq, "skv": shape.skv, "d": shape.d, "threads": 2,
             "bf16_vs_fp32": 1.5,
             "baselines": {"torch fp32": {"ratio": 1.2}, "torch bf16": None}}
    goals = _attention_goals([entry])
    assert [(g["compare"], g["target"], g["ratio"], g["met"]) for g in goals] == [
        ("torch fp32", 1.0, 1.2, True), ("bf16 vs fp32", 1.7, 1.5, False)]
    assert all(g["shape"] == shape.label and g["threads"] == 2 for g in goals)
    entry["baselines"]["torch fp32"] = None  # torch not importable: not measured
    assert _attention_goals([entry])[0]["met"] is None
