"""Objects named by a dotted path: `import_object("fla.layers.gla.GatedLinearAttention")`."""
from __future__ import annotations

import importlib


def import_object(qualified: str):
    """The object `qualified` names: its module (the part before the last dot) is imported, then the
    attribute is read. Raises ImportError or AttributeError naming what is missing."""
    if not isinstance(qualified, str) or "." not in qualified:
        raise ValueError(f"import_object: expected a dotted path 'module.name', got {qualified!r}")
    module, _, name = qualified.rpartition(".")
    obj = importlib.import_module(module)
    if not hasattr(obj, name):
        raise AttributeError(f"import_object: module {module!r} has no {name!r}")
    return getattr(obj, name)
