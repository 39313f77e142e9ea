"""``python -m pykernels.policy``: plan and calibrate --from-benchmark on files in tmp_path."""
import json

import pytest

from pykernels.policy import Profile, ops
from pykernels.policy.__main__ import calibrate_main, main, plan_main

OP = ops.Linear(384, 1536)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKERNELS_CACHE", str(tmp_path / "cache"))


def saved_profile(tmp_path):
    p = Profile()
    for b in (1, 4, 16, 64):
        p.add(OP, "latency", "fp32", 1, b, 0.03 + 0.012 * b, 1.3 * (0.03 + 0.012 * b))
        p.add(OP, "throughput", "fp32", 1, b, 0.15 + 0.004 * b, 1.3 * (0.15 + 0.004 * b))
    return p.save(tmp_path / "profile.json")


def test_plan_prints_plan_and_explanation(tmp_path, capsys):
    path = saved_profile(tmp_path)
    rc = plan_main(["--op", "linear", "--k", "384", "--n", "1536", "--p99-ms", "0.5",
                    "--path", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "variant=latency" in out and "batch_size=1" in out and "feasible=True" in out
    assert "p99 target of 500 us" in out


def test_plan_with_load(tmp_path, capsys):
    path = saved_profile(tmp_path)
    assert plan_main(["--op", "linear", "--k", "384", "--n", "1536", "--p99-ms", "5",
                      "--arrival-rate", "20000", "--queued", "4", "--path", str(path)]) == 0
    assert "with 4 items already queued" in capsys.readouterr().out


def test_plan_errors_are_messages(tmp_path, capsys):
    path = saved_profile(tmp_path)
    with pytest.raises(SystemExit):
        plan_main(["--op", "linear", "--k", "384", "--path", str(path)])
    assert "needs --n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_main(["--op", "linear", "--k", "384", "--n", "8", "--p99-ms", "-1", "--path", str(path)])
    assert plan_main(["--op", "decode", "--hq", "8", "--hkv", "8", "--d", "64", "--kv-len", "32",
                      "--path", str(path)]) == 1
    assert "no measurements" in capsys.readouterr().err


def test_calibrate_from_benchmark(tmp_path, capsys):
    bench = {"benchmarks": [{"name": "b", "extra_info": {
        "op": "linear", "k": 384, "n": 1536, "m": 8, "variant": "latency", "precision": "fp32",
        "threads": 1}, "stats": {"median": 1e-4, "max": 2e-4, "rounds": 5}}]}
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench))
    out = tmp_path / "from_bench.json"
    assert calibrate_main(["--from-benchmark", str(src), "--path", str(out)]) == 0
    p = Profile.load(out)
    assert len(p) == 1 and p.measurements[0].p50_ms == pytest.approx(0.1)
    assert "saved to" in capsys.readouterr().out


def test_main_without_command_prints_usage(capsys):
    assert main([]) == 2
    assert "calibrate" in capsys.readouterr().out
