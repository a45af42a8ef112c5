#!/bin/sh
# fetch_cudnn_frontend.sh — the header-only cuDNN frontend (C++ graph API)
# that kernels/cuda/attention_cudnn.cu builds its fused attention on.
#
# Downloads the `nvidia-cudnn-frontend` wheel from PyPI (a wheel is a zip),
# keeps only its include/ tree under .cache/cudnn-frontend/include and writes
# the version into .cache/cudnn-frontend/VERSION.  `make deps` runs it for
# CUDA builds; the Makefile compiles attention_cudnn.cu against the headers
# when they are there, and as a stub that always answers "unsupported"
# (moonlit's own attention kernels run) when they are not.
#
# Idempotent: nothing is fetched when the wanted version is already there.
# Offline-tolerant: if the download fails it says so in one line and exits 0,
# so the build goes on without the frontend.
#
#     scripts/fetch_cudnn_frontend.sh
#     CUDNN_FRONTEND_VERSION=1.32.0 scripts/fetch_cudnn_frontend.sh
#
# The version is pinned (the one the code was written and checked against);
# the headers are the same in every wheel of a release, so the wheel for one
# fixed Python and platform is asked for, whatever Python runs pip here.
set -u
cd "$(dirname "$0")/.." || exit 0
VERSION=${CUDNN_FRONTEND_VERSION:-1.32.0}
DEST=.cache/cudnn-frontend

if [ -f "$DEST/include/cudnn_frontend.h" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi

say() { echo "fetch_cudnn_frontend: $*"; }

PY=$(command -v python3 || true)
if [ -z "$PY" ]; then
    say "python3 not found; building without the cuDNN frontend (moonlit's own attention kernels only)"
    exit 0
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cudnn-frontend.XXXXXX") || exit 0
trap 'rm -rf "$TMP"' EXIT INT TERM

if ! "$PY" -m pip download --quiet --retries 1 --timeout 20 --no-deps --only-binary=:all: --dest "$TMP" \
        --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 \
        "nvidia-cudnn-frontend==$VERSION" > "$TMP/pip.log" 2>&1; then
    say "could not download nvidia-cudnn-frontend $VERSION ($(tail -n 1 "$TMP/pip.log" | cut -c1-120)); building without it (moonlit's own attention kernels only)"
    exit 0
fi

# Extract include/ only, into a fresh folder that replaces the old one
# whole, so an interrupted run never leaves a half-written tree behind.
if ! "$PY" - "$TMP" "$DEST" "$VERSION" <<'EOF'
import glob, os, shutil, sys, zipfile
tmp, dest, version = sys.argv[1:4]
wheels = glob.glob(os.path.join(tmp, "nvidia_cudnn_frontend-*.whl"))
if len(wheels) != 1:
    sys.exit("expected one wheel, found %d" % len(wheels))
# staged beside dest (same file system), then renamed into place
stage = dest + ".new"
shutil.rmtree(stage, ignore_errors=True)
n = 0
with zipfile.ZipFile(wheels[0]) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith("include/") or name.endswith("/"):
            continue
        parts = name.split("/")
        if ".." in parts or name.startswith("/"):
            sys.exit("unsafe path in wheel: " + name)
        out = os.path.join(stage, *parts)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1
if not os.path.isfile(os.path.join(stage, "include", "cudnn_frontend.h")):
    sys.exit("the wheel has no include/cudnn_frontend.h")
with open(os.path.join(stage, "VERSION"), "w") as f:
    f.write(version + "\n")
old = dest + ".old"
shutil.rmtree(old, ignore_errors=True)
if os.path.exists(dest):
    os.rename(dest, old)
os.rename(stage, dest)
shutil.rmtree(old, ignore_errors=True)
print("fetch_cudnn_frontend: cuDNN frontend %s headers (%d files) in %s" % (version, n, dest))
EOF
then
    say "could not unpack the nvidia-cudnn-frontend wheel; building without it (moonlit's own attention kernels only)"
    exit 0
fi
