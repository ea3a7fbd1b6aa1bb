"""The decode step: one token, the R routed slots of each head updated in place.

One program per (batch row, head, V block) loops over the token's R routes: it reads the routed
slot's [K, BV] block of the state, applies the family's canonical update (the rule's coupling was
applied before, in PyTorch), writes the block back and adds the slot's read to the output. Nothing
else of the state is read or written, so the bytes moved per token are 2 R K V * 4 per head,
independent of the number of slots m.

    additive:  S <- exp(a) S + k v^T
    delta:     S <- exp(a) S;  S <- S + b k (v - S^T k)^T
    o = scale sum_r read_w_r S_r^T q
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import autotune_or_first, fitting_state_tiles

# 1 warp spilled at K = 128. Each program holds a [K, BV] float32 state: pruned by K (BV 64 with 2
# warps spilled at K = 128, with 4 at K = 256).
_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw) for bv in (32, 64) for nw in (4, 2)]


@autotune_or_first(_CONFIGS, key=["K", "V", "R", "DECAY", "DELTA"], restore_value=["state"], prune=fitting_state_tiles)
@triton.jit
def step_kernel(state, q, k, v, a, b, idx, read_w, o, s_b, s_h, s_m, s_k, s_v, H, scale,
                R: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                DECAY: tl.constexpr, DELTA: tl.constexpr):
    """state [B,H,m,K,V] fp32 (any strides, updated in place); q [B,H,K]; per route, contiguous:
    k [B,H,R,K], v [B,H,R,V], a [B,H,R] (DECAY 1) or [B,H,R,K] (DECAY 2), b [B,H,R] (delta),
    idx, read_w [B,H,R]; o [B,H,V] fp32."""
    i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_o = tl.zeros([BV], dtype=tl.float32)
    base = state + i_b * s_b + i_h * s_h + o_k[:, None] * s_k + o_v[None, :] * s_v
    for r in range(R):
        e = i_bh * R + r
        slot = tl.load(idx + e).to(tl.int64)
        p_s = base + slot * s_m
        b_s = tl.load(p_s, mask=m_kv, other=0.0)
        b_k = tl.load(k + e * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + e * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if DECAY == 1:
            b_s = b_s * tl.exp(tl.load(a + e).to(tl.float32))
        elif DECAY == 2:
            b_s = b_s * tl.exp(tl.load(a + e * K + o_k, mask=m_k, other=0.0).to(tl.float32))[:, None]
        if DELTA:
            b_v = (b_v - tl.sum(b_s * b_k[:, None], 0)) * tl.load(b + e).to(tl.float32)
        b_s = b_s + b_k[:, None] * b_v[None, :]
        tl.store(p_s, b_s, mask=m_kv)
        b_o += tl.load(read_w + e).to(tl.float32) * tl.sum(b_s * b_q[:, None], 0)
    tl.store(o + i_bh * V + o_v, b_o * scale, mask=m_v)
