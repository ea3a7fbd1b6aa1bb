"""The chunked backend: docs/contract.md section 5 in PyTorch operations, the default on CPU.

1. pack: the route entries of each (sequence, head group, slot) become one packed sequence
   (`backends/packing.py`), laid out in chunks of `default_chunk_size` rows (at most
   `CHUNK_SIZE`; a one-slot scan without `cu_seqlens`, not packed, takes `CHUNK_SIZE`), in blocks of about
   `block_rows` rows (`chunking.py`). The blocks are processed one after the other, each from
   gathering its entries' inputs to scattering their outputs, with the slot states carried from one
   to the next, so that no intermediate tensor grows with the sequence length: only the inputs, the
   output and their gradients are that large.
2. couple: the rule maps the block's per-route inputs to its family's form (`memplug.rules`).
3. scan: the family's intra-chunk part (`families.py`), then the shared state pass and output pass
   (`state.py`).
4. combine: route outputs back to tokens, weighted by `read_w`.

With one slot and no `cu_seqlens` (the plain backbone), every packed sequence is a whole sequence in
time order, so steps 1 and 4 reduce to a reshape of the inputs and outputs (`_one_slot_scan`): no
sort, gather, zero fill or scatter, which would otherwise cost as much as the scan itself.

Inputs are computed in float32 (float64 for float64 inputs); gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memplug.checks import check_positive_int, compute_dtype

from ..packing import (gather_parts, gather_routing_parts, mix, pack, place, read_states, scatter_parts, take,
                       write_states)
from .chunking import chunk_layout
from .families import intra_chunk, supports_rule
from .state import chunk_outputs, pass_states

__all__ = ["chunked_scan", "supports_rule", "default_chunk_size", "CHUNK_SIZE", "CHUNK_SIZES", "BLOCK_ELEMENTS",
           "BLOCK_ROWS", "block_rows"]

# Rows per chunk. Any size >= 1 gives the same result up to rounding; tests vary it.
CHUNK_SIZE = 32
# Blocks of chunks processed together (see `chunking.py`) hold about BLOCK_ELEMENTS elements of each
# [rows, heads, width] tensor, width max(K, V): `block_rows`. Any block size gives the same result up to
# rounding; tests set BLOCK_ROWS (rows of one head per block) to cut blocks of a few rows. Why 2^18
# (1 MB in float32): glibc's allocator reuses the memory a block frees for the next block and the next
# call; with 8x larger blocks a call's temporaries (about 30 MB at T = 2048, H = 4, K = V = 64) were
# handed back to the system at its end and page-faulted in again by the next call, up to 5000 faults,
# half the time of a forward on this project's 2-core machine. Smaller blocks cost more per-block
# Python overhead than they save (experiments/results/peers-cpu-2core-2026-12-02.md).
BLOCK_ELEMENTS = 1 << 18
BLOCK_ROWS = None


def block_rows(K: int, V: int) -> int:
    """Rows of one head per block: BLOCK_ROWS if set, else BLOCK_ELEMENTS // max(K, V)."""
    return BLOCK_ROWS if BLOCK_ROWS is not None else max(1, BLOCK_ELEMENTS // max(K, V))


def chunked_scan(args, chunk_size=None):
    """`routed_scan` of validated arguments (a `memplug.ScanArgs`); `chunk_size` defaults to
    `default_chunk_size` of the packing."""
    if args.num_slots == 1 and args.cu_seqlens is None:
        return _one_slot_scan(args, CHUNK_SIZE if chunk_size is None else chunk_size)
    q, k, v, g, beta, rule = args.q, args.k, args.v, args.g, args.beta, args.rule
    dtype = compute_dtype(q)
    K, V = args.K, args.V
    packing = pack(args.route_idx, args.num_slots, q.shape[2], args.cu_seqlens)
    size = default_chunk_size(packing) if chunk_size is None else chunk_size
    # A packed row carries the Hb heads of its head group: a block holds `block_rows` rows of one head.
    chunks = chunk_layout(packing, size, max(1, block_rows(K, V) // packing.Hb))

    parts = [block.entries for block in chunks.blocks]
    decay_dims = 1 if rule.g == "vector" else 0
    gather = lambda x, event_dims: [None] * len(parts) if x is None else gather_parts(x, packing, parts, event_dims)
    inputs = zip(chunks.blocks, gather(q, 1), gather(k, 1), gather(v, 1), gather(g, decay_dims), gather(beta, 0),
                 gather_routing_parts(args.write_weight, parts))
    state = read_states(args.initial_state, packing, chunks.lane_segments, dtype, K, V)  # of every lane
    outputs, finished = [], []
    for block, q_b, k_b, v_b, g_b, beta_b, w_b in inputs:
        num_rows = block.chunks * chunks.size

        def chunked_rows(x):  # [n, Hb, ...] in the block's entry order -> [chunks, Hb, C, ...]
            if x is None:
                return None
            rows = place(x.to(dtype), block.rows, num_rows)
            return rows.unflatten(0, (block.chunks, chunks.size)).transpose(1, 2)

        w_b = w_b.to(dtype).expand(-1, packing.Hb)
        # The coupling is elementwise per route: apply it to the block's entries, then place the
        # results in chunks, whose padding rows stay zero: an identity update whatever the rule.
        coupled = rule.couple(*(None if x is None else x.to(dtype) for x in (k_b, v_b, g_b, beta_b)), w_b)
        form = intra_chunk(rule.family, chunked_rows(q_b), *map(chunked_rows, coupled))
        reads, values, state, done = pass_states(state, form, block.active, block.following)
        out = chunk_outputs(form, reads, values)  # [chunks, Hb, C, V]
        outputs.append(take(out.transpose(1, 2).reshape(num_rows, packing.Hb, V), block.rows))
        finished += done
    o = mix(scatter_parts(outputs, parts, packing), args.read_w.to(dtype) * args.scale, packing).to(q.dtype)
    if not args.output_final_state:
        return o, None
    # Lanes end longest last, so the pieces of final states come in reverse lane order.
    return o, write_states(args.initial_state, packing, chunks.lane_segments, torch.cat(finished[::-1]))


def default_chunk_size(packing) -> int:
    """`CHUNK_SIZE`, or less when the packed sequences are short: every lane is padded to whole
    chunks, and the intra-chunk products grow with the square of the chunk size, so chunks much
    longer than the sequences they hold cost more than they save (at the ablations' shapes, m = 8
    slots of 32-token sequences, about 8 tokens per slot, chunks of 32 rows make a routed layer 1.6x
    slower than chunks of 16). The size is the power of two at or above the mean packed length, at
    least 8. The number of packed sequences is known on the host once packed: no extra sync."""
    mean = -(-packing.entries.numel() // max(1, packing.segments.numel()))
    return min(CHUNK_SIZE, max(8, 1 << (mean - 1).bit_length()))


def _one_slot_scan(args, chunk_size):
    """`chunked_scan` at one slot without `cu_seqlens`: the same chunks, lanes and blocks as the
    packed layout (lane b is sequence b with all H heads, every lane as long as the sequence), as
    views of the inputs padded to whole chunks. The padding rows are zero: identity updates, as in
    the packed layout. With one route, o_t = read_w_t * scale * (what q_t reads), and what q_t reads
    is linear in q_t, so the read weight scales the queries instead of the outputs."""
    check_positive_int("chunk_size", chunk_size)
    q, rule = args.q, args.rule
    dtype = compute_dtype(q)
    B, T, H, K = q.shape
    V = args.V
    Hr = args.route_w.shape[2]
    steps = -(-T // chunk_size)

    def step_major(x, event_dims):  # [B,T,H,(R=1),...] -> a view [steps, B, H, C, ...]
        if x is None:
            return None
        x = x.to(dtype).reshape(B, T, H, *x.shape[x.dim() - event_dims:])
        if steps * chunk_size > T:
            x = F.pad(x, (0, 0) * event_dims + (0, 0, 0, steps * chunk_size - T))
        x = x.unflatten(1, (steps, chunk_size))  # [B, steps, C, H, ...]
        return x.permute(1, 0, 3, 2, *range(4, x.dim()))

    def per_head(w):  # [B,T,Hr,1] -> [steps, B, H, C], contiguous
        return step_major(w.to(dtype).expand(B, T, Hr, H // Hr), 0).contiguous()

    # The weights come in the chunk layout first: elementwise results take the memory order of their
    # first operand, so `w * k` and `read_weight * q` copy k and q into the chunk layout as they multiply.
    w = per_head(args.write_weight)
    read_weight = per_head(args.read_w * args.scale)[..., None]
    inputs = [step_major(x, dims) for x, dims in ((q, 1), (args.k, 1), (args.v, 1),
                                                 (args.g, 1 if rule.g == "vector" else 0), (args.beta, 0))]
    state = (torch.zeros(B, H, K, V, dtype=dtype, device=q.device) if args.initial_state is None
             else args.initial_state[:, :, 0].to(dtype))
    # Blocks of whole steps, about `block_rows` rows of one head each, as `chunk_layout` cuts them.
    per_block = max(1, block_rows(K, V) // H // (B * chunk_size))
    outputs, finished = [], []
    for first in range(0, steps, per_block):
        last = min(first + per_block, steps)
        q_b, k_b, v_b, g_b, beta_b = (None if x is None else x[first:last] for x in inputs)
        coupled = rule.couple(k_b, v_b, g_b, beta_b, w[first:last])
        rows = lambda x: None if x is None else x.flatten(0, 1).contiguous()  # [chunks, H, C, ...]
        form = intra_chunk(rule.family, rows(read_weight[first:last] * q_b), *map(rows, coupled))
        reads, values, state, done = pass_states(state, form, [B] * (last - first), B if last < steps else 0)
        out = chunk_outputs(form, reads, values)  # [(last - first) * B, H, C, V]
        outputs.append(out.unflatten(0, (last - first, B)).permute(1, 0, 3, 2, 4))  # [B, steps, C, H, V]
        finished += done
    # One copy into token order, the blocks' outputs joined as they are permuted; contiguous like every
    # backend's output (a second copy only where the sequences were padded).
    o = torch.cat(outputs, 1).flatten(1, 2)[:, :T]
    return o.to(q.dtype).contiguous(), (torch.cat(finished[::-1]).unsqueeze(2) if args.output_final_state else None)


# Declared when registered: the law kit (`memplug.testing`) checks that these sizes give the same result.
CHUNK_SIZES = (1, 5, 16, 32, 64)
