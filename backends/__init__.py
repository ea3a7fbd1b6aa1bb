"""memplug's built-in backends, registered on import of `memplug`.

- `reference`: docs/contract.md section 3 one token at a time (every device, every rule, float64 oracle).
- `chunked`: docs/contract.md section 5 in PyTorch operations: packed routing, chunked scans per rule family
  (every rule of a family, every device; the default on CPU).
- `triton`: docs/contract.md section 5 with Triton kernels, forward and backward, and an O(R) decode step (every
  rule of a family with K <= 256; the default on CUDA; on CPU only in Triton's interpreter, never
  chosen by "auto").
"""
from memplug.registry import register_backend
from memplug.rules import ADDITIVE_SCALAR, ADDITIVE_VECTOR, DELTA, DELTA_VECTOR

from .chunked import CHUNK_SIZES as _CHUNKED_SIZES, chunked_scan
from .reference import reference_scan, reference_step
from .triton import (CHUNK_SIZES as _TRITON_SIZES, DTYPES as _TRITON_DTYPES, triton_available, triton_priority,
                     triton_scan, triton_step, triton_step_supports, triton_supports)

_BUILT_IN_FAMILIES = (ADDITIVE_SCALAR, ADDITIVE_VECTOR, DELTA, DELTA_VECTOR)
register_backend("reference", reference_scan, reference_step, priority={"cpu": 0, "cuda": 0},
                 supports_rule=lambda rule: True)
register_backend("chunked", chunked_scan, priority={"cpu": 10, "cuda": 5}, families=_BUILT_IN_FAMILIES,
                 chunk_sizes=_CHUNKED_SIZES)
register_backend("triton", triton_scan, triton_step, priority=triton_priority(), dtypes=_TRITON_DTYPES,
                 families=_BUILT_IN_FAMILIES, supports=triton_supports, supports_step=triton_step_supports,
                 chunk_sizes=_TRITON_SIZES, available=triton_available)
