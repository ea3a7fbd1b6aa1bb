"""The chunked backend against the float64 reference: every law of docs/contract.md section 6, plus packing."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import memplug
import memplug.backends.chunked as chunked
from memplug import get_rule, routed_scan
from memplug.backends.chunked.chunking import chunk_layout
from memplug.backends.packing import mix, pack, take
from memplug.testing import CaseSpec, case_specs, check_backend, make_inputs, poisons
from support.nonfinite import assert_bitwise_equal, nan_filled_memory, scan_with_grads

RULES = memplug.BUILT_IN_RULES
CHUNK_SIZES = [1, 2, 3, 5, 8, 16, 64]
BLOCK_ROWS = [1, 7, 40, 1 << 15]  # blocks of one lane each, a few lanes, one block
GRAD_INPUTS = ("q", "k", "v", "g", "beta", "route_w", "read_w", "initial_state")


@contextmanager
def chunk_size(size, block_rows=None):
    """Run the chunked backend with chunks of `size` rows (and blocks of `block_rows` rows)."""
    old = chunked.CHUNK_SIZE, chunked.BLOCK_ROWS
    chunked.CHUNK_SIZE = size
    chunked.BLOCK_ROWS = old[1] if block_rows is None else block_rows
    try:
        yield
    finally:
        chunked.CHUNK_SIZE, chunked.BLOCK_ROWS = old


@dataclass
class Problem:
    rule: str
    coupling: str
    inputs: dict  # keyword arguments of routed_scan, without rule/coupling/backend
    per_route: frozenset = frozenset()  # which of k, v, g, beta are given per route

    def run(self, backend="chunked", **overrides):
        kw = dict(self.inputs, **overrides)
        return routed_scan(rule=self.rule, coupling=self.coupling, output_final_state=True, backend=backend, **kw)


def make_problem(*, rule, coupling, B, T, H, Hr, m, R, used, K, V, per_route, with_state, read_w, seed,
                 dtype=torch.float64, N=None):
    """Random inputs; routes go to `used` of the m slots, so the others receive no tokens.
    `per_route` lists which of k, v, g, beta are given per route. N: sequences of the initial state."""
    gen = torch.Generator().manual_seed(seed)
    spec = get_rule(rule)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=dtype)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    lead = lambda name: (B, T, H, R) if name in per_route else (B, T, H)
    # Unit keys keep the delta rule's (I - b k k^T) a contraction, as in the layers.
    k = torch.nn.functional.normalize(randn(*lead("k"), K), dim=-1)
    inputs = dict(q=randn(B, T, H, K), k=k, v=randn(*lead("v"), V), num_slots=m)
    if spec.g == "scalar":
        inputs["g"] = -2 * rand(*lead("g"))
    elif spec.g == "vector":
        inputs["g"] = -2 * rand(*lead("g"), K)
    if spec.beta:
        inputs["beta"] = rand(*lead("beta"))
    slots = torch.randperm(m, generator=gen)[:used]
    inputs["route_idx"] = slots[torch.rand(B, T, Hr, used, generator=gen).argsort(-1)[..., :R]]
    route_w = rand(B, T, Hr, R)
    inputs["route_w"] = route_w * (rand(B, T, Hr, R) > 0.2)  # some routes of weight exactly 0
    if read_w:
        inputs["read_w"] = rand(B, T, Hr, R)
    if with_state:
        inputs["initial_state"] = randn(B if N is None else N, H, m, K, V)
    return Problem(rule, coupling, inputs, frozenset(per_route))


def with_grads(problem: Problem, backend: str, seed=0):
    """Outputs, final states and the gradients of every tensor input of a fixed random loss."""
    inputs = {name: x.detach().clone().requires_grad_() if name in GRAD_INPUTS and x is not None else x
              for name, x in problem.inputs.items()}
    o, S = replace(problem, inputs=inputs).run(backend)
    gen = torch.Generator().manual_seed(seed)
    weights = lambda x: torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    loss = (o * weights(o)).sum() + (S * weights(S)).sum()
    loss.backward()
    # An input the loss does not depend on (route_w under coupling "none" with its own read_w) has
    # no gradient: count it as zero.
    grads = {name: torch.zeros_like(x) if x.grad is None else x.grad
             for name, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad}
    return o.detach(), S.detach(), grads


def assert_same(a, b, tol, what=""):
    torch.testing.assert_close(a.to(b.dtype), b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# The laws, through the kit (memplug.testing), as any backend's author would check theirs.

@pytest.mark.parametrize("rule", RULES)
def test_every_law_holds(rule):
    """check_backend with its defaults: every law, every dtype, short and long cases."""
    report = check_backend("chunked", rules=[rule])
    assert {r.status for r in report.results} == {"passed"}, str(report)


@pytest.mark.parametrize("size, block_rows", [(3, 1), (2, 7), (5, 40)])
def test_laws_hold_with_small_chunks_and_blocks(size, block_rows):
    """Chunks of a few rows in blocks of one lane, a few lanes, or several: part-filled chunks, and
    slot states carried from block to block."""
    laws = ["reference_equality", "state_passing", "decode", "varlen", "frozen_slots", "relabeling"]
    with chunk_size(size, block_rows):
        report = check_backend("chunked", rules=["gla", "gated_deltanet"], dtypes=["float64"], laws=laws,
                               max_examples=6)
    assert {r.status for r in report.results} == {"passed"}, str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    problem = make_problem(rule="gated_deltanet", coupling="dt", B=1, T=30, H=2, Hr=2, m=4, R=2, used=4, K=8,
                           V=4, per_route=set(), with_state=True, read_w=False, seed=1, dtype=torch.float32)
    half = {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and n != "initial_state"
            else x for n, x in problem.inputs.items()}
    upcast = {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in half.items()}
    o, S = replace(problem, inputs=half).run()
    o_ref, S_ref = replace(problem, inputs=upcast).run("reference")
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_same(o.double(), o_ref, 1e-2, "o")  # only o is rounded to the half dtype
    assert_same(S.double(), S_ref, 1e-5, "final state")


def test_fm_gate_of_one_wipes_the_slot_without_nan():
    # w * beta = 1: the slot forgets everything before (up to eps), with finite gradients.
    problem = make_problem(rule="fm", coupling="dt", B=1, T=12, H=1, Hr=1, m=2, R=1, used=2, K=3, V=2,
                           per_route=set(), with_state=True, read_w=False, seed=3)
    problem.inputs["beta"][0, 3:9] = 1.0
    problem.inputs["route_w"][0, 3:9] = 1.0
    o_ref, S_ref, grads_ref = with_grads(problem, "reference")
    for size in (1, 4, 64):
        with chunk_size(size):
            o, S, grads = with_grads(problem, "chunked")
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        assert_same(o, o_ref, 1e-12, "o")
        assert_same(S, S_ref, 1e-12, "final state")
        for name in grads_ref:
            assert torch.isfinite(grads[name]).all() and torch.isfinite(grads_ref[name]).all(), name
            assert_same(grads[name], grads_ref[name], 1e-10, f"d{name}")


@pytest.mark.parametrize("rule", ["gla", "gated_deltanet", "mamba2"])
def test_strong_decays_stay_finite_and_exact(rule):
    # Decays of exp(-60) per step: a cumulative sum over a chunk reaches -3840; exponentiating its
    # negative would overflow, so this checks that only sums of decays (<= 0) are exponentiated.
    problem = make_problem(rule=rule, coupling="none", B=1, T=70, H=1, Hr=1, m=2, R=1, used=2, K=4, V=2,
                           per_route=set(), with_state=True, read_w=False, seed=4)
    g = problem.inputs["g"]
    problem.inputs["g"] = torch.where(torch.rand(g.shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                                      -60.0, -0.01).to(g)
    expected = with_grads(problem, "reference")
    low = replace(problem, inputs={n: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                   for n, x in problem.inputs.items()})
    with chunk_size(64):
        got = with_grads(low, "chunked")
    for name, a, b in [("o", got[0], expected[0]), ("S", got[1], expected[1])] + \
            [(n, got[2][n], expected[2][n]) for n in expected[2]]:
        assert torch.isfinite(a).all(), name
        assert_same(a, b, 1e-4, name)


# Non-finite inputs: q, k, v are data; a non-finite one reaches its own and later tokens only.

@st.composite
def nonfinite_key_or_value_cases(draw):
    """A case with a non-finite v (any rule) or k (additive rules): those whose float64 reference
    keeps the gradients of earlier tokens finite. (For a non-finite q, or k of a delta rule, the
    reference's own autograd multiplies zero cotangents by NaN on the way back: NaN there too.)"""
    rule = draw(st.sampled_from(RULES))
    spec = draw(case_specs(rule, dtypes=["float64"], max_T=24))
    delta = get_rule(rule).family.delta
    poison = draw(poisons(spec).filter(lambda p: p.input == "v" or (p.input == "k" and not delta)))
    return spec, poison


@settings(max_examples=60, deadline=None)
@given(nonfinite_key_or_value_cases(), st.sampled_from([1, 5, 32]))
def test_gradients_before_a_nonfinite_key_or_value_are_unchanged(case, size):
    """With v (or an additive rule's k) non-finite at token t of sequence n, the gradients, w.r.t.
    every input, of a loss on the outputs of n's tokens before t and on the other sequences' outputs
    and final states are those without it: at every input of those tokens, and every initial state."""
    spec, poison = case
    clean = make_inputs(spec)
    b, start, end = poison.span(spec)
    kept = torch.ones(clean["q"].shape[:2], dtype=torch.bool)  # [B,T]: tokens the loss reads
    kept[b, start + poison.token:end] = False
    others = [n for n in range(spec.N) if n != poison.sequence]

    def grads(inputs):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in GRAD_INPUTS if inputs.get(n) is not None}
        with chunk_size(size):
            o, S = routed_scan(**dict(inputs, **leaves), output_final_state=True, backend="chunked")
        gen = torch.Generator().manual_seed(spec.seed)
        loss = (o[kept] * torch.randn(o[kept].shape, generator=gen, dtype=o.dtype)).sum() + \
            (S[others] * torch.randn(S[others].shape, generator=gen, dtype=S.dtype)).sum()
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, got)}

    expected, got = grads(clean), grads(poison.apply(clean, spec))
    for name, g in got.items():
        at = slice(None) if name == "initial_state" else kept
        assert torch.isfinite(g[at]).all(), f"grad {name}: NaN or inf before the poisoned token, {poison}"
        assert_same(g[at], expected[name][at], 1e-10, f"grad {name}, {poison}")


