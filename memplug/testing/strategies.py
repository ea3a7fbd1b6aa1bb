"""Hypothesis strategies that draw valid `routed_scan` inputs for a rule.

A drawn case is a `CaseSpec`: a small frozen record of the *structure* of the inputs (shapes, slot
count, top-R, coupling, which inputs are per route, zero weights, unused slots, initial state,
packed sequences, dtype) and a seed. `make_inputs(spec)` turns it into tensors, deterministically.
Hypothesis shrinks the structure, so a failing law is reported with a small `CaseSpec` that anyone
can paste back:

    >>> from memplug.testing import CaseSpec, make_inputs
    >>> inputs = make_inputs(CaseSpec(rule="mamba2", T=3, m=2, R=1))
    >>> o, S = memplug.routed_scan(**inputs, output_final_state=True)

Values: `q, v` standard normal; keys standard normal scaled by `K**-0.5` for additive rules and
L2-normalised for delta-family and free-form rules (as layers do, so states stay bounded); log-decays
`g` uniform in [-1, -0.05]; `beta` uniform in [0.05, 0.95]; routing weights uniform in [0.1, 1]
(so `w * beta < 1` for `fm`), with about a third set to exactly 0 when `zero_weights`; initial states
normal with std 0.5. Side inputs (`g, beta, route_w, read_w`) have the dtype of `q`, or float32
for half-precision `q` when `side_float32`; initial states are float32 (float64 for float64 `q`).
`scale` is None (the default `K**-0.5`), 1.0 or a value drawn in [0.1, 2].

`poisons(spec)` draws a `Poison`: one entry of q, k or v of a case made NaN, inf or -inf (the
non-finite-inputs law); `Poison.apply` writes it into the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from hypothesis import strategies as st

from memplug.checks import compute_dtype
from memplug.rules import get_rule

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
PER_ROUTE_INPUTS = ("k", "v", "g", "beta")


def dtype_name(dtype) -> str:
    """`torch.float32` or "float32" -> "float32"."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: expected one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtypes: expected a floating torch dtype in {list(DTYPES.values())}, got {dtype!r}")


@dataclass(frozen=True)
class CaseSpec:
    """The structure of one `routed_scan` input; `make_inputs` builds the tensors.

    `per_route`: which of k, v, g, beta come in the per-route form `[B,T,H,R,...]`.
    `read_w`: pass a `read_w` of its own (else it defaults to `route_w`).
    `zero_weights`: about a third of the routing (and read) weights are exactly 0.
    `unit_weights`: every routing weight is exactly 1 (backbone reduction).
    `unused_slots`: this many slot labels (chosen by the seed) are never routed to.
    `unused_by_head`: with per-head routing (Hr = H > 1), each head group leaves its own
    `unused_slots` labels unused (the labels rotated by `unused_slots` per group), so that a slot
    frozen in one head is routed to in another.
    `seqlens`: lengths of packed sequences (`cu_seqlens`, B = 1), or None.
    `side_float32`: for half-precision q, the side inputs g, beta, route_w, read_w are float32.
    `scale`: the `scale` argument of `routed_scan` (None: `K**-0.5`).
    """

    rule: str
    dtype: str = "float64"
    B: int = 1
    T: int = 4
    H: int = 1
    K: int = 4
    V: int = 4
    m: int = 2
    R: int = 1
    Hr: int = 1
    coupling: str = "dt"
    per_route: tuple = ()
    read_w: bool = False
    zero_weights: bool = False
    unit_weights: bool = False
    unused_slots: int = 0
    unused_by_head: bool = False
    initial_state: bool = False
    seqlens: Optional[tuple] = None
    side_float32: bool = False
    scale: Optional[float] = None
    seed: int = 0

    def __post_init__(self):
        if self.Hr not in (1, self.H):
            raise ValueError(f"CaseSpec: Hr must be 1 or H = {self.H}, got {self.Hr}")
        if not 1 <= self.R <= self.m - self.unused_slots:
            raise ValueError(f"CaseSpec: need 1 <= R <= m - unused_slots, got R = {self.R}, m = {self.m}, "
                             f"unused_slots = {self.unused_slots}")
        if self.unused_by_head and (self.Hr < 2 or self.unused_slots < 1):
            raise ValueError(f"CaseSpec: unused_by_head needs per-head routing (Hr >= 2) and unused_slots >= 1, "
                             f"got Hr = {self.Hr}, unused_slots = {self.unused_slots}")
        if self.seqlens is not None and (self.B != 1 or sum(self.seqlens) != self.T or min(self.seqlens) < 1):
            raise ValueError(f"CaseSpec: seqlens {self.seqlens} need B = 1 and positive lengths summing to "
                             f"T = {self.T}")
        if set(self.per_route) - set(PER_ROUTE_INPUTS):
            raise ValueError(f"CaseSpec: per_route must name inputs among {PER_ROUTE_INPUTS}, got {self.per_route}")
        dtype_name(self.dtype)

    def __repr__(self):
        # Shapes always, other fields when they differ from the default: short, and still valid Python.
        always = ("rule", "dtype", "B", "T", "H", "K", "V", "m", "R")
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.name in always or getattr(self, f.name) != f.default]
        return f"CaseSpec({', '.join(parts)})"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def N(self) -> int:
        return self.B if self.seqlens is None else len(self.seqlens)

    def but(self, **changes) -> "CaseSpec":
        return replace(self, **changes)


