#!/bin/sh
# gpu_scaling.sh — data-parallel runs on every GPU of the machine (1, 2, 4,
# 8: what `nvidia-smi -L` shows), beside PyTorch DDP, for the GPU machine.
# Runs with one GPU too (then only world size 1 is measured).
#   correctness  tests/gpu/check_dist.lua and tests/gpu/check_ddp_step.lua on
#                all GPUs: collectives checked on every rank, the averaged
#                gradients of the SD 1.4 step (bf16-mixed, 256x256, 2 images
#                per GPU) equal to one GPU on the concatenated batch within
#                5e-2 relative L2, weights bit-identical on every rank after
#                one SGD step; each worker's NCCL_NVLS_ENABLE in the log;
#   scaling      tests/bench/bench_train_step.lua --num_workers N for each N:
#                full-size SD 1.4 step, bf16-mixed, 2+2 images per GPU at
#                512x512; ms/step, images/s, efficiency = images/s on N /
#                (N x images/s on 1 GPU without DDP); target >= 0.95;
#   peer         tests/bench/peer/peer_ddp.py (PyTorch DDP, bf16) under
#                torchrun for each N, its efficiency beside ours (needs the
#                diffusers wheel in .cache/peer);
#   recipe       the seed's table: examples/dreambooth.lua on N workers
#                (class images, training with NCLASS class images, EPOCHS
#                epochs, local batch 2) then examples/generate.lua on N
#                workers (NGEN images), on a random-weight full-size SD 1.4
#                folder made here; seconds per phase for each N.
# Ends with one table, then markdown rows (card, GPU count, date, commit)
# ready for a results table.
#
#   scripts/gpu_scaling.sh                           # everything (needs more than 10 minutes on 4 GPUs)
#   scripts/gpu_scaling.sh --skip-recipe             # parts: --skip-correctness --skip-scaling --skip-peer --skip-recipe
#   scripts/gpu_scaling.sh --only-recipe --workers "1 4"   # --only-<part>; --workers: the Ns to run
# Knobs (environment): BIN, LOG_DIR (build/gpu_scaling), STEPS (10 timed
# steps), NCLASS (200), EPOCHS (4), NGEN (16), CLASS_STEPS (50 denoising
# steps of class images), PEER_DIR (.cache/peer), COMMIT.  For a dry run
# of the script on a CPU box: DEVICE=cpu NGPU=2 PRECISION=f32
# CONFIGS=tests/fixtures/sd1-tiny/pipeline SIZE=64 CHECK_SIZE=64 RESOLUTION=64
# (and small NCLASS, CLASS_STEPS, NGEN).
# Rough times on H200s: correctness 2 min, scaling 1 min per N, peer 1 min
# per N, recipe 6 min on 1 GPU (and less on more); split the parts over
# calls to stay under 10 minutes each.
set -u
LOG_DIR=${LOG_DIR:-build/gpu_scaling}
STEPS=${STEPS:-10}
NCLASS=${NCLASS:-200}
EPOCHS=${EPOCHS:-4}
NGEN=${NGEN:-16}
CLASS_STEPS=${CLASS_STEPS:-50}
PEER_DIR=${PEER_DIR:-.cache/peer}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16-mixed}
CONFIGS=${CONFIGS:-configs/sd-v1-4}
SIZE=${SIZE:-512}
CHECK_SIZE=${CHECK_SIZE:-256}
RESOLUTION=${RESOLUTION:-512}
DO_CORRECT=1; DO_SCALING=1; DO_PEER=1; DO_RECIPE=1; WORKERS=""
while [ $# -gt 0 ]; do
    case $1 in
        --skip-correctness) DO_CORRECT=0 ;; --skip-scaling) DO_SCALING=0 ;;
        --skip-peer) DO_PEER=0 ;; --skip-recipe) DO_RECIPE=0 ;;
        --only-correctness) DO_CORRECT=1; DO_SCALING=0; DO_PEER=0; DO_RECIPE=0 ;;
        --only-scaling) DO_CORRECT=0; DO_SCALING=1; DO_PEER=0; DO_RECIPE=0 ;;
        --only-peer) DO_CORRECT=0; DO_SCALING=0; DO_PEER=1; DO_RECIPE=0 ;;
        --only-recipe) DO_CORRECT=0; DO_SCALING=0; DO_PEER=0; DO_RECIPE=1 ;;
        --workers) shift; WORKERS=${1:-} ;;
        *) echo "gpu_scaling.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
    shift
done
. scripts/gpu_common.sh

NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
[ "$NGPU" -ge 1 ] || { echo "gpu_scaling.sh: no GPU (nvidia-smi -L lists none)" >&2; exit 2; }
if [ -z "$WORKERS" ]; then
    for n in 1 2 4 8; do [ "$n" -le "$NGPU" ] && WORKERS="$WORKERS $n"; done