@pytest.mark.parametrize("rule", RULES)
def test_memory_it_never_wrote_is_never_read(rule):
    """With every uninitialized allocation filled with NaN, o, final states and every gradient are bit
    for bit those of a normal run: no padding row of a chunk, no unused tail of a buffer is read.
    Three packed sequences of 5, 40 and 12 tokens, each routed to both slots, in chunks of 5 rows and
    blocks of 40: part-filled chunks, and lanes that run over several blocks."""
    spec = CaseSpec(rule=rule, dtype="float32", B=1, T=57, H=2, K=12, V=6, m=2, R=2, seqlens=(5, 40, 12),
                    initial_state=True, read_w=True, per_route=("v",), seed=2)
    inputs = make_inputs(spec)
    with chunk_size(5, block_rows=40):
        expected = scan_with_grads(inputs, "chunked")
        with nan_filled_memory():
            got = scan_with_grads(inputs, "chunked")
    assert_bitwise_equal(got, expected)


# Second-order gradients.

@pytest.mark.parametrize("rule", RULES)
def test_second_order_gradients_pass_gradgradcheck(rule):
    """Double backward through the chunked backend: torch.autograd.gradgradcheck in float64 w.r.t.
    every float input, on a tiny case with chunks of 2 rows, blocks of 3, two packed sequences, two
    routes per token and per-route keys and decays."""
    spec = CaseSpec(rule=rule, dtype="float64", B=1, T=5, H=2, K=3, V=2, m=2, R=2, seqlens=(2, 3),
                    initial_state=True, read_w=True, per_route=("k", "g"), seed=4)
    inputs = make_inputs(spec)
    names = [n for n in GRAD_INPUTS if inputs.get(n) is not None]

    def scan(*tensors):
        with chunk_size(2, block_rows=3):
            return routed_scan(**dict(inputs, **dict(zip(names, tensors))), output_final_state=True,
                               backend="chunked")

    assert torch.autograd.gradgradcheck(scan, [inputs[n].clone().requires_grad_() for n in names])


