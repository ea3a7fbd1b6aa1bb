"""The intra-chunk part of each family's scan: everything about one chunk that does not depend on
the state entering it. The state pass and the output pass (`state.py`) are shared by all families.

Within a chunk of C tokens with log-decays a_1..a_C, write A_t = a_1 + ... + a_t (per key channel
for vector decay). Every family's update can be written as an additive one,

    S_t = exp(a_t) S_{t-1} + k_t d_t^T,

with *effective values* d_t: d_t = v_t for the additive families. For the delta family,
S_t = exp(a_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T gives d_t = b_t (v_t - exp(a_t) S_{t-1}^T k_t),
which depends on the state; solving the chunk's lower-triangular system for all d_t at once (the
WY/UT form) gives d = u - w S_0, with S_0 the state entering the chunk:

    (I + L) u = b v,   (I + L) w = b exp(A) k,   L_ts = b_t exp(A_t - A_s) k_t.k_s  for s < t.

Unrolling the additive form then gives, for the whole chunk,

    S_C = exp(A_C) S_0 + sum_s exp(A_C - A_s) k_s d_s^T                       (state pass)
    o_t = (q_t exp(A_t))^T S_0 + sum_{s<=t} exp(A_t - A_s) (q_t.k_s) d_s         (output pass)

`ChunkForm` holds exactly these per-chunk quantities. Decays are only ever exponentiated as sums of
consecutive a's, never as differences of such sums: every exponent is <= 0 however strong the decay
(no overflow, no cancellation), and a = -inf (a slot wiped clean) gives zeros, not NaN, as no -inf is
ever subtracted.

Non-finite q, k, v are data (see `memplug.routed_scan`): they must reach their own and later rows
only. A causal mask is therefore applied by selecting (`torch.where`), never by multiplying: above the
diagonal q_t.k_s may be NaN, and 0 * NaN is NaN. Products over the rows of a chunk whose factor is
zero above the diagonal (the scores q k^T, the output pass's attn @ d) take finite operands
(`finite_split`) and add the non-finite part separately, to the rows that may see it; so neither
their forward nor their backward meets 0 * NaN.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from memplug.rules import Family


class ChunkForm(NamedTuple):
    """One family's chunks in the shared form. Leading dimensions `[n, h]` (chunks, heads)."""

    q: torch.Tensor  # [n,h,C,K] queries decayed from the chunk start: q_t exp(A_t)
    k: torch.Tensor  # [n,h,C,K] keys decayed to the chunk end: k_s exp(A_C - A_s)
    decay: torch.Tensor  # [n,h,1,1] (scalar) or [n,h,K,1] (vector): exp(A_C)
    attn: torch.Tensor  # [n,h,C,C] exp(A_t - A_s) q_t.k_s for s <= t, zero above the diagonal
    u: torch.Tensor  # [n,h,C,V] effective values (those not depending on the state)
    w: Optional[torch.Tensor]  # [n,h,C,K] effective values' dependence on S_0 (delta), or None


def finite_split(x: torch.Tensor):
    """`x` as `safe + bad`: `safe` is `x` with its NaN and infinite entries set to 0; `bad` holds those
    entries and is 0 elsewhere. On the CPU, if `x` has none (its sum is finite), `(x, None)`: the
    common case costs one sum, and reading it back is no sync there. On other devices the split is
    always taken, so that no value is read back to the host. (A sum that overflows takes the split
    too, which is merely unneeded.)"""
    if x.device.type == "cpu" and torch.isfinite(x.detach().sum()):
        return x, None
    safe = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return safe, x - safe


