"""pykernels.measure_peaks: structure, plausibility and the per-CPU cache."""
from __future__ import annotations

import math

import pykernels as pk
import pykernels._peaks as peaks_mod


def test_measure_peaks_fields_and_cache(tmp_path, monkeypatch):
    path = tmp_path / "peaks.json"
    monkeypatch.setattr(peaks_mod, "_cache_path", lambda *a: str(path))
    p = pk.measure_peaks(refresh=True, seconds=0.002)
    assert isinstance(p, pk.Peaks)
    assert p.isa == pk.cpu_info().isa
    assert p.threads == pk.get_num_threads()
    assert "fp32_fma" in p.ops
    if p.isa == "avx2":
        assert {"int16_vpmaddwd", "int8_vpmaddubsw"} <= set(p.ops)
    for rate in list(p.ops.values()) + list(p.read_gbs.values()):
        assert math.isfinite(rate.one_thread) and rate.one_thread > 0
        assert math.isfinite(rate.all_threads) and rate.all_threads > 0
    assert set(p.read_gbs) == {"l2", "l3", "dram"}
    assert p.fp32_gflops == p.ops["fp32_fma"].all_threads
    assert path.exists()
    assert pk.measure_peaks() == p          # served from the cache
    path.write_text("not json")
    q = pk.measure_peaks(seconds=0.002)     # a broken cache file is measured again
    assert set(q.ops) == set(p.ops)
