"""pytest-benchmark configuration for the pykernels suites.

Run the full suites (on a quiet machine; minutes):

    python -m pytest bench --benchmark-json=bench.json

and a smoke run that only checks every benchmark still runs and is correct
(a few small shapes, each body called once):

    PYKERNELS_BENCH_QUICK=1 python -m pytest bench -q --benchmark-disable

Each benchmark records ``benchmark.extra_info`` (op, m, k, n, variant,
precision, threads, impl, isa, b, ...), which ``pykernels.policy.Profile.
from_pytest_benchmark`` reads; the machine (cpu_info, commit, versions, BLAS
libraries) is recorded once in ``machine_info["pykernels"]``.
"""
from __future__ import annotations

import os
import time

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("pykernels-bench")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="only a few small shapes (a CI smoke run); "
                         "also enabled by PYKERNELS_BENCH_QUICK=1")


def bench_quick(config) -> bool:
    env = os.environ.get("PYKERNELS_BENCH_QUICK", "").strip().lower()
    return bool(config.getoption("--bench-quick")) or env not in ("", "0", "false", "no")


def shape_plan(shapes) -> list:
    """(m, k, n, threads) per shape, in order, duplicates dropped; a shape
    without a pinned thread count runs at ``pykernels.get_num_threads()``."""
    import pykernels as pk

    default = pk.get_num_threads()
    seen, plan = set(), []
    for s in shapes:
        key = (s.m, s.k, s.n, s.threads or default)
        if key not in seen:
            seen.add(key)
            plan.append(key)
    return plan


def let_baseline_workers_idle() -> None:
    """Called before a new shape: the previous one ended with the BLAS/torch
    baselines, whose worker threads spin ~0.1 s before sleeping and would take a
    core from the next case."""
    time.sleep(0.15)


def torch_or_skip():
    """The torch module, or skip: not installed, or installed and failing to import."""
    from pykernels.harness.timing import import_torch

    pytest.importorskip("torch")
    torch = import_torch()
    if torch is None:
        pytest.skip("torch is installed but failed to import")
    return torch


def pytest_benchmark_update_machine_info(config, machine_info):
    from pykernels.harness.machine import machine_record

    machine_info["pykernels"] = machine_record()


def pytest_report_header(config):
    import pykernels as pk

    info = pk.cpu_info()
    mode = "quick (smoke shapes)" if bench_quick(config) else "full target shapes"
    return (f"pykernels {pk.__version__}: isa {info.isa} (supported {info.supported_isa}), "
            f"{info.cores} cores, {pk.get_num_threads()} threads; bench {mode}")


@pytest.fixture(scope="session")
def isa() -> str:
    import pykernels as pk

    return pk.cpu_info().isa
