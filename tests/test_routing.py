"""Routers: which slots they pick, their weights, the load-balancing loss and the statistics."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from memplug.routing import (Router, RouterConfig, Routing, dense_routing, load_balancing_loss,
                             routing_stats, threshold_routing, topk_routing)


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
