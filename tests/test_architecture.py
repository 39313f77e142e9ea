"""The import contract (pyproject.toml [tool.importlinter]) holds, and a
deliberate violation of it fails, imports inside functions included."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytest.importorskip("importlinter", reason="import-linter (the test extra) checks the layers")

CHECK = [sys.executable, f"{REPO_ROOT}/.ci/check_layers.py"]


def run_check(*inject):
    args = [a for pair in inject for a in ("--inject", *pair)]
    return subprocess.run(CHECK + args, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("where, text, message", [
    # a model reaching for the policy from inside a function: hidden, still a violation
    ("pykernels/models/minilm.py", "def _reach_up():\\n    from pykernels import policy",
     "pykernels.models is not allowed to import pykernels.policy"),
    # the policy reaching for a model
    ("pykernels/policy/planner.py", "import pykernels.models",
     "pykernels.policy is not allowed to import pykernels.models"),
    # the kernel layer reaching up to serving
    ("pykernels/_gemm.py", "def _f():\\n    import pykernels.serving",
     "pykernels._gemm is not allowed to import pykernels.serving"),
    # the work descriptions reaching up to the policy
    ("pykernels/work.py", "from pykernels.policy import slo",
     "pykernels.work is not allowed to import pykernels.policy"),
    # the package's face importing above the kernel layer
    ("pykernels/__init__.py", "from . import work",
     "pykernels is not allowed to import pykernels.work"),
], ids=["models->policy", "policy->models", "kernels->serving", "work->policy", "face->work"])
def test_a_violation_fails(where, text, message):
    proc = run_check((where, text))
    assert proc.returncode != 0, proc.stdout
    assert message in " ".join(proc.stdout.split()), proc.stdout[-3000:]
