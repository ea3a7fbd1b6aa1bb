"""Small building blocks of the layers and adapters: the RMS norm, the L2 norm and the causal short
convolution, each once."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive_int


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 if it is float64: gates and norms never lose precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x, weight=None, bias=None, eps: float = 1e-5, group_size: Optional[int] = None):
    """`x / sqrt(mean(x^2) + eps)` over the last dimension (or over groups of `group_size` channels),
    times `weight`, plus `bias`; in float32 (float64 for float64 inputs), which callers cast back.
    The one RMS norm of memplug: `RMSNorm` and the adapters' versions of fla's norms use it."""
    y = at_least_float32(x)
    if group_size is not None and group_size != y.shape[-1]:
        y = y.unflatten(-1, (-1, group_size))
        y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    else:
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * at_least_float32(weight)
    if bias is not None:
        y = y + at_least_float32(bias)
    return y


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dimension, computed in float32, in the dtype of `x`:
    the one L2 norm of memplug (the layers' q, k norm, and fla's in-kernel one, whose eps it takes)."""
    y = at_least_float32(x)
    return (y * torch.rsqrt(y.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain; `forward(x, gate)` multiplies
    by `silu(gate)` afterwards (the output gate of GLA / Gated DeltaNet / MoM layers)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate: Optional[torch.Tensor] = None):
        y = rms_norm(x, self.weight, eps=self.eps)
        if gate is not None:
            y = y * F.silu(at_least_float32(gate))
        return y.to(x.dtype)


def sequence_positions(cu_seqlens: torch.Tensor, T: int):
    """For packed sequences: the sequence of each token and its position within it, `[T]` each."""
    seq = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=cu_seqlens.device), right=True)
    return seq, torch.arange(T, device=cu_seqlens.device) - cu_seqlens[seq]


def causal_conv(x, weight, bias=None, activation=None, history=None, cu_seqlens=None, keep: Optional[int] = None):
    """Depthwise causal convolution over time: the one short convolution of memplug (`ShortConv`,
    and the adapters' version of fla's `ShortConvolution` and Mamba-2's conv1d).

    x `[B, T, C]`, each row a sequence, or with `cu_seqlens` (B = 1) packed sequences convolved
    separately; weight `[C, W]` (or `[C, 1, W]`); bias `[C]` or None; `activation` a function or
    None. history `[N, W - 1, C]`: the inputs before each sequence, oldest first (zeros if None).
    Returns `(y [B, T, C], the last `keep` inputs of each sequence [N, keep, C], oldest first, or
    None without `keep`)`; `keep` is at most W. Every tap is a gather from one source (the inputs, then
    the histories), so packed sequences cost no host sync."""
    B, T, C = x.shape
    w = weight.reshape(C, -1)
    W = w.shape[-1]
    if cu_seqlens is None:  # rows are sequences: the same as packing them
        cu_seqlens = torch.arange(B + 1, device=x.device) * T
    N = cu_seqlens.numel() - 1
    past = x.new_zeros(N, W - 1, C) if history is None else history.to(x.dtype)
    source = torch.cat([x.reshape(B * T, C), past.reshape(N * (W - 1), C)])
    seq, pos = sequence_positions(cu_seqlens, B * T)
    taps = _taps(seq, pos, torch.arange(B * T, device=x.device), B * T, W, W)  # [BT, W]
    y = torch.einsum("tcw,cw->tc", source[taps].transpose(1, 2), w.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation is not None:
        y = activation(y)
    if keep is None:
        return y.reshape(B, T, C), None
    # The last `keep` inputs of a sequence are the taps of its last token, back `keep` - 1 steps.
    ends = cu_seqlens[1:] - 1
    last = _taps(torch.arange(N, device=x.device), ends - cu_seqlens[:-1], ends, B * T, W, keep)
    return y.reshape(B, T, C), source[last]


def _taps(seq, pos, flat, num_tokens, W, count):
    """Rows of the convolution's source read at each token: the `count` inputs up to and including
    the token's own, oldest first, from the packed inputs or, before the sequence start, its
    history of W - 1 inputs (`count` - 1 <= `pos` + W - 1, which `count` <= W ensures)."""
    back = torch.arange(count - 1, -1, -1, device=seq.device)  # steps back of each tap
    in_sequence = pos[:, None] >= back
    from_history = num_tokens + seq[:, None] * (W - 1) + (W - 1) - (back - pos[:, None])
    return torch.where(in_sequence, flat[:, None] - back, from_history)


class ShortConv(nn.Module):
    """Depthwise causal convolution of width `kernel_size` over time, then SiLU (`causal_conv`).

    `forward(x [B,T,C], state=None, cu_seqlens=None, output_state=False) -> (y, state)`. Each row of
    `x` is one sequence, or with `cu_seqlens` (B = 1) the packed sequences are convolved separately.
    `state [N, kernel_size - 1, C]` holds the last inputs before each sequence (zeros if None), so
    decoding one token at a time equals convolving the whole sequence.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x, state=None, cu_seqlens=None, output_state=False):
        return causal_conv(x, self.weight, self.bias, F.silu, state, cu_seqlens,
                           self.kernel_size - 1 if output_state else None)