def _keys_normalised(rule) -> bool:
    return rule.family is None or rule.family.delta


def make_inputs(spec: CaseSpec, device="cpu") -> dict:
    """The `routed_scan` keyword arguments of `spec` (everything but `output_final_state` and
    `backend`): deterministic in `spec`, generated on the CPU and moved to `device`."""
    rule = get_rule(spec.rule)
    gen = torch.Generator().manual_seed(spec.seed)
    f64 = torch.float64
    dt = spec.torch_dtype
    half = dt in (torch.float16, torch.bfloat16)
    side = torch.float32 if (half and spec.side_float32) else dt
    B, T, H, K, V, R, Hr, m = spec.B, spec.T, spec.H, spec.K, spec.V, spec.R, spec.Hr, spec.m

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=f64)

    def routes(name):  # the extra route dimension of an input given per route
        return (R,) if name in spec.per_route else ()

    q = normal(B, T, H, K)
    k = normal(B, T, H, *routes("k"), K)
    if _keys_normalised(rule):
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    else:
        k = k * K ** -0.5
    v = normal(B, T, H, *routes("v"), V)
    g = beta = None
    if rule.g is not None:
        g = uniform(-1.0, -0.05, B, T, H, *routes("g"), *((K,) if rule.g == "vector" else ()))
    if rule.beta:
        beta = uniform(0.05, 0.95, B, T, H, *routes("beta"))

    # Routing: R distinct slots per token and head group, among the slot labels in use (those of the
    # head group's rotation of the labels, with unused_by_head).
    labels = torch.randperm(m, generator=gen)
    u = spec.unused_slots
    shifts = [h * u if spec.unused_by_head else 0 for h in range(Hr)]
    used = torch.stack([labels.roll(-s)[u:] for s in shifts])  # [Hr, m - u]
    pick = torch.rand(B, T, Hr, m - u, generator=gen).argsort(-1)[..., :R]
    route_idx = used.expand(B, T, Hr, m - u).gather(3, pick)
    if spec.unit_weights:
        route_w = torch.ones(B, T, Hr, R, dtype=f64)
    else:
        route_w = uniform(0.1, 1.0, B, T, Hr, R)
        if spec.zero_weights:
            route_w = torch.where(torch.rand(B, T, Hr, R, generator=gen) < 1 / 3, 0.0, route_w)
    read_w = None
    if spec.read_w:
        read_w = uniform(0.1, 1.0, B, T, Hr, R)
        if spec.zero_weights:
            read_w = torch.where(torch.rand(B, T, Hr, R, generator=gen) < 1 / 3, 0.0, read_w)
    initial_state = None
    state_dtype = compute_dtype(q.to(dt))
    if spec.initial_state:
        initial_state = (0.5 * normal(spec.N, H, m, K, V)).to(state_dtype)
    cu_seqlens = None
    if spec.seqlens is not None:
        cu_seqlens = torch.tensor((0, *torch.tensor(spec.seqlens).cumsum(0).tolist()), dtype=torch.int64)

    to = lambda x, dtype: None if x is None else x.to(dtype=dtype, device=device)
    return dict(
        q=to(q, dt), k=to(k, dt), v=to(v, dt), rule=spec.rule, route_idx=route_idx.to(device),
        route_w=to(route_w, side), num_slots=m, g=to(g, side), beta=to(beta, side), read_w=to(read_w, side),
        coupling=spec.coupling, scale=spec.scale, initial_state=to(initial_state, state_dtype),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device),
    )


