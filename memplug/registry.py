"""Backends by name. A backend is a scan function with the keywords of `memplug.routed_scan`.

`backend="auto"` picks, among the backends available on this machine that take the inputs' device
type, dtype and rule, the one with the highest priority for that device type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .checks import FLOAT_DTYPES
from .rules import FAMILIES, Family, Rule


@dataclass(frozen=True)
class Backend:
    name: str
    scan: Callable
    step: Optional[Callable]
    priority: Mapping[str, int]  # device type -> priority for "auto"; the keys are the device types it runs on
    dtypes: tuple
    supports_rule: Callable[[Rule], bool]
    available: Callable[[], bool]
    families: Optional[tuple] = None  # the rule families it runs, if it declared them

    def why_not(self, device: torch.device, dtype: torch.dtype, rule: Rule) -> Optional[str]:
        """None if this backend takes these inputs, else the reason it does not."""
        if not self.available():
            return f"backend {self.name!r} is not available on this machine"
        if device.type not in self.priority:
            return f"backend {self.name!r} runs on {sorted(self.priority)}, not on {device.type}"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} takes dtypes {self.dtypes}, not {dtype}"
        if not self.supports_rule(rule):
            return self.rule_refusal(rule)
        return None

    def rule_refusal(self, rule: Rule) -> str:
        """Why this backend does not run `rule`, naming the families it runs if it declared them."""
        what = ("its own update and no family: only the reference backend runs such rules" if rule.family is None
                else f"family {rule.family.name!r}")
        runs = "" if self.families is None else f"; it runs the families {[f.name for f in self.families]}"
        return f"backend {self.name!r} does not run rule {rule.name!r} ({what}){runs}"


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, scan: Callable, step: Optional[Callable] = None, *,
                     priority: Optional[Mapping[str, int]] = None, dtypes=FLOAT_DTYPES,
                     families=None, supports_rule: Optional[Callable[[Rule], bool]] = None,
                     available: Callable[[], bool] = lambda: True, replace: bool = False) -> Backend:
    """Register a backend.

    scan: `scan(q, k, v, *, rule, route_idx, route_w, num_slots, g, beta, read_w, coupling, scale,
        initial_state, output_final_state, cu_seqlens) -> (o, final_state or None)`. Inputs arrive
        validated, with `rule` resolved to a `Rule`, `scale` to a float and `read_w` to a tensor.
    step: the same for `routed_step` (keyword `state` instead of `initial_state`, no `cu_seqlens`,
        `output_final_state`); None uses the reference step, which touches only the routed slots.
    priority: device type -> priority under `backend="auto"` (higher wins). Its keys are the device
        types the backend runs on. Default: cpu and cuda at -1, below the built-in `reference` (0),
        `chunked` and, on CUDA, `triton`; on CPU it ranks above `triton` (-10, its interpreter).
    dtypes: input dtypes the backend takes. families: the rule families (`memplug.rules.Family`
        objects) it runs; then it runs every rule of those families, and errors list them.
        supports_rule: which rules it runs, for a backend that decides otherwise (default: the rules
        of `families`, or, without them, of the built-in families). available: whether it can run
        on this machine.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name must be a non-empty string other than 'auto', got {name!r}")
    if name in _BACKENDS and not replace:
        raise ValueError(f"register_backend: a backend named {name!r} exists; pass replace=True to replace it")
    if not callable(scan):
        raise TypeError(f"register_backend: scan must be callable, got {type(scan).__name__}")
    if step is not None and not callable(step):
        raise TypeError(f"register_backend: step must be callable or None, got {type(step).__name__}")
    if families is not None:
        if isinstance(families, Family) or not hasattr(families, "__iter__"):
            raise TypeError(f"register_backend: families must be an iterable of Family, got {families!r}")
        families = tuple(families)
        if not all(isinstance(f, Family) for f in families):
            raise TypeError(f"register_backend: families must be an iterable of Family, got {families!r}")
    if supports_rule is None:
        runs = families if families is not None else tuple(FAMILIES.values())
        supports_rule = lambda rule: rule.family in runs  # noqa: E731 (a closure over `runs`)
    for arg, fn in (("supports_rule", supports_rule), ("available", available)):
        if not callable(fn):
            raise TypeError(f"register_backend: {arg} must be callable, got {fn!r}")
    priority = {"cpu": -1, "cuda": -1} if priority is None else priority
    if (not isinstance(priority, Mapping) or not priority
            or not all(isinstance(d, str) and isinstance(p, int) and not isinstance(p, bool)
                       for d, p in priority.items())):
        raise TypeError(f"register_backend: priority must be a non-empty mapping of device type (str) -> "
                        f"int, got {priority!r}")
    if isinstance(dtypes, torch.dtype) or not hasattr(dtypes, "__iter__"):
        raise TypeError(f"register_backend: dtypes must be an iterable of torch.dtype, got {dtypes!r}")
    dtypes = tuple(dtypes)
    if not dtypes or not all(isinstance(d, torch.dtype) for d in dtypes):
        raise TypeError(f"register_backend: dtypes must be a non-empty iterable of torch.dtype, got {dtypes!r}")
    backend = Backend(name, scan, step, dict(priority), dtypes, supports_rule, available, families)
    _BACKENDS[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    del _BACKENDS[name]


def fast_backends() -> list[Backend]:
    """The registered backends other than `reference`."""
    return [b for n, b in _BACKENDS.items() if n != "reference"]


def fast_backends_for(rule: Rule) -> list[str]:
    """The registered backends other than `reference` that run `rule`."""
    return [b.name for b in fast_backends() if b.supports_rule(rule)]


def available_backends() -> list[str]:
    """Names of the registered backends usable on this machine."""
    return sorted(n for n, b in _BACKENDS.items() if b.available())


def check_backend_name(backend) -> None:
    """Raises ValueError naming `backend` unless it is "auto" or a registered backend's name."""
    if backend != "auto" and (not isinstance(backend, str) or backend not in _BACKENDS):
        raise ValueError(f"backend: unknown backend {backend!r}; registered: {sorted(_BACKENDS)} or 'auto'")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rule: Rule) -> Backend:
    """The backend to run; raises ValueError naming `backend` if it cannot take these inputs."""
    check_backend_name(backend)
    if backend == "auto":
        fits = [b for b in _BACKENDS.values() if b.why_not(device, dtype, rule) is None]
        if not fits:
            reasons = "; ".join(b.why_not(device, dtype, rule) for b in _BACKENDS.values())
            raise ValueError(f"backend: no available backend runs rule {rule.name!r} on {device.type} "
                             f"with dtype {dtype} ({reasons})")
        best = fits[0]
        for b in fits[1:]:  # a plain loop: torch.compile traces it
            if b.priority[device.type] > best.priority[device.type]:
                best = b
        return best
    reason = _BACKENDS[backend].why_not(device, dtype, rule)
    if reason is not None:
        raise ValueError(f"backend: {reason}")
    return _BACKENDS[backend]
