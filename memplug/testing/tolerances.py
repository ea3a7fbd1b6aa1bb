"""Tolerances of the test kit, per input dtype: the one place they are defined (docs/testing.md
repeats this table).

A tensor `actual` passes against `expected` when

    max |actual - expected|  <=  atol + rtol * max |expected|

(a norm-wise test: the error is measured against the largest entry of the expected tensor, so
entries close to zero do not make it fail). `output` is for `o`, `state` for final states, `grad`
for gradients. Laws that compare a backend with itself (state passing, decode, varlen, relabeling,
chunk size) use the same table; the frozen-slots law is bit for bit and has no tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    """Passes when `max|actual - expected| <= atol + rtol * max|expected|`."""

    rtol: float
    atol: float

    def looser(self, other: "Tol") -> "Tol":
        return Tol(max(self.rtol, other.rtol), max(self.atol, other.atol))


# The float32 output tolerance (1e-4) is below 1e-3 on purpose: a backend that is off by 0.1 % fails.
TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float64: {"output": Tol(1e-9, 1e-12), "state": Tol(1e-9, 1e-12), "grad": Tol(1e-8, 1e-11)},
    torch.float32: {"output": Tol(1e-4, 1e-6), "state": Tol(1e-4, 1e-6), "grad": Tol(3e-4, 1e-5)},
    torch.float16: {"output": Tol(1e-2, 1e-3), "state": Tol(1e-2, 1e-3), "grad": Tol(2e-2, 2e-3)},
    torch.bfloat16: {"output": Tol(4e-2, 1e-2), "state": Tol(4e-2, 1e-2), "grad": Tol(6e-2, 2e-2)},
}


def tolerance(dtype: torch.dtype, what: str, table=None) -> Tol:
    """The tolerance for `what` ("output", "state" or "grad") of inputs of `dtype`."""
    table = TOLERANCES if table is None else table
    return table[dtype][what]


def merge_tolerances(overrides=None) -> dict:
    """`TOLERANCES` with `overrides` (`{dtype: {what: Tol}}`, partial) applied."""
    merged = {dt: dict(row) for dt, row in TOLERANCES.items()}
    for dt, row in (overrides or {}).items():
        merged.setdefault(dt, {}).update(row)
    return merged
