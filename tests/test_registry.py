"""The backend registry: one validated `ScanArgs` per call, declared capabilities instead of hidden
fallbacks (docs/contract.md section 7, backend protocol)."""
import dataclasses

import pytest
import torch

import memplug
from memplug import ScanArgs
from memplug.backends.reference import reference_scan, reference_step
from memplug.testing import CaseSpec, make_inputs


@pytest.fixture
def narrow():
    """A CPU backend ranked above every built-in one that takes keys of width 4 at most and a decode
    step only without a state that requires grad; it records what it is called with."""
    calls = []

    def scan(args):
        calls.append(("scan", args))
        return reference_scan(args)

    def step(args):
        calls.append(("step", args))
        return reference_step(args)

    memplug.register_backend("narrow", scan, step, priority={"cpu": 100},
                             supports=lambda args: None if args.K <= 4 else f"K = {args.K} > 4",
                             supports_step=lambda args: "a state that requires grad" if args.initial_state.requires_grad
                             else None)
    yield calls
    memplug.unregister_backend("narrow")


def _inputs(K):
    return make_inputs(CaseSpec(rule="gated_deltanet", dtype="float32", B=1, T=5, H=2, K=K, V=3, m=3, R=2), "cpu")


def test_a_backend_receives_the_call_validated_and_resolved(narrow):
    inputs = _inputs(4)
    inputs.update(scale=None, read_w=None, coupling="none")
    memplug.routed_scan(**inputs)
    ((kind, args),) = narrow
    assert kind == "scan" and isinstance(args, ScanArgs)
    assert args.rule is memplug.get_rule("gated_deltanet")
    assert args.scale == 4 ** -0.5 and args.read_w is inputs["route_w"] and args.output_final_state is False
    assert torch.equal(args.write_weight, torch.ones_like(inputs["route_w"]))  # coupling "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.scale = 1.0


def test_auto_skips_a_backend_that_declines_the_shapes_and_naming_it_raises_why(narrow):
    memplug.routed_scan(**_inputs(4))
    assert len(narrow) == 1
    o, _ = memplug.routed_scan(**_inputs(8))  # "auto": the next backend (chunked)
    assert len(narrow) == 1 and torch.isfinite(o).all()
    with pytest.raises(ValueError, match=r"^backend: backend 'narrow' does not take these inputs: K = 8 > 4$"):
        memplug.routed_scan(**_inputs(8), backend="narrow")


def test_a_step_the_backend_declines_runs_the_reference_step_and_says_why(narrow):
    inputs = _inputs(4)
    for name in ("num_slots", "cu_seqlens", "initial_state"):
        inputs.pop(name)
    one = {n: x[:, :1] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x for n, x in inputs.items()}
    state = torch.zeros(1, 2, 3, 4, 3)
    memplug.routed_step(**one, state=state)
    assert [kind for kind, _ in narrow] == ["step"]
    memplug.routed_step(**one, state=state.clone().requires_grad_())
    assert [kind for kind, _ in narrow] == ["step"]  # the reference step ran the second one
    args = narrow[0][1].replace(initial_state=state.clone().requires_grad_())
    assert memplug.get_backend("narrow").why_not_step(args) == "a state that requires grad"
    assert "has no decode step of its own" in memplug.get_backend("chunked").why_not_step(args)
