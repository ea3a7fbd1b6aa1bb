"""Test-suite set-up.

Without a CUDA GPU, Triton kernels run in Triton's interpreter, so that the `triton` backend's tests
(tests/test_triton.py) run on the CPU. `triton.jit` decides at decoration time whether a kernel is
interpreted, so this happens here, before anything imports triton. It is turned on by
`memplug.adapters.enable_triton_interpreter`, whose patches change no result of our kernels: they
keep the interpreter from re-patching `triton.language` on every call of a device function
(`tl.sum`, `tl.max`, ... are such functions), about a third of the interpreted kernels' time, and
make loop indices tensors, as compiled kernels have them. The interpreter changes nothing else:
`backend="auto"` never picks `triton` on CPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    from memplug.adapters import enable_triton_interpreter

    enable_triton_interpreter()

# `make test` runs two pytest-xdist workers on two cores: one torch thread each, so that they do not
# oversubscribe the cores (two threads each spend more time waiting on each other than computing).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from the same global random state, whatever ran before it on its worker: with
    pytest-xdist the order differs between runs, and a tolerance checked on unseeded draws passed or
    failed with it (test_bench_agreement_sees_a_few_wrong_rows_and_nan did, 1 run in several)."""
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (compiled Triton kernels, half precision, timing)")


def pytest_collection_modifyitems(session, config, items):
    """The Triton interpreter's tests first. They are the suite's longest (up to two minutes each), and
    run last they left one worker finishing the longest alone; run first, the short tests of the other
    files fill in at the end (pytest-xdist's worksteal takes tests from the end of a worker's queue)."""
    items.sort(key=lambda item: item.path.name != "test_triton.py")  # stable: the order within each part stays
