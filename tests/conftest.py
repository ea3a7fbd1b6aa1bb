"""Test-suite set-up.

Without a CUDA GPU, Triton kernels run in Triton's interpreter, so that the `triton` backend's tests
(tests/test_triton.py) run on the CPU. `triton.jit` decides at decoration time whether a kernel is
interpreted, so this happens here, before any test runs the backend (its kernel modules are imported
on first use). The interpreter changes nothing else: `backend="auto"` never picks `triton` on CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs two pytest-xdist workers on two cores: one torch thread each, so that they do not
# oversubscribe the cores (two threads each spend more time waiting on each other than computing).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (compiled Triton kernels, half precision, timing)")
