"""Pieces every kernel of the Triton backend uses.

- `specialization`, `SPECIALIZATIONS`: the kernels' family switches (DECAY, DELTA).
- `autotune_or_first(configs, key)`: `triton.autotune` on a GPU; under the interpreter
  (`TRITON_INTERPRET=1`, no driver to time configurations on), or with MEMPLUG_TRITON_AUTOTUNE=0,
  the first configuration, fixed; `fitting_state_tiles`: the configurations a launch's K rules out.
- `chunk_rows`, `sequence_span`, `row_block`, `tile`, `lower_mask`: the index arithmetic every
  kernel starts with: where a chunk (or a packed sequence) starts and how many of its rows are real,
  the chunk's rows, the offsets and mask of a block of a row-major matrix, the causal masks.
- `exp_nonpos`: `exp` of an argument that is <= 0 wherever the result is used. Decays are only ever
  exponentiated as differences of chunk-local cumulative sums that are <= 0 (a later cumulative sum
  minus an earlier one); on masked-out entries (above the causal diagonal, past a sequence's end)
  the difference can be positive, and clamping it at 0 keeps those entries finite, so a mask applied
  afterwards never meets an `inf * 0`.
- `split_finite`, `poison_from`: products over a chunk's rows whose factor is zero above the causal
  diagonal (M d, T (b v), ...) would carry a non-finite row s into every row, as 0 * NaN = NaN.
  Non-finite q, k, v are data and must reach rows t >= s only (see `memplug.routed_scan`): the
  product takes the finite part of the operand, and the rows from the first non-finite one of each
  column on are then set to NaN.
- `helper`: how those small device functions are declared.
- `mm` / `mma`: `tl.dot` with fp32 accumulation; fp32 operands as "tf32x3" (about fp32 accuracy on
  tensor cores; the interpreter computes every product exactly); fp16/bf16 operands as they are.
  `solve_mm`: the float32 products of the WY inverse, at the precision the input dtype needs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import interpreting


def specialization(decay: "str | None", delta: bool) -> tuple:
    """The kernels' family switches (DECAY, DELTA) for a decay of kind None, "scalar" or "vector"
    (`memplug.rules.Family.decay`, None where the rule gives no decay) and a delta-rule write: DECAY 0
    (none), 1 (one per row) or 2 (one per key channel). The one table the launches in `function.py`
    and the decode step, and `compile_check.py`, read."""
    return {None: 0, "scalar": 1, "vector": 2}[decay], delta


# Every specialisation the built-in families launch (compile_check builds each), by the rules that use it.
SPECIALIZATIONS = {
    "additive_scalar (mamba2, fm)": specialization("scalar", False),
    "additive, no decay": specialization(None, False),
    "additive_vector (gla)": specialization("vector", False),
    "delta, no decay (deltanet)": specialization(None, True),
    "delta (gated_deltanet)": specialization("scalar", True),
    "delta_vector (kda)": specialization("vector", True),
}

# Per-token log-decays below this are raised to it (in the chunk-local cumulative sum only):
# exp(-80) ~ 2e-35 is zero for every fp32 state, and a finite floor keeps exact wipes (fm's
# 1 - w*beta = 0, a = -inf) from producing -inf - -inf = NaN in the decay differences.
DECAY_FLOOR = -80.0


def autotuning() -> bool:
    """Whether compiled kernels pick their configuration by timing (`triton.autotune`); set
    MEMPLUG_TRITON_AUTOTUNE=0 to launch the first configuration instead (read at every launch; the
    tests do, to compile one variant per shape instead of one per configuration)."""
    return os.environ.get("MEMPLUG_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no", "off")


class Tuned:
    """A kernel launched as `kernel[grid](...)` with one of `configs`: `triton.autotune` picks it
    when kernels are compiled and autotuning is on, else the first of `candidates` is used. `fn` is
    the kernel (`triton.jit`), `configs` its configurations, the first of them the one that runs
    without autotuning, unless `float32_first` is given: the one for float32 keys `k` (which every
    kernel with one has), whose products hold split copies of their operands and need smaller blocks;
    it is a candidate for float32 keys only. `prune(configs, named_args, **kwargs)` (autotune's
    `early_config_prune`, such as `fitting_state_tiles`) drops the configurations that do not suit a
    launch's shapes, for autotuning and without it."""

    def __init__(self, fn, configs, key, kwargs, float32_first=None, prune=None):
        self.fn = fn
        self.configs = configs + ([float32_first] if float32_first is not None else [])
        self.float32_first = float32_first
        self.prune = prune
        if prune is not None or float32_first is not None:
            kwargs = dict(kwargs, prune_configs_by={"early_config_prune": self._for_launch})
        self.tuner = None if interpreting() else triton.autotune(configs=self.configs, key=key, **kwargs)(fn)

    def candidates(self, dtype: "torch.dtype | None", args: dict) -> list:
        """The configurations that may run for keys of `dtype` in a launch with the arguments `args`
        (its constexprs at least): those `prune` keeps, the one that runs without autotuning first."""
        first = self.float32_first if dtype == torch.float32 else None
        ordered = ([first] if first is not None else []) + [c for c in self.configs if c is not self.float32_first]
        return ordered if self.prune is None else self.prune(ordered, {}, **args)

    def _for_launch(self, configs, named_args, **kwargs):
        """autotune's `early_config_prune`, and the choice without autotuning: `candidates` for the
        launch's arguments (by name) and the dtype of its keys."""
        args = {**named_args, **kwargs}
        k = args.get("k")
        return self.candidates(None if k is None else k.dtype, args)

    def __getitem__(self, grid):
        if self.tuner is not None and autotuning():
            return self.tuner[grid]
        launch = self.fn[grid]

        def first_config(*args, **kwargs):
            first = self._for_launch(self.configs, {}, **kwargs)[0]
            fixed = dict(first.kwargs)
            if self.tuner is not None:  # compiled: the launch options too (the interpreter has none)
                fixed.update(num_warps=first.num_warps, num_stages=first.num_stages)
            return launch(*args, **fixed, **kwargs)

        return first_config


