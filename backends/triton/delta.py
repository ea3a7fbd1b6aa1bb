"""The rule-specific part of the delta families (`deltanet`, `gated_deltanet`; `kda`): the WY/UT transform.

Within a chunk, with b the write strengths and A the chunk-local cumulative log-decays (scalar, or
per key channel),

    L_ts = b_t exp(A_t - A_s) k_t.k_s  (s < t, else 0),   T = (I + L)^-1,
    u = T (b v),   w = T (b exp(A) k),

For a per-channel decay (DECAY 2), L_ts = b_t sum_c k_tc k_sc exp(A_tc - A_sc) is b times the
per-channel attention of the keys with themselves (`vector.attention_fwd_kernel` with q = k), given
as `Lk`; its gradient goes back as `dLk` through `vector.attention_bwd_kernel`.

so that the effective values are d = u - w S_0 (S_0: the state entering the chunk; the shared state
pass applies this). `wy_fwd_kernel` forms T blockwise (forward substitution inside blocks of 16
rows, all blocks at once, then a short product series across blocks; chunks of at most 64 rows) and
applies it; the backward recomputes u and w from the stored T (`COMPUTE_T=False`). `wy_bwd_kernel` takes the
gradients of u (= of d) and w back to k, v, b and A:

    dT = du (b v)^T + dw (b exp(A) k)^T,   dL = -T^T dT T^T (strictly lower part).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (autotune_or_first, chunk_rows, exp_nonpos, lower_mask, mm, mma, poison_from, row_block,
                     split_finite, tile)

_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=2) for bv in (32, 64) for nw in (4, 8)]


@autotune_or_first(_CONFIGS, key=["K", "V", "BT", "DECAY", "COMPUTE_T"])
@triton.jit
def wy_fwd_kernel(k, v, b, A, Lk, T, u, w, chunk_indices, offsets, Hb,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DECAY: tl.constexpr, COMPUTE_T: tl.constexpr):
    """u [E,Hb,V] and w [E,Hb,K] of a chunk; T [E,Hb,BT] is computed and stored, or read.

    A non-finite key k_s (q, k, v are data) makes row s and column s of L non-finite: T is formed from
    the finite part of L, and its rows holding a non-finite entry of L are then set to NaN (every row
    t >= s). The products T (b v) and T (b exp(A) k) take the finite part of their right operand and
    set rows from its first non-finite one on to NaN (`common.split_finite`): no 0 * NaN reaches a
    row before s."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    p_k, m_tk = tile(rows * Hb + i_h, m_t, tl.arange(0, BK), K)
    p_T, m_T = tile(rows * Hb + i_h, m_t, o_t, BT)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    b_b = tl.load(b + rows * Hb + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_a = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
    if COMPUTE_T:
        if DECAY == 2:
            b_L = tl.load(Lk + p_T, mask=m_T, other=0.0) * b_b[:, None]
        else:
            b_L = mm(b_k, tl.trans(b_k)) * b_b[:, None]
            if DECAY == 1:
                b_L = b_L * exp_nonpos(b_a[:, None] - b_a[None, :])
        b_L = tl.where(lower_mask(o_t, m_t, 1), b_L, 0.0)
        finite_L = tl.abs(b_L) < float("inf")
        bad_row = tl.max(tl.where(finite_L, 0, 1), 1) > 0
        b_L = tl.where(finite_L, b_L, 0.0)
        # L = D + N: D within the diagonal blocks of 16 rows, N below them. First (I + D)^-1 by forward
        # substitution, row r of every block at once (16 steps, each one product). Then, with
        # M = (I + D)^-1 N, strictly block-lower, so M^4 = 0 for up to 4 blocks (BT <= 64):
        # T = (I + M)^-1 (I + D)^-1 = (I - M)(I + M^2)(I + D)^-1.
        eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
        same_block = (o_t[:, None] // 16) == (o_t[None, :] // 16)
        b_D = tl.where(same_block, b_L, 0.0)
        b_T = eye
        for r in range(1, 16):
            at_r = (o_t % 16 == r)[:, None]
            b_T = tl.where(at_r, eye - mm(tl.where(at_r, b_D, 0.0), b_T), b_T)
        if BT > 16:
            b_M = mm(b_T, b_L - b_D)
            b_T = b_T + mm(mm(b_M, b_M), b_T)
            b_T = b_T - mm(b_M, b_T)
        b_T = tl.where(bad_row[:, None], float("nan"), b_T)
        tl.store(T + p_T, b_T.to(T.dtype.element_ty), mask=m_T)
    else:
        b_T = tl.load(T + p_T, mask=m_T, other=0.0)
    b_Td = b_T.to(DT)
    if DECAY == 2:
        b_xk = b_k.to(tl.float32) * tl.exp(tl.load(A + p_k, mask=m_tk, other=0.0)) * b_b[:, None]
    else:
        b_xk = b_k.to(tl.float32) * (b_b * tl.exp(b_a))[:, None]
    b_xk, first_bad_k = split_finite(b_xk, o_t, BT)
    tl.store(w + p_k, poison_from(mm(b_Td, b_xk.to(DT)), o_t, first_bad_k).to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_tv = tile(rows * Hb + i_h, m_t, i_v * BV + tl.arange(0, BV), V)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_xv, first_bad_v = split_finite(b_v * b_b[:, None], o_t, BT)
        tl.store(u + p_v, poison_from(mm(b_Td, b_xv.to(DT)), o_t, first_bad_v).to(u.dtype.element_ty), mask=m_tv)


@autotune_or_first(_CONFIGS, key=["K", "V", "BT", "DECAY"])
@triton.jit
def wy_bwd_kernel(k, v, b, A, Lk, T, dd, dw, dk_in, dA_in, dk, dv, db, dA, dLk, chunk_indices, offsets, Hb,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DECAY: tl.constexpr):
    """dv, db and (added to the shared pass's) dk, dA of a chunk from du (= dd) and dw; for a
    per-channel decay also dLk, the gradient of the keys' attention `Lk`."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    o_t, rows, m_t = row_block(start, n, BT)
    DT = k.dtype.element_ty
    p_k, m_tk = tile(rows * Hb + i_h, m_t, tl.arange(0, BK), K)
    p_T, m_T = tile(rows * Hb + i_h, m_t, o_t, BT)
    b_T = tl.load(T + p_T, mask=m_T, other=0.0)
    b_Tt = tl.trans(b_T).to(DT)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    b_kf = b_k.to(tl.float32)
    b_b = tl.load(b + rows * Hb + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_a = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        b_a = tl.load(A + rows * Hb + i_h, mask=m_t, other=0.0)
    if DECAY == 2:
        b_e = tl.exp(tl.load(A + p_k, mask=m_tk, other=0.0))  # [BT, BK]
    else:
        b_e = tl.exp(b_a)[:, None]
    b_xk = b_kf * b_e * b_b[:, None]
    b_dw = tl.load(dw + p_k, mask=m_tk, other=0.0).to(DT)
    b_dxk = mm(b_Tt, b_dw)
    b_dT = mm(b_dw, tl.trans(b_xk.to(DT)))
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_tv = tile(rows * Hb + i_h, m_t, i_v * BV + tl.arange(0, BV), V)
        b_du = tl.load(dd + p_v, mask=m_tv, other=0.0).to(DT)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dxv = mm(b_Tt, b_du)
        tl.store(dv + p_v, (b_dxv * b_b[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_db += tl.sum(b_dxv * b_v, 1)
        b_dT = mma(b_du, tl.trans((b_v * b_b[:, None]).to(DT)), b_dT)
    b_dk = b_dxk * b_e * b_b[:, None]
    b_db += tl.sum(b_dxk * b_kf * b_e, 1)

    b_dL = -mm(b_Tt, mm(b_dT.to(DT), b_Tt).to(DT))
    b_dL = tl.where(lower_mask(o_t, m_t, 1), b_dL, 0.0)
    if DECAY == 2:  # L = b Lk: dLk = b dL goes on to the keys' attention backward
        b_db += tl.sum(b_dL * tl.load(Lk + p_T, mask=m_T, other=0.0), 1)
        tl.store(dLk + p_T, b_dL * b_b[:, None], mask=m_T)
        p_a, m_a = p_k, m_tk
        b_da = b_dxk * b_xk
    else:
        p_a, m_a = rows * Hb + i_h, m_t
        b_da = tl.sum(b_dxk * b_xk, 1)
        b_G = b_dL * mm(b_k, tl.trans(b_k))  # dL * (k k^T)
        if DECAY == 1:
            b_G = b_G * exp_nonpos(b_a[:, None] - b_a[None, :])
        b_db += tl.sum(b_G, 1)
        b_P = b_G * b_b[:, None]  # dL * L
        b_da += tl.sum(b_P, 1) - tl.sum(b_P, 0)
        b_dkk = b_dL * b_b[:, None]
        if DECAY == 1:
            b_dkk = b_dkk * exp_nonpos(b_a[:, None] - b_a[None, :])
        b_dk = mma(b_dkk.to(DT), b_k, b_dk)
        b_dk = mma(tl.trans(b_dkk).to(DT), b_k, b_dk)

    tl.store(dk + p_k, (tl.load(dk_in + p_k, mask=m_tk, other=0.0) + b_dk).to(dk.dtype.element_ty), mask=m_tk)
    tl.store(db + rows * Hb + i_h, b_db, mask=m_t)
    if DECAY != 0:
        tl.store(dA + p_a, tl.load(dA_in + p_a, mask=m_a, other=0.0) + b_da, mask=m_a)
