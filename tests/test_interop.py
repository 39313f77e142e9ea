"""Arrays from other stacks: torch CPU tensors and JAX CPU arrays (DLPack) and
buffer-protocol objects go into every kernel without a copy, and the result
comes back in the caller's type. torch and jax are optional: their tests skip
when they are not installed."""
from __future__ import annotations

import array

import numpy as np
import pytest

import pykernels as pk
from pykernels import _interop

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _rng():
    return np.random.default_rng(0)


# ---- without any framework -----------------------------------------------------

class _FakeGpu:
    """A DLPack exporter that says it lives on a CUDA device."""

    def __dlpack__(self, **kw):  # pragma: no cover - never reached
        raise AssertionError("must not be exported")

    def __dlpack_device__(self):
        return (2, 0)


def test_gpu_exporter_is_refused_with_the_fix():
    a = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"CUDA device.*\.cpu\(\)"):
        pk.gemm(_FakeGpu(), a)
    with pytest.raises(ValueError, match="CUDA"):
        pk.linear(_FakeGpu(), a)
    with pytest.raises(ValueError, match="CUDA"):
        pk.pack(_FakeGpu())


def test_buffer_protocol_input_is_a_view_and_numpy_comes_back():
    buf = array.array("f", range(6))
    view, back = _interop.to_numpy("a", buf)
    assert back is None and view.ctypes.data == buf.buffer_info()[0]
    b = np.ones((3, 2), np.float32)
    res = pk.gemm(memoryview(buf).cast("B").cast("f", (2, 3)), b, threads=1)
    assert type(res) is np.ndarray
    np.testing.assert_allclose(res, np.arange(6, dtype=np.float32).reshape(2, 3) @ b)


def test_non_arrays_keep_their_errors():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        pk.gemm([[1.0]], np.ones((1, 1), np.float32))


def test_numpy_subclass_and_plain_path_untouched():
    a = np.ones((4, 4), np.float32)
    assert _interop.to_numpy("a", a) == (a, None)
    out = np.empty((4, 4), np.float32)
    assert pk.gemm(a, a, out=out, threads=1) is out


# ---- torch -----------------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_torch_view_shares_memory(torch):
    t = torch.randn(5, 7)
    arr, back = _interop.to_numpy("a", t)
    assert arr.ctypes.data == t.data_ptr() and arr.dtype == np.float32
    assert back is torch.from_numpy  # torch's zero-copy way back (faster than DLPack)
    tt = t.t()  # strided view: still no copy
    arr, _ = _interop.to_numpy("a", tt)
    assert arr.ctypes.data == tt.data_ptr() and arr.strides == (4, 28)


def test_torch_bf16_is_a_view(torch):
    t = torch.randn(3, 4).bfloat16()
    arr, _ = _interop.to_numpy("k", t)
    assert arr.dtype == BF16 and arr.ctypes.data == t.data_ptr()
    np.testing.assert_array_equal(arr.astype(np.float32), t.float().numpy())


def test_torch_gemm_in_torch_out(torch):
    a, b = torch.randn(4, 64), torch.randn(64, 32)
    res = pk.gemm(a, b)
    assert isinstance(res, torch.Tensor) and res.shape == (4, 32)
    torch.testing.assert_close(res, a @ b, rtol=1e-5, atol=1e-5)
    bt = torch.randn(32, 64).t()  # transposed view
    torch.testing.assert_close(pk.gemm(a, bt), a @ bt, rtol=1e-5, atol=1e-5)
    # mixed: a NumPy array and a tensor -> the tensor's type
    assert isinstance(pk.gemm(a.numpy(), b), torch.Tensor)


def test_torch_result_is_zero_copy(torch, monkeypatch):
    seen = {}
    real = _interop.adapt

    def spy(*args, **kw):
        arrays, out_arr, finish = real(*args, **kw)

        def fin(res):
            r = finish(res)
            seen["np"], seen["torch"] = res, r
            return r
        return arrays, out_arr, fin
    monkeypatch.setattr(_interop, "adapt", spy)
    r = pk.gemm(torch.randn(3, 8), torch.randn(8, 5))
    assert r.data_ptr() == seen["np"].ctypes.data


def test_torch_out_written_in_place(torch):
    a, b = torch.randn(6, 16), torch.randn(16, 8)
    out = torch.full((6, 8), 7.0)
    ptr = out.data_ptr()
    assert pk.gemm(a, b, out=out, beta=1.0) is out
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, a @ b + 7.0, rtol=1e-5, atol=1e-5)
    out2 = torch.empty(6, 8)
    assert pk.linear(a, pk.pack(b), out=out2) is out2
    torch.testing.assert_close(out2, a @ b, rtol=1e-5, atol=1e-5)


