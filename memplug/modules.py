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
    None without `keep`)`; `keep` is at most W. The output is a sum of W shifted copies of the
    inputs (taps) times a weight per channel: elementwise products, which on a CPU cost a fraction
    of a gather or a grouped convolution at the small widths of short convolutions."""
    B, T, C = x.shape
    w = weight.reshape(C, -1).t().contiguous().to(x.dtype)  # [W, C]: row j weighs tap j, oldest first
    W = w.shape[0]
    if cu_seqlens is None:  # rows are sequences: each is its history, then its inputs
        past = x.new_zeros(B, W - 1, C) if history is None else history.to(x.dtype)
        padded = torch.cat([past, x], 1)
        taps = [padded[:, j:j + T] for j in range(W)]
        last = None if keep is None else padded[:, padded.shape[1] - keep:]
    else:
        taps, last = _packed_taps(x.reshape(B * T, C), history, cu_seqlens, W, keep)
        taps = [tap.reshape(B, T, C) for tap in taps]
    y = taps[0] * w[0]
    for j in range(1, W):
        y = y + taps[j] * w[j]
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation is not None:
        y = activation(y)
    return y, last


def _packed_taps(x, history, cu_seqlens, W, keep):
    """The W taps `[T, C]` of packed inputs `x [T, C]`, oldest first, and the last `keep` inputs of
    each sequence (or None). Tap j of a token is the input W - 1 - j rows earlier in the stream or,
    before its sequence's start, a row of its history: shifted views and a mask, no host sync. The
    mask is a `where`, not a product, so a NaN never crosses into the next sequence."""
    T, C = x.shape
    N = cu_seqlens.numel() - 1
    past = None if history is None else history.to(x.dtype).reshape(N * (W - 1), C)
    seq, pos = sequence_positions(cu_seqlens, T)
    padded = F.pad(x, (0, 0, W - 1, 0))  # row W - 1 + t is input t
    taps = []
    for j in range(W):
        back = W - 1 - j
        tap = padded[j:j + T]
        if back:
            inside = (pos >= back)[:, None]
            if past is None:
                tap = torch.where(inside, tap, 0)
            else:  # history row (W - 1) - (back - pos) of the token's sequence, oldest first
                rows = torch.where(inside[:, 0], 0, seq * (W - 1) + (W - 1) - (back - pos))
                tap = torch.where(inside, tap, past[rows])
        taps.append(tap)
    if keep is None:
        return taps, None
    # The last `keep` inputs of a sequence: counting back from its last token into its history.
    source = torch.cat([x, x.new_zeros(N * (W - 1), C) if past is None else past])
    back = torch.arange(keep - 1, -1, -1, device=x.device)
    ends = cu_seqlens[1:] - 1
    length = (ends - cu_seqlens[:-1])[:, None]
    from_history = T + torch.arange(N, device=x.device)[:, None] * (W - 1) + (W - 1) - (back - length)
    return taps, source[torch.where(length >= back, ends[:, None] - back, from_history)]


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
