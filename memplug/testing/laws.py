"""The laws of docs/contract.md section 6, one function each, on one drawn case.

Every law takes a `Context` (backend name, device, tolerances) and a drawn case, and raises
`LawViolation` (an `AssertionError`) saying what differs. `memplug.testing.kit` draws the cases with
hypothesis and names the law, the rule and the minimal failing case in the final error.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from hypothesis import strategies as st

from memplug.checks import check_scan, compute_dtype
from memplug.imports import import_object
from memplug.registry import Backend, get_backend
from memplug.rules import get_rule
from memplug.scan import routed_scan, routed_step

from .strategies import CaseSpec, Poison, case_specs, make_inputs, poisons
from .tolerances import Tol, tolerance

TOKEN_INPUTS = ("q", "k", "v", "g", "beta", "route_idx", "route_w", "read_w")
GRAD_INPUTS = ("q", "k", "v", "g", "beta", "route_w", "read_w", "initial_state")


class LawViolation(AssertionError):
    """A law of docs/contract.md section 6 does not hold on one case."""


@dataclass
class Context:
    backend: str
    device: torch.device
    tolerances: dict
    chunk_sizes: Optional[tuple] = None  # None: the backend declares no chunk sizes
    subject: Optional[str] = None  # who breaks a law in failure messages; default: the backend

    def tol(self, dtype, what) -> Tol:
        return tolerance(dtype, what, self.tolerances)


# --------------------------------------------------------------------------------------------- helpers

def assert_close(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tol) -> None:
    """Norm-wise closeness (see `memplug.testing.tolerances`); raises `LawViolation`."""
    if actual is None:
        raise LawViolation(f"{what}: got None, expected a tensor of shape {list(expected.shape)}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise LawViolation(f"{what}: got shape {list(actual.shape)}, expected {list(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(a).all():
        raise LawViolation(f"{what}: got {int((~torch.isfinite(a)).sum())} NaN or inf values")
    if a.numel() == 0:
        return
    err = (a - e).abs()
    scale = e.abs().max().item()
    bound = tol.atol + tol.rtol * scale
    worst = err.max().item()
    if worst > bound:
        at = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise LawViolation(
            f"{what}: max |error| {worst:.3e} at index {list(at)} (got {a[at].item():.8g}, expected "
            f"{e[at].item():.8g}) exceeds atol + rtol * max|expected| = {tol.atol:.0e} + {tol.rtol:.0e} * "
            f"{scale:.3g} = {bound:.3e}")


def assert_equal(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit (up to the sign of zero)."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise LawViolation(f"{what}: got shape {list(actual.shape)}, expected {list(expected.shape)}")
    a, e = actual.detach().cpu(), expected.detach().cpu().to(actual.dtype)
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not same.all():
        at = tuple(int(i) for i in (~same).nonzero()[0])
        raise LawViolation(f"{what}: {int((~same).sum())} entries differ, not bit for bit equal; first at "
                           f"index {list(at)}: got {a[at].item()!r}, expected {e[at].item()!r}")


def scan(ctx: Context, inputs: dict, output_final_state: bool = True, **changes):
    """`routed_scan` on the backend under test, with final states unless told otherwise."""
    kw = dict(inputs, **changes)
    try:
        return routed_scan(**kw, output_final_state=output_final_state, backend=ctx.backend)
    except LawViolation:
        raise
    except Exception as e:  # a valid input must not raise
        raise LawViolation(f"routed_scan(backend={ctx.backend!r}) raised {type(e).__name__} on valid "
                           f"input: {e}") from e


def slice_tokens(inputs: dict, start: int, stop: int) -> dict:
    """Tokens [start, stop) of every per-token input (no cu_seqlens)."""
    out = dict(inputs, cu_seqlens=None)
    for name in TOKEN_INPUTS:
        if inputs.get(name) is not None:
            out[name] = inputs[name][:, start:stop]
    return out


def routed_mask(route_idx: torch.Tensor, H: int, m: int) -> torch.Tensor:
    """`[B,T,H,m]` bool: token t of row b routes head h to slot i."""
    B, T, Hr, R = route_idx.shape
    mask = torch.zeros(B, T, Hr, m, dtype=torch.bool, device=route_idx.device)
    mask.scatter_(3, route_idx, True)
    return mask.expand(B, T, H, m)


def _check_result(inputs, o, S):
    q = inputs["q"]
    if o.dtype != q.dtype:
        raise LawViolation(f"o: got dtype {o.dtype}, expected the dtype of q ({q.dtype})")
    wanted = compute_dtype(q)
    if S is None:
        raise LawViolation("final_state: got None with output_final_state=True")
    if S.dtype != wanted:
        raise LawViolation(f"final_state: got dtype {S.dtype}, expected {wanted} for q of dtype {q.dtype}")


# ------------------------------------------------------------------------------------------------ laws

def cotangents(spec: CaseSpec, o: torch.Tensor, S: torch.Tensor):
    """The random cotangents `(do, dS)` of a case: float64 values representable in the dtypes of o and
    S, so that a backend and the float64 reference see the same linear function of (o, S)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(torch.float64)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype).to(torch.float64)
    return do.to(o.device), dS.to(S.device)


