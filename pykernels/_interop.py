"""Arrays from other stacks: DLPack exporters (torch CPU tensors, JAX CPU
arrays) and buffer-protocol objects, as zero-copy NumPy views, and the result
handed back in the caller's array type.

Every kernel calls ``adapt`` only when an argument is not a plain
``numpy.ndarray`` (the check ``type(x) is np.ndarray`` comes first, so the
NumPy path costs one more type test). No framework is imported here: a
tensor's own module (``type(x).__module__``, already imported by the caller)
supplies ``from_dlpack`` for the way back.

- float32 inputs map to NumPy float32 views without a copy (``np.from_dlpack``;
  a CPU torch tensor through ``Tensor.numpy()``, the same view at ~1 us
  instead of ~6 us);
- bfloat16 inputs map to ``ml_dtypes.bfloat16`` views: NumPy's DLPack import
  has no bfloat16, so a torch tensor is reinterpreted as int16 first
  (``x.view(torch.int16)``, no copy) and a JAX array through its
  ``__array__`` (no copy on CPU);
- an input exporting DLPack makes the result come back through its module's
  ``from_dlpack`` (torch in, torch out through ``torch.from_numpy``; jax in,
  jax out), zero-copy;
- ``out=`` may be a tensor: the kernel writes into its memory in place and the
  tensor itself is returned;
- GPU tensors, tensors that require grad and other dtypes raise with the fix.
"""
from __future__ import annotations

import sys

import numpy as np

from ._bf16 import bf16_dtype, is_bf16

_ND = np.ndarray
_F32 = np.dtype(np.float32)
_DL_CPU = 1  # DLDeviceType kDLCPU (kDLCUDAHost = 3 is host memory too)
_HOST_DEVICES = (1, 3)
_DEVICE_NAMES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm",
                 13: "CUDA managed", 14: "oneAPI"}

# type -> its module's from_dlpack (or None: NumPy out), found once per type
_BACK: dict = {}


def _from_dlpack_of(tp):
    """The ``from_dlpack`` of the framework that defines type ``tp``: the
    input's own module, already imported by the caller (torch.from_dlpack,
    jax.dlpack.from_dlpack, ...); None when there is none (NumPy out)."""
    try:
        return _BACK[tp]
    except KeyError:
        pass
    root = (getattr(tp, "__module__", "") or "").split(".")[0]
    if root == "jaxlib":
        root = "jax"
    mod = sys.modules.get(root)
    fn = None
    if mod is not None:
        fn = getattr(mod, "from_dlpack", None)
        if fn is None:
            fn = getattr(getattr(mod, "dlpack", None), "from_dlpack", None)
    _BACK[tp] = fn
    return fn


def _check_device(name: str, x) -> None:
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return
    try:
        kind, index = dev()
    except Exception:  # noqa: BLE001 - a broken exporter: let __dlpack__ speak
        return
    if int(kind) not in _HOST_DEVICES:
        where = _DEVICE_NAMES.get(int(kind), f"DLPack device type {int(kind)}")
        raise ValueError(f"{name} lives on a {where} device ({where.lower()}:{index}); "
                         f"pykernels runs on the CPU: move it first ({name}.cpu() in torch, "
                         f"jax.device_put({name}, jax.devices('cpu')[0]) in JAX)")


def _grad_error(name: str) -> TypeError:
    return TypeError(f"{name} is a tensor that requires grad; pykernels kernels have no "
                     f"autograd: pass {name}.detach(), or call under torch.no_grad() / "
                     f"torch.inference_mode() with inputs that do not require grad")


def _dtype_error(name: str, x, what: str) -> TypeError:
    return TypeError(f"{name} has dtype {getattr(x, 'dtype', '?')}, expected {what}; convert it "
                     f"first ({name}.float() in torch, {name}.astype(jnp.float32) in JAX)")


def _exports_bf16(x) -> bool:
    """Whether a DLPack exporter holds bfloat16 (torch.bfloat16, jnp.bfloat16: by name)."""
    return str(getattr(x, "dtype", "")).endswith("bfloat16")


def _bf16(name: str) -> np.dtype:
    """ml_dtypes.bfloat16, imported and registered at the first bf16 input."""
    try:
        return bf16_dtype()
    except ImportError:  # pragma: no cover - a declared dependency
        raise TypeError(f"{name} is bfloat16, which needs the ml_dtypes package") from None


