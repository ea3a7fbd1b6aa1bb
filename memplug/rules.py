"""Update rules, each defined once by its single-token update (docs/contract.md section 3).

A built-in rule is a *coupling* into one of four *families*. The family owns the single-token
update in a canonical form; the coupling says how a rule's inputs (`k, v, g, beta`) and the routing
weight `w` become the family's inputs. The fast backends implement one chunked scan per family, so a
new rule of an existing family needs no new kernel.

Canonical single-token updates, per routed slot `S` in R^{K x V}:

    additive_scalar:  S <- exp(a) S + k v^T              a: scalar log-decay
    additive_vector:  S <- diag(exp(a)) S + k v^T        a: log-decay in R^K
    delta:            S <- (I - b k k^T) exp(a) S + b k v^T             a: scalar log-decay, b: write strength
    delta_vector:     S <- (I - b k k^T) diag(exp(a)) S + b k v^T       a: log-decay in R^K (Kimi Delta Attention)

A user rule that fits no family can still be registered with its own `update`; only the reference
backend runs it (the fast backends run family rules).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch


class Coupled(NamedTuple):
    """A rule's inputs in its family's canonical form, per route: `k [...,K]`, `v [...,V]`,
    `a` log-decay (`[...]`, `[...,K]` or None for no decay), `b` write strength (`[...]`, delta only)."""

    k: torch.Tensor
    v: torch.Tensor
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]


def _decay(S: torch.Tensor, a: Optional[torch.Tensor]) -> torch.Tensor:
    if a is None:
        return S
    if a.dim() == S.dim() - 2:  # scalar per state
        return S * a.exp()[..., None, None]
    return S * a.exp()[..., :, None]  # one decay per key channel


def _additive_step(S, c: Coupled):
    return _decay(S, c.a) + c.k[..., :, None] * c.v[..., None, :]


def _delta_step(S, c: Coupled):
    S = _decay(S, c.a)
    # (I - b k k^T) S + b k v^T  ==  S + b k (v - S^T k)^T
    residual = c.v - torch.einsum("...kv,...k->...v", S, c.k)
    return S + (c.b[..., None] * c.k)[..., :, None] * residual[..., None, :]


@dataclass(frozen=True)
class Family:
    """A family of rules that share one chunked scan. `decay` is "scalar" or "vector"."""

    name: str
    decay: str
    delta: bool
    step: Callable[[torch.Tensor, Coupled], torch.Tensor]


ADDITIVE_SCALAR = Family("additive_scalar", decay="scalar", delta=False, step=_additive_step)
ADDITIVE_VECTOR = Family("additive_vector", decay="vector", delta=False, step=_additive_step)
DELTA = Family("delta", decay="scalar", delta=True, step=_delta_step)
DELTA_VECTOR = Family("delta_vector", decay="vector", delta=True, step=_delta_step)
FAMILIES = {f.name: f for f in (ADDITIVE_SCALAR, ADDITIVE_VECTOR, DELTA, DELTA_VECTOR)}


@dataclass(frozen=True)
class Rule:
    """An update rule.

    `g` says which log-decay input the rule takes (None, "scalar" `[..]` or "vector" `[..,K]`);
    `beta` whether it takes a write strength. A family's decay may come from any input (Longhorn's
    per-channel decay is computed from `k` and `beta`), so `g` need not match the family's decay.
    Exactly one of (`family`, `couple`) or `update` defines the single-token update:

    - `couple(k, v, g, beta, w) -> Coupled` maps the inputs of one route, with coupling weight `w`
      (the routing weight under coupling "dt", ones under "none"), to the family's form;
    - `update(S, k, v, g, beta, w) -> S` is a free-form update (reference backend only).

    `check(w, beta)` optionally rejects weights the rule's math cannot take (raises ValueError).
    """

    name: str
    g: Optional[str] = None
    beta: bool = False
    family: Optional[Family] = None
    couple: Optional[Callable[..., Coupled]] = None
    update: Optional[Callable[..., torch.Tensor]] = None
    check: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]], None]] = None

    def __post_init__(self):
        if not isinstance(self.beta, bool):
            raise TypeError(f"rule {self.name!r}: beta must be a bool, got {self.beta!r}")
        if self.family is not None and not isinstance(self.family, Family):
            raise TypeError(f"rule {self.name!r}: family must be a Family, the name of one "
                            f"({sorted(FAMILIES)}) or None, got {self.family!r}")
        for name in ("couple", "update", "check"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"rule {self.name!r}: {name} must be callable or None, got {fn!r}")
        if self.g not in (None, "scalar", "vector"):
            raise ValueError(f"rule {self.name!r}: g must be None, 'scalar' or 'vector', got {self.g!r}")
        by_family = self.family is not None and self.couple is not None
        if by_family == (self.update is not None) or (self.family is None) != (self.couple is None):
            raise ValueError(f"rule {self.name!r}: give either family and couple, or update")

    def step(self, S, k, v, g, beta, w):
        """One token's update of the routed slots `S [..., K, V]`; every other input is per route."""
        if self.family is None:
            return self.update(S, k, v, g, beta, w)
        return self.family.step(S, self.couple(k, v, g, beta, w))


