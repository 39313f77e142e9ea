"""Profile: building, files in the cache (round trip, corrupt, truncated, stale),
pytest-benchmark import and a tiny real calibration. Behaviour only, no timings."""
import json
import warnings

import numpy as np
import pytest

from pykernels.policy import Profile, ProfileWarning, ops
from pykernels.policy import profile as profile_mod

LIN = ops.Linear(64, 128)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def small_profile():
    p = Profile(source="test")
    for v, c in (("latency", 0.01), ("throughput", 0.004)):
        for b in (1, 4, 16):
            p.add(LIN, v, "fp32", 1, b, 0.02 + c * b, (0.02 + c * b) * 1.5, samples=50)
    return p


def fake_calibrate(calls):
    def calibrate(cls=None, quick=True, progress=True, *args, **kwargs):
        calls.append(quick)
        return small_profile()
    return classmethod(lambda cls, quick=True, progress=True, *a, **k: calibrate(cls, quick, progress))


# --- building ---------------------------------------------------------------
def test_add_and_read_back():
    p = small_profile()
    assert len(p) == 6
    assert p.groups() == [("linear", "latency", "fp32", 1), ("linear", "throughput", "fp32", 1)]
    tab = p.table(LIN.key, "latency", "fp32", 1)
    assert [m.batch for m in tab] == [1, 4, 16]
    assert tab[0].p99_ms == pytest.approx(1.5 * tab[0].p50_ms)


