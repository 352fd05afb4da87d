#!/usr/bin/env bash
# attnkit benchmarks on a lent CUDA machine (nothing else depends on a GPU).
# The machine's image already holds torch, numpy, rich, safetensors and matplotlib and cannot
# download anything, so attnkit runs from the source tree. From the repository root:
#   bash benchmarks/gpu/run_bench.sh
# JSON and PNG results go to $OUT (the device tool's return folder) or benchmarks/gpu/out.
set -euo pipefail
out="${OUT:-benchmarks/gpu/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m attnkit.cli info
python3 -m attnkit.cli bench --device cuda --seq 1024 --seq 4096 --seq 8192 --seq 16384 \
    --json "$out/bench_causal_cuda.json" --plot "$out/bench_causal_cuda.png"
python3 -m attnkit.cli bench --device cuda --backward --seq 4096 --seq 8192 \
    --json "$out/bench_causal_cuda_bwd.json"
