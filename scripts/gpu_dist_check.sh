#!/bin/sh
# gpu_dist_check.sh — data parallelism on ONE GPU, world size 1 through the
# real NCCL path (docs/dist.md), for the GPU machine:
#   (a) ml.dist's collectives on CUDA f32/bf16/f16 tensors, values checked
#       (tests/gpu/check_dist.lua): once as a plain process started with
#       NCCL_NVLS_ENABLE unset (dist.init must set it: the script checks the
#       variable), once as a torchrun-style worker (RANK=0 WORLD_SIZE=1);
#   (b) the DDP step against one process on the same batch
#       (tests/gpu/check_ddp_step.lua, f32 and bf16-mixed), then the
#       full-size SD 1.4 training step (bf16-mixed, 2+2 images at 512x512,
#       random weights made here from configs/sd-v1-4) timed without DDP
#       and with --ddp (DDP + NCCL at world size 1), REPEAT times each,
#       interleaved; the ratio of the best medians, target <= 1.03;
#   (c) the toy recipe (`make run`'s job) as a world-size-1 worker on cuda,
#       so its training goes through DDP and NCCL, to the end.
# Ends with one table; exits non-zero if a check failed.
#
#   scripts/gpu_dist_check.sh                   # from the repository root
#   scripts/gpu_dist_check.sh --skip-b          # parts: --skip-a --skip-b --skip-c
# Knobs (environment): BIN, LOG_DIR (build/gpu_dist_check), STEPS (10 timed
# steps), REPEAT (2), TOY_ARGS (more flags of toy_dreambooth.lua), COMMIT
# (for the table's head).  About 5 minutes.  For
# a dry run of the script on a CPU box: DEVICE=cpu PRECISION=f32
# CONFIGS=tests/fixtures/sd1-tiny/pipeline SIZE=64 CHECK_SIZE=64 (the
# NCCL-specific checks are then the TCP backend's).
set -u
LOG_DIR=${LOG_DIR:-build/gpu_dist_check}
STEPS=${STEPS:-10}
REPEAT=${REPEAT:-2}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16-mixed}
CONFIGS=${CONFIGS:-configs/sd-v1-4}
SIZE=${SIZE:-512}
CHECK_SIZE=${CHECK_SIZE:-256}
SKIP_A=0; SKIP_B=0; SKIP_C=0
for a in "$@"; do
    case $a in
        --skip-a) SKIP_A=1 ;; --skip-b) SKIP_B=1 ;; --skip-c) SKIP_C=1 ;;
        *) echo "gpu_dist_check.sh: unknown argument $a (expected --skip-a, --skip-b, --skip-c)" >&2; exit 2 ;;
    esac
done
. scripts/gpu_common.sh

echo "== $(machine)"
nvidia-smi -L 2>/dev/null

# ---- (a) collectives ----------------------------------------------------------------
if [ $SKIP_A = 0 ]; then
    if logged "(a) collectives, plain process, NCCL_NVLS_ENABLE unset" dist_plain.log \
            env -u NCCL_NVLS_ENABLE "$BIN" tests/gpu/check_dist.lua --device "$DEVICE"; then st=ok; else st=FAIL; fi
    row "(a) collectives f32/bf16/f16, world 1 (NCCL)" $st "$(summary dist_plain.log)"
    if [ "$DEVICE" != cuda ]; then
        row "(a) NCCL_NVLS_ENABLE=0 set by dist.init" skipped "not on cuda"
    elif grep -q 'NCCL_NVLS_ENABLE=0' "$LOG_DIR/dist_plain.log" && ! grep -q 'FAIL.*NCCL_NVLS' "$LOG_DIR/dist_plain.log"; then
        row "(a) NCCL_NVLS_ENABLE=0 set by dist.init" ok "the worker saw it"
    else
        row "(a) NCCL_NVLS_ENABLE=0 set by dist.init" FAIL "see dist_plain.log"
    fi
    port=$(free_port)
    if logged "(a) collectives, torchrun-style worker" dist_worker.log \
            env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" \
            "$BIN" tests/gpu/check_dist.lua --device "$DEVICE"; then st=ok; else st=FAIL; fi
    row "(a) collectives as a worker (RANK=0 WORLD_SIZE=1)" $st "$(summary dist_worker.log)"
