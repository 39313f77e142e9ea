"""What a benchmark figure was measured on: the machine record (CPU, ISA,
threads, environment, versions, BLAS, commit) written into every ``--json``
file and pytest-benchmark's machine_info, and the ``pykernels info`` report.

Contract: plain JSON-able data; ``format_info`` only formats a record.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from typing import List, Optional

import numpy as np

import pykernels as pk

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> Optional[dict]:
    """The commit of the source tree pykernels was imported from, or None.

    Returns {"id": sha, "dirty": bool} when the package sits in a git
    checkout (editable install or PYTHONPATH), None for an installed wheel.
    """
    try:
        sha = subprocess.run(["git", "-C", _REPO_ROOT, "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", _REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5)
        return {"id": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info_dict() -> dict:
    d = dataclasses.asdict(pk.cpu_info())
    d["features"] = sorted(d["features"])
    return d


def blas_info() -> List[dict]:
    """The BLAS libraries loaded in this process (threadpoolctl), or []."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads",
            "threading_layer", "architecture")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


def machine_record() -> dict:
    """Everything a benchmark figure depends on, as plain JSON-able data."""
    rec = {
        "pykernels_version": pk.__version__,
        "git_commit": git_commit(),
        "cpu_info": cpu_info_dict(),
        "num_threads": pk.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("PYKERNELS_ISA", "PYKERNELS_NUM_THREADS",
                                               "PYKERNELS_PEAK_GFLOPS", "OMP_NUM_THREADS",
                                               "OPENBLAS_NUM_THREADS")},
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "platform": platform.platform(),
    }
    try:
        import scipy
        rec["scipy_version"] = scipy.__version__
    except ImportError:
        rec["scipy_version"] = None
    rec["blas"] = blas_info()
    return rec


def _fmt_bytes(n: int) -> str:
    if n <= 0:
        return "?"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def info_record(fork_join: bool = True, peak: bool = False, refresh_peak: bool = False) -> dict:
    """``machine_record()`` plus the kernel registry and, when ``fork_join``, the
    thread pool's fork/join cost (spinning and parked) at 2 and the default
    thread count; with ``peak``, the measured instruction peaks and read
    bandwidth (``pykernels.measure_peaks``): what ``pykernels info`` prints."""
    rec = machine_record()
    if peak:
        rec["peaks"] = dataclasses.asdict(pk.measure_peaks(refresh=refresh_peak))
    rec["kernels"] = [dataclasses.asdict(e) for e in pk.kernels()]
    rec["bf16_scheme"] = pk.explain_bf16_scheme()
    fj = []
    if fork_join:
        for threads in sorted({2, pk.get_num_threads()}):
            fj.append({"threads": threads,
                       "spin_us": pk.fork_join_us(threads, spin=True),
                       "park_us": pk.fork_join_us(threads, spin=False)})
    rec["fork_join"] = fj
    return rec


def format_info(rec: dict) -> str:
    """The human-readable ``pykernels info`` text of an ``info_record``."""
    ci = rec["cpu_info"]
    env = rec["env"]
    commit = rec["git_commit"]
    lines = [
        f"pykernels {rec['pykernels_version']}"
        + (f" (commit {commit['id'][:12]}{', modified' if commit['dirty'] else ''})"
           if commit else "")
        + f", Python {rec['python']}, NumPy {rec['numpy_version']}",
        f"cpu            {ci['vendor']} {ci['model']}",
        f"isa            {ci['isa']} in use; supported: {ci['supported_isa']}"
        + (f" (capped by PYKERNELS_ISA={env['PYKERNELS_ISA']})" if env["PYKERNELS_ISA"] else ""),
        f"features       {' '.join(ci['features']) or '-'}",
        f"cores          {ci['cores']}",
        f"caches         L1d {_fmt_bytes(ci['l1d_bytes'])}, L2 {_fmt_bytes(ci['l2_bytes'])}, "
        f"L3 {_fmt_bytes(ci['l3_bytes'])}",
        "gemm blocking  " + ", ".join(f"{k}={v}" for k, v in ci["gemm_blocking"].items()),
        f"threads        {rec['num_threads']}"
        + (f" (PYKERNELS_NUM_THREADS={env['PYKERNELS_NUM_THREADS']})"
           if env["PYKERNELS_NUM_THREADS"] else " (set with PYKERNELS_NUM_THREADS)"),
    ]
    for f in rec["fork_join"]:
        lines.append(f"fork/join      {f['spin_us']:.2f} us spinning, {f['park_us']:.2f} us "
                     f"parked ({f['threads']} threads; median cost of one empty parallel "
                     f"region)")
    for lib in rec["blas"]:
        lines.append(f"numpy blas     {lib['internal_api']} {lib['version']} "
                     f"({lib['num_threads']} threads, {lib['threading_layer']}, "
                     f"{lib['architecture']})")
    if rec.get("peaks"):
        lines += _format_peaks(rec["peaks"])
    if rec.get("bf16_scheme"):
        lines.append(f"bf16 scheme    {rec['bf16_scheme']}")
    lines.append("kernels")
    ks = rec["kernels"]
    ks = [dict(k, tile="-" if k["mr"] is None else f"{k['mr']}x{k['nr']}") for k in ks]
    cols = ("op", "variant", "precision", "isa", "scheme", "tile", "name")
    widths = [max([len(c)] + [len(str(k[c])) for k in ks]) for c in cols]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for k in ks:
        lines.append("  " + "  ".join(str(k[c]).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


_PEAK_UNITS = {"fp32_fma": "GFLOP/s", "bf16_dpbf16ps": "GFLOP/s"}


def _format_peaks(p: dict) -> List[str]:
    """The measured-peaks lines of ``pykernels info --peak``."""
    lines = [f"peaks          measured on 1 and {p['threads']} threads (best of 7; the roofline "
             f"every bench table's %peak is taken against)"]
    for name, r in p["ops"].items():
        unit = _PEAK_UNITS.get(name, "GOP/s")
        lines.append(f"  {name:<18} {r['one_thread']:8.1f} {unit} on 1 thread, "
                     f"{r['all_threads']:8.1f} on {p['threads']}")
    for level, r in p["read_gbs"].items():
        size = _fmt_bytes(p["working_set"].get(level, 0))
        lines.append(f"  read {level:<13} {r['one_thread']:8.1f} GB/s on 1 thread, "
                     f"{r['all_threads']:8.1f} on {p['threads']} ({size} working set)")
    return lines
