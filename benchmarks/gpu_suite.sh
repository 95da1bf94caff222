#!/usr/bin/env bash
# One GPU session: kernel correctness on CUDA, the kernel tests, then the benchmarks.
# Usage on the device machine (repo root, $OUT set):  bash benchmarks/gpu_suite.sh [part]
#   part: all (default) | kernels (checks + tests + scan bench) | benches (adapter + finetune benches)
#         | adapter (fused adapter: tile timings, CUDA tests, benchmark with and without CUDA graphs)
#         | adapter_modes (tile timings of every backward variant, CUDA tests, graph benchmark; BENCH_MODE=cublas
#           or wgrad_kernel forces that backward mode in the benchmark, whose files then carry its name)
#         | adapter_quick (parallel precompile, the SAM-width CUDA tests, the graph benchmark: ~4 min)
# Pure-Python extras (segment-anything, monai, nibabel) travel as wheels in .whl/.
set -uo pipefail
part=${1:-all}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
log="$OUT/gpu_log_${part}.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  if [[ $part == all || $part == kernels ]]; then
    timeout 120 python3 benchmarks/gpu_check.py --out "$OUT"
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused_adapter_cuda.py \
      tests/kernels/test_selective_scan_triton.py
    timeout 200 python3 benchmarks/bench_selective_scan.py --out "$OUT" --lengths 256 1024 2048 4096 8192 \
      --dims 768 1536 --dtype bf16 --ref-max-len 1024
  fi
  if [[ $part == all || $part == benches ]]; then
    timeout 220 python3 benchmarks/bench_adapter.py --out "$OUT" --batches 1 4 8
    timeout 220 python3 benchmarks/bench_finetune.py --out "$OUT" --with-3d
  fi
  if [[ $part == adapter_modes ]]; then
    timeout 260 python3 benchmarks/tune_adapter.py --out "$OUT"
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_adapter_cuda.py \
      tests/adapters/test_placement.py tests/train/test_segment3d.py::test_segment_on_cuda_agrees_with_cpu
    timeout 150 python3 benchmarks/bench_adapter.py --out "$OUT" --graphs --batches 1 8 \
      ${BENCH_MODE:+--backward-mode "$BENCH_MODE"}
  fi
  if [[ $part == adapter_quick ]]; then
    timeout 60 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from tune_adapter import precompile; \
print(f'precompiled in {precompile([768, 1024, 1280], 12):.0f} s')"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_adapter_cuda.py -k "sam_widths or sequential"
    timeout 120 python3 benchmarks/bench_adapter.py --out "$OUT" --graphs --batches 1 8
  fi
  if [[ $part == adapter ]]; then
    timeout 150 python3 benchmarks/tune_adapter.py --out "$OUT"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_adapter_cuda.py
    timeout 120 python3 benchmarks/bench_adapter.py --out "$OUT" --graphs --batches 1 8
    timeout 100 python3 benchmarks/bench_adapter.py --out "$OUT" --batches 1 8
  fi
} 2>&1 | tee "$log"
