"""The hot path: a cached decode step reads no tensor value back into Python (on a GPU, each read is
a host sync), and a training forward reads only what the chunked backend's packing needs.

Reads are counted on the CPU by patching the Tensor methods that make them
(`tests/support/host_reads.py`); on a GPU, a decode loop runs under
`torch.cuda.set_sync_debug_mode("error")`, which also sees syncs made inside operators.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import memplug
from memplug import FactorizationMemory, MixtureOfMemories, RoutedMemory, routed_scan, routed_step

sys.path.insert(0, str(Path(__file__).parent))
from support.host_reads import count_host_reads  # noqa: E402

D, H, K, V = 16, 2, 4, 6

LAYERS = {
    "routed": lambda: RoutedMemory(D, H, K, V, num_slots=4, topk=2),
    "backbone": lambda: RoutedMemory(D, H, K, V, num_slots=1, topk=1, coupling="none"),
    "dense": lambda: RoutedMemory(D, H, K, V, rule="gla", num_slots=3, topk=3, router={"kind": "dense"}),
    "threshold": lambda: RoutedMemory(D, H, K, V, rule="deltanet", num_slots=4, topk=2,
                                      router={"kind": "threshold", "threshold": 0.3, "per_head": True}),
    "fm": lambda: FactorizationMemory(D, H, K, V),
    "mom": lambda: MixtureOfMemories(D, H, K, V),
}
# Scans a training forward runs: (scans over several slots, scans over one slot). MoM's shared slot is
# a one-slot scan, and so is the backbone's.
SCANS = {"routed": (1, 0), "backbone": (0, 1), "dense": (1, 0), "threshold": (1, 0), "fm": (1, 0), "mom": (1, 1)}
# What the chunked backend reads per scan on the CPU: 4 lists for its chunk layout (sizes of the
# blocks, which chunks are active) where there are several slots to pack (one slot's layout is a
# reshape, read nothing), and at most 3 finiteness sums (of the keys, the values and, for the delta
# families, the WY transform's right-hand side), which on the CPU spare a pass when they are finite
# (elsewhere that pass is always made, and nothing is read).
LAYOUT_READS, FINITENESS_READS = 4, 3


def _x(T, seed=0):
    return torch.randn(2, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_decode_step_reads_nothing_back(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = _x(6)
    with torch.no_grad():
        _, cache, _ = layer(x[:, :5], use_cache=True)
        with count_host_reads(operators=True) as reads:
            y, _, _ = layer(x[:, 5:], cache=cache)
    assert reads == [], reads
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_training_forward_reads_only_what_the_packing_needs(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    with count_host_reads() as reads:
        y, _, aux = layer(_x(12))
        (y.sum() + aux["aux_loss"]).backward()
    packed, one_slot = SCANS[name]
    assert reads.count("tolist") == packed * LAYOUT_READS, reads
    assert reads.count("__bool__") <= (packed + one_slot) * FINITENESS_READS, reads
    assert set(reads) <= {"tolist", "__bool__"}, reads


def _step_inputs():
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=gen)
    return dict(q=rand(2, 1, H, K), k=rand(2, 1, H, K), v=rand(2, 1, H, V), rule="gated_deltanet",
                route_idx=torch.tensor([0, 2, 1, 0]).reshape(2, 1, 1, 2), route_w=rand(2, 1, 1, 2),
                g=-rand(2, 1, H), beta=rand(2, 1, H), state=torch.zeros(2, H, 3, K, V), backend="reference")


def test_routed_step_checks_values_unless_told_not_to():
    with count_host_reads() as reads:
        routed_step(**_step_inputs())
    assert reads, "the value checks read nothing"
    with count_host_reads() as reads:
        routed_step(**_step_inputs(), check_values=False)
    assert reads == []
    bad = dict(_step_inputs(), beta=torch.full((2, 1, H), 2.0))
    with pytest.raises(ValueError, match="beta"):
        routed_step(**bad)
    with pytest.raises(TypeError, match="check_values"):
        routed_step(**_step_inputs(), check_values=0)


def test_shape_checks_stay_on_without_value_checks():
    bad = dict(_step_inputs(), g=-torch.rand(2, 1, H + 1))
    with pytest.raises(ValueError, match="g: expected shape"):
        routed_step(**bad, check_values=False)
    kw = _step_inputs()
    state = kw.pop("state")
    with pytest.raises(ValueError, match="initial_state"):
        routed_scan(**kw, num_slots=4, initial_state=state, check_values=False)


# --------------------------------------------------------------------------------------------------
# Wrapped fla layers


def _adapter_cases():
    from support.fla_cases import CASES
    first = {}
    for name, (cls, _, _) in CASES.items():
        first.setdefault(cls.rsplit(".", 1)[-1], name)
    return sorted(first.values())


def _wrapped_and_prefilled(case, shared_slot, device="cpu"):
    """A wrapped fla layer (3 slots, top-2; with `shared_slot`, MoM's options), a left-padded batch of
    6 tokens, and fla's cache after the first 5 of them."""
    pytest.importorskip("fla")
    from fla.models.utils import Cache

    from memplug.adapters import wrap
    from support.fla_cases import D as width, build

    warnings.filterwarnings("ignore", message=".*(ShortConvolution|fast path|Triton|causal_conv1d).*")
    options = dict(coupling="none", shared_slot=True, router={"per_head": True, "load_balance_coef": 0.01}) \
        if shared_slot else {}
    routed = wrap(build(case), num_slots=3, topk=2, **options).to(device)
    x = torch.randn(2, 6, width, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(2, 6, dtype=torch.long, device=device)
    mask[0, :2] = 0  # left padding, as generate decodes a batch
    cache = Cache()
    with torch.no_grad():
        routed(x[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
    return routed, x, mask, cache


@pytest.mark.parametrize("case", _adapter_cases())
@pytest.mark.parametrize("shared_slot", [False, True])
def test_a_wrapped_fla_layer_decodes_without_reads(case, shared_slot):
    routed, x, mask, cache = _wrapped_and_prefilled(case, shared_slot)
    with torch.no_grad(), count_host_reads(operators=True) as reads:
        y = routed(x[:, 5:], attention_mask=mask, past_key_values=cache, use_cache=True)[0]
    assert reads == [], reads
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_decode_loop_makes_no_host_sync_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    layer = LAYERS[name]().cuda().eval()
    x = _x(12).cuda()
    with torch.no_grad():
        _, cache, _ = layer(x[:, :4], use_cache=True)
        layer(x[:, 4:5], cache=cache.clone())  # first launches compile (with autotuning on, time: syncs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps = [layer(x[:, t:t + 1], cache=cache)[0] for t in range(4, 12)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        full, _, _ = layer(x)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("case", _adapter_cases())
@pytest.mark.parametrize("shared_slot", [False, True])
def test_a_wrapped_fla_layer_decodes_without_host_sync_on_cuda(case, shared_slot):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    routed, x, mask, cache = _wrapped_and_prefilled(case, shared_slot, "cuda")
    with torch.no_grad():
        routed(x[:, 5:], attention_mask=mask, past_key_values=cache, use_cache=True)  # first launches compile
        routed, x, mask, cache = _wrapped_and_prefilled(case, shared_slot, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = routed(x[:, 5:], attention_mask=mask, past_key_values=cache, use_cache=True)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------------
# torch.compile: routed_scan and routed_step are single custom ops in the graph

RULES = memplug.available_rules()


def _scan_op_args(rule, requires_grad, packed, final, backend="chunked"):
    """Arguments of `memplug::routed_scan` for `rule`, in float64 (opcheck compares gradients)."""
    gen = torch.Generator().manual_seed(0)
    B, T, m, R = (1, 7, 3, 2) if packed else (2, 5, 3, 2)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    r = memplug.get_rule(rule)
    leaf = lambda x: x.requires_grad_(requires_grad)
    q, k, v = rand(B, T, H, K), torch.nn.functional.normalize(rand(B, T, H, K), dim=-1), rand(B, T, H, V)
    idx = torch.rand(B, T, 1, m, generator=gen).argsort(-1)[..., :R]
    route_w = rand(B, T, 1, R) / R  # fm: route_w * beta <= 1
    g = None if r.g is None else -rand(B, T, H, *((K,) if r.g == "vector" else ()))
    beta = rand(B, T, H) if r.beta else None
    cu_seqlens = torch.tensor([0, 3, 7]) if packed else None
    state = rand(2, H, m, K, V)
    return (leaf(q), leaf(k), leaf(v), idx, leaf(route_w), leaf(rand(B, T, 1, R)), g if g is None else leaf(g),
            beta if beta is None else leaf(beta), leaf(state), cu_seqlens, rule, m, "dt", 0.5, final, backend)


@pytest.mark.parametrize("rule", RULES)
def test_the_scan_op_passes_opcheck(rule):
    from memplug.ops import scan_op

    for requires_grad, packed, final in ((True, False, True), (True, True, False), (False, False, False)):
        torch.library.opcheck(scan_op, _scan_op_args(rule, requires_grad, packed, final))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_the_step_op_passes_opcheck(backend):
    from memplug.ops import step_op

    kw = _step_inputs()
    args = (kw["q"], kw["k"], kw["v"], kw["route_idx"], kw["route_w"], kw["route_w"].clone(), kw["g"], kw["beta"],
            kw["state"].clone(), kw["rule"], "dt", 0.5, backend)
    torch.library.opcheck(step_op, args)


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_compiled_decode_step_equals_eager(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = _x(8)
    with torch.no_grad():
        _, cache, _ = layer(x[:, :6], use_cache=True)
        eager_cache = cache.clone()
        step = _compiled(lambda x_t, c: layer(x_t, cache=c)[0])
        for t in (6, 7):
            torch.testing.assert_close(step(x[:, t:t + 1], cache), layer(x[:, t:t + 1], cache=eager_cache)[0])
    torch.testing.assert_close(cache.state, eager_cache.state)
    if cache.shared_state is not None:
        torch.testing.assert_close(cache.shared_state, eager_cache.shared_state)


@pytest.mark.parametrize("name", ["routed", "threshold", "mom"])
def test_a_compiled_training_step_equals_eager(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = _x(9)

    def loss(x):
        y, _, aux = layer(x)
        return (y ** 2).sum() + aux["aux_loss"]

    grads = []
    for fn in (_compiled(loss), loss):
        layer.zero_grad()
        fn(x).backward()
        grads.append({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_a_compiled_step_under_autograd_has_the_gradients_of_eager():
    """A step autograd records runs as the functional scan op over one token."""
    kw = _step_inputs()
    q = kw.pop("q").requires_grad_()
    state = kw.pop("state").requires_grad_()

    def two_steps(q, state):
        o1, state = routed_step(q, state=state, **kw, check_values=False)
        o2, state = routed_step(q * 2, state=state, **kw, check_values=False)
        return (o1 * o2).sum() + state.sum()

    grads = [torch.autograd.grad(fn(q, state), (q, state)) for fn in (_compiled(two_steps), two_steps)]
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager)
    assert grads[1][0].abs().sum() > 0


def test_a_decode_step_compiles_with_inductor():
    """The default backend generates code around the ops (slow to compile: one preset only)."""
    torch.manual_seed(0)
    layer = FactorizationMemory(D, H, K, V)
    x = _x(7)
    with torch.no_grad():
        _, cache, _ = layer(x[:, :6], use_cache=True)
        eager_cache = cache.clone()
        y = _compiled(lambda x_t, c: layer(x_t, cache=c)[0], backend="inductor")(x[:, 6:], cache)
        torch.testing.assert_close(y, layer(x[:, 6:], cache=eager_cache)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.state, eager_cache.state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_decode_steps_keep_the_cache_in_the_same_memory(name):
    """Without autograd, a decode step writes the cache's tensors in place (slot states, shared slot,
    convolution histories): what a CUDA graph of the step needs to be replayed."""
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    x = _x(9)
    with torch.no_grad():
        _, cache, _ = layer(x[:, :6], use_cache=True)
        tensors = [cache.state, cache.shared_state, *cache.conv.values()]
        addresses = [t.data_ptr() for t in tensors if t is not None]
        steps = [layer(x[:, t:t + 1], cache=cache)[0] for t in range(6, 9)]
        assert [t.data_ptr() for t in (cache.state, cache.shared_state, *cache.conv.values())
                if t is not None] == addresses
        full, _, _ = layer(x)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fm", "mom"])
def test_a_decode_step_replays_as_a_cuda_graph(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    layer = LAYERS[name]().cuda().eval()
    x = _x(10).cuda()
    with torch.no_grad():
        _, cache, _ = layer(x[:, :6], use_cache=True)
        eager = cache.clone()
        static_x = x[:, 6:7].clone()
        side = torch.cuda.Stream()  # warm-up (compiling the kernels) on a side stream, as CUDA graphs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x, cache=cache.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, cache=cache)[0]
        # capturing ran nothing; replay steps 6..9
        for t in range(6, 10):
            static_x.copy_(x[:, t:t + 1])
            graph.replay()
            torch.testing.assert_close(static_y, layer(x[:, t:t + 1], cache=eager)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.state, eager.state, rtol=1e-4, atol=1e-5)
