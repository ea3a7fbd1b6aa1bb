"""The rule-specific part of the delta families (`deltanet`, `gated_deltanet`; `kda`): the WY/UT transform.

Within a chunk, with b the write strengths and A the chunk-local cumulative log-decays (scalar, or
per key channel),

    L_ts = b_t exp(A_t - A_s) k_t.k_s  (s < t, else 0),   T = (I + L)^-1,
    u = T (b v),   w = T (b exp(A) k),

For a per-channel decay (DECAY 2), L_ts = b_t sum_c k_tc k_sc exp(A_tc - A_sc) is b times the
per-channel attention of the keys with themselves (`vector.attention_fwd_kernel` with q = k), given
as `Lk`; its gradient goes back as `dLk` through `vector.attention_bwd_kernel`.

so that the effective values are d = u - w S_0 (S_0: the state entering the chunk; the shared state
pass applies this). `wy_fwd_kernel` forms T in blocks of 16 rows (chunks of at most 64 rows): the
blocks of L on and below the diagonal (16x16 products), each diagonal block inverted by forward
substitution a row at a time (elementwise, exact in float32), then the blocks below the diagonal
by T_ij = -T_ii sum_{j <= c < i} L_ic T_cj (16x16 products at the precision the input dtype needs,
`common.solve_mm`). It stores T and applies it; the backward recomputes u and w from the stored T
(`COMPUTE_T=False`). `wy_bwd_kernel` takes the
gradients of u (= of d) and w back to k, v, b and A. With dT = du (b v)^T + dw (b exp(A) k)^T,

    dL = -T^T dT T^T = -(T^T du) u^T - (T^T dw) w^T   (strictly lower part),

summed block by block as the values and keys pass, with u and w recomputed there (T^T du and T^T dw
are needed anyway): no [BT, BT] product of three factors, which in float32 spilled about 1 KB.

Both kernels take the keys in blocks of BKW columns (`wy_key_block`), never a whole [BT, K] tile of
them: at K = 128 the backward's five such float32 tiles spilled in every configuration, bfloat16
inputs included. The backward passes over the key blocks twice for a scalar or no decay: first for
dL, db and the parts of dk and dA that need no dL, then, once dL is known, for the parts through
L = b D * (k k^T) (D the decays), as products of dL with the keys, never forming k k^T (and
recomputing T^T dw rather than keeping it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (autotune_or_first, chunk_rows, exp_nonpos, helper, key_block, lower_mask, mm, mma, poison_from,
                     row_block, solve_mm, split_finite, tile)

# 8 warps, one stage: with 4 warps the backward spilled at every K in bfloat16, and two stages (loads of
# the next key block in flight) spilled the gated_deltanet WY forward with the solve at K = 256. For
# float32, whose products hold split copies of their operands beside the [BT, BT] float32 tiles (T,
# dL), blocks of 16 values and 16 keys (`wy_key_block`): with 32 or 64 the backward spilled at K = 128.
_CONFIGS = [triton.Config({"BV": bv}, num_warps=8, num_stages=1) for bv in (64, 32)]
_FLOAT32_FIRST = triton.Config({"BV": 16}, num_warps=8, num_stages=1)


def wy_key_block(BK: int, dtype: torch.dtype) -> int:
    """BKW of the WY kernels: `common.key_block`, at most 16 for float32 (see `_CONFIGS`)."""
    return min(key_block(BK, dtype), 16) if dtype == torch.float32 else key_block(BK, dtype)


@helper
def wy_l_block(k, b, A, Lk, start, n, i_h, Hb, BI: tl.constexpr, BJ: tl.constexpr, K: tl.constexpr, BKW: tl.constexpr,
               BT: tl.constexpr, DECAY: tl.constexpr):
    """Block (BI, BJ) of L (rows 16 BI.., columns 16 BJ.. of the chunk of `n` rows at packed row
    `start`), BJ <= BI: (its finite part [16, 16] float32, [16] whether each of its rows holds a non-finite entry).
    From the keys' own attention `Lk` for a per-channel decay, else from two blocks of keys."""
    o_i = tl.arange(0, 16)
    r_i, r_j = BI * 16 + o_i, BJ * 16 + o_i
    m_i, m_j = r_i < n, r_j < n
    if DECAY == 2:
        p_L, m_L = tile((start + r_i) * Hb + i_h, m_i, r_j, BT)
        b_L = tl.load(Lk + p_L, mask=m_L, other=0.0)
    else:
        b_L = tl.zeros([16, 16], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BKW)):
            o_k = i_k * BKW + tl.arange(0, BKW)
            p_i, m_ik = tile((start + r_i) * Hb + i_h, m_i, o_k, K)
            p_j, m_jk = tile((start + r_j) * Hb + i_h, m_j, o_k, K)
            b_L = mma(tl.load(k + p_i, mask=m_ik, other=0.0), tl.trans(tl.load(k + p_j, mask=m_jk, other=0.0)), b_L)
        if DECAY == 1:
            a_i = tl.load(A + (start + r_i) * Hb + i_h, mask=m_i, other=0.0)
            a_j = tl.load(A + (start + r_j) * Hb + i_h, mask=m_j, other=0.0)
            b_L = b_L * exp_nonpos(a_i[:, None] - a_j[None, :])
    b_L = b_L * tl.load(b + (start + r_i) * Hb + i_h, mask=m_i, other=0.0).to(tl.float32)[:, None]
    keep = m_i[:, None] & m_j[None, :]
    if BI == BJ:
        keep = keep & (o_i[:, None] > o_i[None, :])
    b_L = tl.where(keep, b_L, 0.0)
    finite = tl.abs(b_L) < float("inf")
    return tl.where(finite, b_L, 0.0), tl.max(tl.where(finite, 0, 1), 1) > 0


