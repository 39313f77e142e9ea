#!/usr/bin/env python3
"""Checks the import contract of pyproject.toml ([tool.importlinter]) on the
package as it installs: pykernels/ with policy/ laid inside it as
pykernels/policy (setup.py's package_dir), copied to a temporary directory, so
import-linter sees every module and every import, those inside functions too.

    python .ci/check_layers.py                      # exit 0 when every contract holds
    python .ci/check_layers.py --inject FILE TEXT   # append TEXT to FILE of the copy first

--inject exists for tests/test_architecture.py, which shows a violation fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lay_out(dest: Path) -> None:
    """pykernels/ and policy/ as an install lays them out (sources only)."""
    skip = shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__")
    shutil.copytree(REPO / "pykernels", dest / "pykernels", ignore=skip)
    shutil.copytree(REPO / "policy", dest / "pykernels" / "policy", ignore=skip)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inject", nargs=2, metavar=("FILE", "TEXT"), action="append", default=[],
                    help="append TEXT to FILE (a path like pykernels/models/minilm.py) in the copy")
    args = ap.parse_args(argv)
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if lint is None:
        print("lint-imports not found: pip install import-linter (the test extra has it)")
        return 2
    with tempfile.TemporaryDirectory(prefix="pykernels-layers-") as tmp:
        root = Path(tmp)
        lay_out(root)
        for rel, text in args.inject:
            target = root / rel
            target.write_text(target.read_text() + "\n" + text.replace("\\n", "\n") + "\n")
        env = dict(os.environ, PYTHONPATH=str(root))  # the copy, not an installed pykernels
        proc = subprocess.run([lint, "--no-cache"], cwd=root, env=env, text=True,
                              capture_output=True)
    out = proc.stdout + proc.stderr
    print(out[out.find("Contracts"):] if "Contracts" in out else out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
