#!/usr/bin/env bash
# What the CPU suite cannot run, sized for a short GPU lease: on a machine with an NVIDIA GPU,
# PyTorch, Triton and flash-linear-attention (where a package is missing and nothing can be
# downloaded, put its wheels in a folder and name it in WHEELS: they are installed first, without
# their dependencies, into a folder of their own).
#
#     [WHEELS=dir] experiments/gpu_check.sh tests|bench|all [LOGS]     (LOGS: default $OUT, else gpu-check/)
#
# tests (about 8 minutes at most): the environment, then the GPU tests of the hot path (a decode
#        loop under CUDA's sync debug mode, the decode step as a CUDA graph), then
#        tests/test_triton.py with the kernels compiled (every law in float32, float16 and bfloat16,
#        the benchmark's smoke run);
# bench (about 8 minutes at most): `memplug bench --device cuda`, the triton backend timed against fla
#        (each comparison of two computations of the same function first checks that they agree);
# all: both, one after the other (more than one 10-minute call).
# Each step runs under its own time limit and writes its log under LOGS as it goes, so a step cut
# short or failing leaves what it printed and the next step still runs. Exit status: the number of
# failed steps (2 for a wrong mode, 1 when the environment cannot run anything).
set -u
cd "$(dirname "$0")/.." || exit 1
what=${1:-}
case "$what" in
    tests | bench | all) ;;
    *) echo "usage: [WHEELS=dir] $0 tests|bench|all [LOGS]" >&2; exit 2 ;;
esac
logs=${2:-${OUT:-gpu-check}}
mkdir -p "$logs" || exit 1
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$logs/$name.log"
    local cut=""
    if [ $rc = 124 ] || [ $rc = 137 ]; then cut=", cut short at its limit"; fi
    echo "== $name: exit $rc after $((SECONDS - start)) s$cut"
    [ $rc = 0 ] || failed=$((failed + 1))
    return $rc
}

if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    step wheels 120 python3 -m pip install --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import memplug.backends" 2>/dev/null; then
    step install 120 python3 -m pip install --no-index --no-deps --no-build-isolation -e . || exit 1
fi
step environment 60 python3 -c "
import torch, triton, memplug, fla, transformers
print('device:', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__,
      '| fla', fla.__version__, '| transformers', transformers.__version__)
print('backends:', memplug.available_backends())
assert 'triton' in memplug.available_backends()" || exit 1  # no GPU, or a package missing: nothing else can run
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >> "$logs/environment.log" 2>&1

if [ "$what" = tests ] || [ "$what" = all ]; then
    step hot_path 120 python3 -m pytest tests/test_hot_path.py -m cuda -q -p no:cacheprovider
    step triton_compiled 330 python3 -m pytest tests/test_triton.py -q -p no:cacheprovider -n 8 --dist worksteal
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    step bench 450 python3 -m memplug.cli bench --device cuda
fi
echo "== $failed step(s) failed; logs in $logs/"
exit "$failed"