def causal_mask(C: int, device) -> torch.Tensor:
    """`[C, C]` bool, True on and below the diagonal (s <= t)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def decay_matrix(a: torch.Tensor) -> torch.Tensor:
    """`a [..., C]` -> `[..., C, C]` with entry (t, s) = exp(a_{s+1} + ... + a_t) for s <= t, and 1 above
    the diagonal (where no `a` enters it): its users apply a causal mask of their own, by selection,
    so a mask here would be one more pass. The sums are cumulative sums of masked copies, not
    differences of prefix sums, so they are exact for strong decays and free of inf - inf (a wiped
    slot's a = -inf gives exact zeros below the diagonal)."""
    C = a.shape[-1]
    strictly_lower = causal_mask(C, a.device).tril(-1)
    x = torch.where(strictly_lower, a[..., :, None], 0.0)  # x[t, s] = a_t for t > s
    return x.cumsum(-2).exp_()


def _prefix_suffix(a: torch.Tensor, dim: int):
    """Decay from the chunk start through t (A_t) and from after t to the chunk end (A_C - A_t),
    both as sums of the `a` involved, along `dim`."""
    prefix = a.cumsum(dim)
    after = torch.cat([a.narrow(dim, 1, a.shape[dim] - 1), torch.zeros_like(a.narrow(dim, 0, 1))], dim)
    suffix = after.flip(dim).cumsum(dim).flip(dim)
    return prefix, suffix


def _scalar_decay(q, k, a):
    """Decayed queries and keys, chunk decay and causal decay matrix for scalar `a [n,h,C]`."""
    prefix, suffix = _prefix_suffix(a, -1)
    gamma = decay_matrix(a)  # [n,h,C,C], exp(A_t - A_s) on and below the diagonal
    return (q * prefix.exp()[..., None], k * suffix.exp()[..., None],
            prefix[..., -1:, None].exp(), gamma, prefix)


def causal_scores(q, k, gamma):
    """gamma * (q_t.k_s) for s <= t and exactly 0 above the diagonal (whatever `gamma [n,h,C,C]` holds
    there). A non-finite key k_s makes column s non-finite; the product is taken with the finite part
    of the keys and the non-finite part is added to its column, which the causal mask then cuts off
    above the diagonal (so the gradient of q, dscores @ k, has no 0 * NaN either)."""
    safe, bad = finite_split(k)
    scores = q @ safe.transpose(-1, -2)
    if bad is not None:
        scores = scores + bad.sum(-1)[..., None, :]
    return torch.where(causal_mask(q.shape[-2], q.device), gamma * scores, 0.0)


def additive_scalar(q, k, v, a, b) -> ChunkForm:
    if a is None:
        a = q.new_zeros(q.shape[:-1])
    q_dec, k_dec, decay, gamma, _ = _scalar_decay(q, k, a)
    return ChunkForm(q_dec, k_dec, decay, causal_scores(q, k, gamma), v, None)


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """`[..., nb, s, s]` -> `[..., nb*s, nb*s]` with the blocks on the diagonal and exact zeros elsewhere
    (selected, not multiplied by 0: a block may hold NaN)."""
    nb = blocks.shape[-3]
    eye = torch.eye(nb, dtype=torch.bool, device=blocks.device)[:, None, :, None]
    return torch.where(eye, blocks[..., :, :, None, :], 0.0).flatten(-4, -3).flatten(-2, -1)


def _vector_attention(q, k, a) -> torch.Tensor:
    """sum_c q_tc k_sc exp(A_tc - A_sc) for s <= t, with per-channel decays `a [n,h,C,K]`.

    By recursive halving: a pair s < t is handled in the smallest block of a dyadic split of the
    chunk that holds both, where s lies in the first half and t in the second. Relative to the
    midpoint, the decay factors into exp(decay from after the midpoint to t) for the query and
    exp(decay from after s to the midpoint) for the key, both sums of decays and so <= 0: each level
    is one batched product of safely decayed queries and keys. Pairs s = t have no decay.
    """
    C = q.shape[-2]
    n = 1 << (C - 1).bit_length()  # identity tokens up to a power of two
    q, k, a = (F.pad(x, (0, 0, 0, n - C)) for x in (q, k, a))
    attn = (q * k).sum(-1).diag_embed()
    size = 2
    while size <= n:
        half = size // 2
        qb, kb, ab = (x.unflatten(-2, (n // size, 2, half)) for x in (q, k, a))  # [.., blocks, 2, half, K]
        q_after = qb[..., 1, :, :] * ab[..., 1, :, :].cumsum(-2).exp()
        k_before = kb[..., 0, :, :] * _prefix_suffix(ab[..., 0, :, :], -2)[1].exp()
        quadrant = q_after @ k_before.transpose(-1, -2)  # [.., blocks, half, half]: t after, s before
        attn = attn + _block_diagonal(F.pad(quadrant, (0, half, half, 0)))
        size *= 2
    return attn[..., :C, :C]


def additive_vector(q, k, v, a, b) -> ChunkForm:
    prefix, suffix = _prefix_suffix(a, -2)
    attn = _vector_attention(q, k, a)
    return ChunkForm(q * prefix.exp(), k * suffix.exp(), prefix[..., -1, :, None].exp(), attn, v, None)


def _wy(L, b, v, k_from_start):
    """The delta family's effective values d = u - w S_0: (I + L) [u, w] = b [v, exp(A) k], for
    `L` the strictly lower decayed key products without b, and `k_from_start` = exp(A) k.

    T = (I + b L)^-1 is solved for first, then applied with one product: a triangular solve's time
    grows with the width of its right-hand side, and at the CPU shapes (C = 32, K + V = 128) solving
    for T and multiplying took half the time of solving for [u, w] directly. A non-finite entry of
    the right-hand side at row s reaches rows t >= s only: the product takes its finite part and
    each row adds the non-finite entries of the rows up to it, as the output pass does."""
    bL = b[..., :, None] * L
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(bL)
    # `unitriangular` takes the unit diagonal as given, so b L itself is passed.
    T = torch.linalg.solve_triangular(bL, eye, upper=False, unitriangular=True)
    safe, bad = finite_split(b[..., None] * torch.cat([v, k_from_start], -1))
    uw = T @ safe if bad is None else T @ safe + bad.cumsum(-2)
    return uw.split([v.shape[-1], k_from_start.shape[-1]], -1)


def delta(q, k, v, a, b) -> ChunkForm:
    if a is None:
        a = q.new_zeros(q.shape[:-1])
    q_dec, k_dec, decay, gamma, prefix = _scalar_decay(q, k, a)
    u, w = _wy((gamma * (k @ k.transpose(-1, -2))).tril_(-1), b, v, prefix.exp()[..., None] * k)
    return ChunkForm(q_dec, k_dec, decay, causal_scores(q, k, gamma), u, w)


def delta_vector(q, k, v, a, b) -> ChunkForm:
    """The delta family with one decay per key channel (Kimi Delta Attention): the decayed key
    products of L are the per-channel attention of the keys with themselves."""
    prefix, suffix = _prefix_suffix(a, -2)
    # The queries' and the keys' attention to the keys in one pass: they share the decayed keys.
    attn, keys = _vector_attention(torch.stack([q, k]), k, a).unbind(0)
    u, w = _wy(keys.tril(-1), b, v, prefix.exp() * k)
    return ChunkForm(q * prefix.exp(), k * suffix.exp(), prefix[..., -1, :, None].exp(), attn, u, w)


INTRA_CHUNK = {"additive_scalar": additive_scalar, "additive_vector": additive_vector, "delta": delta,
               "delta_vector": delta_vector}


def supports_rule(rule) -> bool:
    """Whether the chunked scan runs `rule`: every rule of one of the four built-in families."""
    return rule.family is not None and rule.family.name in INTRA_CHUNK


def intra_chunk(family: Family, q, k, v, a, b) -> ChunkForm:
    """`family`'s chunks in the shared form. Inputs `[n,h,C,...]`: q, k `[..,K]`, v `[..,V]`,
    a `[..]` or `[..,K]` (None: no decay), b `[..]` (delta only)."""
    return INTRA_CHUNK[family.name](q, k, v, a, b)
