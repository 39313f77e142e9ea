"""Shared test helpers: running code under every ISA path, and the float64 reference.

ISA paths
---------
pykernels resolves its kernel table once, at import, from CPUID/XCR0 capped by
``PYKERNELS_ISA=generic|avx2|avx512``. A process therefore sees exactly one path,
so every ISA other than the default is exercised in a subprocess. Each subprocess
runs a *batch* of many cases and reports back one JSON line, which keeps the number
of interpreter launches to a handful per ISA.

* ``isa`` fixture: parametrized over ``ISA_ORDER``; skips the ISAs this CPU lacks.
* ``run_under_isa(isa, code)``: runs ``code`` in ``python -c`` with ``PYKERNELS_ISA``
  set, the repository on ``sys.path`` and this directory importable; returns the
  ``CompletedProcess``.
* ``run_json_under_isa(isa, code)``: same, but the code prints one JSON object as
  its last stdout line; a non-zero exit fails the test with the child's stderr.
* ``CraftedPickle(fn, args)``: an object that pickles as ``fn(*args)``, for
  feeding a reconstructor hand-made arguments.
* ``run_call_under_isa(isa, module, call)``: imports the test module ``module`` in
  such a subprocess and returns the JSON value of the expression ``call`` there.

Batches
-------
A test module lists its batches as (id, fn) items, ``fn(isa)`` returning None or
why the item failed (``case_items``/``check_items`` make them from cases and
plain checks). ``run_batch_items`` runs them and reports ``{"isa", "count",
"skipped_known_bugs", "nfail", "failures"}``; ``assert_batch_passed`` checks that
report in the parent test.

The in-process tests run on the default (best) ISA.

Native test drivers
-------------------
``build_native_driver(name, sources, deps)`` compiles a C++ test driver from
``tests/native/`` together with library sources (once per hash of everything it
depends on, into ``build/native-tests/``) and returns the executable's path; it
skips when no C++ compiler is found.

Reference and tolerance
-----------------------
``gemm_reference`` (``pykernels.testing.gemm_reference64``) computes
``alpha * a @ b + beta * c0`` in float64 together with the magnitude ``|alpha| * (|a| @ |b|) + |beta| * |c0|`` that bounds the rounding
error, and ``gemm_tolerance`` turns that magnitude into a per-element bound (the
derivation is next to the function).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pykernels.testing import gemm_reference64 as gemm_reference  # noqa: F401 (re-exported)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
ISA_ORDER = ("generic", "avx2", "avx512")
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one ulp of 1.0f

# A subprocess that runs a batch must finish well within this (seconds); it only
# guards against a hang turning into a stuck test run.
SUBPROCESS_TIMEOUT = 300


# ---------------------------------------------------------------------------
# ISA selection
# ---------------------------------------------------------------------------

def best_isa() -> str:
    import pykernels

    return pykernels.cpu_info().supported_isa


def supported_isas() -> tuple:
    """Every ISA path this machine can run, lowest first."""
    best = best_isa()
    return ISA_ORDER[: ISA_ORDER.index(best) + 1]


def current_isa() -> str:
    """The ISA path of *this* process (the default in-process)."""
    import pykernels

    return pykernels.cpu_info().isa


@pytest.fixture(params=ISA_ORDER)
def isa(request) -> str:
    """Each ISA path; the ones this CPU does not support are skipped."""
    name = request.param
    best = best_isa()
    if ISA_ORDER.index(name) > ISA_ORDER.index(best):
        pytest.skip(f"this CPU supports up to {best!r}, not {name!r}")
    return name


def subprocess_env(isa: str | None = None, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PYKERNELS_ISA", None)
    if isa is not None:
        env["PYKERNELS_ISA"] = isa
    path = [REPO_ROOT, TESTS_DIR]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def run_python(code: str, *, env: dict, timeout: float = SUBPROCESS_TIMEOUT):
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_under_isa(isa: str | None, code: str, *, timeout: float = SUBPROCESS_TIMEOUT,
                  **extra_env: str):
    """Run ``code`` in a fresh interpreter with ``PYKERNELS_ISA=isa`` (None: unset)."""
    return run_python(code, env=subprocess_env(isa, **extra_env), timeout=timeout)


def run_json_under_isa(isa: str | None, code: str, *, timeout: float = SUBPROCESS_TIMEOUT,
                       **extra_env: str):
    """Run ``code`` (which prints one JSON object last) and return that object."""
    proc = run_under_isa(isa, code, timeout=timeout, **extra_env)
    if proc.returncode != 0:
        pytest.fail(f"subprocess (PYKERNELS_ISA={isa}) exited with {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        pytest.fail(f"subprocess printed nothing\n--- stderr ---\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def run_call_under_isa(isa: str | None, module: str, call: str):
    """Evaluate ``call`` (an expression on the test module ``module``, giving
    JSON-able data) in a fresh interpreter with ``PYKERNELS_ISA=isa``."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {TESTS_DIR!r})\n"
        f"import {module}\n"
        f"print(json.dumps({call}))\n"
    )
    return run_json_under_isa(isa, code)


