"""Wrappers of existing linear RNN layers and models (installed as memplug.adapters).

    from memplug.adapters import wrap, wrap_model, load_pretrained

    layer = wrap(fla_layer, num_slots=4, topk=2)            # one layer, drop-in
    model = wrap_model(fla_causal_lm, num_slots=4, topk=2)  # every supported layer of a model

`wrap` knows flash-linear-attention's GatedLinearAttention, SimpleGatedLinearAttention, DeltaNet,
GatedDeltaNet, KimiDeltaAttention and Mamba2 (`supported_layers()`); `register_adapter` teaches it more.
`enable_triton_interpreter()` runs fla's own kernels on a CPU, to check a wrapped layer against the
original there. See docs/adapters.md.
"""
from .base import AdapterContext, MemoryConfig, RoutedAdapter, RuleInputs
from .registry import adapter_for, register_adapter, supported_layers, unregister_adapter, wrap
from .slots import SlotConv, SlotLinear
from . import fla_layers  # noqa: F401  (registers the fla adapters; does not import fla)
from .fla_layers import (RoutedDeltaNet, RoutedGatedDeltaNet, RoutedGatedLinearAttention, RoutedKimiDeltaAttention,
                         RoutedMamba2, RoutedSimpleGatedLinearAttention)
from .models import (CrossEntropyWithTorchFallback, accept_cache_keyword, add_cpu_fallbacks, aux_loss,
                     load_pretrained, routed_model_class, wrap_model)
from .triton_interpreter import SUPPORTED_TRITON, enable_triton_interpreter, interpreter_self_test

__all__ = [
    "wrap", "wrap_model", "load_pretrained", "aux_loss", "add_cpu_fallbacks", "routed_model_class",
    "accept_cache_keyword", "CrossEntropyWithTorchFallback",
    "enable_triton_interpreter", "interpreter_self_test", "SUPPORTED_TRITON",
    "register_adapter", "unregister_adapter", "supported_layers", "adapter_for",
    "RoutedAdapter", "RuleInputs", "AdapterContext", "MemoryConfig", "SlotLinear", "SlotConv",
    "RoutedGatedLinearAttention", "RoutedSimpleGatedLinearAttention", "RoutedDeltaNet", "RoutedGatedDeltaNet",
    "RoutedKimiDeltaAttention", "RoutedMamba2",
]
