"""Counting the reads of tensor values back into Python: on a GPU each one is a host sync.

`count_host_reads()` patches the Tensor methods that copy a value to the host (`item`, `bool`,
`int`, `float`, `tolist`, `nonzero`, ...) to count their calls on the CPU, where no sync can be
seen. It cannot see syncs made inside an operator (e.g. `unique` on CUDA); the GPU test with
`torch.cuda.set_sync_debug_mode("error")` covers those.
"""
from __future__ import annotations

import contextlib

import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that receives the name of every read made in the block."""
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
        yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = torch_nonzero
