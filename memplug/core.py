"""The memory every routed layer runs, once: route the tokens, select each route's writes, scan (or
take one decode step), add the shared slot, and weigh the load-balancing loss. `RoutedMemory` and
the adapters (`memplug.adapters.RoutedAdapter`) differ only in how they project the token stream
to queries and writes and how they read the output; both call `MemoryCore`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .backends.layout import routes_per_head
from .routing import Router, Routing, SlotCounts, apply_capacity, load_balancing_loss
from .rules import Rule
from .scan import routed_scan, routed_step


class WriteInputs(NamedTuple):
    """A memory's writes: k `[B,T,H,c,K]`, v `[B,T,H,c,V]`, g and beta (or None) with the same
    `c`: 1 where one projection serves every slot, `num_slots` where each slot has its own."""
    k: torch.Tensor
    v: torch.Tensor
    g: Optional[torch.Tensor]
    beta: Optional[torch.Tensor]


def select_routes(x, idx):
    """Per-slot inputs `[B,T,H,m,...]` at the routed slots `idx [B,T,H,R]` -> `[B,T,H,R,...]`."""
    if x is None:
        return None
    idx = idx.reshape(*idx.shape, *(1,) * (x.dim() - 4)).expand(*idx.shape, *x.shape[4:])
    return x.gather(3, idx)


def _per_route(t, routes):
    """Writes `[B,T,H,c,...]` -> shared by the routes `[B,T,H,...]` (c = 1) or per route `[B,T,H,R,...]`."""
    if t is None:
        return None
    return t.squeeze(3) if t.shape[3] == 1 else select_routes(t, routes)


@dataclass(frozen=True)
class MemoryCore:
    """rule, num_slots, coupling, backend: as `RoutedMemory` takes them; scale: the read scale (None:
    `K ** -0.5`)."""

    rule: Rule
    num_slots: int
    coupling: str
    backend: str
    scale: Optional[float] = None

    def route(self, router: Optional[Router], x) -> Routing:
        """The router's routing of `x [B,T,...]`, or every token to slot 0 with weight 1 (one slot)."""
        if router is not None:
            return router(x)
        B, T = x.shape[:2]
        ones = torch.ones(B, T, 1, 1, dtype=torch.float32, device=x.device)
        return Routing(torch.zeros(B, T, 1, 1, dtype=torch.long, device=x.device), ones, ones)

    @staticmethod
    def limit(router: Optional[Router], routing: Routing, cu_seqlens, counts: Optional[SlotCounts]):
        """`(routing, counts)`: the router's capacity applied (`memplug.routing.apply_capacity`), from
        the slot counts of the tokens before; `(routing, None)` as given without a capacity."""
        if router is None or router.config.capacity_factor == 0:
            return routing, None
        return apply_capacity(routing, router.config.capacity_factor, cu_seqlens, counts)

    def __call__(self, q, writes: WriteInputs, routing: Routing, state, cu_seqlens, want_state: bool,
                 shared_q=None, shared: Optional[WriteInputs] = None, shared_state=None):
        """`(o [B,T,H,V], state, shared_state)`: the routed slots read by `q`, plus the shared slot
        (always written, weight 1, coupling none) read by `shared_q` when `shared` writes are given.
        States are returned when `want_state` (None otherwise); a given state continues its sequences."""
        routes = routes_per_head(routing.idx, q.shape[2])
        k, v, g, beta = (_per_route(t, routes) for t in writes)
        o, state = self._memory(q, k, v, g, beta, routing.idx, routing.weight, self.num_slots, self.coupling, state,
                                cu_seqlens, want_state)
        if shared is not None:
            sk, sv, sg, sbeta = (None if t is None else t.squeeze(3) for t in shared)
            every_token = self.route(None, q)  # slot 0, weight 1
            o_shared, shared_state = self._memory(shared_q, sk, sv, sg, sbeta, every_token.idx, every_token.weight, 1,
                                                  "none", shared_state, cu_seqlens, want_state)
            o = o + o_shared
        return o, state, shared_state

    def _memory(self, q, k, v, g, beta, idx, weight, num_slots, coupling, state, cu_seqlens, want_state):
        # The values routed_scan would check hold by construction (top-k indices are in range and
        # distinct, softmax weights and sigmoid write strengths lie in [0, 1], decays are <= 0), so
        # they are not read back to the host: a decode step makes no host sync.
        kw = dict(rule=self.rule, route_idx=idx, route_w=weight, g=g, beta=beta, coupling=coupling, scale=self.scale,
                  backend=self.backend, check_values=False)
        if state is not None and want_state and q.shape[1] == 1 and cu_seqlens is None:
            return routed_step(q, k, v, state=state, **kw)
        return routed_scan(q, k, v, num_slots=num_slots, initial_state=state, output_final_state=want_state,
                           cu_seqlens=cu_seqlens, **kw)

    @staticmethod
    def aux_loss(router: Optional[Router], routing: Routing) -> Optional[torch.Tensor]:
        """The router's weighted load-balancing loss, or None without a router or a weight."""
        coef = 0.0 if router is None else router.config.load_balance_coef
        return coef * load_balancing_loss(routing) if coef > 0 else None