def _bf16_view(name: str, x) -> np.ndarray:
    """A bfloat16 DLPack exporter as an ml_dtypes.bfloat16 view, no copy."""
    bf16 = _bf16(name)
    view = getattr(x, "view", None)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return np.from_dlpack(view(torch.int16)).view(bf16)
    arr = np.asarray(x)  # JAX and other __array__ exporters: a view on CPU
    if arr.dtype != bf16:
        raise _dtype_error(name, x, "float32 or bfloat16 readable by NumPy")
    return arr


def _torch_view(name: str, x, torch):
    """A CPU torch tensor as a NumPy view through ``Tensor.numpy()`` (~1 us,
    against ~6 us for the DLPack round trip with its device query); None for
    what ``numpy()`` cannot view (conjugate or negative bits, other devices),
    which then goes the DLPack way and its checks."""
    if not x.is_cpu:
        return None
    if x.requires_grad:
        raise _grad_error(name)
    try:
        if x.dtype is torch.bfloat16:
            return x.view(torch.int16).numpy().view(_bf16(name))
        return x.numpy()
    except (RuntimeError, TypeError):
        return None


def to_numpy(name: str, x, *, floats: bool = True, writable: bool = False):
    """``x`` as a NumPy array sharing its memory, and the way back.

    Returns (array, back): ``back`` is the caller's ``from_dlpack`` when ``x``
    exported DLPack, else None. A NumPy array (or subclass), None, a
    PackedWeight and any object that is neither a DLPack nor a buffer-protocol
    exporter are returned unchanged, so the kernel's own checks name them.
    ``floats``: the kernel takes float32 (or bfloat16) data here; any other
    dtype of a DLPack exporter raises TypeError. ``writable``: the array is an
    ``out`` the kernel writes (it must not be a read-only buffer).
    """
    if x is None or isinstance(x, _ND):
        return x, None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        arr = _torch_view(name, x, torch)
        if arr is not None:
            if floats and arr.dtype != _F32 and not is_bf16(arr.dtype):
                raise _dtype_error(name, x, "float32 (or bfloat16 where stated)")
            return arr, torch.from_numpy
    if hasattr(x, "__dlpack__"):
        _check_device(name, x)
        if getattr(x, "requires_grad", False):
            raise _grad_error(name)
        if _exports_bf16(x):
            arr = _bf16_view(name, x)
        else:
            try:
                arr = np.from_dlpack(x)
            except (BufferError, RuntimeError, TypeError) as e:
                if "grad" in str(e):
                    raise _grad_error(name) from None
                raise TypeError(f"{name}: cannot read this {type(x).__name__} through "
                                f"DLPack ({e})") from None
        if floats and arr.dtype != _F32 and not is_bf16(arr.dtype):
            raise _dtype_error(name, x, "float32 (or bfloat16 where stated)")
        if writable and not arr.flags.writeable:
            raise ValueError(f"{name} is read-only (a {type(x).__name__} cannot be written "
                             f"in place); pass out=None and use the returned array")
        return arr, _from_dlpack_of(type(x))
    try:
        memoryview(x).release()
    except TypeError:
        return x, None  # not an array at all: the kernel's checks raise
    arr = np.asarray(x)  # the buffer protocol: a view
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} is a read-only buffer; pass out=None")
    return arr, None


def adapt(names: tuple, values: tuple, out=None, ints: tuple = ()):
    """Convert a kernel's array arguments (``values``, named ``names``; the
    names in ``ints`` hold integers) and its ``out``. Returns (arrays,
    out_array, finish): ``finish(result)`` gives the caller's ``out`` when it
    passed one, else the result in the type of the first DLPack input (NumPy
    when there is none)."""
    arrays = []
    back = None
    for name, v in zip(names, values):
        arr, b = to_numpy(name, v, floats=name not in ints)
        arrays.append(arr)
        if back is None:
            back = b
    out_arr = None
    if out is not None:
        out_arr, _ = to_numpy("out", out, writable=True)

    def finish(res):
        if out is not None:
            return out
        return res if back is None else back(res)

    return arrays, out_arr, finish
