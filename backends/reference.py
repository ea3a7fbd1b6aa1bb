"""The reference backend: docs/contract.md section 3 read literally, one token at a time.

Vectorised over batch, heads and routes; differentiable; float64 when the inputs are. Every other
backend is tested against this one in float64.
"""
from __future__ import annotations

import torch

from memplug.checks import compute_dtype

from .layout import routes_per_head, rule_inputs_per_route


def _token(S, t, rule, q, k, v, g, beta, idx, w, read_w, scale):
    """Token `t` on states `S [B,H,m,K,V]`: returns the gather index of the routed slots, their
    updated states `[B,H,R,K,V]` and the output `o_t [B,H,V]`. Inputs are `[B,T,H,R,...]`."""
    B, H, m, K, V = S.shape
    slots = idx[:, t, :, :, None, None].expand(B, H, idx.shape[-1], K, V)
    routed = rule.step(S.gather(2, slots), k[:, t], v[:, t], None if g is None else g[:, t],
                       None if beta is None else beta[:, t], w[:, t])
    o_t = scale * torch.einsum("bhrkv,bhk,bhr->bhv", routed, q[:, t], read_w[:, t])
    return slots, routed, o_t


def _prepare(q, k, v, g, beta, route_idx, route_w, read_w, rule, coupling, dtype):
    H, R = q.shape[2], route_idx.shape[-1]
    k, v, g, beta = rule_inputs_per_route(rule, k, v, g, beta, R)
    idx, route_w, read_w = (routes_per_head(x, H) for x in (route_idx, route_w, read_w))
    w = route_w if coupling == "dt" else torch.ones_like(route_w)
    cast = lambda x: None if x is None else x.to(dtype)
    return [cast(x) for x in (q, k, v, g, beta)] + [idx, cast(w), cast(read_w)]


def _scan_one(q, k, v, *, rule, route_idx, route_w, num_slots, g, beta, read_w, coupling, scale,
              initial_state):
    dtype = compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        S = torch.zeros(B, H, num_slots, K, V, dtype=dtype, device=q.device)
    else:
        S = initial_state.to(dtype)
    q, k, v, g, beta, idx, w, read_w = _prepare(q, k, v, g, beta, route_idx, route_w, read_w, rule,
                                                coupling, dtype)
    outputs = []
    for t in range(T):
        slots, routed, o_t = _token(S, t, rule, q, k, v, g, beta, idx, w, read_w, scale)
        S = S.scatter(2, slots, routed)  # out of place: autograd keeps every step's state
        outputs.append(o_t)
    return torch.stack(outputs, 1), S


def reference_scan(q, k, v, *, rule, route_idx, route_w, num_slots, g, beta, read_w, coupling, scale,
                   initial_state, output_final_state, cu_seqlens):
    kw = dict(rule=rule, num_slots=num_slots, coupling=coupling, scale=scale)
    if cu_seqlens is None:
        o, S = _scan_one(q, k, v, route_idx=route_idx, route_w=route_w, g=g, beta=beta, read_w=read_w,
                         initial_state=initial_state, **kw)
    else:  # each packed sequence on its own, from its own initial state
        outputs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = lambda x: None if x is None else x[:, bos:eos]
            o_n, S_n = _scan_one(part(q), part(k), part(v), route_idx=part(route_idx),
                                 route_w=part(route_w), g=part(g), beta=part(beta), read_w=part(read_w),
                                 initial_state=None if initial_state is None else initial_state[n:n + 1],
                                 **kw)
            outputs.append(o_n)
            states.append(S_n)
        o, S = torch.cat(outputs, 1), torch.cat(states, 0)
    return o.to(q.dtype), (S if output_final_state else None)


def reference_step(q, k, v, *, rule, route_idx, route_w, state, g, beta, read_w, coupling, scale):
    """One token; reads and writes only the routed slots of `state`: in place, unless autograd
    records the step (then a new state is returned and `state` is left as it was)."""
    out_dtype = q.dtype
    q, k, v, g, beta, idx, w, read_w = _prepare(q, k, v, g, beta, route_idx, route_w, read_w, rule,
                                                coupling, state.dtype)
    slots, routed, o_t = _token(state, 0, rule, q, k, v, g, beta, idx, w, read_w, scale)
    # When autograd records this step, the gather above saved `state` for backward: writing into
    # it would break that backward.
    if torch.is_grad_enabled() and (state.requires_grad or routed.requires_grad):
        state = state.scatter(2, slots, routed)
    else:
        state.scatter_(2, slots, routed)
    return o_t[:, None].to(out_dtype), state
