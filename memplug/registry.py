"""Backends by name. A backend is a scan function of one `ScanArgs` (`memplug.routed_scan`'s
arguments, validated and resolved), with what it takes declared beside it.

`backend="auto"` picks, among the backends available on this machine that take the inputs (device
type, dtype, rule, and the shapes their `supports` accepts), the one with the highest priority for
that device type. Nothing falls back silently: a backend that does not take some inputs says why in
`why_not`, and a decode step that a backend does not take runs the reference step, named by
`why_not_step`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .checks import FLOAT_DTYPES, ScanArgs
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
    supports: Optional[Callable[[ScanArgs], Optional[str]]] = None  # the shapes its scan takes: None or a reason
    supports_step: Optional[Callable[[ScanArgs], Optional[str]]] = None  # the same for its decode step
    chunk_sizes: tuple = ()  # the sizes `scan(args, chunk_size=...)` takes; () if it takes no chunk size
    block_sizes: tuple = ()  # lengths at which its kernels start a new block (the kit's long cases cross them)

    def why_not(self, device: torch.device, dtype: torch.dtype, rule: Rule,
                args: Optional[ScanArgs] = None) -> Optional[str]:
        """None if this backend takes these inputs (and the shapes of `args`, if given), else the
        reason it does not."""
        if not self.available():
            return f"backend {self.name!r} is not available on this machine"
        if device.type not in self.priority:
            return f"backend {self.name!r} runs on {sorted(self.priority)}, not on {device.type}"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} takes dtypes {self.dtypes}, not {dtype}"
        if not self.supports_rule(rule):
            return self.rule_refusal(rule)
        if args is not None and self.supports is not None:
            reason = self.supports(args)
            if reason is not None:
                return f"backend {self.name!r} does not take these inputs: {reason}"
        return None

    def why_not_step(self, args: ScanArgs) -> Optional[str]:
        """None if this backend's own decode step takes `args`, else why the reference step runs it."""
        if self.step is None:
            return f"backend {self.name!r} has no decode step of its own"
        return None if self.supports_step is None else self.supports_step(args)

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
                     supports: Optional[Callable[[ScanArgs], Optional[str]]] = None,
                     supports_step: Optional[Callable[[ScanArgs], Optional[str]]] = None,
                     chunk_sizes=(), block_sizes=(),
                     available: Callable[[], bool] = lambda: True, replace: bool = False) -> Backend:
    """Register a backend.

    scan: `scan(args: memplug.ScanArgs) -> (o, final_state or None)`, with `args` validated and
        resolved (`rule` a `Rule`, `scale` a float, `read_w` a tensor; `args.write_weight` is the
        coupling's weight). With `chunk_sizes`, `scan(args, chunk_size=c)` for each c in them.
    step: `step(args) -> (o, state)` for `routed_step`, where `args.initial_state` is the state it
        updates (in place where it can); None runs the reference step, which touches only the
        routed slots.
    supports, supports_step: for a backend that takes only some shapes, `supports(args)` returns None
        or the reason it does not take them; "auto" then picks another backend, and an explicit
        request raises that reason. A step it does not take runs the reference step.
    chunk_sizes: the chunk sizes the scan takes as `chunk_size` (the kit checks that each gives the
        default's result). block_sizes: lengths at which its kernels start a new block (the kit's
        long cases cross them).
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
    for arg, fn in (("supports_rule", supports_rule), ("available", available), ("supports", supports),
                    ("supports_step", supports_step)):
        if fn is not None and not callable(fn):
            raise TypeError(f"register_backend: {arg} must be callable, got {fn!r}")
    chunk_sizes, block_sizes = _sizes("chunk_sizes", chunk_sizes), _sizes("block_sizes", block_sizes)
    if chunk_sizes and not _takes_keyword(scan, "chunk_size"):
        raise TypeError("register_backend: chunk_sizes given, but scan takes no keyword chunk_size")
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
    backend = Backend(name, scan, step, dict(priority), dtypes, supports_rule, available, families, supports,
                      supports_step, chunk_sizes, block_sizes)
    _BACKENDS[name] = backend
    return backend


def _sizes(name: str, sizes) -> tuple:
    if isinstance(sizes, int) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"register_backend: {name} must be an iterable of ints >= 1, got {sizes!r}")
    sizes = tuple(sizes)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise TypeError(f"register_backend: {name} must be an iterable of ints >= 1, got {sizes!r}")
    return sizes


def _takes_keyword(fn: Callable, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: take the declaration at its word
        return True
    return keyword in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def get_backend(name: str) -> Backend:
    """The registered backend `name`; raises ValueError naming the registered ones."""
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def unregister_backend(name: str) -> None:
    del _BACKENDS[get_backend(name).name]


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


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rule: Rule,
                    args: Optional[ScanArgs] = None) -> Backend:
    """The backend to run (for these shapes, given `args`); raises ValueError naming `backend` if it
    cannot take these inputs."""
    check_backend_name(backend)
    if backend == "auto":
        fits = [b for b in _BACKENDS.values() if b.why_not(device, dtype, rule, args) is None]
        if not fits:
            reasons = "; ".join(b.why_not(device, dtype, rule, args) for b in _BACKENDS.values())
            raise ValueError(f"backend: no available backend runs rule {rule.name!r} on {device.type} "
                             f"with dtype {dtype} ({reasons})")
        best = fits[0]
        for b in fits[1:]:  # a plain loop: torch.compile traces it
            if b.priority[device.type] > best.priority[device.type]:
                best = b
        return best
    reason = _BACKENDS[backend].why_not(device, dtype, rule, args)
    if reason is not None:
        raise ValueError(f"backend: {reason}")
    return _BACKENDS[backend]


def resolve_scan(backend: str, args: ScanArgs) -> Callable:
    """The scan function to run on `args`."""
    return resolve_backend(backend, args.q.device, args.q.dtype, args.rule, args).scan


def resolve_step(backend: str, args: ScanArgs) -> Callable:
    """The decode step to run on `args`: the backend's own, or the reference step where it has none or
    does not take `args` (`Backend.why_not_step` says why)."""
    chosen = resolve_backend(backend, args.q.device, args.q.dtype, args.rule)
    return chosen.step if chosen.why_not_step(args) is None else _BACKENDS["reference"].step