fi
for n in $WORKERS; do
    [ "$n" -le "$NGPU" ] || { echo "gpu_scaling.sh: --workers $n but only $NGPU GPU(s)" >&2; exit 2; }
done
echo "== $(machine); world sizes:$WORKERS"
nvidia-smi -L 2>/dev/null
WORK=$LOG_DIR/work
mkdir -p "$WORK"
MAXN=$(echo "$WORKERS" | awk '{print $NF}')

# ---- correctness on the most GPUs -----------------------------------------------------------
if [ $DO_CORRECT = 1 ]; then
    if logged "collectives on $MAXN GPU(s)" dist.log "$BIN" tests/gpu/check_dist.lua --num_workers "$MAXN" --device "$DEVICE"; then st=ok; else st=FAIL; fi
    row "collectives f32/bf16/f16 on $MAXN GPU(s)" $st "$(summary dist.log)"
    nvls=$(grep -c 'NCCL_NVLS_ENABLE=0' "$LOG_DIR/dist.log")
    row "NCCL_NVLS_ENABLE=0 in each worker's log" "$([ "$nvls" -ge "$MAXN" ] && echo ok || echo FAIL)" "$nvls of $MAXN ranks"
    bw=$(awk '/^rank 0: all_reduce of/ {print $(NF-1)}' "$LOG_DIR/dist.log")
    row "all_reduce 256 MiB f32, bus bandwidth (GiB/s)" info "${bw:--}"
    for gd in f32 bf16; do
        if logged "DDP step vs one GPU, $MAXN GPU(s), $gd buckets" "ddp_check_$gd.log" \
                "$BIN" tests/gpu/check_ddp_step.lua --num_workers "$MAXN" --precision "$PRECISION" --size "$CHECK_SIZE" \
                --batch 2 --grad_dtype "$gd" --configs "$CONFIGS" --device "$DEVICE"; then st=ok; else st=FAIL; fi
        r=$(result "ddp_check_$gd.log")
        row "DDP step vs 1 GPU on the whole batch ($gd buckets)" $st \
            "grad rel L2 $(field "$r" grad_rel_l2 %.2e) (tol $(field "$r" tol %.2e)); ranks differ by $(field "$r" cross_rank_max_diff %.1e)"
    done
fi

# ---- scaling of the training step ------------------------------------------------------------
# images/s of one GPU without DDP: the base of every efficiency
BASE_IPS=-
if [ $DO_SCALING = 1 ]; then
    logged "train step, 1 GPU, no DDP" step_plain.log \
        "$BIN" tests/bench/bench_train_step.lua --precision "$PRECISION" --batch 2 --steps "$STEPS" \
        --configs "$CONFIGS" --size "$SIZE" --device "$DEVICE"
    r=$(result step_plain.log)
    BASE_IPS=$(field "$r" images_per_s %.3f)
    row "moonlit step, 1 GPU, no DDP" "$([ "$BASE_IPS" = - ] && echo FAIL || echo ok)" \
        "$(field "$r" step_ms_median %.1f) ms, $BASE_IPS img/s"
    for n in $WORKERS; do
        extra=""
        [ "$n" = 1 ] && extra="--ddp"
        # shellcheck disable=SC2086
        logged "train step, $n GPU(s), DDP" "step_$n.log" \
            "$BIN" tests/bench/bench_train_step.lua --precision "$PRECISION" --batch 2 --steps "$STEPS" --num_workers "$n" \
            --configs "$CONFIGS" --size "$SIZE" --device "$DEVICE" $extra
        r=$(result "step_$n.log")
        ips=$(field "$r" images_per_s %.3f)
        ms=$(field "$r" step_ms_median %.1f)
        eff=$(efficiency "$ips" "$BASE_IPS" "$n")
        st=$(at_least "$eff" 0.95)
        [ "$ips" = - ] && st=FAIL
        row "moonlit step, $n GPU(s), DDP (target eff >= 0.95)" "$st" "$ms ms, $ips img/s, efficiency $eff"
        eval "ML_IPS_$n=$ips ML_MS_$n=$ms ML_EFF_$n=$eff"
    done
fi

# ---- the peer: PyTorch DDP ---------------------------------------------------------------------
if [ $DO_PEER = 1 ]; then
    if ls "$PEER_DIR"/diffusers-*.whl >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-deps --target "$WORK/pydeps" "$PEER_DIR"/diffusers-*.whl >/dev/null 2>&1
        PEER_BASE=-
        for n in $WORKERS; do
            logged "peer: PyTorch DDP on $n GPU(s)" "peer_$n.log" \
                env PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" \
                torchrun --standalone --nproc_per_node "$n" tests/bench/peer/peer_ddp.py
            r=$(result "peer_$n.log")
            ips=$(field "$r" images_per_s %.3f)
            ms=$(field "$r" step_ms_median %.1f)
            [ "$n" = 1 ] && PEER_BASE=$ips
            eff=$(efficiency "$ips" "$PEER_BASE" "$n")
            row "peer (PyTorch DDP, bf16), $n GPU(s)" "$([ "$ips" = - ] && echo FAIL || echo ok)" \
                "$ms ms, $ips img/s, efficiency $eff"
            eval "PEER_IPS_$n=$ips PEER_MS_$n=$ms PEER_EFF_$n=$eff"
        done
    else
        row "peer (PyTorch DDP)" skipped "no diffusers wheel in $PEER_DIR"
    fi
