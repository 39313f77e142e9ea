"""The ``pykernels`` command line (also ``python -m pykernels``): argument
parsing and dispatch only.

Subcommands live in ``COMMANDS``: name -> (add_arguments, run). ``add_arguments``
fills the subcommand's ``argparse`` parser; ``run(args) -> int`` does the work
and returns the exit code; the first line of ``run``'s docstring is the help
text. ``pykernels bench SUITE`` works the same way one level down:
``BENCH_SUITES`` maps a suite name to (add_arguments, run) in
``pykernels.harness``; the options every suite shares are added here.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Tuple

from ._argtypes import positive_float, positive_int
from .harness.attention import add_attention_arguments, run_bench_attention
from .harness.encoder import add_encoder_arguments, run_bench_encoder
from .harness.gemm import add_gemm_arguments, run_bench_gemm
from .harness.linear import add_linear_arguments, run_bench_linear
from .harness.machine import format_info, info_record
from .harness.torch import add_bench_torch_arguments, run_bench_torch
from .harness.timing import ASSUMED_PEAK_PER_CORE

# --------------------------------------------------------------------------
# bench: suites
# --------------------------------------------------------------------------

# suite name -> (add_arguments, run).
BENCH_SUITES: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                              Callable[[argparse.Namespace], int]]] = {
    "gemm": (add_gemm_arguments, run_bench_gemm),
    "linear": (add_linear_arguments, run_bench_linear),
    "attention": (add_attention_arguments, run_bench_attention),
    "encoder": (add_encoder_arguments, run_bench_encoder),
    "torch": (add_bench_torch_arguments, run_bench_torch),
}


def _add_common_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and only the smaller target shapes")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="run every shape at N threads (default: each target's own count, "
                        "else pykernels.get_num_threads())")
    p.add_argument("--json", metavar="PATH",
                   help="also write machine-readable results (with cpu_info, commit, "
                        "versions) to PATH")
    p.add_argument("--peak-gflops", type=positive_float, metavar="G",
                   help="fp32 FMA peak per core in GFLOP/s for the %%peak column "
                        "(default: $PYKERNELS_PEAK_GFLOPS, else assumed from the ISA: "
                        + ", ".join(f"{k} {v:g}" for k, v in ASSUMED_PEAK_PER_CORE.items())
                        + ")")
    p.add_argument("--budget", type=positive_float, metavar="SECONDS",
                   help="timing budget per case (default 0.3, 0.05 with --quick)")


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (add_args, run) in BENCH_SUITES.items():
        sp = sub.add_parser(name, help=_first_line(run.__doc__),
                            description=_first_line(run.__doc__))
        _add_common_bench_arguments(sp)
        add_args(sp)
        sp.set_defaults(_bench_run=run)


def run_bench(args) -> int:
    """Time kernels against NumPy/OpenBLAS, SciPy BLAS and PyTorch."""
    return args._bench_run(args)


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument("--no-fork-join", action="store_true",
                   help="skip measuring the thread pool's fork/join cost")
    p.add_argument("--peak", action="store_true",
                   help="the measured instruction peaks (fp32 FMA, int8/bf16 dot products where "
                        "present) and read bandwidth at L2, L3 and DRAM sizes (cached per CPU)")
    p.add_argument("--refresh-peak", action="store_true",
                   help="with --peak: measure again instead of reading the cache")


def run_info(args) -> int:
    """CPU features, the ISA in use, threads, the kernel registry and the pool's cost."""
    rec = info_record(fork_join=not args.no_fork_join, peak=args.peak,
                      refresh_peak=args.refresh_peak)
    print(json.dumps(rec, indent=2) if args.json else format_info(rec))
    return 0


# --------------------------------------------------------------------------
# The command table and main
# --------------------------------------------------------------------------

# subcommand -> (add_arguments, run). run(args) returns the exit code; the first
# line of its docstring is the help.
def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments
    add_demo_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    """The main job: MiniLM under mixed interactive + bulk traffic, the serving policies and the baselines users configure."""
    from .demo import run_demo_cli
    return run_demo_cli(args)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .serving.command import add_serve_arguments
    add_serve_arguments(p)


def run_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible embeddings server (MiniLM behind the SLO-aware batcher)."""
    from .serving.command import run_serve as _run
    return _run(args)


def _add_passthrough(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="arguments of the policy command (see --help after the command)")


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine's kernels into a policy profile (or --from-benchmark JSON)."""
    from .policy.__main__ import calibrate_main
    return calibrate_main(args.rest)


def run_plan(args: argparse.Namespace) -> int:
    """Show the plan the policy makes for an op and an SLO, with its explanation."""
    from .policy.__main__ import plan_main
    return plan_main(args.rest)


COMMANDS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info_arguments, run_info),
    "bench": (_add_bench_arguments, run_bench),
    "demo": (_add_demo_arguments, run_demo),
    "serve": (_add_serve_arguments, run_serve),
    "calibrate": (_add_passthrough, run_calibrate),
    "plan": (_add_passthrough, run_plan),
}


def _first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykernels",
        description="pykernels: hand-written C++ CPU kernels for AI inference.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=_first_line(run.__doc__),
                            description=_first_line(run.__doc__))
        add_args(sp)
        sp.set_defaults(_run=run)
    return parser


def _version() -> str:
    try:
        import pykernels
        return f"pykernels {pykernels.__version__}"
    except Exception as e:  # the version flag must work even if the extension does not load
        return f"pykernels (import failed: {e})"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pykernels`` and ``python -m pykernels``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The policy commands own their argument parsers: hand them argv as is
    # (an argparse REMAINDER positional cannot start with an option).
    passthrough = {"calibrate": "calibrate_main", "plan": "plan_main"}
    if argv and argv[0] in passthrough:
        from .policy import __main__ as policy_cli
        try:
            return int(getattr(policy_cli, passthrough[argv[0]])(argv[1:]) or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pykernels info | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
