#!/usr/bin/env bash
# One prepared check of logix on a GPU (issue #14 item 5), in under 8 minutes:
#   1. a virtual environment with what logix needs, from PyPI only (an installed CUDA torch is
#      reused through --system-site-packages when there is one);
#   2. the CUDA tests (tests/test_gpu.py: device vs CPU scores for float32/bf16/fp16 stores,
#      upcast on device, copies on a side stream overlapped with compute, NCCL under torchrun);
#   3. benchmarks/bench_gpu.py (GEMM rates, query rate as a fraction of them, logged/plain steps
#      on the bench decoder and a GPT-2-size one, store write rate) and the first/repeat query
#      benchmark on the device;
# and writes everything to one file (default gpu_check.txt in the repository root).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FILE]
#   LOGIX_GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh   # no GPU: smoke sizes on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.txt}"
CPU="${LOGIX_GPU_CHECK_CPU:-0}"
VENV="${LOGIX_GPU_VENV:-.gpu-venv}"

if [ -n "${LOGIX_PYTHON:-}" ]; then
  PY="$LOGIX_PYTHON"
else
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV" || exit 1
  fi
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch || exit 1
  "$PY" -m pip install -q "safetensors>=0.4" "numpy>=1.24" "pyyaml>=6.0" "rich>=13.0" "pytest>=7.4" || exit 1
  "$PY" -m pip install -q --no-deps -e . || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # a titled step with its own time limit; a failure is recorded, the rest still runs
  local title="$1" limit="$2"
  shift 2
  echo
  echo "== $title"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "-- exit $? after $((SECONDS - t0)) s"
}

{
  echo "logix GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  if [ "$CPU" = 1 ]; then
    run "CUDA tests (CPU parts; CUDA ones skip)" 200 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
    run "GPU benchmark (smoke sizes on the CPU)" 200 "$PY" benchmarks/bench_gpu.py --device cpu --smoke --repeats 2
    run "first and repeat raw queries (CPU, small)" 200 "$PY" benchmarks/bench_first_query.py --device cpu --big-rows 8192 --skip-eigen --epochs 2 --repeats 2
  else
    run "CUDA tests" 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
    run "GPU benchmark: GEMM rates, query rate, logged/plain steps, store writes" 180 "$PY" benchmarks/bench_gpu.py --device cuda
    run "first and repeat raw queries on the device" 90 "$PY" benchmarks/bench_first_query.py --device cuda --threads 4 --skip-eigen --repeats 5
  fi
} 2>&1 | tee "$OUT"
echo "results in $OUT"