def autotune_or_first(configs, key, float32_first=None, prune=None, **kwargs):
    """Decorator: `triton.autotune(configs, key, **kwargs)` when kernels are compiled for a GPU, the
    first of `configs` (`float32_first` for float32 keys, if given) when they run in the interpreter
    (which cannot time them) or autotuning is off (`autotuning()`); either way among the configurations
    `prune` keeps (see `Tuned`). Put the configuration that suits small shapes first."""
    return lambda fn: Tuned(fn, configs, key, kwargs, float32_first, prune)


# The float32 registers per thread a tile held whole may take (a quarter of the 255 a thread can
# have): above it the state kernels and the decode step spilled at K = 256 (a [256, 64] state over
# 4 warps: 128 per thread), and the per-channel attention backward with 4 warps.
TILE_REGISTERS = 32


def fitting_state_tiles(configs, named_args, **kwargs):
    """autotune's `early_config_prune` for a kernel that holds a float32 [BK, BV] state tile whole
    (the state kernels, the decode step; BK: the launch's K padded, `block`): keeps the
    configurations whose tile spreads to at most TILE_REGISTERS registers per thread, in their order;
    if none does, those with the fewest."""
    BK = block({**named_args, **kwargs}["K"])
    per_thread = {id(c): BK * c.kwargs["BV"] / (32 * c.num_warps) for c in configs}
    limit = max(min(per_thread.values()), TILE_REGISTERS)
    return [c for c in configs if per_thread[id(c)] <= limit]


def helper(fn):
    """Decorator for the small device functions the kernels call: `triton.jit` when compiling. In the
    interpreter, where a kernel is plain Python run with `triton.language` patched, the function is
    left plain: the same code, without the interpreter's per-call re-patching of the language (a few
    milliseconds per call, which dominated the interpreted kernels' time)."""
    return fn if interpreting() else triton.jit(fn)


def block(n: int) -> int:
    """Block size covering `n`: a power of two, at least 16 (the smallest `tl.dot` operand side)."""
    return max(16, triton.next_power_of_2(n))


# Columns of keys the kernels with [BT, K] tiles of queries or keys (the output pass and its backward
# into d, the gradient kernel, the WY transform, the per-channel attention forward) take at a time:
# whole [64, 128] tiles spilled registers, more so with float32's split operands (and a [16, 128]
# operand of a [16, 16] product is held whole by every warp). Tests lower it to cover several blocks
# at small K.
KEY_BLOCK = 64


