#!/bin/sh
# bench_vs_peer.sh — moonlit and the peer (PyTorch + diffusers, eager, bf16)
# back to back in one call on one GPU, ending with one table: the SD 1.4
# DreamBooth training step per precision (median, min, peak GiB, TFLOP/s of
# the peer's 14.52 TFLOP count) and 50-step generation at batch 1 and 4, with
# the ratio moonlit/peer for each row (below 1: moonlit is faster / smaller).
#
#   scripts/bench_vs_peer.sh            # on the GPU machine, repository root
#
# Needs build/moonlit (CUDA) and, for the peer, the diffusers wheel in
# PEER_DIR (.cache/peer; see tests/bench/README.md).  Knobs: PRECISIONS
# ("bf16-mixed bf16-sr"), STEPS (timed train steps, 10), PROFILE (N: also
# print moonlit's N costliest kernels of one step), PROFILE_BY_SCOPE (N: the
# N costliest kernels per layer or backward node), SKIP_PEER=1, SKIP_GEN=1.
set -u
BIN=${BIN:-build/moonlit}
WORK=${WORK:-build/bench_vs_peer}
PEER_DIR=${PEER_DIR:-.cache/peer}
PRECISIONS=${PRECISIONS:-"bf16-mixed bf16-sr"}
STEPS=${STEPS:-10}
PROFILE=${PROFILE:-0}
PROFILE_BY_SCOPE=${PROFILE_BY_SCOPE:-0}
export NCCL_NVLS_ENABLE=0
[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$WORK"
ROWS=$WORK/rows.txt
: > "$ROWS"
# row NAME MOONLIT PEER UNIT
row() { printf '%s|%s|%s|%s\n' "$1" "$2" "$3" "$4" >> "$ROWS"; }
field() { # field FILE REGEX AWK-PROGRAM: the first line matching REGEX, through AWK-PROGRAM
    grep -E "$2" "$1" | head -1 | awk "$3"
}

for prec in $PRECISIONS; do
    log=$WORK/ml-train-$prec.log
    echo "== moonlit train step, $prec"
    "$BIN" tests/bench/bench_train_step.lua --precision "$prec" --steps "$STEPS" --profile "$PROFILE" \
        --profile_by_scope "$PROFILE_BY_SCOPE" 2>&1 | tee "$log"
    eval "$(awk '/^train step/ { for (i = 1; i <= NF; i++) { if ($i == "median") med = $(i+1); if ($i == "min") mn = $(i+1);
                                                            if ($i == "peak") pk = $(i+1) } }
                 /TFLOP\/s of model FLOPs/ { tf = $1 }
                 END { printf "ML_MED=%s ML_MIN=%s ML_PEAK=%s ML_TF=%s\n", med, mn, pk, tf }' "$log")"
    row "train step $prec, median (ms)" "${ML_MED:--}" "@peer_med" ms
    row "train step $prec, min (ms)" "${ML_MIN:--}" "@peer_min" ms
    row "train step $prec, peak (GiB)" "${ML_PEAK:--}" "@peer_peak" GiB
    row "train step $prec (TFLOP/s)" "${ML_TF:--}" "@peer_tf" TFLOP/s
done

if [ "${SKIP_GEN:-0}" != 1 ]; then
    echo "== moonlit generation (bf16 weights, as the peer)"
    "$BIN" tests/bench/bench_generate.lua --precision bf16-sr --batch 1,4 2>&1 | tee "$WORK/ml-gen.log"
    for n in 1 4; do
        s=$(field "$WORK/ml-gen.log" "^generate .* batch $n:" '{ for (i = 1; i <= NF; i++) if ($i == "s") print $(i-1) }')
        row "generate 50 steps, batch $n (s)" "${s:--}" "@peer_gen$n" s
    done
fi

PEER_MED=-; PEER_MIN=-; PEER_PEAK=-; PEER_TF=-; PEER_GEN1=-; PEER_GEN4=-
if [ "${SKIP_PEER:-0}" != 1 ]; then
    echo "== peer (PyTorch eager + diffusers, bf16)"
    python3 -m pip install --quiet --no-deps --target "$WORK/pydeps" "$PEER_DIR"/diffusers-*.whl >/dev/null 2>&1
    export PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"
    python3 tests/bench/peer/peer_train_step.py --steps "$STEPS" 2>&1 | tee "$WORK/peer-train.log"
    res=$(grep '^RESULT ' "$WORK/peer-train.log" | tail -1 | cut -c8-)
    if [ -n "$res" ]; then
        eval "$(echo "$res" | python3 -c '
import json, sys
r = json.load(sys.stdin)
f = r.get("flops", {}).get("step_total")
print("PEER_MED=%.1f PEER_MIN=%.1f PEER_PEAK=%.2f" % (r["train_step_s_median"] * 1e3, r["train_step_s_min"] * 1e3,
                                                     r["train_peak_mem_gib"]))
print("PEER_TF=%.1f" % (f / r["train_step_s_median"] / 1e12) if f else "PEER_TF=-")')"
    fi
    if [ "${SKIP_GEN:-0}" != 1 ]; then
        python3 tests/bench/peer/peer_train_step.py --infer 2>&1 | tee "$WORK/peer-gen.log"
        res=$(grep '^RESULT ' "$WORK/peer-gen.log" | tail -1 | cut -c8-)
        [ -n "$res" ] && eval "$(echo "$res" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("PEER_GEN1=%.3f PEER_GEN4=%.3f" % (r["infer_50step_batch1_s"], r["infer_50step_batch4_s"]))')"
    fi
fi

echo
echo "== moonlit vs peer, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%Y-%m-%d)," \
     "moonlit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
printf '%-38s %10s %10s %14s\n' "what" "moonlit" "peer" "moonlit/peer"
while IFS='|' read -r name ml peer unit; do
    case $peer in
        @peer_med) peer=$PEER_MED ;; @peer_min) peer=$PEER_MIN ;; @peer_peak) peer=$PEER_PEAK ;;
        @peer_tf) peer=$PEER_TF ;; @peer_gen1) peer=$PEER_GEN1 ;; @peer_gen4) peer=$PEER_GEN4 ;;
    esac
    r=$(awk -v a="$ml" -v b="$peer" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }')
    printf '%-38s %10s %10s %14s\n' "$name" "$ml" "$peer" "$r"
done < "$ROWS"
