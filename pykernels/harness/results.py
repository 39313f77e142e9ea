"""What every ``pykernels bench`` suite does with its records: compare a
result with its reference, pick the best, format table cells, parse a list
option, write the ``--json`` document (schema ``pykernels-bench/1``) and turn
a failure into the exit status.

Contract: records are the plain dicts ``timing.time_checked`` fills; nothing
here times or runs a kernel.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from .machine import cpu_info_dict, git_commit, machine_record

def fmt_time(s: Optional[float]) -> str:
    """3 significant figures in us, ms or s: '1.60 us', '34.2 us', '5.65 ms'."""
    if s is None or not math.isfinite(s):
        return "-"
    for scale, unit in ((1e6, "us"), (1e3, "ms"), (1.0, "s")):
        v = s * scale
        if v < 1000 or unit == "s":
            if v < 10:
                return f"{v:.2f} {unit}"
            if v < 100:
                return f"{v:.1f} {unit}"
            return f"{v:.0f} {unit}"
    return "-"


def to_numpy32(result) -> np.ndarray:
    """A kernel's result as float32 NumPy (torch tensors of any dtype included)."""
    if isinstance(result, np.ndarray):
        return result
    if hasattr(result, "detach"):  # torch.Tensor
        return result.detach().float().numpy()
    return np.asarray(result, dtype=np.float32)


def runnable_baselines(cases, torch, enabled: bool = True) -> list:
    """The baseline ``cases`` to time: none when not ``enabled``, torch's only
    when torch imported."""
    if not enabled:
        return []
    return [c for c in cases if c.impl != "torch" or torch is not None]


def machine_line(info, version: str) -> str:
    """The machine in a suite's first line: 'isa avx2 (vendor model, 2 cores),
    pykernels 0.1.0' for ``info = pykernels.cpu_info()``."""
    return (f"isa {info.isa} ({info.vendor} {info.model}, {info.cores} cores), "
            f"pykernels {version}")


def best_record(recs: List[dict], **match) -> Optional[dict]:
    """The fastest correct, timed record whose fields equal ``match``, or None."""
    ok = [r for r in recs if r.get("ok") and "median_s" in r
          and all(r.get(k) == v for k, v in match.items())]
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def group_records(results: List[dict], keys: Tuple[str, ...]) -> Dict[tuple, List[dict]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def cell_time(rec: Optional[dict]) -> str:
    if rec is None:
        return "-"
    if "error" in rec:
        return "ERROR"
    if not rec.get("ok", False):
        return "WRONG"
    return fmt_time(rec["median_s"])


def baseline_cell(b: Optional[dict], ratio_width: int = 6) -> str:
    """A summary cell for one baseline (``None``: it did not run): its median and
    its median / our best, 10 + ``ratio_width`` characters wide."""
    if b is None:
        return f"{'-':>{10 + ratio_width}}"
    ratio = f"{b['ratio']:.2f}x" if b["ratio"] is not None else "-"
    return f"{fmt_time(b['median_s']):>9} {ratio:>{ratio_width}}"


def split_choices(text: str, choices, what: str) -> Tuple[str, ...]:
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in got if x not in choices]
    if bad or not got:
        raise ValueError(f"bad {what} {bad[0] if bad else text!r}: expected a comma-separated "
                         f"subset of {','.join(choices)}")
    return got


def write_bench_json(path: str, suite: str, *, torch, have_tpc: bool, peak_core: float,
                     peak_src: str, quick: bool, budget: float, min_reps: int, rel_tol,
                     results: List[dict], summary: List[dict], **extra) -> None:
    """The ``--json`` document every ``pykernels bench`` suite writes
    (schema ``pykernels-bench/1``): the machine, the settings, the records."""
    doc = {
        "schema": "pykernels-bench/1",
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "machine": machine_record(),
        "torch_version": getattr(torch, "__version__", None),
        "numpy_version": np.__version__,
        "git_commit": git_commit(),
        "cpu_info": cpu_info_dict(),
        "blas_threads_limited": have_tpc,
        "peak_gflops_per_core": peak_core,
        "peak_source": peak_src,
        "quick": bool(quick),
        "budget_s": budget,
        "min_reps": min_reps,
        "rel_tol": rel_tol,
        "results": results,
        "summary": summary,
    }
    doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def finish_bench(path: Optional[str], failed: bool, out, suite: str, **doc) -> int:
    """The end of every ``pykernels bench`` suite: write the ``--json`` document
    (``write_bench_json(path, suite, **doc)``) when ``path`` is given, and return
    the exit status, 1 when a pykernels result was wrong or did not run."""
    if path:
        write_bench_json(path, suite, **doc)
        print(f"wrote {path}", file=out)
    if failed:
        print("FAILED: a pykernels result was wrong or did not run (see rows marked WRONG/ERROR)",
              file=sys.stderr)
        return 1
    return 0


# fp32 GEMM error grows like sqrt(K)*eps: at K=4096, 64 * 6e-8 ~ 4e-6, so 1e-4
