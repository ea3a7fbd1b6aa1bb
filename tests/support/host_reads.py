"""Counting the reads of tensor values back into Python: on a GPU each one is a host sync.

`count_host_reads()` patches the Tensor methods that copy a value to the host (`item`, `bool`,
`int`, `float`, `tolist`, `nonzero`, ...) to count their calls on the CPU, where no sync can be
seen. With `operators=True` it also counts, through a dispatch mode, the operators that read values
back inside: those whose output's size depends on values (`SYNCING_OPS`: `unique`, `nonzero`, ...,
and a `repeat_interleave` without `output_size`) and indexing with a boolean mask. The GPU test
with `torch.cuda.set_sync_debug_mode("error")` sees every sync.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
# Operators whose output size, or result on the host, depends on tensor values.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "unique_consecutive", "_unique", "_unique2", "unique_dim",
               "unique_dim_consecutive", "masked_select", "bincount", "histc", "equal", "is_nonzero"}
# Operators that take a list of index tensors second: a boolean one among them is a mask.
MASKABLE_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class _SyncingOps(TorchDispatchMode):
    """A dispatch mode that appends "op:" and the name of every syncing operator to `reads`."""

    def __init__(self, reads: list):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # repeat_interleave(repeats: Tensor) reaches here as its overload "Tensor"
        unsized = (name == "repeat_interleave" and func._overloadname == "Tensor"
                   and (kwargs or {}).get("output_size") is None)
        # indexing with a boolean mask (x[mask], x[mask] = y) finds the mask's nonzeros inside the
        # operator, out of this mode's sight
        masked = name in MASKABLE_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
        if name in SYNCING_OPS or unsized or masked:
            self.reads.append("op:" + name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads(operators: bool = False):
    """Yields a list that receives the name of every read made in the block (and with `operators`,
    "op:" and the name of every syncing operator it runs)."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, method):
        def read(self, *args, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)
        return read

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(name, method))
        torch_nonzero = torch.nonzero
        torch.nonzero = counted("torch.nonzero", torch_nonzero)
        with _SyncingOps(reads) if operators else contextlib.nullcontext():
            yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = torch_nonzero
