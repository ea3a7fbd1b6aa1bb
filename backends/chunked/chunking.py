"""Lay the packed sequences out in chunks of `size` rows, ready for batched matrix products.

Every packed sequence (a segment, see `backends/packing.py`) starts a new chunk, so no chunk mixes
two segments; the rows after a segment's last token are padding (identity updates). A segment of L
tokens takes ceil(L / size) chunks; its state runs through them in a *lane*. Lanes are ordered by
their number of chunks, longest first.

Chunks are stored *step-major*: first chunk 0 of every lane, then chunk 1 of every lane that has
one, and so on. The state pass, which must visit a lane's chunks in order, then handles step j as one
batched operation on a contiguous run of chunks: those of the `active[j]` longest lanes, whose
states are a prefix of the running states. Its length is the number of chunks of the longest lane.

The steps are cut into *blocks* of about `block_rows` rows, which the backend processes one after
the other, carrying the running states from block to block: that bounds the size of every
temporary tensor whatever the sequence length, which keeps them in cache and in the allocator's
reusable memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memplug.checks import check_positive_int

from ..packing import Packing


@dataclass(frozen=True)
class Block:
    """A run of steps. Its chunks are numbered from 0, and so are its rows."""

    chunks: int
    active: list  # active[j]: lanes in the block's step j, a prefix of the running lanes
    following: int  # lanes in the step after the block (0 after the last)
    entries: torch.Tensor  # [n] the route entries in the block
    rows: torch.Tensor  # [n] the row (chunk * size + offset) holding each of them


@dataclass(frozen=True)
class Chunks:
    """The chunked layout: chunks of `size` rows, in blocks of steps."""

    size: int
    lane_segments: torch.Tensor  # [S] segment id of each lane
    blocks: list  # [Block], in order


def chunk_layout(p: Packing, size: int, block_rows: int) -> Chunks:
    for name, value in (("chunk_size", size), ("block_rows", block_rows)):
        check_positive_int(name, value)
    device = p.entries.device
    lengths = p.lengths
    num_chunks, lane_order = torch.sort((lengths + size - 1) // size, descending=True, stable=True)
    lane_of_segment = torch.empty_like(lane_order)
    lane_of_segment[lane_order] = torch.arange(lane_order.numel(), device=device)
    # active[j]: lanes with more than j chunks; step j starts at chunk step_start[j].
    active = torch.bincount(num_chunks).flip(0).cumsum(0).flip(0)[1:]
    step_start = F.pad(active.cumsum(0), (1, 0))

    # A step joins the block in which its first row falls.
    _, block_of_step, steps_per_block = torch.unique_consecutive(step_start[:-1] * size // block_rows,
                                                                 return_inverse=True, return_counts=True)
    first_step = F.pad(steps_per_block.cumsum(0), (1, 0))
    block_first_chunk = step_start[first_step]  # [blocks + 1]

    # Packed entry i is token `offset` of its segment: chunk `offset // size` of that segment's lane.
    segment_rank = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    offset = torch.arange(p.entries.numel(), device=device) - p.offsets[segment_rank]
    step = offset // size
    row = (step_start[step] + lane_of_segment[segment_rank]) * size + offset % size
    # Entries grouped by block, in row order; rows counted from the block's first row.
    order = torch.argsort(row)
    block = block_of_step[step[order]]
    rows = row[order] - block_first_chunk[block] * size
    per_block = torch.bincount(block, minlength=steps_per_block.numel()).tolist()
    entries, rows = p.entries[order].split(per_block), rows.split(per_block)

    active, first_step, block_first_chunk = active.tolist(), first_step.tolist(), block_first_chunk.tolist()
    blocks = [Block(block_first_chunk[b + 1] - block_first_chunk[b], active[first_step[b]:first_step[b + 1]],
                    active[first_step[b + 1]] if first_step[b + 1] < len(active) else 0, entries[b], rows[b])
              for b in range(len(per_block))]
    return Chunks(size, p.segments[lane_order], blocks)
