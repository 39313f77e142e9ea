"""`pykernels bench encoder --quick`: the table's rows and the --json document's
shape on a small random-weight BERT directory (tests/test_bert_loader.py
writes it), run as a user would in a subprocess. No timing is asserted."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from test_bert_loader import write_random_bert  # noqa: E402
from test_cli import run  # noqa: E402


def test_bench_encoder_quick_table_and_json(tmp_path):
    model = tmp_path / "bert"
    write_random_bert(str(model))
    out = tmp_path / "enc.json"
    r = run("-m", "pykernels", "bench", "encoder", "--quick", "--model", str(model),
            "--precisions", "fp32,int8", "--query-calls", "3", "--docs", "4", "--rounds", "1",
            "--ragged-sequences", "4", "--padded", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for piece in ("impl", "q p50", "q p99", "docs/s", "%peak", "min cos", "pykernels fp32",
                  "pykernels int8", "padded forward", "ragged / padded",
                  "ragged vs equal length", "ragged / equal", "sentence-transformers fp32",
                  "onnxruntime fp32"):
        assert piece in text, (piece, text)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "pykernels-bench/1" and doc["suite"] == "encoder"
    assert [r["precision"] for r in doc["results"]] == ["fp32", "int8"]
    for rec in doc["results"]:
        assert rec["ok"] and rec["threads"] == 1
        for key in ("query_p50_s", "query_p99_s", "query_cpu_s", "bulk_s", "bulk_cpu_s",
                    "bulk_docs_per_s", "bulk_gflops", "bulk_pct_peak", "padded_bulk_s",
                    "min_cosine", "tokens", "flops"):
            assert isinstance(rec[key], (int, float)), key
        assert rec["query_p99_s"] >= rec["query_p50_s"]
    rag = doc["ragged_vs_equal"]
    assert rag["sequences"] == 4 and {"wall_ratio", "cpu_ratio", "flops_ratio"} <= set(rag)
    assert [b["impl"] for b in doc["summary"]] == ["sentence-transformers", "onnxruntime"]
    for b in doc["summary"]:  # each comparison either ran, failed visibly or was skipped
        assert {"skipped", "error", "query_p50_s"} & set(b)
    assert doc["workload"]["docs"] == 4 and doc["workload"]["query_calls"] == 3


def test_bench_encoder_usage_error():
    r = run("-m", "pykernels", "bench", "encoder", "--precisions", "fp16")
    assert r.returncode == 2
    assert "precision" in r.stderr
