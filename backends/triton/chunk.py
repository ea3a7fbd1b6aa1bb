"""The kernels shared by every rule family: chunk-local cumulative decays, the state pass and the
output pass, forward and backward.

Layout (see `backends/triton/__init__.py`): the packed sequences are rows of `[E, Hb, ...]` tensors
(E route entries in packed order, Hb heads per head group), cut into chunks of BT rows; chunk `c`
is row `c` of `chunk_indices` (packed sequence, chunk within it). Per chunk, with A_t the chunk-local
cumulative log-decay (a scalar per row, or one per key channel) and S_0 the state entering it:

    d   = u - w S_0 (delta family) or v (additive families)                 effective values
    S_C = exp(A_C) S_0 + sum_s exp(A_C - A_s) k_s d_s^T                      state pass
    o_t = scale (q_t exp(A_t))^T S_0 + scale sum_{s<=t} M_ts d_s             output pass

with M_ts = exp(A_t - A_s) q_t.k_s computed in the kernel for scalar (or no) decay, and given by the
rule-specific kernel (`vector.py`) for per-channel decay. Flags: DECAY 0 (none), 1 (scalar `A
[E,Hb]`), 2 (per channel `A [E,Hb,K]`); DELTA (w and u given, d stored).

Backward, with dS_{c+1} the gradient of the state leaving chunk c:

    dd   = scale M^T dO + Kd dS_{c+1}                                         (dd_local + state pass)
    dS_c = exp(A_C) dS_{c+1} + scale Qd^T dO - w^T dd                         (state pass backward)

and `grad_kernel` turns dQd = scale dO S_0^T, dKd = d dS_{c+1}^T, dM = scale dO d^T and
d exp(A_C) = sum(S_0 * dS_{c+1}) into gradients of q, k and A (and dw = -dd S_0^T for the delta
family's WY backward).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (autotune_or_first, chunk_rows, exp_nonpos, fitting_state_tiles, helper, lower_mask, mm, mma,
                     poison_from, row_block, sequence_span, split_finite, state_row, tile)

# The first configuration of each list is the one that runs without autotuning and in the
# interpreter: each is the one ptxas compiled spill-free for every family in bfloat16 at K = V = 128
# (experiments/results/compile-sm90-*.md). The state kernels spilled with 2 warps in every case, and
# with 4 for a per-channel decay; the gradient kernel with BV32 for a per-channel or delta rule. The state
# kernels' lists are pruned by K (`fitting_state_tiles`): BV 64 with 4 warps spilled at K = 256.
_STATE_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                  for bv in (32, 64) for nw in (8, 4) for ns in (2, 3)]
# The state backward in float32 first with one stage: with two, kda's with a read weight spilled 20 B.
_STATE_BWD_FLOAT32_FIRST = triton.Config({"BV": 32}, num_warps=8, num_stages=1)
_CHUNK_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                  for bv in (32, 64) for nw in (4, 8) for ns in (2, 3)]
# (One stage for the first: with two, it needed 240 KB of shared memory for a delta rule in float32.)
# For float32, BV 16: with 32, 64 or 4 warps the delta rules still spilled. 8 warps only: with 4, gla
# and kda spilled 16 to 124 B in bfloat16 at K = 256.
_GRAD_CONFIGS = [triton.Config({"BV": 64}, num_warps=8, num_stages=1)] + [
    triton.Config({"BV": bv}, num_warps=8, num_stages=2) for bv in (64, 32)]
_GRAD_FLOAT32_FIRST = triton.Config({"BV": 16}, num_warps=8, num_stages=1)


@helper
def load_decay(A, rows, m_t, last_row, Hb, i_h, o_k, m_k, K: tl.constexpr, DECAY: tl.constexpr):
    """Cumulative log-decays of a chunk's rows and of its last real row: scalar ([BT], scalar) or
    per channel ([BT, BK], [BK]). Rows past the end read 0."""
    if DECAY == 1:
        b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
        a_last = tl.load(A + last_row * Hb + i_h)
    else:
        b_a = tl.load(A + (rows[:, None] * Hb + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0)
        a_last = tl.load(A + (last_row * Hb + i_h) * K + o_k, mask=m_k, other=0.0)
    return b_a, a_last


@helper
def load_do(do, p_v, m_tv, read_w, rows, m_t, DT: tl.constexpr, HAS_READ_W: tl.constexpr):
    """The output gradient of a block of rows, in the dot dtype DT; weighted by each row's read weight
    when the output kernel applied one (`read_w`), with the one rounding a weighted copy would take."""
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    if HAS_READ_W:
        b_do = b_do.to(tl.float32) * tl.load(read_w + rows, mask=m_t, other=0.0)[:, None]
    return b_do.to(DT)


@helper
def keys_and_scores(q, k, hs, p_rows, m_t, p_hs, o_v, V: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    BKW: tl.constexpr, BV: tl.constexpr, WITH_STATE: tl.constexpr, DT: tl.constexpr):
    """Over the keys in blocks of BKW columns (`common.KEY_BLOCK`; no whole [BT, K] tile is held):
    (q k^T [BT, BT], and q S_0 [BT, BV] for the states at `hs + p_hs` if WITH_STATE), for the chunk's
    rows `p_rows` (packed row * Hb + head)."""
    b_S = tl.zeros([BT, BT], dtype=tl.float32)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKW)):
        o_k = i_k * BKW + tl.arange(0, BKW)
        p_k, m_tk = tile(p_rows, m_t, o_k, K)
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
        b_S = mma(b_q, tl.trans(tl.load(k + p_k, mask=m_tk, other=0.0)), b_S)
        if WITH_STATE:
            p_state, m_kv = tile(o_k, o_k < K, o_v, V)
            b_o = mma(b_q, tl.load(hs + p_hs + p_state, mask=m_kv, other=0.0).to(DT), b_o)
    return b_S, b_o


@helper
def causal_decay(b_S, b_a, m_A, DECAY: tl.constexpr):
    """M [BT, BT] from the scores q k^T: (q_t.k_s) exp(A_t - A_s) on the causal mask `m_A`, else 0
    (DECAY 0 or 1)."""
    if DECAY == 1:
        b_S = b_S * exp_nonpos(b_a[:, None] - b_a[None, :])
    return tl.where(m_A, b_S, 0.0)


# ------------------------------------------------------------------------------ chunk-local cumsum

# Channels of a per-channel decay the cumulative sum takes per program (all 256 at once spilled
# registers); tests lower it to cover several blocks at small K.
CHANNEL_BLOCK = 64


def channel_block(D: int) -> int:
    """BD, the channels of D the cumulative sum takes per program."""
    return min(triton.next_power_of_2(D), CHANNEL_BLOCK)


@autotune_or_first([triton.Config({}, num_warps=nw) for nw in (4, 8, 1)], key=["D", "BT", "REVERSE"])
@triton.jit
def cumsum_kernel(x, y, chunk_indices, offsets, Hb, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                  REVERSE: tl.constexpr, FLOOR: tl.constexpr):
    """y = cumulative sum of x over the rows of each chunk, per head and channel (D channels; 1 for a
    scalar decay), one program per (chunk, head, block of BD channels). Forward: from the chunk
    start, x raised to FLOOR first (`common.DECAY_FLOOR`); REVERSE: from the chunk end (the backward
    of the forward sum)."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    _, rows, m_t = row_block(start, n, BT)
    p, m = tile(rows * Hb + i_h, m_t, tl.program_id(2) * BD + tl.arange(0, BD), D)
    b_x = tl.load(x + p, mask=m, other=0.0).to(tl.float32)
    if not REVERSE:
        b_x = tl.maximum(b_x, FLOOR)
    tl.store(y + p, tl.cumsum(b_x, axis=0, reverse=REVERSE), mask=m)


