#!/usr/bin/env bash
# attnkit on a lent CUDA machine (nothing else depends on a GPU), one call, under 6 minutes:
#   1. the Triton kernels' exactness on the GPU (out, LSE, dq, dk, dv against float64);
#   2. the GPU table of issue 10 (windows, strided, fixed, blocksparse, causal, a decoding step;
#      SDPA, compiled FlexAttention, attnkit auto/triton/sparse; forward and forward+backward),
#      section by section: a failing section is recorded and the next one runs.
# The machine's image holds torch, triton, numpy, rich and matplotlib and cannot download
# anything, so attnkit runs from the source tree. From the repository root:
#   bash benchmarks/gpu/run_bench.sh
# JSON, PNG and logs go to $OUT (the device tool's return folder) or benchmarks/gpu/out.
# DRY=1 runs the same steps with tiny shapes on the CPU (a check of the script, not a benchmark).
set -uo pipefail
out="${OUT:-benchmarks/gpu/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DRY:-0}" = "1" ]; then
    python3 -m attnkit.bench.gpu_table --out "$out" --device cpu --tiny --repeats 1 --only gpu-window 2>&1 | tee "$out/gpu_table.log"
    exit "${PIPESTATUS[0]}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
python3 -m attnkit.cli info 2>&1 | tee "$out/info.txt"
timeout 100 python3 benchmarks/gpu/check_exact.py --json "$out/check_exact.json" 2>&1 | tee "$out/check_exact.log"
echo "check_exact exit status: ${PIPESTATUS[0]}"
timeout 240 python3 -m attnkit.bench.gpu_table --out "$out" --budget 190 2>&1 | tee "$out/gpu_table.log"
echo "gpu_table exit status: ${PIPESTATUS[0]}"
