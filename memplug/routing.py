"""Routers: router logits -> slot indices and weights (step 1 of docs/contract.md section 5).

Three ways to pick slots, all from the scores of `logits / temperature` over the `m` slots (a
softmax, or independent sigmoids as in Raven):

- `topk`: the `R` most probable slots; weights renormalised to sum to 1 (optional);
- `dense`: every slot (R = m), weighted by its probability (soft routing);
- `threshold`: the slots whose probability is at least `threshold`, at most `R` and never none
  (the most probable slot always stays). Dropped routes get weight 0, which under either coupling
  is the same as no route (docs/contract.md section 3).

Options used in the field (`RouterConfig`): sigmoid scores (`score="sigmoid"`, Raven); Gumbel noise
on the logits in training (`gumbel_noise`, Raven), drawn from torch's generator, so that activation
checkpointing, which restores the generator's state before it recomputes, routes identically; and
auxiliary-loss-free balancing (`balance_rate`, DeepSeek-V3): a per-slot bias, added to the scores
only to pick the slots (never to the weights), that `update_balance_biases(model)` moves by
`balance_rate` towards the slots the last training forward underused. Call it after each optimizer
step (`memplug ablate` does); and a capacity factor (`capacity_factor`, as MoE layers have), which
`apply_capacity` enforces causally: a slot takes at most ceil(capacity_factor * R * (p + 1) / m)
routes from the first p + 1 tokens of a sequence (its fair share of the routes so far, times the
factor), and a route beyond that is dropped (weight 0; the kept weights are not renormalised). The
counts carry over in a layer's cache (`SlotCounts`), so decoding drops what the full sequence drops.

`load_balancing_loss` is the Switch Transformer auxiliary loss and `routing_stats` the numbers an
experiment logs per step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_bool, check_finite_number
from .modules import RMSNorm, at_least_float32

ROUTER_KINDS = ("topk", "dense", "threshold")
ROUTER_SCORES = ("softmax", "sigmoid")


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
    score: "softmax" (the scores sum to 1 over the slots) or "sigmoid" (each slot scored on its own;
        `Routing.probs` holds them normalised to sum to 1, for the loss and the statistics).
    gumbel_noise: add Gumbel(0, 1) noise to the logits while the module is training.
    balance_rate: step of the auxiliary-loss-free balancing bias (0: no bias); top-k and threshold
        routing only (dense routing uses every slot).
    capacity_factor: each slot takes at most this multiple of its fair share of the routes so far
        (`apply_capacity`; 0: no limit); top-k and threshold routing only.
    """

    kind: str = "topk"
    temperature: float = 1.0
    renormalize: bool = True
    threshold: float = 0.0
    per_head: bool = False
    rms_norm_input: bool = False
    load_balance_coef: float = 0.0
    score: str = "softmax"
    gumbel_noise: bool = False
    balance_rate: float = 0.0
    capacity_factor: float = 0.0

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router.kind: expected one of {ROUTER_KINDS}, got {self.kind!r}")
        if self.score not in ROUTER_SCORES:
            raise ValueError(f"router.score: expected one of {ROUTER_SCORES}, got {self.score!r}")
        for name in ("temperature", "threshold", "load_balance_coef", "balance_rate", "capacity_factor"):
            check_finite_number("router." + name, getattr(self, name))
        for name in ("renormalize", "per_head", "rms_norm_input", "gumbel_noise"):
            check_bool("router." + name, getattr(self, name))
        if not self.balance_rate >= 0:
            raise ValueError(f"router.balance_rate: expected a value >= 0, got {self.balance_rate!r}")
        if self.balance_rate > 0 and self.kind == "dense":
            raise ValueError("router.balance_rate: dense routing uses every slot, so a balancing bias would "
                             "change nothing; use kind 'topk' or 'threshold'")
        if not self.capacity_factor >= 0:
            raise ValueError(f"router.capacity_factor: expected a value >= 0 (0: no limit), "
                             f"got {self.capacity_factor!r}")
        if self.capacity_factor > 0 and self.kind == "dense":
            raise ValueError("router.capacity_factor: dense routing sends every token to every slot, so a capacity "
                             "would drop the same share of every slot; use kind 'topk' or 'threshold'")
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
                raise ValueError(f"router: unknown options {sorted(unknown)}; "
                                 f"known: {sorted(cls.__dataclass_fields__)}")
            return cls(**router)
        raise TypeError(f"router: expected a RouterConfig, a dict or None, got {type(router).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


class Routing(NamedTuple):
    idx: torch.Tensor  # [B,T,Hr,R] int64, distinct within a token
    weight: torch.Tensor  # [B,T,Hr,R] >= 0
    probs: torch.Tensor  # [B,T,Hr,m] router probabilities


def _scores(logits, temperature, score):
    """Per-slot scores `[..., m]` in float32 or wider, and their normalisation to a distribution."""
    logits = at_least_float32(logits) / temperature
    if score == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores, scores / scores.sum(-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    return probs, probs


def _pick(scores, topk, bias):
    """The `topk` best slots by `scores + bias` (the bias only picks), and their scores."""
    idx = (scores if bias is None else scores + bias).topk(topk, dim=-1).indices
    return scores.gather(-1, idx), idx


def topk_routing(logits, topk: int, temperature=1.0, renormalize=True, score="softmax", bias=None) -> Routing:
    scores, probs = _scores(logits, temperature, score)
    weight, idx = _pick(scores, topk, bias)
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(idx, weight, probs)


def dense_routing(logits, temperature=1.0, score="softmax") -> Routing:
    _, probs = _scores(logits, temperature, score)
    idx = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape)
    return Routing(idx, probs, probs)


def threshold_routing(logits, topk: int, threshold: float, temperature=1.0, renormalize=True, score="softmax",
                      bias=None) -> Routing:
    """Keeps the picked slots whose normalised score is at least `threshold` (and always the first)."""
    scores, probs = _scores(logits, temperature, score)
    _, idx = _pick(scores, topk, bias)
    weight = probs.gather(-1, idx)
    keep = weight >= threshold
    keep[..., 0] = True  # never drop every route of a token
    weight = weight * keep
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(idx, weight, probs)


class SlotCounts(NamedTuple):
    """What `apply_capacity` carries from one call to the next, per sequence: `seen [N]` tokens so
    far and `kept [N, Hr, m]` routes each slot took from them (int64)."""

    seen: torch.Tensor
    kept: torch.Tensor


def apply_capacity(routing: Routing, capacity_factor: float, cu_seqlens=None, counts: SlotCounts = None):
    """`(routing, counts)`: the routes beyond their slot's capacity set to weight 0, and the counts
    after these tokens. Slot j of a sequence takes token p's route (p counted from the sequence's
    start, including the tokens of `counts`) iff it took fewer than C_p = ceil(capacity_factor * R *
    (p + 1) / m) routes before; routes of weight 0 take no capacity. Causal, and sync-free.

    The kept count k(t) obeys k(t) = k(t-1) + [x_t and k(t-1) < C_t] (x_t: a route to the slot at
    t). As C never decreases, k(t) <= C_t, and at a dropped route k(t-1) = C_t; so after the last
    drop every route is kept, which gives, with a(t) the routes sent through t and k0 the count
    before the first token, the closed form k(t) = a(t) + min(k0, min_{s<=t} (C_s - a(s))): a
    cumulative sum and a cumulative minimum instead of a loop over tokens."""
    idx, weight, probs = routing
    B, T, Hr, R = idx.shape
    m, dev, f64 = probs.shape[-1], idx.device, torch.float64
    E = B * T  # the batch as one stream of tokens, cut into sequences at `starts`
    starts = torch.arange(0, E + 1, T, device=dev) if cu_seqlens is None else cu_seqlens.to(torch.int64)
    N = starts.numel() - 1
    seq = torch.repeat_interleave(torch.arange(N, device=dev), starts.diff(), output_size=E)
    first = torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, starts[:-1], True)
    if counts is None:
        counts = SlotCounts(torch.zeros(N, dtype=torch.int64, device=dev),
                            torch.zeros(N, Hr, m, dtype=torch.int64, device=dev))
    position = torch.arange(E, device=dev) - starts[:-1][seq] + counts.seen[seq]
    capacity = torch.ceil(capacity_factor * R * (position + 1).to(f64) / m)[:, None, None]  # [E,1,1]
    sent = torch.zeros(E, Hr, m, dtype=f64, device=dev).scatter_(
        -1, idx.reshape(E, Hr, R), (weight > 0).reshape(E, Hr, R).to(f64))
    sent_so_far = sent.cumsum(0)
    a = sent_so_far - F.pad(sent_so_far, (0, 0, 0, 0, 1, 0))[starts[:-1]][seq]  # within each sequence
    k0 = counts.kept.to(f64)[seq]
    # min(k0, min_s (C_s - a(s))) = k0 + min_s min(C_s - a(s) - k0, 0); the clamped terms lie in
    # [-E R, 0], so an offset of `spread` per sequence makes one cumulative minimum restart at each.
    spread = float(E * R + 1)
    offset = spread * seq.to(f64)[:, None, None]
    lowest = torch.cummin((capacity - a - k0).clamp(max=0) - offset, dim=0).values + offset
    kept_through = a + k0 + lowest  # k(t)
    kept_before = torch.where(first[:, None, None], k0, F.pad(kept_through, (0, 0, 0, 0, 1, 0))[:-1])
    room = (kept_before < capacity).gather(-1, idx.reshape(E, Hr, R)).reshape(B, T, Hr, R)
    last = starts[1:] - 1
    counts = SlotCounts(counts.seen + starts.diff(), kept_through[last].to(torch.int64))
    return Routing(idx, torch.where(room, weight, 0.0), probs), counts


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
    `config.per_head` else 1. With `config.balance_rate`, it keeps a balancing bias per (head group,
    slot) in the buffer `balance_bias` (saved with the model) and the load of its last training
    forward, which `update_balance_bias` consumes."""

    def __init__(self, hidden_size: int, num_heads: int, num_slots: int, topk: int, config: RouterConfig):
        super().__init__()
        self.num_slots, self.topk, self.config = num_slots, topk, config
        self.groups = num_heads if config.per_head else 1
        self.norm = RMSNorm(hidden_size) if config.rms_norm_input else nn.Identity()
        self.proj = nn.Linear(hidden_size, self.groups * num_slots, bias=False)
        if config.balance_rate > 0:
            self.register_buffer("balance_bias", torch.zeros(self.groups, num_slots, dtype=torch.float32))
        else:
            self.balance_bias = None
        self.last_load = None  # routes per (head group, slot) in the last training forward

    def forward(self, x) -> Routing:
        logits = self.proj(self.norm(x)).unflatten(-1, (self.groups, self.num_slots))
        c = self.config
        if c.gumbel_noise and self.training:
            # -log(E), E ~ Exponential(1), is Gumbel(0, 1); torch's generator makes it replayable.
            logits = logits - torch.empty_like(logits, dtype=torch.float32).exponential_().log()
        if c.kind == "dense":
            return dense_routing(logits, c.temperature, c.score)
        if c.kind == "threshold":
            routing = threshold_routing(logits, self.topk, c.threshold, c.temperature, c.renormalize, c.score,
                                        self.balance_bias)
        else:
            routing = topk_routing(logits, self.topk, c.temperature, c.renormalize, c.score, self.balance_bias)
        if self.balance_bias is not None and self.training:
            # Overwritten, not accumulated: a recomputation under checkpointing leaves it as it was.
            with torch.no_grad():
                sent = (routing.weight > 0).to(torch.float32)
                self.last_load = torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, routing.idx, sent) \
                    .flatten(0, -3).sum(0)  # [groups, m]
        return routing

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """Move the bias by `balance_rate` up for the slots the last training forward loaded below the
        mean, down for those above it (its sign only, as DeepSeek-V3), then forget that load. Under
        torch.distributed the load is summed over the processes first, so every replica moves its
        bias alike (call it on every process)."""
        if self.balance_bias is None or self.last_load is None:
            return
        load = self.last_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # the load of the whole batch, over every process
        self.balance_bias += self.config.balance_rate * torch.sign(load.mean(-1, keepdim=True) - load)
        self.last_load = None


def update_balance_biases(model: nn.Module) -> None:
    """`Router.update_balance_bias` for every router of `model` (call after each optimizer step)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.update_balance_bias()