def _fm_check(w, beta):
    # The forget gate 1 - w*beta must lie in [0, 1]: a larger product would flip the state's sign.
    worst = (w * beta).max() if w.numel() else None
    if worst is not None and worst > 1:
        raise ValueError(
            f"route_w, beta: rule 'fm' with coupling 'dt' needs route_w * beta <= 1 (the forget gate 1 - w*beta "
            f"must lie in [0, 1]), got a product of {worst.item():.4g}"
        )


_RULES: dict[str, Rule] = {}


def register_rule(name: str, *, g=None, beta=False, family=None, couple=None, update=None, check=None,
                  replace=False) -> Rule:
    """Register an update rule under `name` (see `Rule`). `family` may be a `Family` or its name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_rule: name must be a non-empty string, got {name!r}")
    if name in _RULES and not replace:
        raise ValueError(f"register_rule: a rule named {name!r} exists; pass replace=True to replace it")
    if isinstance(family, str):
        if family not in FAMILIES:
            raise ValueError(f"register_rule: unknown family {family!r}; known: {sorted(FAMILIES)}")
        family = FAMILIES[family]
    rule = Rule(name, g=g, beta=beta, family=family, couple=couple, update=update, check=check)
    _RULES[name] = rule
    if family is not None and family not in FAMILIES.values():
        _warn_if_no_fast_backend(rule)
    return rule


def _warn_if_no_fast_backend(rule: Rule) -> None:
    """A rule of a family no fast backend runs (a new `Family`) runs on the reference backend only: say so."""
    from .registry import fast_backends, fast_backends_for

    others = fast_backends()
    if others and not fast_backends_for(rule):
        refusals = "; ".join(b.rule_refusal(rule) for b in others)
        warnings.warn(f"register_rule: no fast backend runs rule {rule.name!r} of the new family "
                      f"{rule.family.name!r}, so it runs on the reference backend only ({refusals})", stacklevel=3)


def unregister_rule(name: str) -> None:
    get_rule(name)
    del _RULES[name]


def get_rule(rule) -> Rule:
    """The registered `Rule` named `rule` (a `Rule` is returned as is)."""
    if isinstance(rule, Rule):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"rule: expected a rule name (str) or a Rule, got {type(rule).__name__} {rule!r}")
    if rule not in _RULES:
        raise ValueError(f"rule: unknown rule {rule!r}; registered rules: {sorted(_RULES)}")
    return _RULES[rule]


def available_rules() -> list[str]:
    return sorted(_RULES)


# The rules of docs/contract.md section 3. `w` scales the step like Mamba's dt (coupling "dt").
BUILT_IN_RULES = ("mamba2", "gla", "deltanet", "gated_deltanet", "fm", "kda")
register_rule("mamba2", g="scalar", family=ADDITIVE_SCALAR,
              couple=lambda k, v, g, beta, w: Coupled(w[..., None] * k, v, w * g, None))
register_rule("gla", g="vector", family=ADDITIVE_VECTOR,
              couple=lambda k, v, g, beta, w: Coupled(w[..., None] * k, v, w[..., None] * g, None))
register_rule("deltanet", beta=True, family=DELTA,
              couple=lambda k, v, g, beta, w: Coupled(k, v, None, w * beta))
register_rule("gated_deltanet", g="scalar", beta=True, family=DELTA,
              couple=lambda k, v, g, beta, w: Coupled(k, v, w * g, w * beta))
register_rule("kda", g="vector", beta=True, family=DELTA_VECTOR,
              couple=lambda k, v, g, beta, w: Coupled(k, v, w[..., None] * g, w * beta))


def _fm_couple(k, v, g, beta, w):
    gate = w * beta
    # log(1 - gate) is -inf at gate = 1, and its gradient through exp(log(1 - gate)) would be
    # 0 * inf = NaN. Stopping the gate one epsilon short of 1 keeps every gradient finite and leaves
    # eps (2e-16 in float64, 1e-7 in float32) of the old state instead of none: a rounding error.
    forget = torch.log1p(-gate.clamp(max=1 - torch.finfo(gate.dtype).eps))
    return Coupled(gate[..., None] * k, v, forget, None)


register_rule("fm", beta=True, family=ADDITIVE_SCALAR, check=_fm_check, couple=_fm_couple)
