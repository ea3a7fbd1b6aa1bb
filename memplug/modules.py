"""Small building blocks of the layers: RMS norm (optionally gated) and a causal short convolution."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive_int


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 if it is float64: gates and norms never lose precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain; `forward(x, gate)` multiplies
    by `silu(gate)` afterwards (the output gate of GLA / Gated DeltaNet / MoM layers)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate: Optional[torch.Tensor] = None):
        y = F.rms_norm(at_least_float32(x), (x.shape[-1],), at_least_float32(self.weight), self.eps)
        if gate is not None:
            y = y * F.silu(at_least_float32(gate))
        return y.to(x.dtype)


def sequence_positions(cu_seqlens: torch.Tensor, T: int):
    """For packed sequences: the sequence of each token and its position within it, `[T]` each."""
    seq = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=cu_seqlens.device), right=True)
    return seq, torch.arange(T, device=cu_seqlens.device) - cu_seqlens[seq]


class ShortConv(nn.Module):
    """Depthwise causal convolution of width `kernel_size` over time, then SiLU.

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
        B, T, C = x.shape
        W = self.kernel_size
        if cu_seqlens is None:  # rows are sequences: the same as packing them
            cu_seqlens = torch.arange(B + 1, device=x.device) * T
        N = cu_seqlens.numel() - 1
        history = x.new_zeros(N, W - 1, C) if state is None else state.to(x.dtype)
        # One source for every tap: the packed inputs, then each sequence's history.
        source = torch.cat([x.reshape(B * T, C), history.reshape(N * (W - 1), C)])
        seq, pos = sequence_positions(cu_seqlens, B * T)
        taps = self._taps(seq, pos, torch.arange(B * T, device=x.device), B * T)  # [BT, W]
        y = torch.einsum("tcw,cw->tc", source[taps].transpose(1, 2), self.weight) + self.bias
        y = F.silu(y).reshape(B, T, C)
        if not output_state:
            return y, None
        # The last W - 1 inputs of a sequence are the taps of a token one past its end.
        ends = cu_seqlens[1:]
        lengths = ends - cu_seqlens[:-1]
        new_state = source[self._taps(torch.arange(N, device=x.device), lengths, ends, B * T)[:, :-1]]
        return y, new_state

    def _taps(self, seq, pos, flat, num_tokens):
        """Rows of `source` read by the convolution at each token: tap j reads the input
        W - 1 - j steps back, from the packed inputs or, before the sequence start, its history."""
        W = self.kernel_size
        back = torch.arange(W - 1, -1, -1, device=seq.device)  # steps back of taps 0..W-1
        in_sequence = pos[:, None] >= back
        from_history = num_tokens + seq[:, None] * (W - 1) + (W - 1) - (back - pos[:, None])
        return torch.where(in_sequence, flat[:, None] - back, from_history)