_T_SPECIALS = (1, 2, 15, 16, 17, 31, 32, 33, 40)


@st.composite
def case_specs(draw, rule: str, *, dtypes: Sequence = ("float64",), min_T: int = 1, max_T: int = 40,
               max_B: int = 2, max_H: int = 2, min_m: int = 1, max_m: int = 5, varlen: Optional[bool] = None,
               min_unused_slots: int = 0, initial_state: Optional[bool] = None,
               coupling: Optional[str] = None, backbone: bool = False,
               dims: Sequence[int] = (8, 4, 16, 6, 12)) -> CaseSpec:
    """A strategy of `CaseSpec` for `rule`.

    dtypes: the dtypes to draw from (names or torch dtypes). min_T, max_T: tokens per batch row (with
    varlen, of the packed row). min_m, max_m: slots per head (raised to fit `min_unused_slots`).
    varlen: True always packs sequences (`cu_seqlens`, 2 to 4 of them), False never, None either.
    min_unused_slots: at least this many slots get no token. initial_state, coupling: fixed if given,
    drawn if None. backbone: m = 1, R = 1, w = 1, coupling "none", default scale (the plain rule).
    dims: the values K and V are drawn from (each separately, so K != V is common).
    """
    r = get_rule(rule)
    dtype = dtype_name(draw(st.sampled_from([dtype_name(d) for d in dtypes])))
    if varlen is None:
        varlen = False if backbone else draw(st.booleans())
    if varlen:
        min_T = max(min_T, 2)
    T = draw(st.one_of(st.integers(min_T, max_T),
                       st.sampled_from([t for t in _T_SPECIALS if min_T <= t <= max_T] or [min_T, max_T])))
    seqlens = None
    if varlen:
        n_seq = draw(st.integers(2, min(4, T)))
        cuts = draw(st.lists(st.integers(1, T - 1), min_size=n_seq - 1, max_size=n_seq - 1, unique=True))
        bounds = [0, *sorted(cuts), T]
        seqlens = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    B = 1 if varlen else draw(st.integers(1, max_B))
    H = draw(st.integers(1, max_H))
    K = draw(st.sampled_from(list(dims)))
    V = draw(st.sampled_from(list(dims)))
    Hr = draw(st.sampled_from([1, H]))
    if backbone:
        m, R, unused, cpl, scale = 1, 1, 0, "none", None
    else:
        lowest_m = max(min_m, 1 + min_unused_slots)
        m = draw(st.integers(lowest_m, max(max_m, lowest_m)))
        unused = draw(st.integers(min_unused_slots, m - 1))
        R = draw(st.integers(1, m - unused))
        cpl = coupling if coupling is not None else draw(st.sampled_from(["dt", "none"]))
        scale = draw(st.one_of(st.none(), st.just(1.0), st.floats(0.1, 2.0).map(lambda x: round(x, 4))))
    unused_by_head = Hr > 1 and unused > 0 and draw(st.booleans())
    inputs = ["k", "v"] + (["g"] if r.g is not None else []) + (["beta"] if r.beta else [])
    per_route = tuple(name for name in inputs if draw(st.booleans()))
    read_w = False if backbone else draw(st.booleans())
    zero_weights = False if backbone else draw(st.booleans())
    init = draw(st.booleans()) if initial_state is None else initial_state
    half = dtype in ("float16", "bfloat16")
    side_float32 = draw(st.booleans()) if half else False
    seed = draw(st.integers(0, 2 ** 16))
    return CaseSpec(rule=r.name, dtype=dtype, B=B, T=T, H=H, K=K, V=V, m=m, R=R, Hr=Hr, coupling=cpl,
                    per_route=per_route, read_w=read_w, zero_weights=zero_weights, unit_weights=backbone,
                    unused_slots=unused, unused_by_head=unused_by_head, initial_state=init, seqlens=seqlens,
                    side_float32=side_float32, scale=scale, seed=seed)


