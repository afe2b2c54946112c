#!/usr/bin/env bash
# The `gpu` tier on the lent NVIDIA machine (x86_64, Python 3.12, no package index there):
# installs the wheels that ../shared/tools/gpu-wheels.sh put in .whl/, registers NVIDIA's
# OpenCL driver, then runs the GEMV benchmark with its knob sweep (and the transposed shape and
# the K formats, with GPU_SET's knobs if given), the gpu tests, and with GPU_TUNE_S > 0 a `tune`.
# Logs and JSON go to OUT_DIR (default ./gpu-out), one file per step.
#   usage: bench/gpu_tier.sh [OUT_DIR]        (from the repository root)
set -uo pipefail
out=${1:-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /etc/OpenCL/vendors
[ -e /etc/OpenCL/vendors/nvidia.icd ] ||
  echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
step() {  # step NAME SECONDS COMMAND...: time-boxed, output to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  tail -n 4 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step device 30 python3 -c '
import pyopencl as cl
for p in cl.get_platforms():
    for d in p.get_devices():
        print(p.name, "|", d.name, "|", d.version, "|", d.driver_version, "| cache",
              d.global_mem_cache_size, "| max alloc", d.max_mem_alloc_size, "|", d.extensions)'
# the GEMV target first (its knobs swept, each shape checked against numpy), then the tier's tests
step gemv "${GPU_BENCH_S:-200}" python3 bench/bench_gemv.py --device gpu --types q8_0,q4_0 --sweep
step gemv_down "${GPU_SHORT_S:-45}" python3 bench/bench_gemv.py --device gpu --types q8_0,q4_0 \
  --rows 4096 --cols 14336 --set "${GPU_SET:-}"
step gemv_k "${GPU_SHORT_S:-45}" python3 bench/bench_gemv.py --device gpu --types q4_k,q6_k,f16 \
  --set "${GPU_SET:-}"
step pytest "${GPU_TEST_S:-240}" python3 -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider
[ "${GPU_TUNE_S:-0}" -gt 0 ] && step tune "${GPU_TUNE_S:-0}" python3 -c '
from runtime.backends.opencl_device import find_device
from runtime.backends.opencl_programs import ProgramCache
from runtime.backends.opencl_tuning import tune
dev = find_device(kind="gpu")
print("best", tune(dev, ProgramCache(dev)))'
exit 0
