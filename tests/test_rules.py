"""Rules: each built-in rule's single-token update equals the docs/contract.md section 3 table, written out."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import memplug
from memplug.rules import Coupled, get_rule


def _spec_update(rule, S, k, v, g, beta, w):
    """docs/contract.md section 3, one slot, literally (w = 1 under coupling "none")."""
    K = S.shape[0]
    eye = torch.eye(K, dtype=S.dtype)
    kv = torch.outer(k, v)
    kk = torch.outer(k, k)
    if rule == "mamba2":
        return torch.exp(w * g) * S + w * kv
    if rule == "gla":
        return torch.diag(torch.exp(w * g)) @ S + w * kv
    if rule == "deltanet":
        return (eye - w * beta * kk) @ S + w * beta * kv
    if rule == "gated_deltanet":
        return torch.exp(w * g) * (eye - w * beta * kk) @ S + w * beta * kv
    if rule == "fm":
        return (1 - w * beta) * S + w * beta * kv
    if rule == "kda":
        return (eye - w * beta * kk) @ torch.diag(torch.exp(w * g)) @ S + w * beta * kv
    raise AssertionError(rule)


@settings(max_examples=40, deadline=None)
@given(rule=st.sampled_from(memplug.BUILT_IN_RULES),
       K=st.integers(1, 4), V=st.integers(1, 4), w=st.floats(0, 1), seed=st.integers(0, 1000))
def test_builtin_rules_follow_the_spec_table(rule, K, V, w, seed):
    gen = torch.Generator().manual_seed(seed)
    r = get_rule(rule)
    S = torch.randn(K, V, dtype=torch.float64, generator=gen)
    k, v = torch.randn(K, dtype=torch.float64, generator=gen), torch.randn(V, dtype=torch.float64, generator=gen)
    g = -torch.rand(K if r.g == "vector" else (), dtype=torch.float64, generator=gen) if r.g else None
    beta = torch.rand((), dtype=torch.float64, generator=gen) if r.beta else None
    w_t = torch.tensor(w, dtype=torch.float64)
    got = r.step(S, k, v, g, beta, w_t)
    torch.testing.assert_close(got, _spec_update(rule, S, k, v, g, beta, w_t), rtol=1e-12, atol=1e-12)
    # A route of weight 0 under coupling "dt" is no route.
    torch.testing.assert_close(r.step(S, k, v, g, beta, torch.zeros((), dtype=torch.float64)), S, rtol=0, atol=0)


def test_register_rule_by_family_and_by_update():
    try:
        scaled = memplug.register_rule("test_half_mamba2", g="scalar", family="additive_scalar",
                                       couple=lambda k, v, g, beta, w: Coupled(0.5 * w[..., None] * k, v, w * g, None))
        free = memplug.register_rule("test_free",
                                     update=lambda S, k, v, g, beta, w: 0.9 * S + k[..., :, None] * v[..., None, :])
        assert memplug.get_rule("test_half_mamba2") is scaled and scaled.family.name == "additive_scalar"
        assert free.family is None
        assert {"test_half_mamba2", "test_free"} <= set(memplug.available_rules())
        with pytest.raises(ValueError, match="exists"):
            memplug.register_rule("test_free", update=lambda *a: a[0])
    finally:
        for name in ("test_half_mamba2", "test_free"):
            if name in memplug.available_rules():
                memplug.unregister_rule(name)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "either family and couple, or update"),
    (dict(family="additive_scalar"), "either family and couple, or update"),
    (dict(family="additive_scalar", couple=lambda *a: None, update=lambda *a: None), "either"),
    (dict(family="ternary", couple=lambda *a: None), "unknown family"),
    (dict(g="matrix", update=lambda *a: None), "g must be"),
])
def test_register_rule_rejects_incomplete_definitions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memplug.register_rule("test_broken", **kwargs)
    assert "test_broken" not in memplug.available_rules()


@pytest.mark.parametrize("kwargs, message", [
    (dict(family=3, couple=lambda *a: None), "family must be a Family, the name of one .* got 3"),
    (dict(family="additive_scalar", couple="mamba2"), "couple must be callable or None, got 'mamba2'"),
    (dict(update=5), "update must be callable or None, got 5"),
    (dict(update=lambda *a: None, check=True), "check must be callable or None, got True"),
    (dict(beta="yes", update=lambda *a: None), "beta must be a bool, got 'yes'"),
])
def test_register_rule_rejects_arguments_of_the_wrong_type(kwargs, message):
    with pytest.raises(TypeError, match=r"^rule 'test_broken': " + message):
        memplug.register_rule("test_broken", **kwargs)
    assert "test_broken" not in memplug.available_rules()


def test_get_rule_takes_a_name_or_a_rule():
    assert get_rule(get_rule("gla")) is get_rule("gla")
    with pytest.raises(TypeError, match=r"^rule: expected a rule name \(str\) or a Rule, got list \['gla'\]"):
        get_rule(["gla"])


def test_unknown_rule_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"^rule: unknown rule 'nope'; registered rules: \[.*'gla'"):
        get_rule("nope")


def test_a_new_family_is_explicit_about_where_it_runs():
    """A rule of a family no fast backend runs says so when registered, and routed_scan's error lists
    the families each backend runs."""
    from memplug.rules import Coupled, Family

    # kda's update with the decay after the delta correction instead of before: a form of no family.
    def correct_then_decay(S, c):
        residual = c.v - torch.einsum("...kv,...k->...v", S, c.k)
        S = S + c.b[..., None, None] * c.k[..., :, None] * residual[..., None, :]
        return S * c.a.exp()[..., :, None]

    kda_like = Family("delta_then_vector_decay", decay="vector", delta=True, step=correct_then_decay)
    with pytest.warns(UserWarning, match="reference backend only") as record:
        memplug.register_rule("kda_like", g="vector", beta=True, family=kda_like,
                              couple=lambda k, v, g, beta, w: Coupled(k, v, w[..., None] * g, w * beta))
    try:
        message = str(record[0].message)
        assert "'chunked'" in message and "'triton'" in message and "additive_scalar" in message
        for name in ("chunked", "triton"):  # triton would otherwise run it as a family it is not
            assert not memplug.get_backend(name).supports_rule(memplug.get_rule("kda_like"))
        q = torch.randn(1, 3, 1, 4)
        kw = dict(rule="kda_like", route_idx=torch.zeros(1, 3, 1, 1, dtype=torch.long), route_w=torch.ones(1, 3, 1, 1),
                  num_slots=1, g=-torch.rand(1, 3, 1, 4), beta=torch.rand(1, 3, 1))
        with pytest.raises(ValueError, match=r"does not run rule 'kda_like' \(family 'delta_then_vector_decay'\); "
                                             r"it runs the families \['additive_scalar'"):
            memplug.routed_scan(q, q, q, backend="chunked", **kw)
        o, _ = memplug.routed_scan(q, q, q, **kw)  # "auto" falls back to the reference backend
        assert torch.isfinite(o).all()
    finally:
        memplug.unregister_rule("kda_like")


def test_a_rule_of_a_built_in_family_registers_silently():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memplug.register_rule("mamba2_copy", g="scalar", family="additive_scalar",
                              couple=memplug.get_rule("mamba2").couple)
    memplug.unregister_rule("mamba2_copy")
