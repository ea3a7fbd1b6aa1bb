"""The functional core (docs/contract.md section 4): `routed_scan` over a sequence, `routed_step` for decoding."""
from __future__ import annotations

import torch

from .checks import check_scan, compute_dtype
from .registry import check_backend_name, resolve_scan, resolve_step
from .rules import get_rule


def routed_scan(q, k, v, *, rule, route_idx, route_w, num_slots, g=None, beta=None, read_w=None,
                coupling="dt", scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None, backend="auto", check_values=True):
    """Routed sparse-state scan: every head owns `num_slots` states; each token updates the `R` slots
    named by `route_idx` with `rule` and reads them back, mixed by `read_w` (default `route_w`).

    Shapes (docs/contract.md section 2): q `[B,T,H,K]`; k `[B,T,H,K]` or `[B,T,H,R,K]`; v `[B,T,H,V]` or
    `[B,T,H,R,V]`; g `[B,T,H]` / `[B,T,H,K]` (or per route); beta `[B,T,H]` (or per route);
    route_idx, route_w, read_w `[B,T,Hr,R]` with Hr 1 or H; initial_state `[N,H,m,K,V]`;
    cu_seqlens `[N+1]` with B = 1.

    Returns `o [B,T,H,V]` in the dtype of q and, if `output_final_state`, the final states
    `[N,H,m,K,V]` in float32 (float64 for float64 inputs).

    Argument checks (docs/contract.md section 7): types, shapes, dtypes and devices always; with
    `check_values` (the default) also the values: slot indices in range and distinct within a
    token, weights finite and >= 0, g finite and <= 0, beta finite in [0, 1], the rule's own
    check (fm: route_w * beta <= 1), and cu_seqlens strictly increasing from 0 to T. Value checks
    read tensors back to the host (a sync on a GPU); a caller whose inputs satisfy them by
    construction, as the layers' do, passes `check_values=False`, and then breaking them is
    undefined (no error, no guarantee).

    Non-finite values: a NaN or inf in g, beta, route_w or read_w raises ValueError (with
    `check_values`). q, k and v are data and are not checked (that would cost a pass over them): a NaN or
    inf in them is carried by the recurrence forward in time only, as the float64 reference carries
    it. At token t of sequence n it never reaches the outputs of n's tokens before t, nor the outputs
    or final states of other sequences (batch rows, or packed sequences of `cu_seqlens`), and a
    non-finite q_t reaches o_t only. Nor is it dropped: o_t is non-finite, and for k or v so are the
    final states of the slots token t writes and the outputs of later tokens that read them (NaN or
    inf, which one is unspecified). The law `nonfinite_inputs` of `memplug.testing` checks the
    causal part, and that o_t and n's final state are non-finite, on every backend. Gradients are
    not covered: the reference's own autograd multiplies zero cotangents by NaN, so a non-finite q,
    or a delta rule's k, makes gradients of earlier tokens NaN there too.

    Gradients of every order (double backward: `torch.autograd.grad(..., create_graph=True)` then
    differentiated again) on the `reference` and `chunked` backends; `triton` has first-order
    gradients only, and a gradient taken with `create_graph=True` raises a RuntimeError that says so.
    """
    args = check_scan(q, k, v, rule=get_rule(rule), route_idx=route_idx, route_w=route_w, num_slots=num_slots, g=g,
                      beta=beta, read_w=read_w, coupling=coupling, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens, check_values=check_values)
    if torch.compiler.is_compiling():  # one opaque op in the graph; the backend is resolved when it runs
        from .ops import scan_op
        check_backend_name(backend)
        o, final = scan_op(*op_arguments(args), backend)
        return o, (final if output_final_state else None)
    return resolve_scan(backend, args)(args)


def routed_step(q, k, v, *, rule, route_idx, route_w, state, g=None, beta=None, read_w=None,
                coupling="dt", scale=None, backend="auto", check_values=True):
    """One decoding step: the inputs of `routed_scan` with T = 1 and `state [B,H,m,K,V]`
    (float32, or float64 for float64 inputs). Updates only the routed slots, in place where the
    backend can; returns `(o [B,1,H,V], state)`. With `check_values=False` it reads no tensor value
    back to the host (on the built-in backends), so a decode loop runs without host syncs."""
    _check_tensor_state(state)
    args = check_scan(q, k, v, rule=get_rule(rule), route_idx=route_idx, route_w=route_w, num_slots=state.shape[2],
                      g=g, beta=beta, read_w=read_w, coupling=coupling, scale=scale, initial_state=state,
                      output_final_state=True, cu_seqlens=None, check_values=check_values, state_name="state",
                      one_token=True)
    wanted = compute_dtype(q)
    if state.dtype != wanted:
        raise TypeError(f"state: expected dtype {wanted} for q of dtype {q.dtype}, got {state.dtype}")
    if torch.compiler.is_compiling():
        check_backend_name(backend)
        inputs = (q, k, v, g, beta, route_w, args.read_w, state)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
            # Recorded by autograd: the functional scan over one token, which returns a new state.
            from .ops import scan_op
            return scan_op(*op_arguments(args), backend)
        from .ops import step_op
        return step_op(*op_arguments(args)[:9], args.rule.name, coupling, args.scale, backend), state
    return resolve_step(backend, args)(args)


def op_arguments(args) -> tuple:
    """`args` as the leading arguments of the custom ops in `memplug.ops` (tensors, then plain values)."""
    return (args.q, args.k, args.v, args.route_idx, args.route_w, args.read_w, args.g, args.beta, args.initial_state,
            args.cu_seqlens, args.rule.name, args.num_slots, args.coupling, args.scale, args.output_final_state)


def _check_tensor_state(state):
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state: expected a torch.Tensor, got {type(state).__name__}")
    if state.dim() != 5:
        raise ValueError(f"state: expected shape [B, H, m, K, V], got {list(state.shape)}")
