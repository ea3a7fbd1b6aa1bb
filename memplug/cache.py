"""Decoding cache of a `RoutedMemory` layer: fixed size, whatever the number of tokens seen."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .routing import SlotCounts


@dataclass
class MemoryCache:
    """What one layer carries from one call to the next.

    `RoutedMemory.forward(x, cache=c)` advances `c` in place (its state tensors may be written into)
    and returns it; to branch, e.g. to try two continuations, advance a `clone()` instead.

    state: slot states `[N, H, m, K, V]` (float32, or float64 for a float64 layer).
    conv: short-convolution histories by stream name ("q", "k", "v", "shared_k", "shared_v"),
        `[N, kernel_size - 1, channels]` each; empty without short convolutions.
    shared_state: the always-on slot `[N, H, 1, K, V]`, or None without one.
    counts: tokens seen and routes each slot kept (`memplug.routing.SlotCounts`) for a router with a
        capacity factor, or None without one.
    """

    state: torch.Tensor
    conv: dict = field(default_factory=dict)
    shared_state: Optional[torch.Tensor] = None
    counts: Optional[SlotCounts] = None

    def advance(self, state: torch.Tensor, conv: dict, shared_state: Optional[torch.Tensor],
                counts: Optional[SlotCounts] = None) -> None:
        """Take the layer's new tensors. Where autograd records nothing, they are copied into this
        cache's own tensors, which so keep their storage from step to step: a decode step captured
        in a CUDA graph reads and writes the same memory at every replay. Where autograd records the
        step, the new tensors replace the old ones, which its backward may still need."""
        def keep(old, new):
            if old is None or new is None or old is new or old.shape != new.shape or old.dtype != new.dtype:
                return new
            if torch.is_grad_enabled() and (old.requires_grad or new.requires_grad):
                return new
            return old.copy_(new)

        self.state = keep(self.state, state)
        self.conv = {name: keep(self.conv.get(name), history) for name, history in conv.items()}
        self.shared_state = keep(self.shared_state, shared_state)
        if counts is not None:
            old = self.counts
            self.counts = counts if old is None else SlotCounts(*(keep(o, n) for o, n in zip(old, counts)))

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def clone(self) -> "MemoryCache":
        """A copy that shares no tensor with this cache."""
        return MemoryCache(self.state.clone(), {name: s.clone() for name, s in self.conv.items()},
                           None if self.shared_state is None else self.shared_state.clone(),
                           None if self.counts is None else SlotCounts(*(c.clone() for c in self.counts)))

    def reorder(self, index: torch.Tensor) -> "MemoryCache":
        """The cache of the sequences `index` (beam search reorders, drops and repeats the batch's
        sequences): a new cache whose row i is row `index[i]` of this one."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
            got = f"{index.dtype} of shape {list(index.shape)}" if isinstance(index, torch.Tensor) else repr(index)
            raise ValueError(f"index: expected a 1-d int64 tensor of sequence indices, got {got}")
        if index.device != self.state.device:
            raise ValueError(f"index: expected a tensor on {self.state.device}, got one on {index.device}")
        return MemoryCache(self.state.index_select(0, index),
                           {name: s.index_select(0, index) for name, s in self.conv.items()},
                           None if self.shared_state is None else self.shared_state.index_select(0, index),
                           None if self.counts is None else SlotCounts(*(c.index_select(0, index)
                                                                         for c in self.counts)))
