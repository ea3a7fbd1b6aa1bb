"""Per-slot copies of an adapted layer's write modules (`wrap(..., per_slot_kv=True)`): `num_slots`
independent linear maps (`SlotLinear`) and short convolutions (`SlotConv`), each starting as a copy of
the layer's module."""
from __future__ import annotations

import torch
import torch.nn as nn


class SlotLinear(nn.Module):
    """`num_slots` independent linear maps: weight `[m, out, in]`, bias `[m, out]`.

    With `shared_input`, `x [..., in]` feeds every slot; otherwise `x [..., m, in]` gives each slot its
    own input. Returns `[..., m, out]`.
    """

    def __init__(self, num_slots, in_features, out_features, bias=True, shared_input=True, device=None,
                 dtype=None):
        super().__init__()
        self.num_slots, self.in_features, self.out_features = num_slots, in_features, out_features
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(num_slots, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_slots, out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def copies(cls, linear: nn.Linear, num_slots: int, shared_input: bool = True) -> "SlotLinear":
        """`num_slots` copies of `linear`."""
        w = linear.weight
        out = cls(num_slots, linear.in_features, linear.out_features, linear.bias is not None, shared_input,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.detach()[None].expand_as(out.weight))
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach()[None].expand_as(out.bias))
        return out

    def forward(self, x):
        if self.shared_input:
            y = torch.einsum("...i,soi->...so", x, self.weight)
        else:
            y = torch.einsum("...si,soi->...so", x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"num_slots={self.num_slots}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, shared_input={self.shared_input}")


class SlotConv(nn.Module):
    """`num_slots` copies of a depthwise causal convolution over `channels` channels each, stored as
    one convolution over `num_slots * channels` channels (slot-major), weight `[m*C, 1, W]` as in fla."""

    def __init__(self, num_slots, channels, kernel_size, bias, activation, device=None, dtype=None):
        super().__init__()
        self.num_slots, self.channels, self.kernel_size, self.activation = num_slots, channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(num_slots * channels, 1, kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_slots * channels, device=device, dtype=dtype)) if bias else None

    @classmethod
    def copies(cls, conv: nn.Module, num_slots: int) -> "SlotConv":
        w = conv.weight
        C, W = w.shape[0], w.shape[-1]
        out = cls(num_slots, C, W, conv.bias is not None, getattr(conv, "activation", None),
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.detach().reshape(1, C, 1, W).expand(num_slots, C, 1, W).reshape(-1, 1, W))
            if conv.bias is not None:
                out.bias.copy_(conv.bias.detach().repeat(num_slots))
        return out

    def extra_repr(self):
        return (f"num_slots={self.num_slots}, channels={self.channels}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}, activation={self.activation}")


def slot_copies(module: nn.Module, num_slots: int, shared_input: bool = True) -> nn.Module:
    """Per-slot copies of a write module: `nn.Linear` -> `SlotLinear`, a short convolution (a module
    with a `[C, 1, W]` weight, such as fla's `ShortConvolution`) -> `SlotConv`, `nn.Sequential` of
    those -> a `Sequential` whose first map feeds every slot and whose later maps act per slot."""
    if isinstance(module, nn.Linear):
        return SlotLinear.copies(module, num_slots, shared_input)
    if isinstance(module, nn.Conv1d):
        if module.groups != module.in_channels or module.in_channels != module.out_channels:
            raise ValueError(f"per_slot_kv: can only copy depthwise convolutions, got {module}")
        return SlotConv.copies(module, num_slots)
    if isinstance(module, nn.Sequential):
        parts, shared = [], shared_input
        for part in module:
            parts.append(slot_copies(part, num_slots, shared))
            shared = shared and not isinstance(part, nn.Linear)
        return nn.Sequential(*parts)
    if not any(True for _ in module.parameters()):
        return module  # parameter-free (an activation): acts on any shape
    raise TypeError(f"per_slot_kv: cannot make per-slot copies of {type(module).__name__}; "
                    f"supported: nn.Linear, depthwise convolutions, nn.Sequential of those")


def is_slotted(module: nn.Module) -> bool:
    return isinstance(module, (SlotLinear, SlotConv)) or (
        isinstance(module, nn.Sequential) and any(is_slotted(m) for m in module))
