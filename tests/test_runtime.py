"""Runtime: cpu_info, PYKERNELS_ISA, thread control, the kernel registry, the pool.

Environment variables are read once at import, so every test of one runs a fresh
interpreter (conftest.run_under_isa). Nothing here asserts a timing.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import pykernels as pk
from conftest import (
    ISA_ORDER,
    assert_gemm_close,
    gemm_reference,
    run_json_under_isa,
    run_under_isa,
    supported_isas,
)

F32 = np.float32


@pytest.fixture
def restore_num_threads():
    before = pk.get_num_threads()
    yield before
    pk.set_num_threads(before)


# ---------------------------------------------------------------------------
# cpu_info
# ---------------------------------------------------------------------------

def test_cpu_info_fields():
    info = pk.cpu_info()
    assert info.isa in ISA_ORDER
    assert info.supported_isa in ISA_ORDER
    # Without PYKERNELS_ISA the best path runs (the suite itself may be run with a
    # cap: then isa is lower than supported_isa).
    assert ISA_ORDER.index(info.isa) <= ISA_ORDER.index(info.supported_isa)
    assert isinstance(info.features, (set, frozenset))
    assert all(isinstance(f, str) and f for f in info.features)
    assert isinstance(info.cores, int) and info.cores >= 1
    assert info.l1d_bytes > 0 and info.l2_bytes > 0
    # Some CPUs have no L3 (0 means none/unknown); this one does.
    assert info.l3_bytes >= 0


def test_cpu_info_features_agree_with_isa():
    info = pk.cpu_info()
    if info.supported_isa in ("avx2", "avx512"):
        assert {"avx", "avx2", "fma"} <= info.features, info.features
    if info.supported_isa == "avx512":
        assert {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= info.features
    else:
        assert not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= info.features
    # Optional AVX-512 extensions are only reported with the AVX-512 foundation.
    for f in ("avx512_bf16", "avx512_vnni", "avx512_fp16"):
        if f in info.features:
            assert "avx512f" in info.features


# ---------------------------------------------------------------------------
# PYKERNELS_ISA
# ---------------------------------------------------------------------------

_INFO_CODE = (
    "import json, pykernels as pk\n"
    "i = pk.cpu_info()\n"
    "print(json.dumps({'isa': i.isa, 'supported': i.supported_isa,\n"
    "                  'kernels': [e.__dict__ for e in pk.kernels()]}))\n"
)


def test_isa_env_selects_path(isa):
    """PYKERNELS_ISA=<isa> runs that path; the registry reports it."""
    res = run_json_under_isa(isa, _INFO_CODE)
    assert res["isa"] == isa
    assert res["supported"] == supported_isas()[-1]
    assert res["kernels"], "empty registry"
    for e in res["kernels"]:
        assert e["isa"] == isa, e
        assert isa in e["name"], e


def test_isa_env_generic_names():
    res = run_json_under_isa("generic", _INFO_CODE)
    assert res["isa"] == "generic"
    names = [e["name"] for e in res["kernels"]]
    assert names and all("generic" in n for n in names), names


@pytest.mark.parametrize("value", ["bogus", "AVX3", "sse"])
def test_isa_env_unknown_value_fails_at_import(value):
    proc = run_under_isa(value, "import pykernels", timeout=120)
    assert proc.returncode != 0
    assert value in proc.stderr, f"message should name {value!r}: {proc.stderr[-2000:]}"
    assert "generic" in proc.stderr and "avx2" in proc.stderr, \
        f"message should list the valid values: {proc.stderr[-2000:]}"


def test_isa_env_above_cpu_fails_clearly():
    best = supported_isas()[-1]
    if best == "avx512":
        pytest.skip("this CPU supports avx512: no unsupported ISA to ask for")
    proc = run_under_isa("avx512", "import pykernels", timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "avx512" in err and "support" in err.lower(), \
        f"message should say the CPU lacks avx512: {err[-2000:]}"
    assert best in err, f"message should name the best supported path {best!r}: {err[-2000:]}"


_ISA_ERROR_TYPE_CODE = (
    "import sys\n"
    "try:\n"
    "    import pykernels\n"
    "except Exception as e:\n"
    "    print(type(e).__name__)\n"
)


@pytest.mark.parametrize("value", ["bogus", "avx512"])
def test_isa_env_error_is_value_error(value):
    if value == "avx512" and supported_isas()[-1] == "avx512":
        pytest.skip("this CPU supports avx512")
    proc = run_under_isa(value, _ISA_ERROR_TYPE_CODE, timeout=120)
    assert proc.stdout.strip() == "ValueError", proc.stdout + proc.stderr[-1000:]


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_set_get_num_threads_round_trip(n, restore_num_threads):
    pk.set_num_threads(n)
    assert pk.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True, None],
                         ids=["0", "-1", "str", "1.5", "True", "None"])
def test_set_num_threads_rejects(bad, restore_num_threads):
    before = pk.get_num_threads()
    with pytest.raises(ValueError):
        pk.set_num_threads(bad)
    assert pk.get_num_threads() == before


def test_set_num_threads_huge_is_capped_or_value_error(restore_num_threads):
    try:
        pk.set_num_threads(10**10)
    except ValueError:
        return
    assert pk.get_num_threads() >= 1


def test_default_num_threads_is_positive():
    assert isinstance(pk.get_num_threads(), int) and pk.get_num_threads() >= 1


@pytest.mark.parametrize("n", [1, 2])
def test_num_threads_env(n):
    res = run_json_under_isa(
        None, "import json, pykernels as pk; print(json.dumps(pk.get_num_threads()))",
        PYKERNELS_NUM_THREADS=str(n))
    assert res == n


def test_num_threads_env_invalid_falls_back():
    """An unusable PYKERNELS_NUM_THREADS must not break the import."""
    res = run_json_under_isa(
        None, "import json, pykernels as pk; print(json.dumps(pk.get_num_threads()))",
        PYKERNELS_NUM_THREADS="zero")
    assert isinstance(res, int) and res >= 1


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

# The kernel schemes each precision may run on (instruction scheme of the
# packed format); which one a machine gets depends on its CPU, so a test only
# checks membership, never which scheme it finds.
_SCHEMES = {
    "fp32": {"fma", "scalar"},
    "bf16": {"widen_fma", "widen_scalar", "dpbf16ps"},
    "int8": {"vpmaddwd", "vpdpbusd", "vpmaddubsw", "scalar_u8s8"},
    # 7-bit activations: vpmaddubsw (AVX2, and its scalar model on generic),
    # the exact instructions where they are as fast (AVX-512, VNNI)
    "int8_7bit": {"vpmaddubsw", "vpmaddwd", "vpdpbusd"},
}
_K_STEP = {"fp32": 1, "bf16": 2, "int8": 4, "int8_7bit": 4}


def test_kernels_registry_entries():
    """The registry's identity is structured data: op, kernel family, variant,
    precision, ISA, instruction scheme, register tile and k-step are fields, and
    the printed name is derived from them (never parsed)."""
    entries = pk.kernels()
    assert entries, "empty registry"
    isa = pk.cpu_info().isa
    keys = set()
    for e in entries:
        for field in ("op", "kernel", "variant", "precision", "isa", "scheme", "name"):
            assert isinstance(getattr(e, field), str) and getattr(e, field), (field, e)
        assert e.variant in ("latency", "throughput"), e
        assert e.isa == isa, e
        key = (e.op, e.variant, e.precision)
        assert key not in keys, f"two entries for {key}"
        keys.add(key)
        if "attention" in e.op:
            # the tiles of attention follow the head dimension: no fixed tile
            assert e.kernel == e.op and e.scheme == {"latency": "splitkv", "throughput": "flash"}[e.variant]
            assert e.mr is None and e.nr is None and e.k_step is None and e.tile is None, e
            assert e.precision in ("fp32", "bf16"), e
        else:
            # linear runs the gemm kernels with a fused epilogue
            assert e.op in ("gemm", "linear") and e.kernel == "gemm", e
            assert e.scheme in _SCHEMES[e.precision], e
            assert isinstance(e.mr, int) and isinstance(e.nr, int) and 1 <= e.mr <= 16, e
            assert e.nr % 16 == 0 and 16 <= e.nr <= 128, e   # whole packed panels of 16 columns
            assert e.k_step == _K_STEP[e.precision], e
            assert e.tile == (e.mr, e.nr)
        # the printed name is a function of the fields, so equal fields give equal names
        # and the two variants of one kernel never share a name
        assert e.kernel in e.name and e.isa in e.name and e.scheme in e.name, e
    assert ("gemm", "latency", "fp32") in keys
    assert ("gemm", "throughput", "fp32") in keys
    by_key = {(e.op, e.precision, e.variant): e for e in entries}
    for (op, precision, variant), e in by_key.items():
        if variant == "latency" and (op, precision, "throughput") in by_key:
            other = by_key[(op, precision, "throughput")]
            assert e.name != other.name, f"latency and throughput {op}/{precision} share the name {e.name!r}"
        if op == "linear" and precision == "fp32":  # one kernel, two public entry points
            g = by_key[("gemm", precision, variant)]
            assert (g.scheme, g.tile, g.k_step) == (e.scheme, e.tile, e.k_step)


def test_kernel_entry_name_is_derived_from_fields():
    Entry = type(pk.kernels()[0])
    a = Entry(op="linear", variant="latency", precision="int8", isa="avx512", kernel="gemm",
              scheme="vpdpbusd", mr=6, nr=64, k_step=4)
    b = Entry(op="linear", variant="throughput", precision="int8", isa="avx512", kernel="gemm",
              scheme="vpdpbusd", mr=6, nr=64, k_step=4)
    assert a.name != b.name and a.tile == b.tile == (6, 64)
    c = Entry(op="attention", variant="throughput", precision="bf16", isa="avx2", kernel="attention",
              scheme="flash")
    assert c.tile is None and "flash" in c.name
    with pytest.raises(Exception):
        a.name = "something else"  # frozen: the name cannot drift from the fields


# ---------------------------------------------------------------------------
# Pool
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spin", [True, False], ids=["spin", "park"])
def test_fork_join_us_is_positive_float(spin):
    t = pk.fork_join_us(threads=2, spin=spin, reps=20)
    assert isinstance(t, float) and t > 0.0 and np.isfinite(t)


def test_fork_join_us_rejects_zero_reps_without_crashing():
    proc = run_under_isa(None, "import pykernels as pk\n"
                               "try:\n"
                               "    pk.fork_join_us(threads=2, reps=0)\n"
                               "except ValueError:\n"
                               "    print('ValueError')\n", timeout=60)
    assert proc.returncode == 0 and "ValueError" in proc.stdout, \
        f"exit code {proc.returncode}; stderr: {proc.stderr[-1000:]}"


_FORK_CODE = r"""
import os, sys, time
import numpy as np
import pykernels as pk
from fork_pipe import read_until_eof, wait_child