# ---------------------------------------------------------------------------------- state pass

@helper
def chunk_decay(A, last_row, Hb, i_h, o_k, m_k, K: tl.constexpr, DECAY: tl.constexpr):
    """exp(A_C) of a chunk whose last real row is `last_row`, shaped to scale a [BK, BV] state: a
    scalar, or [BK, 1] per channel (DECAY 1 or 2)."""
    if DECAY == 1:
        b_e = tl.exp(tl.load(A + last_row * Hb + i_h))
    else:
        b_e = tl.exp(tl.load(A + (last_row * Hb + i_h) * K + o_k, mask=m_k, other=0.0))[:, None]
    return b_e


@autotune_or_first(_STATE_CONFIGS, key=["K", "V", "BT", "BS", "DECAY", "DELTA"], prune=fitting_state_tiles)
@triton.heuristics({"HAS_H0": lambda args: args["h0"] is not None, "STORE_HT": lambda args: args["ht"] is not None})
@triton.jit
def state_fwd_kernel(k, v, w, A, h0, hs, d_out, ht, offsets, chunk_offsets, Hb, SLOTS,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, DECAY: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
                     STORE_HT: tl.constexpr):
    """One program per (packed sequence, head, V block): runs the state through the sequence's chunks,
    storing the state entering each chunk (`hs`), the effective values d (delta: `d_out`) and the
    final state (`ht`). A chunk's rows are taken BS at a time (`row_sub_block`)."""
    i_sh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_s, i_h = i_sh // Hb, i_sh % Hb
    bos, L, first = sequence_span(offsets, chunk_offsets, i_s)
    DT = k.dtype.element_ty

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    p_state, m_kv = tile(o_k, m_k, o_v, V)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + state_row(i_s, i_h, Hb, SLOTS) * K * V + p_state, mask=m_kv, other=0.0)

    for i_j in range(tl.cdiv(L, BT)):
        tl.store(hs + ((first + i_j) * Hb + i_h) * K * V + p_state, b_h.to(hs.dtype.element_ty), mask=m_kv)
        start = bos + i_j * BT
        n = tl.minimum(L - i_j * BT, BT)
        b_next = b_h  # the state leaving the chunk, S_C = exp(A_C) S_0 + sum_s exp(A_C - A_s) k_s d_s^T
        if DECAY:
            b_next = b_h * chunk_decay(A, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
        for i_r in range(BT // BS):
            _, rows, m_t = row_block(start + i_r * BS, n - i_r * BS, BS)
            p_k, m_tk = tile(rows * Hb + i_h, m_t, o_k, K)
            p_v, m_tv = tile(rows * Hb + i_h, m_t, o_v, V)
            b_d = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
            b_kt = tl.load(k + tl.trans(p_k), mask=tl.trans(m_tk), other=0.0)  # keys as [BK, BS]
            if DELTA:
                b_d = b_d - mm(tl.load(w + p_k, mask=m_tk, other=0.0), b_h.to(DT))
                tl.store(d_out + p_v, b_d.to(d_out.dtype.element_ty), mask=m_tv)
            if DECAY == 1:
                b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
                b_d = b_d * tl.where(m_t, exp_nonpos(a_last - b_a), 0.0)[:, None]
            elif DECAY == 2:
                b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
                b_kt = (b_kt.to(tl.float32) * exp_nonpos(a_last[:, None] - tl.trans(b_a))).to(DT)
            b_next = mma(b_kt, b_d.to(DT), b_next)
        b_h = b_next
    if STORE_HT:
        tl.store(ht + state_row(i_s, i_h, Hb, SLOTS) * K * V + p_state, b_h, mask=m_kv)


@autotune_or_first(_STATE_CONFIGS, key=["K", "V", "BT", "BS", "DECAY", "DELTA"], prune=fitting_state_tiles,
                   float32_first=_STATE_BWD_FLOAT32_FIRST)
@triton.heuristics({"HAS_DHT": lambda args: args["dht"] is not None,
                    "STORE_DH0": lambda args: args["dh0"] is not None,
                    "HAS_READ_W": lambda args: args["read_w"] is not None})
@triton.jit
def state_bwd_kernel(q, k, w, A, do, read_w, dd_local, dht, dhs, dd, dh0, offsets, chunk_offsets, scale, Hb,
                     SLOTS,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, DECAY: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr,
                     STORE_DH0: tl.constexpr, HAS_READ_W: tl.constexpr):
    """The state pass backward, chunks in reverse: stores the gradient of the state leaving each chunk
    (`dhs`), the gradient of the effective values (`dd` = dd_local + Kd dS) and of the initial state.
    A chunk's rows are taken BS at a time (`row_sub_block`)."""
    i_sh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_s, i_h = i_sh // Hb, i_sh % Hb
    bos, L, first = sequence_span(offsets, chunk_offsets, i_s)
    NT = tl.cdiv(L, BT)
    DT = k.dtype.element_ty

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    p_state, m_kv = tile(o_k, m_k, o_v, V)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + state_row(i_s, i_h, Hb, SLOTS) * K * V + p_state, mask=m_kv, other=0.0)

    for i_r in range(NT):
        i_j = NT - 1 - i_r
        tl.store(dhs + ((first + i_j) * Hb + i_h) * K * V + p_state, b_dh.to(dhs.dtype.element_ty), mask=m_kv)
        start = bos + i_j * BT
        n = tl.minimum(L - i_j * BT, BT)
        b_prev = b_dh  # the gradient of the state entering the chunk
        if DECAY:
            b_prev = b_dh * chunk_decay(A, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
        for i_b in range(BT // BS):
            _, rows, m_t = row_block(start + i_b * BS, n - i_b * BS, BS)
            p_k, m_tk = tile(rows * Hb + i_h, m_t, o_k, K)
            p_v, m_tv = tile(rows * Hb + i_h, m_t, o_v, V)
            b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
            b_dd = tl.load(dd_local + p_v, mask=m_tv, other=0.0)
            if DECAY == 0:
                b_dd += mm(b_k, b_dh.to(DT))
            elif DECAY == 1:
                b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
                b_dd += mm(b_k, b_dh.to(DT)) * tl.where(m_t, exp_nonpos(a_last - b_a), 0.0)[:, None]
            else:
                b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
                b_kd = b_k.to(tl.float32) * exp_nonpos(a_last[None, :] - b_a)
                b_dd += mm(b_kd.to(DT), b_dh.to(DT))
            tl.store(dd + p_v, b_dd.to(dd.dtype.element_ty), mask=m_tv)
            # q and dO only now: held through the product above, they spilled (kda, float32)
            b_q = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
            if DECAY == 1:
                b_q = b_q * tl.exp(b_a)[:, None]
            elif DECAY == 2:
                if DT == tl.float32:  # the decays read again (from L2): held, they spilled in float32
                    b_a = tl.load(A + p_k, mask=m_tk, other=0.0)
                b_q = b_q * tl.exp(b_a)
            b_do = load_do(do, p_v, m_tv, read_w, rows, m_t, DT, HAS_READ_W)
            b_prev = mma(tl.trans(b_q.to(DT)), (b_do.to(tl.float32) * scale).to(DT), b_prev)
            if DELTA:
                b_prev -= mm(tl.trans(tl.load(w + p_k, mask=m_tk, other=0.0)), b_dd.to(DT))
        b_dh = b_prev
    if STORE_DH0:
        tl.store(dh0 + state_row(i_s, i_h, Hb, SLOTS) * K * V + p_state, b_dh, mask=m_kv)


# --------------------------------------------------------------------------------- output pass

@helper
def chunk_and_v_block(V: tl.constexpr, BV: tl.constexpr):
    """(chunk, V block, head) of a program of the grid (chunks x V blocks, heads): the V blocks of a
    chunk are consecutive programs, so all but the first find the chunk's q and k in L2 instead of
    reading them from memory again."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_cv = tl.program_id(0).to(tl.int64)
    return i_cv // NV, i_cv % NV, tl.program_id(1)


@autotune_or_first(_CHUNK_CONFIGS, key=["K", "V", "BT", "DECAY"])
@triton.heuristics({"HAS_READ_W": lambda args: args["read_w"] is not None})
@triton.jit
def output_fwd_kernel(q, k, d, A, M, hs, read_w, o, chunk_indices, offsets, scale, Hb,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr,
                      DECAY: tl.constexpr, HAS_READ_W: tl.constexpr):
    """o = scale (Qd S_0 + M d), times the row's read weight if `read_w [E]` is given, one program
    per (chunk, V block; head); keys in blocks of BKW columns. M d takes the finite part of d; a
    non-finite d_s makes rows t >= s NaN (`common.split_finite`), never rows before it."""
    i_c, i_v, i_h = chunk_and_v_block(V, BV)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    o_v = i_v * BV + tl.arange(0, BV)
    p_v, m_tv = tile(rows * Hb + i_h, m_t, o_v, V)
    p_hs = (i_c * Hb + i_h) * K * V  # where the chunk's entering states start in hs
    b_d, first_bad = split_finite(tl.load(d + p_v, mask=m_tv, other=0.0).to(DT), o_t, BT)
    if DECAY == 2:
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BKW)):
            o_k = i_k * BKW + tl.arange(0, BKW)
            p_k, m_tk = tile(rows * Hb + i_h, m_t, o_k, K)
            p_state, m_kv = tile(o_k, o_k < K, o_v, V)
            b_a, _ = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, o_k < K, K, DECAY)
            b_qd = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32) * tl.exp(b_a)
            b_o = mma(b_qd.to(DT), tl.load(hs + p_hs + p_state, mask=m_kv, other=0.0).to(DT), b_o)
        p_M, m_M = tile(rows * Hb + i_h, m_t, o_t, BT)
        b_M = tl.load(M + p_M, mask=m_M, other=0.0)
    else:
        b_S, b_o = keys_and_scores(q, k, hs, rows * Hb + i_h, m_t, p_hs, o_v, V, K, BT, BKW, BV, True, DT)
        b_a = tl.zeros([BT], dtype=tl.float32)
        if DECAY == 1:
            b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
            b_o = b_o * tl.exp(b_a)[:, None]
        b_M = causal_decay(b_S, b_a, lower_mask(o_t, m_t, 0), DECAY)
    b_o = poison_from(mma(b_M.to(DT), b_d, b_o), o_t, first_bad) * scale
    if HAS_READ_W:
        b_o = b_o * tl.load(read_w + rows, mask=m_t, other=0.0)[:, None]
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


@autotune_or_first(_CHUNK_CONFIGS, key=["K", "V", "BT", "DECAY"])
@triton.heuristics({"HAS_READ_W": lambda args: args["read_w"] is not None})
@triton.jit
def dd_local_kernel(q, k, A, M, do, read_w, dd_local, chunk_indices, offsets, scale, Hb,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr,
                    DECAY: tl.constexpr, HAS_READ_W: tl.constexpr):
    """The output pass backward to the effective values within a chunk: dd_local = scale M^T dO, one
    program per (chunk, V block; head); keys in blocks of BKW columns."""
    i_c, i_v, i_h = chunk_and_v_block(V, BV)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    o_v = i_v * BV + tl.arange(0, BV)
    p_v, m_tv = tile(rows * Hb + i_h, m_t, o_v, V)
    if DECAY == 2:
        p_M, m_M = tile(rows * Hb + i_h, m_t, o_t, BT)
        b_M = tl.load(M + p_M, mask=m_M, other=0.0)
    else:
        b_S, _ = keys_and_scores(q, k, None, rows * Hb + i_h, m_t, 0, o_v, V, K, BT, BKW, BV, False, DT)
        b_a = tl.zeros([BT], dtype=tl.float32)
        if DECAY == 1:
            b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
        b_M = causal_decay(b_S, b_a, lower_mask(o_t, m_t, 0), DECAY)
    b_do = load_do(do, p_v, m_tv, read_w, rows, m_t, DT, HAS_READ_W)
    tl.store(dd_local + p_v, mm(tl.trans(b_M).to(DT), b_do) * scale, mask=m_tv)


@autotune_or_first(_GRAD_CONFIGS, key=["K", "V", "BT", "BKW", "DECAY", "DELTA"], float32_first=_GRAD_FLOAT32_FIRST)
@triton.heuristics({"HAS_READ_W": lambda args: args["read_w"] is not None})
@triton.jit
def grad_kernel(q, k, d, A, hs, dhs, do, read_w, dd, dq, dk, dA, dM, dw, chunk_indices, offsets, scale, Hb,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr,
                DECAY: tl.constexpr, DELTA: tl.constexpr, HAS_READ_W: tl.constexpr):
    """Gradients of a chunk's q, k and cumulative decays from the state and output passes, one program
    per (chunk, block of BKW key columns; head), looping over V blocks: the key blocks of a chunk are
    consecutive programs, which find its dO, d and dd in L2 (each recomputes dM = scale dO d^T). For
    scalar (or no) decay this includes the intra-chunk M = (q k^T) * exp(A_t - A_s), whose part from
    the block's keys weighs dA; a scalar decay's dA is a sum over the key channels, so each block
    stores its share, `dA [E, Hb, NK]`, and the caller adds them up. For per-channel decay it stores
    dM (the first key block) for `vector.attention_bwd_kernel`. The delta family also gets
    dw = -dd S_0^T (for `delta.wy_bwd_kernel`)."""
    NK: tl.constexpr = (K + BKW - 1) // BKW
    i_ck, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_c, i_kb = i_ck // NK, i_ck % NK
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    o_k = i_kb * BKW + tl.arange(0, BKW)
    m_k = o_k < K
    p_k, m_tk = tile(rows * Hb + i_h, m_t, o_k, K)
    p_hs = (i_c * Hb + i_h) * K * V  # where the chunk's states start in hs and dhs

    b_dqd = tl.zeros([BT, BKW], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BKW], dtype=tl.float32)
    b_dw = tl.zeros([BT, BKW], dtype=tl.float32)
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)
    b_dD = tl.zeros([BKW], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v, m_tv = tile(rows * Hb + i_h, m_t, o_v, V)
        p_state, m_kv = tile(o_k, m_k, o_v, V)
        # states as [BV, BKW]
        b_ht = tl.load(hs + p_hs + tl.trans(p_state), mask=tl.trans(m_kv), other=0.0).to(DT)
        b_dht = tl.load(dhs + p_hs + tl.trans(p_state), mask=tl.trans(m_kv), other=0.0).to(DT)
        b_do = load_do(do, p_v, m_tv, read_w, rows, m_t, DT, HAS_READ_W)
        b_d = tl.load(d + p_v, mask=m_tv, other=0.0).to(DT)
        b_dqd = mma(b_do, b_ht, b_dqd)
        b_dkd = mma(b_d, b_dht, b_dkd)
        b_dM = mma(b_do, tl.trans(b_d), b_dM)
        b_dD += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
        if DELTA:
            b_ddv = tl.load(dd + p_v, mask=m_tv, other=0.0).to(DT)
            b_dw = mma(b_ddv, b_ht, b_dw)
    b_dqd *= scale
    b_dM *= scale
    if DELTA:
        tl.store(dw + p_k, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)

    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    m_A = lower_mask(o_t, m_t, 0)
    is_last = o_t == n - 1
    if DECAY == 0:
        b_dq = b_dqd
        b_dk = b_dkd
    elif DECAY == 1:
        b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
        b_dq = b_dqd * tl.exp(b_a)[:, None]
        b_dk = b_dkd * tl.where(m_t, exp_nonpos(a_last - b_a), 0.0)[:, None]
        b_qf = b_q.to(tl.float32)
        b_kf = b_k.to(tl.float32)
        b_dkk = tl.sum(b_dk * b_kf, 1)
        b_da = tl.sum(b_dq * b_qf, 1) - b_dkk
        b_da += tl.where(is_last, tl.sum(b_dkk, 0) + tl.sum(b_dD, 0) * tl.exp(a_last), 0.0)
    else:
        b_a, a_last = load_decay(A, rows, m_t, start + n - 1, Hb, i_h, o_k, m_k, K, DECAY)
        b_dq = b_dqd * tl.exp(b_a)
        b_dk = b_dkd * tl.where(m_tk, exp_nonpos(a_last[None, :] - b_a), 0.0)
        b_dkk = b_dk * b_k.to(tl.float32)
        b_da = b_dq * b_q.to(tl.float32) - b_dkk
        b_da += tl.where(is_last[:, None], (tl.sum(b_dkk, 0) + b_dD * tl.exp(a_last))[None, :], 0.0)

    if DECAY == 2:
        if i_kb == 0:
            p_M, m_M = tile(rows * Hb + i_h, m_t, o_t, BT)
            tl.store(dM + p_M, tl.where(m_A, b_dM, 0.0), mask=m_M)
        tl.store(dA + p_k, b_da, mask=m_tk)
    else:
        b_Mg = tl.where(m_A, b_dM, 0.0)  # dM * gamma
        if DECAY == 1:
            b_Mg = b_Mg * exp_nonpos(b_a[:, None] - b_a[None, :])
            b_P = b_Mg * mm(b_q, tl.trans(b_k))  # dM * (this key block's part of M)
            b_da += tl.sum(b_P, 1) - tl.sum(b_P, 0)
            tl.store(dA + (rows * Hb + i_h) * NK + i_kb, b_da, mask=m_t)
        b_dq = mma(b_Mg.to(DT), b_k, b_dq)
        b_dk = mma(tl.trans(b_Mg).to(DT), b_q, b_dk)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