def test_torch_linear_pack_bias_activation_leading_dims(torch):
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(2, 3, 24)
    w = pk.pack(lin.weight.detach(), layout="nk")
    res = pk.linear(x, w, lin.bias.detach(), activation="relu")
    assert isinstance(res, torch.Tensor) and res.shape == (2, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(res, torch.relu(lin(x)), rtol=1e-4, atol=1e-5)
    for prec in ("bf16", "int8"):
        wp = pk.pack(lin.weight.detach(), layout="nk", precision=prec)
        r = pk.linear(x, wp, lin.bias.detach())
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(r.flatten(), lin(x).flatten(), dim=0)
        assert cos > 0.99


def test_torch_attention_and_decode(torch):
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    res = pk.attention(q, k, v, causal=True, kv_lens=torch.tensor([9, 7]))
    assert isinstance(res, torch.Tensor)
    ref = pk.attention(q.numpy(), k.numpy(), v.numpy(), causal=True, kv_lens=np.array([9, 7]))
    np.testing.assert_array_equal(res.numpy(), ref)
    resb = pk.attention(q, k.bfloat16(), v.bfloat16())
    refb = pk.attention(q.numpy(), k.bfloat16().float().numpy().astype(BF16),
                        v.bfloat16().float().numpy().astype(BF16))
    np.testing.assert_array_equal(resb.numpy(), refb)
    qd = torch.randn(2, 4, 16)
    res = pk.decode_attention(qd, k, v, torch.tensor([9, 3]))
    ref = pk.decode_attention(qd.numpy(), k.numpy(), v.numpy(), np.array([9, 3]))
    assert isinstance(res, torch.Tensor)
    np.testing.assert_array_equal(res.numpy(), ref)
    # paged cache with a torch block table
    kc, vc = torch.randn(4, 2, 4, 16), torch.randn(4, 2, 4, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    res = pk.decode_attention(qd, kc, vc, torch.tensor([8, 5]), block_table=table)
    ref = pk.decode_attention(qd.numpy(), kc.numpy(), vc.numpy(), np.array([8, 5]),
                              block_table=table.numpy())
    np.testing.assert_array_equal(res.numpy(), ref)


def test_torch_requires_grad_says_detach(torch):
    a = torch.randn(3, 3, requires_grad=True)
    for call in (lambda: pk.gemm(a, a.detach()), lambda: pk.pack(a),
                 lambda: pk.linear(a, a.detach())):
        with pytest.raises(TypeError, match=r"requires grad.*detach\(\).*no_grad"):
            call()


def test_torch_wrong_dtype_says_float(torch):
    a = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float64.*\.float\(\)"):
        pk.gemm(a, a.float())
    with pytest.raises(TypeError, match="int32"):
        pk.linear(torch.ones(2, 3, dtype=torch.int32), np.ones((3, 3), np.float32))


def test_torch_inputs_unchanged_on_error(torch):
    a = torch.randn(3, 4)
    before = a.clone()
    with pytest.raises(ValueError):
        pk.gemm(a, torch.randn(5, 2))
    assert torch.equal(a, before)


# ---- jax ---------------------------------------------------------------------------

@pytest.fixture
def jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp
    return jnp


def test_jax_in_jax_out(jnp):
    import jax
    a = jnp.asarray(_rng().standard_normal((4, 64), dtype=np.float32))
    b = jnp.asarray(_rng().standard_normal((64, 32), dtype=np.float32))
    arr, back = _interop.to_numpy("a", a)
    assert arr.ctypes.data == a.unsafe_buffer_pointer()  # a view of JAX's buffer
    res = pk.gemm(a, b)
    assert isinstance(res, jax.Array)
    np.testing.assert_allclose(np.asarray(res), np.asarray(a) @ np.asarray(b), rtol=1e-5,
                               atol=1e-5)
    w = pk.pack(b, precision="bf16")
    assert isinstance(pk.linear(a, w, activation="gelu"), jax.Array)


def test_jax_bf16_attention(jnp):
    q = jnp.asarray(_rng().standard_normal((1, 2, 3, 8), dtype=np.float32))
    k = jnp.asarray(_rng().standard_normal((1, 2, 5, 8), dtype=np.float32)).astype(jnp.bfloat16)
    res = pk.attention(q, k, k)
    ref = pk.attention(np.asarray(q), np.asarray(k), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(res), ref)


def test_jax_out_is_read_only(jnp):
    a = jnp.ones((2, 2), jnp.float32)
    with pytest.raises(ValueError, match="read-only"):
        pk.gemm(a, a, out=jnp.zeros((2, 2), jnp.float32))
