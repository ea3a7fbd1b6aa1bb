"""PyTorch versions of the small operations inside flash-linear-attention layers.

fla runs its short convolutions, norms and activations through Triton kernels, which do not run on a
CPU as shipped. The adapters compute them here from the wrapped layer's own parameters, with the same
math (float32 accumulation, output in the input's dtype), on any device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from memplug.modules import at_least_float32, sequence_positions


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


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dimension, in float32 (fla's in-kernel qk l2 norm)."""
    y = at_least_float32(x)
    return (y * torch.rsqrt(y.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def sum_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DeltaNet's `qk_norm="sum"`: `x / max(sum |x|, eps)` over the last dimension."""
    return F.normalize(x, p=1, dim=-1, eps=eps).to(x.dtype)


def rms_norm(x, weight=None, bias=None, eps=1e-5, group_size: Optional[int] = None):
    """RMS norm over the last dimension (or over groups of `group_size` channels), times `weight`,
    plus `bias`; computed in float32, returned in float32 (callers cast)."""
    y = at_least_float32(x)
    if group_size is not None and group_size != y.shape[-1]:
        shape = y.shape
        y = y.unflatten(-1, (-1, group_size))
        y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)).reshape(shape)
    else:
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * at_least_float32(weight)
    if bias is not None:
        y = y + at_least_float32(bias)
    return y


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


def _pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor):
    """Packed `[1, T, C]` -> padded `[N, L, C]`, with the (sequence, position) of every token."""
    T = x.shape[1]
    lengths = cu_seqlens.diff()
    N, L = lengths.numel(), int(lengths.max())
    seq, pos = sequence_positions(cu_seqlens, T)
    padded = x.new_zeros(N, L, x.shape[-1]).index_put((seq, pos), x[0])
    return padded, lengths, (seq, pos)


def causal_conv(x, weight, bias=None, act: Optional[str] = None, cache=None, cu_seqlens=None,
                output_final_state: bool = False):
    """Depthwise causal convolution over time, as fla's `ShortConvolution` (and Mamba-2's conv1d).

    x: `[B, T, C]` (with `cu_seqlens`, B = 1 and the packed sequences are convolved separately);
    weight: `[C, 1, W]` or `[C, W]`; bias: `[C]` or None; act: activation name or None.
    cache: `[N, C, W]` in fla's layout, the last W inputs before the call (newest last), or None for
    zeros. Returns `(y [B, T, C], final [N, C, W] or None)`.
    """
    w = weight.reshape(weight.shape[0], -1)
    C, W = w.shape
    if cu_seqlens is None:
        rows, lengths, where = x, None, None
    else:
        rows, lengths, where = _pad_packed(x, cu_seqlens)
    N, L = rows.shape[:2]
    if cache is None:
        history = rows.new_zeros(N, W - 1, C)
    else:
        history = cache[..., 1:].transpose(1, 2).to(rows.dtype)
    source = torch.cat([history, rows], 1)  # [N, W - 1 + L, C]
    y = F.conv1d(source.transpose(1, 2), w[:, None, :].to(rows.dtype),
                 None if bias is None else bias.to(rows.dtype), groups=C).transpose(1, 2)
    y = activation(act, "short convolution")(y)
    final = None
    if output_final_state:
        ends = torch.full((N,), L, device=x.device) if lengths is None else lengths
        taps = ends[:, None] - 1 + torch.arange(W, device=x.device)  # source rows of the last W inputs
        final = source.gather(1, taps[:, :, None].expand(N, W, C)).transpose(1, 2).contiguous()
    if where is not None:
        y = y[where].unsqueeze(0)
    return y, final

