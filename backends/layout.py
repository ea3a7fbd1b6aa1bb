"""Input layouts shared by the backends: shared or per-route inputs, per-head or shared routing."""
from __future__ import annotations


def per_route(x, R: int, event_dims: int):
    """`[B,T,H,*E]` (shared by the routes of a token) or `[B,T,H,R,*E]` -> `[B,T,H,R,*E]`, a view."""
    if x is None or x.dim() == 4 + event_dims:
        return x
    return x.unsqueeze(3).expand(*x.shape[:3], R, *x.shape[3:])


def routes_per_head(x, H: int):
    """Routing tensors `[B,T,Hr,R]` with Hr in {1, H} -> `[B,T,H,R]`, a view."""
    return x.expand(x.shape[0], x.shape[1], H, x.shape[3])


def rule_inputs_per_route(rule, k, v, g, beta, R: int):
    """k, v, g, beta of `rule` as `[B,T,H,R,...]` views."""
    return (per_route(k, R, 1), per_route(v, R, 1),
            per_route(g, R, 1 if rule.g == "vector" else 0), per_route(beta, R, 0))
