"""Run the comparisons of `memplug bench --device cuda` (`experiments.bench_cuda.triton_against_fla`) on
the CPU: memplug's Triton kernels and fla's in Triton's interpreter (patched for fla by
`memplug.adapters.enable_triton_interpreter`), float16 (bfloat16 products are wrong in the
interpreter, and fla's chunk_delta_rule refuses float32), the `--smoke` shapes (8 slots, not 64, in
the sparse-against-dense comparison), each time one call. This checks that every comparison of the
GPU benchmark runs, fla's calls included, and that its two sides compute the same outputs (it
exits with status 1 if not); the times it prints say nothing about a GPU. Run as a
script in its own process, since the interpreter must be on before fla is imported:

    python tests/support/bench_interpret.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memplug.adapters import enable_triton_interpreter  # noqa: E402

enable_triton_interpreter()

from memplug.experiments import bench_cuda  # noqa: E402


def once_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    # 8 slots, not 64, in the sparse-against-dense comparison: at 64 it took most of the run's three minutes.
    args = bench_cuda.cuda_arguments(["--smoke", "--dtype", "float16", "--device", "cpu", "--sparse-m", "8"])
    print(f"triton_against_fla on the CPU in Triton's interpreter, float16; B={args.B} T={args.T} H={args.H} "
          f"K={args.K} V={args.V}; times: one call each (interpreted: not a benchmark)")
    failures = bench_cuda.triton_against_fla(args, "cpu", once_ms)
    sys.exit(1 if failures else 0)
