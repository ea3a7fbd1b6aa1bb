"""The chunked backend: docs/contract.md section 5 in PyTorch operations, the default on CPU.

1. pack: the route entries of each (sequence, head group, slot) become one packed sequence
   (`backends/packing.py`), laid out in chunks of `CHUNK_SIZE` rows, in blocks of about
   `BLOCK_ROWS` rows (`chunking.py`). The blocks are processed one after the other, each from
   gathering its entries' inputs to scattering their outputs, with the slot states carried from one
   to the next, so that no intermediate tensor grows with the sequence length: only the inputs, the
   output and their gradients are that large.
2. couple: the rule maps the block's per-route inputs to its family's form (`memplug.rules`).
3. scan: the family's intra-chunk part (`families.py`), then the shared state pass and output pass
   (`state.py`).
4. combine: route outputs back to tokens, weighted by `read_w`.

Inputs are computed in float32 (float64 for float64 inputs); gradients come from autograd.
"""
from __future__ import annotations

import torch

from memplug.checks import compute_dtype

from ..packing import (gather_parts, gather_routing_parts, mix, pack, place, read_states, scatter_parts, take,
                       write_states)
from .chunking import chunk_layout
from .families import intra_chunk, supports_rule
from .state import chunk_outputs, pass_states

__all__ = ["chunked_scan", "supports_rule", "CHUNK_SIZE", "BLOCK_ROWS"]

# Rows per chunk, and rows (of one head) per block of chunks processed together (see `chunking.py`).
# Any sizes >= 1 give the same result up to rounding; tests vary them.
CHUNK_SIZE = 32
BLOCK_ROWS = 1 << 15


def chunked_scan(q, k, v, *, rule, route_idx, route_w, num_slots, g, beta, read_w, coupling, scale,
                 initial_state, output_final_state, cu_seqlens, chunk_size=None):
    """`routed_scan` with validated inputs (see `memplug.register_backend`); `chunk_size` defaults
    to the module's `CHUNK_SIZE`."""
    dtype = compute_dtype(q)
    K, V = q.shape[-1], v.shape[-1]
    packing = pack(route_idx, num_slots, q.shape[2], cu_seqlens)
    # A packed row carries the Hb heads of its head group: a block holds BLOCK_ROWS rows of one head.
    chunks = chunk_layout(packing, CHUNK_SIZE if chunk_size is None else chunk_size,
                          max(1, BLOCK_ROWS // packing.Hb))

    parts = [block.entries for block in chunks.blocks]
    decay_dims = 1 if rule.g == "vector" else 0
    gather = lambda x, event_dims: [None] * len(parts) if x is None else gather_parts(x, packing, parts, event_dims)
    inputs = zip(chunks.blocks, gather(q, 1), gather(k, 1), gather(v, 1), gather(g, decay_dims), gather(beta, 0),
                 gather_routing_parts(route_w, parts))
    state = read_states(initial_state, packing, chunks.lane_segments, dtype, K, V)  # of every lane
    outputs, finished = [], []
    for block, q_b, k_b, v_b, g_b, beta_b, w_b in inputs:
        num_rows = block.chunks * chunks.size

        def chunked_rows(x):  # [n, Hb, ...] in the block's entry order -> [chunks, Hb, C, ...]
            if x is None:
                return None
            rows = place(x.to(dtype), block.rows, num_rows)
            return rows.unflatten(0, (block.chunks, chunks.size)).transpose(1, 2)

        w_b = (w_b.to(dtype) if coupling == "dt" else torch.ones_like(w_b, dtype=dtype)).expand(-1, packing.Hb)
        # The coupling is elementwise per route: apply it to the block's entries, then place the
        # results in chunks, whose padding rows stay zero: an identity update whatever the rule.
        coupled = rule.couple(*(None if x is None else x.to(dtype) for x in (k_b, v_b, g_b, beta_b)), w_b)
        form = intra_chunk(rule.family, chunked_rows(q_b), *map(chunked_rows, coupled))
        reads, values, state, done = pass_states(state, form, block.active, block.following)
        out = chunk_outputs(form, reads, values)  # [chunks, Hb, C, V]
        outputs.append(take(out.transpose(1, 2).reshape(num_rows, packing.Hb, V), block.rows))
        finished += done
    o = mix(scatter_parts(outputs, parts, packing), read_w.to(dtype) * scale, packing).to(q.dtype)
    if not output_final_state:
        return o, None
    # Lanes end longest last, so the pieces of final states come in reverse lane order.
    return o, write_states(initial_state, packing, chunks.lane_segments, torch.cat(finished[::-1]))


# The law kit (`memplug.testing`) checks that these chunk sizes give the same result.
chunked_scan.chunk_sizes = (1, 5, 16, 32, 64)