def key_block(BK: int, dtype: torch.dtype) -> int:
    """BKW, the columns of keys taken at a time, for keys padded to BK columns and operands of `dtype`:
    half as many for float32, whose products hold split copies of their operands ("tf32x3", `mm`)."""
    return min(BK, max(16, KEY_BLOCK // 2) if dtype == torch.float32 else KEY_BLOCK)


# The largest [rows, keys] tile the state kernels take whole: [64, 128] 16-bit elements.
ROW_TILE_BYTES = 64 * 128 * 2


def row_sub_block(BT: int, BK: int, dtype: torch.dtype) -> int:
    """BS, the rows of a chunk the state kernels take at a time, for keys padded to BK columns in
    `dtype`: all BT of them while a [BT, BK] tile fits ROW_TILE_BYTES, else 16 (float32 at K = 128,
    whose products also hold split copies of their operands, and 16-bit at K = 256 spilled whole)."""
    return BT if BT * BK * dtype.itemsize <= ROW_TILE_BYTES else min(BT, 16)


@helper
def chunk_rows(chunk_indices, offsets, i_c, BT: tl.constexpr):
    """Chunk `i_c` (a row of `chunk_indices`: packed sequence, chunk within it) -> (first row of the
    chunk in the packed layout, number of its rows that belong to the sequence: <= 0 for a chunk past
    the layout's real chunks, which its kernel skips)."""
    i_s = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_j = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(offsets + i_s).to(tl.int64)
    eos = tl.load(offsets + i_s + 1).to(tl.int64)
    start = bos + i_j * BT
    return start, tl.minimum(eos - start, BT)


@helper
def row_block(start, n, BT: tl.constexpr):
    """The BT rows of a chunk whose `n` real rows start at packed row `start`: (index within the
    chunk 0..BT-1, packed row, whether the row is real)."""
    o_t = tl.arange(0, BT)
    return o_t, start + o_t, o_t < n


@helper
def sequence_span(offsets, chunk_offsets, i_s):
    """Packed sequence `i_s` -> (its first packed row, its length, the index of its first chunk)."""
    bos = tl.load(offsets + i_s).to(tl.int64)
    return bos, tl.load(offsets + i_s + 1).to(tl.int64) - bos, tl.load(chunk_offsets + i_s).to(tl.int64)


@helper
def state_row(i_s, i_h, Hb, SLOTS):
    """Packed sequence `i_s` (a segment, (sequence, head group) * SLOTS + slot) and head `i_h` of its
    group -> their state's row in the slot states `[N, H, SLOTS, K, V]`, which the state kernels read
    and write in place."""
    return ((i_s // SLOTS) * Hb + i_h) * SLOTS + i_s % SLOTS


@helper
def tile(rows, m_rows, cols, D):
    """Offsets and mask of the block `rows` x `cols` of a row-major matrix of D columns: a row is
    masked by `m_rows`, a column by `cols < D`. Row t of head h in an `[E, Hb, D]` tensor is matrix
    row t * Hb + h."""
    return rows[:, None] * D + cols[None, :], m_rows[:, None] & (cols < D)[None, :]


@helper
def lower_mask(o_t, m_t, gap):
    """[BT, BT] mask of the pairs (t, s) of real rows with t - s >= gap: 0 for the causal mask with
    its diagonal, 1 for the strictly lower one."""
    return (o_t[:, None] - o_t[None, :] >= gap) & m_t[:, None] & m_t[None, :]


@helper
def split_finite(x, o_t, BT: tl.constexpr):
    """A tile `x [BT, D]` over a chunk's rows `o_t` -> (x with its NaN and infinite entries set to 0,
    [D] the first row holding a non-finite entry in each column, BT if none)."""
    finite = tl.abs(x.to(tl.float32)) < float("inf")  # False for NaN too
    return tl.where(finite, x, 0.0), tl.min(tl.where(finite, BT, o_t[:, None]), 0)


@helper
def poison_from(y, o_t, first):
    """`y [BT, D]` with NaN in column c from row `first[c]` on (see `split_finite`)."""
    return tl.where(o_t[:, None] >= first[None, :], float("nan"), y)


@helper
def exp_nonpos(x):
    return tl.exp(tl.minimum(x, 0.0))


@helper
def mm(a, b):
    """a @ b with float32 accumulation: fp16/bf16 operands on tensor cores as they are; float32
    operands as "tf32x3" (three TF32 products, about float32 accuracy, still on tensor cores; the
    "ieee" path compiles to unrolled FMAs, slow to build and to run)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@helper
def solve_mm(a, b, acc, DT: tl.constexpr):
    """acc (or 0, if None) + a @ b for float32 blocks of the WY inverse (`delta.py`), at the precision
    the input dtype DT needs: "tf32x3" (about float32) for float32 inputs; one TF32 pass for float16
    and bfloat16, whose T is then rounded to at most TF32's 10 bits of mantissa anyway."""
    if DT == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc, input_precision="tf32")


@helper
def mma(a, b, acc):
    """acc + a @ b, as `mm`."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)