# ---------------------------------------------------------------------------
# Batches: what one subprocess per ISA runs
# ---------------------------------------------------------------------------

def case_items(cases, run_case):
    """(id, fn) items for ``cases``: fn(isa) -> ``run_case(case, isa)``."""
    for c in cases:
        yield c.id, functools.partial(run_case, c)


def check_items(checks):
    """(id, fn) items for (id, check) pairs: a check asserts, so fn(isa) returns None."""
    for cid, fn in checks:
        def run(isa, fn=fn):
            fn(isa)
            return None
        yield cid, run


def run_batch_items(items, isa: str, known_bugs) -> dict:
    """Run every (id, fn) item on ``isa``, skipping the ids in ``known_bugs``;
    report the failures (an AssertionError or other exception counts as one)."""
    count = skipped = 0
    failures = []
    for cid, fn in items:
        if cid in known_bugs:
            skipped += 1
            continue
        count += 1
        try:
            msg = fn(isa)
        except AssertionError as e:
            msg = f"AssertionError: {e}"
        except Exception as e:  # noqa: BLE001
            msg = f"raised {type(e).__name__}: {e}"
        if msg:
            failures.append(f"{cid}: {msg}")
    return {"isa": isa, "count": count, "skipped_known_bugs": skipped,
            "nfail": len(failures), "failures": failures[:25]}


def assert_batch_passed(res: dict, isa: str, batch: str) -> None:
    """The report of ``run_batch_items`` for ``batch``: ran on ``isa``, ran
    something, and nothing failed."""
    assert res["isa"] == isa, f"PYKERNELS_ISA={isa} ran {res['isa']!r}"
    assert res["count"] > 0
    assert res["nfail"] == 0, (f"{res['nfail']}/{res['count']} {batch} cases failed on {isa}:\n"
                               + "\n".join(res["failures"]))


def special_params(checks, known_bugs):
    """``pytest.param`` per (id, check); the ids in ``known_bugs`` (id -> reason)
    are xfail(strict=True)."""
    for cid, fn in checks:
        marks = ()
        if cid in known_bugs:
            marks = pytest.mark.xfail(strict=True, raises=(ValueError, AssertionError),
                                      reason=known_bugs[cid])
        yield pytest.param(fn, id=cid, marks=marks)


# ---------------------------------------------------------------------------
# Pickles with hand-made reconstructor arguments
# ---------------------------------------------------------------------------

