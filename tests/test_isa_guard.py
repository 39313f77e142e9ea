"""No AVX instruction outside the per-ISA namespaces of the built module.

The runtime, the bindings, the generic kernels and pybind11's own code are
compiled for the x86-64 baseline and run on any CPU; only code in ``pk::avx2::``
and ``pk::avx512::`` (reached through the dispatch table after CPUID + XCR0
said yes) may use AVX. A template or inline function compiled inside an AVX
translation unit and merged by the linker with a baseline copy would break that
silently, and only on old CPUs. So the disassembly of the shipped ``_core`` is
checked: every function that touches a ``zmm`` register is in ``pk::avx512::``;
every function that touches a ``ymm`` register or executes any VEX/EVEX-encoded
instruction (mnemonics starting with ``v``: vmovss, vfmadd231ps, vzeroupper...)
is in ``pk::avx2::`` or ``pk::avx512::``.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import pykernels._core as core

FUNC_RE = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# "    7004:\tmov    0xbafad(%rip),%rax" (with --no-show-raw-insn)
INSN_RE = re.compile(r"^\s+[0-9a-f]+:\t(.*)$")
# Prefixes objdump prints before the mnemonic.
PREFIXES = {"lock", "rep", "repz", "repe", "repnz", "repne", "notrack", "bnd", "data16",
            "addr32", "cs", "ds", "es", "ss", "fs", "gs", "xacquire", "xrelease", "rex",
            "rex.w", "rex.b", "rex.r", "rex.x"}
AVX2_NS = ("pk::avx2::", "pk::avx512::")
AVX512_NS = ("pk::avx512::",)


def _mnemonic(insn: str) -> str:
    for tok in insn.split():
        if tok.startswith("{"):  # {vex}, {evex} pseudo-prefixes
            continue
        if tok in PREFIXES:
            continue
        return tok
    return ""


@pytest.fixture(scope="module")
def functions():
    """{demangled function name: (uses_zmm, uses_ymm, set of VEX mnemonics)}."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed: cannot inspect the built module")
    so = core.__file__
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", so],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    funcs: dict = {}
    current = None
    ninsn = 0
    for line in proc.stdout.splitlines():
        m = FUNC_RE.match(line)
        if m:
            current = m.group(1)
            funcs.setdefault(current, [False, False, set()])
            continue
        m = INSN_RE.match(line)
        if not m or current is None:
            continue
        insn = m.group(1)
        ninsn += 1
        entry = funcs[current]
        if "%zmm" in insn:
            entry[0] = True
        if "%ymm" in insn:
            entry[1] = True
        mn = _mnemonic(insn)
        if mn.startswith("v"):
            entry[2].add(mn)
    assert len(funcs) > 100 and ninsn > 10_000, "disassembly looks truncated"
    return funcs


def _offenders(funcs, pred, allowed):
    return sorted(name for name, info in funcs.items()
                  if pred(info) and not any(ns in name for ns in allowed))


def _report(bad, funcs, what):
    lines = []
    for name in bad[:40]:
        zmm, ymm, vex = funcs[name]
        lines.append(f"  {name}\n      zmm={zmm} ymm={ymm} vex={sorted(vex)[:8]}")
    return (f"{len(bad)} function(s) outside {what} use AVX and could run on a baseline "
            "CPU:\n" + "\n".join(lines))


def test_parser_sees_the_avx_kernels(functions):
    """Guard against a vacuous pass: the AVX2 kernels must show up as AVX users."""
    avx2_users = [n for n, (z, y, v) in functions.items() if "pk::avx2::" in n and (y or v)]
    assert avx2_users, "found no AVX code in pk::avx2:: - is the parser broken?"


def test_zmm_only_in_avx512_namespace(functions):
    bad = _offenders(functions, lambda info: info[0], AVX512_NS)
    assert not bad, _report(bad, functions, "pk::avx512::")


def test_ymm_and_vex_only_in_avx_namespaces(functions):
    bad = _offenders(functions, lambda info: info[1] or bool(info[2]), AVX2_NS)
    assert not bad, _report(bad, functions, "pk::avx2:: / pk::avx512::")


def test_avx2_namespace_uses_no_zmm(functions):
    """The AVX2 path runs on CPUs without AVX-512: no zmm in pk::avx2::."""
    bad = sorted(n for n, (z, y, v) in functions.items()
                 if z and "pk::avx2::" in n and "pk::avx512::" not in n)
    assert not bad, _report(bad, functions, "pk::avx512:: (found in pk::avx2::)")


def test_vnni_only_where_dispatch_checks_for_it(functions):
    """vpdpbusd(s) runs only on CPUs with AVX-VNNI or AVX512_VNNI, which dispatch
    checks before taking the int8 entries of pk::avx2::vnni:: (AVX-VNNI) or
    avx512::kI8Vnni: the plain AVX2 and AVX-512F units must not contain it."""
    vnni = {"vpdpbusd", "vpdpbusds", "vpdpwssd", "vpdpwssds"}
    users = {n for n, (z, y, v) in functions.items() if v & vnni}
    assert any("pk::avx2::vnni::" in n for n in users), "no vpdpbusd in pk::avx2::vnni:: - parser?"
    assert any("VIVnni" in n and "pk::avx512::" in n for n in users), "no vpdpbusd in the avx512 VNNI tiles"
    bad = sorted(n for n in users if "pk::avx2::vnni::" not in n
                 and not ("pk::avx512::" in n and "VIVnni" in n))
    assert not bad, _report(bad, functions, "the VNNI tiles")


def test_bf16_dot_only_where_dispatch_checks_for_it(functions):
    """vdpbf16ps (and the AVX512_BF16 conversions) run only on CPUs with
    AVX512_BF16, which set_bf16_scheme("dpbf16ps") and the peak probe check
    before running the tiles (tile_dpbf16 / FormatBF16Dot, avx512::kBF16Dot)
    or the probe (dpbf16): no other function of the AVX-512 unit may contain them."""
    bf16 = {"vdpbf16ps", "vcvtne2ps2bf16", "vcvtneps2bf16"}
    users = {n for n, (z, y, v) in functions.items() if v & bf16}
    assert any("BF16Dot" in n or "tile_dpbf16" in n for n in users), \
        "no vdpbf16ps in the dpbf16 tiles - parser?"
    bad = sorted(n for n in users
                 if not ("pk::avx512::" in n and ("dpbf16" in n or "BF16Dot" in n)))
    assert not bad, _report(bad, functions, "the dpbf16 tiles and probe")
