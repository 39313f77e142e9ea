"""Profile: measured service times of pykernels' kernels on this machine.

A table of cells, one per (op shape, variant, precision, threads, batch
bucket), each with the p50 and p99 of repeated closed-loop runs in ms and the
sample count; batch buckets are in items of the op's shape. Built by
``Profile.calibrate`` (measurements from ``calibration``), read from
pytest-benchmark JSON (``from_pytest_benchmark``; the ``extra_info``
convention is in docs/policy.md) or by hand (``add``). ``save``/``load`` keep
versioned JSON in the user cache, keyed by CPU, ISA, library version and
kernel set; a bad or stale file warns (``ProfileWarning``), never raises.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import pykernels
from pykernels import work as _ops
from pykernels.work import Model, Op

from . import calibration

FORMAT = "pykernels-profile"
SCHEMA = 1


class ProfileWarning(UserWarning):
    """A profile file was missing, unreadable, corrupt or stale."""


@dataclass(frozen=True)
class Measurement:
    """One cell: ``batch`` items of shape ``op`` (an op key) run with
    (variant, precision, threads); service time p50 and p99 in milliseconds."""

    op: str
    variant: str
    precision: str
    threads: int
    batch: int
    p50_ms: float
    p99_ms: float
    samples: int = 1


def _finite_pos(name, v) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return f


def _pos_int(name, v) -> int:
    if isinstance(v, bool) or int(v) != v or int(v) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def cache_dir() -> Path:
    """``$PYKERNELS_CACHE`` if set, else the user cache directory for pykernels."""
    env = os.environ.get("PYKERNELS_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
        return Path(platformdirs.user_cache_dir("pykernels"))
    except ImportError:  # pragma: no cover - platformdirs is a declared dependency
        return Path(os.path.expanduser("~/.cache/pykernels"))


def current_key() -> dict:
    """What a profile must have been measured on to be valid here."""
    try:
        info = pykernels.cpu_info()
        vendor, model, isa, cores = info.vendor, info.model, info.isa, int(info.cores)
    except Exception:  # pragma: no cover
        vendor, model, isa, cores = "unknown", "unknown", "unknown", os.cpu_count() or 1
    return {
        "cpu_vendor": vendor,
        "cpu_model": model,
        "isa": isa,
        "cores": cores,
        "library_version": getattr(pykernels, "__version__", "unknown"),
        "kernels": _ops.kernel_names(),
        "kernel_tiles": _ops.tile_records(),
    }


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-") or "unknown"


def default_path(key: Optional[dict] = None) -> Path:
    k = key or current_key()
    name = "profile-{}-{}-{}-v{}.json".format(_slug(k["cpu_vendor"]), _slug(k["cpu_model"]),
                                              _slug(k["isa"]), _slug(k["library_version"]))
    return cache_dir() / name


def _key_mismatch(found: dict, want: dict) -> Optional[str]:
    labels = {"cpu_vendor": "CPU vendor", "cpu_model": "CPU model", "isa": "ISA",
              "cores": "core count", "library_version": "pykernels version",
              "kernels": "kernel set"}
    for field_, label in labels.items():
        if found.get(field_) != want.get(field_):
            if field_ == "kernels":
                a, b = set(found.get("kernels") or ()), set(want.get("kernels") or ())
                return (f"the {label} changed ({len(b - a)} kernels added, {len(a - b)} removed "
                        f"since it was measured)")
            return f"it was measured with {label} {found.get(field_)!r}, this machine has {want.get(field_)!r}"
    return None


class Profile:
    """Measured service times (p50, p99) per op shape x variant x precision x threads x batch.

    Build one with ``Profile.calibrate()``, ``Profile.load()``,
    ``Profile.from_pytest_benchmark()`` or by hand with ``add()``.
    """

    def __init__(self, measurements: Iterable[Measurement] = (), *, ops: Optional[dict] = None,
                 key: Optional[dict] = None, precision_error: Optional[Dict[str, float]] = None,
                 source: str = "manual", created: Optional[float] = None):
        self.ops: Dict[str, Op] = dict(ops or {})
        self.key: Optional[dict] = dict(key) if key else None
        self.precision_error: Dict[str, float] = dict(precision_error or {})
        self.source = source
        self.created = created
        self._cells: Dict[Tuple[str, str, str, int, int], Measurement] = {}
        for m in measurements:
            self._put(m)

    # --- building -----------------------------------------------------------
    def _put(self, m: Measurement) -> None:
        if m.op not in self.ops:
            raise ValueError(f"measurement for unknown op key {m.op!r}")
        self._cells[(m.op, m.variant, m.precision, m.threads, m.batch)] = m

    def add(self, op: Op, variant: str, precision: Optional[str], threads: int, batch: int,
            p50_ms: float, p99_ms: Optional[float] = None, samples: int = 1) -> "Profile":
        """Record one cell. ``batch`` counts items of ``op`` (converted to the
        measured shape's units, e.g. rows for a Linear with rows_per_item).
        Returns self, so calls chain."""
        if isinstance(op, Model):
            raise ValueError("record the parts of a Model, not the Model itself")
        precision = precision or op.precision or "fp32"
        base = op.base()
        p50 = _finite_pos("p50_ms", p50_ms)
        p99 = p50 if p99_ms is None else _finite_pos("p99_ms", p99_ms)
        if p99 < p50:
            raise ValueError(f"p99_ms ({p99_ms}) is below p50_ms ({p50_ms})")
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"variant must be a non-empty string, got {variant!r}")
        units = op.units(_pos_int("batch", batch))
        self.ops.setdefault(base.key, base)
        self._put(Measurement(base.key, variant, precision, _pos_int("threads", threads), units,
                              p50, p99, _pos_int("samples", samples)))
        return self

    def merge(self, other: "Profile") -> "Profile":
        """A new profile with the cells of both; ``other`` wins on the same cell."""
        out = self.copy()
        out.ops.update(other.ops)
        out.precision_error.update(other.precision_error)
        for m in other.measurements:
            out._put(m)
        return out

    def copy(self) -> "Profile":
        return Profile(self.measurements, ops=self.ops, key=self.key,
                       precision_error=self.precision_error, source=self.source,
                       created=self.created)

    # --- reading ------------------------------------------------------------
    @property
    def measurements(self) -> List[Measurement]:
        return [self._cells[k] for k in sorted(self._cells)]

    def __len__(self) -> int:
        return len(self._cells)

    def __repr__(self) -> str:
        return (f"Profile({len(self)} cells, {len(self.ops)} shapes, groups={len(self.groups())}, "
                f"source={self.source!r})")

    def groups(self) -> List[Tuple[str, str, str, int]]:
        """Sorted (kind, variant, precision, threads) present."""
        return sorted({(self.ops[m.op].kind, m.variant, m.precision, m.threads)
                       for m in self._cells.values()})

    def table(self, op_key: str, variant: str, precision: str, threads: int) -> List[Measurement]:
        """Cells of one (shape, variant, precision, threads), sorted by batch."""
        return sorted((m for m in self._cells.values()
                       if m.op == op_key and m.variant == variant and m.precision == precision
                       and m.threads == threads), key=lambda m: m.batch)

    # --- (de)serialization --------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "schema": SCHEMA,
            "key": self.key or current_key(),
            "source": self.source,
            "created_unix": self.created,
            "precision_error": dict(sorted(self.precision_error.items())),
            "ops": {k: self.ops[k].spec() for k in sorted(self.ops)},
            "measurements": [asdict(m) for m in self.measurements],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        """Parse and validate; raises ValueError on anything malformed."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a pykernels profile (missing format tag)")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r} (this library reads schema {SCHEMA})")
        try:
            key = d["key"]
            if not isinstance(key, dict):
                raise ValueError("key must be an object")
            ops = {}
            for k, spec in d["ops"].items():
                op = _ops.from_spec(spec)
                if op.key != k:
                    raise ValueError(f"op key {k!r} does not match its spec ({op.key!r})")
                ops[k] = op
            perr = {str(p): float(v) for p, v in (d.get("precision_error") or {}).items()}
            ms = []
            for r in d["measurements"]:
                p50 = _finite_pos("p50_ms", r["p50_ms"])
                p99 = _finite_pos("p99_ms", r["p99_ms"])
                if p99 < p50:
                    raise ValueError(f"p99_ms {p99} < p50_ms {p50}")
                ms.append(Measurement(str(r["op"]), str(r["variant"]), str(r["precision"]),
                                      _pos_int("threads", r["threads"]),
                                      _pos_int("batch", r["batch"]), p50, p99,
                                      _pos_int("samples", r.get("samples", 1))))
            created = d.get("created_unix")
            return cls(ms, ops=ops, key=key, precision_error=perr,
                       source=str(d.get("source", "file")),
                       created=float(created) if created is not None else None)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed profile: {type(e).__name__}: {e}") from None

    def save(self, path=None) -> Path:
        """Write versioned JSON (atomically) to ``path`` or the default cache
        file for this machine; returns the path."""
        p = Path(path) if path is not None else default_path(self.key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path=None, *, recalibrate: bool = False, quick: bool = True,
             progress: bool = True, check_key: bool = True) -> Optional["Profile"]:
        """Read a profile; never raises for a bad file.

        A missing file returns None (or a fresh calibration with
        ``recalibrate=True``). A corrupt, truncated, foreign-schema or stale
        file (other CPU, ISA, core count, library version or kernel set; skip
        that check with ``check_key=False``) is reported with a
        ``ProfileWarning``, then recalibrated and saved in its place with
        ``recalibrate=True``, or ignored (None).
        """
        p = Path(path) if path is not None else default_path()
        problem = None
        prof = None
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as e:
            text = None
            problem = f"cannot be read ({e})"
        if text is not None:
            try:
                prof = cls.from_dict(json.loads(text))
            except json.JSONDecodeError as e:
                problem = f"is corrupt or truncated ({e.msg} at line {e.lineno})"
            except (ValueError, RecursionError) as e:
                problem = f"is not a valid profile: {e}"
            if prof is not None and check_key:
                why = _key_mismatch(prof.key or {}, current_key())
                if why:
                    problem = f"is stale: {why}"
                    prof = None
        if prof is not None:
            return prof
        if problem:
            warnings.warn(f"pykernels profile {p} {problem}; "
                          + ("recalibrating." if recalibrate else "ignoring it."),
                          ProfileWarning, stacklevel=2)
        if not recalibrate:
            return None
        prof = cls.calibrate(quick=quick, progress=progress)
        try:
            prof.save(p)
        except OSError as e:
            warnings.warn(f"could not save the pykernels profile to {p}: {e}", ProfileWarning,
                          stacklevel=2)
        return prof

    # --- calibration --------------------------------------------------------
    @classmethod
    def calibrate(cls, quick: bool = True, progress: bool = True, ops: Optional[Sequence[Op]] = None,
                  *, batches: Optional[Sequence[int]] = None,
                  threads: Optional[Sequence[int]] = None,
                  variants: Optional[Sequence[str]] = None,
                  precisions: Optional[Sequence[str]] = None,
                  budget_s: Optional[float] = None,
                  min_reps: Optional[int] = None, max_reps: Optional[int] = None,
                  heldout: bool = False) -> "Profile":
        """Measure service times on this machine.

        ops: the shapes to measure (default: every registered op kind that has
            kernels, on its registered quick or full shapes), each an op or an
            ``(op, batches)`` pair. A ``Model`` is measured through its parts.
        batches: batch buckets in items (default: the kind's quick/full buckets).
        threads: thread counts (default: 1 and ``get_num_threads()``).
        variants, precisions: restrict the kernels measured.
        budget_s: time budget; repetitions per cell adapt to it (quick: 25 s,
            full: 600 s). Each cell runs at least ``min_reps`` times.
        heldout: measure the registered held-out shapes instead (for
            ``cost.heldout_error``).
        """
        ops_seen, cells, errors, failures = calibration.measure(
            quick, progress, ops, batches=batches, threads=threads, variants=variants,
            precisions=precisions, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps,
            heldout=heldout)
        prof = cls(ops=ops_seen, key=current_key(),
                   source=("calibrate(quick)" if quick else "calibrate(full)")
                   + (" heldout" if heldout else ""), created=time.time(),
                   precision_error=errors)
        for cell in cells:
            prof._put(Measurement(*cell))
        if failures:
            warnings.warn(f"{len(failures)} calibration cells failed and were skipped, e.g. "
                          + "; ".join(failures[:3]), ProfileWarning, stacklevel=2)
        return prof

    # --- pytest-benchmark ---------------------------------------------------
    @classmethod
    def from_pytest_benchmark(cls, json_path, base: Optional["Profile"] = None) -> "Profile":
        """Build a profile (or refresh ``base``: same cells are replaced) from
        a pytest-benchmark JSON file; see docs/policy.md for the
        ``extra_info`` convention. Raises ValueError if the file is not
        pytest-benchmark JSON; skips (with one warning) benchmarks it cannot use."""
        try:
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path} is not valid JSON: {e}") from None
        benches = data.get("benchmarks") if isinstance(data, dict) else None
        if not isinstance(benches, list):
            raise ValueError(f"{json_path} has no 'benchmarks' list; write it with "
                             "pytest --benchmark-json=FILE")
        prof = base.copy() if base is not None else cls(key=current_key(), source="pytest-benchmark")
        if base is not None:
            prof.source = f"{base.source}+pytest-benchmark"
        isa = (prof.key or current_key()).get("isa")
        skipped = []
        used = 0
        for b in benches:
            name = b.get("name", "?") if isinstance(b, dict) else "?"
            info = (b.get("extra_info") or {}) if isinstance(b, dict) else {}
            if "op" not in info or info.get("impl", "pykernels") != "pykernels":
                continue  # a baseline (NumPy, SciPy, PyTorch): not ours
            if info.get("b") == "raw":
                continue  # an unpacked weight: not the prepacked Linear the profile models
            try:
                if info.get("isa") is not None and isa is not None and info["isa"] != isa:
                    raise ValueError(f"isa {info['isa']!r} is not this profile's {isa!r}")
                if info.get("variant") not in ("latency", "throughput"):
                    raise ValueError(f"variant {info.get('variant')!r} is not latency/throughput")
                # "op" names the op; "kind" may be the benchmark's own (attention: causal)
                op = _ops.from_spec({**info, "kind": info["op"]})
                batch = info.get(op.batch_field, info.get("batch"))
                if batch is None:
                    raise KeyError(op.batch_field)
                stats = b["stats"]
                med = float(stats["median"])
                data_ = stats.get("data")
                if isinstance(data_, list) and len(data_) >= 2:
                    p99 = float(np.percentile(np.asarray(data_, dtype=float), 99))
                    n = len(data_)
                else:
                    p99 = float(stats.get("max", med))
                    n = int(stats.get("rounds", 1) or 1)
                prof.add(op, str(info["variant"]), str(info.get("precision", "fp32")),
                         int(info["threads"]), int(batch), med * 1e3, max(p99, med) * 1e3,
                         samples=max(1, n))
                used += 1
            except (KeyError, ValueError, TypeError) as e:
                skipped.append(f"{name} ({type(e).__name__}: {e})")
        if skipped:
            warnings.warn(f"{len(skipped)} benchmarks in {json_path} were skipped: "
                          + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
                          ProfileWarning, stacklevel=2)
        return prof

__all__ = ["FORMAT", "Measurement", "Profile", "ProfileWarning", "SCHEMA", "cache_dir",
           "current_key", "default_path"]
