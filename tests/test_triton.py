"""The `triton` backend (backends/triton) against the laws of docs/contract.md section 6 and the float64 reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow: the law checks draw few, small cases (`EXAMPLES`); on a GPU they draw more, and the
tests marked `cuda` add half precision, compiled kernels and a benchmark smoke run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memplug
import memplug.backends.triton as triton_backend
from memplug import routed_scan, routed_step
from memplug.checks import check_scan
from memplug.registry import get_backend, resolve_backend
from memplug.rules import get_rule
from memplug.testing import LAWS, CaseSpec, check_backend, make_inputs
from support.host_reads import count_host_reads
from support.nonfinite import assert_bitwise_equal, nan_filled_memory, scan_with_grads

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RULES = memplug.BUILT_IN_RULES
GRAD_INPUTS = ("q", "k", "v", "g", "beta", "route_w", "read_w", "initial_state")

pytestmark = pytest.mark.skipif(not get_backend("triton").available(),
                                reason="the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 (which "
                                       "tests/conftest.py sets on a machine without one)")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Hypothesis cases per (law, rule) in float32. The interpreter runs a few cases per second at best.
EXAMPLES = {law: (25 if CUDA else 3) for law in LAWS}
if not CUDA:
    # The non-finite-inputs law runs two forward passes a case, no backward: more cases cost little,
    # and a leak needs a case with earlier tokens in the poisoned token's chunk (12 find the one a
    # non-finite v caused in gla's output pass before it was fixed; 8 did not).
    EXAMPLES.update(reference_equality=4, chunk_size=2, backbone_reduction=2, zero_weight=2, nonfinite_inputs=12)
# Compiled kernels build one variant per shape and configuration: on a GPU the tests launch the first
# configuration (no autotuning) and draw K and V from two sizes (one needing masks), not five.
KIT = dict(device=DEVICE)
if CUDA:
    os.environ.setdefault("MEMPLUG_TRITON_AUTOTUNE", "0")
    KIT["dims"] = (12, 32)
# The chunk-size law's own lengths (longer than two chunks of 64 rows, with gradients) take about 8 s a
# case in the interpreter: there it runs on 40 tokens, which cross chunks of 16 and 32 rows.
MAX_T = {} if CUDA else {"chunk_size": 40}


@contextmanager
def chunk_size(size):
    old, triton_backend.CHUNK_SIZE = triton_backend.CHUNK_SIZE, size
    try:
        yield
    finally:
        triton_backend.CHUNK_SIZE = old


# ------------------------------------------------------------------------------------------ the laws

@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("rule", RULES)
def test_law_float32(rule, law):
    """Every law of docs/contract.md section 6 (through memplug.testing) in float32 against the float64 reference."""
    report = check_backend("triton", rules=[rule], dtypes=["float32"], laws=[law], max_examples=EXAMPLES[law],
                           max_T=MAX_T.get(law), **KIT)
    assert all(r.status == "passed" for r in report.results), str(report)


@pytest.mark.parametrize("rule", RULES)
def test_gradients_across_chunks(rule):
    """Reference equality (outputs, final states, every gradient) with chunks of 16 rows, so that packed
    sequences span several chunks and the state passes (forward and backward) carry states between them."""
    with chunk_size(16):
        report = check_backend("triton", rules=[rule], dtypes=["float32"], laws=["reference_equality"],
                               max_examples=EXAMPLES["reference_equality"], **KIT)
    assert report.results[0].status == "passed"


def _grads(spec, backend, chunk=None):
    """o, final states and the gradients of a random linear function of both w.r.t. every float input."""
    inputs = make_inputs(spec, DEVICE)
    leaves = [n for n in GRAD_INPUTS if inputs.get(n) is not None]
    inputs.update({n: inputs[n].detach().requires_grad_() for n in leaves})
    if chunk is None:
        o, S = routed_scan(**inputs, output_final_state=True, backend=backend)
    else:
        with chunk_size(chunk):
            o, S = routed_scan(**inputs, output_final_state=True, backend=backend)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((o.double() * do).sum() + (S.double() * dS).sum(), [inputs[n] for n in leaves],
                                allow_unused=True)
    return o, S, dict(zip(leaves, grads))


def _assert_close(name, got, want, rtol=1e-4):
    want = torch.zeros_like(got, dtype=torch.float64) if want is None else want.double()
    got = torch.zeros_like(want) if got is None else got.double()
    assert torch.isfinite(got).all(), f"{name}: NaN or inf"
    err = (got - want).abs().max().item()
    assert err <= 1e-6 + rtol * want.abs().max().item(), f"{name}: max error {err:.3e}"


LONG = dict(T=80, K=16, V=12, m=2, R=1, per_route=("k", "v", "g", "beta"), chunk=16)
WIDE = dict(T=24, K=20, V=72, m=3, R=2, per_route=("v",), chunk=32)


@pytest.mark.parametrize("shape", ["long", "wide"])
@pytest.mark.parametrize("rule", RULES)
def test_long_sequences_and_wide_values(rule, shape, monkeypatch):
    """long: one slot's tokens over many chunks (m = 2, T = 80, chunks of 16: five chunks per packed
    sequence), per-route inputs. wide: V = 72 and K = 20, so that values span several blocks of the
    V loops and grids (two of 64, or three of 32; the last one ragged), keys a padded block, in the
    kernels that take keys in blocks (output, dd_local, gradient, WY, per-channel attention forward)
    two blocks of 16 (the last one ragged), in the state kernels a chunk's rows in two blocks of 16,
    and a per-channel decay's cumulative sums in two blocks of 16 channels. Both with an initial state
    and a routing shared by the heads: o, final states and every gradient."""
    if shape == "wide":
        monkeypatch.setattr("memplug.backends.triton.common.KEY_BLOCK", 16)
        monkeypatch.setattr("memplug.backends.triton.common.ROW_TILE_BYTES", 1)
        monkeypatch.setattr("memplug.backends.triton.chunk.CHANNEL_BLOCK", 16)
    kw = dict(LONG if shape == "long" else WIDE)
    chunk = kw.pop("chunk")
    spec = CaseSpec(rule=rule, dtype="float32", B=1, H=2, Hr=1, initial_state=True, read_w=True, seed=11, **kw)
    o, S, grads = _grads(spec, "triton", chunk=chunk)
    o_ref, S_ref, grads_ref = _grads(spec.but(dtype="float64"), "reference")
    _assert_close("o", o, o_ref)
    _assert_close("final_state", S, S_ref)
    for name in grads_ref:
        _assert_close(f"grad {name}", grads[name], grads_ref[name], rtol=3e-4)


@pytest.mark.parametrize("rule", ["mamba2", "gla", "gated_deltanet"])
def test_strong_decays_stay_finite_and_exact(rule):
    """Log-decays of -20 to -30 per token: a chunk's decay sums reach about -500, yet nothing overflows
    and the result equals the reference (the kernels only exponentiate differences that are <= 0)."""
    spec = CaseSpec(rule=rule, dtype="float32", B=1, T=40, H=1, K=16, V=8, m=2, R=1, coupling="none",
                    initial_state=True, seed=5)
    inputs = make_inputs(spec, DEVICE)
    inputs["g"] = -20 - 10 * torch.rand_like(inputs["g"])
    o, S = routed_scan(**inputs, output_final_state=True, backend="triton")
    ref = {n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in inputs.items()}
    o_ref, S_ref = routed_scan(**ref, output_final_state=True, backend="reference")
    _assert_close("o", o, o_ref)
    _assert_close("final_state", S, S_ref)


def test_fm_gate_of_one_wipes_the_slot_without_nan():
    """fm with route_w * beta = 1: the forget gate 1 - w*beta is 0 (log-decay -inf), the slot is wiped;
    the kernels' decay floor keeps the decay sums finite."""
    spec = CaseSpec(rule="fm", dtype="float32", B=1, T=20, H=1, K=8, V=8, m=2, R=1, initial_state=True, seed=3)
    inputs = make_inputs(spec, DEVICE)
    inputs["route_w"] = torch.ones_like(inputs["route_w"])
    inputs["beta"] = inputs["beta"].clone()
    inputs["beta"][0, 7] = 1.0
    o, S = routed_scan(**inputs, output_final_state=True, backend="triton")
    ref = {n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in inputs.items()}
    o_ref, S_ref = routed_scan(**ref, output_final_state=True, backend="reference")
    _assert_close("o", o, o_ref)
    _assert_close("final_state", S, S_ref)


