"""The laws of docs/contract.md section 6 through `memplug.testing`: the reference backend obeys every law (its
backbone reduction is checked against flash-linear-attention's naive references), and `check_rule`
accepts user rules (a family rule and a free-form `update` rule) and rejects a rule that breaks a law."""
import math

import pytest
import torch

import memplug
from memplug.backends.reference import reference_scan
from memplug.rules import Coupled
from memplug.testing import RULE_LAWS, check_backend, check_rule
from memplug.testing.laws import backbone_reference

BUILTIN_RULES = memplug.BUILT_IN_RULES


@pytest.mark.parametrize("rule", BUILTIN_RULES)
def test_reference_backend_obeys_every_law(rule):
    report = check_backend("reference", rules=[rule])
    ran = {(r.law, r.dtype) for r in report.results if r.status == "passed"}
    assert ("backbone_reduction", "float64") in ran and ("reference_equality", "bfloat16") in ran
    assert {r.law for r in report.results if r.status != "passed"} == {"chunk_size"}  # no chunk size


def test_backbone_references():
    assert backbone_reference("deltanet").startswith("fla fla.ops.delta_rule.naive")
    assert "plain_fm" in backbone_reference("fm")


@pytest.fixture
def user_rules():
    names = []

    def register(name, **kw):
        memplug.register_rule(name, replace=True, **kw)
        names.append(name)
        return name

    yield register
    for name in names:
        memplug.unregister_rule(name)


def test_check_rule_on_a_family_rule(user_rules):
    # Retention: a fixed decay of 0.9 per unit of routing weight, additive writes, no g input.
    rule = user_rules("kit_retention", family="additive_scalar",
                      couple=lambda k, v, g, beta, w: Coupled(w[..., None] * k, v, w * math.log(0.9), None))
    (report,) = check_rule(rule)
    assert {r.law for r in report.results} == set(RULE_LAWS)
    assert {r.dtype for r in report.results} == {"float64", "float32"}
    assert all(r.status == "passed" for r in report.results)


def test_check_rule_on_a_free_form_rule(user_rules):
    def leaky_tanh(S, k, v, g, beta, w):
        target = torch.tanh(g.exp()[..., None, None] * S + beta[..., None, None] * k[..., :, None] * v[..., None, :])
        return S + w[..., None, None] * (target - S)
    rule = user_rules("kit_leaky_tanh", g="scalar", beta=True, update=leaky_tanh)
    (report,) = check_rule(rule)
    assert all(r.status == "passed" for r in report.results)


def test_check_rule_runs_other_backends_that_take_the_rule(user_rules):
    rule = user_rules("kit_retention2", family="additive_scalar",
                      couple=lambda k, v, g, beta, w: Coupled(w[..., None] * k, v, w * math.log(0.8), None))
    memplug.register_backend("kit_delegate", reference_scan, dtypes=(torch.float64,), priority={"cpu": -100},
                             replace=True)
    try:
        reports = check_rule(rule, backends=("reference", "kit_delegate"), max_examples=3)
    finally:
        memplug.unregister_backend("kit_delegate")
    assert [r.backend for r in reports] == ["reference", "kit_delegate"]
    laws = {r.law: r.status for r in reports[1].results}
    assert laws["reference_equality"] == "passed" and laws["backbone_reduction"] == "passed"


def test_check_rule_catches_a_rule_that_ignores_the_weight(user_rules):
    def ignores_w(S, k, v, g, beta, w):  # a route of weight 0 still writes: breaks docs/contract.md section 3
        return g.exp()[..., None, None] * S + k[..., :, None] * v[..., None, :]
    rule = user_rules("kit_ignores_w", g="scalar", update=ignores_w)
    with pytest.raises(AssertionError) as info:
        check_rule(rule, laws=["zero_weight"], dtypes=["float64"], max_examples=5)
    msg = str(info.value)
    assert "[zero_weight]" in msg and "rule 'kit_ignores_w'" in msg and "CaseSpec(" in msg


def test_check_rule_catches_a_rule_with_hidden_state(user_rules):
    calls = [0]

    def counting(S, k, v, g, beta, w):  # depends on how often it was called: not a function of its inputs
        calls[0] += 1
        return S + (w / calls[0])[..., None, None] * k[..., :, None] * v[..., None, :]
    rule = user_rules("kit_counting", update=counting)
    with pytest.raises(AssertionError) as info:
        check_rule(rule, laws=["state_passing"], dtypes=["float64"], max_examples=5)
    assert "[state_passing]" in str(info.value)


def test_check_rule_rejects_laws_it_does_not_run():
    with pytest.raises(ValueError, match=r"laws: unknown law\(s\) \['nope'\]"):
        check_rule("gla", laws=["nope"])
    with pytest.raises(ValueError, match=r"check_rule .* does not run \['reference_equality', 'chunk_size'\]"):
        check_rule("gla", laws=["decode", "reference_equality", "chunk_size"])
