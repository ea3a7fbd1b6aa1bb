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


def _prepare(args, dtype):
    """The inputs as `[B,T,H,R,...]` in `dtype`, and the routing per head."""
    H, R = args.q.shape[2], args.R
    k, v, g, beta = rule_inputs_per_route(args.rule, args.k, args.v, args.g, args.beta, R)
    idx, w, read_w = (routes_per_head(x, H) for x in (args.route_idx, args.write_weight, args.read_w))
    cast = lambda x: None if x is None else x.to(dtype)
    return [cast(x) for x in (args.q, k, v, g, beta)] + [idx, cast(w), cast(read_w)]


def _scan_one(args):
    dtype = compute_dtype(args.q)
    B, T, H, K = args.q.shape
    if args.initial_state is None:
        S = torch.zeros(B, H, args.num_slots, K, args.V, dtype=dtype, device=args.q.device)
    else:
        S = args.initial_state.to(dtype)
    q, k, v, g, beta, idx, w, read_w = _prepare(args, dtype)
    outputs = []
    for t in range(T):
        slots, routed, o_t = _token(S, t, args.rule, q, k, v, g, beta, idx, w, read_w, args.scale)
        S = S.scatter(2, slots, routed)  # out of place: autograd keeps every step's state
        outputs.append(o_t)
    return torch.stack(outputs, 1), S


def reference_scan(args):
    if args.cu_seqlens is None:
        o, S = _scan_one(args)
    else:  # each packed sequence on its own, from its own initial state
        outputs, states = [], []
        bounds = args.cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = lambda x: None if x is None else x[:, bos:eos]
            o_n, S_n = _scan_one(args.replace(
                q=part(args.q), k=part(args.k), v=part(args.v), route_idx=part(args.route_idx),
                route_w=part(args.route_w), g=part(args.g), beta=part(args.beta), read_w=part(args.read_w),
                initial_state=None if args.initial_state is None else args.initial_state[n:n + 1], cu_seqlens=None))
            outputs.append(o_n)
            states.append(S_n)
        o, S = torch.cat(outputs, 1), torch.cat(states, 0)
    return o.to(args.q.dtype), (S if args.output_final_state else None)


def reference_step(args):
    """One token; reads and writes only the routed slots of the state `args.initial_state`: in
    place, unless autograd records the step (then a new state is returned and the old one is left as
    it was)."""
    state = args.initial_state
    q, k, v, g, beta, idx, w, read_w = _prepare(args, state.dtype)
    slots, routed, o_t = _token(state, 0, args.rule, q, k, v, g, beta, idx, w, read_w, args.scale)
    # When autograd records this step, the gather above saved `state` for backward: writing into
    # it would break that backward.
    if torch.is_grad_enabled() and (state.requires_grad or routed.requires_grad):
        state = state.scatter(2, slots, routed)
    else:
        state.scatter_(2, slots, routed)
    return o_t[:, None].to(args.q.dtype), state
