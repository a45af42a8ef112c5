#!/bin/sh
# gpu_check.sh — every GPU test and benchmark in one go, for the GPU machine.
#
# Builds nothing: build moonlit where the CUDA toolkit is (`make`, and
# `make build/tests/test_cuda_core` for the C runtime test), send the
# repository with build/, and run from the repository root:
#
#     scripts/gpu_check.sh            # logs under build/gpu_check/
#     LOG_DIR=/some/dir scripts/gpu_check.sh
#
# Steps: GPU summary (nvidia-smi), the C tests of the CUDA runtime/allocator
# and of cuBLAS (if built), the CPU-vs-GPU parity suite, the fixtures on the
# GPU and generation in each precision (when the vocabulary is there: run
# scripts/fetch_clip_vocab.sh first), the kernel bandwidth benchmark, the
# attention benchmark beside PyTorch, then any bench/*.lua.  Ends with a
# table of the steps and exits non-zero if one failed.
set -u
BIN=${BIN:-build/moonlit}
LOG_DIR=${LOG_DIR:-build/gpu_check}
mkdir -p "$LOG_DIR"

# NVLink multicast off in every process (it can take a shared host's GPUs
# out of service); the CUDA libraries live under /usr/local/cuda there.
export NCCL_NVLS_ENABLE=0
[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== GPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu --format=csv
else
    echo "nvidia-smi not found"
fi

if [ ! -x "$BIN" ]; then
    echo "gpu_check: $BIN is missing; build it first (make)" >&2
    exit 2
fi

TABLE="$LOG_DIR/table.txt"
: > "$TABLE"
failed=0

# step NAME LOGFILE COMMAND...: run, keep the log, record status, seconds
# and the last "N passed, N failed" (or last) line.
step() {
    name=$1; log=$2; shift 2
    echo
    echo "== $name: $*"
    t0=$(date +%s)
    "$@" > "$LOG_DIR/$log" 2>&1
    rc=$?
    t1=$(date +%s)
    cat "$LOG_DIR/$log"
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOG_DIR/$log" | tail -1)
    [ -n "$summary" ] || summary=$(grep -v '^[[:space:]]*$' "$LOG_DIR/$log" | tail -1 | cut -c1-60)
    if [ $rc -eq 0 ]; then status=ok; else status="FAIL($rc)"; failed=1; fi
    printf '%-24s %-9s %6ss  %s\n' "$name" "$status" $((t1 - t0)) "$summary" >> "$TABLE"
}

if [ -x build/tests/test_cuda_core ]; then
    step "cuda runtime (C)" cuda_core.log build/tests/test_cuda_core
else
    printf '%-24s %-9s %7s  %s\n' "cuda runtime (C)" skipped "" "build/tests/test_cuda_core not built" >> "$TABLE"
fi
if [ -x build/tests/test_cuda_blas ]; then
    step "cublas (C)" cuda_blas.log build/tests/test_cuda_blas
fi
if [ -x build/tests/test_cuda_attention ]; then
    # cuDNN's fused attention against the CPU kernel, each path's backward fed the other's forward
    step "cudnn attention (C)" cuda_attention.log build/tests/test_cuda_attention
fi
step "parity cpu vs gpu" parity.log "$BIN" tests/gpu/test_parity.lua
step "parity conv legacy API" parity_conv_legacy.log env MOONLIT_CONV_API=legacy "$BIN" tests/gpu/test_parity.lua conv2d
for f in tests/fixtures/sd1-tiny tests/fixtures/sd2-tiny; do
    if [ -f "$f/pipeline/tokenizer/vocab.json" ]; then
        step "fixture $(basename "$f") f32" "verify_$(basename "$f").log" "$BIN" scripts/verify_fixture.lua "$f" --device cuda
        # bf16-mixed held to 1.5x PyTorch autocast's own error (<fixture>/bf16_tolerances.json)
        step "fixture $(basename "$f") bf16" "verify_bf16_$(basename "$f").log" "$BIN" scripts/verify_fixture.lua "$f" \
            --device cuda --precision bf16-mixed
    fi
done
if [ -f tests/fixtures/sd1-tiny/pipeline/tokenizer/vocab.json ]; then
    step "generate per precision" generate.log "$BIN" tests/gpu/check_generate_precision.lua
fi
# ml.data's tests include pinned-memory batches on the GPU, checked against the CPU's
step "data loader on GPU" data.log "$BIN" tests/lua/run.lua tests/lua/test_data.lua
step "gc pressure hook" gc_pressure.log "$BIN" tests/gpu/check_gc_pressure.lua
# BENCH=0 leaves out the benchmarks (a correctness-only run)
if [ "${BENCH:-1}" != 0 ]; then
    step "kernel bandwidth" bench_kernels.log "$BIN" tests/gpu/bench_kernels.lua
    # attention per shape beside PyTorch's SDPA backends (its peer script runs inside)
    step "attention vs peer" bench_attention.log "$BIN" tests/gpu/bench_attention.lua
    for f in bench/*.lua; do
        [ -f "$f" ] || continue
        step "$(basename "$f" .lua)" "$(basename "$f" .lua).log" "$BIN" "$f"
    done
fi

echo
echo "== summary (logs in $LOG_DIR)"
printf '%-24s %-9s %7s  %s\n' step status time result
cat "$TABLE"
exit $failed
