"""The state pass and the output pass, shared by every family (see `families.py` for the form).

Chunks arrive step-major, a block of steps at a time (see `chunking.py`): step j holds chunk j of
the `active[j]` lanes that have one, and those lanes are the first `active[j]` of the running
states. The state pass is the only sequential part: one batched update per step, so its length is
the number of chunks of the longest packed sequence, not the number of tokens.
"""
from __future__ import annotations

import torch

from .families import ChunkForm, finite_split


def pass_states(state: torch.Tensor, form: ChunkForm, active: list, following: int):
    """Run the running states through the chunks of some steps.

    state `[active[0],h,K,V]`: the state of each lane entering the first step. `following`: the
    lanes that go on after the last step. Returns what each chunk's queries read from the state
    entering it, (q_t exp(A_t))^T S_0 `[chunks,h,C,V]`; the effective values of each chunk
    `[chunks,h,C,V]` (d = u - w S_0); the states of the `following` lanes after the last step; and
    the final states of the lanes that end here, as a list of pieces for ever lower lanes. The reads
    are one batched product over the block's chunks, after the loop, of the states entering them
    gathered into one tensor `[chunks*h,K,V]` (a block's worth: `chunking.py` bounds it); one small
    product per step cost more in call overhead than the whole pass's arithmetic at CPU sizes.
    """
    h = state.shape[1]
    # Heads join the lanes (3-d batched products); tensors are split into steps once, not sliced
    # per step, and finished lanes are split off the running states, so that autograd's backward
    # of the pass stays linear in the chunks.
    sizes = [lanes * h for lanes in active]
    steps = lambda x: x.flatten(0, 1).split(sizes)
    decay = steps(form.decay)
    if form.w is None:  # additive: the chunk's write does not depend on the state, batch it
        writes = steps(form.k.transpose(-1, -2) @ form.u)
    else:
        u, w, k = steps(form.u), steps(form.w), steps(form.k)
    entering, values, finished = [], [], []
    state = state.flatten(0, 1)
    for j, size in enumerate(sizes):
        entering.append(state)
        if form.w is None:
            state = torch.addcmul(writes[j], decay[j], state)
        else:
            d = torch.baddbmm(u[j], w[j], state, alpha=-1)
            values.append(d)
            state = torch.baddbmm(decay[j] * state, k[j].transpose(-1, -2), d)
        # Lanes with exactly this many chunks end here; they are the tail of the running lanes. (Most
        # steps end none: no split then, whose few operations a step cost as much as its update.)
        still = sizes[j + 1] if j + 1 < len(sizes) else following * h
        if still < size:
            state, done = state.split([still, size - still])
            finished.append(done.unflatten(0, (-1, h)))
    unflat = lambda x: x.unflatten(0, (-1, h))
    values = form.u if form.w is None else unflat(torch.cat(values))
    reads = torch.bmm(form.q.flatten(0, 1), torch.cat(entering))
    return unflat(reads), values, unflat(state), finished


def chunk_outputs(form: ChunkForm, reads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """o_t = (q_t exp(A_t))^T S_0 + sum_{s<=t} exp(A_t - A_s) (q_t.k_s) d_s, for every chunk at once:
    `[Nc,h,C,V]`, from the reads of the entering states and the effective values.

    `attn @ d` would multiply a non-finite d_s by the zeros above the diagonal into every row t < s;
    the product takes the finite part of d, and row t adds the non-finite entries of d_1 .. d_t (their
    cumulative sum, NaN or inf in those columns from row s on, 0 elsewhere)."""
    flat = lambda x: x.flatten(0, 1)
    safe, bad = finite_split(values)
    base = reads if bad is None else reads + bad.cumsum(-2)
    return torch.baddbmm(flat(base), flat(form.attn), flat(safe)).unflatten(0, reads.shape[:2])
