"""pk.gemm's builtin entry point (csrc/bindings/gemm.cc, gemm_entry).

The common call is parsed in C and every other call goes to the Python
implementation (pykernels._gemm._gemm_py). These tests pin what a user sees
either way: the same signature and docstring, the same results for the
argument forms the entry point takes itself and for those it hands on, the
same errors, and a variant chooser that is still asked.
"""
from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest

import pykernels as pk
from pykernels import _chooser, _gemm


def _inputs(m=7, k=9, n=33, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((k, n)).astype(np.float32))


def _close(got, a, b, alpha=1.0, beta=0.0, c0=None):
    ref = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    if c0 is not None:
        ref = ref + beta * c0.astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_signature_docstring_and_pickling_are_gemms():
    sig = inspect.signature(pk.gemm)
    assert str(sig) == "(a, b, *, out=None, alpha=1.0, beta=0.0, variant='auto', threads=None)"
    assert pk.gemm.__doc__ == _gemm._gemm_py.__doc__
    with pytest.raises(TypeError, match=r"^gemm\(\) takes 2 positional arguments"):
        pk.gemm(*_inputs(), None)
    assert pk.gemm.__name__ == "gemm" and pk.gemm.__module__ == "pykernels"
    assert pickle.loads(pickle.dumps(pk.gemm)) is pk.gemm


@pytest.mark.parametrize("kwargs", [
    {}, {"variant": "latency"}, {"variant": "throughput"}, {"variant": "auto"},
    {"threads": 1}, {"threads": None}, {"threads": 10**6}, {"alpha": 2}, {"alpha": -0.5},
    {"alpha": np.float32(1.5)}, {"alpha": np.float64(0.25)}, {"alpha": True},
], ids=repr)
def test_argument_forms_give_the_same_product(kwargs):
    a, b = _inputs()
    got = pk.gemm(a, b, **kwargs)
    assert got.shape == (7, 33) and got.dtype == np.float32
    _close(got, a, b, alpha=float(kwargs.get("alpha", 1.0)))
    np.testing.assert_array_equal(got, _gemm._gemm_py(a, b, **kwargs))


@pytest.mark.parametrize("beta", [0.0, 1, 0.5, np.float32(2.0)], ids=repr)
def test_out_and_beta(beta):
    a, b = _inputs()
    c0 = np.random.default_rng(1).standard_normal((7, 33)).astype(np.float32)
    out = c0.copy()
    res = pk.gemm(a, b, out=out, beta=beta)
    assert res is out
    _close(out, a, b, beta=float(beta), c0=c0)


def test_overlapping_out_is_computed_as_numpy_does():
    a = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    ref = a.astype(np.float64) @ a.astype(np.float64)
    pk.gemm(a, a.copy(), out=a)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)


class _Sub(np.ndarray):
    pass


def test_other_array_types_still_work():
    a, b = _inputs()
    _close(pk.gemm(a.view(_Sub), b), a, b)
    _close(pk.gemm(a, b.view(_Sub)), a, b)
    out = np.empty((7, 33), np.float32).view(_Sub)
    assert pk.gemm(a, b, out=out) is out
    _close(out, a, b)
    packed = pk.pack(b)
    _close(pk.gemm(a, packed), a, b)


@pytest.mark.parametrize("call, exc", [
    (lambda a, b: pk.gemm(a, b, variant="fast"), ValueError),
    (lambda a, b: pk.gemm(a, b, variant=None), ValueError),
    (lambda a, b: pk.gemm(a, b, threads=0), ValueError),
    (lambda a, b: pk.gemm(a, b, threads=True), ValueError),
    (lambda a, b: pk.gemm(a, b, threads=1.0), ValueError),
    (lambda a, b: pk.gemm(a, b, alpha="1"), TypeError),
    (lambda a, b: pk.gemm(a, b, None), TypeError),
    (lambda a, b: pk.gemm(a, b, outt=None), TypeError),
    (lambda a, b: pk.gemm(a), TypeError),
    (lambda a, b: pk.gemm(a, a), ValueError),
    (lambda a, b: pk.gemm(a.astype(np.float64), b), TypeError),
    (lambda a, b: pk.gemm(a.tolist(), b), TypeError),
    (lambda a, b: pk.gemm(a, b, out=np.empty((7, 32), np.float32)), ValueError),
], ids=["variant", "variant-none", "threads-0", "threads-bool", "threads-float", "alpha-str",
        "positional-out", "unknown-keyword", "missing-b", "shapes", "dtype", "list",
        "out-shape"])
def test_errors_are_the_python_implementations(call, exc):
    a, b = _inputs()
    a0, b0 = a.copy(), b.copy()
    with pytest.raises(exc) as got:
        call(a, b)
    # the same error, message included, as the Python implementation raises
    with pytest.raises(exc) as expected:
        _call_python(call, a, b)
    assert str(got.value) == str(expected.value)
    if exc is TypeError and "gemm" in str(got.value):
        assert "_gemm_py" not in str(got.value)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def _call_python(call, a, b):
    """``call`` with pk.gemm replaced by the Python implementation."""
    saved = pk.gemm
    pk.gemm = _gemm._gemm_py
    try:
        call(a, b)
    finally:
        pk.gemm = saved


def test_an_installed_chooser_is_asked_and_removing_it_restores_the_entry_point():
    a, b = _inputs()
    calls = []

    def chooser(call):
        calls.append(call)
        return "latency", 1

    prev = _chooser.set_variant_chooser(chooser)
    try:
        _close(pk.gemm(a, b), a, b)
        assert len(calls) == 1 and (calls[0].m, calls[0].k, calls[0].n) == (7, 9, 33)
        pk.gemm(a, b, variant="throughput")  # a fixed variant does not ask
        assert len(calls) == 1
    finally:
        _chooser.set_variant_chooser(prev)
    pk.gemm(a, b)
    assert len(calls) == 1
