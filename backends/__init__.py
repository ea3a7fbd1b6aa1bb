"""memplug's built-in backends, registered on import of `memplug`.

- `reference`: SPEC section 3 one token at a time (every device, every rule, float64 oracle).
"""
from memplug.registry import register_backend

from .reference import reference_scan, reference_step

register_backend("reference", reference_scan, reference_step, priority={"cpu": 0, "cuda": 0},
                 supports_rule=lambda rule: True)