@pytest.mark.parametrize("kwargs", [
    dict(p50_ms=-1), dict(p50_ms=float("nan")), dict(p50_ms=1.0, p99_ms=0.5), dict(batch=0),
    dict(threads=0), dict(p50_ms=float("inf")),
])
def test_add_validates(kwargs):
    args = dict(op=LIN, variant="latency", precision="fp32", threads=1, batch=1, p50_ms=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        Profile().add(**args)


def test_add_counts_items_of_the_op():
    p = Profile().add(ops.Linear(64, 128, rows_per_item=8), "latency", None, 1, 2, 0.5)
    (m,) = p.measurements
    assert m.op == LIN.key and m.batch == 16 and m.precision == "fp32"


# --- files ------------------------------------------------------------------
def test_save_load_round_trip_default_path(cache):
    p = small_profile()
    path = p.save()
    assert path.parent == cache and path.name.startswith("profile-") and path.suffix == ".json"
    q = Profile.load()
    assert q is not None
    assert q.measurements == p.measurements
    assert q.ops == p.ops
    d = json.loads(path.read_text())
    assert d["schema"] == profile_mod.SCHEMA and d["format"] == profile_mod.FORMAT
    for field in ("cpu_model", "isa", "library_version", "kernels"):
        assert field in d["key"]


def test_load_missing_returns_none_quietly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Profile.load(tmp_path / "nope.json") is None


def _corrupt_variants(good: str):
    d = json.loads(good)
    wrong_schema = dict(d, schema=99)
    stale = json.loads(good)
    stale["key"]["cpu_model"] = "Some Other CPU"
    stale_version = json.loads(good)
    stale_version["key"]["library_version"] = "0.0.1"
    bad_value = json.loads(good)
    bad_value["measurements"][0]["p50_ms"] = -3
    missing = json.loads(good)
    del missing["measurements"][0]["variant"]
    return {
        "garbage": "this is not json {{{",
        "truncated": good[: len(good) // 2],
        "empty": "",
        "binary": "\x00\x01\x02",
        "wrong_schema": json.dumps(wrong_schema),
        "not_a_profile": json.dumps({"hello": 1}),
        "json_list": "[1, 2, 3]",
        "stale_cpu": json.dumps(stale),
        "stale_version": json.dumps(stale_version),
        "negative_latency": json.dumps(bad_value),
        "missing_field": json.dumps(missing),
    }


@pytest.mark.parametrize("case", ["garbage", "truncated", "empty", "binary", "wrong_schema",
                                  "not_a_profile", "json_list", "stale_cpu", "stale_version",
                                  "negative_latency", "missing_field"])
def test_bad_file_warns_and_returns_none(case, tmp_path):
    path = small_profile().save(tmp_path / "p.json")
    path.write_text(_corrupt_variants(path.read_text())[case])
    with pytest.warns(ProfileWarning, match="ignoring"):
        assert Profile.load(path) is None


def test_bad_file_is_recalibrated_and_replaced(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(Profile, "calibrate", fake_calibrate(calls))
    path = small_profile().save()
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.warns(ProfileWarning, match="recalibrating"):
        p = Profile.load(recalibrate=True, progress=False)
    assert calls == [True] and len(p) == 6
    # the replacement is a valid file now
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Profile.load() is not None


def test_missing_file_recalibrates_when_asked(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(Profile, "calibrate", fake_calibrate(calls))
    p = Profile.load(recalibrate=True)
    assert calls == [True] and p is not None
    assert profile_mod.default_path().exists()


def test_unwritable_cache_is_a_warning(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Profile, "calibrate", fake_calibrate(calls))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PYKERNELS_CACHE", str(blocker / "sub"))  # a file where a dir should be
    with pytest.warns(ProfileWarning) as rec:
        p = Profile.load(recalibrate=True)
    assert p is not None
    assert any("could not save" in str(w.message) for w in rec)


def test_merge_and_copy():
    a = small_profile()
    b = Profile().add(LIN, "latency", "fp32", 1, 1, 9.0)
    c = a.merge(b)
    assert c.table(LIN.key, "latency", "fp32", 1)[0].p50_ms == 9.0
    assert a.table(LIN.key, "latency", "fp32", 1)[0].p50_ms != 9.0
    assert len(c) == len(a)


# --- pytest-benchmark -------------------------------------------------------
def bench(name, extra, median, data=None, mx=None):
    stats = {"median": median, "max": mx if mx is not None else median * 2, "rounds": 10,
             "mean": median, "min": median / 2}
    if data is not None:
        stats["data"] = data
        stats["rounds"] = len(data)
    return {"name": name, "extra_info": extra, "stats": stats}


def test_from_pytest_benchmark(tmp_path):
    data = [0.001] * 99 + [0.004]
    doc = {"machine_info": {}, "benchmarks": [
        bench("test_lin_lat", {"op": "linear", "k": 64, "n": 128, "m": 4, "variant": "latency",
                               "precision": "fp32", "threads": 1}, 0.001, data=data),
        bench("test_lin_thr", {"op": "gemm", "k": 64, "n": 128, "m": 16, "variant": "throughput",
                               "threads": 2}, 0.002, mx=0.003),
        bench("test_numpy_baseline", {}, 0.0005),
        bench("test_blas", {"op": "gemm", "k": 64, "n": 128, "m": 4, "variant": None, "impl": "numpy",
                            "threads": 1}, 0.0005),
        bench("test_raw_b", {"op": "gemm", "k": 64, "n": 128, "m": 4, "variant": "latency",
                             "impl": "pykernels", "b": "raw", "threads": 1}, 0.0009),
        bench("test_broken", {"op": "linear", "k": 64, "n": 128, "m": 4, "variant": "latency"}, 0.001),
        bench("test_other_isa", {"op": "linear", "k": 64, "n": 128, "m": 8, "variant": "latency",
                                 "threads": 1, "isa": "no-such-isa"}, 0.001),
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.warns(ProfileWarning, match="2 benchmarks .* skipped.*test_broken"):
        p = Profile.from_pytest_benchmark(path)
    assert len(p) == 2
    lat = p.table(LIN.key, "latency", "fp32", 1)[0]
    assert lat.batch == 4 and lat.p50_ms == pytest.approx(1.0) and lat.samples == 100
    assert lat.p99_ms == pytest.approx(1000 * np.percentile(data, 99))
    thr = p.table(LIN.key, "throughput", "fp32", 2)[0]
    assert thr.batch == 16 and thr.p50_ms == pytest.approx(2.0) and thr.p99_ms == pytest.approx(3.0)

    # refresh an existing profile: same cell replaced, others kept
    base = Profile().add(LIN, "latency", "fp32", 1, 4, 50.0).add(LIN, "latency", "fp32", 1, 1, 0.5)
    with pytest.warns(ProfileWarning):
        q = Profile.from_pytest_benchmark(path, base=base)
    cells = {m.batch: m.p50_ms for m in q.table(LIN.key, "latency", "fp32", 1)}
    assert cells == {1: 0.5, 4: pytest.approx(1.0)}
    assert base.table(LIN.key, "latency", "fp32", 1)[1].p50_ms == 50.0  # base untouched


@pytest.mark.parametrize("text", ["not json", json.dumps({"no": "benchmarks"}), "[]"])
def test_from_pytest_benchmark_rejects_other_files(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        Profile.from_pytest_benchmark(path)


# --- real calibration (tiny) ------------------------------------------------
def test_tiny_real_calibration(capsys, tmp_path):
    p = Profile.calibrate(quick=True, progress=True, ops=[ops.Linear(16, 32)], batches=[1, 4],
                          threads=[1], min_reps=3, max_reps=5, budget_s=0.5)
    err = capsys.readouterr().err
    assert "calibrating" in err and "100%" in err
    assert {g[1] for g in p.groups()} >= {"latency", "throughput"}
    for m in p.measurements:
        assert m.op == "linear(k=16,n=32)" and m.threads == 1 and m.batch in (1, 4)
        assert 0 < m.p50_ms <= m.p99_ms and m.samples >= 3
    assert p.precision_error.get("fp32", 1.0) < 1e-5
    # and it survives the round trip with a valid key
    path = p.save(tmp_path / "real.json")
    assert Profile.load(path).measurements == p.measurements


def test_calibrate_a_model_through_its_parts():
    m = ops.Model(ops=[ops.Linear(16, 16, rows_per_item=2), ops.Linear(16, 8, rows_per_item=2)])
    p = Profile.calibrate(progress=False, ops=[m], batches=[1, 2], threads=[1],
                          variants=["latency"], min_reps=2, max_reps=3, budget_s=0.2)
    assert set(p.ops) == {"linear(k=16,n=16)", "linear(k=16,n=8)"}
    assert sorted({m.batch for m in p.measurements}) == [2, 4]  # rows = items * rows_per_item


def test_calibrate_rejects_bad_arguments():
    with pytest.raises(TypeError):
        Profile.calibrate(progress=False, ops=["linear"])
    with pytest.raises(ValueError):
        Profile.calibrate(progress=False, ops=[LIN], min_reps=5, max_reps=2)
