"""The chunked variable-length scan of one rule family as a `torch.autograd.Function` whose forward
and backward run the Triton kernels.

Inputs are the packed, coupled rows `[E, Hb, ...]` (see `backends/triton/__init__.py`): q, k `[E,Hb,K]`
and v `[E,Hb,V]` in the dot dtype (float32, float16 or bfloat16), the per-row log-decay a (`[E,Hb]`,
`[E,Hb,K]` or None) and write strength b (`[E,Hb]`, delta family, or None) in float32, and the
initial states (float32, or None) of the S packed sequences `offsets`, in the slot states' layout
(`chunk_scan`).

Forward: chunk-local cumulative decays -> (per-channel decay: intra-chunk attention) -> (delta: WY
transform; with a per-channel decay its L from the keys' own intra-chunk attention) -> state pass ->
output pass. Backward recomputes the states entering each chunk (and,
for the delta family, u and w from the stored T) instead of storing them, then runs the output pass
backward (dd_local), the state pass backward, the shared gradient kernel, the family's intra-chunk
backward (attention or WY) and the reverse chunk-local cumulative sum for the decays. That backward is
not differentiable again: asked for a graph of the gradients (`create_graph=True`), it raises
`HIGHER_ORDER_ERROR`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton

from . import chunk, delta, vector
from .common import DECAY_FLOOR, block, key_block, row_sub_block, specialization


class VarlenChunks(NamedTuple):
    """Chunks of BT rows over the packed sequences `offsets` (their cu_seqlens); no chunk spans two
    sequences. Chunk c is (sequence, chunk within it) = chunk_indices[c]; the chunks of sequence s
    are chunk_offsets[s] ... chunk_offsets[s + 1] - 1. Every size is known from the shapes alone (no
    host sync): `num_chunks` is an upper bound on the real chunks, and the chunks past the real ones
    lie past the last sequence's end, so their programs return at once."""

    offsets: torch.Tensor  # [S+1] int64
    chunk_indices: torch.Tensor  # [num_chunks, 2] int32
    chunk_offsets: torch.Tensor  # [S+1] int64
    num_chunks: int
    BT: int

    @property
    def num_sequences(self) -> int:
        return self.offsets.numel() - 1


