"""Layers: shapes, cached decoding equals the full forward (with gradients too), caches advance in
place, packed sequences, presets train."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import memplug
from memplug.modules import ShortConv

RULES = memplug.BUILT_IN_RULES
D, H, K, V = 16, 2, 4, 6


def _layer(rule="gated_deltanet", **kw):
    torch.manual_seed(0)
    return memplug.RoutedMemory(D, H, K, V, rule=rule, **kw).double()


def _x(B=2, T=11, seed=1):
    return torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    dict(num_slots=4, topk=2),
    dict(num_slots=1, topk=1, coupling="none"),
    dict(num_slots=3, topk=3, router={"kind": "dense"}),
    dict(num_slots=4, topk=2, coupling="none",
         router={"kind": "threshold", "threshold": 0.3, "per_head": True, "capacity_factor": 1.0}),
    dict(num_slots=3, topk=2, coupling="none", per_slot_kv=True, shared_slot=True),
    dict(num_slots=2, topk=1, short_conv=False, output_gate=False),
    dict(num_slots=4, topk=2, router={"score": "sigmoid", "gumbel_noise": True, "balance_rate": 0.01,
                                      "per_head": True}),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cached_decoding_equals_full_forward(rule, config):
    layer, x = _layer(rule, **config).eval(), _x()  # eval: no Gumbel noise in routing
    with torch.no_grad():
        y, cache, _ = layer(x)
        assert y.shape == x.shape and cache is None
        y_pre, cache, _ = layer(x[:, :5], use_cache=True)
        pieces = [y_pre]
        for t in range(5, x.shape[1]):
            y_t, cache, _ = layer(x[:, t:t + 1], cache=cache)
            pieces.append(y_t)
        torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-9, atol=1e-9)
        # A cache holds states and convolution histories only: its size does not grow with tokens.
        sizes = [cache.state.numel()] + [s.numel() for s in cache.conv.values()]
        _, cache_longer, _ = layer(x[:, :1], cache=cache)
        assert [cache_longer.state.numel()] + [s.numel() for s in cache_longer.conv.values()] == sizes


@pytest.mark.parametrize("rule", ["mamba2", "gated_deltanet"])
@pytest.mark.parametrize("state_requires_grad", [False, True])
def test_chained_steps_have_the_gradients_of_the_scan(rule, state_requires_grad):
    # Each step's state is the next step's input: a step must not write into a state autograd saved.
    gen = torch.Generator().manual_seed(0)
    B, T, M, R = 2, 4, 3, 2
    rand = lambda *shape: torch.rand(*shape, dtype=torch.float64, generator=gen)
    k = torch.nn.functional.normalize(rand(B, T, H, K), dim=-1).requires_grad_()
    v, g = rand(B, T, H, V).requires_grad_(), (-rand(B, T, H)).requires_grad_()
    q, beta = rand(B, T, H, K), rand(B, T, H)
    route_w, route_idx = rand(B, T, 1, M).topk(R, dim=-1)
    state0 = rand(B, H, M, K, V).requires_grad_(state_requires_grad)
    kw = dict(rule=rule, g=g, beta=beta if rule == "gated_deltanet" else None)
    o_scan, _ = memplug.routed_scan(q, k, v, route_idx=route_idx, route_w=route_w, num_slots=M,
                                    initial_state=state0, **kw)
    wrt = [k, v, g] + ([state0] if state_requires_grad else [])
    expected = torch.autograd.grad(o_scan.sin().sum(), wrt)

    state0_before = state0.detach().clone()
    state, outputs = state0, []
    for t in range(T):
        step = lambda x: None if x is None else x[:, t:t + 1]
        o_t, state = memplug.routed_step(step(q), step(k), step(v), rule=rule, route_idx=step(route_idx),
                                         route_w=step(route_w), g=step(g), beta=step(kw["beta"]), state=state)
        outputs.append(o_t)
    o_steps = torch.cat(outputs, 1)
    got = torch.autograd.grad(o_steps.sin().sum(), wrt)
    torch.testing.assert_close(o_steps, o_scan, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(state0, state0_before)  # recorded steps leave their input state as it was


@pytest.mark.parametrize("preset", [memplug.FactorizationMemory, memplug.MixtureOfMemories])
def test_cached_decoding_with_gradients_equals_full_forward(preset):
    torch.manual_seed(0)
    layer, x = preset(D, H, K, V, num_slots=4, topk=2).double(), _x(T=7)
    y_full, _, _ = layer(x)
    expected = torch.autograd.grad(y_full.sin().sum(), list(layer.parameters()))
    y, cache, _ = layer(x[:, :4], use_cache=True)
    pieces = [y]
    for t in range(4, x.shape[1]):
        y_t, cache, _ = layer(x[:, t:t + 1], cache=cache)
        pieces.append(y_t)
    y_steps = torch.cat(pieces, 1)
    got = torch.autograd.grad(y_steps.sin().sum(), list(layer.parameters()))
    torch.testing.assert_close(y_steps, y_full, rtol=1e-9, atol=1e-9)
    for (name, _), a, b in zip(layer.named_parameters(), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[4]], ids=str)
def test_a_cache_passed_in_is_advanced_in_place(config):
    layer, x = _layer("gated_deltanet", **config), _x(T=10)
    with torch.no_grad():
        y_full, _, _ = layer(x)
        _, cache, _ = layer(x[:, :4], use_cache=True)
        branch = cache.clone()
        # One token (routed_step) and several tokens (routed_scan) advance the cache alike: the
        # returned object is the one passed in, and it holds the state after the new tokens.
        _, returned, _ = layer(x[:, 4:5], cache=cache)
        assert returned is cache
        _, returned, _ = layer(x[:, 5:8], cache=cache)
        assert returned is cache
        y_next, _, _ = layer(x[:, 8:10], cache=cache)
        torch.testing.assert_close(y_next, y_full[:, 8:10], rtol=1e-9, atol=1e-9)
        # The clone took no part in that: it continues from token 4 like a fresh run.
        y_branch = torch.cat([layer(x[:, 4:5], cache=branch)[0], layer(x[:, 5:10], cache=branch)[0]], 1)
        torch.testing.assert_close(y_branch, y_full[:, 4:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[3:5], ids=str)
def test_packed_sequences_equal_separate_rows(config):
    layer, x = _layer("gated_deltanet", **config), _x(B=2, T=7)
    with torch.no_grad():
        y, cache, _ = layer(x, use_cache=True)
        cu = torch.tensor([0, 7, 14])
        y_packed, cache_packed, _ = layer(x.reshape(1, 14, D), cu_seqlens=cu, use_cache=True)
    torch.testing.assert_close(y_packed.reshape(2, 7, D), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache_packed.state, cache.state, rtol=1e-9, atol=1e-9)
    for name in cache.conv:
        torch.testing.assert_close(cache_packed.conv[name], cache.conv[name])


def test_backbone_has_no_router_and_one_slot():
    layer = _layer("gla", num_slots=1, topk=1, coupling="none")
    _, cache, aux = layer(_x(), use_cache=True)
    assert layer.router is None and aux["routing"] is None
    assert cache.state.shape == (2, H, 1, K, V)
    assert layer.state_numel() == H * K * V


@pytest.mark.parametrize("preset", [memplug.FactorizationMemory, memplug.MixtureOfMemories])
def test_presets_train_one_step(preset):
    torch.manual_seed(0)
    layer = preset(D, H, K, V, num_slots=4, topk=2)
    x, target = torch.randn(2, 9, D), torch.randn(2, 9, D)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    y, _, aux = layer(x)
    loss = (y - target).pow(2).mean() + aux["aux_loss"]
    loss.backward()
    opt.step()
    y_after, _, _ = layer(x)
    assert (y_after - target).pow(2).mean() < loss - aux["aux_loss"]
    unchanged = [n for n, p in layer.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [], f"parameters with no gradient: {unchanged}"


def test_preset_router_options_cannot_be_combined_with_a_router():
    assert memplug.FactorizationMemory(D, H, K, V, temperature=0.1).router.config.temperature == 0.1
    assert memplug.MixtureOfMemories(D, H, K, V, load_balance_coef=0.5).router.config.load_balance_coef == 0.5
    with pytest.raises(ValueError, match=r"^temperature, router: got both temperature=0.1"):
        memplug.FactorizationMemory(D, H, K, V, temperature=0.1, router={"kind": "topk"})
    with pytest.raises(ValueError, match=r"^load_balance_coef, router: got both load_balance_coef=0.5"):
        memplug.MixtureOfMemories(D, H, K, V, load_balance_coef=0.5, router=memplug.RouterConfig())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("preset", [memplug.FactorizationMemory, memplug.MixtureOfMemories])
def test_aux_loss_is_at_least_float32(preset, dtype):
    # FactorizationMemory has no load-balancing loss (a zero), MixtureOfMemories has one.
    layer = preset(D, H, K, V, num_slots=4, topk=2).to(dtype)
    _, _, aux = layer(torch.randn(1, 3, D, dtype=dtype))
    assert aux["aux_loss"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_presets_match_their_papers():
    fm = memplug.FactorizationMemory(D, H, K, V, num_slots=8, topk=2)
    assert (fm.rule.name, fm.coupling, fm.per_slot_kv, fm.shared_writes) == ("fm", "dt", False, None)
    assert fm.router.config.rms_norm_input and fm.g_proj is not None
    mom = memplug.MixtureOfMemories(D, H, K, V, num_slots=4, topk=2)
    assert (mom.rule.name, mom.coupling, mom.per_slot_kv) == ("gated_deltanet", "none", True)
    assert mom.shared_writes is not None and mom.router.config.load_balance_coef > 0
    _, _, aux = mom(torch.randn(1, 5, D))
    assert aux["aux_loss"] > 0
    assert memplug.FactorizationMemory(D, H, K, V, rule="gla").rule.name == "gla"


def test_state_lives_in_routed_slots_only():
    layer = _layer("mamba2", num_slots=6, topk=1)
    x = _x(B=1, T=3)
    _, cache, aux = layer(x, use_cache=True)
    used = set(aux["routing"].idx.flatten().tolist())
    for slot in range(6):
        assert (cache.state[:, :, slot].abs().sum() > 0) == (slot in used)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(rule="nope"), "rule"),
    (dict(num_slots=2, topk=3), "topk"),
    (dict(num_slots=0), "num_slots"),
    (dict(coupling="sometimes"), "coupling"),
    (dict(num_slots=4, topk=2, router={"kind": "dense"}), "topk"),
    (dict(router={"kind": "hash"}), "router.kind"),
    (dict(router={"temperature": 0}), "router.temperature"),
    (dict(router={"colour": "red"}), "router"),
    (dict(qk_norm="l1"), "qk_norm"),
    (dict(backend="no_such_backend"), "backend"),
    (dict(per_slot_kv="no"), "per_slot_kv"),
    (dict(shared_slot=1), "shared_slot"),
    (dict(short_conv=None), "short_conv"),
    (dict(output_gate="yes"), "output_gate"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(norm_eps="1e-5"), "norm_eps"),
])
def test_bad_layer_arguments_are_named(kwargs, argument):
    with pytest.raises((ValueError, TypeError)) as err:
        memplug.RoutedMemory(D, H, K, V, **kwargs)
    assert str(err.value).startswith(argument + ":")


def test_bad_forward_inputs_are_named():
    layer = _layer()
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.randn(2, 3, D + 1, dtype=torch.float64))
    _, cache, _ = layer(_x(B=2, T=3), use_cache=True)
    with pytest.raises(ValueError, match="^cache:"):
        layer(_x(B=3, T=1), cache=cache)
    with pytest.raises(TypeError, match="^cache:"):
        layer(_x(B=2, T=1), cache={"state": cache.state})
    with pytest.raises(TypeError, match="^use_cache: expected a bool, got 'no'"):
        layer(_x(B=2, T=3), use_cache="no")


@pytest.mark.parametrize("B, cu_seqlens, error, message", [
    (1, [0, 2, 4], TypeError, "expected a torch.Tensor, got list"),
    (1, torch.tensor([0, 2, 4], dtype=torch.int32), ValueError, "int32"),
    (2, torch.tensor([0, 2, 4]), ValueError, "B = 1, got B = 2"),
    (1, torch.tensor([0, 2, 3]), ValueError, r"from 0 to T = 4, got \[0, 2, 3\]"),
    (1, torch.tensor([0, 3, 2, 4]), ValueError, "strictly increasing"),
])
def test_bad_cu_seqlens_are_named_before_any_work(B, cu_seqlens, error, message):
    layer = _layer()
    # The short convolution would be the first to touch cu_seqlens: it must never see these.
    layer.q.conv.forward = lambda *args: pytest.fail("the layer ran before checking cu_seqlens")
    with pytest.raises(error, match="^cu_seqlens: .*" + message):
        layer(_x(B=B, T=4), cu_seqlens=cu_seqlens)


def test_integer_input_is_named():
    layer = _layer()
    with pytest.raises(TypeError, match="^x: expected a floating-point tensor, got torch.int64"):
        layer(torch.ones(1, 4, layer.o_proj.out_features, dtype=torch.long))


def test_input_of_another_dtype_than_the_parameters_is_named_unless_autocast_mixes_them():
    layer = _layer().float()
    x = _x(B=1, T=4).float()
    with pytest.raises(TypeError, match="^x: expected the dtype of the layer's parameters, torch.float32, got "
                                        "torch.float64"):
        layer(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision forward: the dtypes differ on purpose
        assert layer(x.bfloat16())[0].shape == x.shape


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), split=st.integers(0, 9), width=st.integers(1, 4),
       lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_short_conv_is_causal_resumable_and_packable(T, split, width, lengths):
    torch.manual_seed(T)
    conv = ShortConv(3, width).double()
    x = torch.randn(2, T, 3, dtype=torch.float64)
    y, state = conv(x, output_state=True)
    # Equals a causal depthwise conv1d, zero-padded on the left.
    padded = torch.nn.functional.pad(x.transpose(1, 2), (width - 1, 0))
    expected = torch.nn.functional.silu(torch.nn.functional.conv1d(padded, conv.weight[:, None], conv.bias, groups=3))
    torch.testing.assert_close(y, expected.transpose(1, 2))
    # Resuming from the state of a prefix changes nothing.
    split = min(split, T)
    y1, s1 = conv(x[:, :split], output_state=True)
    y2, s2 = conv(x[:, split:], state=s1, output_state=True) if split < T else (x[:, :0], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, state)
    # Packed sequences are convolved separately.
    packed = torch.randn(1, sum(lengths), 3, dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0)
    y_packed, s_packed = conv(packed, cu_seqlens=cu, output_state=True)
    for n in range(len(lengths)):
        y_n, s_n = conv(packed[:, cu[n]:cu[n + 1]], output_state=True)
        torch.testing.assert_close(y_packed[:, cu[n]:cu[n + 1]], y_n)
        torch.testing.assert_close(s_packed[n:n + 1], s_n)
    # ... each from its own history when resumed ...
    history = torch.randn(len(lengths), width - 1, 3, dtype=torch.float64)
    y_packed, s_packed = conv(packed, state=history, cu_seqlens=cu, output_state=True)
    for n in range(len(lengths)):
        y_n, s_n = conv(packed[:, cu[n]:cu[n + 1]], state=history[n:n + 1], output_state=True)
        torch.testing.assert_close(y_packed[:, cu[n]:cu[n + 1]], y_n)
        torch.testing.assert_close(s_packed[n:n + 1], s_n)
    # ... and a NaN in one sequence never reaches another (nor its own earlier tokens).
    poisoned = packed.clone()
    poisoned[0, cu[1] - 1] = float("nan")  # the last token of the first sequence
    y_poisoned, _ = conv(poisoned, cu_seqlens=cu)
    assert y_poisoned[:, :cu[1] - 1].isfinite().all() and y_poisoned[:, cu[1]:].isfinite().all()


def _preset(name, **kw):
    torch.manual_seed(0)
    cls = {"fm": memplug.FactorizationMemory, "mom": memplug.MixtureOfMemories}[name]
    return cls(D, H, K, V, **kw).double()


CACHE_MISMATCHES = {  # the layer that made the cache, the layer it is given to, what the error names
    "fewer_slots": (lambda: _layer(num_slots=8), lambda: _layer(num_slots=4), "num_slots"),
    "more_slots": (lambda: _layer(num_slots=8), lambda: _layer(num_slots=16), "num_slots"),
    "heads": (lambda: _layer(), lambda: memplug.RoutedMemory(D, 4, K, V).double(), "heads"),
    "head_dims": (lambda: _layer(), lambda: memplug.RoutedMemory(D, H, K, 2 * V).double(), "head_v_dim"),
    "conv_size": (lambda: _layer(), lambda: _layer(conv_size=2), "taps"),
    "no_conv": (lambda: _layer(short_conv=False), lambda: _layer(), "convolution histories"),
    "fm_into_mom": (lambda: _preset("fm", num_slots=4), lambda: _preset("mom", num_slots=4), "shared slot"),
    "mom_into_fm": (lambda: _preset("mom", num_slots=4), lambda: _preset("fm", num_slots=4), "shared slot"),
    "per_slot_convs": (lambda: _layer(num_slots=4, per_slot_kv=True), lambda: _layer(num_slots=4), "channels"),
    "dtype": (lambda: _layer().float(), lambda: _layer(), "float64"),
    "no_counts": (lambda: _layer(num_slots=4), lambda: _layer(num_slots=4, router={"capacity_factor": 1.0}),
                  "slot counts"),
}


@pytest.mark.parametrize("mismatch", sorted(CACHE_MISMATCHES))
def test_a_cache_from_another_layer_is_refused(mismatch):
    """A ValueError naming `cache` and what differs, before any work: the cache is left as it was."""
    make, take, named = CACHE_MISMATCHES[mismatch]
    maker = make()
    dtype = next(maker.parameters()).dtype
    _, cache, _ = maker(_x(T=3).to(dtype), use_cache=True)
    before = cache.clone()
    with pytest.raises(ValueError, match="cache") as error:
        take()(_x(T=1), cache=cache)
    assert named in str(error.value)
    assert torch.equal(cache.state, before.state) and cache.conv.keys() == before.conv.keys()


def test_a_cache_for_another_batch_is_refused():
    layer = _layer()
    _, cache, _ = layer(_x(B=2, T=3), use_cache=True)
    with pytest.raises(ValueError, match=r"cache: .*batch 2 here 3"):
        layer(_x(B=3, T=1), cache=cache)
    cu = torch.tensor([0, 1, 2, 3])  # three packed sequences
    with pytest.raises(ValueError, match=r"cache: .*batch 2 here 3"):
        layer(_x(B=1, T=3), cache=cache, cu_seqlens=cu)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3], CONFIGS[4]], ids=str)
def test_a_reordered_cache_decodes_the_reordered_batch(config):
    """Beam search's reordering: decoding from `cache.reorder(index)` equals decoding each sequence
    from its own cache, rows dropped and repeated as `index` says."""
    layer, x = _layer("gated_deltanet", **config).eval(), _x(B=3, T=7)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, cache, _ = layer(x[:, :6], use_cache=True)
        reordered = cache.reorder(index)
        y, _, _ = layer(x[index, 6:], cache=reordered)
        expected, expected_cache, _ = layer(x[:, 6:], cache=cache)
    torch.testing.assert_close(y, expected[index])
    torch.testing.assert_close(reordered.state, expected_cache.state[index])
    for bad in (torch.tensor([[0]]), torch.tensor([0.0]), [0, 1]):
        with pytest.raises(ValueError, match="index"):
            cache.reorder(bad)


def test_a_capacity_drops_routes():
    """With capacity factor 1, every slot keeps at most its fair share of the routes so far: the
    layer drops routes (weight 0) that the same router without a capacity keeps, and the counts in
    the cache match the kept routes. (That a route of weight 0 writes nothing, under either
    coupling, is the zero_weight law.)"""
    x = _x(B=2, T=24)
    free = _layer(num_slots=4, topk=2, coupling="none").eval()
    capped = _layer(num_slots=4, topk=2, coupling="none", router={"capacity_factor": 1.0}).eval()
    with torch.no_grad():
        _, _, aux_free = free(x)
        _, cache, aux = capped(x, use_cache=True)
    chosen, kept = aux_free["routing"], aux["routing"]
    assert torch.equal(chosen.idx, kept.idx)  # the same router: the capacity only drops
    dropped = (kept.weight == 0) & (chosen.weight > 0)
    assert dropped.any() and (kept.weight > 0).any()
    sent = torch.zeros(2, 24, 1, 4, dtype=torch.float64).scatter_(-1, kept.idx, (kept.weight > 0).double())
    torch.testing.assert_close(cache.counts.kept, sent.sum(1).long(), rtol=0, atol=0)
    assert cache.counts.seen.tolist() == [24, 24]
    for p in range(24):  # at most ceil(R (p + 1) / m) routes per slot from the first p + 1 tokens
        assert (sent[:, :p + 1].sum(1) <= math.ceil(2 * (p + 1) / 4)).all()
