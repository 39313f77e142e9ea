#!/usr/bin/env python3
"""Smoke test of an installed pykernels (run from outside the checkout, against
the wheel installed into a fresh venv): import, the registry, one call per op
on every ISA path this machine supports, and `pykernels info`."""
from __future__ import annotations

import os
import subprocess
import sys

ONE_CALL_PER_OP = r"""
import numpy as np, ml_dtypes, pykernels as pk
rng = np.random.default_rng(0)
a = rng.standard_normal((5, 64), dtype=np.float32); w = rng.standard_normal((64, 48), dtype=np.float32)
ref = a.astype(np.float64) @ w
assert np.allclose(pk.gemm(a, w), ref, rtol=1e-4, atol=1e-4)
for prec, tol in (("fp32", 1e-4), ("bf16", 3e-2), ("int8", 6e-2)):
    y = pk.linear(a, pk.pack(w, precision=prec))
    assert np.linalg.norm(y - ref) <= tol * np.linalg.norm(ref), prec
q = rng.standard_normal((1, 4, 3, 16), dtype=np.float32)
k = rng.standard_normal((1, 2, 9, 16), dtype=np.float32); v = rng.standard_normal((1, 2, 9, 16), dtype=np.float32)
o = pk.attention(q, k, v, causal=True)
d = pk.decode_attention(q[:, :, 0], k.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16), np.array([9]))
assert o.shape == (1, 4, 3, 16) and d.shape == (1, 4, 16) and np.isfinite(o).all() and np.isfinite(d).all()
e = pk.kernels()
assert e and all(x.isa == pk.cpu_info().isa for x in e)
print(pk.cpu_info().isa, len(e), "kernels ok")
"""


def main() -> int:
    import pykernels as pk
    where = os.path.dirname(pk.__file__)
    print(f"pykernels {pk.__version__} from {where}")
    if os.path.exists(os.path.join(where, "..", "csrc")):
        print("smoke: this is the checkout, not an installed wheel")
        return 1
    order = ("generic", "avx2", "avx512")
    for isa in order[: order.index(pk.cpu_info().supported_isa) + 1]:
        env = dict(os.environ, PYKERNELS_ISA=isa)
        subprocess.run([sys.executable, "-c", ONE_CALL_PER_OP], env=env, check=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "pykernels"), "info"], check=True)
    print("smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