@helper
def unit_lower_inverse(D):
    """(I + D)^-1 of a strictly lower triangular [16, 16] block, by forward substitution a row at a
    time: row r is e_r - D_r (I + D)^-1, from the rows above it (elementwise, exact in float32)."""
    o_i = tl.arange(0, 16)
    b_T = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for r in range(1, 16):
        at_r = o_i == r
        d_r = tl.sum(tl.where(at_r[:, None], D, 0.0), 0)  # row r of D
        t_r = tl.where(at_r, 1.0, 0.0) - tl.sum(d_r[:, None] * b_T, 0)
        b_T = tl.where(at_r[:, None], t_r[None, :], b_T)
    return b_T


@helper
def store_t_block(T, x, bad, start, n, i_h, Hb, BI: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr):
    """Block (BI, BJ) `x [16, 16]` of T into `T [E, Hb, BT]`, its rows marked `bad` set to NaN."""
    o_i = tl.arange(0, 16)
    p_T, m_T = tile((start + BI * 16 + o_i) * Hb + i_h, BI * 16 + o_i < n, BJ * 16 + o_i, BT)
    tl.store(T + p_T, tl.where(bad[:, None], float("nan"), x).to(T.dtype.element_ty), mask=m_T)


@autotune_or_first(_CONFIGS, key=["K", "V", "BT", "DECAY", "COMPUTE_T"], float32_first=_FLOAT32_FIRST)
@triton.jit
def wy_fwd_kernel(k, v, b, A, Lk, T, u, w, chunk_indices, offsets, Hb,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  BKW: tl.constexpr, DECAY: tl.constexpr, COMPUTE_T: tl.constexpr):
    """u [E,Hb,V] and w [E,Hb,K] of a chunk; T [E,Hb,BT] is computed and stored, or read.

    A non-finite key k_s (q, k, v are data) makes row s and column s of L non-finite: T is formed from
    the finite part of L, and its rows holding a non-finite entry of L are then set to NaN (every row
    t >= s). The products T (b v) and T (b exp(A) k) take the finite part of their right operand and
    set rows from its first non-finite one on to NaN (`common.split_finite`): no 0 * NaN reaches a
    row before s."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    p_T, m_T = tile(rows * Hb + i_h, m_t, o_t, BT)
    if COMPUTE_T:
        # T = (I + L)^-1 in blocks of 16 rows (NB of them): the diagonal blocks by forward substitution,
        # a row at a time (elementwise), then T_ij = -T_ii sum_{j <= c < i} L_ic T_cj, block by block
        # (16x16 products). Each block is stored as it is made, and T is read back whole below.
        NB: tl.constexpr = BT // 16
        L00, bad0 = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 0, 0, K, BKW, BT, DECAY)
        T00 = unit_lower_inverse(L00)
        store_t_block(T, T00, bad0, start, n, i_h, Hb, 0, 0, BT)
        if NB > 1:
            L11, bad1 = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 1, 1, K, BKW, BT, DECAY)
            L10, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 1, 0, K, BKW, BT, DECAY)
            bad1 = bad1 | bad
            T11 = unit_lower_inverse(L11)
            T10 = -solve_mm(T11, solve_mm(L10, T00, None, DT), None, DT)
            store_t_block(T, T10, bad1, start, n, i_h, Hb, 1, 0, BT)
            store_t_block(T, T11, bad1, start, n, i_h, Hb, 1, 1, BT)
        if NB > 2:
            L22, bad2 = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 2, 2, K, BKW, BT, DECAY)
            L20, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 2, 0, K, BKW, BT, DECAY)
            bad2 = bad2 | bad
            L21, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 2, 1, K, BKW, BT, DECAY)
            bad2 = bad2 | bad
            T22 = unit_lower_inverse(L22)
            T21 = -solve_mm(T22, solve_mm(L21, T11, None, DT), None, DT)
            T20 = -solve_mm(T22, solve_mm(L21, T10, solve_mm(L20, T00, None, DT), DT), None, DT)
            store_t_block(T, T20, bad2, start, n, i_h, Hb, 2, 0, BT)
            store_t_block(T, T21, bad2, start, n, i_h, Hb, 2, 1, BT)
            store_t_block(T, T22, bad2, start, n, i_h, Hb, 2, 2, BT)
        if NB > 3:
            L33, bad3 = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 3, 3, K, BKW, BT, DECAY)
            L30, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 3, 0, K, BKW, BT, DECAY)
            bad3 = bad3 | bad
            L31, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 3, 1, K, BKW, BT, DECAY)
            bad3 = bad3 | bad
            L32, bad = wy_l_block(k, b, A, Lk, start, n, i_h, Hb, 3, 2, K, BKW, BT, DECAY)
            bad3 = bad3 | bad
            T33 = unit_lower_inverse(L33)
            T32 = -solve_mm(T33, solve_mm(L32, T22, None, DT), None, DT)
            T31 = -solve_mm(T33, solve_mm(L32, T21, solve_mm(L31, T11, None, DT), DT), None, DT)
            T30 = -solve_mm(T33, solve_mm(L32, T20, solve_mm(L31, T10, solve_mm(L30, T00, None, DT), DT), DT),
                            None, DT)
            store_t_block(T, T30, bad3, start, n, i_h, Hb, 3, 0, BT)
            store_t_block(T, T31, bad3, start, n, i_h, Hb, 3, 1, BT)
            store_t_block(T, T32, bad3, start, n, i_h, Hb, 3, 2, BT)
            store_t_block(T, T33, bad3, start, n, i_h, Hb, 3, 3, BT)
        zero = tl.zeros([16, 16], dtype=tl.float32)
        no_rows = tl.arange(0, 16) < 0
        for i in tl.static_range(NB):
            for j in tl.static_range(i + 1, NB):  # above the diagonal blocks
                store_t_block(T, zero, no_rows, start, n, i_h, Hb, i, j, BT)
        tl.debug_barrier()  # the blocks stored by every thread of the program, before T is read whole
    b_Td = tl.load(T + p_T, mask=m_T, other=0.0).to(DT)
    b_b = tl.load(b + rows * Hb + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_a = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
    for i_k in range(tl.cdiv(K, BKW)):
        p_k, m_tk = tile(rows * Hb + i_h, m_t, i_k * BKW + tl.arange(0, BKW), K)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        if DECAY == 2:
            b_xk = b_k * tl.exp(tl.load(A + p_k, mask=m_tk, other=0.0)) * b_b[:, None]
        else:
            b_xk = b_k * (b_b * tl.exp(b_a))[:, None]
        b_xk, first_bad_k = split_finite(b_xk, o_t, BT)
        tl.store(w + p_k, poison_from(mm(b_Td, b_xk.to(DT)), o_t, first_bad_k).to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_tv = tile(rows * Hb + i_h, m_t, i_v * BV + tl.arange(0, BV), V)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_xv, first_bad_v = split_finite(b_v * b_b[:, None], o_t, BT)
        tl.store(u + p_v, poison_from(mm(b_Td, b_xv.to(DT)), o_t, first_bad_v).to(u.dtype.element_ty), mask=m_tv)


@autotune_or_first(_CONFIGS, key=["K", "V", "BT", "DECAY"], float32_first=_FLOAT32_FIRST)
@triton.jit
def wy_bwd_kernel(k, v, b, A, Lk, T, dd, dw, dk_in, dA_in, dk, dv, db, dA, dLk, chunk_indices, offsets, Hb,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BKW: tl.constexpr,
                  DECAY: tl.constexpr):
    """dv, db and (added to the shared pass's) dk, dA of a chunk from du (= dd) and dw; for a
    per-channel decay also dLk, the gradient of the keys' attention `Lk`. Keys in blocks of BKW columns
    (see the module's docstring)."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if n <= 0:  # a chunk past the layout's real chunks (`function.varlen_chunks`)
        return
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    p_T, m_T = tile(rows * Hb + i_h, m_t, o_t, BT)
    b_T = tl.load(T + p_T, mask=m_T, other=0.0).to(DT)
    b_Tt = tl.trans(b_T)
    b_b = tl.load(b + rows * Hb + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_a = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
    b_dL = tl.zeros([BT, BT], dtype=tl.float32)  # -dL: (T^T dw) w^T + (T^T du) u^T, block by block
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_da = tl.zeros([BT], dtype=tl.float32)  # a decay per row: its gradient
    for i_k in range(tl.cdiv(K, BKW)):
        p_k, m_tk = tile(rows * Hb + i_h, m_t, i_k * BKW + tl.arange(0, BKW), K)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        b_kf = b_k.to(tl.float32)
        if DECAY == 2:
            b_e = tl.exp(tl.load(A + p_k, mask=m_tk, other=0.0))  # [BT, BKW]
        else:
            b_e = tl.exp(b_a)[:, None]
        b_xk = b_kf * b_e * b_b[:, None]
        b_dw = tl.load(dw + p_k, mask=m_tk, other=0.0).to(DT)
        b_dxk = mm(b_Tt, b_dw)
        b_dL = mma(b_dxk.to(DT), tl.trans(mm(b_T, b_xk.to(DT)).to(DT)), b_dL)
        b_db += tl.sum(b_dxk * b_kf * b_e, 1)
        if DECAY == 2:  # dk and dA of this block are complete: dL reaches k through dLk
            b_dk = b_dxk * b_e * b_b[:, None]
            tl.store(dk + p_k, (tl.load(dk_in + p_k, mask=m_tk, other=0.0) + b_dk).to(dk.dtype.element_ty),
                     mask=m_tk)
            tl.store(dA + p_k, tl.load(dA_in + p_k, mask=m_tk, other=0.0) + b_dxk * b_xk, mask=m_tk)
        else:
            b_da += tl.sum(b_dxk * b_xk, 1)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_tv = tile(rows * Hb + i_h, m_t, i_v * BV + tl.arange(0, BV), V)
        b_du = tl.load(dd + p_v, mask=m_tv, other=0.0).to(DT)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dxv = mm(b_Tt, b_du)
        tl.store(dv + p_v, (b_dxv * b_b[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_db += tl.sum(b_dxv * b_v, 1)
        b_dL = mma(b_dxv.to(DT), tl.trans(mm(b_T, (b_v * b_b[:, None]).to(DT)).to(DT)), b_dL)

    b_dL = tl.where(lower_mask(o_t, m_t, 1), -b_dL, 0.0)
    if DECAY == 2:  # L = b Lk: dLk = b dL goes on to the keys' attention backward
        b_db += tl.sum(b_dL * tl.load(Lk + p_T, mask=m_T, other=0.0), 1)
        tl.store(dLk + p_T, b_dL * b_b[:, None], mask=m_T)
    else:
        # L = b D * (k k^T), D the decays exp(A_t - A_s) (1 without a decay), through products with the
        # keys, never k k^T itself: with G = dL * D, dL * (k k^T) * D has row sums k_t . (G k)_t (db);
        # dL * L = b dL * (k k^T) * D has row sums b_t k_t . (G k)_t and column sums k_s . (G'^T k)_s,
        # G' = b G (dA); and dk gets b (G k) + G'^T k. G'^T k is G^T (b k): no second [BT, BT] tile.
        b_G = b_dL
        if DECAY == 1:
            b_G = b_G * exp_nonpos(b_a[:, None] - b_a[None, :])
        b_eb = tl.exp(b_a) * b_b  # dk's part through w = T (b exp(A) k), per row
        for i_k in range(tl.cdiv(K, BKW)):
            p_k, m_tk = tile(rows * Hb + i_h, m_t, i_k * BKW + tl.arange(0, BKW), K)
            b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
            b_kf = b_k.to(tl.float32)
            b_dw = tl.load(dw + p_k, mask=m_tk, other=0.0).to(DT)
            b_Gk = mm(b_G.to(DT), b_k)
            b_Gbk = mm(tl.trans(b_G).to(DT), (b_kf * b_b[:, None]).to(DT))  # G'^T k = G^T (b k)
            b_kGk = tl.sum(b_kf * b_Gk, 1)
            b_db += b_kGk
            b_da += b_b * b_kGk - tl.sum(b_kf * b_Gbk, 1)
            b_dk = mm(b_Tt, b_dw) * b_eb[:, None] + b_Gk * b_b[:, None] + b_Gbk
            tl.store(dk + p_k, (tl.load(dk_in + p_k, mask=m_tk, other=0.0) + b_dk).to(dk.dtype.element_ty),
                     mask=m_tk)
        if DECAY == 1:
            p_a = rows * Hb + i_h
            tl.store(dA + p_a, tl.load(dA_in + p_a, mask=m_t, other=0.0) + b_da, mask=m_t)
    tl.store(db + rows * Hb + i_h, b_db, mask=m_t)
