#!/usr/bin/env bash
# The GPU check: one script, one GPU, under 8 minutes; its numbers go to BENCHMARKS §7.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/gpu
#
# 1. the test suite's CUDA cases (tests that train on the GPU when one is there);
# 2. benchmarks/bench_gpu.py: trainer img/s at batch 32/128/1024 against the canonical
#    DataLoader loop, 1/2/4/8 trials packed on one GPU, and the seed-replication preset at full
#    size if MNIST's IDX files are in $MNIST_DIR;
# 3. studies through the CLI, packed (the default for trials sharing a GPU) and --no-pack: the
#    README study on the GPU (16 trials x 15 epochs, 0.25 GPU each), and 64 trials x 15 epochs
#    with 8 and 16 at once (0.125 / 0.0625 GPU each), no refit; each one's wall, summed training
#    and images/s (benchmarks/study_wall.py), the packs' round sizes;
# 4. benchmarks/bench_pack.py on the GPU: K stacked against K separate, K = 1..128 (MLP), 1..32 (conv),
#    training, and validation (members one by one against one stacked pass).
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
timeout 60 "$py" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_cli_core.py tests/test_cluster.py \
  tests/test_train_evaluate.py > "$out/pytest_cuda.txt" 2>&1
echo "pytest CUDA cases: exit $? ($(tail -1 "$out/pytest_cuda.txt"))" >> "$out/gpu_check.txt"
# 2. the benchmarks
timeout 120 "$py" benchmarks/bench_gpu.py --device "$device" "${quick[@]}" --json "$out/gpu.json" \
  > "$out/bench_gpu.txt" 2>&1
echo "bench_gpu: exit $? (benchmarks/results: $out/gpu.json)" >> "$out/gpu_check.txt"
# 3. studies, packed and not
if [ "${DRY_RUN:-0}" = 1 ]; then size=(--trials 4 --epochs 2 --max-train-images 300); gpu=(--device cpu)
  shares=("0 --pack 2" "0 --no-pack"); readme=(--trials 4 --epochs 2 --max-train-images 300)
else size=(--trials 64 --epochs 15); gpu=(--device cuda); readme=(--trials 16 --epochs 15)
  shares=("0.125" "0.125 --no-pack" "0.0625" "0.0625 --no-pack"); fi
for pack in "" "--no-pack"; do
  [ "${DRY_RUN:-0}" = 1 ] && [ -z "$pack" ] && pack="--pack 2"
  shr=0.25; [ "${DRY_RUN:-0}" = 1 ] && shr=0
  timeout 90 "$py" benchmarks/study_wall.py --label "readme $pack" -- run --name readme --storage "$out/studies" \
    --overwrite "${readme[@]}" "${gpu[@]}" --gpus-per-trial $shr $pack >> "$out/studies.txt" 2>&1
done
for share in "${shares[@]}"; do
  # shellcheck disable=SC2086
  timeout 75 "$py" benchmarks/study_wall.py --label "64x15 gpus-per-trial $share" -- run --name big --storage \
    "$out/studies" --overwrite "${size[@]}" "${gpu[@]}" --no-refit --cpus-per-trial 1 --gpus-per-trial $share \
    >> "$out/studies.txt" 2>&1
done
echo "studies: $(grep -c '^study ' "$out/studies.txt") measured ($out/studies.txt)" >> "$out/gpu_check.txt"
# 4. K stacked against K separate on the device: the MLP (batched matmuls), the conv net (torch.func)
if [ "${DRY_RUN:-0}" = 1 ]; then ks=(1,4 1,2); else ks=(1,8,32,128 1,8,32); fi
for i in 0 1; do arch=(mlp conv); a=${arch[$i]}
  timeout 75 "$py" benchmarks/bench_pack.py --device "$device" --arch "$a" --ks "${ks[$i]}" --threads 1 --rounds 1 \
    --json "$out/pack_$a.json" > "$out/bench_pack_$a.txt" 2>&1
  echo "bench_pack $a: exit $? ($(tail -1 "$out/bench_pack_$a.txt"))" >> "$out/gpu_check.txt"
  timeout 30 "$py" benchmarks/bench_pack.py --what validation --device "$device" --arch "$a" --ks "${ks[$i]}" \
    --threads 1 --rounds 3 --json "$out/pack_val_$a.json" > "$out/bench_pack_val_$a.txt" 2>&1
  echo "bench_pack validation $a: exit $? ($(tail -1 "$out/bench_pack_val_$a.txt"))" >> "$out/gpu_check.txt"
done
cat "$out/studies.txt" >> "$out/gpu_check.txt"
echo "seconds: $(( $(date +%s) - start ))" >> "$out/gpu_check.txt"
cat "$out/gpu_check.txt"
