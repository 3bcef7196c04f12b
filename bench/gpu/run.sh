#!/usr/bin/env bash
# Issue #15's GPU checks, step 2 of 2 -- run ON THE GPU MACHINE, from the repository root, with
# .gpu/ carried (bench/gpu/prepare.sh made it here). In one call (about 5 minutes on an H100):
#   1. the CUDA tests: the server side on CUDA with a CPU agent, an agent on CUDA (cpsl and fl),
#      a profile on the GPU, split inference's tail on the GPU -- against the CPU's results (1e-4);
#   2. bench/server_step.py on the CPU and the GPU (issue #15 item 4's table).
# Everything it writes goes to $OUT (the device tool brings it back), or bench/results/gpu.
# A dry run here: SKIP_WHEELS=1 PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" /tmp/gpu-mq/bin
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

[ -n "${SKIP_WHEELS:-}" ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || { echo "cannot install the carried wheels: run bench/gpu/prepare.sh here and carry .gpu"; exit 2; }
export PYTHONPATH="$PWD:/tmp/site"
for deb in .gpu/deb/*.deb; do dpkg -x "$deb" /tmp/gpu-mq/root; done
libs=/tmp/gpu-mq/root/usr/lib/x86_64-linux-gnu:/tmp/gpu-mq/root/lib/x86_64-linux-gnu
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec /tmp/gpu-mq/root/usr/sbin/mosquitto "$@"\n' "$libs" >/tmp/gpu-mq/bin/mosquitto
chmod +x /tmp/gpu-mq/bin/mosquitto
export PATH="/tmp/gpu-mq/bin:$PATH"

{
    nvidia-smi -L
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
    mosquitto -h | head -1
} 2>&1 | tee "$OUT/machine.txt"

$PY -m pytest -q -rs -p no:cacheprovider \
    tests/test_placement.py tests/test_cli_profile.py::test_a_profile_on_the_gpu_says_so_and_times_every_cut \
    "tests/test_cli_system.py::test_an_agent_configured_for_auto_registers_where_it_trains" \
    "tests/test_inference.py::test_a_service_on_the_gpu_answers_as_the_cpu_one_does" \
    2>&1 | tee "$OUT/cuda_tests.txt"
tests=${PIPESTATUS[0]}

timeout 420 $PY bench/server_step.py --out "$OUT" 2>&1 | tee "$OUT/server_step.log"
bench=${PIPESTATUS[0]}
echo "cuda tests exit $tests, server_step exit $bench"
exit $((tests || bench))
