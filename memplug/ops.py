"""`routed_scan` and `routed_step` as `torch.library` custom ops, for `torch.compile`.

Under `torch.compile`, `memplug.routed_scan` / `routed_step` put one opaque op into the graph
(`memplug::routed_scan`, `memplug::routed_step`) instead of tracing a backend's packing, which
depends on the routing's values. In eager mode they call the backend directly, so these ops add
nothing there. The ops take arguments already checked and resolved by `routed_scan` (rule and
backend by registered name, `scale` a float, `read_w` a tensor).

- `routed_scan`: functional; returns `o` and the final states (an empty tensor unless
  `output_final_state`). Its backward is another opaque op, `memplug::routed_scan_backward`, which
  runs the backend's forward again under autograd and differentiates it: first-order gradients
  only (a compiled graph cannot be differentiated twice through it; eager mode can).
- `routed_step`: updates the routed slots of `state` in place and returns `o` (decoding). A step
  that autograd must record runs as `routed_scan` over one token instead (see `memplug.scan`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .checks import ScanArgs, compute_dtype
from .registry import resolve_scan, resolve_step
from .rules import get_rule

# The differentiable inputs of routed_scan, in the order the backward op returns their gradients.
DIFFERENTIABLE = ("q", "k", "v", "route_w", "read_w", "g", "beta", "initial_state")


def _autograd_keys():
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set() - outside


# A custom op's implementation runs with autograd's dispatch keys excluded; the backward op lifts
# that exclusion to differentiate the backend's forward.
_AUTOGRAD_KEYS = _autograd_keys()


def _recording():
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS)


def _backend_scan(q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens, rule, num_slots,
                  coupling, scale, output_final_state, backend):
    # The op's arguments were checked by `routed_scan` before it put the op into the graph.
    args = ScanArgs(q, k, v, get_rule(rule), route_idx, route_w, read_w, g, beta, num_slots, coupling, scale,
                    initial_state, output_final_state, cu_seqlens)
    return resolve_scan(backend, args)(args)


@torch.library.custom_op("memplug::routed_scan", mutates_args=())
def scan_op(q: Tensor, k: Tensor, v: Tensor, route_idx: Tensor, route_w: Tensor, read_w: Tensor,
            g: Optional[Tensor], beta: Optional[Tensor], initial_state: Optional[Tensor],
            cu_seqlens: Optional[Tensor], rule: str, num_slots: int, coupling: str, scale: float,
            output_final_state: bool, backend: str) -> tuple[Tensor, Tensor]:
    o, final = _backend_scan(q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens, rule,
                             num_slots, coupling, scale, output_final_state, backend)
    return o.contiguous(), (final.contiguous() if final is not None else q.new_empty(0, dtype=compute_dtype(q)))


def _final_shape(q, v, num_slots, cu_seqlens):
    B, _, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (N, H, num_slots, K, v.shape[-1])


@scan_op.register_fake
def _(q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens, rule, num_slots, coupling, scale,
      output_final_state, backend):
    o = q.new_empty(*q.shape[:3], v.shape[-1])
    shape = _final_shape(q, v, num_slots, cu_seqlens) if output_final_state else (0,)
    return o, q.new_empty(shape, dtype=compute_dtype(q))


@torch.library.custom_op("memplug::routed_scan_backward", mutates_args=())
def scan_backward_op(grad_o: Tensor, grad_final: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                     route_idx: Tensor, route_w: Tensor, read_w: Tensor, g: Optional[Tensor],
                     beta: Optional[Tensor], initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                     rule: str, num_slots: int, coupling: str, scale: float, backend: str,
                     needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of the inputs named in `DIFFERENTIABLE` (an empty tensor for those not needed)."""
    inputs = dict(q=q, k=k, v=v, route_w=route_w, read_w=read_w, g=g, beta=beta, initial_state=initial_state)
    wanted = {n: x.detach().requires_grad_() for (n, x), need in zip(inputs.items(), needs) if need}
    inputs.update(wanted)
    with _recording(), torch.enable_grad():
        o, final = _backend_scan(inputs["q"], inputs["k"], inputs["v"], route_idx, inputs["route_w"],
                                 inputs["read_w"], inputs["g"], inputs["beta"], inputs["initial_state"], cu_seqlens,
                                 rule, num_slots, coupling, scale, grad_final is not None, backend)
        outputs, cotangents = [o], [grad_o]
        if grad_final is not None:
            outputs.append(final)
            cotangents.append(grad_final)
        grads = torch.autograd.grad(outputs, list(wanted.values()), cotangents, allow_unused=True)
    by_name = dict(zip(wanted, grads))
    result = []
    for name, x in zip(DIFFERENTIABLE, (q, k, v, route_w, read_w, g, beta, initial_state)):
        grad = by_name.get(name)
        if grad is None:
            grad = q.new_empty(0) if x is None or name not in wanted else torch.zeros_like(x)
        # Contiguous, as the fake implementation says: a compiled graph's views rely on the strides.
        result.append(grad.contiguous())
    return result


@scan_backward_op.register_fake
def _(grad_o, grad_final, q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens, rule, num_slots,
      coupling, scale, backend, needs):
    xs = (q, k, v, route_w, read_w, g, beta, initial_state)
    return [x.new_empty(x.shape) if need and x is not None else q.new_empty(0) for x, need in zip(xs, needs)]


def _setup_context(ctx, inputs, output):
    (q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens, rule, num_slots, coupling, scale,
     output_final_state, backend) = inputs
    ctx.save_for_backward(q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens)
    ctx.options = (rule, num_slots, coupling, scale, output_final_state, backend)


def _backward(ctx, grad_o, grad_final):
    q, k, v, route_idx, route_w, read_w, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
    rule, num_slots, coupling, scale, output_final_state, backend = ctx.options
    # needs_input_grad follows the op's arguments; the differentiable ones are at these positions.
    positions = (0, 1, 2, 4, 5, 6, 7, 8)
    needs = [bool(ctx.needs_input_grad[i]) for i in positions]
    grads = scan_backward_op(grad_o, grad_final if output_final_state else None, q, k, v, route_idx, route_w,
                             read_w, g, beta, initial_state, cu_seqlens, rule, num_slots, coupling, scale, backend,
                             needs)
    grads = [grad if need else None for grad, need in zip(grads, needs)]
    gq, gk, gv, gw, gr, gg, gb, gs = grads
    return gq, gk, gv, None, gw, gr, gg, gb, gs, None, None, None, None, None, None, None


scan_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("memplug::routed_step", mutates_args=("state",))
def step_op(q: Tensor, k: Tensor, v: Tensor, route_idx: Tensor, route_w: Tensor, read_w: Tensor,
            g: Optional[Tensor], beta: Optional[Tensor], state: Tensor, rule: str, coupling: str, scale: float,
            backend: str) -> Tensor:
    args = ScanArgs(q, k, v, get_rule(rule), route_idx, route_w, read_w, g, beta, state.shape[2], coupling, scale,
                    state, True, None)
    o, new_state = resolve_step(backend, args)(args)
    if new_state is not state:  # a backend that returns a new state: the op's contract is in place
        state.copy_(new_state)
    return o


@step_op.register_fake
def _(q, k, v, route_idx, route_w, read_w, g, beta, state, rule, coupling, scale, backend):
    return q.new_empty(*q.shape[:3], v.shape[-1])
