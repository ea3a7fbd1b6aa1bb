"""The Triton backend: docs/contract.md section 5 with Triton kernels, the default of `backend="auto"` on CUDA.

1. pack: `backends/packing.py` (one sort) groups the route entries of each (sequence, head group,
   slot) into one packed sequence, empty ones included, so that every size follows from the shapes
   and nothing is read back to the host; every input is gathered into packed rows `[E, Hb, ...]`
   with one gather (E = B*T*Hr*R route entries, Hb heads per head group). Work from here on is
   proportional to R*T (an empty packed sequence costs its state kernels' programs only their
   initial and final states).
2. couple: the rule's `couple` runs in PyTorch on the packed rows (decays and weights in float32),
   as in the chunked backend, so autograd carries gradients through the coupling into route_w, g and
   beta, and a new rule of an existing family needs no new kernel. One slot with one routing for all
   heads (the plain rule) skips the sort and the gathers: its packed order is the token order.
3. scan: one chunked variable-length scan per family over all packed sequences at once
   (`function.ChunkScan`); chunks of BT rows never span two packed sequences. The state kernels read
   the initial slot states and write the final ones in place, in the `[N, H, m, K, V]` layout.
4. combine: two kernels (`combine.py`) mix the route outputs back into tokens with `read_w`, reading
   the packed rows in place, and take the gradient back (one slot with one routing: a product with
   `read_w`, or the output kernel weighs its rows itself).

Kernel inventory (forward / backward; "all" = every family):

    chunk.cumsum_kernel          all: chunk-local cumulative log-decays / their reverse sum
    chunk.state_fwd_kernel       all: inter-chunk state pass (delta: also d = u - w S_0)
    chunk.output_fwd_kernel      all: output pass (computes M for scalar or no decay)
    chunk.dd_local_kernel        all (bwd): output pass backward into the effective values
    chunk.state_bwd_kernel       all (bwd): state pass backward
    chunk.grad_kernel            all (bwd): gradients of q, k, decays (scalar decay: with M's part)
    vector.attention_fwd_kernel  per-channel decay (gla, kda): intra-chunk attention (kda: also of the keys)
    vector.attention_bwd_kernel  per-channel decay (bwd)
    delta.wy_fwd_kernel          delta, delta_vector (deltanet, gated_deltanet, kda): WY/UT transform
                                 (fwd; bwd recompute)
    delta.wy_bwd_kernel          delta, delta_vector (bwd)
    combine.combine_fwd_kernel   routed: route outputs into tokens, weighted by read_w / their gradients
    combine.combine_bwd_kernel
    decode.step_kernel           all: `routed_step`, the R routed slots of each head updated in place

Scalar-decay rules (mamba2, fm) use only the shared kernels. Backward passes recompute the states
entering each chunk (and the delta family's u, w from the stored T) rather than storing them.
No kernel holds a whole [BT, K] tile where ptxas spilled registers for it: the output pass, its
backward into d, the gradient kernel (one program per block of keys), the WY kernels and the
per-channel attention forward take the keys `common.KEY_BLOCK` columns at a time (64; 32 for
float32, whose products hold split copies of their operands; 16 for float32 in the WY kernels,
which also hold [BT, BT] float32 tiles: `delta.wy_key_block`); the state kernels take a chunk's
rows 16 at a time where a [BT, K] tile is over 16 KB (float32 at K = 128, 16-bit at K = 256:
`common.row_sub_block`); the cumulative sum of a per-channel decay takes 64 channels per program.
What ptxas makes of each kernel: `compile_check.py`.
Dtypes: float32 (products as "tf32x3": about float32 accuracy on tensor cores), float16 and bfloat16
(tensor-core products, float32 accumulation, decays and states); float64 is left to the other
backends. The key width K is limited to 256 (one block of the state per program), declared to the
registry (`triton_supports`): "auto" runs wider keys on the chunked backend, and asking for `triton`
by name with them is an error that says so. The kernels run on CPU tensors in Triton's interpreter when
`TRITON_INTERPRET=1` is set before the backend's first call (for tests; "auto" never picks it on CPU).
`cost_model.py` models what every kernel launch moves and computes (`memplug bench --model`).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..layout import routes_per_head, rule_inputs_per_route
from ..packing import Packing, pack, pack_rows, per_entry, take

# Rows per chunk. Each of CHUNK_SIZES gives the same result (up to rounding); tests vary it. (Powers
# of two >= 16 for the products; at most 64 for the delta family's blockwise WY inverse.)
CHUNK_SIZES = (16, 32, 64)
CHUNK_SIZE = 64
MAX_K = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (CPU) rather than compiling them. The kernel
    modules are imported on first use, so the variable may be set any time before that."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """Triton is installed and can run: on a CUDA GPU, or in its interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreting() or torch.cuda.is_available()


