"""The rule-specific part of the per-channel decay family (`gla`): the intra-chunk attention

    M_ts = sum_c q_tc k_sc exp(A_tc - A_sc)   for s <= t   (A: chunk-local cumulative log-decays)

and its backward. It is no plain matrix product, so the chunk is cut into sub-chunks of BC = 16 rows.
For a block (i, j) with i > j the decay factors through the row r just before sub-chunk i:
exp(A_t - A_s) = exp(A_t - A_r) exp(A_r - A_s), both exponents <= 0 (no overflow, however strong
the decay), and the block is one `tl.dot`. The diagonal blocks are summed per pair and channel, one
column (or row) at a time. One program per (chunk, head, sub-chunk i).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import autotune_or_first, chunk_rows, exp_nonpos, mm, mma, tile

BC = 16  # sub-chunk rows

# 8 warps: 4 spilled at K = 256 (the backward holds six [BC, K] float32 tiles), 1 and 2 at K = 128.
_CONFIGS = [triton.Config({}, num_warps=8, num_stages=2)]


@autotune_or_first(_CONFIGS, key=["K", "BT"])
@triton.jit
def attention_fwd_kernel(q, k, A, M, chunk_indices, offsets, Hb,
                         K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BKW: tl.constexpr, BC: tl.constexpr):
    """Rows of sub-chunk i of M [E, Hb, BT] (column s = row s of the chunk); blocks above the
    diagonal are left as they are (zero). The blocks left of the diagonal are products over the keys
    in blocks of BKW columns: each warp holds a whole operand of a [BC, BC] product, and whole
    [BC, 128] float32 operands, split for "tf32x3", spilled."""
    i_c, i_h, i_i = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if i_i * BC >= n:  # past the sequence's end (or a chunk past the real ones)
        return
    DT = k.dtype.element_ty
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    t_i = i_i * BC + o_c  # the sub-chunk's rows within the chunk
    m_i = t_i < n
    p_i, m_ik = tile((start + t_i) * Hb + i_h, m_i, o_k, K)
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_a = tl.load(A + p_i, mask=m_ik, other=0.0)

    # reference row r = i*BC - 1 (the last row before sub-chunk i)
    p_r = ((start + i_i * BC - 1) * Hb + i_h) * K
    for i_j in range(0, i_i):
        t_j = i_j * BC + o_c
        b_M = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BKW)):
            o_w = i_k * BKW + tl.arange(0, BKW)
            a_r = tl.load(A + p_r + o_w, mask=o_w < K, other=0.0)
            p_iw, m_iw = tile((start + t_i) * Hb + i_h, m_i, o_w, K)
            p_jw, m_jw = tile((start + t_j) * Hb + i_h, t_j < n, o_w, K)
            b_qr = tl.load(q + p_iw, mask=m_iw, other=0.0).to(tl.float32) * exp_nonpos(
                tl.load(A + p_iw, mask=m_iw, other=0.0) - a_r[None, :])
            b_kr = tl.load(k + p_jw, mask=m_jw, other=0.0).to(tl.float32) * exp_nonpos(
                a_r[None, :] - tl.load(A + p_jw, mask=m_jw, other=0.0))
            b_M = mma(b_qr.to(DT), tl.trans(b_kr.to(DT)), b_M)
        p_M, m_M = tile((start + t_i) * Hb + i_h, m_i, t_j, BT)
        tl.store(M + p_M, b_M, mask=m_M)

    b_Md = tl.zeros([BC, BC], dtype=tl.float32)
    for s in range(0, tl.minimum(n - i_i * BC, BC)):  # the sub-chunk's rows
        t_s = i_i * BC + s
        b_ks = tl.load(k + ((start + t_s) * Hb + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_as = tl.load(A + ((start + t_s) * Hb + i_h) * K + o_k, mask=m_k, other=0.0)
        col = tl.sum(b_q * b_ks[None, :] * exp_nonpos(b_a - b_as[None, :]), 1)
        b_Md = tl.where((o_c[None, :] == s) & (o_c[:, None] >= s), col[:, None], b_Md)
    p_M, m_M = tile((start + t_i) * Hb + i_h, m_i, t_i, BT)
    tl.store(M + p_M, b_Md, mask=m_M)


@autotune_or_first(_CONFIGS, key=["K", "BT"])
@triton.jit
def attention_bwd_kernel(q, k, A, dM, dq_in, dk_in, dA_in, dq, dk, dA, chunk_indices, offsets, Hb,
                         K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """dq = dq_in + dM-part, dk = dk_in + dM-part, dA = dA_in + q * dq_intra - k * dk_intra for the
    rows of sub-chunk i, from dM [E, Hb, BT] (zero above the diagonal)."""
    i_c, i_h, i_i = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    start, n = chunk_rows(chunk_indices, offsets, i_c, BT)
    if i_i * BC >= n:  # past the sequence's end (or a chunk past the real ones)
        return
    DT = k.dtype.element_ty
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    t_i = i_i * BC + o_c  # the sub-chunk's rows within the chunk
    m_i = t_i < n
    p_i, m_ik = tile((start + t_i) * Hb + i_h, m_i, o_k, K)
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_a = tl.load(A + p_i, mask=m_ik, other=0.0)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)

    # dq_t += sum_{s in earlier sub-chunks} dM_ts k_s exp(A_t - A_s)
    if i_i > 0:
        a_r = tl.load(A + ((start + i_i * BC - 1) * Hb + i_h) * K + o_k, mask=m_k, other=0.0)
        for i_j in range(0, i_i):
            t_j = i_j * BC + o_c
            p_j, m_jk = tile((start + t_j) * Hb + i_h, t_j < n, o_k, K)
            b_kj = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
            b_aj = tl.load(A + p_j, mask=m_jk, other=0.0)
            p_M, m_M = tile((start + t_i) * Hb + i_h, m_i, t_j, BT)
            b_dMij = tl.load(dM + p_M, mask=m_M, other=0.0)
            b_dq = mma(b_dMij.to(DT), (b_kj * exp_nonpos(a_r[None, :] - b_aj)).to(DT), b_dq)
        b_dq *= exp_nonpos(b_a - a_r[None, :])
    # dk_s += sum_{t in later sub-chunks} dM_ts q_t exp(A_t - A_s)
    for i_j in range(i_i + 1, tl.cdiv(n, BC)):
        t_j = i_j * BC + o_c
        m_j = t_j < n
        p_j, m_jk = tile((start + t_j) * Hb + i_h, m_j, o_k, K)
        a_rj = tl.load(A + ((start + i_j * BC - 1) * Hb + i_h) * K + o_k, mask=m_k, other=0.0)
        b_qj = tl.load(q + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_aj = tl.load(A + p_j, mask=m_jk, other=0.0)
        p_M, m_M = tile((start + t_j) * Hb + i_h, m_j, t_i, BT)
        b_dMji = tl.load(dM + p_M, mask=m_M, other=0.0)
        b_dkj = mm(tl.trans(b_dMji).to(DT), (b_qj * exp_nonpos(b_aj - a_rj[None, :])).to(DT))
        b_dk += b_dkj * exp_nonpos(a_rj[None, :] - b_a)
    # the diagonal block, one column s at a time
    b_dk_diag = tl.zeros([BC, BK], dtype=tl.float32)
    for s in range(0, tl.minimum(n - i_i * BC, BC)):  # the sub-chunk's rows
        t_s = i_i * BC + s
        p_s = ((start + t_s) * Hb + i_h) * K + o_k
        b_ks = tl.load(k + p_s, mask=m_k, other=0.0).to(tl.float32)
        b_as = tl.load(A + p_s, mask=m_k, other=0.0)
        b_dMs = tl.load(dM + ((start + t_i) * Hb + i_h) * BT + t_s, mask=m_i & (o_c >= s), other=0.0)  # column s
        decay = exp_nonpos(b_a - b_as[None, :])  # [BC, BK], rows t >= s used
        b_dq += b_dMs[:, None] * b_ks[None, :] * decay
        row = tl.sum(b_dMs[:, None] * b_q * decay, 0)  # dk_s
        b_dk_diag = tl.where(o_c[:, None] == s, row[None, :], b_dk_diag)
    b_dk += b_dk_diag
    tl.store(dq + p_i, tl.load(dq_in + p_i, mask=m_ik, other=0.0) + b_dq, mask=m_ik)
    tl.store(dk + p_i, tl.load(dk_in + p_i, mask=m_ik, other=0.0) + b_dk, mask=m_ik)
    tl.store(dA + p_i, tl.load(dA_in + p_i, mask=m_ik, other=0.0) + b_q * b_dq - b_k * b_dk, mask=m_ik)
