"""Profile: measured service times of pykernels' kernels on this machine.

A profile is a table of cells, one per
(op shape, variant, precision, threads, batch bucket), each holding the
median (p50) and the 99th percentile (p99) of repeated closed-loop runs, in
milliseconds, and how many samples they come from. Batch buckets are counted
in items of the op's measured shape (rows of x for ``Linear``, sequences for
``Attention`` and ``Decode``).

Sources
-------
* ``Profile.calibrate(quick=True, progress=True)`` measures every kernel
  ``pykernels.kernels()`` lists, on the default shapes each op kind registers
  (``ops.register_calibration``), or on the ops you pass (``ops=[...]``;
  ``batches=``, ``threads=``, ``variants=``, ``precisions=`` restrict it further).
  The quick run keeps to a time budget (``budget_s``, 25 s of measuring by
  default; about 35 s in all on a 2-core machine).
* ``Profile.from_pytest_benchmark(json_path, base=None)`` reads the JSON that
  ``pytest bench/ --benchmark-json=out.json --benchmark-save-data`` writes.
* ``Profile().add(op, variant, precision, threads, batch, p50_ms, p99_ms)``
  builds one by hand (tests, simulators).

pytest-benchmark convention (for the bench suites)
--------------------------------------------------
A benchmark that should feed the policy puts what it measured in
``benchmark.extra_info``::

    benchmark.extra_info.update({
        "op": "linear",          # an op kind or alias: "linear" (alias "gemm"),
                                 # "attention", "decode" (alias "decode_attention")
        "k": 384, "n": 1536,     # the op's shape fields, as in pykernels.policy.ops:
                                 #   linear: k, n
                                 #   attention: hq, hkv, d, s_q, s_kv, causal
                                 #   decode: hq, hkv, d, kv_len
        "m": 32,                 # batch: "m" (rows) for linear, "batch" for the others
        "variant": "latency",    # "latency" | "throughput"
        "precision": "fp32",     # "fp32" | "bf16" | "int8" | "fp16" (default "fp32")
        "threads": 2,            # threads the call used (required)
        "isa": "avx2",           # optional: cpu_info().isa; rows from another ISA are skipped
        "impl": "pykernels",     # optional; any other value ("numpy", "torch") is a
                                 # baseline and ignored, as is a benchmark without "op"
        "b": "packed",           # optional, linear/gemm: "raw" (an unpacked weight) is
                                 # ignored; the profile models prepacked weights
    })
    benchmark(pykernels.gemm, x, w, variant="latency", threads=2)

One benchmark call must be one kernel call (``iterations=1`` or pedantic mode
with ``iterations=1``): the profile reads ``benchmarks[i]["stats"]["median"]``
(seconds) as p50 and the 99th percentile of ``stats["data"]`` (per-round times,
present with ``--benchmark-save-data``) as p99; without ``data`` the p99 is the
measured ``max`` (an over-estimate for >= 100 rounds, an under-estimate below).
Benchmarks without ``extra_info["op"]`` (NumPy/PyTorch baselines) are ignored;
malformed ones are skipped with one warning that names them.

Files
-----
``save(path=None)`` / ``load(path=None)`` use versioned JSON (``schema``) in the
user cache directory (``platformdirs.user_cache_dir("pykernels")``, or the
directory in ``$PYKERNELS_CACHE``), one file per CPU model, ISA and library
version. The file also records the kernel set; on load the key is verified. A
missing, corrupt, truncated, foreign-schema or stale file never raises: it is
reported with a ``ProfileWarning`` and either recalibrated
(``load(recalibrate=True)``, what ``Policy`` does) or ignored (``None``).
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from pykernels import work as _ops
from pykernels.work import Model, Op

FORMAT = "pykernels-profile"
SCHEMA = 1

QUICK_BUDGET_S = 25.0
FULL_BUDGET_S = 600.0


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
    import pykernels
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


class _Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, enabled: bool, label: str = "calibrating"):
        self.total = max(1, total)
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self._last_pct = -1

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        pct = int(100 * self.done / self.total)
        if not self.tty and pct // 10 == self._last_pct // 10 and self.done != self.total:
            return
        self._last_pct = pct
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"{self.label} [{bar}] {pct:3d}% {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.1f}s {what}")
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


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
        import pykernels
        table = _ops.kernel_table()
        budget = float(budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else FULL_BUDGET_S))
        lo = int(min_reps if min_reps is not None else (9 if quick else 40))
        hi = int(max_reps if max_reps is not None else (300 if quick else 3000))
        if lo < 1 or hi < lo:
            raise ValueError(f"need 1 <= min_reps <= max_reps, got {lo}, {hi}")
        nthreads = pykernels.get_num_threads()
        thread_list = sorted({int(t) for t in (threads or (1, nthreads))})

        # (base op, units list) work items
        work: List[Tuple[Op, List[int]]] = []

        def add_work(op: Op, items: Sequence[int]):
            for part in op.parts():
                units = sorted({part.units(b) for b in items})
                work.append((part.base(), units))

        if ops is None:
            for kind in sorted(_ops.op_types()):
                d = _ops.calibration_defaults(kind)
                if d is None or not _ops.candidates(kind, table):
                    continue
                shapes = d["heldout_shapes"] if heldout else d["quick_shapes" if quick else "full_shapes"]
                bl = batches or (d["heldout_batches"] if heldout else d["quick_batches" if quick else "full_batches"])
                for s in shapes:
                    add_work(s, bl)
        else:
            for item in ops:
                op, own = (item if isinstance(item, tuple) and len(item) == 2 else (item, None))
                if not isinstance(op, Op):
                    raise TypeError(f"ops must be pykernels.policy.ops objects or (op, batches) "
                                    f"pairs, got {item!r}")
                d = _ops.calibration_defaults(op.parts()[0].kind) or {}
                bl = own or batches or d.get("quick_batches" if quick else "full_batches") or (1, 8, 64)
                add_work(op, bl)

        cells = []
        for base, units in work:
            cands = _ops.candidates(base.kind, table)
            for (variant, precision), backend in cands.items():
                if variants is not None and variant not in variants:
                    continue
                if precisions is not None and precision not in precisions:
                    continue
                for t in thread_list:
                    for u in units:
                        cells.append((base, variant, precision, t, u, backend))
        # Deduplicate (a shape listed twice) keeping order.
        seen = set()
        cells = [c for c in cells if not ((c[0].key,) + c[1:5] in seen or seen.add((c[0].key,) + c[1:5]))]

        prof = cls(key=current_key(), source=("calibrate(quick)" if quick else "calibrate(full)")
                   + (" heldout" if heldout else ""), created=time.time())
        # Interleaved passes: every cell runs a slice of its repetitions in each
        # pass, so a burst of interference from other processes on a shared
        # machine spreads over many cells' tails instead of shifting one cell's
        # median.
        passes = 3 if quick else 5
        bar = _Progress(len(cells) * (passes + 1), progress)
        cache: dict = {}
        failures = []
        prepared = []  # [cell, fn, reps_per_pass, samples list]
        try:
            t_start = time.perf_counter()
            for c in cells:
                base, variant, precision, t, u, backend = c
                if time.perf_counter() - t_start > 2 * budget:
                    failures.append(f"{base.key} {variant}/{precision} t={t} b={u}: "
                                    "not measured, the time budget ran out during warm-up")
                    bar.step()
                    continue
                try:
                    fn = backend.prepare(base, variant, precision, t, u, cache)
                    fn()
                    t0 = time.perf_counter_ns()
                    fn()
                    est = max(time.perf_counter_ns() - t0, 1)
                except Exception as e:  # a kernel that rejects a shape: skip the cell
                    failures.append(f"{base.key} {variant}/{precision} t={t} b={u}: {e}")
                    bar.step()
                    continue
                prepared.append([c, fn, est, []])
                bar.step("warm-up")
            # Each pass gets an equal share of what is left of the budget and
            # re-estimates run times from the samples so far (a busy machine
            # makes the warm-up estimate optimistic). Past 1.5x the budget,
            # remaining passes are dropped (at least one always runs).
            lo_pass, hi_pass = -(-lo // passes), -(-hi // passes)
            done_passes = 0
            for i in range(passes):
                elapsed = time.perf_counter() - t_start
                if i > 0 and elapsed > 1.5 * budget:
                    break
                share = max(0.0, budget - elapsed) / (passes - i)
                est = [float(np.median(np.concatenate(e[3]))) / 1e3 if e[3] else e[2] / 1e9
                       for e in prepared]
                reps = _allocate(est, share, lo_pass, hi_pass, 1)
                order = list(zip(prepared, reps))
                if i % 2:
                    order.reverse()
                for (c, fn, _, samples), r in order:
                    try:
                        samples.append(_measure(fn, r))
                    except Exception as e:
                        failures.append(f"{c[0].key} {c[1]}/{c[2]} t={c[3]} b={c[4]}: {e}")
                    bar.step(f"pass {i + 1}/{passes} {c[0].key} {c[1]}/{c[2]} t={c[3]} b={c[4]}")
                done_passes += 1
            if done_passes < passes:
                bar.done = bar.total - 1
                bar.step(f"time budget reached after {done_passes} of {passes} passes")
            for c, fn, _, samples in prepared:
                if len(samples) != done_passes:
                    continue
                base, variant, precision, t, u, _ = c
                ms = np.concatenate(samples)
                prof.ops.setdefault(base.key, base)
                p50 = float(np.median(ms))
                p99 = float(np.percentile(ms, 99))
                prof._put(Measurement(base.key, variant, precision, t, u, max(p50, 1e-6),
                                      max(p99, p50, 1e-6), len(ms)))
            del prepared
            # Accuracy actually spent by each precision (output error on random data).
            for base in {b.key: b for b, *_ in cells}.values():
                for (variant, precision), backend in _ops.candidates(base.kind, table).items():
                    if backend.rel_error is None or precision in prof.precision_error:
                        continue
                    if precisions is not None and precision not in precisions:
                        continue
                    try:
                        prof.precision_error[precision] = backend.rel_error(base, precision, cache)
                    except Exception:
                        pass
        finally:
            bar.close()
        if failures:
            warnings.warn(f"{len(failures)} calibration cells failed and were skipped, e.g. "
                          + "; ".join(failures[:3]), ProfileWarning, stacklevel=2)
        return prof

    # --- pytest-benchmark ---------------------------------------------------
    @classmethod
    def from_pytest_benchmark(cls, json_path, base: Optional["Profile"] = None) -> "Profile":
        """Build a profile (or refresh ``base``: same cells are replaced) from
        a pytest-benchmark JSON file; see the module docstring for the
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
                op = _ops.from_spec(info)
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