@pytest.mark.parametrize("rule", RULES)
def test_memory_it_never_wrote_is_never_read(rule):
    """With every uninitialized allocation (the kernels' buffers, made with torch.empty) filled with
    NaN, o, final states and every gradient are bit for bit those of a normal run: no kernel reads a
    row past its packed sequence's end or an unwritten part of a buffer. Three packed sequences of
    5, 40 and 12 tokens, each routed to both slots, chunks of 32 rows: the 40 tokens span a full chunk
    (two sub-chunks of the intra-chunk attention) and a part-filled one, the others one part-filled
    chunk each."""
    spec = CaseSpec(rule=rule, dtype="float32", B=1, T=57, H=2, K=12, V=6, m=2, R=2, seqlens=(5, 40, 12),
                    initial_state=True, read_w=True, per_route=("v",), seed=2)
    inputs = make_inputs(spec, DEVICE)
    with chunk_size(32):
        expected = scan_with_grads(inputs, "triton")
        with nan_filled_memory():
            got = scan_with_grads(inputs, "triton")
    assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("wrt", ["q", "route_w", "read_w"])
def test_higher_order_gradients_raise_a_clear_error(wrt):
    """A gradient taken with create_graph=True (the first step of double backward) raises a
    RuntimeError that names memplug and the backends with higher-order gradients: for q, reached
    through the kernels only; for route_w, reached also through the coupling in PyTorch, where a
    silently partial second-order result came back before; for read_w, reached through the combine
    kernels only."""
    inputs = make_inputs(CaseSpec(rule="gated_deltanet", dtype="float32", T=6, K=4, V=4, m=2, R=1, read_w=True,
                                  seed=3), DEVICE)
    leaf = inputs[wrt].clone().requires_grad_()
    o, _ = routed_scan(**dict(inputs, **{wrt: leaf}), backend="triton")
    with pytest.raises(RuntimeError, match=r"memplug: backend 'triton' has first-order gradients only.*"
                                           r"use backend='chunked' or backend='reference'"):
        torch.autograd.grad((o ** 2).sum(), [leaf], create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 9), m=st.integers(1, 5), R=st.integers(1, 3), Hr=st.sampled_from([1, 3]),
       V=st.integers(1, 40), weight_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_the_combine_kernels_mix_the_packed_route_outputs_into_tokens(dtype, B, T, m, R, Hr, V, weight_grad, seed):
    """The combine kernels against the same mix in PyTorch (`packing.mix` of the route outputs brought
    into entry order through `Packing.positions`), in float64: the output, in the input dtype, and
    the gradients of the route outputs (in the input dtype, as the scan's backward takes them) and of
    the read weights (float32, when they ask for one)."""
    from memplug.backends.packing import mix, pack, take
    from memplug.backends.triton.combine import Combine

    gen = torch.Generator().manual_seed(seed)
    H = 3
    R = min(R, m)
    route_idx = torch.rand(B * T * Hr, m, generator=gen).argsort(-1)[:, :R].reshape(B, T, Hr, R)
    p = pack(route_idx, m, H, every_segment=True)
    out = torch.randn(p.entries.numel(), H // Hr, V, generator=gen, requires_grad=True)
    read_w = torch.rand(B, T, Hr, R, generator=gen).requires_grad_(weight_grad)
    do = torch.randn(B, T, H, V, generator=gen).to(dtype)
    o = Combine.apply(out, read_w, p.positions, dtype)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    o.backward(do)
    leaves = (out, read_w) if weight_grad else (out,)
    grads = [x.grad for x in leaves]
    expected = mix(take(out.double(), p.positions), read_w.double(), p)
    expected_grads = torch.autograd.grad(expected, leaves, do.double())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(o.double(), expected, **tol)
    torch.testing.assert_close(grads[0].double(), expected_grads[0].double(), **tol)
    if weight_grad:
        assert grads[1].dtype == read_w.dtype
        torch.testing.assert_close(grads[1].double(), expected_grads[1].double(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- decode

def _step_inputs(rule, m=6, R=2, B=2, H=3, K=8, V=12, seed=0):
    """Keyword arguments of routed_step (one token) and the state."""
    spec = CaseSpec(rule=rule, dtype="float32", B=B, T=1, H=H, Hr=H, K=K, V=V, m=m, R=R, initial_state=True,
                    per_route=("v",), read_w=True, seed=seed)
    inputs = make_inputs(spec, DEVICE)
    state = inputs.pop("initial_state")
    for name in ("num_slots", "cu_seqlens"):
        inputs.pop(name)
    return inputs, state


@pytest.mark.parametrize("rule", RULES)
def test_decode_kernel_updates_only_the_routed_slots_in_place(rule, monkeypatch):
    """routed_step runs the decode kernel (not the reference step), writes into `state` itself, leaves
    every slot it does not route to bit for bit, and equals the reference; a non-contiguous state (a
    view whose slots are the outermost dimension in memory) is updated in place too."""
    import memplug.backends.reference as reference

    inputs, state = _step_inputs(rule)
    expected_o, expected = routed_step(**inputs, state=state.clone(), backend="reference")

    def no_reference(*args, **kwargs):
        raise AssertionError("routed_step(backend='triton') fell back to the reference step")
    monkeypatch.setattr(reference, "reference_step", no_reference)

    routed = torch.zeros(state.shape[:3], dtype=torch.bool, device=state.device)
    routed.scatter_(2, inputs["route_idx"][:, 0], True)
    for layout in ("contiguous", "slot-major"):
        if layout == "contiguous":
            mine = state.clone()
        else:
            mine = state.permute(2, 0, 1, 3, 4).contiguous().permute(1, 2, 0, 3, 4)
        before, ptr = mine.clone(), mine.data_ptr()
        o, out = routed_step(**inputs, state=mine, backend="triton")
        assert out is mine and out.data_ptr() == ptr
        assert torch.equal(out[~routed], before[~routed])
        _assert_close(f"o ({layout})", o, expected_o)
        _assert_close(f"state ({layout})", out, expected)


def test_decode_with_grad_falls_back_to_the_differentiable_reference_step():
    inputs, state = _step_inputs("gated_deltanet")
    state.requires_grad_()
    o, out = routed_step(**inputs, state=state, backend="triton")
    o.sum().backward()
    assert state.grad is not None and torch.isfinite(state.grad).all()
    args = check_scan(**dict(inputs, rule=get_rule(inputs["rule"]), num_slots=state.shape[2], initial_state=state,
                             output_final_state=True, cu_seqlens=None, check_values=False))
    assert "autograd records the step" in get_backend("triton").why_not_step(args)


# ------------------------------------------------------------------------------------ registration

def test_registration():
    backend = get_backend("triton")
    assert backend.step is triton_backend.triton_step
    assert torch.float64 not in backend.dtypes and {torch.float32, torch.float16, torch.bfloat16} <= set(backend.dtypes)
    assert backend.priority["cuda"] == 20
    assert backend.chunk_sizes == (16, 32, 64)
    for rule in RULES:
        # "auto" picks triton on CUDA, and never the interpreter on CPU
        assert resolve_backend("auto", torch.device("cpu"), torch.float32, get_rule(rule)).name != "triton"
        if CUDA:
            assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, get_rule(rule)).name == "triton"
    if not CUDA:
        assert backend.priority["cpu"] < get_backend("chunked").priority["cpu"]


def test_bad_chunk_size_and_dtype():
    inputs = make_inputs(CaseSpec(rule="mamba2", dtype="float32"), DEVICE)
    args = check_scan(**dict(inputs, rule=get_rule("mamba2"), output_final_state=False))
    for size in (8, 24, 128):
        with pytest.raises(ValueError, match="chunk_size"):
            triton_backend.triton_scan(args, chunk_size=size)
    with pytest.raises(ValueError, match="triton"):
        routed_scan(**make_inputs(CaseSpec(rule="mamba2", dtype="float64"), DEVICE), backend="triton")


def test_one_slot_skips_the_sort_with_the_same_packing():
    """m = 1 with one routing for all heads packs in token order without sorting; that is what `pack`
    computes (with and without packed sequences)."""
    from memplug.backends.packing import pack
    for B, T, cu in ((2, 5, None), (1, 10, torch.tensor([0, 2, 7, 10]))):
        mine = triton_backend._token_order_packing(B, T, 3, cu, "cpu")
        theirs = pack(torch.zeros(B, T, 1, 1, dtype=torch.long), 1, 3, cu)
        for field in ("entries", "offsets", "segments"):
            assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
        assert (mine.B, mine.T, mine.H, mine.Hr, mine.R, mine.m, mine.N) == \
               (theirs.B, theirs.T, theirs.H, theirs.Hr, theirs.R, theirs.m, theirs.N)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=6), BT=st.sampled_from(triton_backend.CHUNK_SIZES),
       equal=st.booleans())
