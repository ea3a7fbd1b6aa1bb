"""Routers: router logits -> slot indices and weights (step 1 of docs/contract.md section 5).

Three ways to pick slots, all from the softmax of `logits / temperature` over the `m` slots:

- `topk`: the `R` most probable slots; weights renormalised to sum to 1 (optional);
- `dense`: every slot (R = m), weighted by its probability (soft routing);
- `threshold`: the slots whose probability is at least `threshold`, at most `R` and never none
  (the most probable slot always stays). Dropped routes get weight 0, which under coupling "dt"
  is the same as no route (docs/contract.md section 3); under coupling "none" they would still write, so
  `RoutedMemory` rejects that combination.

`load_balancing_loss` is the Switch Transformer auxiliary loss and `routing_stats` the numbers an
experiment logs per step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from .checks import check_bool, check_finite_number
from .modules import RMSNorm, at_least_float32

ROUTER_KINDS = ("topk", "dense", "threshold")


@dataclass
class RouterConfig:
    """How a layer routes tokens to slots.

    kind: "topk", "dense" or "threshold" (see the module docstring).
    temperature: softmax temperature of the router logits (> 0).
    renormalize: top-k / threshold weights are renormalised to sum to 1 over the kept routes.
    threshold: minimum probability of a kept slot, for kind "threshold".
    per_head: each head routes on its own (Hr = H) instead of all heads alike (Hr = 1).
    rms_norm_input: RMS-normalise the router's input (Factorization Memory's router).
    load_balance_coef: weight of the Switch load-balancing loss in `aux["aux_loss"]`.
    """

    kind: str = "topk"
    temperature: float = 1.0
    renormalize: bool = True
    threshold: float = 0.0
    per_head: bool = False
    rms_norm_input: bool = False
    load_balance_coef: float = 0.0

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router.kind: expected one of {ROUTER_KINDS}, got {self.kind!r}")
        for name in ("temperature", "threshold", "load_balance_coef"):
            check_finite_number("router." + name, getattr(self, name))
        for name in ("renormalize", "per_head", "rms_norm_input"):
            check_bool("router." + name, getattr(self, name))
        if not self.temperature > 0:
            raise ValueError(f"router.temperature: expected a value > 0, got {self.temperature!r}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"router.threshold: expected a probability in [0, 1], got {self.threshold!r}")
        if not self.load_balance_coef >= 0:
            raise ValueError(f"router.load_balance_coef: expected a value >= 0, got {self.load_balance_coef!r}")

    @classmethod
    def make(cls, router) -> "RouterConfig":
        """A `RouterConfig` from None (defaults), a dict of its fields, or a `RouterConfig`."""
        if router is None:
            return cls()
        if isinstance(router, cls):
            return router
        if isinstance(router, dict):
            unknown = set(router) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"router: unknown options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**router)
        raise TypeError(f"router: expected a RouterConfig, a dict or None, got {type(router).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


class Routing(NamedTuple):
    idx: torch.Tensor  # [B,T,Hr,R] int64, distinct within a token
    weight: torch.Tensor  # [B,T,Hr,R] >= 0
    probs: torch.Tensor  # [B,T,Hr,m] router probabilities


def topk_routing(logits, topk: int, temperature=1.0, renormalize=True) -> Routing:
    probs = torch.softmax(at_least_float32(logits) / temperature, dim=-1)
    weight, idx = probs.topk(topk, dim=-1)
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(idx, weight, probs)


def dense_routing(logits, temperature=1.0) -> Routing:
    probs = torch.softmax(at_least_float32(logits) / temperature, dim=-1)
    idx = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape)
    return Routing(idx, probs, probs)


def threshold_routing(logits, topk: int, threshold: float, temperature=1.0, renormalize=True) -> Routing:
    probs = torch.softmax(at_least_float32(logits) / temperature, dim=-1)
    weight, idx = probs.topk(topk, dim=-1)
    keep = weight >= threshold
    keep[..., 0] = True  # never drop every route of a token
    weight = weight * keep
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(idx, weight, probs)


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer loss `m * sum_i f_i P_i`: `f_i` the fraction of routes sent to slot `i`
    (counting routes of weight > 0), `P_i` its mean router probability. 1 when perfectly balanced."""
    m = routing.probs.shape[-1]
    sent = torch.zeros_like(routing.probs).scatter_(-1, routing.idx, (routing.weight > 0).to(routing.probs.dtype))
    fraction = sent.flatten(0, -2).sum(0) / sent.flatten(0, -2).sum().clamp_min(1)
    mean_prob = routing.probs.flatten(0, -2).mean(0)
    return m * (fraction * mean_prob).sum()


@torch.no_grad()
def routing_stats(routing: Routing) -> dict:
    """Slot load histogram (routes of weight > 0 per slot), mean routing entropy (nats) and the
    fraction of slots no token used."""
    m = routing.probs.shape[-1]
    used = routing.idx[routing.weight > 0]
    load = torch.bincount(used.flatten(), minlength=m)
    p = routing.probs.flatten(0, -2)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    return {"load": load.cpu(), "entropy": float(entropy), "unused_fraction": float((load == 0).float().mean())}


class Router(nn.Module):
    """Linear router over the hidden state: `forward(x [B,T,D]) -> Routing` with Hr = H if
    `config.per_head` else 1."""

    def __init__(self, hidden_size: int, num_heads: int, num_slots: int, topk: int, config: RouterConfig):
        super().__init__()
        self.num_slots, self.topk, self.config = num_slots, topk, config
        self.groups = num_heads if config.per_head else 1
        self.norm = RMSNorm(hidden_size) if config.rms_norm_input else nn.Identity()
        self.proj = nn.Linear(hidden_size, self.groups * num_slots, bias=False)

    def forward(self, x) -> Routing:
        logits = self.proj(self.norm(x)).unflatten(-1, (self.groups, self.num_slots))
        c = self.config
        if c.kind == "dense":
            return dense_routing(logits, c.temperature)
        if c.kind == "threshold":
            return threshold_routing(logits, self.topk, c.threshold, c.temperature, c.renormalize)
        return topk_routing(logits, self.topk, c.temperature, c.renormalize)
