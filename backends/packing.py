"""Pack and combine (docs/contract.md section 5, steps 2 and 5), shared by the fast backends.

Vocabulary:

- a *route entry* is one (token, head group, route) triple. Entries are numbered in the layout of
  `route_idx [B,T,Hr,R]` flattened: `e = ((b*T + t)*Hr + hr)*R + r`, so E = B*T*Hr*R entries in all.
- a *head group* is the set of heads that share one routing: with per-head routing (Hr = H) a group is
  one head; with shared routing (Hr = 1) it is all H heads. Every packed row carries the Hb = H // Hr
  heads of its group, so shared routing is packed once and broadcast across heads.
- a *segment* is one (sequence, head group, slot) with id `(n*Hr + hr)*m + slot`. Its packed
  sequence holds the entries routed to that slot, in time order. By default only segments that
  receive tokens are packed: empty slots cost nothing, and the work is proportional to the E entries,
  not to m. (`pack(..., every_segment=True)` keeps the empty ones too, for static sizes.)

`pack` computes the packing once, with one sort, and no Python loop over tokens or slots. A backend
then brings its inputs into its packed layout: into route-entry order (`per_entry`) and then into
rows (`place`, possibly padded), or with one gather straight into the unpadded packed order
(`pack_rows`); the coupling is elementwise per route, so it can be applied in either order. It runs
a variable-length scan over the packed sequences (`Packing.offsets` are their cu_seqlens), reads
and writes the slot states with `read_states` / `write_states`, and mixes the route outputs back
into tokens: those in the packed order are entry `e`'s at row `Packing.positions[e]` (the Triton
backend reads them there in its combine kernel). A backend that works part by part (some packed
sequences at a time) gathers and scatters each part's entries instead (`gather_parts`,
`gather_routing_parts`, `scatter_parts`, then `mix`). How the scan is computed (chunked PyTorch, a
kernel, ...) and whether the layout has padding is the backend's business.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from memplug.modules import sequence_positions


@dataclass(frozen=True)
class Packing:
    """Route entries grouped by segment. S is the number of packed segments: the non-empty ones, or
    all N*Hr*m (`pack(..., every_segment=True)`)."""

    entries: torch.Tensor  # [E] entry ids in packed order: by segment id, then by time
    offsets: torch.Tensor  # [S+1] where each packed segment starts in `entries` (its cu_seqlens)
    segments: torch.Tensor  # [S] increasing ids of the packed segments
    B: int
    T: int
    H: int
    Hr: int
    R: int
    m: int
    N: int  # sequences: B, or len(cu_seqlens) - 1

    @property
    def Hb(self) -> int:
        """Heads per head group."""
        return self.H // self.Hr

    @property
    def lengths(self) -> torch.Tensor:
        """[S] tokens in each packed segment."""
        return self.offsets.diff()

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """[E] place of each entry (in entry order) in the packed order: the inverse of `entries`
        (computed once per packing)."""
        positions = torch.empty_like(self.entries)
        positions[self.entries] = torch.arange(self.entries.numel(), device=self.entries.device)
        return positions


def pack(route_idx: torch.Tensor, num_slots: int, num_heads: int,
         cu_seqlens: Optional[torch.Tensor] = None, every_segment: bool = False) -> Packing:
    """Group the route entries of `route_idx [B,T,Hr,R]` by segment, in time order within each.

    `every_segment`: keep all N*Hr*m segments, the empty ones as empty packed sequences, so every
    size is known from the shapes alone and nothing is read back to the host (the Triton backend,
    whose kernels pass over an empty sequence at no cost); otherwise only the non-empty ones (their
    number is read back: one host sync on a GPU)."""
    B, T, Hr, R = route_idx.shape
    device = route_idx.device
    if cu_seqlens is None:
        N = B
        sequence = torch.arange(B, device=device).repeat_interleave(T)  # [B*T]
    else:  # B = 1: token t belongs to the sequence whose range holds it
        N = cu_seqlens.numel() - 1
        sequence, _ = sequence_positions(cu_seqlens, T)
    group = sequence[:, None] * Hr + torch.arange(Hr, device=device)  # [B*T, Hr]
    segment = (group[..., None] * num_slots + route_idx.reshape(B * T, Hr, R)).flatten()  # [E]
    # A stable sort keeps entry order, which is time order, within each segment.
    segment_sorted, entries = torch.sort(segment, stable=True)
    if every_segment:
        segments = torch.arange(N * Hr * num_slots, device=device)
        offsets = torch.searchsorted(segment_sorted, torch.arange(segments.numel() + 1, device=device))
    else:
        segments, lengths = torch.unique_consecutive(segment_sorted, return_counts=True)
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return Packing(entries, offsets, segments, B=B, T=T, H=num_heads, Hr=Hr, R=R, m=num_slots, N=N)


def per_entry(x: torch.Tensor, p: Packing, event_dims: int) -> torch.Tensor:
    """A per-token input in route-entry order, `[E, Hb, *event]`.

    `x` is `[B,T,H,*event]` (shared by the routes of a token: repeated per route) or
    `[B,T,H,R,*event]` (one per route), with `event_dims` trailing event dimensions.
    """
    event = x.shape[x.dim() - event_dims:]
    tokens = p.B * p.T
    if x.dim() == 3 + event_dims:
        x = x.reshape(tokens, p.Hr, 1, p.Hb, *event).expand(tokens, p.Hr, p.R, p.Hb, *event)
    else:
        x = x.reshape(tokens, p.Hr, p.Hb, p.R, *event).transpose(2, 3)
    return x.reshape(p.B * p.T * p.Hr * p.R, p.Hb, *event)


class _Place(torch.autograd.Function):
    """`out[rows[e]] = x[e]` in `num_rows` zero rows. Each row receives at most one entry, so the
    backward is a gather, not an atomic scatter-add."""

    @staticmethod
    def forward(ctx, x, rows, num_rows):
        ctx.save_for_backward(rows)
        return x.new_zeros(num_rows, *x.shape[1:]).index_copy_(0, rows, x)

    @staticmethod
    def backward(ctx, grad):
        rows, = ctx.saved_tensors
        return _Take.apply(grad, rows), None, None


class _Take(torch.autograd.Function):
    """`out[e] = x[rows[e]]` for distinct `rows`: the adjoint of `_Place`."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        rows, = ctx.saved_tensors
        return _Place.apply(grad, rows, ctx.num_rows), None