def triton_priority() -> dict:
    """Priority under `backend="auto"`: first on CUDA; on CPU (Triton's interpreter only) below every
    other backend, so that "auto" never picks the interpreter."""
    return {"cuda": 20, "cpu": -10}


def _check_device(q) -> None:
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("backend 'triton' runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before the first call (tests do), or pass CUDA tensors")


def triton_supports(args) -> Optional[str]:
    """The shapes the kernels take (declared to the registry): K up to `MAX_K`, one block of keys."""
    return None if args.K <= MAX_K else f"K = {args.K} > {MAX_K}, the widest key block of its kernels"


def triton_scan(args, chunk_size=None):
    """`routed_scan` of validated arguments (a `memplug.ScanArgs`) that `triton_supports` takes.
    `chunk_size`: rows per chunk, one of `CHUNK_SIZES` (default `CHUNK_SIZE`)."""
    BT = CHUNK_SIZE if chunk_size is None else chunk_size
    if BT not in CHUNK_SIZES or not isinstance(BT, int):
        raise ValueError(f"chunk_size: backend 'triton' takes one of {CHUNK_SIZES}, got {chunk_size!r}")
    q, k, v, g, beta, rule = args.q, args.k, args.v, args.g, args.beta, args.rule
    route_idx, cu_seqlens, initial_state = args.route_idx, args.cu_seqlens, args.initial_state
    if q.dtype not in DTYPES:
        raise TypeError(f"q: backend 'triton' takes dtypes {DTYPES}, got {q.dtype}")
    _check_device(q)
    K, V = args.K, args.V
    from .combine import Combine
    from .function import chunk_scan, varlen_chunks

    dt = q.dtype
    f32 = torch.float32
    B, T, H = q.shape[:3]
    # One slot and one routing for all heads (the plain rule): the packed order is the token order, so
    # nothing is sorted, gathered or scattered.
    identity = args.num_slots == 1 and route_idx.shape[2] == 1
    if identity:
        packing = _token_order_packing(B, T, H, cu_seqlens, q.device)
    else:  # every segment, the empty ones too: every size follows from the shapes, with no host sync
        packing = pack(route_idx, args.num_slots, H, cu_seqlens, every_segment=True)
    E, Hb = packing.entries.numel(), packing.Hb

    def packed(x, event_dims, dtype=f32):  # [E, Hb, ...] in the packed order
        if x is None:
            return None
        rows = per_entry(x, packing, event_dims) if identity else pack_rows(x, packing, event_dims)
        return rows.to(dtype)

    weights = args.write_weight.reshape(-1, 1)  # [E, 1] in entry order, shared by the heads of a group
    w = (weights if identity else take(weights, packing.entries)).expand(E, Hb).to(f32)
    vector = rule.family.decay == "vector"
    # The coupling is elementwise per route: apply it in the packed order, to rows gathered once. Decays,
    # write strengths and weights are float32; k and v keep their dtype (float16/bfloat16 promote to
    # float32 where they meet a float32 weight, and pass through uncopied where the coupling leaves them alone).
    c = rule.couple(packed(k, 1, k.dtype), packed(v, 1, v.dtype), packed(g, 1 if rule.g == "vector" else 0),
                    packed(beta, 0), w)
    a = None if c.a is None else c.a.expand(*((E, Hb, K) if vector else (E, Hb))).to(f32).contiguous()
    b = c.b.expand(E, Hb).to(f32).contiguous() if rule.family.delta else None
    qp = packed(q, 1, dt).contiguous()
    kp = c.k.expand(E, Hb, K).to(dt).contiguous()
    vp = c.v.expand(E, Hb, V).to(dt).contiguous()

    # The packed sequences are every (sequence, head group, slot) in order: the kernels read and write
    # the slot states [N,H,m,K,V] in place.
    h0 = None if initial_state is None else initial_state.to(f32).contiguous()
    layout = varlen_chunks(packing.offsets, E, BT, length=T if identity and cu_seqlens is None else None)
    # A read weight no gradient reaches (the plain rule's constant 1) is applied in the output kernel,
    # which then writes the final output; otherwise the output is weighted here, where autograd sees it.
    fold = identity and not (torch.is_grad_enabled() and args.read_w.requires_grad)
    read_w = args.read_w.reshape(E).to(f32).contiguous() if fold else None
    out, final = chunk_scan(qp, kp, vp, a, b, h0, layout, args.scale, args.output_final_state, read_w,
                            slots=args.num_slots)
    if fold:
        o = out.view(B, T, H, V)
    elif identity:
        o = (out.view(B, T, H, V) * args.read_w.reshape(B, T, 1, 1).to(f32)).to(dt)
    else:
        o = Combine.apply(out, args.read_w, packing.positions, dt)
    return o, None if final is None else final.view(packing.N, H, args.num_slots, K, V)


