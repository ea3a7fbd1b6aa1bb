#!/usr/bin/env bash
# What the CPU suite cannot run, in one call sized for a short GPU lease: run it from the repository
# root on a machine with an NVIDIA GPU, PyTorch, Triton and flash-linear-attention.
#
#     experiments/gpu_check.sh [tests|bench|all] [OUT]     (default: all, logs under gpu-check/)
#
# tests: the environment, then the GPU tests of the hot path (a decode loop under CUDA's sync debug
#        mode, the decode step as a CUDA graph), then tests/test_triton.py with the kernels compiled
#        (every law in float32, float16 and bfloat16, the benchmark's smoke run);
# bench: `memplug bench --device cuda`, the triton backend timed against fla (each comparison first
#        checks that both sides compute the same outputs).
# Each step runs under its own time limit and writes its log under OUT as it goes, so a step cut short
# or failing leaves what it printed and the next step still runs. Exit status: the failed steps.
set -u
what=${1:-all}
out=${2:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ', cut short at its limit')"
    [ $rc = 0 ] || failed=$((failed + 1))
    return $rc
}

if ! python3 -c "import memplug.backends" 2>/dev/null; then
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
fi
step environment 60 python3 -c "
import torch, triton, memplug, fla, transformers
print('device:', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__,
      '| fla', fla.__version__, '| transformers', transformers.__version__)
print('backends:', memplug.available_backends())
assert 'triton' in memplug.available_backends()" || exit 1  # no GPU, or a package missing: nothing else can run
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >> "$out/environment.log" 2>&1

if [ "$what" = tests ] || [ "$what" = all ]; then
    step hot_path 180 python3 -m pytest tests/test_hot_path.py -m cuda -q -p no:cacheprovider
    step triton_compiled 420 python3 -m pytest tests/test_triton.py -q -p no:cacheprovider -n 8 --dist worksteal
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    step bench 420 memplug bench --device cuda
fi
echo "== $failed step(s) failed; logs in $out/"
exit "$failed"
