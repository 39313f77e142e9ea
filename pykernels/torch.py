"""pykernels inside PyTorch models: ``Linear`` and ``optimize``.

An optional module (it imports torch; the core package never does) on the
kernel layer only. ``Linear`` is an ``nn.Module`` holding a ``PackedWeight``
(fp32, bf16 or int8) with bias and activation fused into the kernel;
``optimize(model, precision=...)`` swaps a model's ``nn.Linear`` layers for it
in place, as ``torch.ao.quantization.quantize_dynamic`` does, and returns a
report of what it swapped. Inference only: there is no backward (see
``Linear.forward``). docs/torch.md shows both on a Hugging Face BertModel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from ._gemm import ACTIVATIONS, PRECISIONS, PackedWeight, linear, pack

__all__ = ["Linear", "OptimizeReport", "SwappedLayer", "optimize"]


class Linear(nn.Module):
    """``activation(x @ W.T + b)`` on a pykernels ``PackedWeight``.

    Build it from an ``nn.Linear`` with ``Linear.from_linear(lin,
    precision="bf16")``. forward takes a CPU tensor of shape (..., in_features)
    (float32; other float dtypes are cast to float32 first) and returns float32
    (..., out_features). Inference only: a forward whose input requires grad
    while grad mode is on raises RuntimeError (run the model under
    ``torch.no_grad()`` or ``torch.inference_mode()``). The packed weight is
    not a parameter: ``state_dict`` holds the bias only.
    """

    def __init__(self, weight: PackedWeight, bias: Optional[torch.Tensor] = None, *,
                 activation: Optional[str] = None, variant: str = "auto", threads=None):
        super().__init__()
        if type(weight) is not PackedWeight:
            raise TypeError(f"weight must be a pykernels.PackedWeight, got "
                            f"{type(weight).__name__}; use Linear.from_linear(nn.Linear)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.packed = weight
        self.in_features, self.out_features = weight.shape
        self.activation = activation
        self.variant = variant
        self.threads = threads
        if bias is not None:
            bias = bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), "
                                 f"got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)
        self._bias_np = None if bias is None else bias.numpy()

    @classmethod
    def from_linear(cls, lin: nn.Linear, precision: str = "fp32", *,
                    activation: Optional[str] = None, variant: str = "auto",
                    threads=None) -> "Linear":
        """Pack ``lin.weight`` (out, in) at ``precision`` ("fp32", "bf16",
        "int8" or "int8_7bit"); ``activation`` (None, "relu", "gelu", "gelu_tanh", "silu")
        is fused after the bias."""
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(lin).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        w = lin.weight.detach()
        if w.device.type != "cpu":
            raise ValueError(f"the layer's weight is on {w.device}; move the model to the CPU "
                             "first (model.cpu())")
        w = w.to(torch.float32)
        packed = pack(w.numpy(), precision=precision, layout="nk")
        return cls(packed, lin.bias, activation=activation, variant=variant, threads=threads)

    @property
    def precision(self) -> str:
        return self.packed.precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("pykernels.torch.Linear is inference-only (no backward): run "
                               "the model under torch.no_grad() or torch.inference_mode(), "
                               "or pass x.detach()")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return torch.from_numpy(linear(x.detach().numpy(), self.packed, self._bias_np,
                                       activation=self.activation, variant=self.variant,
                                       threads=self.threads))

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() reach buffers here: keep the bias a CPU
        # float32 tensor (the kernel's contract) and its NumPy view in step.
        out = super()._apply(fn, *args, **kwargs)
        if self.bias is not None:
            if self.bias.device.type != "cpu":
                raise ValueError("pykernels.torch.Linear runs on the CPU only")
            self.bias = self.bias.to(torch.float32).contiguous()
            self._bias_np = self.bias.numpy()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"precision={self.precision!r}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, rel_error={self.packed.rel_error:.3g}")


@dataclass(frozen=True)
class SwappedLayer:
    name: str             # the module's qualified name in the model
    in_features: int
    out_features: int
    precision: str
    rel_error: float      # of the packed weight against the original


@dataclass
class OptimizeReport:
    """What ``optimize`` did: the swapped layers, the ``nn.Linear`` subclasses
    it left alone (their owners read ``.weight`` directly, as
    ``nn.MultiheadAttention`` does), and the measured cosine when
    ``accuracy`` was asked for."""
    precision: str
    swapped: List[SwappedLayer] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    cosine: Optional[float] = None

    @property
    def weight_bytes(self) -> int:
        return sum(s.in_features * s.out_features for s in self.swapped) * \
            {"fp32": 4, "bf16": 2, "int8": 1, "int8_7bit": 1}[self.precision]

    def __str__(self) -> str:
        lines = [f"pykernels.torch.optimize: {len(self.swapped)} nn.Linear layers -> "
                 f"pykernels {self.precision} ({self.weight_bytes / 2**20:.1f} MiB of weights)"]
        for s in self.swapped:
            lines.append(f"  {s.name:<48} {s.in_features:>6} -> {s.out_features:<6} "
                         f"{s.precision:<5} rel_error {s.rel_error:.2e}")
        for name in self.skipped:
            lines.append(f"  {name:<48} skipped (an nn.Linear subclass)")
        if self.cosine is not None:
            lines.append(f"  output cosine to the original model: {self.cosine:.6f}")
        return "\n".join(lines)


def _first_tensor(out) -> torch.Tensor:
    """The tensor a model's output leads with: itself, the first item of a
    tuple or list, or the first value of a dict (a transformers ModelOutput,
    whose first value is last_hidden_state or logits)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}")


