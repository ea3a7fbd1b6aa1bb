"""Routers: which slots they pick, their weights, the load-balancing loss and the statistics."""
import math

import pytest
import torch
import torch.nn as nn

import memplug
import memplug.routing
from hypothesis import given, settings, strategies as st

from memplug.routing import (Router, RouterConfig, Routing, SlotCounts, apply_capacity, dense_routing,
                             load_balancing_loss, routing_stats, threshold_routing, topk_routing)


def _logits(B=2, T=5, Hr=1, m=6, seed=0):
    return torch.randn(B, T, Hr, m, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 8), data=st.data(), temperature=st.floats(0.1, 4.0), seed=st.integers(0, 100))
def test_topk_picks_the_most_probable_distinct_slots(m, data, temperature, seed):
    R = data.draw(st.integers(1, m))
    logits = _logits(m=m, seed=seed)
    r = topk_routing(logits, R, temperature=temperature)
    torch.testing.assert_close(r.probs, torch.softmax(logits / temperature, -1))
    assert r.idx.shape == (2, 5, 1, R)
    assert (r.idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    chosen = r.probs.gather(-1, r.idx)
    unchosen_max = r.probs.scatter(-1, r.idx, -1.0).max(-1).values
    if R < m:
        assert (chosen.min(-1).values >= unchosen_max).all()
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(2, 5, 1))
    raw = topk_routing(logits, R, temperature=temperature, renormalize=False)
    torch.testing.assert_close(raw.weight, chosen)


def test_dense_routes_every_slot_with_its_probability():
    logits = _logits(m=4)
    r = dense_routing(logits, temperature=2.0)
    assert r.idx.shape == (2, 5, 1, 4) and (r.idx == torch.arange(4)).all()
    torch.testing.assert_close(r.weight, torch.softmax(logits / 2.0, -1))


def test_threshold_keeps_likely_slots_and_never_none():
    logits = torch.tensor([[[[4.0, 3.9, -5.0, -5.0]], [[0.0, 0.0, 0.0, 0.0]]]])  # [1,2,1,4]
    r = threshold_routing(logits, topk=3, threshold=0.3, renormalize=False)
    kept = (r.weight > 0).sum(-1).flatten().tolist()
    assert kept == [2, 1]  # two likely slots; uniform probabilities 0.25 < 0.3 keep only the best
    r = threshold_routing(logits, topk=3, threshold=0.3)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(1, 2, 1))


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    m = 4
    idx = torch.arange(m).repeat(2).view(1, 8, 1, 1)
    uniform = torch.full((1, 8, 1, m), 1 / m)
    balanced = Routing(idx, torch.ones(1, 8, 1, 1), uniform)
    assert math.isclose(float(load_balancing_loss(balanced)), 1.0, rel_tol=1e-6)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, 8, 1, m)
    collapsed = Routing(torch.zeros(1, 8, 1, 1, dtype=torch.long), torch.ones(1, 8, 1, 1), skewed_probs)
    assert float(load_balancing_loss(collapsed)) == pytest.approx(m * 0.7)


def test_load_balancing_loss_has_gradients_for_the_router():
    router = Router(8, 2, 4, 2, RouterConfig(load_balance_coef=0.1))
    loss = load_balancing_loss(router(torch.randn(2, 5, 8)))
    loss.backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_routing_stats():
    idx = torch.tensor([0, 0, 1, 0]).view(1, 4, 1, 1)
    probs = torch.tensor([0.5, 0.5, 0.0]).expand(1, 4, 1, 3)
    stats = routing_stats(Routing(idx, torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 4, 1, 1), probs))
    assert stats["load"].tolist() == [2, 1, 0]  # the weight-0 route does not count
    assert stats["unused_fraction"] == pytest.approx(1 / 3)
    assert stats["entropy"] == pytest.approx(math.log(2))


@pytest.mark.parametrize("per_head, groups", [(False, 1), (True, 3)])
def test_router_shapes(per_head, groups):
    router = Router(8, 3, 5, 2, RouterConfig(per_head=per_head, rms_norm_input=True))
    r = router(torch.randn(2, 7, 8))
    assert r.idx.shape == (2, 7, groups, 2) and r.probs.shape == (2, 7, groups, 5)
    assert r.idx.dtype == torch.int64


