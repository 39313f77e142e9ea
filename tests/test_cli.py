"""The command line: `pykernels info`, `pykernels bench gemm`, usage errors,
and a smoke run of the pytest-benchmark suites in bench/ (so a broken bench
fails the tests). Each runs in a subprocess, as a user would, with the repo on
PYTHONPATH. No timing is asserted: timings live in bench/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, timeout=300, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.pop("PYKERNELS_ISA", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info_prints_isa_and_registry():
    import pykernels as pk

    r = run("-m", "pykernels", "info")
    assert r.returncode == 0, r.stderr
    isa = pk.cpu_info().isa
    assert f"isa            {isa} in use" in r.stdout
    assert "fork/join" in r.stdout
    for k in pk.kernels():
        assert k.name in r.stdout


def test_info_json():
    r = run("-m", "pykernels", "info", "--json", "--no-fork-join")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cpu_info"]["isa"] in ("avx512", "avx2", "generic")
    assert doc["kernels"] and {"op", "variant", "precision", "isa", "name"} <= set(doc["kernels"][0])


def test_info_peak_reports_measured_rates(tmp_path):
    """`pykernels info --peak`: the fp32 FMA rate and read bandwidth measured on
    this machine, on 1 and on all threads (cached in the user cache dir)."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}  # a fresh cache: this run measures
    r = run("-m", "pykernels", "info", "--peak", "--json", "--no-fork-join", env_extra=env)
    assert r.returncode == 0, r.stderr
    peaks = json.loads(r.stdout)["peaks"]
    assert peaks["ops"]["fp32_fma"]["one_thread"] > 0 and peaks["ops"]["fp32_fma"]["all_threads"] > 0
    assert {"l2", "l3", "dram"} <= set(peaks["read_gbs"])
    r = run("-m", "pykernels", "info", "--peak", "--no-fork-join", env_extra=env)
    assert r.returncode == 0 and "fp32_fma" in r.stdout and "read dram" in r.stdout, r.stderr


def test_info_respects_isa_cap():
    r = run("-m", "pykernels", "info", "--no-fork-join", env_extra={"PYKERNELS_ISA": "generic"})
    assert r.returncode == 0, r.stderr
    assert "isa            generic in use" in r.stdout
    assert "PYKERNELS_ISA=generic" in r.stdout


