#!/bin/sh
# gpu_recipe_bench.sh — the DreamBooth recipe end to end on one GPU, moonlit
# and the peer (diffusers' train_dreambooth.py) in the same run, phase by
# phase, on a full-size SD 1.4 folder with random weights and the dog photos
# of datasets/dreambooth/.
#
#   scripts/gpu_recipe_bench.sh            # on the GPU machine, from the repository root
#
# Needs build/moonlit (CUDA), the CLIP vocabulary in configs/sd-v1-4/tokenizer
# (scripts/fetch_clip_vocab.sh), and for the peer PEER_DIR holding
# train_dreambooth.py from the diffusers repository at the wheel's version
# plus that diffusers wheel (installed with --no-deps into WORK/pydeps).
# Knobs: STEPS (50), NCLASS (16 class images), BATCH (2: 2+2 images a step),
# SKIP_PEER=1.  Ends with a table: seconds per phase, moonlit, peer, ratio.
set -u
BIN=${BIN:-build/moonlit}
WORK=${WORK:-build/recipe_bench}
PEER_DIR=${PEER_DIR:-.cache/peer}
STEPS=${STEPS:-50}
NCLASS=${NCLASS:-16}
BATCH=${BATCH:-2}
export NCCL_NVLS_ENABLE=0
[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$WORK"
now() { date +%s.%N; }
since() { echo "$(now) $1" | awk '{printf "%.1f", $1 - $2}'; }

MODEL=$WORK/sd14
if [ ! -f "$MODEL/model_index.json" ]; then
    t=$(now)
    "$BIN" scripts/make_random_model.lua configs/sd-v1-4 "$MODEL" || exit 1
    echo "random SD 1.4 folder: $(since "$t") s"
fi

echo "== moonlit: class images + training ($STEPS steps, $BATCH+$BATCH at 512x512, bf16-mixed)"
rm -rf "$WORK/ml-out" "$WORK/ml-class" "$WORK/ml-new"
t=$(now)
"$BIN" examples/dreambooth.lua --model_dir "$MODEL" --output_dir "$WORK/ml-out" \
    --instance_images_dir datasets/dreambooth/dog --instance_prompt "photo of unqtkn dog" \
    --class_images_dir "$WORK/ml-class" --class_prompt "photo of a dog" --num_class_images "$NCLASS" \
    --train_batch_size "$BATCH" --max_train_steps "$STEPS" --num_epochs 1000 --checkpointing_steps 0 \
    --device cuda --precision bf16-mixed --resolution 512 2>&1 | tee "$WORK/ml-train.log"
ML_TOTAL=$(since "$t")
t=$(now)
"$BIN" examples/generate.lua --model_dir "$WORK/ml-out" --output_dir "$WORK/ml-new" \
    --prompts "photo of a unqtkn dog in a bucket" --num_samples_per_prompt 4 --batch_size 4 \
    --device cuda --precision bf16-mixed 2>&1 | tee "$WORK/ml-generate.log"
ML_GEN=$(since "$t")
ML_CLASS=$(awk '/^class images \(/ {print $NF}' "$WORK/ml-train.log")
ML_TRAIN=$(awk '/^training \(/ {print $NF}' "$WORK/ml-train.log")
ML_LOAD=$(awk '/^load / {print $NF}' "$WORK/ml-train.log")
ML_SAVE=$(awk '/^save / {print $NF}' "$WORK/ml-train.log")

PEER_CLASS=-; PEER_TRAIN=-; PEER_GEN=-
if [ "${SKIP_PEER:-0}" != 1 ]; then
    echo "== peer: diffusers train_dreambooth.py, same flags"
    python3 -m pip install --quiet --no-deps --target "$WORK/pydeps" "$PEER_DIR"/diffusers-*.whl >/dev/null 2>&1
    rm -rf "$WORK/peer-out" "$WORK/peer-class"
    PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" python3 tests/bench/peer/peer_dreambooth.py \
        --script "$PEER_DIR/train_dreambooth.py" --model_dir "$MODEL" --instance_dir datasets/dreambooth/dog \
        --class_dir "$WORK/peer-class" --output_dir "$WORK/peer-out" --num_class_images "$NCLASS" \
        --max_train_steps "$STEPS" --train_batch_size "$BATCH" 2>&1 | tee "$WORK/peer.log"
    line=$(grep '^{' "$WORK/peer.log" | tail -1)
    PEER_CLASS=$(echo "$line" | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["class_images_s"])' 2>/dev/null || echo -)
    PEER_TRAIN=$(echo "$line" | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["training_s"])' 2>/dev/null || echo -)
    PEER_GEN=$(echo "$line" | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["generation_s"])' 2>/dev/null || echo -)
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", b / a; else print "-" }'; }
ML_TRAIN_ALL=$(awk -v a="$ML_LOAD" -v b="$ML_TRAIN" -v c="$ML_SAVE" 'BEGIN {printf "%.1f", a + b + c}')
echo
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
echo "phase (seconds)                       moonlit     peer   peer/moonlit"
printf "%-36s %8s %8s %10s\n" "class images ($NCLASS, 50 steps)" "$ML_CLASS" "$PEER_CLASS" "$(ratio "$ML_CLASS" "$PEER_CLASS")"
printf "%-36s %8s %8s %10s\n" "training $STEPS steps (load+train+save)" "$ML_TRAIN_ALL" "$PEER_TRAIN" "$(ratio "$ML_TRAIN_ALL" "$PEER_TRAIN")"
printf "%-36s %8s %8s %10s\n" "generation (4 images, load incl.)" "$ML_GEN" "$PEER_GEN" "$(ratio "$ML_GEN" "$PEER_GEN")"
grep -E "^data wait|img/s|done:" "$WORK/ml-train.log" | tail -3
echo "moonlit recipe total (incl. load): $ML_TOTAL s"