@pytest.mark.parametrize("rule", RULES)
def test_second_order_gradients_equal_the_reference(rule):
    """The gradient of q (taken with create_graph=True) differentiated again w.r.t. every float input
    equals the reference's, none missing."""
    spec = CaseSpec(rule=rule, dtype="float64", B=2, T=9, H=1, K=4, V=4, m=3, R=1, initial_state=True, seed=3)
    inputs = make_inputs(spec)

    def second_order(backend):
        leaves = {n: inputs[n].clone().requires_grad_() for n in GRAD_INPUTS if inputs.get(n) is not None}
        with chunk_size(4):
            o, S = routed_scan(**dict(inputs, **leaves), output_final_state=True, backend=backend)
        grad_q, = torch.autograd.grad((o ** 2).sum() + (S ** 2).sum(), [leaves["q"]], create_graph=True)
        return dict(zip(leaves, torch.autograd.grad((grad_q ** 2).sum(), list(leaves.values()), allow_unused=True)))

    expected, got = second_order("reference"), second_order("chunked")
    for name, g in expected.items():
        assert g is not None and got[name] is not None, name
        assert_same(got[name], g, 1e-10, f"second-order gradient of {name}")


# Packing and selection.

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.sampled_from([(1, 1), (1, 3), (3, 3)]), st.integers(1, 7),
       st.integers(0, 2**31), st.booleans())
