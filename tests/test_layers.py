"""Layers: shapes, cached decoding equals the full forward, packed sequences, presets train."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import memplug
from memplug.modules import ShortConv

RULES = ["mamba2", "gla", "deltanet", "gated_deltanet", "fm"]
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
    dict(num_slots=4, topk=2, router={"kind": "threshold", "threshold": 0.3, "per_head": True}),
    dict(num_slots=3, topk=2, coupling="none", per_slot_kv=True, shared_slot=True),
    dict(num_slots=2, topk=1, short_conv=False, output_gate=False),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cached_decoding_equals_full_forward(rule, config):
    layer, x = _layer(rule, **config), _x()
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


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[4:5], ids=str)
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
    (dict(coupling="none", router={"kind": "threshold"}), "router.kind"),
    (dict(router={"kind": "hash"}), "router.kind"),
    (dict(router={"temperature": 0}), "router.temperature"),
    (dict(router={"colour": "red"}), "router"),
    (dict(qk_norm="l1"), "qk_norm"),
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


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), split=st.integers(0, 9), width=st.integers(1, 4), lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3))
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
