"""The chunked routed scan in one screen: dense over slots, no packing, float64-friendly.

Every slot runs the whole sequence; a token that does not route to it leaves it alone (no write, no
decay). Within a chunk of C tokens, with log-decays summed from the chunk start, A_t = a_1 + ... + a_t:

    S_t = exp(A_t) S_0 + sum_{s<=t} exp(A_t - A_s) k_s d_s^T,      o_t = q_t^T S_t,

where d = v for additive rules, and for the delta rule d solves (I + L) d = b (v - exp(A) k^T S_0)
with L_ts = b_t exp(A_t - A_s) k_t.k_s for s < t (the WY form). It costs m/R times the work of the
packed backends; it is here to be read, and is tested against `reference.py`. Non-finite inputs are
not handled.
"""
import torch

from memplug.rules import get_rule


def decayed_products(x, y, A):
    """sum_c x_tc y_sc exp(A_tc - A_sc) for s <= t, else 0: `[..., C, C]`."""
    C = A.shape[-2]
    below = torch.ones(C, C, dtype=torch.bool, device=A.device).tril()
    exponent = (A[..., :, None, :] - A[..., None, :, :]).masked_fill(~below[..., None], float("-inf"))
    return torch.einsum("...tc,...sc,...tsc->...ts", x, y, exponent.exp())


def minimal_scan(q, k, v, *, rule, route_idx, route_w, num_slots, g=None, beta=None, read_w=None, coupling="dt",
                 scale=None, initial_state=None, chunk_size=16):
    """`routed_scan` without `cu_seqlens`: returns `(o [B,T,H,V], final states [B,H,m,K,V])`."""
    rule = get_rule(rule)
    B, T, H, K = q.shape
    V, R, m = v.shape[-1], route_idx.shape[-1], num_slots
    scale = K ** -0.5 if scale is None else scale
    read_w = route_w if read_w is None else read_w
    # Route r of token t to slot j as a one-hot [B,T,H,R,m]; inputs per route, then per slot.
    onehot = torch.nn.functional.one_hot(route_idx.expand(B, T, H, R), m).to(q.dtype)
    per_route = lambda x, event: x if x.dim() == 4 + event else x.unsqueeze(3).expand(*x.shape[:3], R, *x.shape[3:])
    per_slot = lambda x: torch.einsum("bthrj,bthr...->bthj...", onehot, x)
    w = route_w.expand(B, T, H, R)
    w = w if coupling == "dt" else (w > 0).to(q.dtype)  # "none": 1 per route, 0 for a route of weight 0
    c = rule.couple(per_slot(per_route(k, 1)), per_slot(per_route(v, 1)),
                    None if g is None else per_slot(per_route(g, int(rule.g == "vector"))),
                    None if beta is None else per_slot(per_route(beta, 0)), per_slot(w))
    routed = per_slot(torch.ones(B, T, H, R, dtype=q.dtype)) > 0  # [B,T,H,m]
    kk = torch.where(routed[..., None], c.k, 0.0)  # an unrouted token does not write ...
    a = torch.zeros(B, T, H, m, K, dtype=q.dtype) if c.a is None else c.a
    a = torch.where(routed[..., None], a if a.dim() == 5 else a[..., None].expand(B, T, H, m, K), 0.0)  # ... nor decay
    b = None if c.b is None else torch.where(routed, c.b, 0.0)
    rw = per_slot(read_w.expand(B, T, H, R)) * scale

    S = torch.zeros(B, H, m, K, V, dtype=q.dtype) if initial_state is None else initial_state.to(q.dtype)
    slots_first = lambda x: x.movedim(1, 3)  # [B,T,H,m,...] -> [B,H,m,T,...]
    qq, kk, vv, a = slots_first(q.unsqueeze(3).expand(B, T, H, m, K)), slots_first(kk), slots_first(c.v), slots_first(a)
    b = None if b is None else slots_first(b)
    outputs = []
    for t0 in range(0, T, chunk_size):
        part = slice(t0, t0 + chunk_size)
        q_c, k_c, v_c, A = qq[..., part, :], kk[..., part, :], vv[..., part, :], a[..., part, :].cumsum(-2)
        d = v_c
        if b is not None:  # the delta rule's effective values
            b_c = b[..., part]
            L = (b_c[..., None] * decayed_products(k_c, k_c, A)).tril(-1)
            rhs = b_c[..., None] * (v_c - (k_c * A.exp()) @ S)
            eye = torch.eye(L.shape[-1], dtype=q.dtype)
            d = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
        outputs.append((q_c * A.exp()) @ S + decayed_products(q_c, k_c, A) @ d)  # [B,H,m,C,V]
        A_end = A[..., -1:, :]
        S = A_end.exp().transpose(-1, -2) * S + (k_c * (A_end - A).exp()).transpose(-1, -2) @ d
    o = torch.cat(outputs, -2)  # [B,H,m,T,V]
    return torch.einsum("bhjtv,bthj->bthv", o, rw), S
