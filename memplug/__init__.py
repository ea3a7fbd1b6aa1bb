"""memplug: routed sparse-state memory for linear RNNs.

Functional core: `routed_scan`, `routed_step` (docs/contract.md section 4), whose validated arguments
backends receive as a `ScanArgs`. Registries: `register_rule`, `register_backend`, `get_backend`,
`available_backends`. Layers: `RoutedMemory` and its presets
`FactorizationMemory`, `MixtureOfMemories`; routers in `memplug.routing`.
"""
from . import routing
from .routing import RouterConfig
from .cache import MemoryCache
from .checks import ScanArgs
from .layers import FactorizationMemory, MixtureOfMemories, RoutedMemory
from .registry import Backend, available_backends, get_backend, register_backend, unregister_backend
from .rules import BUILT_IN_RULES, Rule, available_rules, get_rule, register_rule, unregister_rule
from .scan import routed_scan, routed_step

from . import backends  # noqa: E402,F401  (registers the built-in backends)

__all__ = [
    "RoutedMemory", "FactorizationMemory", "MixtureOfMemories", "MemoryCache", "RouterConfig", "routing",
    "routed_scan", "routed_step", "ScanArgs", "register_backend", "unregister_backend", "get_backend", "Backend",
    "available_backends",
    "register_rule", "unregister_rule", "get_rule", "available_rules", "Rule", "BUILT_IN_RULES",
]
__version__ = "0.1.0"
