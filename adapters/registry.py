"""Which adapter wraps which layer type: `register_adapter`, the lookups behind `wrap`, and `wrap`
itself."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from memplug.rules import get_rule

from .base import MemoryConfig, RoutedAdapter


_ADAPTERS: dict[str, type] = {}


def qualified_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def register_adapter(layer_type, adapter=None, *, replace: bool = False):
    """Teach `wrap` a layer type: `register_adapter(LayerClass, AdapterClass)`, or as a class
    decorator `@register_adapter(LayerClass)`. `layer_type` may be the class or its qualified name
    ("package.module.Class", which needs no import). Matching is by exact type."""
    key = layer_type if isinstance(layer_type, str) else qualified_name(layer_type)
    if not isinstance(layer_type, (str, type)):
        raise TypeError(f"register_adapter: layer_type must be a class or its qualified name, got {layer_type!r}")

    def add(adapter_cls):
        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, RoutedAdapter)):
            raise TypeError(f"register_adapter: the adapter must be a RoutedAdapter subclass, got {adapter_cls!r}")
        if adapter_cls.rule is None:
            raise ValueError(f"register_adapter: {adapter_cls.__name__}.rule is not set")
        get_rule(adapter_cls.rule)
        if key in _ADAPTERS and _ADAPTERS[key] is not adapter_cls and not replace:
            raise ValueError(f"register_adapter: {key} already has the adapter {_ADAPTERS[key].__name__}; "
                             f"pass replace=True to replace it")
        _ADAPTERS[key] = adapter_cls
        return adapter_cls

    return add if adapter is None else add(adapter)


def unregister_adapter(layer_type) -> None:
    key = layer_type if isinstance(layer_type, str) else qualified_name(layer_type)
    if key not in _ADAPTERS:
        raise ValueError(f"unregister_adapter: no adapter registered for {key}")
    del _ADAPTERS[key]


def supported_layers() -> list[str]:
    """Qualified names of the layer types `wrap` knows."""
    return sorted(_ADAPTERS)


def adapter_for(layer_or_type) -> Optional[type]:
    """The adapter class registered for a layer (or layer type), or None."""
    t = layer_or_type if isinstance(layer_or_type, type) else type(layer_or_type)
    return _ADAPTERS.get(qualified_name(t))


def wrap(layer: nn.Module, num_slots: int, topk: int, coupling: str = "dt", router=None, per_slot_kv: bool = False,
         shared_slot: bool = False, backend: str = "auto") -> RoutedAdapter:
    """Wrap a linear RNN layer with routed sparse-state memory.

    The returned module adopts the layer's modules and parameters (shared, not copied), keeps its
    forward signature, return format and fla cache, and runs the recurrence over `num_slots` slots
    per head, `topk` of them per token, through `memplug.routed_scan` / `routed_step`. With
    `num_slots=1, topk=1` it computes exactly what the layer computes. With `per_slot_kv` the write
    projections (and their short convolutions) start as copies of the layer's, one per slot.

    coupling: "dt" (the routing weight scales each routed update) or "none"; router: a
    `memplug.RouterConfig` or a dict of its fields; shared_slot: add an always-on dense slot that
    uses the layer's original write projections; backend: the `routed_scan` backend.
    """
    if isinstance(layer, RoutedAdapter):
        raise TypeError(f"wrap: this {type(layer).__name__} is already wrapped")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"wrap: expected an nn.Module layer, got {type(layer).__name__}")
    adapter_cls = adapter_for(layer)
    if adapter_cls is None:
        raise TypeError(f"wrap: no adapter for layers of type {qualified_name(type(layer))}; supported layer types: "
                        f"{supported_layers()}. Teach wrap a new type with memplug.adapters.register_adapter "
                        f"(see docs/adapters.md)")
    memory = MemoryConfig.make(num_slots=num_slots, topk=topk, coupling=coupling, router=router,
                               per_slot_kv=per_slot_kv, shared_slot=shared_slot, backend=backend)
    return adapter_cls(layer, memory)
