"""Argument checks of docs/contract.md section 7, shared by every public entry point.

`check_scan` validates the inputs of `routed_scan` / `routed_step` before any work and returns them
as one `ScanArgs`, what backends receive; the small checks below it serve the constructors too.
Every error names the argument, what it got and what it expected. Nothing is broadcast, truncated
or cast here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .rules import Rule

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COUPLINGS = ("dt", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class ScanArgs:
    """The arguments of one `routed_scan` or `routed_step` call, validated and resolved: what a
    backend's scan and step receive (shapes in docs/contract.md section 2). `rule` is a `Rule`,
    `read_w` a tensor (`route_w` where the caller gave none), `scale` a float (K ** -0.5 where the
    caller gave none). For a step, `initial_state` is the state `[B,H,m,K,V]` the step updates."""
    q: Tensor
    k: Tensor
    v: Tensor
    rule: Rule
    route_idx: Tensor
    route_w: Tensor
    read_w: Tensor
    g: Optional[Tensor]
    beta: Optional[Tensor]
    num_slots: int
    coupling: str
    scale: float
    initial_state: Optional[Tensor]
    output_final_state: bool
    cu_seqlens: Optional[Tensor]

    @property
    def write_weight(self) -> Tensor:
        """The weight w a route's update is coupled to (docs/contract.md section 3): `route_w` under
        coupling "dt"; under "none" 1, or 0 for a route of weight 0 (no route); `[B,T,Hr,R]`."""
        return self.route_w if self.coupling == "dt" else (self.route_w > 0).to(self.route_w.dtype)

    @property
    def K(self) -> int:
        return self.q.shape[-1]

    @property
    def V(self) -> int:
        return self.v.shape[-1]

    @property
    def R(self) -> int:
        return self.route_idx.shape[-1]

    def replace(self, **changes) -> "ScanArgs":
        """A copy with some fields changed (not checked again)."""
        return dataclasses.replace(self, **changes)


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """States and accumulations: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_finite_number(name, value):
    """An int or float (not a bool), finite; range checks are the caller's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def check_cu_seqlens(cu_seqlens, B, T, device, check_values: bool = True) -> int:
    """Packed sequences in one row of `T` tokens: int64 offsets `[N+1]` from 0 to `T`, strictly
    increasing (the values only with `check_values`: reading them is a host sync). Returns `N`."""
    _tensor("cu_seqlens", cu_seqlens, device=device, floating=False)
    if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-d int64 tensor [N+1] with N >= 1, got "
                         f"{cu_seqlens.dtype} of shape {_shape(cu_seqlens)}")
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences need B = 1, got B = {B}")
    if check_values and (cu_seqlens[0] != 0 or cu_seqlens[-1] != T or (cu_seqlens.diff() <= 0).any()):
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to T = {T}, "
                         f"got {cu_seqlens.tolist()}")
    return cu_seqlens.numel() - 1


def check_cache_tensor(what: str, t, dims: dict, dtype: torch.dtype, device: torch.device) -> None:
    """A tensor of a layer's cache is the one this layer keeps: `dims` names each expected size
    (`{"batch": 2, "heads": 4, ...}`). A cache made by another layer, or for another batch, raises
    a ValueError naming `cache`, the entry and the sizes that differ."""
    expected = tuple(dims.values())
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"cache: {what} is a {type(t).__name__}, expected a tensor of shape {list(expected)} "
                         f"[{', '.join(dims)}]")
    if tuple(t.shape) != expected:
        if t.dim() == len(expected):
            differ = "; ".join(f"{name} {got} here {want}" for (name, want), got in zip(dims.items(), t.shape)
                               if got != want)
        else:
            differ = f"{t.dim()} dimensions, expected {len(expected)}"
        raise ValueError(f"cache: {what} has shape {list(t.shape)}, but this layer keeps {list(expected)} "
                         f"[{', '.join(dims)}] ({differ}); the cache was made by another layer or for another batch")
    if t.dtype != dtype:
        raise ValueError(f"cache: {what} is {t.dtype}, but this layer keeps it in {dtype} for these inputs")
    if t.device != device:
        raise ValueError(f"cache: {what} is on {t.device}, but the inputs are on {device}")


def check_conv_histories(label: str, held: dict, expected: dict, dtype: torch.dtype, device: torch.device) -> None:
    """A cache's short-convolution histories (`held`, by name) are exactly those this layer keeps:
    `expected` maps each name to its dims (as `check_cache_tensor` takes them); `label` names the
    cache entry in errors (e.g. `conv_state`)."""
    if set(held) != set(expected):
        raise ValueError(f"cache: holds convolution histories {sorted(held)}, but this layer keeps "
                         f"{sorted(expected)}; the cache was made by another layer")
    for name, dims in expected.items():
        check_cache_tensor(f"{label}[{name!r}]", held[name], dims, dtype, device)


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _tensor(name, x, *, device=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the inputs), got one on {x.device}")


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
               initial_state, output_final_state, cu_seqlens, check_values=True, state_name="initial_state",
               one_token=False) -> ScanArgs:
    """Validate `routed_scan` inputs (docs/contract.md sections 2 and 7) and resolve them into a
    `ScanArgs`; `routed_step` passes its `state` as the initial state, under `state_name`, and
    `one_token=True`.

    Types, shapes, dtypes and devices are always checked: that reads no tensor value. With
    `check_values`, so are the values (`check_scan_values`), which costs host syncs on a GPU."""
    _tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape [B, T, H, K], got {_shape(q)}")
    B, T, H, K = q.shape
    device = q.device
    for dim, size, meaning in (("B", B, "one batch row"), ("T", T, "one token"), ("H", H, "one head")):
        if size < 1:
            raise ValueError(f"q: expected at least {meaning} ({dim} >= 1), got {dim} = {size} in {_shape(q)}")
    if one_token and T != 1:
        raise ValueError(f"q: routed_step takes one token, expected shape [B, 1, H, K], got {_shape(q)}")
    check_bool("check_values", check_values)
    check_bool("output_final_state", output_final_state)

    check_positive_int("num_slots", num_slots)
    m = num_slots
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
    if scale is not None:
        check_finite_number("scale", scale)

    # Routing.
    _tensor("route_idx", route_idx, device=device, floating=False)
    if route_idx.dtype != torch.int64:
        raise TypeError(f"route_idx: expected dtype torch.int64, got {route_idx.dtype}")
    if route_idx.dim() != 4 or route_idx.shape[:2] != (B, T) or route_idx.shape[2] not in (1, H):
        raise ValueError(f"route_idx: expected shape [B, T, Hr, R] = [{B}, {T}, 1 or {H}, R], got {_shape(route_idx)}")
    R = route_idx.shape[3]
    if not 1 <= R <= m:
        raise ValueError(f"route_idx: expected 1 <= R <= num_slots = {m} routes per token, got R = {R}")
    for name, w in (("route_w", route_w), ("read_w", read_w)):
        if name == "read_w" and w is None:
            continue
        _tensor(name, w, device=device)
        if tuple(w.shape) != tuple(route_idx.shape):
            raise ValueError(f"{name}: expected the shape of route_idx {_shape(route_idx)}, got {_shape(w)}")
        _no_precision_loss(name, w, q)

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
    if not rule.beta and beta is not None:
        raise ValueError(f"beta: rule {rule.name!r} takes no write strength beta, got a tensor of shape {_shape(beta)}")
    if rule.beta:
        if beta is None:
            raise ValueError(f"beta: rule {rule.name!r} needs a write strength beta, got None")
        _tensor("beta", beta, device=device)
        _no_precision_loss("beta", beta, q)
        _expect_shape("beta", beta, ((B, T, H), ("B", "T", "H")), ((B, T, H, R), ("B", "T", "H", "R")))

    # Sequences and states. Packed sequences' offsets are read by every backend anyway.
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T, device, check_values)
    if initial_state is not None:
        _tensor(state_name, initial_state, device=device)
        _expect_shape(state_name, initial_state, ((N, H, m, K, V), ("N", "H", "m", "K", "V")))
        _no_precision_loss(state_name, initial_state, q)

    args = ScanArgs(q, k, v, rule, route_idx, route_w, route_w if read_w is None else read_w, g, beta, m, coupling,
                    K ** -0.5 if scale is None else float(scale), initial_state, output_final_state, cu_seqlens)
    if check_values:
        # routed_step takes its slot count from its state: a range error there is the state's as much as route_idx's
        check_scan_values(args, slots="num_slots" if state_name == "initial_state" else f"{state_name}.shape[2]")
    return args


def check_scan_values(args: ScanArgs, slots: str = "num_slots") -> None:
    """The value checks of `check_scan`, on inputs whose shapes it has checked: slot indices in
    range and distinct within a token, routing weights finite and >= 0, `g` finite and <= 0, `beta`
    finite in [0, 1], and the rule's own `check` (fm: `route_w * beta <= 1`). Each reads values
    back to the host. `slots` names where the slot count came from, for the range error."""
    route_idx, route_w, read_w, g, beta = args.route_idx, args.route_w, args.read_w, args.g, args.beta
    m = args.num_slots
    if route_idx.numel() and (route_idx.min() < 0 or route_idx.max() >= m):
        raise ValueError(f"route_idx: expected slot indices in [0, {slots}) = [0, {m}), "
                         f"got values in [{int(route_idx.min())}, {int(route_idx.max())}]")
    if route_idx.shape[-1] > 1:
        ordered = route_idx.sort(dim=-1).values
        repeats = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        if repeats.any():
            b, t, h = (int(i) for i in repeats.nonzero()[0])
            raise ValueError(f"route_idx: slots must be distinct within a token, got "
                             f"{route_idx[b, t, h].tolist()} at [b={b}, t={t}, head group={h}]")
    for name, w in (("route_w", route_w), ("read_w", read_w)):
        _finite(name, w)
        if w.numel() and w.min() < 0:
            raise ValueError(f"{name}: expected weights >= 0, got a minimum of {w.min().item():.4g}")
    if g is not None:
        _finite("g", g)
        if g.numel() and g.max() > 0:
            raise ValueError(f"g: expected log-decays g <= 0, got a maximum of {g.max().item():.4g}")
    if beta is not None:
        _finite("beta", beta)
        if beta.numel() and (beta.min() < 0 or beta.max() > 1):
            raise ValueError(f"beta: expected values in [0, 1], got values in "
                             f"[{beta.min().item():.4g}, {beta.max().item():.4g}]")
    if args.rule.check is not None:
        b = None
        if beta is not None:
            b = beta if beta.dim() == 4 else beta[..., None]
        args.rule.check(args.write_weight, b)
