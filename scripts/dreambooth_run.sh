#!/usr/bin/env bash
# dreambooth_run.sh — the DreamBooth recipe end to end, in five steps:
#   1. download the base model at a pinned revision (scripts/download_model.sh)
#   2. copy the subject's photos
#   3. generate the class ("prior preservation") images with the base model
#   4. fine-tune (examples/dreambooth.lua)
#   5. generate new images of the subject with the tuned model
# Each step is announced and timed; a table of wall seconds per step ends the
# run. Every setting is an environment variable (defaults below); see
# docs/dreambooth_run.md.
set -eu

prog=dreambooth_run.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 1; }

# ---- settings (the reference recipe's names and defaults) ---------------------
DATA_PREFIX=${DATA_PREFIX:-./dreambooth-data}
ORIG_MODEL_NAME=${ORIG_MODEL_NAME:-CompVis/stable-diffusion-v1-4}
ORIG_MODEL_HASH=${ORIG_MODEL_HASH:-b95be7d6f134c3a9e62ee616f310733567f069ce}
ORIG_MODEL_DIR=${ORIG_MODEL_DIR:-$DATA_PREFIX/model-orig}
ORIG_MODEL_PATH=${ORIG_MODEL_PATH:-$ORIG_MODEL_DIR/models--${ORIG_MODEL_NAME//\//--}/snapshots/$ORIG_MODEL_HASH}
TUNED_MODEL_DIR=${TUNED_MODEL_DIR:-$DATA_PREFIX/model-tuned}
IMAGES_REG_DIR=${IMAGES_REG_DIR:-$DATA_PREFIX/images-reg}
IMAGES_OWN_DIR=${IMAGES_OWN_DIR:-$DATA_PREFIX/images-own}
IMAGES_NEW_DIR=${IMAGES_NEW_DIR:-$DATA_PREFIX/images-new}
# One worker by default until the multi-GPU path has run on GPUs (the
# reference's default is the number of GPUs); NUM_WORKERS=N starts N workers.
NUM_WORKERS=${NUM_WORKERS:-1}
CLASS_NAME=${CLASS_NAME:-dog}
INSTANCE_DIR=${INSTANCE_DIR:-$root/datasets/dreambooth/dog}
UNIQUE_TOKEN=${UNIQUE_TOKEN:-unqtkn}
# Knobs for small machines and tests.
NUM_CLASS_IMAGES=${NUM_CLASS_IMAGES:-200}
MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-200}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
EXTRA_GENERATE_ARGS=${EXTRA_GENERATE_ARGS:-}
SKIP_DOWNLOAD=${SKIP_DOWNLOAD:-0}

if [ -z "${MOONLIT:-}" ]; then
    MOONLIT=$root/build/moonlit
    if [ ! -x "$MOONLIT" ] && [ -x "$root/build-cpu/moonlit" ]; then MOONLIT=$root/build-cpu/moonlit; fi
fi
export MOONLIT   # download_model.sh parses the hub's JSON with it

for v in NUM_WORKERS NUM_CLASS_IMAGES MAX_TRAIN_STEPS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
[[ $SKIP_DOWNLOAD =~ ^[01]$ ]] || die "SKIP_DOWNLOAD must be 0 or 1, not '$SKIP_DOWNLOAD'"
# Extra arguments are split at white space (no quoting inside them).
read -r -a extra_train <<<"$EXTRA_TRAIN_ARGS"
read -r -a extra_generate <<<"$EXTRA_GENERATE_ARGS"

generate_lua=$root/examples/generate.lua
train_lua=$root/examples/dreambooth.lua

# Fail before the long steps, not an hour into them.
[ -x "$MOONLIT" ] || die "the moonlit binary ($MOONLIT) is missing: build it with make, or set MOONLIT"
for f in "$generate_lua" "$train_lua"; do
    [ -f "$f" ] || die "the recipe script $f is missing"
done
[ -d "$INSTANCE_DIR" ] || die "INSTANCE_DIR '$INSTANCE_DIR' (the subject's photos) is not a folder"

cat <<EOF
$prog: settings
  ORIG_MODEL_NAME=$ORIG_MODEL_NAME  ORIG_MODEL_HASH=$ORIG_MODEL_HASH
  ORIG_MODEL_PATH=$ORIG_MODEL_PATH
  INSTANCE_DIR=$INSTANCE_DIR  CLASS_NAME=$CLASS_NAME  UNIQUE_TOKEN=$UNIQUE_TOKEN
  IMAGES_OWN_DIR=$IMAGES_OWN_DIR  IMAGES_REG_DIR=$IMAGES_REG_DIR
  TUNED_MODEL_DIR=$TUNED_MODEL_DIR  IMAGES_NEW_DIR=$IMAGES_NEW_DIR
  NUM_WORKERS=$NUM_WORKERS  NUM_CLASS_IMAGES=$NUM_CLASS_IMAGES  MAX_TRAIN_STEPS=$MAX_TRAIN_STEPS
  MOONLIT=$MOONLIT
EOF

# ---- steps ------------------------------------------------------------------
now() { date +%s.%N; }
step_names=() step_seconds=()

print_times() {
    local i
    echo "$prog: wall seconds per step"
    for i in "${!step_names[@]}"; do
        printf '  %d  %-22s %10s\n' $((i + 1)) "${step_names[i]}" "${step_seconds[i]}"
    done
}

# run_step <name> <command...>: header, timing, and a stop naming the step.
run_step() {
    local name=$1 num=$((${#step_names[@]} + 1)) t0 rc=0
    shift
    printf '\n==== step %d/5: %s\n' "$num" "$name"
    t0=$(now)
    "$@" || rc=$?
    step_names+=("$name")
    step_seconds+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")
    if [ "$rc" -ne 0 ]; then
        print_times
        die "step $num ($name) failed (exit $rc)"
    fi
}

count_images() {  # folder -> number of PNG/JPEG files in it, the contact sheet aside
    find "$1" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) \
        ! -name contact_sheet.png 2>/dev/null | wc -l
}

# These run under `||` in run_step, where set -e does not apply: each
# command checks its own status.
download_model() {
    if [ -f "$ORIG_MODEL_PATH/model_index.json" ]; then
        echo "the model is present at $ORIG_MODEL_PATH; skipping the download"
    elif [ "$SKIP_DOWNLOAD" = 1 ]; then
        echo "SKIP_DOWNLOAD=1 but $ORIG_MODEL_PATH/model_index.json does not exist" >&2
        return 1
    else
        "$root/scripts/download_model.sh" "$ORIG_MODEL_NAME" "$ORIG_MODEL_HASH" "$ORIG_MODEL_DIR" || return 1
        [ -f "$ORIG_MODEL_PATH/model_index.json" ] || {
            echo "the download did not produce $ORIG_MODEL_PATH/model_index.json (ORIG_MODEL_PATH set elsewhere?)" >&2
            return 1
        }
    fi
}

copy_own_images() {
    local n
    n=$(count_images "$INSTANCE_DIR")
    [ "$n" -gt 0 ] || { echo "no PNG or JPEG images in INSTANCE_DIR '$INSTANCE_DIR'" >&2; return 1; }
    mkdir -p -- "$IMAGES_OWN_DIR" || return 1
    find "$INSTANCE_DIR" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) \
        -exec cp -f -- {} "$IMAGES_OWN_DIR/" \; || return 1
    echo "copied $n images from $INSTANCE_DIR to $IMAGES_OWN_DIR"
}

generate_class_images() {
    local have
    have=$(count_images "$IMAGES_REG_DIR")
    # A rerun after a failed training step need not redo the slowest part.
    if [ "$have" -ge "$NUM_CLASS_IMAGES" ]; then
        echo "$IMAGES_REG_DIR already holds $have images (>= NUM_CLASS_IMAGES=$NUM_CLASS_IMAGES); skipping" \
             "(delete the folder to generate them again)"
        return 0
    fi
    "$MOONLIT" "$generate_lua" --model_dir="$ORIG_MODEL_PATH" --output_dir="$IMAGES_REG_DIR" \
        --prompts="photo of a $CLASS_NAME" --num_samples_per_prompt="$NUM_CLASS_IMAGES" "${extra_generate[@]}" ||
        return 1
    # generate.lua also writes a contact sheet of its images; in the class
    # folder the training would take it for one more class image.
    if [ -f "$IMAGES_REG_DIR/contact_sheet.png" ]; then
        mv -f -- "$IMAGES_REG_DIR/contact_sheet.png" "${IMAGES_REG_DIR%/}-contact_sheet.png" || return 1
        echo "class images' contact sheet: ${IMAGES_REG_DIR%/}-contact_sheet.png"
    fi
}

# --num_class_images keeps the training script from generating more class
# images than step 3 made (it fills up a short class folder by itself).
train() {
    "$MOONLIT" "$train_lua" --model_dir="$ORIG_MODEL_PATH" --output_dir="$TUNED_MODEL_DIR" \
        --instance_images_dir="$IMAGES_OWN_DIR" --instance_prompt="photo of $UNIQUE_TOKEN $CLASS_NAME" \
        --class_images_dir="$IMAGES_REG_DIR" --class_prompt="photo of a $CLASS_NAME" \
        --train_batch_size=2 --lr=5e-6 --num_epochs=4 --max_train_steps="$MAX_TRAIN_STEPS" \
        --num_workers="$NUM_WORKERS" --num_class_images="$NUM_CLASS_IMAGES" "${extra_train[@]}"
}

generate_new_images() {
    "$MOONLIT" "$generate_lua" --model_dir="$TUNED_MODEL_DIR" --output_dir="$IMAGES_NEW_DIR" \
        --prompts="photo of a $UNIQUE_TOKEN $CLASS_NAME in a bucket" --num_samples_per_prompt=5 \
        "${extra_generate[@]}"
}

run_step "download model" download_model
run_step "copy subject images" copy_own_images
run_step "class images" generate_class_images
run_step "train" train
run_step "generate" generate_new_images

echo
print_times
echo "$prog: tuned model in $TUNED_MODEL_DIR, new images in $IMAGES_NEW_DIR"
