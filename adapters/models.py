"""Whole models: `wrap_model`, `load_pretrained`, `aux_loss`, the cache keyword newer transformers
releases pass to `generate`'s forward calls (`accept_cache_keyword`), and PyTorch fallbacks for the
fused Triton modules and losses of flash-linear-attention models (so a wrapped fla causal LM runs
and trains on a CPU)."""
from __future__ import annotations

import inspect
import os
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from memplug.checks import check_bool
from memplug.imports import import_object
from memplug.modules import rms_norm

from .base import MemoryConfig, RoutedAdapter
from .registry import qualified_name, adapter_for, supported_layers

CONFIG_KEY = "memplug"  # the attribute of the model's config that records the memory


# --------------------------------------------------------------------------------------------------
# wrap_model


def _matches(module, layer_types) -> bool:
    if layer_types is None:
        return True
    t = type(module)
    for spec in layer_types:
        if spec is t or spec == t.__name__ or spec == qualified_name(t):
            return True
    return False


def _set_submodule(model: nn.Module, path: str, module: nn.Module):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _wrap_paths(model: nn.Module, paths: Iterable[str], memory: MemoryConfig):
    for path in paths:
        layer = model.get_submodule(path)
        adapter_cls = adapter_for(layer)
        if adapter_cls is None:
            raise TypeError(f"wrap_model: {path} is a {qualified_name(type(layer))}, which no adapter wraps; "
                            f"supported: {supported_layers()}")
        _set_submodule(model, path, adapter_cls(layer, memory))


