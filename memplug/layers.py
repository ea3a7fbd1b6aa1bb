"""Layers: `RoutedMemory` and its presets `FactorizationMemory` and `MixtureOfMemories`.

A token's way through `RoutedMemory.forward`:

1. projections: the query `q`, and the *writes* (`k`, `v`, and the rule's `g` / `beta`); `q`, `k`
   and `v` go through a short causal convolution; with `per_slot_kv` every slot has its own writes
   and the token's routed slots are gathered;
2. routing: `Router` -> slot indices and weights (`memplug.routing`);
3. memory: `memplug.routed_scan` (or `routed_step` when decoding one token with a cache), which
   runs the rule's single-token update (`memplug.rules`) on the routed slots;
4. read-out: an always-on shared slot is added if configured, then a gated RMS norm per head and
   the output projection.

The plain backbone is `num_slots=1, topk=1, coupling="none"`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import MemoryCache
from .checks import (COUPLINGS, check_bool, check_cache_tensor, check_conv_histories, check_cu_seqlens,
                     check_finite_number, check_positive_int, compute_dtype)
from .core import MemoryCore, WriteInputs
from .modules import RMSNorm, ShortConv, at_least_float32, l2norm
from .registry import check_backend_name
from .routing import Router, RouterConfig
from .rules import get_rule


def check_memory_options(num_slots, topk, coupling, router, per_slot_kv, shared_slot, backend) -> RouterConfig:
    """Checks the options that make a layer a routed memory (shared by `RoutedMemory` and the
    adapters' `MemoryConfig`); returns the router's `RouterConfig`."""
    for name, value in (("num_slots", num_slots), ("topk", topk)):
        check_positive_int(name, value)
    for name, value in (("per_slot_kv", per_slot_kv), ("shared_slot", shared_slot)):
        check_bool(name, value)
    check_backend_name(backend)
    if topk > num_slots:
        raise ValueError(f"topk: expected at most num_slots = {num_slots} routes per token, got {topk}")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
    router = RouterConfig.make(router)
    if router.kind == "dense" and topk != num_slots:
        raise ValueError(f"topk: dense routing uses every slot, so topk must equal num_slots = {num_slots}, got {topk}")
    return router


class _Stream(nn.Module):
    """A linear projection to `width` channels, then a short convolution (or SiLU without one)."""

    def __init__(self, hidden_size, width, short_conv, conv_size):
        super().__init__()
        self.proj = nn.Linear(hidden_size, width, bias=False)
        self.conv = ShortConv(width, conv_size) if short_conv else None

    def forward(self, x, state, cu_seqlens, output_state):
        y = self.proj(x)
        if self.conv is None:
            return F.silu(y), None
        return self.conv(y, state, cu_seqlens, output_state)


class Writes(nn.Module):
    """The write inputs of a rule for `copies` sets of slots: `k [B,T,H,copies,K]`,
    `v [B,T,H,copies,V]`, `g` (`[B,T,H,copies]` or `[B,T,H,copies,K]`) and `beta [B,T,H,copies]`
    as the rule needs them.

    Scalar decays follow Mamba-2: `g = -exp(A_log) * softplus(a + dt_bias)`; per-channel decays
    follow GLA: `g = logsigmoid(a) / 16`. `beta = sigmoid(b)`.
    """

    def __init__(self, name, hidden_size, num_heads, head_k_dim, head_v_dim, rule, copies, short_conv, conv_size):
        super().__init__()
        self.name = name  # prefix of this module's entries in the cache's conv histories
        self.shape = (num_heads, copies)
        H, K, V = num_heads, head_k_dim, head_v_dim
        self.k = _Stream(hidden_size, H * copies * K, short_conv, conv_size)
        self.v = _Stream(hidden_size, H * copies * V, short_conv, conv_size)
        self.g_kind = rule.g
        if rule.g == "scalar":
            self.a_proj = nn.Linear(hidden_size, H * copies, bias=False)
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
            dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        elif rule.g == "vector":
            self.a_proj = nn.Linear(hidden_size, H * copies * K, bias=True)
        self.b_proj = nn.Linear(hidden_size, H * copies, bias=False) if rule.beta else None

    def forward(self, x, conv_state, cu_seqlens, output_state):
        heads = lambda t: t.unflatten(-1, (*self.shape, -1))
        k, k_state = self.k(x, conv_state.get(self.name + "k"), cu_seqlens, output_state)
        v, v_state = self.v(x, conv_state.get(self.name + "v"), cu_seqlens, output_state)
        g = beta = None
        if self.g_kind == "scalar":
            a = heads(at_least_float32(self.a_proj(x)))[..., 0]
            g = -self.A_log.exp()[:, None] * F.softplus(a + self.dt_bias[:, None])
        elif self.g_kind == "vector":
            g = F.logsigmoid(heads(at_least_float32(self.a_proj(x)))) / 16
        if self.b_proj is not None:
            beta = torch.sigmoid(heads(at_least_float32(self.b_proj(x)))[..., 0])
        return heads(k), heads(v), g, beta, {self.name + "k": k_state, self.name + "v": v_state}


class RoutedMemory(nn.Module):
    """A linear RNN layer with routed sparse-state memory.

    Args:
        hidden_size, num_heads, head_k_dim, head_v_dim: layer sizes.
        rule: update rule name (`memplug.available_rules()`).
        num_slots: slots `m` per head; topk: slots `R` each token routes to.
        coupling: "dt" (the routing weight scales the update) or "none" (it only weights the read).
        per_slot_kv: every slot has its own write projections (k, v, g, beta), as in MoM;
            otherwise one write projection is shared by all slots, as in Factorization Memory.
        shared_slot: add an always-on dense slot (MoM's shared memory).
        router: a `RouterConfig`, a dict of its fields, or None for the defaults.
        short_conv, conv_size: short causal convolutions on q, k, v.
        output_gate: gate the normalised read with `silu(W x)` (the read's merge gate).
        qk_norm: "l2" normalises q and k per head; the default does so for delta rules only.
        backend: the `routed_scan` backend ("auto" picks the fastest for the device).

    `forward(x [B,T,D], cache=None, cu_seqlens=None, use_cache=False) -> (y, cache, aux)`:
    returns a `MemoryCache` if `cache` was given or `use_cache`, else None. A `cache` passed in is
    advanced in place to the state after `x` and returned (the same object); to branch from a
    cache, pass a copy (`MemoryCache.clone`). `aux["aux_loss"]` is the weighted load-balancing loss
    to add to the training loss (0 without one), in float32 (float64 for a float64 layer), and
    `aux["routing"]` the `Routing` (None with one slot), for `memplug.routing.routing_stats`.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, head_v_dim: int,
                 rule: str = "gated_deltanet", num_slots: int = 4, topk: int = 2, coupling: str = "dt",
                 per_slot_kv: bool = False, shared_slot: bool = False, router=None, short_conv: bool = True,
                 conv_size: int = 4, output_gate: bool = True, qk_norm: Optional[str] = "auto",
                 backend: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_k_dim", head_k_dim),
                            ("head_v_dim", head_v_dim), ("conv_size", conv_size)):
            check_positive_int(name, value)
        for name, value in (("short_conv", short_conv), ("output_gate", output_gate)):
            check_bool(name, value)
        check_finite_number("norm_eps", norm_eps)
        if not norm_eps > 0:
            raise ValueError(f"norm_eps: expected a value > 0, got {norm_eps!r}")
        router = check_memory_options(num_slots, topk, coupling, router, per_slot_kv, shared_slot, backend)
        self.rule = get_rule(rule)
        if qk_norm == "auto":
            qk_norm = "l2" if self.rule.family is not None and self.rule.family.delta else None
        if qk_norm not in (None, "l2"):
            raise ValueError(f"qk_norm: expected 'auto', 'l2' or None, got {qk_norm!r}")
        self.config = dict(hidden_size=hidden_size, num_heads=num_heads, head_k_dim=head_k_dim,
                           head_v_dim=head_v_dim, rule=self.rule.name, num_slots=num_slots, topk=topk,
                           coupling=coupling, per_slot_kv=per_slot_kv, shared_slot=shared_slot,
                           router=router.to_dict(), short_conv=short_conv, conv_size=conv_size,
                           output_gate=output_gate, qk_norm=qk_norm, backend=backend, norm_eps=norm_eps)
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_k_dim, head_v_dim
        self.num_slots, self.topk, self.coupling, self.backend = num_slots, topk, coupling, backend
        self.per_slot_kv, self.qk_norm = per_slot_kv, qk_norm

        self.q = _Stream(hidden_size, num_heads * head_k_dim, short_conv, conv_size)
        write_args = (hidden_size, num_heads, head_k_dim, head_v_dim, self.rule)
        self.writes = Writes("", *write_args, num_slots if per_slot_kv else 1, short_conv, conv_size)
        self.shared_writes = Writes("shared_", *write_args, 1, short_conv, conv_size) if shared_slot else None
        self.router = Router(hidden_size, num_heads, num_slots, topk, router) if num_slots > 1 else None
        self.g_proj = nn.Linear(hidden_size, num_heads * head_v_dim, bias=False) if output_gate else None
        self.o_norm = RMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(num_heads * head_v_dim, hidden_size, bias=False)

    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence (slots, plus the shared slot)."""
        slots = self.num_slots + (self.shared_writes is not None)
        return self.num_heads * slots * self.head_k_dim * self.head_v_dim

    def active_state_numel(self) -> int:
        """Numbers of the state one token writes: its `topk` routed slots, plus the shared slot."""
        slots = self.topk + (self.shared_writes is not None)
        return self.num_heads * slots * self.head_k_dim * self.head_v_dim

    def flops_per_token(self) -> int:
        """Forward FLOPs of one token (multiply and add count 2), as computed here:

        - every linear map, `2 * in * out` (per-slot write projections are computed for every slot);
        - every short convolution, `2 * kernel_size * channels`;
        - the recurrence, per head and per slot the token writes (`topk`, plus the shared slot):
          `3 K V` for additive rules (decay, outer product, add) and `5 K V` for delta rules (the
          prediction `S^T k` costs `2 K V` more), and per slot it reads, `2 K V` (`q^T S`).
        Norms, gates and activations (O(V) per head) are left out.
        """
        linear = sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        conv = sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, ShortConv))
        family = self.rule.family
        update = 5 if family is not None and family.delta else 3
        slots = self.topk + (self.shared_writes is not None)
        recurrence = self.num_heads * slots * (update + 2) * self.head_k_dim * self.head_v_dim
        return linear + conv + recurrence

    @property
    def core(self) -> MemoryCore:
        """Route, scan, shared slot, auxiliary loss: the part every routed layer shares."""
        return MemoryCore(self.rule, self.num_slots, self.coupling, self.backend)

    def _check_forward(self, x, cache, cu_seqlens, use_cache):
        D = self.o_proj.out_features
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor of shape [B, T, hidden_size={D}], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        weights = self.o_proj.weight.dtype
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: expected the dtype of the layer's parameters, {weights}, got {x.dtype} (cast one "
                            f"of them, or run under torch.autocast)")
        check_bool("use_cache", use_cache)
        if cache is not None and not isinstance(cache, MemoryCache):
            raise TypeError(f"cache: expected a MemoryCache or None, got {type(cache).__name__}")
        B, T = x.shape[:2]
        rows = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T, x.device)
        if cache is not None:
            self._check_cache(cache, rows, x)

    def _conv_streams(self) -> dict:
        """The short convolutions whose histories the cache keeps, by their name there."""
        streams = {"q": self.q}
        for writes in (self.writes, self.shared_writes):
            if writes is not None:
                streams.update({writes.name + "k": writes.k, writes.name + "v": writes.v})
        return {name: stream.conv for name, stream in streams.items() if stream.conv is not None}

    def _check_cache(self, cache: MemoryCache, rows: int, x: torch.Tensor) -> None:
        """The cache is one this layer made for these sequences: slot states, shared slot and
        convolution histories of this layer's sizes, dtype and device. Shapes only: no host sync."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        dtype = compute_dtype(x)
        check_cache_tensor("state", cache.state, dict(batch=rows, heads=H, num_slots=self.num_slots, head_k_dim=K,
                                                      head_v_dim=V), dtype, x.device)
        if (cache.shared_state is None) != (self.shared_writes is None):
            has = "has no" if cache.shared_state is None else "has a"
            needs = "has" if self.shared_writes is not None else "has no"
            raise ValueError(f"cache: {has} shared-slot state, but this layer {needs} shared slot "
                             f"(shared_slot={self.shared_writes is not None}); the cache was made by another layer")
        if cache.shared_state is not None:
            check_cache_tensor("shared_state", cache.shared_state, dict(batch=rows, heads=H, num_slots=1,
                                                                        head_k_dim=K, head_v_dim=V), dtype, x.device)
        convs = {name: dict(batch=rows, taps=conv.kernel_size - 1, channels=conv.channels)
                 for name, conv in self._conv_streams().items()}
        check_conv_histories("conv", cache.conv, convs, x.dtype, x.device)
        capacity = self.router is not None and self.router.config.capacity_factor > 0
        if capacity and cache.counts is None:
            raise ValueError("cache: has no slot counts, but this layer's router has a capacity factor "
                             f"({self.router.config.capacity_factor}); the cache was made by another layer")
        if capacity:
            check_cache_tensor("counts.seen", cache.counts.seen, dict(batch=rows), torch.int64, x.device)
            check_cache_tensor("counts.kept", cache.counts.kept, dict(batch=rows, head_groups=self.router.groups,
                                                                      num_slots=self.num_slots), torch.int64, x.device)

    def forward(self, x, cache: Optional[MemoryCache] = None, cu_seqlens=None, use_cache: bool = False):
        self._check_forward(x, cache, cu_seqlens, use_cache)
        want_cache = use_cache or cache is not None
        conv = cache.conv if cache is not None else {}
        H, K = self.num_heads, self.head_k_dim
        q, q_conv = self.q(x, conv.get("q"), cu_seqlens, want_cache)
        q = q.unflatten(-1, (H, K))

        core = self.core
        chosen = core.route(self.router, x)
        routing, counts = core.limit(self.router, chosen, cu_seqlens, None if cache is None else cache.counts)
        # l2 norms act on each key alone, so they are taken before the routes are selected
        l2 = l2norm if self.qk_norm == "l2" else (lambda t: t)
        k, v, g, beta, write_conv = self.writes(x, conv, cu_seqlens, want_cache)
        new_conv = {"q": q_conv, **write_conv}
        shared = None
        if self.shared_writes is not None:
            sk, sv, sg, sbeta, shared_conv = self.shared_writes(x, conv, cu_seqlens, want_cache)
            shared = WriteInputs(l2(sk), sv, sg, sbeta)
            new_conv.update(shared_conv)
        q = l2(q)
        held, held_shared = (None, None) if cache is None else (cache.state, cache.shared_state)
        o, state, shared_state = core(q, WriteInputs(l2(k), v, g, beta), routing, held, cu_seqlens, want_cache,
                                      shared_q=q, shared=shared, shared_state=held_shared)

        gate = None if self.g_proj is None else self.g_proj(x).unflatten(-1, (H, self.head_v_dim))
        y = self.o_proj(self.o_norm(o, gate).flatten(-2))

        new_conv = {n: s for n, s in new_conv.items() if s is not None}
        if cache is not None:  # advanced in place, so that no caller holds a half-updated cache
            cache.advance(state, new_conv, shared_state, counts)
        elif want_cache:
            cache = MemoryCache(state, new_conv, shared_state, counts)
        aux_loss = core.aux_loss(self.router, chosen)  # on the router's choice, before any capacity drops
        if aux_loss is None:  # the router's probabilities, hence the loss, are at least float32; its zero is too
            aux_loss = x.new_zeros((), dtype=compute_dtype(x))
        return y, cache, {"aux_loss": aux_loss, "routing": routing if self.router is not None else None}


def _not_with_router(name, value, kwargs):
    """A preset's router option sets a field of the preset's router, which `router=` replaces."""
    if value is not None and "router" in kwargs:
        raise ValueError(f"{name}, router: got both {name}={value!r} and router={kwargs['router']!r}, which "
                         f"replaces the preset's router; set {name} inside router instead")


class FactorizationMemory(RoutedMemory):
    """Factorization Memory (arXiv 2511.00315): the `fm` rule with coupling "dt", one write
    projection shared by all slots, an RMS-normalised softmax top-k router with `temperature`
    (default 1.0), and a merge gate on the read. Every `RoutedMemory` argument can be overridden
    (e.g. `rule=` for an ablation across rules); `router=` replaces the preset's router, so it
    cannot be combined with `temperature`."""

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, head_v_dim: int, num_slots: int = 8,
                 topk: int = 2, temperature: Optional[float] = None, **kwargs):
        _not_with_router("temperature", temperature, kwargs)
        temperature = 1.0 if temperature is None else temperature
        defaults = dict(rule="fm", coupling="dt", per_slot_kv=False, shared_slot=False, output_gate=True,
                        router=RouterConfig(kind="topk", temperature=temperature, rms_norm_input=True))
        super().__init__(hidden_size, num_heads, head_k_dim, head_v_dim, num_slots=num_slots, topk=topk,
                         **{**defaults, **kwargs})


class MixtureOfMemories(RoutedMemory):
    """Mixture-of-Memories (arXiv 2502.13685): Gated DeltaNet with coupling "none", per-slot
    write projections, a shared always-on slot, top-k routing shared by all heads and a Switch
    load-balancing loss of weight `load_balance_coef` (default 0.01). The short convolutions run on
    the token stream before routing (MoM runs them on each memory's packed tokens). Every
    `RoutedMemory` argument can be overridden; `router=` replaces the preset's router, so it cannot
    be combined with `load_balance_coef`."""

    def __init__(self, hidden_size: int, num_heads: int, head_k_dim: int, head_v_dim: int, num_slots: int = 4,
                 topk: int = 2, load_balance_coef: Optional[float] = None, **kwargs):
        _not_with_router("load_balance_coef", load_balance_coef, kwargs)
        load_balance_coef = 0.01 if load_balance_coef is None else load_balance_coef
        defaults = dict(rule="gated_deltanet", coupling="none", per_slot_kv=True, shared_slot=True,
                        output_gate=True,
                        router=RouterConfig(kind="topk", renormalize=True, load_balance_coef=load_balance_coef))
        super().__init__(hidden_size, num_heads, head_k_dim, head_v_dim, num_slots=num_slots, topk=topk,
                         **{**defaults, **kwargs})