def test_the_chunk_layout_is_sized_from_shapes_and_skips_past_its_real_chunks(lengths, BT, equal):
    """`varlen_chunks` takes the number of rows, not their spread, so it reads nothing back; its chunks
    are every sequence's chunks in order (empty sequences have none), then chunks with no rows. Given
    the one length of every sequence, it is sized exactly."""
    from memplug.backends.triton.function import max_chunks, varlen_chunks
    if equal:
        lengths = [lengths[0] or 1] * len(lengths)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    rows = sum(lengths)
    length = lengths[0] if equal else None
    with count_host_reads(operators=True) as reads:
        layout = varlen_chunks(offsets, rows, BT, length)
    assert reads == []
    real = [(s, j) for s, L in enumerate(lengths) for j in range(-(-L // BT))]
    assert layout.num_chunks == max_chunks(rows, len(lengths), BT, length) >= len(real)
    if equal:
        assert layout.num_chunks == len(real)
    assert layout.chunk_indices[:len(real)].tolist() == [list(c) for c in real]
    assert layout.chunk_offsets.tolist() == [sum(-(-L // BT) for L in lengths[:s]) for s in range(len(lengths) + 1)]
    for s, j in layout.chunk_indices[len(real):].tolist():  # no rows: start at or past its sequence's end
        assert offsets[s] + j * BT >= offsets[s + 1]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("routing", ["one_slot", "routed_per_head"])
def test_a_scan_and_its_backward_read_nothing_back(rule, routing):
    """With value checks off, `routed_scan` forward and backward on `triton` reads no tensor value
    back to the host (no sync on a GPU), with packed sequences, slot states in and out, and slots
    no token routes to (whose final states are their initial ones, bit for bit)."""
    r = get_rule(rule)
    T, H, K, V = 21, 2, 16, 24
    m, R = (1, 1) if routing == "one_slot" else (5, 2)
    Hr = 1 if routing == "one_slot" else H
    gen = torch.Generator().manual_seed(0)
    x = dict(q=torch.randn(1, T, H, K, generator=gen), v=torch.randn(1, T, H, V, generator=gen),
             k=torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1))
    if r.g is not None:
        x["g"] = -torch.rand(1, T, H, *((K,) if r.g == "vector" else ()), generator=gen)
    if r.beta:
        x["beta"] = 0.9 * torch.rand(1, T, H, generator=gen)
    x["route_w"] = torch.rand(1, T, Hr, R, generator=gen)
    x["initial_state"] = torch.randn(3, H, m, K, V, generator=gen)
    route_idx = torch.stack([torch.randperm(m - 1, generator=gen)[:R] for _ in range(T * Hr)]).view(1, T, Hr, R) \
        if m > 1 else torch.zeros(1, T, 1, 1, dtype=torch.long)  # slot m - 1 is never routed to
    for t in x.values():
        t.requires_grad_()
    with count_host_reads(operators=True) as reads:
        o, final = routed_scan(**x, rule=rule, route_idx=route_idx, num_slots=m, cu_seqlens=torch.tensor([0, 5, 12, T]),
                               backend="triton", output_final_state=True, check_values=False)
        (o.sum() + final.square().sum()).backward()
    assert reads == [], reads
    if m > 1:
        assert torch.equal(final[:, :, -1], x["initial_state"][:, :, -1])
        assert torch.equal(x["initial_state"].grad[:, :, -1], 2 * x["initial_state"][:, :, -1])


@pytest.mark.parametrize("rule", RULES)
def test_laws_float16(rule):
    """Every law in float16 inputs (float32 states and accumulation) against the float64 reference,
    gradients included, in the interpreter too: one case per law there (two took up to 3 minutes a
    rule; float32 draws more, and in the interpreter, whose products are exact, float16 differs from
    float32 in its casts and tolerances only). (bfloat16 products are wrong in Triton's interpreter:
    bfloat16 is checked on a GPU only, by `test_laws_half_precision`.)"""
    report = check_backend("triton", rules=[rule], dtypes=["float16"], max_examples=2 if CUDA else 1,
                           max_T=MAX_T.get("chunk_size"), **KIT)
    assert len(report.results) == len(LAWS) and all(r.status == "passed" for r in report.results), str(report)


def test_wide_keys_are_declared_not_taken():
    """K > 256 (one state block per program) is declared to the registry: asking for triton by name is
    an error that says why, "auto" runs another backend, and a decode step runs the reference step."""
    spec = CaseSpec(rule="gated_deltanet", dtype="float32", T=3, K=272, V=4, m=2, R=1, initial_state=True)
    inputs = make_inputs(spec, DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' does not take these inputs: K = 272 > 256"):
        routed_scan(**inputs, backend="triton")
    args = check_scan(**dict(inputs, rule=get_rule("gated_deltanet"), output_final_state=True))
    triton = get_backend("triton")
    assert "K = 272 > 256" in triton.why_not(args.q.device, args.q.dtype, args.rule, args)
    assert "K = 272 > 256" in triton.why_not_step(args)
    assert resolve_backend("auto", torch.device(DEVICE), torch.float32, args.rule, args).name != "triton"
    narrow = check_scan(**dict(make_inputs(spec.but(K=8), DEVICE), rule=args.rule, output_final_state=True))
    assert triton.why_not(narrow.q.device, narrow.q.dtype, narrow.rule, narrow) is None


# --------------------------------------------------------------------------------- compiled kernels

@pytest.mark.skipif(os.environ.get("MEMPLUG_COMPILE_CHECK") != "1",
                    reason="compiles every kernel for sm_90 with Triton's compiler and ptxas on the CPU (tens of "
                           "minutes on two cores); set MEMPLUG_COMPILE_CHECK=1 to run it")
def test_kernels_compile_for_h100():
    """Every kernel, for each family it serves, in float32 and bfloat16, under its first and last
    autotuning configuration, compiles for sm_90 and fits its shared memory, in a subprocess without
    TRITON_INTERPRET (backends/triton/compile_check.py)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "memplug.backends.triton.compile_check", "--quiet"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", RULES)
@settings(max_examples=4, deadline=None)
@given(T=st.integers(1, 80), split=st.integers(0, 80), seed=st.integers(0, 2**16))
def test_a_constant_read_weight_is_applied_in_the_output_kernel(rule, dtype, T, split, seed):
    """One slot whose read weight gets no gradient (a layer's constant 1; here 0.5 to 1.5 per token,
    over one or two packed sequences): the output kernel weighs the rows and writes the output in the
    input dtype, and the kernels that read dO weigh it. Outputs, final states and gradients equal the
    float64 reference's."""
    torch.manual_seed(seed)
    r = get_rule(rule)
    H, K, V = 2, 16, 24
    x = dict(q=torch.randn(1, T, H, K), k=torch.nn.functional.normalize(torch.randn(1, T, H, K), dim=-1),
             v=torch.randn(1, T, H, V))
    if r.g is not None:
        x["g"] = -torch.rand(1, T, H, *((K,) if r.g == "vector" else ()))
    if r.beta:
        x["beta"] = 0.9 * torch.rand(1, T, H)
    weight = 0.5 + torch.rand(1, T, 1, 1)  # no gradient
    cu_seqlens = torch.tensor(sorted({0, min(split, T), T}))
    results = {}
    for backend in ("reference", "triton"):
        leaves = {n: t.to(torch.float64 if backend == "reference" else dtype if n in "qkv" else torch.float32)
                  .requires_grad_() for n, t in x.items()}
        o, final = routed_scan(**leaves, rule=rule, route_idx=torch.zeros(1, T, 1, 1, dtype=torch.long),
                               route_w=weight.to(leaves["q"].dtype if backend == "reference" else torch.float32),
                               num_slots=1, coupling="none", cu_seqlens=cu_seqlens, backend=backend,
                               output_final_state=True)
        assert o.dtype == leaves["q"].dtype
        (o.double().sin().sum() + final.double().sum()).backward()
        results[backend] = [o, final] + [leaves[n].grad for n in x]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for mine, ref in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(mine.double(), ref.double(), **tol)


def test_compile_check_reports_what_ptxas_makes_of_a_real_launch(tmp_path):
    """One kernel compiled for sm_90 as a launch specializes it, with its registers, spills, shared
    memory and occupancy in the table (`compile_check --table`)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "-m", "memplug.backends.triton.compile_check", "--quiet", "--kernels",
                           "cumsum_kernel", "--families", "delta", "--dtypes", "bfloat16", "--table", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| cumsum_kernel")]
    assert [r[5] for r in rows] == ["REVERSE=0", "REVERSE=1"]  # the forward and the reverse sum
    from memplug.backends.triton.chunk import cumsum_kernel
    from memplug.backends.triton.compile_check import _config_label
    for r in rows:  # the first configuration: its registers, no spill
        assert r[7] == _config_label(cumsum_kernel.configs[0]) and int(r[8]) > 0 and r[9] == "0/0"
    assert "- the first configuration fits and is spill-free (K = V <= 128): PASS (2 cases)" in text
    assert "- no configuration that can run spills (K = 256): not checked (no case of it compiled)" in text


def test_the_first_configuration_must_fit_and_not_spill():
    """What runs with autotuning off is the first configuration: a case misses the goal if it spills
    or needs more shared memory than an H100 has, even when a later configuration is fine."""
    from memplug.backends.triton.compile_check import H100_SHARED_MEMORY, Case, Report, goals
    fine, spills, too_big = Report(128, 0, 0, 1024, 4), Report(255, 8, 8, 1024, 4), Report(128, 0, 0, 240 * 1024, 8)
    cases = [Case(f"kernel_{i}", "family", "float32", 128, 64, "", {"first": first, "last": fine})
             for i, first in enumerate((fine, spills, too_big))]
    assert too_big.shared > H100_SHARED_MEMORY
    (label, missed, applies), (_, none_spill_free, _), _ = goals(cases)
    assert label.startswith("the first configuration fits and is spill-free") and applies == 3
    assert [m.split(" ")[0] for m in missed] == ["kernel_1", "kernel_2"]
    assert none_spill_free == []  # each has a spill-free configuration that fits


def test_configurations_holding_a_state_tile_are_pruned_by_its_width():
    """A [K, BV] float32 state tile over more than TILE_REGISTERS registers per thread is pruned (for
    autotuning and without it); if every configuration is over, those with the fewest are kept."""
    import triton

    from memplug.backends.triton import chunk, decode
    from memplug.backends.triton.common import TILE_REGISTERS, Tuned, fitting_state_tiles
    label = lambda configs: [f"BV{c.kwargs['BV']} w{c.num_warps}" for c in configs]
    state = chunk.state_fwd_kernel
    assert len(state.candidates(torch.bfloat16, {"K": 64})) == len(state.configs)  # every tile fits
    assert "BV64 w4" not in label(state.candidates(torch.bfloat16, {"K": 128}))  # 64 registers a thread
    assert set(label(state.candidates(torch.bfloat16, {"K": 256}))) == {"BV32 w8"}
    assert label(decode.step_kernel.candidates(None, {"K": 256})) == ["BV32 w4"]  # over, but the fewest
    assert TILE_REGISTERS == 32

    # Without autotuning the launch takes the first configuration that is kept, for the dtype of k.
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kwargs: launched.append(kwargs["BV"])

    configs = [triton.Config({"BV": 64}, num_warps=4), triton.Config({"BV": 32}, num_warps=4)]
    kernel = Tuned(Kernel(), configs, ["K"], {}, float32_first=triton.Config({"BV": 16}, num_warps=4),
                   prune=fitting_state_tiles)
    kernel.tuner = None
    for K, dtype in ((32, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32)):
        kernel[(1,)](k=torch.empty(0, dtype=dtype), K=K)
    assert launched == [64, 32, 16]
    # The float32 first configuration is a candidate for float32 keys only, autotuned or not.
    assert label(kernel.candidates(torch.bfloat16, {"K": 32})) == ["BV64 w4", "BV32 w4"]
    assert label(kernel.candidates(torch.float32, {"K": 32})) == ["BV16 w4", "BV64 w4", "BV32 w4"]
    assert label(kernel._for_launch(kernel.configs, {"k": torch.empty(0, dtype=torch.float16)}, K=32)) == [
        "BV64 w4", "BV32 w4"]


def test_occupancy_is_limited_by_registers_shared_memory_and_blocks():
    from memplug.backends.triton.compile_check import Report
    # Review figures (sm_90): 126 registers, 80 KB of shared memory, 4 warps: shared memory allows 2 blocks.
    assert Report(126, 0, 0, 82180, 4).warps_per_sm == 8
    assert Report(255, 136, 136, 96 * 1024, 8).warps_per_sm == 8  # registers allow one block of 8 warps
    assert Report(18, 0, 0, 0, 1).warps_per_sm == 32  # at most 32 blocks
    assert Report(18, 0, 0, 0, 4).spills is False and Report(18, 4, 0, 0, 4).spills is True


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES)
def test_laws_half_precision(rule, dtype):
    """Every law in float16 and bfloat16 inputs (float32 states and accumulation), compiled kernels."""
    report = check_backend("triton", rules=[rule], dtypes=[dtype], max_examples=10, **KIT)
    assert all(r.status == "passed" for r in report.results), str(report)


# ------------------------------------------------------------------------------------------ benchmark

def test_bench_cuda_says_it_needs_a_gpu():
    from memplug.experiments import bench
    if CUDA:
        pytest.skip("a GPU is present: test_bench_cuda_smoke runs the benchmark")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--device", "cuda", "--smoke"])


def test_bench_mom_baseline_computes_the_same_layer(monkeypatch):
    """The CUDA benchmark's baseline, fla's MoM routing path (fla.layers.mom transform / unpad / varlen
    scan / pad / reconstruct), computes what routed_scan computes (coupling none, routing shared by the
    heads): checked on the CPU with fla's Triton scan replaced by the reference recurrence.

    fla's `transform` orders the route entries with a non-stable `argsort`, which on the CPU (beyond 16
    entries) does not keep a memory's tokens in time order; the test makes that sort stable, so that
    it checks the path's plumbing, not that ordering."""
    pytest.importorskip("fla.layers.mom")
    from memplug.experiments.bench_cuda import cuda_inputs, fla_mom_path

    argsort = torch.Tensor.argsort
    monkeypatch.setattr(torch.Tensor, "argsort", lambda self, *a, **kw: argsort(self, *a, **dict(kw, stable=True)))

    x = cuda_inputs("gated_deltanet", B=2, T=12, H=2, K=8, V=4, m=4, R=2, dtype=torch.float32, device="cpu",
                    requires_grad=False)

    def chunk_fn(q, k, v, g, beta, cu_seqlens):
        outs = []
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            L = e - s
            o, _ = routed_scan(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], rule="gated_deltanet",
                               route_idx=torch.zeros(1, L, 1, 1, dtype=torch.long), route_w=torch.ones(1, L, 1, 1),
                               num_slots=1, coupling="none", backend="reference")
            outs.append(o)
        return torch.cat(outs, 1), None

    o = fla_mom_path(x["q"], x["k"], x["v"], x["g"], x["beta"], x["route_idx"][:, :, 0], x["route_w"][:, :, 0], 4,
                     chunk_fn=chunk_fn)
    o_ref, _ = routed_scan(**x, backend="chunked")
    _assert_close("o", o, o_ref)


def test_bench_agreement_sees_a_few_wrong_rows_and_nan():
    """The benchmark's agreement check: one wrong token of 2048 (zeroed) is within the bound on the
    whole (its share of the norm is small) but not on its row; NaN never agrees; rounding agrees.
    Nothing here draws from the global random state: the whole-norm error must not depend on test order."""
    from memplug.experiments.bench_cuda import AGREEMENT, agreement
    theirs = torch.randn(2048, 2, 16, generator=torch.Generator().manual_seed(0))
    bound = AGREEMENT[torch.bfloat16]
    one_row = theirs.clone()
    one_row[100] = 0
    nan = theirs.clone()
    nan[0, 0, 0] = float("nan")
    failures = []
    agreement("rounded", {"o": (theirs.bfloat16(), theirs, bound)}, failures)
    assert failures == []
    agreement("one row", {"o": (one_row, theirs, bound)}, failures)
    assert ((one_row - theirs).norm() / theirs.norm()).item() < bound and failures == ["one row"]
    agreement("nan", {"o": (nan, theirs, bound), "other": (theirs, theirs, bound)}, failures)
    assert failures == ["one row", "nan"]


def test_bench_cuda_comparisons_run_in_the_interpreter():
    """Every comparison of `memplug bench --device cuda` (triton against fla's four chunk kernels, fla's
    MoM path at m = 4 and 16, R = 2 against dense (here at m = 8), decode against fla's fused recurrent step)
    runs end to end, with fla's own kernels, on the CPU in Triton's interpreter
    (tests/support/bench_interpret.py, in its own process: fla's kernels need the interpreter patches
    before fla is imported). Its times mean nothing; what it checks is that a GPU run will not stop
    on a wrong call, and that each comparison's two sides compute the same outputs."""
    if CUDA:
        pytest.skip("on a GPU, test_bench_cuda_smoke runs these comparisons compiled")
    pytest.importorskip("fla.layers.mom")
    from memplug.experiments.bench_cuda import FLA_PLAIN
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "bench_interpret.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for path in FLA_PLAIN.values():
        assert f"fla {path.rsplit('.', 1)[1]}" in out
    assert sum("fla MoM path" in line and " fwd " in line for line in out.splitlines()) == 2  # timed
    assert "fla fused_recurrent_gated_delta_rule" in out
    assert "R=2 / dense fwd+bwd" in out and "(no goal: it is for m = 64)" in out  # run at m = 8
    verdicts = out.count("PASS") + out.count("MISS")
    assert verdicts == len(FLA_PLAIN) + 2 + 2, out  # m = 1 rules, MoM m = 4 and 16, two decodes
    assert out.count(" agree? ") == verdicts and out.count("  yes") == verdicts, out


@cuda
@needs_cuda
def test_bench_cuda_smoke(capsys):
    from memplug.experiments import bench, bench_cuda
    assert bench.main(["--device", "cuda", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") + out.count("MISS") >= 4 + len(bench_cuda.FLA_PLAIN)