def _run(model: nn.Module, example_inputs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(example_inputs, dict):
            out = model(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            out = model(*example_inputs)
        else:
            out = model(example_inputs)
    return _first_tensor(out).detach().to(torch.float64).flatten()


def optimize(model: nn.Module, precision: str = "fp32", accuracy: Optional[float] = None, *,
             example_inputs=None, variant: str = "auto", threads=None) -> OptimizeReport:
    """Swap every ``nn.Linear`` of ``model`` (exactly that class) for a
    ``pykernels.torch.Linear`` at ``precision``, in place; returns an
    ``OptimizeReport``.

    accuracy: a minimum cosine between the model's output before and after the
    swap on ``example_inputs`` (a tensor, a tuple of positional arguments or a
    dict of keyword arguments; the output compared is the first tensor of the
    model's output, flattened). Below it, the original layers are put back
    and ValueError says the measured cosine. The swapped model is for
    inference (``torch.no_grad()`` or ``torch.inference_mode()``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if accuracy is not None:
        if not 0 < accuracy <= 1:
            raise ValueError(f"accuracy is a minimum cosine in (0, 1], got {accuracy!r}")
        if example_inputs is None:
            raise ValueError("accuracy= needs example_inputs= to measure the output cosine on")
    before = _run(model, example_inputs) if accuracy is not None else None
    report = OptimizeReport(precision)
    originals = []  # (parent, attribute, original module) to undo the swap
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is nn.Linear:
                new = Linear.from_linear(child, precision, variant=variant, threads=threads)
                setattr(parent, attr, new)
                originals.append((parent, attr, child))
                report.swapped.append(SwappedLayer(name, new.in_features, new.out_features,
                                                   precision, new.packed.rel_error))
            elif isinstance(child, nn.Linear):
                report.skipped.append(name)
    if accuracy is not None:
        after = _run(model, example_inputs)
        cos = float(torch.dot(before, after) / (before.norm() * after.norm()).clamp_min(1e-300))
        report.cosine = cos
        if not np.isfinite(cos) or cos < accuracy:
            for parent, attr, child in originals:
                setattr(parent, attr, child)
            raise ValueError(f"{precision}: output cosine {cos:.6f} is below accuracy="
                             f"{accuracy}; the model's original layers are back")
    return report