@pytest.mark.parametrize("field, value, error", [
    ("temperature", "1", TypeError),
    ("temperature", True, TypeError),
    ("temperature", float("nan"), ValueError),
    ("temperature", float("inf"), ValueError),
    ("threshold", float("nan"), ValueError),
    ("threshold", 1.5, ValueError),
    ("load_balance_coef", float("nan"), ValueError),
    ("load_balance_coef", -0.1, ValueError),
    ("load_balance_coef", None, TypeError),
    ("renormalize", 1, TypeError),
    ("per_head", "no", TypeError),
    ("rms_norm_input", None, TypeError),
])
def test_router_config_rejects_bad_fields(field, value, error):
    with pytest.raises(error) as info:
        RouterConfig(**{field: value})
    assert str(info.value).startswith(f"router.{field}:") and repr(value) in str(info.value)


def test_router_keeps_float64():
    router = Router(8, 1, 4, 2, RouterConfig()).double()
    r = router(torch.randn(2, 3, 8, dtype=torch.float64))
    assert r.weight.dtype == torch.float64 and r.probs.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Routers used in the field: sigmoid scores, Gumbel noise, auxiliary-loss-free balancing


def test_sigmoid_scores_pick_by_logit_and_weight_by_sigmoid():
    logits = torch.randn(3, 5, 2, 6, dtype=torch.float64)
    r = topk_routing(logits, 2, score="sigmoid")
    assert torch.equal(r.idx, logits.topk(2, dim=-1).indices)
    picked = torch.sigmoid(logits).gather(-1, r.idx)
    torch.testing.assert_close(r.weight, picked / picked.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(3, 5, 2, dtype=torch.float64))
    raw = topk_routing(logits, 2, score="sigmoid", renormalize=False)
    torch.testing.assert_close(raw.weight, picked)


def test_a_balancing_bias_picks_but_does_not_weight():
    logits = torch.tensor([[[[2.0, 1.0, 0.0]]]])
    bias = torch.tensor([[0.0, 0.0, 5.0]])
    r = topk_routing(logits, 1, renormalize=False, bias=bias)
    assert r.idx.item() == 2
    torch.testing.assert_close(r.weight, torch.softmax(logits, -1)[..., 2:])


def _router(**config):
    torch.manual_seed(0)
    return Router(8, 2, 4, 2, RouterConfig(**config))


def test_gumbel_noise_in_training_only():
    router = _router(gumbel_noise=True)
    x = torch.randn(2, 50, 8)
    router.eval()
    assert torch.equal(router(x).idx, router(x).idx)
    router.train()
    assert not torch.equal(router(x).idx, router(x).idx)


@pytest.mark.parametrize("preserve_rng_state, same", [(True, True), (False, False)])
def test_gumbel_routes_are_replayed_by_activation_checkpointing(preserve_rng_state, same):
    """Recomputation under checkpointing routes as the forward did, because checkpointing restores
    the generator's state (its default); without that, the noise and the routes would differ."""
    torch.manual_seed(0)
    layer = memplug.RoutedMemory(8, 2, 4, 4, num_slots=4, topk=2,
                                 router=dict(gumbel_noise=True, score="sigmoid", per_head=True)).train()
    seen = []
    layer.router.register_forward_hook(lambda module, args, routing: seen.append(routing.idx.clone()))
    x = torch.randn(2, 40, 8, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda x: layer(x)[0], x, use_reentrant=False,
                                          preserve_rng_state=preserve_rng_state)
    y.sum().backward()
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1]) == same


def test_balancing_bias_evens_a_skewed_load():
    router = _router(balance_rate=0.005).train()
    with torch.no_grad():
        router.proj.weight[0] += 0.3  # with inputs of mean 0.5, slot 0 is picked far more than the others
    x = torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    router(x)
    skewed = router.last_load.sum(0)
    loads = []
    for _ in range(500):
        router(x)
        loads.append(router.last_load.sum(0))
        router.update_balance_bias()
    balanced = torch.stack(loads[-50:]).mean(0)  # the sign steps leave the load oscillating about the mean
    spread = lambda load: float((load.max() - load.min()) / load.mean())
    assert spread(skewed) > 1 and spread(balanced) < 0.1, (skewed, balanced)
    assert router.balance_bias[0, 0] < 0  # the favoured slot's bias went down
    assert "balance_bias" in router.state_dict()  # saved with the model, so decoding picks as training ended