NONFINITE_VALUES = ("nan", "inf", "-inf")


@dataclass(frozen=True)
class Poison:
    """One entry of q, k or v made non-finite: `value` ("nan", "inf" or "-inf", a string so that the
    record's repr is valid Python) at channel `channel` of head `head`, and of route `route` when the
    input is given per route, of token `token` of sequence `sequence` (counted from the sequence's
    first token; a sequence is a batch row, or a packed sequence of `cu_seqlens`)."""

    input: str
    sequence: int
    token: int
    head: int
    channel: int
    value: str
    route: int = 0

    def __post_init__(self):
        if self.input not in ("q", "k", "v"):
            raise ValueError(f"Poison: input must be 'q', 'k' or 'v', got {self.input!r}")
        if self.value not in NONFINITE_VALUES:
            raise ValueError(f"Poison: value must be one of {NONFINITE_VALUES}, got {self.value!r}")

    def span(self, spec: CaseSpec) -> tuple:
        """(batch row, first token, end) of the poisoned sequence in the inputs of `spec`."""
        if spec.seqlens is None:
            return self.sequence, 0, spec.T
        start = sum(spec.seqlens[:self.sequence])
        return 0, start, start + spec.seqlens[self.sequence]

    def apply(self, inputs: dict, spec: CaseSpec) -> dict:
        """`inputs` (of `make_inputs(spec)`) with the entry replaced, on a copy of the tensor."""
        b, start, _ = self.span(spec)
        x = inputs[self.input].clone()
        route = (self.route,) if x.dim() == 5 else ()  # k, v given per route: [B,T,H,R,...]
        x[(b, start + self.token, self.head, *route, self.channel)] = float(self.value)
        return dict(inputs, **{self.input: x})


@st.composite
def poisons(draw, spec: CaseSpec) -> Poison:
    """A strategy of `Poison` for the inputs of `spec`. The token is drawn as a distance from the
    sequence's end, so that hypothesis favours, and shrinks towards, late tokens: the most earlier
    tokens for a leak to reach."""
    name = draw(st.sampled_from(["q", "k", "v"]))
    sequence = draw(st.integers(0, spec.N - 1))
    length = spec.T if spec.seqlens is None else spec.seqlens[sequence]
    token = length - 1 - draw(st.integers(0, length - 1))
    head = draw(st.integers(0, spec.H - 1))
    channel = draw(st.integers(0, (spec.V if name == "v" else spec.K) - 1))
    route = draw(st.integers(0, spec.R - 1)) if name in spec.per_route else 0
    return Poison(name, sequence, token, head, channel, draw(st.sampled_from(NONFINITE_VALUES)), route)


def scan_inputs(rule: str, device="cpu", **kwargs):
    """A strategy of `routed_scan` keyword arguments for `rule` (see `case_specs` for `kwargs`)."""
    return case_specs(rule, **kwargs).map(lambda spec: make_inputs(spec, device))