def test_packing_holds_each_slots_tokens_in_time_order(B, T, heads, m, seed, varlen):
    Hr, H = heads
    gen = torch.Generator().manual_seed(seed)
    R = int(torch.randint(1, m + 1, (), generator=gen))
    route_idx = torch.rand(B, T, Hr, m, generator=gen).argsort(-1)[..., :R]
    cu_seqlens = None
    if varlen:
        B = 1
        route_idx = route_idx[:1]
        cuts = torch.randperm(T - 1, generator=gen)[:int(torch.randint(0, T, (), generator=gen))] + 1
        cu_seqlens = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([T])])
    p = pack(route_idx, m, H, cu_seqlens)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    E = B * T * Hr * R
    assert sorted(p.entries.tolist()) == list(range(E))
    seen = 0
    for s, segment in enumerate(p.segments.tolist()):
        n, hr, slot = segment // (Hr * m), segment // m % Hr, segment % m
        entries = p.entries[p.offsets[s]:p.offsets[s + 1]].tolist()
        # the expected entries: every (token, route) of sequence n, group hr routed to `slot`, in time order
        expected = []
        for b in range(B):
            for t in range(T):
                seq = b if cu_seqlens is None else int((cu_seqlens[1:] <= t).sum())
                for r in range(R):
                    if seq == n and route_idx[b, t, hr, r] == slot:
                        expected.append(((b * T + t) * Hr + hr) * R + r)
        assert entries == expected
        seen += len(entries)
    assert seen == E and p.segments.unique().numel() == p.segments.numel()
    assert int(p.segments.max()) < N * Hr * m

    # positions invert the packing: route outputs laid out in packed order come back to their tokens.
    V = 2
    route_out = torch.randn(B, T, Hr, R, H // Hr, V, generator=gen, dtype=torch.float64)
    read_w = torch.rand(B, T, Hr, R, generator=gen, dtype=torch.float64)
    packed = route_out.reshape(E, H // Hr, V)[p.entries]
    expected = torch.einsum("bgrhv,bgr->bghv", route_out.reshape(B, T * Hr, R, H // Hr, V),
                            read_w.reshape(B, T * Hr, R)).reshape(B, T, H, V)
    assert_same(mix(take(packed, p.positions), read_w, p), expected, 1e-14, "mix of the packed outputs")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from(CHUNK_SIZES), st.sampled_from(BLOCK_ROWS),
       st.integers(0, 2**31))
def test_chunk_layout_gives_each_lane_its_own_chunks_in_order(T, m, size, block_rows, seed):
    route_idx = torch.randint(0, m, (2, T, 1, 1), generator=torch.Generator().manual_seed(seed))
    p = pack(route_idx, m, 1)
    chunks = chunk_layout(p, size, block_rows)
    assert sorted(chunks.lane_segments.tolist()) == p.segments.tolist()
    active = [a for block in chunks.blocks for a in block.active]
    assert active[0] == p.segments.numel() and active == sorted(active, reverse=True)
    global_row = {}  # entry -> row of the whole layout
    first_row = 0
    for b, block in enumerate(chunks.blocks):
        assert block.chunks == sum(block.active)
        assert block.following == (chunks.blocks[b + 1].active[0] if b + 1 < len(chunks.blocks) else 0)
        assert block.rows.unique().numel() == block.rows.numel() and int(block.rows.max()) < block.chunks * size
        global_row.update({e: first_row + r for e, r in zip(block.entries.tolist(), block.rows.tolist())})
        first_row += block.chunks * size
    assert sorted(global_row) == list(range(p.entries.numel()))
    used = set()
    for s in range(p.segments.numel()):
        rows = torch.tensor([global_row[e] for e in p.entries[p.offsets[s]:p.offsets[s + 1]].tolist()])
        # the segment fills its chunks from their first row, in time order, one chunk after the other
        assert (rows % size).tolist() == [i % size for i in range(rows.numel())] and (rows.diff() > 0).all()
        chunk_ids = set((rows // size).tolist())
        assert len(chunk_ids) == -(-rows.numel() // size) and not chunk_ids & used  # no chunk is shared
        used |= chunk_ids


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("Hr, per_route, block_rows", [(1, (), 1 << 15), (2, ("k", "beta"), 40)])
def test_one_slot_shortcut_computes_what_the_packed_path_computes(rule, Hr, per_route, block_rows):
    """One slot without cu_seqlens skips the packing (a reshape of the inputs); given the same
    sequences as one varlen batch, the backend packs them. Outputs, final states and every gradient
    agree, at a length that pads the last chunk and with blocks of one step."""
    problem = make_problem(rule=rule, coupling="dt", B=2, T=13, H=2, Hr=Hr, m=1, R=1, used=1, K=3, V=4,
                           per_route=per_route, with_state=True, read_w=True, seed=3)
    with chunk_size(5, block_rows):
        o, S, grads = with_grads(problem, "chunked")
        flat = {n: x if not isinstance(x, torch.Tensor) or n in ("initial_state", "num_slots") else
                x.reshape(1, 26, *x.shape[2:]) for n, x in problem.inputs.items()}
        varlen = replace(problem, inputs=dict(flat, cu_seqlens=torch.tensor([0, 13, 26])))
        o_packed, S_packed, grads_packed = with_grads(varlen, "chunked")
    assert_same(o, o_packed.reshape(o.shape), 1e-12, "o")
    assert_same(S, S_packed, 1e-12, "final state")
    for name, grad in grads.items():
        assert_same(grad, grads_packed[name].reshape(grad.shape), 1e-12, f"grad {name}")


@pytest.mark.parametrize("T, m, R, expected", [(32, 8, 2, 8), (64, 8, 2, 16), (2048, 8, 2, 32), (5, 4, 1, 8)])
def test_default_chunks_shrink_to_the_mean_packed_length(T, m, R, expected):
    route_idx = torch.arange(T * R).reshape(1, T, 1, R) % m  # every slot gets T R / m tokens
    assert chunked.default_chunk_size(pack(route_idx, m, 1)) == expected


def test_auto_picks_chunked_on_cpu():
    from memplug.registry import resolve_backend
    for rule in RULES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert resolve_backend("auto", torch.device("cpu"), dtype, get_rule(rule)).name == "chunked"
    assert "chunked" in memplug.available_backends()


def test_bench_runs_on_small_shapes(capsys):
    from memplug.experiments.bench import main
    threads = torch.get_num_threads()
    try:
        assert main(["--rule", "mamba2,kda", "--T", "32", "--long-T", "64", "--m", "2", "--many-slots", "4",
                     "--H", "2", "--K", "4", "--V", "4", "--ref-tokens", "8", "--repeats", "1",
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("goal") == 7 and "rule kda" in printed and "kda / gated_deltanet" in printed


@pytest.mark.parametrize("rule", ["mamba2", "deltanet", "gated_deltanet"])
@pytest.mark.parametrize("m, R", [(1, 1), (3, 2)])
def test_bench_peers_compute_what_chunked_computes(rule, m, R):
    """The CPU peers of `memplug bench --peers` (fla's chunk references, and a MoM-style loop over
    them) give chunked's outputs: the comparison is between equal computations."""
    pytest.importorskip("fla")
    from memplug.experiments.peers import _inputs, mom_loop, plain_peer

    x = _inputs(rule, 37, 2, 8, 4, m, R, False)
    ours = memplug.routed_scan(rule=rule, num_slots=m, coupling="none", backend="chunked", **x)[0]
    if m == 1:
        peer = plain_peer(rule, x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), 8 ** -0.5)
    else:
        peer = mom_loop(rule, x, m, 8 ** -0.5)
    torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-5)


def test_bench_peers_runs_on_small_shapes(capsys):
    pytest.importorskip("fla")
    from memplug.experiments.bench import main
    threads = torch.get_num_threads()
    try:
        assert main(["--peers", "--rule", "mamba2", "--T", "64", "--H", "1", "--K", "8", "--V", "8",
                     "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("mamba2") == 3 and "worst ratio" in printed and "quick-preset shapes" in printed