def _token_order_packing(B: int, T: int, H: int, cu_seqlens, device) -> Packing:
    """What `pack` returns for one slot and one routing shared by the heads (m = R = Hr = 1), built
    without sorting: every sequence is one segment, its entries in token order."""
    E = B * T
    offsets = torch.arange(0, E + 1, T, device=device) if cu_seqlens is None else cu_seqlens.to(torch.int64)
    N = offsets.numel() - 1
    return Packing(torch.arange(E, device=device), offsets, torch.arange(N, device=device), B=B, T=T, H=H, Hr=1,
                   R=1, m=1, N=N)


def triton_step_supports(args) -> Optional[str]:
    """The decode steps the kernel takes (declared to the registry; the reference step runs the
    others, touching only the routed slots too)."""
    tensors = [x for x in (args.q, args.k, args.v, args.g, args.beta, args.route_w, args.read_w, args.initial_state)
               if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return "autograd records the step, and the decode kernel has no backward"
    return triton_supports(args)


def triton_step(args):
    """`routed_step` of validated arguments (a `memplug.ScanArgs`) that `triton_step_supports`
    takes: the decode kernel updates the R routed slots of each head of the state in place."""
    q, k, v, g, beta, rule, state = args.q, args.k, args.v, args.g, args.beta, args.rule, args.initial_state
    K, V = args.K, args.V
    _check_device(q)
    import triton

    from .common import block, specialization
    from .decode import step_kernel

    f32 = torch.float32
    B, _, H, _ = q.shape
    R = args.R
    ks, vs, gs, bs = rule_inputs_per_route(rule, k, v, g, beta, R)  # [B,1,H,R,...]
    w = routes_per_head(args.write_weight, H).to(f32)
    cast = lambda x: None if x is None else x.to(f32)
    c = rule.couple(cast(ks), cast(vs), cast(gs), cast(bs), w)
    first = lambda x, *event: None if x is None else x.expand(B, 1, H, R, *event)[:, 0].to(f32).contiguous()
    decay, is_delta = specialization(None if c.a is None else rule.family.decay, rule.family.delta)
    a = None if c.a is None else (first(c.a, K) if decay == 2 else first(c.a))
    idx = routes_per_head(args.route_idx, H)[:, 0].contiguous()
    rw = routes_per_head(args.read_w, H)[:, 0].to(f32).contiguous()
    o = q.new_empty(B, H, V, dtype=f32)
    grid = lambda meta: (B * H, triton.cdiv(V, meta["BV"]))
    s_b, s_h, s_m, s_k, s_v = state.stride()
    step_kernel[grid](state=state, q=q[:, 0].contiguous(), k=first(c.k, K), v=first(c.v, V), a=a,
                      b=first(c.b) if is_delta else None, idx=idx, read_w=rw, o=o, s_b=s_b, s_h=s_h, s_m=s_m,
                      s_k=s_k, s_v=s_v, H=H, scale=args.scale, R=R, K=K, V=V, BK=block(K), DECAY=decay,
                      DELTA=is_delta)
    return o[:, None].to(q.dtype), state