def input_grads(o, S, do, dS, leaves: dict, what: str = "") -> dict:
    """The gradients of `sum(o * do) + sum(S * dS)` w.r.t. `leaves` (name -> tensor), zero where
    unused. `what` says which run they are of, in errors."""
    if not (o.requires_grad or S.requires_grad):
        raise LawViolation(f"gradients{what}: the backend's o and final state do not require grad (no autograd "
                           f"support)")
    loss = (o.to(torch.float64) * do).sum() + (S.to(torch.float64) * dS).sum()
    try:
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    except Exception as e:
        raise LawViolation(f"gradients{what}: backward raised {type(e).__name__}: {e}") from e
    return {n: torch.zeros_like(x) if gr is None else gr for (n, x), gr in zip(leaves.items(), grads)}


def _grad_leaves(inputs: dict, dtype=None) -> dict:
    """Fresh leaves requiring grad for every float input of `inputs` (in `dtype` if given)."""
    return {n: inputs[n].detach().to(dtype or inputs[n].dtype).clone().requires_grad_()
            for n in GRAD_INPUTS if inputs.get(n) is not None}


def reference_equality(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.1: o, final states and the gradients w.r.t. every float input equal the float64
    reference (run on the same values, upcast); without final states, o is the same and the
    final state None."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    mine, ref = _grad_leaves(inputs), _grad_leaves(inputs, torch.float64)
    o, S = scan(ctx, dict(inputs, **mine))
    _check_result(inputs, o, S)
    o_ref, S_ref = routed_scan(**dict(inputs, **ref), output_final_state=True, backend="reference")
    assert_close("o", o, o_ref, ctx.tol(dt, "output"))
    assert_close("final_state", S, S_ref, ctx.tol(dt, "state"))

    o_only, none = scan(ctx, inputs, output_final_state=False)
    if none is not None:
        raise LawViolation(f"final_state with output_final_state=False: got {type(none).__name__}, expected None")
    assert_close("o with output_final_state=False", o_only, o_ref, ctx.tol(dt, "output"))

    do, dS = cotangents(spec, o, S)
    grads = input_grads(o, S, do, dS, mine)
    grads_ref = input_grads(o_ref, S_ref, do, dS, ref)
    for name, gr in grads.items():
        if gr.dtype != mine[name].dtype:
            raise LawViolation(f"grad {name}: got dtype {gr.dtype}, expected the input's dtype {mine[name].dtype}")
        assert_close(f"grad {name}", gr, grads_ref[name], ctx.tol(dt, "grad"))


def state_passing(ctx: Context, spec: CaseSpec, split: int) -> None:
    """contract law 6.2: tokens [0, split) then [split, T) from the first part's final state equal one scan."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    o1, S1 = scan(ctx, slice_tokens(inputs, 0, split))
    o2, S2 = scan(ctx, slice_tokens(inputs, split, spec.T), initial_state=S1)
    assert_close(f"o, split at t={split}", torch.cat([o1, o2], 1), o, ctx.tol(dt, "output"))
    assert_close(f"final_state, split at t={split}", S2, S, ctx.tol(dt, "state"))


DEFAULT_BLOCK_SIZES = (64,)  # rows per kernel block the kit straddles unless a backend declares its own


def backend_block_sizes(backend: Backend) -> tuple:
    """The block sizes whose boundaries the kit's long cases cross: 64 (a common kernel block), the
    backend's declared block sizes and its chunk sizes."""
    return DEFAULT_BLOCK_SIZES + backend.block_sizes + backend.chunk_sizes


def backend_chunk_sizes(backend: Backend) -> Optional[tuple]:
    """The chunk sizes a backend declared (`register_backend(chunk_sizes=...)`), None if none."""
    return backend.chunk_sizes or None


def _scan_with_chunk_size(ctx: Context, inputs: dict, chunk_size):
    """The backend's own scan function, called as `routed_scan` calls it, plus `chunk_size`."""
    args = check_scan(**dict(inputs, rule=get_rule(inputs["rule"]), output_final_state=True))
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    try:
        return get_backend(ctx.backend).scan(args, **extra)
    except Exception as e:
        raise LawViolation(f"scan(chunk_size={chunk_size}) raised {type(e).__name__} on valid input: {e}") from e


def chunk_size(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.2: every chunk size the backend offers gives the result of its default chunk size: o,
    final states and the gradients w.r.t. every float input."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    leaves = _grad_leaves(inputs)
    o, S = _scan_with_chunk_size(ctx, dict(inputs, **leaves), None)
    do, dS = cotangents(spec, o, S)
    grads = input_grads(o, S, do, dS, leaves, " (default chunk size)")
    for c in ctx.chunk_sizes:
        leaves_c = _grad_leaves(inputs)
        o_c, S_c = _scan_with_chunk_size(ctx, dict(inputs, **leaves_c), c)
        assert_close(f"o, chunk_size={c} vs default", o_c, o, ctx.tol(dt, "output"))
        assert_close(f"final_state, chunk_size={c} vs default", S_c, S, ctx.tol(dt, "state"))
        grads_c = input_grads(o_c, S_c, do, dS, leaves_c, f" (chunk_size={c})")
        for name, gr in grads.items():
            assert_close(f"grad {name}, chunk_size={c} vs default", grads_c[name], gr, ctx.tol(dt, "grad"))


def decode(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.3 (and section 4): `routed_step` token by token equals `routed_scan`, and each step leaves
    the slots it does not route to bit for bit unchanged."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    B, T, H, _ = inputs["q"].shape
    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros_like(S)
    else:
        state = state.clone()
    mask = routed_mask(inputs["route_idx"], H, spec.m)
    outs = []
    for t in range(T):
        step = slice_tokens(inputs, t, t + 1)
        before = state.clone()
        try:
            o_t, state = routed_step(step["q"], step["k"], step["v"], rule=spec.rule, route_idx=step["route_idx"],
                                     route_w=step["route_w"], state=state, g=step["g"], beta=step["beta"],
                                     read_w=step["read_w"], coupling=spec.coupling, scale=spec.scale,
                                     backend=ctx.backend)
        except Exception as e:
            raise LawViolation(f"routed_step(backend={ctx.backend!r}) raised {type(e).__name__} at t={t}: {e}") from e
        if o_t.dtype != inputs["q"].dtype or tuple(o_t.shape) != (B, 1, H, o.shape[-1]):
            raise LawViolation(f"routed_step o at t={t}: got {o_t.dtype} {list(o_t.shape)}, expected "
                               f"{inputs['q'].dtype} {[B, 1, H, o.shape[-1]]}")
        untouched = ~mask[:, t]  # [B,H,m]
        assert_equal(f"state of slots not routed at t={t} (routed_step must touch only the routed slots)",
                     state.detach()[untouched], before[untouched])
        outs.append(o_t)
    assert_close("o, token by token vs routed_scan", torch.cat(outs, 1), o, ctx.tol(dt, "output"))
    assert_close("final state, token by token vs routed_scan", state, S, ctx.tol(dt, "state"))


def varlen(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.4: packed sequences (`cu_seqlens`) equal the same sequences run one by one."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    bounds = inputs["cu_seqlens"].tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = inputs["initial_state"]
        o_n, S_n = scan(ctx, slice_tokens(inputs, bos, eos), initial_state=None if init is None else init[n:n + 1])
        assert_close(f"o of sequence {n} (tokens {bos}:{eos})", o[:, bos:eos], o_n, ctx.tol(dt, "output"))
        assert_close(f"final_state of sequence {n}", S[n:n + 1], S_n, ctx.tol(dt, "state"))


def frozen_slots(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.5: a slot that no token of a sequence routes to keeps its initial state bit for bit."""
    inputs = make_inputs(spec, ctx.device)
    o, S = scan(ctx, inputs)
    _check_result(inputs, o, S)
    H, m = inputs["q"].shape[2], spec.m
    mask = routed_mask(inputs["route_idx"], H, m)  # [B,T,H,m]
    if spec.seqlens is None:
        ever = mask.any(1)  # [N=B,H,m]
    else:
        b = inputs["cu_seqlens"].tolist()
        ever = torch.stack([mask[0, s:e].any(0) for s, e in zip(b[:-1], b[1:])])
    frozen = ~ever
    init = inputs["initial_state"]
    init = torch.zeros_like(S) if init is None else init.to(S.dtype)
    n, h, i = (x.tolist() for x in frozen.nonzero(as_tuple=True))
    assert_equal(f"final states of the slots no token routes to, (sequence, head, slot) in "
                 f"{list(zip(n, h, i))[:8]}", S.detach()[frozen], init[frozen])


def zero_weight(ctx: Context, spec: CaseSpec) -> None:
    """Contract law 6.8: under either coupling, a route of weight 0 is the same as no route; a slot
    that only gets routes of weight 0 keeps its initial state (within tolerance)."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    idx = inputs["route_idx"]
    target = int(idx.flatten()[0])  # a slot that is routed to
    route_w = inputs["route_w"].masked_fill(idx == target, 0.0)
    o, S = scan(ctx, inputs, route_w=route_w)
    init = inputs["initial_state"]
    assert_close(f"final state of slot {target}, whose every route has weight 0 (coupling {spec.coupling!r})",
                 S[:, :, target], init[:, :, target], ctx.tol(dt, "state"))


def relabeling(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.7: permuting slot labels (route_idx and initial states together) permutes the final
    states and leaves o unchanged; permuting the routes of each token changes nothing."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    gen = torch.Generator().manual_seed(spec.seed + 2)
    idx = inputs["route_idx"]
    B, T, Hr, R = idx.shape
    H, m = inputs["q"].shape[2], spec.m
    dev = idx.device

    # Slot labels: slot i of head group h becomes pi[h, i].
    pi = torch.stack([torch.randperm(m, generator=gen) for _ in range(Hr)]).to(dev)  # [Hr, m]
    new_idx = pi[torch.arange(Hr, device=dev)[None, None, :, None], idx]
    pi_h = pi.expand(H, m) if Hr == 1 else pi  # [H, m]

    def relabel(states):  # [N,H,m,K,V] -> new[:, h, pi[h, i]] = states[:, h, i]
        index = pi_h[None, :, :, None, None].expand_as(states)
        return torch.empty_like(states).scatter_(2, index, states)

    init = inputs["initial_state"]
    o2, S2 = scan(ctx, inputs, route_idx=new_idx, initial_state=None if init is None else relabel(init))
    assert_close(f"o after relabeling slots by {pi.tolist()}", o2, o, ctx.tol(dt, "output"))
    assert_close(f"final_state after relabeling slots by {pi.tolist()} (expected the permuted states)",
                 S2, relabel(S), ctx.tol(dt, "state"))

    # Route order: route r of token (b, t, head group) becomes route sigma^-1(r).
    sigma = torch.rand(B, T, Hr, R, generator=gen).argsort(-1).to(dev)
    changes = {n: inputs[n].gather(3, sigma) for n in ("route_idx", "route_w", "read_w") if inputs[n] is not None}
    for n in ("k", "v", "g", "beta"):
        x = inputs[n]
        per_route = x is not None and n in spec.per_route
        if per_route:
            s = sigma.expand(B, T, H, R).reshape(B, T, H, R, *([1] * (x.dim() - 4)))
            changes[n] = x.gather(3, s.expand_as(x))
    o3, S3 = scan(ctx, inputs, **changes)
    assert_close("o after permuting the routes of each token", o3, o, ctx.tol(dt, "output"))
    assert_close("final_state after permuting the routes of each token", S3, S, ctx.tol(dt, "state"))


def nonfinite_inputs(ctx: Context, spec: CaseSpec, poison: Poison) -> None:
    """q, k, v are data, and a non-finite one stays causal: with the entry `poison` (token t of
    sequence n) made NaN or infinite, the outputs of n's tokens before t, and the outputs and final
    states of every other sequence, are those of the same case without it; a non-finite q_t reaches
    o_t only. The value is carried, not dropped: o_t is non-finite, and for k or v so is a part of
    n's final state (as in the float64 reference, which propagates it forward in time)."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    o_p, S_p = scan(ctx, poison.apply(inputs, spec))
    _check_result(inputs, o_p, S_p)
    b, start, end = poison.span(spec)
    t = start + poison.token
    what = f"with {poison.input} = {poison.value} at token {poison.token} of sequence {poison.sequence}"

    others = torch.ones(o.shape[:2], dtype=torch.bool, device=o.device)  # [B,T]: tokens of other sequences
    others[b, start:end] = False
    assert_close(f"o of the other sequences, {what}", o_p[others], o[others], ctx.tol(dt, "output"))
    other_states = [i for i in range(spec.N) if i != poison.sequence]
    assert_close(f"final states of the other sequences, {what}", S_p[other_states], S[other_states],
                 ctx.tol(dt, "state"))
    assert_close(f"o of the tokens before it, {what}", o_p[b, start:t], o[b, start:t], ctx.tol(dt, "output"))
    if torch.isfinite(o_p[b, t]).all():
        raise LawViolation(f"o at the poisoned token is finite, {what}: the non-finite value was dropped, not "
                           f"carried")
    if poison.input == "q":  # q is read, never written: nothing else may change
        assert_close(f"o of the tokens after it, {what}", o_p[b, t + 1:end], o[b, t + 1:end],
                     ctx.tol(dt, "output"))
        assert_close(f"final state of the poisoned sequence, {what}", S_p[poison.sequence], S[poison.sequence],
                     ctx.tol(dt, "state"))
    elif torch.isfinite(S_p[poison.sequence]).all():
        raise LawViolation(f"final state of the poisoned sequence is finite, {what}: the non-finite value was "
                           f"dropped, not carried into the state")


# ------------------------------------------------------------------------------------ backbone reduction

_FLA_NAIVE = {  # rule -> (module, function) of flash-linear-attention's naive recurrent reference
    "mamba2": ("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla"),
    "gla": ("fla.ops.gla.naive", "naive_recurrent_gla"),
    "deltanet": ("fla.ops.delta_rule.naive", "delta_rule_recurrence"),
    "gated_deltanet": ("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule"),
    "kda": ("fla.ops.kda.naive", "naive_recurrent_kda"),
}


def _load_fla_naive(module: str, function: str) -> Callable:
    """fla's naive references are plain torch files. Importing them through `fla` runs fla's whole
    `__init__` (about 13 s on a CPU machine), so unless fla is imported already, the file is loaded on
    its own; if that fails, through the package."""
    if "fla" not in sys.modules:
        spec = importlib.util.find_spec("fla")
        if spec is not None and spec.submodule_search_locations:
            import os
            path = os.path.join(spec.submodule_search_locations[0], *module.split(".")[1:]) + ".py"
            name = "_memplug_testing_" + module.replace(".", "_")
            try:
                if name not in sys.modules:
                    file_spec = importlib.util.spec_from_file_location(name, path)
                    mod = importlib.util.module_from_spec(file_spec)
                    file_spec.loader.exec_module(mod)
                    sys.modules[name] = mod
                return getattr(sys.modules[name], function)
            except Exception:  # fall back to the package import
                sys.modules.pop(name, None)
    return import_object(f"{module}.{function}")


def plain_fm(q, k, v, beta, initial_state=None):
    """The `fm` rule without routing, written out (fla has no reference for it), float32:
    S <- (1 - beta) S + beta k v^T,  o = K**-0.5 S^T q. Layouts as fla: [B,T,H,...], state [B,H,K,V]."""
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float().clone()
    outs = []
    for t in range(T):
        b = beta[:, t, :, None, None]
        S = (1 - b) * S + b * k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(K ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def plain_rule(rule_name, q, k, v, g, beta, initial_state=None):
    """The plain (m = 1) recurrence of any rule from its own single-token update, float32; used for
    rules that have neither an fla reference nor a written-out one."""
    rule = get_rule(rule_name)
    f = lambda x: None if x is None else x.float()
    q, k, v, g, beta = map(f, (q, k, v, g, beta))
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float().clone()
    w = q.new_ones(B, H)
    outs = []
    for t in range(T):
        S = rule.step(S, k[:, t], v[:, t], None if g is None else g[:, t], None if beta is None else beta[:, t], w)
        outs.append(K ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def backbone_reference(rule_name: str) -> str:
    """What the backbone-reduction law compares `rule_name` with."""
    if rule_name in _FLA_NAIVE:
        return "fla " + ".".join(_FLA_NAIVE[rule_name])
    if rule_name == "fm":
        return "memplug.testing.laws.plain_fm (written out; fla has no fm reference)"
    return "memplug.testing.laws.plain_rule (the rule's own update; no fla reference)"


def plain_reference(rule_name, q, k, v, g, beta, initial_state):
    """(o [B,T,H,V], state [B,H,K,V]) of the plain rule, in float32, scale K**-0.5."""
    if rule_name == "fm":
        return plain_fm(q, k, v, beta, initial_state)
    if rule_name not in _FLA_NAIVE:
        return plain_rule(rule_name, q, k, v, g, beta, initial_state)
    fn = _load_fla_naive(*_FLA_NAIVE[rule_name])
    f = lambda x: None if x is None else x.float()
    q, k, v, g, beta, h0 = map(f, (q, k, v, g, beta, initial_state))
    if rule_name in ("mamba2", "gla"):
        return fn(q, k, v, g, initial_state=h0, output_final_state=True)
    if rule_name == "deltanet":  # head-major [B,H,T,...]
        t = lambda x: x.transpose(1, 2).contiguous()
        o, S = fn(t(q), t(k), t(v), t(beta), initial_state=h0, output_final_state=True)
        return o.transpose(1, 2), S
    if rule_name == "kda":
        return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    return fn(q, k, v, beta, g, initial_state=h0, output_final_state=True)  # gated_deltanet


def backbone_reduction(ctx: Context, spec: CaseSpec) -> None:
    """contract law 6.6: m = 1, R = 1, w = 1, coupling "none" equals the plain rule (fla's naive reference,
    float32, so compared at float32 tolerance or the dtype's, whichever is looser)."""
    inputs = make_inputs(spec, ctx.device)
    dt = spec.torch_dtype
    o, S = scan(ctx, inputs)
    one_route = {n: None if inputs[n] is None else (inputs[n][:, :, :, 0] if n in spec.per_route else inputs[n])
                 for n in ("k", "v", "g", "beta")}
    init = inputs["initial_state"]
    o_ref, S_ref = plain_reference(spec.rule, inputs["q"], one_route["k"], one_route["v"], one_route["g"],
                                   one_route["beta"], None if init is None else init[:, :, 0])
    name = backbone_reference(spec.rule)
    f32 = torch.float32
    assert_close(f"o vs {name}", o, o_ref, ctx.tol(dt, "output").looser(ctx.tol(f32, "output")))
    assert_close(f"final_state vs {name}", S[:, :, 0], S_ref, ctx.tol(dt, "state").looser(ctx.tol(f32, "state")))


# ------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Law:
    name: str
    title: str  # how errors name it
    check: Callable
    strategy: Callable  # (ctx, rule, dtypes, **limits) -> strategy of argument tuples for `check` after ctx
    applies: Callable = field(default=lambda ctx, rule: None)  # None, or why the law does not apply


def _one(**kw):
    return lambda ctx, rule, dtypes, **limits: case_specs(rule, dtypes=dtypes, **limits, **kw).map(lambda s: (s,))


@st.composite
def _split_cases(draw, ctx, rule, dtypes, **limits):
    limits["min_T"] = max(2, limits.get("min_T", 2))
    spec = draw(case_specs(rule, dtypes=dtypes, varlen=False, **limits))
    split = draw(st.integers(1, spec.T - 1))
    return spec, split


@st.composite
def _poison_cases(draw, ctx, rule, dtypes, **limits):
    spec = draw(case_specs(rule, dtypes=dtypes, **limits))
    return spec, draw(poisons(spec))


CHUNK_T_RANGE = 16  # the chunk-size law draws T from 2 c + 1 to 2 c + 16 (c: the largest chunk size)


def _chunk_cases(ctx, rule, dtypes, max_T=None, **limits):
    # Longer than two chunks of the largest size offered, so that forward and backward cross chunk
    # boundaries at every size (with max_T, as long as it allows), and one or two slots, so that a
    # slot's tokens span several chunks.
    for always_long in ("max_m", "min_T", "max_B"):
        limits.pop(always_long, None)
    longer = 2 * max(ctx.chunk_sizes) + 1
    min_T, max_T = (longer, longer + CHUNK_T_RANGE - 1) if max_T is None else (min(longer, max_T), max_T)
    return case_specs(rule, dtypes=dtypes, min_T=min_T, max_T=max_T, max_m=2, varlen=False,
                      **limits).map(lambda s: (s,))


def _needs_chunk_size(ctx, rule):
    return None if ctx.chunk_sizes else "the backend declares no chunk sizes (register_backend(chunk_sizes=...))"


LAWS: dict[str, Law] = {law.name: law for law in (
    Law("reference_equality", "reference equality (contract law 6.1)", reference_equality, _one()),
    Law("state_passing", "state passing (contract law 6.2)", state_passing, _split_cases),
    Law("chunk_size", "state passing: chunk size changes nothing (contract law 6.2)", chunk_size, _chunk_cases,
        _needs_chunk_size),
    Law("decode", "decode (contract law 6.3)", decode, _one(varlen=False)),
    Law("varlen", "varlen (contract law 6.4)", varlen, _one(varlen=True)),
    Law("frozen_slots", "frozen slots (contract law 6.5)", frozen_slots, _one(min_unused_slots=1, initial_state=True)),
    Law("backbone_reduction", "backbone reduction (contract law 6.6)", backbone_reduction, _one(backbone=True)),
    Law("relabeling", "relabeling (contract law 6.7)", relabeling, _one(min_m=2)),
    Law("zero_weight", "zero weight is no route (contract law 6.8)", zero_weight, _one(initial_state=True)),
    Law("nonfinite_inputs", "non-finite q, k, v stay causal (contract law 6.9)", nonfinite_inputs, _poison_cases),
)}

# The laws that hold for any rule given its single-token update (`check_rule`).
RULE_LAWS = ("state_passing", "decode", "varlen", "frozen_slots", "relabeling", "zero_weight")