fi

# ---- (b) the DDP step: correctness, then time -----------------------------------------
if [ $SKIP_B = 0 ]; then
    precs="f32 bf16-mixed"
    [ "$DEVICE" = cuda ] || precs=f32
    for prec in $precs; do
        if logged "(b) DDP step vs one process, $prec" "ddp_check_$prec.log" \
                "$BIN" tests/gpu/check_ddp_step.lua --precision "$prec" --size "$CHECK_SIZE" --batch 2 \
                --configs "$CONFIGS" --device "$DEVICE"; then st=ok; else st=FAIL; fi
        r=$(result "ddp_check_$prec.log")
        row "(b) DDP step vs one process ($prec, ${CHECK_SIZE}px)" $st \
            "grad rel L2 $(field "$r" grad_rel_l2 %.2e) (tol $(field "$r" tol %.0e))"
    done
    best_plain=-; best_ddp=-; best_bf16=-
    i=1
    while [ $i -le "$REPEAT" ]; do
        for mode in plain ddp ddp_bf16; do
            case $mode in
                plain) extra="" ;; ddp) extra="--ddp" ;; ddp_bf16) extra="--ddp --grad_dtype bf16" ;;
            esac
            # shellcheck disable=SC2086
            logged "(b) train step $mode, run $i" "step_${mode}_$i.log" \
                "$BIN" tests/bench/bench_train_step.lua --precision "$PRECISION" --steps "$STEPS" \
                --configs "$CONFIGS" --size "$SIZE" --device "$DEVICE" $extra
            ms=$(field "$(result "step_${mode}_$i.log")" step_ms_median %.2f)
            case $mode in
                plain) best_plain=$(smaller "$best_plain" "$ms") ;;
                ddp) best_ddp=$(smaller "$best_ddp" "$ms") ;;
                ddp_bf16) best_bf16=$(smaller "$best_bf16" "$ms") ;;
            esac
        done
        i=$((i + 1))
    done
    row "(b) SD 1.4 step, no DDP (ms, best median)" "$([ "$best_plain" = - ] && echo FAIL || echo ok)" "$best_plain"
    row "(b) SD 1.4 step, DDP+NCCL world 1 (ms)" "$([ "$best_ddp" = - ] && echo FAIL || echo ok)" "$best_ddp"
    r=$(ratio "$best_plain" "$best_ddp")
    row "(b) DDP / no DDP (target <= 1.03)" "$(at_most "$r" 1.03)" "$r"
    row "(b) SD 1.4 step, DDP bf16 buckets (ms)" info "$best_bf16"
fi

# ---- (c) the toy recipe as a world-size-1 worker -----------------------------------------
if [ $SKIP_C = 0 ]; then
    rm -rf "$LOG_DIR/toy"
    port=$(free_port)
    if logged "(c) toy recipe, RANK=0 WORLD_SIZE=1 on $DEVICE" toy.log \
            env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" \
            "$BIN" examples/toy_dreambooth.lua --device "$DEVICE" --output_dir "$LOG_DIR/toy" ${TOY_ARGS:-}; then st=ok; else st=FAIL; fi
    [ -f "$LOG_DIR/toy/before_after.png" ] || st=FAIL
    grep -q '^DDP: world size 1' "$LOG_DIR/toy.log" || st=FAIL
    before=$(awk '/^  base model / {print $NF}' "$LOG_DIR/toy.log" | tail -1)
    after=$(awk '/^  tuned model / {print $NF}' "$LOG_DIR/toy.log" | tail -1)
    row "(c) toy recipe through DDP+NCCL, world 1" "$st" "fidelity ${before:--} -> ${after:--} (lower is closer)"
fi

echo
echo "== gpu_dist_check: $(machine) (logs in $LOG_DIR)"
printf '%-50s %-8s %s\n' check status result
cat "$TABLE"
exit $FAILED