fi

# ---- the seed's whole-recipe table -------------------------------------------------------------
if [ $DO_RECIPE = 1 ]; then
    MODEL=$WORK/sd14
    if [ ! -f "$MODEL/model_index.json" ]; then
        logged "random-weight model folder from $CONFIGS" make_model.log "$BIN" scripts/make_random_model.lua "$CONFIGS" "$MODEL" ||
            row "random SD 1.4 folder" FAIL "see make_model.log"
    fi
    for n in $WORKERS; do
        out=$WORK/recipe-$n
        rm -rf "$out" "$WORK/class-$n" "$WORK/gen-$n"
        t0=$(date +%s.%N)
        if logged "recipe on $n worker(s)" "recipe_$n.log" \
                "$BIN" examples/dreambooth.lua --num_workers "$n" --model_dir "$MODEL" --output_dir "$out" \
                --instance_images_dir datasets/dreambooth/dog --instance_prompt "photo of unqtkn dog" \
                --class_images_dir "$WORK/class-$n" --class_prompt "photo of a dog" --num_class_images "$NCLASS" \
                --num_inference_steps "$CLASS_STEPS" --train_batch_size 2 --num_epochs "$EPOCHS" \
                --max_train_steps 1000000 --checkpointing_steps 0 --resolution "$RESOLUTION" --device "$DEVICE" \
                --precision "$PRECISION"; then st=ok; else st=FAIL; fi
        t1=$(date +%s.%N)
        if logged "generation on $n worker(s)" "generate_$n.log" \
                "$BIN" examples/generate.lua --num_workers "$n" --model_dir "$out" --output_dir "$WORK/gen-$n" \
                --prompt "photo of unqtkn dog in a bucket" --num_samples_per_prompt "$NGEN" --batch_size 4 \
                --steps "$CLASS_STEPS" --height "$RESOLUTION" --width "$RESOLUTION" --device "$DEVICE" \
                --precision "$PRECISION"; then :; else st=FAIL; fi
        t2=$(date +%s.%N)
        log=$LOG_DIR/recipe_$n.log
        load=$(awk '/^load / {print $NF}' "$log"); cls=$(awk '/^class images \(/ {print $NF}' "$log")
        trn=$(awk '/^training \(/ {print $NF}' "$log"); save=$(awk '/^save / {print $NF}' "$log")
        steps=$(sed -n 's/^training (\([0-9]*\) steps).*/\1/p' "$log")
        gen=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
        total=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
        row "recipe, $n worker(s): load/class/train/save/generate (s)" "$st" \
            "${load:--} / ${cls:--} / ${trn:--} (${steps:--} steps) / ${save:--} / $gen; total $total"
        eval "R_LOAD_$n=${load:--} R_CLASS_$n=${cls:--} R_TRAIN_$n=${trn:--} R_SAVE_$n=${save:--} R_GEN_$n=$gen R_TOTAL_$n=$total R_STEPS_$n=${steps:--}"
    done
fi

echo
echo "== gpu_scaling: $(machine) (logs in $LOG_DIR)"
printf '%-50s %-8s %s\n' check status result
cat "$TABLE"

# markdown rows for a results table
echo
echo "| card, GPUs, date, commit | N | moonlit ms/step | moonlit img/s | efficiency | peer img/s | peer efficiency |"
echo "|---|---|---|---|---|---|---|"
for n in $WORKERS; do
    eval "a=\${ML_MS_$n:--} b=\${ML_IPS_$n:--} c=\${ML_EFF_$n:--} d=\${PEER_IPS_$n:--} e=\${PEER_EFF_$n:--}"
    echo "| $(machine) | $n | $a | $b | $c | $d | $e |"
done
if [ $DO_RECIPE = 1 ]; then
    echo
    echo "| workers | load s | class images ($NCLASS) s | training ($EPOCHS epochs, batch 2) s | save s | generation ($NGEN) s | total s |"
    echo "|---|---|---|---|---|---|---|"
    for n in $WORKERS; do
        eval "echo \"| \$n | \$R_LOAD_$n | \$R_CLASS_$n | \$R_TRAIN_$n (\$R_STEPS_$n steps) | \$R_SAVE_$n | \$R_GEN_$n | \$R_TOTAL_$n |\""
    done
fi
exit $FAILED
