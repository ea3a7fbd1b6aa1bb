"""The adapter machinery: `RoutedAdapter`, its memory configuration and forward context. The
registry behind `wrap` is in `registry.py`, per-slot copies of write modules in `slots.py`.

An adapter is an `nn.Module` that takes over an existing linear RNN layer: it adopts the layer's
submodules, parameters and plain attributes under the same names (so `adapter.q_proj is
layer.q_proj` and the state dict keeps the layer's keys), adds a `memplug.routing.Router`, and
runs the layer's recurrence through `memplug.routed_scan` / `memplug.routed_step`. A subclass says
how the layer computes the inputs of a memplug rule and how it turns the memory read into its output:

    class RoutedMyLayer(RoutedAdapter):
        rule = "gla"                                   # a memplug rule (memplug.available_rules())
        per_slot_modules = ("k_proj", "v_proj")        # write path, copied per slot with per_slot_kv

        def state_dims(self):                          # (heads, key width, value width) of the state
            return self.num_heads, self.head_k_dim, self.head_v_dim

        def rule_inputs(self, x, ctx):                 # -> RuleInputs(q, k, v, g, beta)
            ...

        def output(self, o, x, inputs, ctx):           # memory read o [B,T,H,V] -> layer output
            ...

    register_adapter(MyLayer, RoutedMyLayer)           # or "package.module.MyLayer" (registry.py)

`forward` (in this base class) follows flash-linear-attention's layer contract: `forward(
hidden_states, attention_mask=None, past_key_values=None, use_cache=False, output_attentions=False,
**kwargs) -> (output, None, past_key_values)`, with padding masks `[B, T]` (0 = padding), packed
sequences through `cu_seqlens=` and the recurrent state kept in fla's `Cache` under the layer's
`layer_idx`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from memplug.checks import check_cache_tensor, check_conv_histories, check_cu_seqlens, compute_dtype
from memplug.core import MemoryCore, WriteInputs
from memplug.layers import check_memory_options
from memplug.modules import causal_conv
from memplug.routing import Router, RouterConfig, Routing
from memplug.rules import get_rule

from .slots import SlotConv, is_slotted, slot_copies
from .torch_ops import activation as activation_by_name

_FROM_MODULE = object()


# --------------------------------------------------------------------------------------------------
# Memory configuration


@dataclass
class MemoryConfig:
    """The routed memory an adapter adds (the keyword arguments of `wrap`)."""

    num_slots: int
    topk: int
    coupling: str = "dt"
    router: RouterConfig = field(default_factory=RouterConfig)
    per_slot_kv: bool = False
    shared_slot: bool = False
    backend: str = "auto"

    def __post_init__(self):
        self.router = check_memory_options(self.num_slots, self.topk, self.coupling, self.router, self.per_slot_kv,
                                           self.shared_slot, self.backend)
        if self.router.capacity_factor > 0:
            raise ValueError("router.capacity_factor: not supported by the adapters yet: the slot counts a capacity "
                             "carries between calls have no place in fla's cache; use memplug.RoutedMemory")

    @classmethod
    def make(cls, config=None, **kwargs) -> "MemoryConfig":
        """A `MemoryConfig` from one, from a dict of its fields, or from keyword arguments."""
        if isinstance(config, cls):
            return config if not kwargs else cls(**{**config.to_dict(), **kwargs})
        fields = dict(config or {}, **kwargs)
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"memory config: unknown options {sorted(unknown)}; known: "
                            f"{sorted(cls.__dataclass_fields__)}")
        missing = {"num_slots", "topk"} - set(fields)
        if missing:
            raise TypeError(f"memory config: missing {sorted(missing)}")
        return cls(**fields)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["router"] = self.router.to_dict()
        return out


# --------------------------------------------------------------------------------------------------
# Rule inputs and the forward context


@dataclass
class RuleInputs:
    """What an adapter's `rule_inputs` returns.

    q: `[B, T, H, K]`. k: `[B, T, H, c, K]`, v: `[B, T, H, c, V]`, g: `[B, T, H, c]` (scalar decay)
    or `[B, T, H, c, K]` (per channel), beta: `[B, T, H, c]`, where `c` is 1 for writes shared by all
    slots and `num_slots` for per-slot writes (`ctx.linear` / `ctx.conv` give that axis).
    extra: anything `output` needs (e.g. Mamba-2's skip input and gate).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: Optional[torch.Tensor] = None
    beta: Optional[torch.Tensor] = None
    extra: Any = None


class AdapterContext:
    """Helpers for one forward call of an adapter: projections and short convolutions that resolve
    to the per-slot copies where the memory has per-slot writes, with the convolutions' cache.

    `linear(name, x) -> [B, T, c, F]` and `conv(name, y) -> [B, T, c, F]` apply the adapter's module
    `name` (c = num_slots for a per-slot copy, else 1); `heads(y, d) -> [B, T, H', c, d]` splits the
    features into heads. Within one forward, a module applied again to the same input is not
    recomputed (the shared slot's pass reuses the query path), and each convolution's cache entry is
    written once.
    """

    def __init__(self, adapter: "RoutedAdapter", conv_cache: Optional[dict], cu_seqlens, output_conv_state: bool,
                 shared_pass: bool = False, memo: Optional[dict] = None, new_conv: Optional[dict] = None):
        self.adapter = adapter
        self.conv_cache = conv_cache or {}
        self.cu_seqlens = cu_seqlens
        self.output_conv_state = output_conv_state
        self.shared_pass = shared_pass
        self.memo = {} if memo is None else memo
        self.new_conv = {} if new_conv is None else new_conv

    def for_shared_slot(self) -> "AdapterContext":
        """The context of the always-on shared slot, which uses the layer's original write modules."""
        return AdapterContext(self.adapter, self.conv_cache, self.cu_seqlens, self.output_conv_state, True,
                              self.memo, self.new_conv)

    def _resolve(self, name):
        slots = self.adapter.slots
        if name in slots and not self.shared_pass:
            return slots[name], name
        module = getattr(self.adapter, name, None)
        if module is None:
            raise AttributeError(f"{type(self.adapter).__name__}: no module {name!r}")
        return module, ("shared." + name if name in slots else name)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        module, key = self._resolve(name)
        found = self.memo.get(("linear", key))
        if found is None or found[0] is not x:
            y = module(x)
            found = self.memo[("linear", key)] = (x, y if is_slotted(module) else y.unsqueeze(-2))
        return found[1]

    def conv(self, name: str, y: torch.Tensor, activation=_FROM_MODULE) -> torch.Tensor:
        """Causal convolution of `y [B, T, c, F]` with module `name`; its cache entry is `name`."""
        module, key = self._resolve(name)
        found = self.memo.get(("conv", key))
        if found is None or found[0] is not y:
            act = getattr(module, "activation", None) if activation is _FROM_MODULE else activation
            cache = self.conv_cache.get(key)  # fla's layout [N, C, W]: the last W inputs, newest last
            out, last = causal_conv(y.flatten(-2), module.weight, module.bias,
                                    activation_by_name(act, "short convolution"),
                                    None if cache is None else cache[..., 1:].transpose(1, 2), self.cu_seqlens,
                                    module.weight.shape[-1] if self.output_conv_state else None)
            if last is not None:
                self.new_conv[key] = last.transpose(1, 2).contiguous()
            found = self.memo[("conv", key)] = (y, out.unflatten(-1, y.shape[-2:]))
        return found[1]

    @staticmethod
    def heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
        """`[B, T, c, H*d]` -> `[B, T, H, c, d]`."""
        return y.unflatten(-1, (-1, head_dim)).transpose(-3, -2)


# --------------------------------------------------------------------------------------------------
# The adapter base class


class RoutedAdapter(nn.Module):
    """Base class of the adapters (see the module docstring). Build one with `memplug.adapters.wrap`.

    Class attributes: `rule` (memplug rule name), `per_slot_modules` (names of the write-path modules
    that `per_slot_kv` copies per slot; empty means the adapter has no per-slot writes), `scale`
    (read scale; None is `K ** -0.5`).

    After each forward, `last_aux_loss` holds the weighted load-balancing loss (None without one) and
    `last_routing` the detached `Routing` (None with one slot); `memplug.adapters.aux_loss(model)`
    sums the former over a model.
    """

    rule: str = None
    per_slot_modules: tuple = ()
    scale: Optional[float] = None

    def __init__(self, layer: nn.Module, memory: MemoryConfig):
        super().__init__()
        self.check_layer(layer)
        self._adopt(layer)
        self.wrapped_type = f"{type(layer).__module__}.{type(layer).__qualname__}"
        self.memory_config = memory
        self._rule = get_rule(self.rule)
        H, K, V = self.state_dims()
        self.state_heads, self.state_k_dim, self.state_v_dim = H, K, V
        if memory.per_slot_kv and not self.per_slot_modules:
            raise ValueError(f"per_slot_kv: the {type(self).__name__} adapter has no per-slot write projections; "
                             f"use per_slot_kv=False")
        reference = next(layer.parameters(), None)
        factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
        self.slots = nn.ModuleDict()
        if memory.per_slot_kv:
            for name in self.per_slot_modules:
                module = getattr(self, name, None)
                if module is None:
                    continue
                self.slots[name] = slot_copies(module, memory.num_slots)
                if not memory.shared_slot:  # the shared slot keeps using the original write modules
                    delattr(self, name)
        self.router = None
        if memory.num_slots > 1:
            hidden = self.router_input_size()
            self.router = Router(hidden, H, memory.num_slots, memory.topk, memory.router).to(**factory)
        self.last_aux_loss = None
        self.last_routing = None
        self.train(layer.training)

    # ---- what a subclass provides ----------------------------------------------------------------

    @classmethod
    def check_layer(cls, layer: nn.Module) -> None:
        """Raise ValueError for layer options the adapter does not support."""

    def state_dims(self) -> tuple:
        """(heads, key width, value width) of the recurrent state."""
        raise NotImplementedError

    def router_input_size(self) -> int:
        return self.hidden_size

    def rule_inputs(self, x: torch.Tensor, ctx: AdapterContext) -> RuleInputs:
        raise NotImplementedError

    def output(self, o: torch.Tensor, x: torch.Tensor, inputs: RuleInputs, ctx: AdapterContext) -> torch.Tensor:
        raise NotImplementedError

    # ---- machinery -------------------------------------------------------------------------------

    def _adopt(self, layer):
        for name, module in layer.named_children():
            self.add_module(name, module)
        for name, param in layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in layer.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in layer._non_persistent_buffers_set)
        for name, value in vars(layer).items():
            if not name.startswith("_") and name != "training" and not hasattr(self, name):
                setattr(self, name, value)

    def extra_repr(self):
        m = self.memory_config
        return (f"wraps={self.wrapped_type}, rule={self._rule.name}, num_slots={m.num_slots}, topk={m.topk}, "
                f"coupling={m.coupling}, per_slot_kv={m.per_slot_kv}, shared_slot={m.shared_slot}, backend={m.backend}")

    def _conv_entries(self) -> dict:
        """The short convolutions whose histories the cache keeps, by their name there:
        `{name: (channels, kernel_size)}`, per-slot copies with `num_slots * channels` channels."""
        entries = {}
        for name, module in self.named_children():
            if isinstance(module, nn.Conv1d):  # an original with a per-slot copy serves the shared slot
                entries[("shared." if name in self.slots else "") + name] = (module.weight.shape[0],
                                                                             module.weight.shape[-1])
        for name, module in self.slots.items():
            if isinstance(module, SlotConv):
                entries[name] = (module.weight.shape[0], module.weight.shape[-1])
        return entries

    def _check_cache(self, state, conv_cache, rows: int, hidden_states: torch.Tensor) -> None:
        """The layer's cache entry is one this layer made for these sequences: slot states (and the
        shared slot's), convolution histories of this layer's sizes, dtype and device. Shapes only:
        no host sync. An entry without a recurrent state carries nothing and is not checked."""
        if state is None:
            return
        m = self.memory_config
        device = hidden_states.device
        if m.shared_slot != isinstance(state, (tuple, list)):
            has = "a pair (slots, shared slot)" if isinstance(state, (tuple, list)) else "slot states only"
            raise ValueError(f"cache: the recurrent state is {has}, but this layer has shared_slot={m.shared_slot}; "
                             f"the cache was made by another layer")
        states = [("recurrent_state", state, m.num_slots)]
        if m.shared_slot:
            if len(state) != 2:
                raise ValueError(f"cache: the recurrent state is a sequence of {len(state)}, expected a pair "
                                 f"(slots, shared slot)")
            states = [("recurrent_state[0] (slots)", state[0], m.num_slots),
                      ("recurrent_state[1] (shared slot)", state[1], 1)]
        dtype = compute_dtype(hidden_states)
        for what, t, slots in states:
            check_cache_tensor(what, t, dict(batch=rows, heads=self.state_heads, num_slots=slots,
                                             head_k_dim=self.state_k_dim, head_v_dim=self.state_v_dim), dtype, device)
        convs = {name: dict(batch=rows, channels=channels, taps=width)
                 for name, (channels, width) in self._conv_entries().items()}
        conv_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                      else hidden_states.dtype)
        check_conv_histories("conv_state", dict(conv_cache or {}), convs, conv_dtype, device)

    @property
    def core(self) -> MemoryCore:
        """Route, scan, shared slot, auxiliary loss: the part every routed layer shares."""
        m = self.memory_config
        return MemoryCore(self._rule, m.num_slots, m.coupling, m.backend, self.scale)

    def _unpad(self, hidden_states, attention_mask, cu_seqlens, q_len, decoding):
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point():
                raise TypeError(f"cu_seqlens: expected an integer tensor, got {cu_seqlens!r}")
            cu_seqlens = cu_seqlens.to(torch.int64)  # fla passes int32 offsets: widening loses nothing
            # checked here, before the short convolutions read it
            check_cu_seqlens(cu_seqlens, *hidden_states.shape[:2], hidden_states.device)
            return hidden_states, None, cu_seqlens
        if attention_mask is None:
            return hidden_states, None, None
        if (attention_mask.dim() != 2 or attention_mask.shape[0] != hidden_states.shape[0]
                or attention_mask.shape[1] < q_len):
            raise ValueError(f"attention_mask: expected a 0-1 padding mask of shape [batch_size, seq_len] = "
                             f"[{hidden_states.shape[0]}, >= {q_len}] (0 marks padding), "
                             f"got {list(attention_mask.shape)}")
        if decoding:
            # One new token per sequence, as generate decodes: it is never padding, and a check on
            # the device (no host sync) says so if it is.
            torch._assert_async(attention_mask[:, -1].bool().all(),
                                "attention_mask: a decoded token (q_len = 1, with a cache) is marked as padding")
            return hidden_states, None, None
        if bool(attention_mask[:, -q_len:].bool().all()):
            return hidden_states, None, None
        from fla.layers.utils import unpad_hidden_states

        x, indices, cu_seqlens = unpad_hidden_states(hidden_states, None, attention_mask, q_len)
        if bool((cu_seqlens.diff() == 0).any()):
            raise ValueError("attention_mask: a sequence of the batch has no token in this call (all padding); "
                             "drop it from the batch")
        return x, indices, cu_seqlens.to(torch.int64)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False, output_attentions: Optional[bool] = False,
                **kwargs):
        from fla.layers.utils import get_layer_cache, repad_hidden_states, update_layer_cache

        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            shape = (list(hidden_states.shape) if isinstance(hidden_states, torch.Tensor)
                     else type(hidden_states).__name__)
            raise ValueError(f"hidden_states: expected a tensor of shape [batch_size, seq_len, hidden_size], "
                             f"got {shape}")
        batch_size, q_len, _ = hidden_states.shape
        if q_len == 0:
            return hidden_states, None, past_key_values
        last_state = get_layer_cache(self, past_key_values)
        decoding = last_state is not None and q_len == 1
        x, indices, cu_seqlens = self._unpad(hidden_states, attention_mask, kwargs.get("cu_seqlens"), q_len, decoding)
        conv_cache = state = shared_state = None
        if last_state is not None:
            conv_cache, state = last_state.get("conv_state"), last_state.get("recurrent_state")
            rows = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
            self._check_cache(state, conv_cache, rows, hidden_states)
            if self.memory_config.shared_slot and state is not None:
                state, shared_state = state
        use_cache = bool(use_cache)

        m = self.memory_config
        core = self.core
        ctx = AdapterContext(self, conv_cache, cu_seqlens, use_cache)
        inputs = self.rule_inputs(x, ctx)
        routing = core.route(self.router, x)
        writes = lambda i: WriteInputs(i.k, i.v, i.g, i.beta)  # noqa: E731
        shared = None
        if m.shared_slot:
            shared = self.rule_inputs(x, ctx.for_shared_slot()) if m.per_slot_kv else inputs
        o, state, shared_state = core(inputs.q, writes(inputs), routing, state, cu_seqlens, use_cache,
                                      shared_q=None if shared is None else shared.q,
                                      shared=None if shared is None else writes(shared), shared_state=shared_state)
        y = self.output(o, x, inputs, ctx)

        if past_key_values is not None:
            recurrent = (state, shared_state) if m.shared_slot and state is not None else state
            update_layer_cache(self, past_key_values, recurrent_state=recurrent if use_cache else None,
                               conv_state=ctx.new_conv if use_cache and ctx.new_conv else None, offset=q_len)
        y = repad_hidden_states(y, indices, batch_size, q_len)

        self.last_routing = None
        self.last_aux_loss = None
        if self.router is not None:
            self.last_routing = Routing(*(t.detach() for t in routing))
            self.last_aux_loss = core.aux_loss(self.router, routing)
        return y, None, past_key_values