def test_bench_gemm_quick_table_and_json(tmp_path):
    out = tmp_path / "gemm.json"
    r = run("-m", "pykernels", "bench", "gemm", "--quick", "--shapes", "8x64x64",
            "--budget", "0.02", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NumPy/ours" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("8x64x64")]
    assert len(lines) == 2, r.stdout  # the per-variant table and the summary
    assert "auto raw" in r.stdout
    assert "latency packed" in r.stdout and "latency raw" in r.stdout
    assert "throughput packed" in r.stdout
    assert "WRONG" not in r.stdout and "ERROR" not in r.stdout

    doc = json.loads(out.read_text())
    for key in ("suite", "cpu_info", "git_commit", "numpy_version", "peak_gflops_per_core",
                "results", "summary", "machine"):
        assert key in doc, key
    assert doc["suite"] == "gemm"
    impls = {(r["impl"], r["variant"], r["b"]) for r in doc["results"]}
    assert ("pykernels", "latency", "packed") in impls
    assert ("pykernels", "latency", "raw") in impls
    assert ("pykernels", "throughput", "packed") in impls
    assert ("numpy", None, "raw") in impls
    for rec in doc["results"]:
        assert (rec["m"], rec["k"], rec["n"]) == (8, 64, 64)
        assert rec["ok"], rec
        assert rec["median_s"] > 0 and rec["gflops"] > 0
        assert rec["rel_error"] < 1e-4
    assert doc["summary"][0]["baselines"]["numpy"]["ratio"] > 0


def test_bench_threads_and_pinned_shapes(tmp_path):
    out = tmp_path / "gemm.json"
    r = run("-m", "pykernels", "bench", "gemm", "--quick", "--shapes", "5x33x17@1,5x33x17",
            "--threads", "1", "--budget", "0.01", "--no-baselines", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    # --threads overrides every shape; the duplicate is dropped.
    assert {rec["threads"] for rec in doc["results"]} == {1}
    # one shape x our four cases (auto raw, latency packed and raw, throughput packed)
    assert len(doc["results"]) == 4
    assert {rec["impl"] for rec in doc["results"]} == {"pykernels"}
    assert {rec["variant"] for rec in doc["results"]} == {"auto", "latency", "throughput"}


def test_bench_linear_quick_table_and_json(tmp_path):
    """`pykernels bench linear`: every precision x variant and the NumPy baseline
    on one small shape (K not a multiple of 4, N not of 16), the summary, the
    fused bias+GELU overhead table, and the JSON record; every result correct."""
    out = tmp_path / "linear.json"
    r = run("-m", "pykernels", "bench", "linear", "--quick", "--shapes", "3x70x45",
            "--fused-shape", "8x64x48", "--budget", "0.01", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WRONG" not in r.stdout and "ERROR" not in r.stdout, r.stdout
    for label in ("fp32 latency", "fp32 throughput", "bf16 latency", "bf16 throughput",
                  "int8 latency", "int8 throughput", "int8_7bit latency", "int8_7bit throughput",
                  "numpy fp32"):
        assert label in r.stdout, label
    assert "NumPy/x" in r.stdout and "fused bias+GELU overhead" in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("3x70x45")]) == 2

    doc = json.loads(out.read_text())
    assert doc["suite"] == "linear"
    for key in ("cpu_info", "git_commit", "machine", "results", "summary", "fused", "rel_tol"):
        assert key in doc, key
    ours = {(rec["precision"], rec["variant"]) for rec in doc["results"]
            if rec["impl"] == "pykernels"}
    assert ours == {(p, v) for p in ("fp32", "bf16", "int8", "int8_7bit")
                    for v in ("latency", "throughput")}
    assert ("numpy", "fp32") in {(rec["impl"], rec["precision"]) for rec in doc["results"]}
    for rec in doc["results"]:
        assert (rec["m"], rec["k"], rec["n"], rec["op"]) == (3, 70, 45, "linear")
        if rec["impl"] == "pykernels":
            assert rec["ok"], rec
            assert rec["rel_error"] <= doc["rel_tol"][rec["precision"]]
            assert rec["median_s"] > 0 and rec["gflops"] > 0
    assert doc["summary"][0]["best"]["int8"]["median_s"] > 0
    fused = [f for f in doc["fused"] if f["impl"] == "pykernels"]
    assert len(fused) == 8 and all(f["ok"] and f["ratio"] > 0 for f in fused), fused
    assert {(f["m"], f["k"], f["n"]) for f in fused} == {(8, 64, 48)}


@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice"),
    ([], "usage"),
    (["bench"], "usage"),
    (["bench", "nosuchsuite"], "invalid choice"),
    (["bench", "gemm", "--shapes", "8x64"], "bad shape"),
    (["bench", "gemm", "--threads", "0"], "--threads"),
], ids=["unknown-command", "no-command", "no-suite", "unknown-suite", "bad-shape",
        "bad-threads"])
def test_usage_errors_exit_nonzero(argv, needle):
    r = run("-m", "pykernels", *argv)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr


def test_main_returns_exit_code_without_raising(capsys):
    from pykernels.cli import main

    assert main(["frobnicate"]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_console_script_points_at_main():
    """pyproject's `pykernels` script resolves to cli.main (the installed entry point)."""
    tomllib = pytest.importorskip("tomllib")
    import importlib

    from pykernels.cli import main

    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["pykernels"]
    module, func = spec.split(":")
    assert getattr(importlib.import_module(module), func) is main


def test_bench_suite_smoke():
    """The pytest-benchmark suites still collect, run and check their output."""
    r = run("-m", "pytest", "bench", "-q", "--benchmark-disable", "-x", "-p", "no:cacheprovider",
            env_extra={"PYKERNELS_BENCH_QUICK": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout


def test_bench_linear_named_encoder_shapes():
    """`pykernels bench linear --shapes encoder`: the four MiniLM projections at a
    query's 16 rows and a 64-document bulk batch's 5120."""
    from pykernels.harness.linear import NAMED_SHAPES

    got = {(s.m, s.k, s.n) for s in NAMED_SHAPES["encoder"]}
    kn = {(384, 1152), (384, 384), (384, 1536), (1536, 384)}
    assert got == {(m, k, n) for k, n in kn for m in (16, 5120)}
    r = run("-m", "pykernels", "bench", "linear", "--help")
    assert r.returncode == 0 and "encoder" in r.stdout
