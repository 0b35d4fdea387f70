#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command (docs/gpu.md): the CUDA
# tests of probe.watch (no host sync on the training thread), the system
# sampler against the real driver (pynvml), and the host time of
# probe.watch's hooks on CUDA. Logs go to $OUT (default ./device-out).
#
#     bash scripts/device_wheels.sh          # here, once: wheels for a machine without them
#     bash scripts/device_check.sh           # there, in the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/outrider-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/outrider-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c 'import sys, torch, pynvml; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, torch.cuda.is_available(), pynvml.__file__)'
} 2>&1 | tee "$OUT/machine.txt"
# -rs: a skip says why; a CUDA test that skips on a GPU machine is a failure of this check.
"$PY" -m pytest -q -rs -p no:cacheprovider tests/probe/test_watch.py tests/probe/test_no_host_sync.py \
    tests/agent/system/test_nvml.py -k "cuda or nvml" 2>&1 | tee "$OUT/tests.log" || status=1
if grep -q -e "needs a CUDA device" -e "needs an NVIDIA driver" "$OUT/tests.log"; then
    echo "device_check: a GPU test skipped on this machine" | tee -a "$OUT/tests.log"
    status=1
fi
for device in cpu cuda; do
    "$PY" bench/bench_watch_hooks.py --device "$device" 2>&1 | tee "$OUT/watch_hooks_$device.txt" \
        || status=1
done
echo "device_check: exit $status" | tee -a "$OUT/tests.log"
exit $status