def _allocate(est_s: List[float], budget_s: float, lo: int, hi: int, passes: int) -> List[int]:
    """Repetitions per cell, each in [lo, hi], that fill ``budget_s`` given each
    cell's estimated run time: every cell gets the same time share x (reps =
    x / est, clamped), x found by bisection. On a slow or busy machine the
    floor ``lo`` gives way (down to one run per pass) rather than overrun."""
    est = np.maximum(np.asarray(est_s, dtype=float), 1e-7)
    if est.size == 0:
        return []

    def total(x, floor):
        return float(np.sum(np.clip(np.floor(x / est), floor, hi) * est))
    floor = lo
    if total(0.0, floor) > budget_s:
        floor = max(passes, int(lo * budget_s / max(total(0.0, lo), 1e-12)))
    a, b = 0.0, float(hi * est.max())
    for _ in range(50):
        mid = (a + b) / 2
        if total(mid, floor) > budget_s:
            b = mid
        else:
            a = mid
    return [int(r) for r in np.clip(np.floor(a / est), floor, hi)]


def _measure(fn, reps: int) -> np.ndarray:
    """Service times (ms) of ``reps`` back-to-back runs of fn, GC paused."""
    out = np.empty(reps, dtype=np.float64)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        clock = time.perf_counter_ns
        for i in range(reps):
            t0 = clock()
            fn()
            out[i] = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    return out / 1e6


__all__ = ["FORMAT", "Measurement", "Profile", "ProfileWarning", "SCHEMA", "cache_dir",
           "current_key", "default_path"]
