#!/usr/bin/env bash
# Every GPU check and benchmark of attnkit in one call (at most 8 minutes of command time on a GPU
# host: the sections' limits add up to 465 s), section by section, in this order:
#   env        versions and the device (always);
#   exact      the Triton kernels against float64 (out, LSE, dq, dk, dv; benchmarks/gpu/check_exact.py);
#              without CUDA it runs in Triton's interpreter on a few tiny cases;
#   bench      issue 22's GPU table (python -m attnkit.bench.gpu_table: windows 256/4096, Strided, Fixed,
#              BlockSparse, Causal, decode; SDPA, compiled FlexAttention, attnkit auto/triton/sparse);
#   documents  issue 21: Causal & Document at 32k tokens in bf16, the Triton kernels against
#              torch.nn.attention.varlen.varlen_attn (and flash-attn's varlen where it imports)
#              (python -m attnkit.bench.gpu_documents);
#   decode     issue 19: the Llama-3.2-1B shape in bf16, attnkit's static-cache step under CUDA graphs
#              against transformers eager and static cache + compile, and the bandwidth floor
#              (python -m attnkit.bench.gpu_decode);
#   static     the Triton kernels' launches as the launcher specialises them (benchmarks/gpu/static_check.py
#              --list: seconds, no compile; STATIC=full compiles each for sm_90a and runs ptxas -v).
# Without CUDA, documents and decode run their --tiny CPU self-test and bench is skipped.
# Each section has its own time limit; one that fails or times out is recorded and the next runs.
# $OUT/summary.json is rewritten after every section (name, status ok/failed/timeout/skipped, exit
# status, seconds, log), so a run cut off still reports. Exit status 0 only when every section ran
# and passed; without CUDA the bench section is skipped, so the exit status is 1.
# From the repository root (the GPU machine's image has torch, triton, numpy, rich, matplotlib):
#   bash benchmarks/gpu/run_bench.sh                 # JSON, PNG and logs under $OUT (or benchmarks/gpu/out)
#   SECTIONS="env exact" bash benchmarks/gpu/run_bench.sh
set -uo pipefail
out="${OUT:-benchmarks/gpu/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
sections="${SECTIONS:-env exact bench documents decode static}"
summary="$out/summary.json"
failed=0

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    cuda=1
else
    cuda=0
fi

record() {  # record NAME STATUS RC SECONDS: add one section to the summary
    python3 - "$summary" "$@" <<'EOF'
import json, os, sys
path, name, status, rc, seconds = sys.argv[1:]
data = json.load(open(path)) if os.path.exists(path) else {"sections": []}
data["sections"].append({"name": name, "status": status, "exit_status": int(rc), "seconds": int(seconds),
                         "log": f"{name}.log"})
json.dump(data, open(path, "w"), indent=1)
EOF
}

section() {  # section NAME LIMIT COMMAND...: run it under a time limit, log it, record it
    local name="$1" limit="$2" start rc status
    shift 2
    case " $sections " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (at most ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    case "$rc" in 0) status=ok ;; 124) status=timeout ;; *) status=failed ;; esac
    [ "$rc" = 0 ] || failed=1
    record "$name" "$status" "$rc" "$(( $(date +%s) - start ))"
    echo "=== $name: $status (exit status $rc)"
}

skip() {  # skip NAME WHY
    case " $sections " in *" $1 "*) ;; *) return 0 ;; esac
    echo "=== $1: skipped ($2)" | tee "$out/$1.log"
    record "$1" skipped 0 0
    failed=1
}

rm -f "$summary"
# env: 20 s on a GPU host; importing torch on a loaded 2-core CPU may take minutes
section env "$([ "$cuda" = 1 ] && echo 20 || echo 300)" python3 -c "
import json, platform, sys, torch
info = {'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.cuda.is_available(),
        'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}
try:
    import triton
    info['triton'] = triton.__version__
except ImportError as exc:
    info['triton'] = f'not installed: {exc}'
print(json.dumps(info))
json.dump(info, open('$out/env.json', 'w'), indent=1)
"
if [ "$cuda" = 1 ]; then
    section exact 45 python3 benchmarks/gpu/check_exact.py --json "$out/check_exact.json"
    section bench 200 python3 -m attnkit.bench.gpu_table --out "$out" --budget 160
    section documents 60 python3 -m attnkit.bench.gpu_documents --out "$out" --repeats 10
    section decode 120 python3 -m attnkit.bench.gpu_decode --out "$out"
else
    section exact 1200 env TRITON_INTERPRET=1 python3 benchmarks/gpu/check_exact.py --device cpu --shrink 20 \
        --dtypes float32 --cases "window 255,strided 64" --json "$out/check_exact.json"
    skip bench "no CUDA device"
    section documents 300 python3 -m attnkit.bench.gpu_documents --out "$out" --device cpu --tiny --repeats 2
    section decode 300 python3 -m attnkit.bench.gpu_decode --out "$out" --device cpu --tiny
fi
if [ "${STATIC:-list}" = "full" ]; then
    section static 300 python3 benchmarks/gpu/static_check.py --json "$out/static_check.json" --dtypes bf16,fp16 \
        --dims 64,128 --jobs "$(nproc)"
else  # seconds on a GPU host; minutes on a loaded 2-core CPU
    section static "$([ "$cuda" = 1 ] && echo 20 || echo 240)" python3 benchmarks/gpu/static_check.py --list \
        --score-mods none --json "$out/static_launches.json"
fi
echo "summary: $summary"
cat "$summary"
exit "$failed"
