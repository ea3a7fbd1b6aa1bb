"""A performance model of the Triton backend, without a GPU: for every kernel launch of a
`routed_scan` forward and backward, the tensors it is given (bytes, and whether it reads or writes
them), its tensor-core products (FLOPs, by precision) and a roofline floor on a named GPU.

Two parts, each with one source of truth:

- `scan_launches(...)`: the Triton kernels, analytically, as functions of the packed layout (E route
  entries of Hb heads, S packed sequences, empty ones included, their chunks), K, V, the chunk
  size, the dtype and the rule's family. This mirrors `function.ChunkScan` and, routed, the combine
  (`combine.py`); `tests/test_cost_model.py`
  checks it against the tensors the kernels are actually given (every launch, every argument) and against the products
  Triton's interpreter actually executes, so it cannot drift from the code.
- `record_traffic(fn)`: everything else (packing, coupling, casts and their adjoints)
  is counted, not modelled: `fn` runs on the CPU with every Triton launch replaced by a record of its
  tensors, and every PyTorch operation is charged the bytes it reads and writes. The same recorder
  measures fla's paths (`memplug bench --model`).

What a byte is here: a kernel reads each tensor it reads, and writes each tensor it writes, once,
whole: re-reads within a kernel are assumed to hit L2, which the grids are ordered for (programs that
share a chunk's rows, its V blocks, run one after another). A PyTorch operation reads its inputs and
writes its outputs once each (a broadcast input counts its stored elements; views and allocations
cost nothing; an in-place operation writes its result and reads its other inputs). FLOPs count the
tensor-core products only (`tl.dot`), at their padded block sizes, as the hardware executes them;
"tf32x3" (float32 operands) is three TF32 products. Elementwise work is not counted: every kernel
here is far from compute-bound on it. The floor of a launch is max(bytes / bandwidth, sum of FLOPs /
peak rate): a lower bound, not a prediction.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import chunk, delta as delta_kernels
from .common import block, key_block
from .function import max_chunks
from .vector import BC  # sub-chunk rows of the per-channel attention kernels

# Peak rates of the GPUs the floors are given for (dense, no sparsity): HBM bytes/s, and FLOP/s of
# products by unit: tensor cores on 16-bit or TF32 operands, and CUDA cores for float32 ("ieee").
GPUS = {
    "h100": ("NVIDIA H100 SXM", 3.35e12, {"16-bit": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    "h200": ("NVIDIA H200", 4.8e12, {"16-bit": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
}
# How a product of each precision executes: (unit of `GPUS`, passes). "tf32x3" is three TF32 products.
PASSES = {"16-bit": ("16-bit", 1), "tf32": ("tf32", 1), "tf32x3": ("tf32", 3), "fp32": ("fp32", 1)}


@dataclass
class Launch:
    """One kernel launch (or one PyTorch operation, `kind` "torch"): its tensors as
    {argument: (bytes, "r" | "w" | "unused")} and its FLOPs by precision."""

    kernel: str
    phase: str  # "forward" or "backward"
    kind: str = "triton"
    tensors: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(n for n, role in self.tensors.values() if role != "unused")

    @property
    def executed_flops(self) -> float:
        """FLOPs as the hardware executes them (a "tf32x3" product counts three times)."""
        return sum(f * PASSES[precision][1] for precision, f in self.flops.items())

    def floor_seconds(self, gpu: str) -> float:
        _, bandwidth, rates = GPUS[gpu]
        compute = sum(f * PASSES[p][1] / rates[PASSES[p][0]] for p, f in self.flops.items())
        return max(self.bytes / bandwidth, compute)


@dataclass(frozen=True)
class Layout:
    """The packed layout a scan runs on: `lengths` of its S packed sequences (route entries of one
    (sequence, head group, slot), every slot's, empty ones included), Hb heads per row, chunks of BT
    rows."""

    lengths: tuple
    Hb: int
    BT: int
    routes: int = 0  # R, the route entries of a token and head group; 0: the token order (see `token_order`)

    @property
    def token_order(self) -> bool:
        """One slot with one routing for all heads, no cu_seqlens: every packed sequence is a batch row,
        its length follows from the shapes, and there are no combine kernels."""
        return self.routes == 0

    @property
    def E(self) -> int:
        return sum(self.lengths)

    @property
    def S(self) -> int:
        return len(self.lengths)

    @property
    def chunk_rows(self) -> list:
        """Real rows of every chunk, in order."""
        return [min(self.BT, L - start) for L in self.lengths for start in range(0, L, self.BT)]

    @property
    def NT(self) -> int:
        """Real chunks: the ones whose programs run."""
        return len(self.chunk_rows)

    @property
    def num_chunks(self) -> int:
        """Chunks the layout is sized for, from the shapes alone (`function.max_chunks`): the
        per-chunk tensors have this many rows, and the programs past the real chunks return at once."""
        return max_chunks(self.E, self.S, self.BT, self.lengths[0] if self.token_order else None)


def packed_layout(route_idx: torch.Tensor, num_slots: int, H: int, BT: int) -> Layout:
    """The layout `triton_scan` packs the routing `route_idx [B,T,Hr,R]` (no cu_seqlens) into: at one
    slot shared by the heads, one packed sequence per batch row in token order; otherwise one per
    (batch row, head group, slot), empty ones included."""
    from ..packing import pack

    B, T, Hr, R = route_idx.shape
    if num_slots == 1 and Hr == 1:
        return Layout((T,) * B, H, BT)
    lengths = pack(route_idx, num_slots, H, every_segment=True).offsets.diff().tolist()
    return Layout(tuple(lengths), H // Hr, BT, routes=R)


def balanced_layout(B: int, T: int, H: int, m: int, R: int, Hr: int, BT: int) -> Layout:
    """The layout of a routing that spreads every sequence's T*R route entries of a head group evenly
    over its m slots (a uniform router, in expectation); m = 1: one packed sequence per batch row
    and head group."""
    per_slot, extra = divmod(T * R, m)
    lengths = [per_slot + (i < extra) for i in range(m)]
    return Layout(tuple(L for _ in range(B * Hr) for L in lengths), H // Hr, BT, routes=0 if m == 1 and Hr == 1 else R)


def _family(rule) -> tuple:
    """(DECAY 0/1/2, delta) of the kernels a rule (a name or a `memplug.rules.Rule`) launches: the
    decay is the one its coupling gives (none for deltanet, a scalar one for fm, which takes no g)."""
    from memplug.rules import get_rule

    from .common import specialization
    rule = get_rule(rule) if isinstance(rule, str) else rule
    one = torch.ones(1, 1)
    g = None if rule.g is None else (-one if rule.g == "scalar" else -torch.ones(1, 1, 1))
    coupled = rule.couple(torch.ones(1, 1, 1), torch.ones(1, 1, 1), g, 0.5 * one if rule.beta else None, 0.5 * one)
    return specialization(None if coupled.a is None else rule.family.decay, rule.family.delta)


def scan_launches(rule, layout: Layout, K: int, V: int, dtype: torch.dtype, initial_state: bool = False,
                  final_state: bool = False, backward: bool = True, state_grad: Optional[bool] = None,
                  read_w: bool = False, read_w_grad: bool = True) -> list:
    """The Triton launches of one `routed_scan` (forward, then backward) of `rule` on `layout`, with q,
    k, v in `dtype`, as `Launch`es in launch order. `state_grad`: whether the backward is given a
    gradient of the final states (default: `final_state`); the initial states' gradient is computed
    when they are given. `read_w`: the output kernel weighs its rows by a constant read weight (one
    slot, no gradient to the weights) and writes the output in `dtype`; the kernels that read dO
    weigh it too. A routed layout (`layout.routes`) adds the combine kernels, and `read_w_grad` says
    whether the read weights take a gradient there."""
    decay, delta = _family(rule)
    state_grad = final_state if state_grad is None else state_grad
    E, Hb, S, BT = layout.E, layout.Hb, layout.S, layout.BT
    NT = layout.num_chunks  # rows of the per-chunk tensors; FLOPs count the real chunks (chunk_heads)
    d, f4 = torch.tensor([], dtype=dtype).element_size(), 4
    dot = "16-bit" if d == 2 else "tf32x3"
    BK = block(K)
    BKW = key_block(BK, dtype)
    NK = math.ceil(K / BKW)
    BKp = NK * BKW  # keys as the kernels that take them in blocks of BKW see them
    BKW_wy = delta_kernels.wy_key_block(BK, dtype)
    BKp_wy = math.ceil(K / BKW_wy) * BKW_wy  # ... and as the WY kernels do, in their own blocks

    def v_blocks(kernel) -> tuple:
        """(V blocks, V as the products see it: whole blocks) of a kernel's V block in the
        configuration it runs with here: its first (the interpreter's, and autotuning off's)."""
        BV = kernel.candidates(dtype, {"K": K})[0].kwargs["BV"]
        nv = math.ceil(V / BV)
        return nv, nv * BV

    P = E * Hb
    rows = {"K": P * K * d, "V": P * V * d, "a": P * (K if decay == 2 else 1) * f4, "b": P * f4,
            "BT": P * BT * f4, "T": P * BT * d, "state": S * Hb * K * V * f4, "hs": NT * Hb * K * V * d,
            "K32": P * K * f4, "V32": P * V * f4}
    # Gradients kept in float32 where a later kernel adds to them (function.ChunkScan.backward).
    dq_bytes = rows["K32"] if decay == 2 else rows["K"]
    dk_bytes = rows["K32"] if decay == 2 or delta else rows["K"]
    chunks = {"chunk_indices": (NT * 2 * 4, "r"), "offsets": ((S + 1) * 8, "r")}
    sequences = {"offsets": ((S + 1) * 8, "r"), "chunk_offsets": ((S + 1) * 8, "r")}
    decay_in = {"A": (rows["a"], "r")} if decay else {}
    chunk_heads = layout.NT * Hb

    def launch(kernel, phase, tensors, flops=0.0, indices=chunks):
        return Launch(kernel, phase, tensors={**tensors, **indices}, flops={dot: flops} if flops else {})

    def attention(phase):
        # Active sub-chunk programs of each chunk; program i forms i off-diagonal [BC,BC] blocks.
        pairs = sum(i for n in layout.chunk_rows for i in range(math.ceil(n / BC)))
        return launch("attention_fwd_kernel", phase,
                      {"q": (rows["K"], "r"), "k": (rows["K"], "r"), "A": (rows["a"], "r"),
                       "M": (rows["BT"], "w")}, Hb * pairs * 2 * BC * BC * BKp)  # keys in blocks of BKW

    def attention_bwd(phase):
        pairs = 0
        for n in layout.chunk_rows:
            active = math.ceil(n / BC)
            pairs += sum(i + (active - 1 - i) for i in range(active))  # blocks left of and below it
        tensors = {"q": (rows["K"], "r"), "k": (rows["K"], "r"), "A": (rows["a"], "r"), "dM": (rows["BT"], "r"),
                   "dq_in": (rows["K32"], "r"), "dk_in": (rows["K32"], "r"), "dA_in": (rows["a"], "r"),
                   "dq": (rows["K32"], "w"), "dk": (rows["K32"], "w"), "dA": (rows["a"], "w")}
        return launch("attention_bwd_kernel", phase, tensors, Hb * pairs * 2 * BC * BC * BK)

    def cumsum(phase):
        return launch("cumsum_kernel", phase, {"x": (rows["a"], "r"), "y": (rows["a"], "w")})

    def wy(phase, compute_T):
        tensors = {"k": (rows["K"], "r"), "v": (rows["V"], "r"), "b": (rows["b"], "r"), **decay_in}
        if compute_T and decay == 2:
            tensors["Lk"] = (rows["BT"], "r")
        tensors.update(T=(rows["T"], "w" if compute_T else "r"), u=(rows["V"], "w"), w=(rows["K"], "w"))
        flops = 2 * BT * BT * (BKp_wy + v_blocks(delta_kernels.wy_fwd_kernel)[1])  # w = T (b exp(A) k), u = T (b v)
        NB = BT // 16  # blocks of 16 rows of the inverse
        if compute_T and decay != 2:  # the blocks of k k^T on and below the diagonal (per-channel decay: Lk given)
            flops += NB * (NB + 1) // 2 * 2 * 16 * 16 * BKp_wy
        wy_launch = launch("wy_fwd_kernel", phase, tensors, chunk_heads * flops)
        if compute_T:  # the inverse's merges: block (i, j) below the diagonal takes i - j + 1 products of 16x16
            products = sum(i - j + 1 for i in range(NB) for j in range(i))
            precision = "tf32x3" if d == 4 else "tf32"
            wy_launch.flops[precision] = wy_launch.flops.get(precision, 0) + chunk_heads * products * 2 * 16 ** 3
        return [wy_launch]

    def states(phase, store_ht):
        tensors = {"k": (rows["K"], "r"), "v": (rows["V"], "r")}
        if delta:
            tensors["w"] = (rows["K"], "r")
        tensors.update(decay_in)
        if initial_state:
            tensors["h0"] = (rows["state"], "r")
        tensors["hs"] = (rows["hs"], "w")
        if delta:
            tensors["d_out"] = (rows["V"], "w")
        if store_ht:
            tensors["ht"] = (rows["state"], "w")
        flops = chunk_heads * 2 * BT * BK * v_blocks(chunk.state_fwd_kernel)[1] * (2 if delta else 1)  # k^T d, w S
        return launch("state_fwd_kernel", phase, tensors, flops, indices=sequences)

    # ---- forward
    out = []
    if decay:
        out.append(cumsum("forward"))
    if decay == 2:
        out.append(attention("forward"))
        if delta:
            out.append(attention("forward"))  # Lk: the keys with themselves
    if delta:
        out += wy("forward", compute_T=True)
    out.append(states("forward", final_state))
    tensors = {"q": (rows["K"], "r"), "k": (rows["K"], "r"), "d": (rows["V"], "r"), **decay_in}
    if decay == 2:
        tensors["M"] = (rows["BT"], "r")
    tensors["hs"] = (rows["hs"], "r")
    if read_w:
        tensors["read_w"] = (E * f4, "r")
    tensors["o"] = (rows["V"] if read_w else rows["V32"], "w")
    nv, Vp = v_blocks(chunk.output_fwd_kernel)
    flops = 2 * BT * BKp * Vp + 2 * BT * BT * Vp + (0 if decay == 2 else 2 * BT * BT * BKp * nv)
    out.append(launch("output_fwd_kernel", "forward", tensors, chunk_heads * flops))
    # The combine (`combine.py`): route outputs read in place, E / R token rows written in `dtype`.
    combine_rows = {"positions": (E * 8, "r"), "read_w": (E * f4, "r")}
    token_rows = E // max(layout.routes, 1) * Hb * V * d
    if layout.routes:
        out.append(Launch("combine_fwd_kernel", "forward", tensors={"out": (rows["V32"], "r"), **combine_rows,
                                                                    "o": (token_rows, "w")}))
    if not backward:
        return out

    # ---- backward
    if layout.routes:  # the route outputs are read again only for the read weights' gradient
        tensors = {"out": (rows["V32"], "r")} if read_w_grad else {}
        tensors.update(combine_rows, do=(token_rows, "r"), dout=(rows["V"], "w"))
        if read_w_grad:
            tensors["dread_w"] = (E * f4, "w")
        out.append(Launch("combine_bwd_kernel", "backward", tensors=tensors))
    if delta:
        out += wy("backward", compute_T=False)
    out.append(states("backward", False))
    if decay == 2:  # M given: q, k and A are not read
        tensors = {"q": (rows["K"], "unused"), "k": (rows["K"], "unused"), "A": (rows["a"], "unused"),
                   "M": (rows["BT"], "r")}
    else:
        tensors = {"q": (rows["K"], "r"), "k": (rows["K"], "r"), **decay_in}
    tensors["do"] = (rows["V"], "r")
    if read_w:
        tensors["read_w"] = (E * f4, "r")
    tensors["dd_local"] = (rows["V32"], "w")
    nv, Vp = v_blocks(chunk.dd_local_kernel)
    flops = 2 * BT * BT * Vp + (0 if decay == 2 else 2 * BT * BT * BKp * nv)
    out.append(launch("dd_local_kernel", "backward", tensors, chunk_heads * flops))

    tensors = {"q": (rows["K"], "r"), "k": (rows["K"], "r")}
    if delta:
        tensors["w"] = (rows["K"], "r")
    tensors.update(decay_in)
    tensors["do"] = (rows["V"], "r")
    if read_w:
        tensors["read_w"] = (E * f4, "r")
    tensors["dd_local"] = (rows["V32"], "r")
    if state_grad:
        tensors["dht"] = (rows["state"], "r")
    tensors.update(dhs=(rows["hs"], "w"), dd=(rows["V"], "w"))
    if initial_state:
        tensors["dh0"] = (rows["state"], "w")
    Vp = v_blocks(chunk.state_bwd_kernel)[1]
    flops = chunk_heads * 2 * BT * BK * Vp * (3 if delta else 2)  # k dS, q^T dO (and w^T dd)
    out.append(launch("state_bwd_kernel", "backward", tensors, flops, indices=sequences))

    tensors = {"q": (rows["K"], "r"), "k": (rows["K"], "r"), "d": (rows["V"], "r"), **decay_in,
               "hs": (rows["hs"], "r"), "dhs": (rows["hs"], "r"), "do": (rows["V"], "r"),
               **({"read_w": (E * f4, "r")} if read_w else {}),
               "dd": (rows["V"], "r" if delta else "unused"), "dq": (dq_bytes, "w"), "dk": (dk_bytes, "w")}
    if decay:  # a scalar decay's dA in one share per key block, which the caller adds up
        tensors["dA"] = (rows["a"] * (NK if decay == 1 else 1), "w")
    if decay == 2:
        tensors["dM"] = (rows["BT"], "w")
    if delta:
        tensors["dw"] = (rows["K"], "w")
    Vp = v_blocks(chunk.grad_kernel)[1]
    # dO S^T, d dS^T (dd S^T), and dO d^T in each of the NK key blocks' programs
    flops = 2 * BT * Vp * BKp * (3 if delta else 2) + 2 * BT * BT * Vp * NK
    if decay != 2:  # the intra-chunk part through M: dM k, dM^T q (and q k^T to weigh dA)
        flops += 2 * 2 * BT * BT * BKp + (2 * BT * BT * BKp if decay == 1 else 0)
    out.append(launch("grad_kernel", "backward", tensors, chunk_heads * flops))
    if decay == 2:
        out.append(attention_bwd("backward"))
    if delta:
        tensors = {"k": (rows["K"], "r"), "v": (rows["V"], "r"), "b": (rows["b"], "r"), **decay_in}
        if decay == 2:
            tensors["Lk"] = (rows["BT"], "r")
        tensors.update(T=(rows["T"], "r"), dd=(rows["V"], "r"), dw=(rows["K"], "r"), dk_in=(dk_bytes, "r"))
        if decay:
            tensors["dA_in"] = (rows["a"], "r")
        tensors.update(dk=(rows["K32"] if decay == 2 else rows["K"], "w"), dv=(rows["V"], "w"), db=(rows["b"], "w"))
        if decay:
            tensors["dA"] = (rows["a"], "w")
        if decay == 2:
            tensors["dLk"] = (rows["BT"], "w")
        # per block of keys (values): T^T dw (T^T du), w = T (b exp(A) k) (u = T (b v)) and their product
        # into dL = -(T^T dw) w^T - (T^T du) u^T; through L = b D * (k k^T): G k, G^T (b k) and T^T dw
        # again in the second pass over the key blocks (whose second reads of k and dw, made by the
        # same program moments later, are counted as L2 hits, not HBM bytes)
        Vp = v_blocks(delta_kernels.wy_bwd_kernel)[1]
        flops = 3 * 2 * BT * BT * (BKp_wy + Vp)
        if decay != 2:
            flops += 3 * 2 * BT * BT * BKp_wy
        out.append(launch("wy_bwd_kernel", "backward", tensors, chunk_heads * flops))
        if decay == 2:
            out.append(attention_bwd("backward"))
    if decay:
        out.append(cumsum("backward"))
    return out


# ---------------------------------------------------------------------------- recording traffic
_VIEWS = {"view", "_unsafe_view", "reshape", "permute", "expand", "detach", "transpose", "t", "select", "slice",
          "unsqueeze", "squeeze", "alias", "as_strided", "unflatten", "split", "split_with_sizes", "narrow",
          "diagonal", "view_as_real", "view_as_complex", "unbind", "chunk", "lift_fresh"}
_ALLOCATIONS = {"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided", "_local_scalar_dense",
                "set_", "resize_"}
_FILLS = {"zeros", "new_zeros", "zeros_like", "ones", "new_ones", "ones_like", "full", "new_full", "full_like",
          "fill_", "zero_", "arange", "randn", "rand", "scalar_tensor"}


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements `t` addresses (a broadcast dimension, stride 0, counts once)."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n


def torch_op_bytes(name: str, inputs: Sequence, outputs: Sequence) -> int:
    """HBM bytes of one PyTorch operation by the rules of this module's docstring."""
    if name in _VIEWS or name in _ALLOCATIONS:
        return 0
    if name in _FILLS:
        return sum(stored_bytes(o) for o in outputs)
    if name.endswith("_") and inputs:  # in place: the result, and every other input
        return sum(stored_bytes(o) for o in outputs) + sum(stored_bytes(i) for i in inputs[1:])
    return sum(stored_bytes(i) for i in inputs) + sum(stored_bytes(o) for o in outputs)


@dataclass
class Traffic:
    """What `record_traffic` records: `launches` in order, each charged to the `phase` set when it
    ran; nothing is recorded while `paused`."""

    launches: list = field(default_factory=list)
    phase: str = "forward"
    paused: bool = False


@contextlib.contextmanager
def record_traffic():
    """Record the Triton launches (not run: their outputs stay uninitialised) and the PyTorch
    operations made inside the block, as `Launch`es in the yielded `Traffic` (the caller sets its
    phase between forward and backward). Kernels must be Triton's interpreted functions
    (TRITON_INTERPRET=1 when they were defined, as on a CPU without a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from triton.runtime.interpreter import InterpretedFunction

    traffic = Traffic()

    class Charge(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            ins = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
            nbytes = torch_op_bytes(name, ins, outs)
            if nbytes and not traffic.paused:
                traffic.launches.append(Launch(name, traffic.phase, kind="torch", tensors={"all": (nbytes, "r")}))
            return out

    def stub(self, *args, grid, warmup, **kwargs):
        if warmup or traffic.paused:
            return None
        given = {**dict(zip(self.arg_names, args)), **kwargs}
        traffic.launches.append(Launch(self.fn.__name__, traffic.phase, tensors={
            name: (stored_bytes(x), "r") for name, x in given.items() if isinstance(x, torch.Tensor)}))
        return None

    run = InterpretedFunction.run
    InterpretedFunction.run = stub
    try:
        with Charge():
            yield traffic
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def count_products():
    """Count the products Triton's interpreter executes inside the block: yields a list that gets one
    (kernel name, Counter {precision: FLOPs}) per launch. The precision is the operands' width and
    the product's `input_precision`: "16-bit", or for float32 "tf32", "tf32x3" or "fp32" (IEEE)."""
    import collections

    import triton.runtime.interpreter as interpreter

    counts = []
    run, dot = interpreter.InterpretedFunction.run, interpreter.InterpreterBuilder.create_dot
    float32 = {"TF32": "tf32", "TF32x3": "tf32x3", "IEEE": "fp32"}

    def counted_run(self, *args, **kwargs):
        counts.append((self.fn.__name__, collections.Counter()))
        return run(self, *args, **kwargs)

    def counted_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = "16-bit" if a.dtype.primitive_bitwidth == 16 else float32[input_precision.name]
        counts[-1][1][precision] += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpretedFunction.run, interpreter.InterpreterBuilder.create_dot = counted_run, counted_dot
    try:
        yield counts
    finally:
        interpreter.InterpretedFunction.run, interpreter.InterpreterBuilder.create_dot = run, dot


def totals(launches: Sequence, gpu: str) -> dict:
    """Bytes, executed FLOPs and floor seconds of `launches`, by phase."""
    out = {}
    for phase in ("forward", "backward"):
        chosen = [x for x in launches if x.phase == phase]
        out[phase] = {"bytes": sum(x.bytes for x in chosen), "flops": sum(x.executed_flops for x in chosen),
                      "seconds": sum(x.floor_seconds(gpu) for x in chosen)}
    return out
