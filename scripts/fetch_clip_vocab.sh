#!/bin/sh
# fetch_clip_vocab.sh — put CLIP's tokenizer files (vocab.json, merges.txt,
# tokenizer.json) into the tokenizer folders that need them.
#
# The vocabulary is CLIP's public file and is not committed here.  It is
# rebuilt from the BPE merges list inside the open_clip_torch wheel on PyPI
# (downloaded once into .cache/clip-vocab/) by scripts/clip_vocab.py, which
# checks the result against the checksums of the files Hugging Face ships.
# Quick and silent when every file is already there.
set -e
cd "$(dirname "$0")/.."

OPEN_CLIP_VERSION=3.3.0
CACHE=.cache/clip-vocab
DIRS="tests/fixtures/sd1-tiny/pipeline/tokenizer tests/fixtures/sd2-tiny/pipeline/tokenizer configs/sd-v1-4/tokenizer models/toy-shapes/tokenizer"

missing=""
for d in $DIRS; do
    for f in vocab.json merges.txt tokenizer.json; do
        [ -s "$d/$f" ] || missing=yes
    done
done
[ -z "$missing" ] && exit 0

wheel=$(ls "$CACHE"/open_clip_torch-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
    echo "fetch_clip_vocab: downloading open_clip_torch==$OPEN_CLIP_VERSION (CLIP's BPE list) from PyPI"
    mkdir -p "$CACHE"
    if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
            -d "$CACHE" "open_clip_torch==$OPEN_CLIP_VERSION"; then
        echo "fetch_clip_vocab: pip download failed; put an open_clip_torch wheel in $CACHE/ and rerun" >&2
        exit 1
    fi
    wheel=$(ls "$CACHE"/open_clip_torch-*.whl | head -1)
fi
python3 scripts/clip_vocab.py --wheel "$wheel" $DIRS
echo "fetch_clip_vocab: wrote vocab.json, merges.txt, tokenizer.json into $DIRS"
