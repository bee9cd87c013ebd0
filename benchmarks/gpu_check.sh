#!/usr/bin/env bash
# The GPU check: one script, one GPU, under 8 minutes; its numbers go to BENCHMARKS §7.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/gpu
#
# 1. the test suite's CUDA cases (tests that train on the GPU when one is there);
# 2. benchmarks/bench_gpu.py: trainer img/s at batch 32/128/1024 against the canonical
#    DataLoader loop, 1/2/4/8 trials packed on one GPU, and the seed-replication preset at full
#    size if MNIST's IDX files are in $MNIST_DIR.
# Set-up is the README's: a venv with the project installed (CUDA torch from pip on Linux).
# Without a GPU, DRY_RUN=1 runs the same steps on the CPU at small sizes (the script's own check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || { python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[test]'; py=.venv/bin/python; }
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
device=cuda; quick=()
if [ "${DRY_RUN:-0}" = 1 ]; then device=cpu; quick=(--quick); fi
start=$(date +%s)
{
  echo "# gpu_check $(date -u +%FT%TZ) on $(hostname)"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} > "$out/gpu_check.txt" 2>&1
# 1. CUDA cases of the suite
timeout 180 "$py" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_cli_core.py tests/test_cluster.py \
  tests/test_train_evaluate.py > "$out/pytest_cuda.txt" 2>&1
echo "pytest CUDA cases: exit $? ($(tail -1 "$out/pytest_cuda.txt"))" >> "$out/gpu_check.txt"
# 2. the benchmarks
timeout 330 "$py" benchmarks/bench_gpu.py --device "$device" "${quick[@]}" --json "$out/gpu.json" \
  > "$out/bench_gpu.txt" 2>&1
echo "bench_gpu: exit $? (benchmarks/results: $out/gpu.json)" >> "$out/gpu_check.txt"
echo "seconds: $(( $(date +%s) - start ))" >> "$out/gpu_check.txt"
cat "$out/gpu_check.txt"