class _GatherRoutes(torch.autograd.Function):
    """`out[i] = x[entries[i] // R]`: the token row of every packed route entry. A token's R routes
    read the same row, so the backward brings the gradient into entry order (a gather through the
    inverse permutation, `positions`) and sums each token's R routes, instead of an atomic scatter-add."""

    @staticmethod
    def forward(ctx, x, entries, positions, R):
        ctx.save_for_backward(positions)
        ctx.R = R
        return x.index_select(0, entries // R)

    @staticmethod
    def backward(ctx, grad):
        positions, = ctx.saved_tensors
        by_entry = grad.index_select(0, positions)
        return by_entry.view(-1, ctx.R, *grad.shape[1:]).sum(1), None, None, None


def pack_rows(x: torch.Tensor, p: Packing, event_dims: int) -> torch.Tensor:
    """A per-token input (as `per_entry` takes it) in the packed order, `[E, Hb, *event]`, with one
    gather: neither the R-fold copy of `per_entry` nor the zero fill and scatter of `place`."""
    event = x.shape[x.dim() - event_dims:]
    if x.dim() == 3 + event_dims:  # shared by the routes: every route entry reads its token's row
        return _GatherRoutes.apply(x.reshape(p.B * p.T * p.Hr, p.Hb, *event), p.entries, p.positions, p.R)
    return take(per_entry(x, p, event_dims), p.entries)


def place(x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Entries `x [E, ...]` at rows `rows [E]` (distinct) of a zero tensor `[num_rows, ...]`: the
    packed layout of a backend. `rows = p.positions, num_rows = E` is the unpadded packed order."""
    return _Place.apply(x, rows, num_rows)


def take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x[rows]` for distinct `rows [n]`, with a gather (not a scatter-add) as its backward."""
    return _Take.apply(x, rows)


# Part-wise gather and scatter. A backend that works on the packed sequences part by part (a block
# of them at a time) reads and writes only each part's entries: no tensor as large as all the
# entries is made on the way, in the forward pass or the backward pass.

# Their backward passes are torch operations that autograd records under `create_graph=True`, so the
# chunked backend has gradients of every order.

class _GatherParts(torch.autograd.Function):
    """`source` rows `index` for each index tensor; the backward adds every part's gradient into
    one gradient of `source` (indices may repeat: the routes of a token read the same row)."""

    @staticmethod
    def forward(ctx, source, *indices):
        ctx.save_for_backward(*indices)
        ctx.source_shape = source.shape
        return tuple(source.index_select(0, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads):
        grad_source = grads[0].new_zeros(ctx.source_shape)
        for index, grad in zip(ctx.saved_tensors, grads):
            if grad is not None:
                grad_source.index_add_(0, index, grad)
        return (grad_source, *[None] * len(grads))


class _ScatterParts(torch.autograd.Function):
    """Parts of route outputs, `out_i [n_i, ...]` for entries `parts[i]`, into one tensor in entry
    order `[E, ...]` (entries no part holds are zero)."""

    @staticmethod
    def forward(ctx, num_entries, parts, *outs):
        ctx.parts = parts
        routes = outs[0].new_zeros(num_entries, *outs[0].shape[1:])
        for entries, out in zip(parts, outs):
            routes.index_copy_(0, entries, out)
        return routes

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *[grad.index_select(0, entries) for entries in ctx.parts])


def gather_parts(x: torch.Tensor, p: Packing, parts: list, event_dims: int) -> list:
    """A per-token input (see `per_entry`) at the route entries of each part: `[len(part), Hb, *event]`
    for each entry-id tensor in `parts`."""
    event = x.shape[x.dim() - event_dims:]
    if x.dim() == 3 + event_dims:  # shared by the routes: entry e reads the row of its token and group
        source = x.reshape(p.B * p.T * p.Hr, p.Hb, *event)
        return list(_GatherParts.apply(source, *[entries // p.R for entries in parts]))
    return list(_GatherParts.apply(per_entry(x, p, event_dims), *parts))


def gather_routing_parts(w: torch.Tensor, parts: list) -> list:
    """A routing tensor `[B,T,Hr,R]` at the route entries of each part: `[len(part), 1]`, the last
    dimension broadcasting over the heads of the group."""
    return list(_GatherParts.apply(w.reshape(-1, 1), *parts))


def scatter_parts(outs: list, parts: list, p: Packing) -> torch.Tensor:
    """Route outputs given part by part (`outs[i]` for the entries `parts[i]`) in entry order
    `[E, Hb, V]`, ready for `mix`."""
    return _ScatterParts.apply(p.B * p.T * p.Hr * p.R, parts, *outs)


def mix(routes: torch.Tensor, read_w: torch.Tensor, p: Packing) -> torch.Tensor:
    """Token outputs `[B,T,H,V]` from route outputs `routes [E, Hb, V]` in entry order:
    `o_t = sum_r read_w[t,r] * routes[t,r]`, a weighted sum in the entry layout (deterministic, no
    atomic scatter-add)."""
    V = routes.shape[-1]
    weights = read_w.reshape(p.B * p.T, p.Hr, p.R).to(routes.dtype)
    o = torch.einsum("ngrhv,ngr->nghv", routes.view(p.B * p.T, p.Hr, p.R, p.Hb, V), weights)
    return o.reshape(p.B, p.T, p.H, V)



def _split_segments(p: Packing, segments: torch.Tensor):
    """Segment ids -> (sequence, head group, slot)."""
    slot = segments % p.m
    group = segments // p.m
    return group // p.Hr, group % p.Hr, slot


def read_states(initial_state: Optional[torch.Tensor], p: Packing, segments: torch.Tensor,
                dtype: torch.dtype, K: int, V: int) -> torch.Tensor:
    """Initial states `[len(segments), Hb, K, V]` of the given segments, in `dtype` (zeros if
    `initial_state [N,H,m,K,V]` is None). Reads only those segments' slots."""
    if initial_state is None:
        return torch.zeros(segments.numel(), p.Hb, K, V, dtype=dtype, device=segments.device)
    n, group, slot = _split_segments(p, segments)
    states = initial_state.reshape(p.N, p.Hr, p.Hb, p.m, K, V)
    return states[n, group, :, slot].to(dtype)


def write_states(initial_state: Optional[torch.Tensor], p: Packing, segments: torch.Tensor,
                 states: torch.Tensor) -> torch.Tensor:
    """Final states `[N,H,m,K,V]`: `states [len(segments), Hb, K, V]` at the given segments, and the
    initial state (zeros if None) copied unchanged, bit for bit, everywhere else."""
    K, V = states.shape[-2:]
    if initial_state is None:
        base = states.new_zeros(p.N, p.Hr, p.Hb, p.m, K, V)
    else:
        base = initial_state.to(states.dtype).reshape(p.N, p.Hr, p.Hb, p.m, K, V)
    n, group, slot = _split_segments(p, segments)
    # index_put takes no slice between indices: put the heads of the group last among the indexed.
    final = base.permute(0, 1, 3, 2, 4, 5).index_put((n, group, slot), states)
    return final.permute(0, 1, 3, 2, 4, 5).reshape(p.N, p.H, p.m, K, V)