def wrap_model(model: nn.Module, layer_types=None, *, cpu_fallbacks: bool = True, **memory_config) -> nn.Module:
    """Replace every layer of `model` that `wrap` knows (or only those of `layer_types`: classes,
    class names or qualified names) by its routed adapter, in place, and return the model.

    memory_config: the keyword arguments of `wrap` (`num_slots`, `topk`, `coupling`, `router`,
    `per_slot_kv`, `shared_slot`, `backend`). The configuration and the wrapped module paths are
    recorded in `model.config.memplug` (for Hugging Face models), so `save_pretrained` stores them and
    `load_pretrained` re-wraps on load. With `cpu_fallbacks`, fla's fused Triton modules of the model
    (RMSNorm, GatedMLP) get a PyTorch path on non-CUDA devices (`add_cpu_fallbacks`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model: expected an nn.Module, got {type(model).__name__}")
    if layer_types is not None:
        if isinstance(layer_types, (str, type)):
            layer_types = [layer_types]
        layer_types = list(layer_types)
    memory = MemoryConfig.make(**memory_config)
    if any(isinstance(m, RoutedAdapter) for m in model.modules()):
        raise ValueError("wrap_model: the model already holds wrapped layers")
    paths = [name for name, module in model.named_modules()
             if name and adapter_for(module) is not None and _matches(module, layer_types)]
    if not paths:
        kinds = sorted({qualified_name(type(m)) for m in model.modules()})
        raise ValueError(f"wrap_model: no layer to wrap (layer_types={layer_types}); supported layer types: "
                         f"{supported_layers()}; the model holds: {kinds}")
    _wrap_paths(model, paths, memory)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"memory": memory.to_dict(), "layers": paths,
                                     "model_class": qualified_name(type(model))})
    accept_cache_keyword(model)
    if cpu_fallbacks:
        add_cpu_fallbacks(model)
    return model


def _cache_as_past_key_values(module, args, kwargs):
    cache = kwargs.pop("cache", None)
    if cache is not None:
        past = kwargs.get("past_key_values")
        if past is not None and past is not cache:
            raise ValueError(f"{type(module).__name__}: got two different caches, cache= and past_key_values=; "
                             f"pass one")
        kwargs["past_key_values"] = cache
    return args, kwargs


def accept_cache_keyword(model: nn.Module) -> nn.Module:
    """Make `model` read a cache passed as `cache=` as its `past_key_values=`, in place.

    Newer transformers releases (5.2x) renamed the cache argument of a model's forward to `cache`:
    `generate` passes the live cache as `cache=` on every step. fla 0.6's models only read
    `past_key_values` and, finding None, start every decoding step from an empty state, so cached
    generation silently forgets the prompt. A forward pre-hook hands the cache to `past_key_values`;
    models whose forward takes `cache` (or no `past_key_values`) are left as they are.
    """
    parameters = inspect.signature(model.forward).parameters
    if "past_key_values" in parameters and "cache" not in parameters:
        model.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
    return model


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The sum of the load-balancing losses of the model's adapters from their last forward (add it to
    the training loss), or None if no adapter has one."""
    losses = [m.last_aux_loss for m in model.modules() if isinstance(m, RoutedAdapter) and m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


# --------------------------------------------------------------------------------------------------
# save / load


TRUSTED_PACKAGES = ("fla", "memplug")  # load_pretrained imports model classes from these only, unless trusted


def _model_class(qualified: str, path, trust_model_class: bool) -> type:
    """The model class a saved config names. Importing a module runs its code, so only fla's and
    memplug's are imported unless the caller trusts the checkpoint."""
    if not isinstance(qualified, str) or not qualified:
        raise ValueError(f"load_pretrained: {path} names no model class in config.{CONFIG_KEY}")
    if qualified.split(".", 1)[0] not in TRUSTED_PACKAGES and not trust_model_class:
        raise ValueError(f"load_pretrained: {path} names the model class {qualified!r}, outside "
                         f"{' and '.join(TRUSTED_PACKAGES)}; importing it runs that module's code. Pass "
                         f"model_class= the class to build, or trust_model_class=True if you trust this checkpoint")
    obj = import_object(qualified)
    if not isinstance(obj, type):
        raise ValueError(f"load_pretrained: {qualified!r} in {path} is not a class")
    return obj


_ROUTED_CLASSES: dict = {}


def routed_model_class(base: type) -> type:
    """A subclass of the Hugging Face model class `base` that wraps its layers right after building
    them, as `config.memplug` records; `from_pretrained` of it restores a wrapped model."""
    if base in _ROUTED_CLASSES:
        return _ROUTED_CLASSES[base]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        record = getattr(config, CONFIG_KEY, None)
        if not record:
            raise ValueError(f"{type(self).__name__}: config.{CONFIG_KEY} is missing; it is written by wrap_model")
        _wrap_paths(self, record["layers"], MemoryConfig.make(record["memory"]))
        accept_cache_keyword(self)
        add_cpu_fallbacks(self)

    cls = type("Routed" + base.__name__, (base,), {"__init__": __init__, "__module__": __name__})
    _ROUTED_CLASSES[base] = cls
    globals()[cls.__name__] = cls  # importable by name, so instances pickle
    return cls


def load_pretrained(path: str | os.PathLike, model_class: Optional[type] = None, *, trust_model_class: bool = False,
                    **kwargs) -> nn.Module:
    """Load a model saved with `save_pretrained` after `wrap_model`: builds the base model class (the
    one recorded in the config, or `model_class`), wraps the recorded layers with the recorded memory
    configuration, then loads the weights. `kwargs` go to `from_pretrained` (e.g. `dtype`).

    A recorded class is imported only from fla or memplug (`TRUSTED_PACKAGES`), since importing a
    module runs its code; `trust_model_class=True` allows any, like transformers' `trust_remote_code`."""
    check_bool("trust_model_class", trust_model_class)
    if model_class is not None and not isinstance(model_class, type):
        raise TypeError(f"model_class: expected a class, got {model_class!r}")
    from transformers import AutoConfig

    import fla  # noqa: F401  (registers fla's configs with AutoConfig)

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(f"load_pretrained: {path} has no '{CONFIG_KEY}' entry in its config; it was not saved "
                         f"from a model wrapped with memplug.adapters.wrap_model")
    base = model_class or _model_class(record.get("model_class"), path, trust_model_class)
    return routed_model_class(base).from_pretrained(path, config=config, **kwargs)


# --------------------------------------------------------------------------------------------------
# PyTorch fallbacks for fla's fused modules


def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if x.device.type == "cuda":
        return super(type(self), self).forward(x, residual, prenorm, residual_in_fp32)
    residual_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    s = x.float() if residual is None else x.float() + residual.float()
    y = rms_norm(s, self.weight, self.bias, self.eps).to(x.dtype)
    return (y, s.to(residual_dtype)) if prenorm else y


def _gated_mlp_forward(self, x, **kwargs):
    if x.device.type == "cuda":
        return super(type(self), self).forward(x, **kwargs)
    gate, y = self.gate_proj(x), self.up_proj(x)
    g = gate.float()
    if self.hidden_act == "powlu":
        pos = g > 0
        base = torch.where(pos, g, torch.ones_like(g))
        power = self.powglu_power / (base.sqrt() + 1.0)
        act = torch.where(pos, base.pow(power) * torch.sigmoid(g), g * torch.sigmoid(g))
    else:
        act = F.silu(g)
    return self.down_proj((act * y.float()).to(y.dtype))


class CrossEntropyWithTorchFallback(nn.Module):
    """The training loss of an fla causal LM, called as fla calls its criterion: fla's fused
    cross-entropy kernels on CUDA (`criterion(hidden, labels, weight, bias)` under
    `fuse_linear_cross_entropy`, `criterion(logits, labels)` under `fuse_cross_entropy`), PyTorch's
    cross-entropy in float32 elsewhere (the fused kernels run only on CUDA, NPU and XPU tensors).
    `reduction` and `ignore_index` are plain attributes, as fla sets them on a copy."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.reduction = "mean"
        self.ignore_index = -100

    def forward(self, x, target, weight=None, bias=None):
        from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
        from fla.modules.l2warp import l2_warp

        linear = weight is not None
        use_l2warp = bool(getattr(self.config, "use_l2warp", False))
        if x.device.type == "cuda":
            if linear:
                return FusedLinearCrossEntropyLoss(ignore_index=self.ignore_index, reduction=self.reduction,
                                                   use_l2warp=use_l2warp)(x, target, weight, bias)
            return FusedCrossEntropyLoss(ignore_index=self.ignore_index, inplace_backward=True,
                                         reduction=self.reduction)(x, target)
        logits = F.linear(x, weight, bias) if linear else x
        loss = F.cross_entropy(logits.reshape(target.numel(), -1).float(), target.reshape(-1),
                               ignore_index=self.ignore_index, reduction=self.reduction)
        return l2_warp(loss, logits) if linear and use_l2warp else loss  # fla warps the unfused loss itself


_FALLBACKS = {
    "fla.modules.layernorm.RMSNorm": _rms_norm_forward,
    "fla.modules.norm.layernorm.RMSNorm": _rms_norm_forward,
    "fla.modules.mlp.GatedMLP": _gated_mlp_forward,
}
_FALLBACK_CLASSES: dict = {}


def add_cpu_fallbacks(model: nn.Module) -> nn.Module:
    """Give fla's fused Triton modules in `model` (RMSNorm, GatedMLP) a PyTorch path, taken when the
    input is not on a CUDA device (the fused kernels still run on CUDA). Works in place by switching
    each such module to a subclass of its own class; parameters and state dict keys are unchanged.
    A causal LM whose config asks for a fused cross-entropy (fla's default) gets the loss
    `CrossEntropyWithTorchFallback` as its `criterion`, so training with labels works on a CPU."""
    config = getattr(model, "config", None)
    fused_loss = config is not None and (getattr(config, "fuse_cross_entropy", False)
                                         or getattr(config, "fuse_linear_cross_entropy", False))
    if fused_loss and hasattr(model, "criterion") and model.criterion is None:
        model.criterion = CrossEntropyWithTorchFallback(config)
    for module in model.modules():
        t = type(module)
        forward = _FALLBACKS.get(qualified_name(t))
        if forward is None:
            continue
        if t not in _FALLBACK_CLASSES:
            cls = type(t.__name__ + "WithTorchFallback", (t,), {"forward": forward, "__module__": __name__})
            _FALLBACK_CLASSES[t] = cls
            _FALLBACK_CLASSES[cls] = cls
            globals()[cls.__name__] = cls
        module.__class__ = _FALLBACK_CLASSES[t]
    return model