def test_update_balance_biases_reaches_every_router():
    layer = memplug.RoutedMemory(8, 2, 4, 4, num_slots=4, topk=1, router=dict(balance_rate=0.1)).train()
    layer(torch.randn(1, 9, 8))
    memplug.routing.update_balance_biases(nn.Sequential(layer))
    assert layer.router.balance_bias.abs().sum() > 0 and layer.router.last_load is None


@pytest.mark.parametrize("config, field", [
    (dict(score="tanh"), "router.score"),
    (dict(balance_rate=-1.0), "router.balance_rate"),
    (dict(kind="dense", balance_rate=0.1), "router.balance_rate"),
    (dict(gumbel_noise=1), "router.gumbel_noise"),
    (dict(capacity_factor=-1.0), "router.capacity_factor"),
    (dict(capacity_factor=float("nan")), "router.capacity_factor"),
    (dict(kind="dense", capacity_factor=1.0), "router.capacity_factor"),
])
def test_bad_router_options_are_named(config, field):
    with pytest.raises((ValueError, TypeError), match=field):
        RouterConfig(**config)


def _capacity_by_loop(idx, weight, factor, lengths, m):
    """apply_capacity written out: token by token, a counter per (sequence, head group, slot)."""
    B, T, Hr, R = idx.shape
    idx, weight = idx.reshape(B * T, Hr, R), weight.reshape(B * T, Hr, R).clone()
    t = 0
    for length in lengths:
        kept = torch.zeros(Hr, m, dtype=torch.int64)
        for p in range(length):
            capacity = math.ceil(factor * R * (p + 1) / m)
            for h in range(Hr):
                for r in range(R):
                    j = idx[t, h, r]
                    if weight[t, h, r] > 0:
                        if kept[h, j] < capacity:
                            kept[h, j] += 1
                        else:
                            weight[t, h, r] = 0
            t += 1
    return weight.reshape(B, T, Hr, R)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 6), data=st.data(), factor=st.sampled_from([0.5, 1.0, 1.25, 2.0]),
       packed=st.booleans(), seed=st.integers(0, 10_000))
def test_capacity_equals_the_token_by_token_count_and_resumes(m, data, factor, packed, seed):
    """The closed form equals a loop over tokens (routes of weight 0 take no capacity; packed
    sequences count from their own start), and cutting the tokens in two, the second call starting
    from the first's counts, drops the same routes."""
    R = data.draw(st.integers(1, m))
    Hr = data.draw(st.integers(1, 2))
    gen = torch.Generator().manual_seed(seed)
    if packed:
        lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
        B, T = 1, sum(lengths)
        cu = torch.tensor([0] + lengths).cumsum(0)
    else:
        B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
        lengths, cu = [T] * B, None
    idx = torch.rand(B, T, Hr, m, generator=gen).argsort(-1)[..., :R]
    weight = torch.rand(B, T, Hr, R, generator=gen).masked_fill(torch.rand(B, T, Hr, R, generator=gen) < 0.2, 0.0)
    probs = torch.full((B, T, Hr, m), 1.0 / m)
    got, counts = apply_capacity(Routing(idx, weight, probs), factor, cu)
    expected = _capacity_by_loop(idx, weight, factor, lengths, m)
    assert torch.equal(got.weight, expected) and torch.equal(got.idx, idx)
    assert counts.seen.tolist() == lengths
    per_sequence = (expected > 0).reshape(B * T, Hr, R).split(lengths)
    assert counts.kept.sum(-1).tolist() == [kept.sum((0, 2)).tolist() for kept in per_sequence]
    if not packed and T > 1:
        split = data.draw(st.integers(1, T - 1))
        part = lambda x, a, b: x[:, a:b]
        first, mid = apply_capacity(Routing(part(idx, 0, split), part(weight, 0, split), part(probs, 0, split)),
                                    factor)
        second, end = apply_capacity(Routing(part(idx, split, T), part(weight, split, T), part(probs, split, T)),
                                     factor, counts=mid)
        assert torch.equal(torch.cat([first.weight, second.weight], 1), expected)
        assert torch.equal(end.kept, counts.kept) and torch.equal(end.seen, counts.seen)


def test_capacity_is_applied_without_reading_values_back():
    """No host sync: the decode path of a capacity router stays graph-capturable."""
    from support.host_reads import count_host_reads

    routing = topk_routing(_logits(B=2, T=1), 2)
    counts = SlotCounts(torch.tensor([3, 5]), torch.ones(2, 1, 6, dtype=torch.int64))
    with count_host_reads() as reads:
        apply_capacity(routing, 1.0, None, counts)
    assert reads == []