def max_chunks(rows: int, sequences: int, BT: int, length: Optional[int] = None) -> int:
    """The most chunks of BT rows that `rows` rows in `sequences` packed sequences can take: each
    non-empty sequence (at most min(sequences, rows) of them) adds at most BT - 1 padding rows.
    With `length`, every sequence has that many rows (one slot, no cu_seqlens): exactly that."""
    if length is not None:
        return sequences * -(-length // BT)
    return (rows + min(sequences, rows) * (BT - 1)) // BT


def varlen_chunks(offsets: torch.Tensor, rows: int, BT: int, length: Optional[int] = None) -> VarlenChunks:
    """The chunks of `rows` packed rows in the sequences `offsets` (`offsets[-1] == rows`); `length`:
    the rows of every sequence, where the shapes say it (`max_chunks`)."""
    device = offsets.device
    S = offsets.numel() - 1
    NT = max_chunks(rows, S, BT, length)
    counts = (offsets.diff() + BT - 1) // BT
    chunk_offsets = F.pad(counts.cumsum(0), (1, 0))
    chunk = torch.arange(NT, device=device)
    # Chunks past the real ones map to the last sequence, past its end.
    sequence = torch.searchsorted(chunk_offsets[1:], chunk, right=True).clamp_(max=S - 1)
    within = chunk - chunk_offsets[sequence]
    chunk_indices = torch.stack([sequence, within], 1).to(torch.int32).contiguous()
    return VarlenChunks(offsets.contiguous(), chunk_indices, chunk_offsets.contiguous(), NT, BT)


def _cumsum(x, layout: VarlenChunks, reverse: bool):
    D = 1 if x.dim() == 2 else x.shape[-1]
    y = torch.empty_like(x, dtype=torch.float32)
    BD = chunk.channel_block(D)
    chunk.cumsum_kernel[(layout.num_chunks, x.shape[1], triton.cdiv(D, BD))](
        x=x, y=y, chunk_indices=layout.chunk_indices, offsets=layout.offsets, Hb=x.shape[1], D=D, BD=BD,
        BT=layout.BT, REVERSE=reverse, FLOOR=DECAY_FLOOR)
    return y


def _attention(q, k, A, layout: VarlenChunks):
    """M [E,Hb,BT] float32: sum_c q_tc k_sc exp(A_tc - A_sc) for s <= t within each chunk, else 0."""
    E, Hb, K = q.shape
    M = q.new_zeros(E, Hb, layout.BT, dtype=torch.float32)
    vector.attention_fwd_kernel[(layout.num_chunks, Hb, layout.BT // vector.BC)](
        q=q, k=k, A=A, M=M, chunk_indices=layout.chunk_indices, offsets=layout.offsets, Hb=Hb, K=K, BT=layout.BT,
        BK=block(K), BKW=key_block(block(K), k.dtype), BC=vector.BC)
    return M


def _attention_bwd(q, k, A, dM, dq, dk, dA, layout: VarlenChunks):
    """(dq, dk, dA) with the gradients through `_attention(q, k, A)` from dM added."""
    E, Hb, K = q.shape
    dq2, dk2, dA2 = torch.empty_like(dq), torch.empty_like(dk), torch.empty_like(dA)
    vector.attention_bwd_kernel[(layout.num_chunks, Hb, layout.BT // vector.BC)](
        q=q, k=k, A=A, dM=dM, dq_in=dq, dk_in=dk, dA_in=dA, dq=dq2, dk=dk2, dA=dA2, chunk_indices=layout.chunk_indices,
        offsets=layout.offsets, Hb=Hb, K=K, BT=layout.BT, BK=block(K), BC=vector.BC)
    return dq2, dk2, dA2


def _wy(k, v, b, A, Lk, T, layout: VarlenChunks, decay: int, compute_T: bool):
    E, Hb, K = k.shape
    u, w = torch.empty_like(v), torch.empty_like(k)
    delta.wy_fwd_kernel[(layout.num_chunks, Hb)](
        k=k, v=v, b=b, A=A, Lk=Lk, T=T, u=u, w=w, chunk_indices=layout.chunk_indices, offsets=layout.offsets, Hb=Hb,
        K=K, V=v.shape[-1], BT=layout.BT, BK=block(K), BKW=delta.wy_key_block(block(K), k.dtype), DECAY=decay,
        COMPUTE_T=compute_T)
    return u, w


def _states(k, v, w, A, h0, layout: VarlenChunks, slots: int, decay: int, is_delta: bool, store_ht: bool):
    """States entering every chunk [NT,Hb,K,V] (dot dtype), effective values d (delta) and final
    states [S/slots, Hb, slots, K, V] (float32, if `store_ht`)."""
    E, Hb, K = k.shape
    V = v.shape[-1]
    S = layout.num_sequences
    hs = k.new_empty(layout.num_chunks, Hb, K, V)
    d = torch.empty_like(v) if is_delta else None
    ht = k.new_empty(S // slots, Hb, slots, K, V, dtype=torch.float32) if store_ht else None
    BT, BK = layout.BT, block(K)
    grid = lambda meta: (S * Hb, triton.cdiv(V, meta["BV"]))
    chunk.state_fwd_kernel[grid](
        k=k, v=v, w=w, A=A, h0=h0, hs=hs, d_out=d, ht=ht, offsets=layout.offsets, chunk_offsets=layout.chunk_offsets,
        Hb=Hb, SLOTS=slots, K=K, V=V, BT=BT, BS=row_sub_block(BT, BK, k.dtype), BK=BK, DECAY=decay, DELTA=is_delta)
    return hs, d, ht


HIGHER_ORDER_ERROR = ("memplug: backend 'triton' has first-order gradients only: its backward runs Triton kernels, "
                      "which autograd cannot differentiate again, so it cannot build the graph that create_graph=True "
                      "asks for. For higher-order gradients use backend='chunked' or backend='reference'")


class ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, h0, layout: VarlenChunks, slots: int, scale: float, output_final_state: bool,
                read_w=None):
        E, Hb, K = q.shape
        V = v.shape[-1]
        BT, NT = layout.BT, layout.num_chunks
        decay, is_delta = specialization(None if a is None else ("scalar" if a.dim() == 2 else "vector"), b is not None)
        A = None if a is None else _cumsum(a, layout, reverse=False)
        M = Lk = T = u = w = None
        if decay == 2:
            M = _attention(q, k, A, layout)
            Lk = _attention(k, k, A, layout) if is_delta else None
        if is_delta:
            T = q.new_empty(E, Hb, BT)  # in the dot dtype: every use casts it to that
            u, w = _wy(k, v, b, A, Lk, T, layout, decay, compute_T=True)
        hs, d, ht = _states(k, u if is_delta else v, w, A, h0, layout, slots, decay, is_delta, output_final_state)
        # Weighted by a constant read weight in the kernel, o is final: in the input dtype.
        o = q.new_empty(E, Hb, V, **({} if read_w is not None else dict(dtype=torch.float32)))
        grid = lambda meta: (NT * triton.cdiv(V, meta["BV"]), Hb)
        chunk.output_fwd_kernel[grid](
            q=q, k=k, d=d if is_delta else v, A=A, M=M, hs=hs, read_w=read_w, o=o, chunk_indices=layout.chunk_indices,
            offsets=layout.offsets, scale=scale, Hb=Hb, K=K, V=V, BT=BT, BKW=key_block(block(K), k.dtype), DECAY=decay)

        ctx.save_for_backward(q, k, v, A, b, h0, T, M, Lk, read_w)
        ctx.layout, ctx.slots, ctx.scale, ctx.decay, ctx.is_delta = layout, slots, scale, decay, is_delta
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        # Autograd enables grad mode in a backward only under create_graph=True. Raising here, rather
        # than marking the backward `once_differentiable`, is what makes every attempt fail loudly:
        # `once_differentiable` hangs its error on detached copies of the gradients, which have no path
        # to the inputs, so a second torch.autograd.grad returns None (or, where the coupling and
        # combine in PyTorch give another path, a partial sum) without an error.
        if torch.is_grad_enabled():
            raise RuntimeError(HIGHER_ORDER_ERROR)
        q, k, v, A, b, h0, T, M, Lk, read_w = ctx.saved_tensors
        layout, slots, scale, decay, is_delta = ctx.layout, ctx.slots, ctx.scale, ctx.decay, ctx.is_delta
        E, Hb, K = q.shape
        V = v.shape[-1]
        BT, NT, S = layout.BT, layout.num_chunks, layout.num_sequences
        BK = block(K)
        BKW = key_block(BK, k.dtype)  # key columns per block, in the kernels that take them so
        idx = dict(chunk_indices=layout.chunk_indices, offsets=layout.offsets)
        # With `read_w`, o was weighted by its row's read weight: the kernels that read dO weigh it too.
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()

        u = w = None
        if is_delta:
            u, w = _wy(k, v, b, A, None, T, layout, decay, compute_T=False)
        hs, d, _ = _states(k, u if is_delta else v, w, A, h0, layout, slots, decay, is_delta, False)
        d = d if is_delta else v

        # float32, not the input dtype: the state pass adds K dS to it before dd's one rounding. In bf16
        # it would save 2 bytes per value (by the model, 1.02x -> 0.98x fla's bytes at one slot) for a
        # second rounding of every dv; the byte goal is met without it.
        dd_local = q.new_empty(E, Hb, V, dtype=torch.float32)
        grid = lambda meta: (NT * triton.cdiv(V, meta["BV"]), Hb)
        chunk.dd_local_kernel[grid](q=q, k=k, A=A, M=M, do=do, read_w=read_w, dd_local=dd_local, **idx, scale=scale,
                                    Hb=Hb, K=K, V=V, BT=BT, BKW=BKW, DECAY=decay)

        dhs = k.new_empty(NT, Hb, K, V)
        dd = q.new_empty(E, Hb, V)  # in the dot dtype: every consumer casts it to that, or returns it as dv
        want_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dh0 = torch.empty_like(h0) if want_dh0 else None
        grid = lambda meta: (S * Hb, triton.cdiv(V, meta["BV"]))
        chunk.state_bwd_kernel[grid](
            q=q, k=k, w=w, A=A, do=do, read_w=read_w, dd_local=dd_local, dht=dht, dhs=dhs, dd=dd, dh0=dh0,
            offsets=layout.offsets, chunk_offsets=layout.chunk_offsets, scale=scale, Hb=Hb, SLOTS=slots, K=K, V=V,
            BT=BT, BS=row_sub_block(BT, BK, k.dtype), BK=BK, DECAY=decay, DELTA=is_delta)

        f32 = dict(dtype=torch.float32)
        # Gradients in the dot dtype where they are final (they are returned in it), in float32 where a
        # later kernel adds to them: the per-channel attention (dq, dk) and the WY backward (dk).
        dq = q.new_empty(E, Hb, K, **(f32 if decay == 2 else {}))
        dk = q.new_empty(E, Hb, K, **(f32 if decay == 2 or is_delta else {}))
        NK = triton.cdiv(K, BKW)
        # A scalar decay's dA is summed over the key channels: each key block stores its share.
        dA = None if A is None else torch.empty_like(A) if decay == 2 else A.new_empty(E, Hb, NK)
        dM = q.new_empty(E, Hb, BT, **f32) if decay == 2 else None
        dw = q.new_empty(E, Hb, K) if is_delta else None  # its consumer casts it to the dot dtype
        chunk.grad_kernel[(NT * NK, Hb)](
            q=q, k=k, d=d, A=A, hs=hs, dhs=dhs, do=do, read_w=read_w, dd=dd, dq=dq, dk=dk, dA=dA, dM=dM, dw=dw, **idx,
            scale=scale, Hb=Hb, K=K, V=V, BT=BT, BKW=BKW, DECAY=decay, DELTA=is_delta)
        if decay == 1:
            dA = dA.sum(-1) if NK > 1 else dA.squeeze(-1)
        if decay == 2:
            dq, dk, dA = _attention_bwd(q, k, A, dM, dq, dk, dA, layout)
        db = None
        if is_delta:
            dk2 = q.new_empty(E, Hb, K, **(f32 if decay == 2 else {}))
            dA2 = None if dA is None else torch.empty_like(dA)
            dv = q.new_empty(E, Hb, V)
            db = q.new_empty(E, Hb, **f32)
            dLk = q.new_empty(E, Hb, BT, **f32) if decay == 2 else None
            delta.wy_bwd_kernel[(NT, Hb)](
                k=k, v=v, b=b, A=A, Lk=Lk, T=T, dd=dd, dw=dw, dk_in=dk, dA_in=dA, dk=dk2, dv=dv, db=db, dA=dA2, dLk=dLk,
                **idx, Hb=Hb, K=K, V=V, BT=BT, BKW=delta.wy_key_block(BK, k.dtype), DECAY=decay)
            dk, dA = dk2, dA2
            if decay == 2:  # Lk is the keys' attention with themselves: its gradient reaches k on both sides
                dk_as_q, dk, dA = _attention_bwd(k, k, A, dLk, torch.zeros_like(dk), dk, dA, layout)
                dk = dk + dk_as_q
        else:
            dv = dd
        da = None if dA is None else _cumsum(dA, layout, reverse=True)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), da, db, dh0, None, None, None, None, None)


def chunk_scan(q, k, v, a, b, h0, layout: VarlenChunks, scale: float, output_final_state: bool, read_w=None,
               slots: int = 1):
    """(o [E,Hb,V], final states or None). o is scaled, in float32; with `read_w [E]` (float32,
    constant: no gradient reaches it) o is also weighted by it, in the input dtype. The states of the
    S packed sequences, initial `h0` (float32, or None) and final (float32), are `[S/slots, Hb,
    slots, K, V]`: packed sequence s is slot s % slots of the group s // slots, as the slot states
    `[N, H, m, K, V]` of a routed scan hold them (`slots` = m), so both are read and written in place."""
    return ChunkScan.apply(q, k, v, a, b, h0, layout, slots, scale, output_final_state, read_w)
