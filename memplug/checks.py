"""Argument checks of SPEC section 7, shared by every public entry point.

`check_scan` validates the inputs of `routed_scan` / `routed_step` before any work and returns their
dimensions. Every error names the argument, what it got and what it expected. Nothing is broadcast,
truncated or cast here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rules import Rule

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COUPLINGS = ("dt", "none")


@dataclass(frozen=True)
class Dims:
    """Dimensions of validated `routed_scan` inputs."""

    B: int  # batch
    T: int  # tokens per batch row
    H: int  # heads
    K: int  # key width
    V: int  # value width
    R: int  # routes per token
    Hr: int  # routing groups: 1 (shared by all heads) or H
    m: int  # slots per head
    N: int  # sequences: B, or len(cu_seqlens) - 1
    compute_dtype: torch.dtype  # float64 for float64 inputs, float32 otherwise


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _tensor(name, x, *, device=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got one on {x.device}")


def _expect_shape(name, x, *shapes):
    """`shapes` are the allowed shapes, with a readable name per dimension."""
    if any(tuple(x.shape) == tuple(shape) for shape, _ in shapes):
        return
    wanted = " or ".join(f"[{', '.join(names)}] = {list(shape)}" for shape, names in shapes)
    raise ValueError(f"{name}: expected shape {wanted}, got {_shape(x)}")


def _no_precision_loss(name, x, q):
    if x.dtype == torch.float64 and q.dtype != torch.float64:
        raise ValueError(f"{name}: got float64 while q is {q.dtype}, so it would be cast to a lower "
                         f"precision; pass q, k, v in float64 too, or {name} in float32")


def _finite(name, x):
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN or inf")


def check_scan(q, k, v, *, rule: Rule, route_idx, route_w, num_slots, g, beta, read_w, coupling, scale,
               initial_state, cu_seqlens, state_name="initial_state") -> Dims:
    """Validate `routed_scan` inputs (SPEC sections 2 and 7) and return their dimensions."""
    _tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape [B, T, H, K], got {_shape(q)}")
    B, T, H, K = q.shape
    device = q.device
    if T < 1:
        raise ValueError(f"q: expected at least one token (T >= 1), got T = {T} in {_shape(q)}")
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"num_slots: expected an int >= 1, got {num_slots!r}")
    m = num_slots
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not torch.isfinite(torch.tensor(float(scale)))):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")

    # Routing.
    _tensor("route_idx", route_idx, device=device, floating=False)
    if route_idx.dtype != torch.int64:
        raise TypeError(f"route_idx: expected dtype torch.int64, got {route_idx.dtype}")
    if route_idx.dim() != 4 or route_idx.shape[:2] != (B, T) or route_idx.shape[2] not in (1, H):
        raise ValueError(f"route_idx: expected shape [B, T, Hr, R] = [{B}, {T}, 1 or {H}, R], got {_shape(route_idx)}")
    Hr, R = route_idx.shape[2], route_idx.shape[3]
    if not 1 <= R <= m:
        raise ValueError(f"route_idx: expected 1 <= R <= num_slots = {m} routes per token, got R = {R}")
    if route_idx.numel() and (route_idx.min() < 0 or route_idx.max() >= m):
        raise ValueError(f"route_idx: expected slot indices in [0, num_slots) = [0, {m}), "
                         f"got values in [{int(route_idx.min())}, {int(route_idx.max())}]")
    if R > 1:
        ordered = route_idx.sort(dim=-1).values
        repeats = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        if repeats.any():
            b, t, h = (int(i) for i in repeats.nonzero()[0])
            raise ValueError(f"route_idx: slots must be distinct within a token, got "
                             f"{route_idx[b, t, h].tolist()} at [b={b}, t={t}, head group={h}]")
    for name, w in (("route_w", route_w), ("read_w", read_w)):
        if name == "read_w" and w is None:
            continue
        _tensor(name, w, device=device)
        if tuple(w.shape) != tuple(route_idx.shape):
            raise ValueError(f"{name}: expected the shape of route_idx {_shape(route_idx)}, got {_shape(w)}")
        _no_precision_loss(name, w, q)
        _finite(name, w)
        if w.numel() and w.min() < 0:
            raise ValueError(f"{name}: expected weights >= 0, got a minimum of {w.min().item():.4g}")

    # Keys, values, decays, write strengths: shared [B,T,H,...] or per route [B,T,H,R,...].
    _tensor("k", k, device=device)
    _tensor("v", v, device=device)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
    _expect_shape("k", k, ((B, T, H, K), ("B", "T", "H", "K")), ((B, T, H, R, K), ("B", "T", "H", "R", "K")))
    if v.dim() not in (4, 5) or v.shape[:3] != (B, T, H) or (v.dim() == 5 and v.shape[3] != R):
        raise ValueError(f"v: expected shape [B, T, H, V] = [{B}, {T}, {H}, V] or [B, T, H, R, V] = "
                         f"[{B}, {T}, {H}, {R}, V], got {_shape(v)}")
    V = v.shape[-1]
    if V < 1 or K < 1:
        raise ValueError(f"q, v: expected K >= 1 and V >= 1, got K = {K}, V = {V}")

    if rule.g is None and g is not None:
        raise ValueError(f"g: rule {rule.name!r} takes no decay g, got a tensor of shape {_shape(g)}")
    if rule.g is not None:
        if g is None:
            raise ValueError(f"g: rule {rule.name!r} needs a log-decay g, got None")
        _tensor("g", g, device=device)
        _no_precision_loss("g", g, q)
        if rule.g == "scalar":
            _expect_shape("g", g, ((B, T, H), ("B", "T", "H")), ((B, T, H, R), ("B", "T", "H", "R")))
        else:
            _expect_shape("g", g, ((B, T, H, K), ("B", "T", "H", "K")), ((B, T, H, R, K), ("B", "T", "H", "R", "K")))
        _finite("g", g)
        if g.numel() and g.max() > 0:
            raise ValueError(f"g: expected log-decays g <= 0, got a maximum of {g.max().item():.4g}")
    if not rule.beta and beta is not None:
        raise ValueError(f"beta: rule {rule.name!r} takes no write strength beta, got a tensor of shape {_shape(beta)}")
    if rule.beta:
        if beta is None:
            raise ValueError(f"beta: rule {rule.name!r} needs a write strength beta, got None")
        _tensor("beta", beta, device=device)
        _no_precision_loss("beta", beta, q)
        _expect_shape("beta", beta, ((B, T, H), ("B", "T", "H")), ((B, T, H, R), ("B", "T", "H", "R")))
        _finite("beta", beta)
        if beta.numel() and (beta.min() < 0 or beta.max() > 1):
            raise ValueError(f"beta: expected values in [0, 1], got values in "
                             f"[{beta.min().item():.4g}, {beta.max().item():.4g}]")

    # Sequences and states.
    N = B
    if cu_seqlens is not None:
        _tensor("cu_seqlens", cu_seqlens, device=device, floating=False)
        if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected a 1-d int64 tensor [N+1] with N >= 1, got "
                             f"{cu_seqlens.dtype} of shape {_shape(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B = 1, got q of shape {_shape(q)}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T or (cu_seqlens.diff() <= 0).any():
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to T = {T}, "
                             f"got {cu_seqlens.tolist()}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        _tensor(state_name, initial_state, device=device)
        _expect_shape(state_name, initial_state, ((N, H, m, K, V), ("N", "H", "m", "K", "V")))
        _no_precision_loss(state_name, initial_state, q)

    if rule.check is not None:
        w = route_w if coupling == "dt" else torch.ones_like(route_w)
        b = None
        if beta is not None:
            b = beta if beta.dim() == 4 else beta[..., None]
        rule.check(w, b)
    return Dims(B=B, T=T, H=H, K=K, V=V, R=R, Hr=Hr, m=m, N=N, compute_dtype=compute_dtype)