rng = np.random.default_rng(0)
a = rng.standard_normal((150, 170), dtype=np.float32)
b = rng.standard_normal((170, 130), dtype=np.float32)
pk.set_num_threads(2)
# The parent uses the pool with 2 threads (both variants) before forking.
for variant in ("latency", "throughput"):
    for _ in range(5):
        expected = pk.gemm(a, b, variant=variant, threads=2)
ref = a.astype(np.float64) @ b.astype(np.float64)

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(r)
        res = [pk.gemm(a, b, variant=v, threads=2) for v in ("latency", "throughput", "auto")]
        res.append(pk.gemm(a, pk.pack(b), threads=None))
        ok = all(np.array_equal(x.shape, ref.shape) for x in res)
        err = max(float(np.max(np.abs(x - ref))) for x in res)
        os.write(w, f"{int(ok)} {err!r}\n".encode())
        os._exit(0)
    except BaseException as e:
        os.write(w, f"0 {e!r}\n".encode())
        os._exit(3)
os.close(w)
deadline = time.monotonic() + 60
data = read_until_eof(r, deadline, chunk=4096)
status = wait_child(pid, deadline)
if status is None:
    os.kill(pid, 9)
    print("child hung", data)
    sys.exit(2)
print(os.waitstatus_to_exitcode(status), data.decode().strip())
# The parent's pool still works after the fork.
after = pk.gemm(a, b, variant="throughput", threads=2)
print("parent_ok", float(np.max(np.abs(after - ref))))
"""


def test_gemm_in_forked_child_after_parent_used_pool():
    """A child forked after the parent ran 2-thread regions computes correct gemms
    (its pool is rebuilt: the parent's workers do not exist in the child). Run in
    a subprocess so a deadlocked child cannot wedge the test run."""
    proc = run_under_isa(None, _FORK_CODE, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    code, ok, err = lines[0].split()
    assert code == "0" and ok == "1", proc.stdout
    # |a@b - ref| for K = 170 standard-normal data: ~1e-5; anything sane is < 1e-3.
    assert float(err) < 1e-3, proc.stdout
    assert lines[1].startswith("parent_ok") and float(lines[1].split()[1]) < 1e-3


def test_set_num_threads_while_gemm_runs(restore_num_threads):
    """Changing the default thread count while other threads run gemm(threads=None)
    (64^3 multiply-adds and more, so the default applies) never breaks a result."""
    rng = np.random.default_rng(9)
    problems = []
    for m, n, k in ((100, 100, 100), (8, 300, 200), (70, 130, 90)):
        a, b = rand(rng, m, k), rand(rng, k, n)
        ref, mag = gemm_reference(a, b)
        problems.append((a, b, ref, mag, k))
    stop = threading.Event()
    errors = []

    def toggler():
        i = 0
        while not stop.is_set():
            pk.set_num_threads(1 + i % 3)
            i += 1

    def worker(seed):
        try:
            for j in range(40):
                a, b, ref, mag, k = problems[(seed + j) % len(problems)]
                variant = ("latency", "throughput", "auto")[j % 3]
                assert_gemm_close(pk.gemm(a, b, variant=variant), ref, mag, k)
        except AssertionError as e:
            errors.append(str(e))

    tog = threading.Thread(target=toggler)
    workers = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    tog.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    stop.set()
    tog.join(timeout=10)
    assert not any(t.is_alive() for t in workers), "gemm hung"
    assert not errors, errors[:3]
    assert pk.get_num_threads() in (1, 2, 3)


def rand(rng, *shape):
    return rng.standard_normal(shape, dtype=F32)


def test_binding_vocabulary_comes_from_cpp():
    """Variant, Precision and Activation are the C++ enums; the public strings
    are their member names; the layout constants are the C++ ones, and
    MAX_THREADS is the limit the thread pool really applies."""
    from pykernels import _core, _gemm
    assert list(_core.Variant.__members__) == ["latency", "throughput", "auto"]
    assert list(_core.Precision.__members__) == ["fp32", "bf16", "int8", "int8_7bit"]
    assert list(_core.Activation.__members__) == ["none", "relu", "gelu", "gelu_tanh", "silu"]
    assert _gemm.VARIANTS == ("latency", "throughput", "auto")
    assert _gemm.ACTIVATIONS == (None, "relu", "gelu", "gelu_tanh", "silu")
    assert {p: _core.k_step(v) for p, v in _core.Precision.__members__.items()} == _K_STEP
    assert _core.PANEL_COLS == 16
    prev = pk.get_num_threads()
    try:
        _core.set_num_threads(n=10**6)
        assert pk.get_num_threads() == _core.MAX_THREADS
    finally:
        pk.set_num_threads(prev)
    # a code where an enum belongs is refused, and the error names the arguments
    a = np.ones((2, 2), np.float32)
    with pytest.raises(TypeError, match="variant: pykernels._core.Variant"):
        _core.matmul(a, a, variant=1)
