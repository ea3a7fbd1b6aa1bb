"""Helpers of the tests that non-finite values stay where they belong."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.utils.deterministic

from memplug import routed_scan

GRAD_INPUTS = ("q", "k", "v", "g", "beta", "route_w", "read_w", "initial_state")


@contextmanager
def nan_filled_memory():
    """Every float tensor that `torch.empty` and its kin allocate is filled with NaN (PyTorch's
    deterministic mode with `fill_uninitialized_memory`), so that a backend that reads memory it
    never wrote (a padding row, the unused tail of a buffer) shows it as NaN. `warn_only`: an op
    without a deterministic CUDA implementation warns instead of raising; the fill is the point."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all(), "uninitialized memory is not NaN-filled: the check would be vacuous"
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def scan_with_grads(inputs: dict, backend: str) -> dict:
    """{"o", "final_state", "grad <input>" for every float input: tensor} of `routed_scan`, the
    gradients of a fixed random linear function of o and the final states (None where unused)."""
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in GRAD_INPUTS if inputs.get(n) is not None}
    o, S = routed_scan(**dict(inputs, **leaves), output_final_state=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    weights = lambda x: torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    loss = (o.double() * weights(o)).sum() + (S.double() * weights(S)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {"o": o, "final_state": S, **{f"grad {n}": g for n, g in zip(leaves, grads)}}


def assert_bitwise_equal(got: dict, expected: dict) -> None:
    """Every result of `scan_with_grads` is bit for bit the same (or None in both)."""
    assert got.keys() == expected.keys()
    for name, a in got.items():
        b = expected[name]
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), f"{name} differs"
