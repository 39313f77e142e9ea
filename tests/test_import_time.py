"""``import pykernels`` leaves ml_dtypes unimported (its init costs ~1.1 s), and
bfloat16 inputs behave as before when ml_dtypes arrives later (pykernels._bf16).

Behaviour only, never timing: each case runs in a fresh interpreter, since
this process has imported ml_dtypes already.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import run_python, subprocess_env

pytest.importorskip("ml_dtypes")

# attention and decode_attention (contiguous and paged) on bf16 inputs, one
# thread (a fixed reduction order, so two processes agree bit for bit); the
# results as lists. `{first}` imports ml_dtypes before or after pykernels.
BF16_CALLS = """
import json, sys
{first}
import numpy as np
r = np.random.default_rng(7)
f = lambda *s: r.standard_normal(s, dtype=np.float32)
bf = ml_dtypes.bfloat16
q, k, v = f(2, 4, 5, 16), f(2, 2, 9, 16).astype(bf), f(2, 2, 9, 16).astype(bf)
qd = f(2, 4, 16)
table = np.array([[1, 0], [3, 2]], dtype=np.int32)
kp, vp = f(4, 2, 8, 16).astype(bf), f(4, 2, 8, 16).astype(bf)
out = dict(
    mixed=pk.attention(q, k, v, causal=True, kv_lens=np.array([9, 6]), threads=1),
    all_bf16=pk.attention(q.astype(bf), k, v, threads=1),
    decode=pk.decode_attention(qd, k, v, np.array([9, 4]), threads=1),
    paged=pk.decode_attention(qd, kp, vp, np.array([16, 11]), block_table=table, threads=1),
)
print(json.dumps({{n: a.tolist() for n, a in out.items()}}))
"""
EAGER = "import ml_dtypes\nimport pykernels as pk"
LAZY = "import pykernels as pk\nassert 'ml_dtypes' not in sys.modules\nimport ml_dtypes"


def run_json(code: str):
    proc = run_python(code, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_import_leaves_ml_dtypes_unimported():
    proc = run_python("import pykernels, sys; print('ml_dtypes' in sys.modules)",
                      env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False"]


def test_bf16_after_a_late_ml_dtypes_import_matches_the_eager_order():
    lazy = run_json(BF16_CALLS.format(first=LAZY))
    eager = run_json(BF16_CALLS.format(first=EAGER))
    assert lazy.keys() == eager.keys()
    for name in eager:
        np.testing.assert_array_equal(np.array(lazy[name]), np.array(eager[name]), err_msg=name)


def test_unsupported_dtype_before_any_bf16_is_the_same_type_error():
    # nothing registered with the binding yet: float16 still gets the dtype message
    got = run_json("""
import json, sys
import numpy as np, pykernels as pk
q = np.zeros((1, 2, 3, 8), np.float16)
try:
    pk.attention(q, q, q)
    msg = None
except TypeError as e:
    msg = str(e)
print(json.dumps([msg, 'ml_dtypes' in sys.modules]))
""")
    assert got == ["q has dtype float16, expected float32 or bfloat16 (ml_dtypes.bfloat16); "
                   "convert with q.astype(np.float32)", False]


def test_bfloat16_attribute_loads_on_access():
    got = run_json("""
import json, sys
import pykernels._attention as a
before = 'ml_dtypes' in sys.modules
import ml_dtypes
print(json.dumps([before, a.BFLOAT16 == ml_dtypes.bfloat16, str(a.BFLOAT16)]))
""")
    assert got == [False, True, "bfloat16"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_bf16_tensor_loads_ml_dtypes_on_demand():
    # the user never imports ml_dtypes: the int16 view needs it, so pykernels loads it
    got = run_json("""
import json, sys
import torch, pykernels as pk
q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
before = 'ml_dtypes' in sys.modules
res = pk.attention(q, k.bfloat16(), v.bfloat16(), threads=1)
import ml_dtypes
bf = lambda t: t.bfloat16().float().numpy().astype(ml_dtypes.bfloat16)
ref = pk.attention(q.numpy(), bf(k), bf(v), threads=1)
print(json.dumps([before, isinstance(res, torch.Tensor), bool((res.numpy() == ref).all())]))
""")
    assert got == [False, True, True]
