"""The combine (docs/contract.md section 5, step 5) as two kernels: route outputs, in the packed order,
back into tokens, weighted by the read weights.

A token's R route entries of one head group are entries e = g R + r (g = its (token, group) row of
the output); entry e's route output is packed row `positions[e]`. Each row carries the Hb heads of
its group, so a packed row and a (token, group) row of the output are both F = Hb V contiguous values:

    forward:   o[g] = sum_r read_w[g R + r] out[positions[g R + r]]
    backward:  dout[positions[e]] = read_w[e] do[e // R],   dread_w[e] = do[e // R] . out[positions[e]]

One program per (token, group) row and block of F (forward), or per entry (backward): the packed
rows are read through `positions`, never gathered into entry order first, and the sum over routes
is a loop in one program, deterministic, with no atomic adds. Sums are in float32; `o` and `dout`
are stored in their own dtype (the input dtype), rounded once. `Combine` is the autograd function
that launches them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_or_first
from .function import HIGHER_ORDER_ERROR

# Elementwise work: one configuration; the block of F is set per launch (`feature_block`).
_CONFIGS = [triton.Config({}, num_warps=4)]


def feature_block(F: int) -> int:
    """Values of a row per block: F padded to a power of two, at most 1024 (8 per thread of 4 warps)."""
    return min(triton.next_power_of_2(F), 1024)


@autotune_or_first(_CONFIGS, key=["F", "R"])
@triton.jit
def combine_fwd_kernel(out, positions, read_w, o, F: tl.constexpr, R: tl.constexpr, BF: tl.constexpr):
    """o [G, F] (in its dtype) from out [E, F] (float32, packed order), positions [E], read_w [E] (float32)."""
    i_g, i_f = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    b_o = tl.zeros([BF], dtype=tl.float32)
    for r in range(R):
        e = i_g * R + r
        row = tl.load(positions + e)
        b_o += tl.load(read_w + e) * tl.load(out + row * F + o_f, mask=m_f, other=0.0)
    tl.store(o + i_g * F + o_f, b_o.to(o.dtype.element_ty), mask=m_f)


@autotune_or_first(_CONFIGS, key=["F", "R", "WEIGHT_GRAD"])
@triton.jit
def combine_bwd_kernel(out, positions, read_w, do, dout, dread_w, F: tl.constexpr, R: tl.constexpr,
                       BF: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    """dout [E, F] (in its dtype, packed order) and, with WEIGHT_GRAD, dread_w [E] (float32) from
    do [G, F]; out, positions, read_w as in the forward."""
    e = tl.program_id(0).to(tl.int64)
    row = tl.load(positions + e)
    weight = tl.load(read_w + e)
    b_dw = tl.zeros([BF], dtype=tl.float32)
    for i_f in range(tl.cdiv(F, BF)):
        o_f = i_f * BF + tl.arange(0, BF)
        m_f = o_f < F
        b_do = tl.load(do + (e // R) * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        tl.store(dout + row * F + o_f, (weight * b_do).to(dout.dtype.element_ty), mask=m_f)
        if WEIGHT_GRAD:
            b_dw += b_do * tl.load(out + row * F + o_f, mask=m_f, other=0.0)
    if WEIGHT_GRAD:
        tl.store(dread_w + e, tl.sum(b_dw, 0))


class Combine(torch.autograd.Function):
    """o [B, T, H, V] in `dtype` from route outputs `out [E, Hb, V]` (float32, packed order): see the
    module's docstring. `read_w [B, T, Hr, R]`, `positions [E]` (`Packing.positions`)."""

    @staticmethod
    def forward(ctx, out, read_w, positions, dtype):
        B, T, Hr, R = read_w.shape
        E, Hb, V = out.shape
        F = Hb * V
        weights = read_w.reshape(E).to(torch.float32).contiguous()
        o = out.new_empty(B, T, Hr * Hb, V, dtype=dtype)
        BF = feature_block(F)
        combine_fwd_kernel[(B * T * Hr, triton.cdiv(F, BF))](out=out, positions=positions, read_w=weights, o=o, F=F,
                                                             R=R, BF=BF)
        # The route outputs are kept only for the read weights' gradient.
        ctx.save_for_backward(out if ctx.needs_input_grad[1] else None, weights, positions)
        ctx.read_w_dtype, ctx.shape, ctx.out_shape = read_w.dtype, read_w.shape, out.shape
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():  # create_graph=True: see `function.ChunkScan.backward`
            raise RuntimeError(HIGHER_ORDER_ERROR)
        out, weights, positions = ctx.saved_tensors
        E, Hb, V = ctx.out_shape
        F = Hb * V
        weight_grad = ctx.needs_input_grad[1]
        dout = do.new_empty(E, Hb, V)
        dread_w = torch.empty_like(weights) if weight_grad else None
        combine_bwd_kernel[(E,)](out=out, positions=positions, read_w=weights, do=do.contiguous(), dout=dout,
                                 dread_w=dread_w, F=F, R=ctx.shape[-1], BF=feature_block(F), WEIGHT_GRAD=weight_grad)
        return dout, dread_w.view(ctx.shape).to(ctx.read_w_dtype) if weight_grad else None, None, None
