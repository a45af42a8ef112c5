# gpu_common.sh — sourced by scripts/gpu_dist_check.sh and scripts/gpu_scaling.sh
# (not run on its own).  Sets BIN (build/moonlit, else build-gpu/moonlit,
# unpacked from build-gpu/moonlit.xz when that is what was sent), the CUDA
# library path, NCCL_NVLS_ENABLE=0 for every process, the CLIP vocabulary
# (offline, from the wheel in .cache/clip-vocab), LOG_DIR, and the helpers
# of the table each script prints last.

if [ -z "${BIN:-}" ]; then
    if [ -x build/moonlit ]; then
        BIN=build/moonlit
    elif [ -x build-gpu/moonlit ]; then
        BIN=build-gpu/moonlit
    elif [ -f build-gpu/moonlit.xz ]; then
        xz -dkf build-gpu/moonlit.xz && chmod +x build-gpu/moonlit && BIN=build-gpu/moonlit
    fi
fi
if [ -z "${BIN:-}" ] || [ ! -x "$BIN" ]; then
    echo "$0: no moonlit binary: build/moonlit, build-gpu/moonlit or build-gpu/moonlit.xz (or set BIN)" >&2
    exit 2
fi

[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVLink multicast off in every process, ours and the peer's (it can take a
# shared host's GPUs out of service); our launcher sets it in each worker
# too, and dist.init when it is unset (tests/lua/test_launcher.lua checks
# the launcher; gpu_dist_check.sh checks dist.init on one GPU).
export NCCL_NVLS_ENABLE=0

mkdir -p "$LOG_DIR"
if ! scripts/fetch_clip_vocab.sh > "$LOG_DIR/clip_vocab.log" 2>&1; then
    echo "note: the CLIP vocabulary is missing (scripts/fetch_clip_vocab.sh failed, see $LOG_DIR/clip_vocab.log);" \
         "steps that tokenize prompts will fail" >&2
fi

TABLE=$LOG_DIR/table.txt
: > "$TABLE"
FAILED=0

# row WHAT STATUS DETAIL: one line of the final table (a STATUS of FAIL... fails the script)
row() {
    printf '%-50s %-8s %s\n' "$1" "$2" "$3" >> "$TABLE"
    case $2 in FAIL*) FAILED=1 ;; esac
}

# logged NAME LOG COMMAND...: run, keep the output in LOG_DIR/LOG and show it; returns the status
logged() {
    _name=$1; _log=$2; shift 2
    echo
    echo "== $_name: $*"
    "$@" > "$LOG_DIR/$_log" 2>&1
    _rc=$?
    cat "$LOG_DIR/$_log"
    return $_rc
}

# result LOG: the JSON after the last "RESULT " line of a log (empty if none)
result() { grep '^RESULT ' "$LOG_DIR/$1" 2>/dev/null | tail -1 | cut -c8-; }

# field JSON KEY [FORMAT]: one value of a RESULT line ("-" when missing)
field() {
    python3 -c '
import json, sys
try:
    v = json.loads(sys.argv[1]).get(sys.argv[2])
except Exception:
    v = None
fmt = sys.argv[3] if len(sys.argv) > 3 else "%s"
print("-" if v is None else (fmt % v))' "$1" "$2" "${3:-%s}"
}

# summary LOG: the last "N passed, N failed" line of a log
summary() { grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOG_DIR/$1" | tail -1; }

# smaller A B: the smaller of two numbers, "-" (missing) losing to any number
smaller() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == "-") print a; else if (a == "-" || b + 0 < a + 0) print b; else print a }'; }

# ratio A B: B / A to 3 decimals, "-" when either is missing
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a + 0 == 0) print "-"; else printf "%.3f", b / a }'; }

# at_most X LIMIT: ok when X <= LIMIT, else FAIL (also when X is missing)
at_most() { awk -v x="$1" -v l="$2" 'BEGIN { print (x != "-" && x + 0 <= l + 0) ? "ok" : "FAIL" }'; }

# efficiency IPS BASE N: IPS / (N x BASE) to 3 decimals, "-" when one is missing
efficiency() { awk -v i="$1" -v b="$2" -v n="$3" 'BEGIN { if (i == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.3f", i / (n * b) }'; }

# at_least X LIMIT: ok when X >= LIMIT, else FAIL
at_least() { awk -v x="$1" -v l="$2" 'BEGIN { print (x != "-" && x + 0 >= l + 0) ? "ok" : "FAIL" }'; }

# free_port: a TCP port free right now
free_port() { "$BIN" -e 'print(require("moonlit").dist.free_port())'; }

# machine: the card, the GPU count, the date and the commit, for the table's head
machine() {
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
    echo "${card:-no GPU}, $ngpu GPU(s), $(date -u +%Y-%m-%d), commit $commit"
}
