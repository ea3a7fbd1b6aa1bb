"""PyTorch versions of the small operations inside flash-linear-attention layers.

fla runs its short convolutions, norms and activations through Triton kernels, which do not run on a
CPU as shipped. The adapters compute them from the wrapped layer's own parameters, with the same
math (float32 accumulation, output in the input's dtype), on any device: the activations by fla's
names and the norms here, on memplug's one RMS norm, L2 norm and short convolution
(`memplug.modules`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from memplug.modules import at_least_float32, rms_norm


def _sqrelu(x):
    return F.relu(x).square()


def _elu_p1(x):
    return F.elu(x) + 1.0


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# Activation names as fla spells them (`fla.modules.activations.ACT2FN`, layer options).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "relu": F.relu,
    "sqrelu": _sqrelu,
    "gelu": _gelu_tanh,
    "elu": _elu_p1,  # DeltaNet's qk_activation "elu" is fla's elu_p1
    "elu_p1": _elu_p1,
    "identity": lambda x: x,
}


def activation(name: Optional[str], where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function of an fla activation name (None is the identity)."""
    if name is None:
        return ACTIVATIONS["identity"]
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} has no PyTorch version here; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def activation_name(fn, where: str) -> Optional[str]:
    """The name of an activation function object taken from fla's ACT2FN (None for None)."""
    if fn is None:
        return None
    if isinstance(fn, str):
        activation(fn, where)
        return fn
    from fla.modules.activations import ACT2FN

    for name, candidate in ACT2FN.items():
        if candidate is fn and name in ACTIVATIONS:
            return name
    for name, candidate in ACTIVATIONS.items():
        if candidate is fn:
            return name
    raise ValueError(f"{where}: unknown activation function {fn!r}; supported: {sorted(ACTIVATIONS)}")


def sum_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DeltaNet's `qk_norm="sum"`: `x / max(sum |x|, eps)` over the last dimension."""
    return F.normalize(x, p=1, dim=-1, eps=eps).to(x.dtype)


def norm(x, module, gate=None, gate_activation: str = "swish"):
    """fla's `RMSNorm` (gate None) or `FusedRMSNormGated` (`norm(x) * act(gate)`) with `module`'s
    weight, bias and eps; output in the dtype of `x`."""
    y = rms_norm(x, getattr(module, "weight", None), getattr(module, "bias", None), module.eps)
    if gate is not None:
        y = y * activation(gate_activation, "output gate")(at_least_float32(gate))
    return y.to(x.dtype)


def gated_group_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """fla's `RMSNormGated` (Mamba-2's output norm): `norm(x * silu(z))`, or `norm(x) * silu(z)`
    with `norm_before_gate`; per group of `group_size` channels; output in the dtype of `x`."""
    xf, zf = at_least_float32(x), at_least_float32(z)
    if not norm_before_gate:
        xf = xf * F.silu(zf)
    y = rms_norm(xf, weight, None, eps, group_size)
    if norm_before_gate:
        y = y * F.silu(zf)
    return y.to(x.dtype)
