"""pytest-benchmark as the calibration source, end to end: a tiny real run of
``bench/test_bench_gemm.py`` writes ``--benchmark-json``; the calibrate command
(``python -m pykernels.policy calibrate --from-benchmark``, which ``pykernels
calibrate`` delegates to) turns it into a profile file; the policy plans with it,
in-process and through the ``plan`` command.

The bench run is the smoke selection (``PYKERNELS_BENCH_QUICK=1``), one shape
(1x256x256, pykernels' packed-B cases only), a few rounds each: a few seconds.
Everything writes under a temporary ``$PYKERNELS_CACHE``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install 'pykernels[test]')")

from conftest import REPO_ROOT, subprocess_env  # noqa: E402
from pykernels.policy import SLO, Policy, Profile, ops  # noqa: E402

SELECTION = "test_pykernels and 1x256x256 and packed"


def run(args, env, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(args)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = d / "out.json"
    env = subprocess_env(PYKERNELS_BENCH_QUICK="1", PYKERNELS_CACHE=str(d / "cache"))
    run(["-m", "pytest", "bench/test_bench_gemm.py", "-q", "-p", "no:cacheprovider",
         "-k", SELECTION, f"--benchmark-json={out}", "--benchmark-save-data",
         "--benchmark-min-rounds=15", "--benchmark-max-time=0.05", "--benchmark-warmup=off"], env)
    return out, env, d


def test_bench_json_has_the_policy_fields(bench_json):
    out, _, _ = bench_json
    data = json.loads(out.read_text())
    benches = data["benchmarks"]
    assert {b["extra_info"]["variant"] for b in benches} == {"latency", "throughput"}
    for b in benches:
        info = b["extra_info"]
        assert info["op"] == "gemm" and (info["m"], info["k"], info["n"]) == (1, 256, 256)
        assert info["threads"] >= 1 and len(b["stats"]["data"]) >= 15


def test_profile_from_pytest_benchmark_and_plan(bench_json):
    out, _, _ = bench_json
    data = json.loads(out.read_text())
    prof = Profile.from_pytest_benchmark(out)
    cells = {(m.variant, m.precision, m.threads, m.batch): m for m in prof.measurements
             if m.op == "linear(k=256,n=256)"}
    assert len(cells) == 2
    for b in data["benchmarks"]:
        i = b["extra_info"]
        m = cells[(i["variant"], "fp32", i["threads"], 1)]
        assert m.p50_ms == pytest.approx(b["stats"]["median"] * 1e3)
        assert m.p99_ms >= m.p50_ms
    plan = Policy(SLO(p99_ms=1000.0), prof, progress=False).plan(ops.Linear(256, 256))
    assert plan.feasible and plan.variant in ("latency", "throughput")
    assert plan.batch_size == 1 and plan.precision == "fp32"
    # both variants meet a 1 s target: the faster one (higher throughput; within
    # the planner's 2% tolerance, the lower p99) wins, with the measured cell's numbers
    fastest = min(cells.values(), key=lambda c: c.p50_ms)
    chosen = cells[(plan.variant, "fp32", plan.threads, 1)]
    assert chosen.p50_ms <= fastest.p50_ms * 1.03
    assert plan.service_p50_ms == pytest.approx(chosen.p50_ms, rel=0.25)
    assert plan.predicted_p99_ms == pytest.approx(chosen.p99_ms, rel=0.25)
    assert "latency" in plan.explain() or "throughput" in plan.explain()


def test_calibrate_command_then_plan_command(bench_json):
    out, env, d = bench_json
    path = d / "profile.json"
    proc = run(["-m", "pykernels.policy", "calibrate", "--from-benchmark", str(out),
                "--path", str(path)], env)
    assert "saved to" in proc.stdout
    prof = Profile.load(path)
    assert prof is not None and "pytest-benchmark" in prof.source
    assert {m.op for m in prof.measurements} == {"linear(k=256,n=256)"}
    proc = run(["-m", "pykernels.policy", "plan", "--op", "linear", "--k", "256", "--n", "256",
                "--p99-ms", "1000", "--path", str(path), "--no-progress"], env)
    assert "feasible=True" in proc.stdout and "Plan:" in proc.stdout


def test_pykernels_calibrate_subcommand(bench_json):
    """The same through the ``pykernels`` command line (``python -m pykernels``)."""
    from pykernels import cli

    if "calibrate" not in cli.COMMANDS:
        pytest.skip("`pykernels calibrate` is not registered in pykernels.cli.COMMANDS")
    out, env, d = bench_json
    path = d / "profile-cli.json"
    proc = run(["-m", "pykernels", "calibrate", "--from-benchmark", str(out), "--path", str(path)],
               env)
    assert "saved to" in proc.stdout
    assert {m.op for m in Profile.load(path).measurements} == {"linear(k=256,n=256)"}
    proc = run(["-m", "pykernels", "plan", "--op", "linear", "--k", "256", "--n", "256",
                "--p99-ms", "1000", "--path", str(path), "--no-progress"], env)
    assert "feasible=True" in proc.stdout


# A quick run of every bench module with one shape family each (attention:
# decode, causal and padded; gemm/linear: the quick shapes' pykernels cases):
# every pykernels benchmark the suite writes becomes a profile cell, none is
# skipped, and the command prints its warnings without their source line.
EVERY_KIND = "test_pykernels and (decode or causal or padded or (1x256x256 and packed))"


def test_calibration_ingests_every_benchmark_the_suite_writes(tmp_path):
    out = tmp_path / "all.json"
    env = subprocess_env(PYKERNELS_BENCH_QUICK="1", PYKERNELS_CACHE=str(tmp_path / "cache"))
    run(["-m", "pytest", "bench/test_bench_attention.py", "bench/test_bench_gemm.py", "-q",
         "-p", "no:cacheprovider", "-k", EVERY_KIND, f"--benchmark-json={out}",
         "--benchmark-min-rounds=3", "--benchmark-max-time=0.01", "--benchmark-warmup=off"], env)
    data = json.loads(out.read_text())
    ours = [b for b in data["benchmarks"] if b["extra_info"].get("impl", "pykernels") == "pykernels"
            and b["extra_info"].get("b") != "raw"]
    kinds = {b["extra_info"]["op"] for b in ours}
    assert {"decode_attention", "attention", "gemm"} <= kinds, kinds
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped benchmark warns: fail on it
        prof = Profile.from_pytest_benchmark(out)
    assert len(prof.measurements) >= len({(b["extra_info"]["op"], b["name"]) for b in ours}) // 2
    proc = run(["-m", "pykernels.policy", "calibrate", "--from-benchmark", str(out),
                "--path", str(tmp_path / "p.json")], env)
    assert "skipped" not in proc.stderr, proc.stderr
    assert "warnings.warn" not in proc.stderr


def test_calibrate_prints_a_warning_without_its_source_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": [
        {"name": "x", "extra_info": {"op": "gemm", "variant": "sideways", "threads": 1},
         "stats": {"median": 1e-3}}]}))
    env = subprocess_env(PYKERNELS_CACHE=str(tmp_path / "cache"))
    proc = run(["-m", "pykernels.policy", "calibrate", "--from-benchmark", str(bad),
                "--path", str(tmp_path / "p.json")], env)
    assert "1 benchmarks in" in proc.stderr and "skipped" in proc.stderr
    assert "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr, proc.stderr