class CraftedPickle:
    """Pickles as ``fn(*args)``: hand-made (e.g. corrupted) arguments for a
    reconstructor such as the one ``PackedWeight.__reduce__`` names."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ---------------------------------------------------------------------------
# Float64 reference and derived tolerance
# ---------------------------------------------------------------------------

def gemm_tolerance(mag, k: int, isa: str):
    """Per-element bound on |kernel - float64 reference| for an fp32 GEMM.

    The inputs are exact fp32 values, so every error comes from the kernel's own
    roundings, each a relative error of at most eps32/2:

    * accumulation: K multiply-adds per element. With an FMA (avx2, avx512) each
      step rounds once; the generic path computes a*b + c with two roundings
      (product, then sum), so its constant doubles. Rounding errors of
      independent data add like a random walk, so the accumulated error is
      ~ sqrt(K) * eps32 * (|a| @ |b|) (Higham & Mary's probabilistic bound; the
      worst case is K * eps32, which the bound below also covers for K <= 9).
    * epilogue: alpha * acc, + beta * C and the final store: a few more
      roundings of terms bounded by the same magnitude.

        |err| <= eps32 * (c * sqrt(K) + 3) * (|alpha| * |a| @ |b| + |beta| * |C0|)
        c = 2 with FMA, c = 4 on the generic path (a*b + c rounded twice).
    """
    c = 4.0 if isa == "generic" else 2.0
    return EPS32 * (c * np.sqrt(max(int(k), 1)) + 3.0) * mag


def gemm_mismatch(got, ref, mag, k: int, isa: str) -> str | None:
    """None if ``got`` is within ``gemm_tolerance`` of ``ref`` everywhere, else why not."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        return f"shape {got.shape}, expected {ref.shape}"
    if got.dtype != np.float32:
        return f"dtype {got.dtype}, expected float32"
    if got.size == 0:
        return None
    err = np.abs(got.astype(np.float64) - ref)
    tol = gemm_tolerance(mag, k, isa)
    bad = ~(err <= tol)  # NaN in got counts as bad
    if not bad.any():
        return None
    idx = np.unravel_index(int(np.argmax(np.where(bad, np.nan_to_num(err / np.maximum(tol, 1e-300),
                                                                        nan=np.inf), -1))),
                           got.shape)
    return (f"{int(bad.sum())}/{got.size} elements out of tolerance; worst at {idx}: "
            f"got {got[idx]!r}, expected {ref[idx]!r}, |err| {err[idx]:.3g} > tol {tol[idx]:.3g}")


def assert_gemm_close(got, ref, mag, k: int, isa: str | None = None) -> None:
    msg = gemm_mismatch(got, ref, mag, k, isa or current_isa())
    assert msg is None, msg


# ---------------------------------------------------------------------------
# Native test drivers (tests/native/*.cc)
# ---------------------------------------------------------------------------

def build_native_driver(name: str, sources: list, deps: list, *, include_dirs: tuple = (),
                        flags: tuple = ("-O0",)) -> str:
    """Builds ``sources`` (repository-relative) into ``build/native-tests/<name>-<hash>``
    unless a binary for the same ``sources + deps`` content and flags exists, and
    returns its path. -O0 by default: these drivers check logic on small shapes,
    and their template-heavy units compile several times faster than at -O1."""
    import hashlib
    import shutil

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip(f"no C++ compiler to build {name}")
    h = hashlib.sha256(repr((flags, tuple(include_dirs))).encode())
    for rel in list(sources) + list(deps):
        with open(os.path.join(REPO_ROOT, rel), "rb") as f:
            h.update(f.read())
    out_dir = os.path.join(REPO_ROOT, "build", "native-tests")
    exe = os.path.join(out_dir, f"{name}-{h.hexdigest()[:16]}")
    if not os.path.exists(exe):
        os.makedirs(out_dir, exist_ok=True)
        cmd = [cxx, "-std=c++17", *flags]
        for inc in (*include_dirs, os.path.join(REPO_ROOT, "csrc", "include")):
            cmd += ["-I", inc]
        cmd += [os.path.join(REPO_ROOT, s) for s in sources] + ["-pthread", "-o", exe + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        os.replace(exe + ".tmp", exe)
    return exe


def float32_result_problem(got, shape) -> str | None:
    """Why ``got`` is not a float32 array of ``shape`` (None if it is): the
    first check of every element-wise result comparison."""
    if got.dtype != np.float32:
        return f"dtype {got.dtype}, expected float32"
    if got.shape != shape:
        return f"shape {got.shape}, expected {shape}"
    return None
