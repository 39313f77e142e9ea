"""The AVX-512 and AVX-VNNI GEMM units, executed without those instructions (issue 3).

``csrc/kernels/avx512/gemm_avx512.cc`` and ``csrc/kernels/avx2/gemm_avx2_vnni.cc``
are compiled unchanged against SIMDe's portable implementations of the
intrinsics (``tests/native/simde_shim/immintrin.h``) into a test driver, so
their fp32, bf16 (widen_fma and vdpbf16ps), int8 (vpmaddwd), int8 AVX512_VNNI
and int8 AVX-VNNI (vpdpbusd) tiles run on any x86-64 -- this project's development machines have AVX2 only.
The driver (``tests/native/gemm_avx512_simde.cc``) checks every (precision,
variant) of those tables against the generic path on the same packed weights: int8
bit-identical, fp32/bf16 within an accumulation-order bound; both bf16 schemes
also against a float64 product of the bf16-rounded inputs, within the bound
gemm.h states. What this cannot
show: SIMDe's emulation of each intrinsic is trusted to match the hardware,
and nothing here measures speed.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT, build_native_driver

simde_py = pytest.importorskip("simde_py", reason="simde-py (the test extra) provides SIMDe")

SOURCES = ["tests/native/gemm_avx512_simde.cc", "csrc/kernels/avx512/gemm_avx512.cc",
           "csrc/kernels/avx2/gemm_avx2_vnni.cc",
           "csrc/kernels/reference/gemm_generic.cc", "csrc/runtime/pack.cc",
           "csrc/runtime/threadpool.cc", "csrc/runtime/workspace.cc", "csrc/runtime/cpu.cc"]
DEPS = ["tests/native/simde_shim/immintrin.h", "csrc/kernels/common/gemm_impl.inc",
        "csrc/kernels/common/gemm_tiles.inc", "csrc/kernels/common/gemm_latency.inc",
        "csrc/kernels/common/gemm_rows.inc", "csrc/kernels/common/gemm_throughput.inc",
        "csrc/kernels/avx2/gemm_avx2_traits.inc", "csrc/kernels/avx2/vec_avx2.inc",
        "csrc/kernels/avx512/vec_avx512.inc", "csrc/kernels/reference/vec_generic.inc",
        "csrc/kernels/common/quantize.inc", "csrc/include/pykernels/gemm.h",
        "csrc/include/pykernels/runtime.h",
        "csrc/include/pykernels/prefetch.h"]


def test_avx512_gemm_tables_match_generic_under_simde():
    exe = build_native_driver(
        "gemm_avx512_simde", SOURCES, DEPS, flags=("-O0", "-w"),
        include_dirs=(os.path.join(REPO_ROOT, "tests", "native", "simde_shim"),
                      simde_py.get_include()))
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.endswith(" 0 failures"), summary
    # 84 cases x 2 variants x 2 blockings x 2 thread counts x (4 precisions of
    # avx512::kGemm + the int8 and int8_7bit of kI8Vnni / kI8A7Vnni and of
    # kI8AvxVnni / kI8A7AvxVnni + the bf16 of kBF16Dot, the vdpbf16ps scheme)
    assert int(summary.split()[2]) >= 84 * 2 * 2 * 2 * 9, summary
