#!/bin/sh
# bench_conv_vs_peer.sh — SD 1.4's training-step convolutions, moonlit and
# the peer (PyTorch, bf16, channels_last) back to back in one call on one
# GPU, ending with one table joined by shape: the time per step (pass time x
# calls per step) of moonlit under each cuDNN API (MOONLIT_CONV_API: graph,
# legacy) and MOONLIT_CONV_ALGO rule, with the host time per step of each,
# and of the
# peer with torch.backends.cudnn.benchmark off (its training step's setting)
# and on, with the ratios moonlit/peer (below 1: moonlit is faster), then
# the pass-by-pass milliseconds.
#
#   scripts/bench_conv_vs_peer.sh            # on the GPU machine, repository root
#   DEVICE=cpu QUICK=1 scripts/bench_conv_vs_peer.sh    # tiny sizes on a CPU: checks the scripts
#
# Runs tests/gpu/bench_conv.lua once per API and rule (both are read once
# per process) and tests/bench/peer/peer_conv.py once for both peer
# settings; logs and RESULT lines in LOG_DIR (build/bench_conv).  Knobs: BIN
# (else build/moonlit, build-gpu/moonlit or build-gpu/moonlit.xz), PYTHON
# (python3, with torch), APIS ("graph legacy"), ALGOS ("measure fastest
# heuristic"), ARGS (more flags for both benches: --iters N --reps N
# --all-passes), ML_ARGS (flags for moonlit's bench only: --bias,
# --host_calls N), SKIP_PEER=1.  The ratios are those of the first API and
# rule.
set -u
LOG_DIR=${LOG_DIR:-build/bench_conv}
PYTHON=${PYTHON:-python3}
ALGOS=${ALGOS:-"measure fastest heuristic"}
APIS=${APIS:-"graph legacy"}
ML_ARGS=${ML_ARGS:-}
DEVICE=${DEVICE:-cuda}
ARGS=${ARGS:-}
QUICK_FLAG=
[ "${QUICK:-0}" = 1 ] && QUICK_FLAG=--quick

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
export NCCL_NVLS_ENABLE=0
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/ml-*.log "$LOG_DIR"/peer.log
FAILED=0

# The shapes, written once in bench_conv.lua, for the peer.
if ! "$BIN" tests/gpu/bench_conv.lua --list_shapes $QUICK_FLAG > "$LOG_DIR/shapes.json"; then
    echo "$0: bench_conv.lua --list_shapes failed" >&2
    exit 1
fi

# A bad MOONLIT_CONV_ALGO must be an error naming the variable and the
# valid values, raised to Lua (not an abort); cuDNN's only, so on the GPU.
# Likewise a bad MOONLIT_CONV_API.
KNOB=-
API_KNOB=-
CONV_PROBE='
        local ml = require "moonlit"
        local x = ml.randn({1, 4, 4, 2}, {device = "cuda"})
        local w = ml.randn({3, 1, 1, 2}, {device = "cuda"})
        local ok, err = pcall(ml.F.conv2d, x, w, nil, {})
        print(ok and "no error" or tostring(err))'
if [ "$DEVICE" != cpu ]; then
    knob_out=$(MOONLIT_CONV_ALGO=bogus "$BIN" -e "$CONV_PROBE" 2>&1)
    case $knob_out in
        *"MOONLIT_CONV_ALGO=bogus"*"measure, fastest or heuristic"*) KNOB=ok ;;
        *) KNOB="FAIL ($knob_out)"; FAILED=1 ;;
    esac
    knob_out=$(MOONLIT_CONV_API=bogus "$BIN" -e "$CONV_PROBE" 2>&1)
    case $knob_out in
        *"MOONLIT_CONV_API=bogus"*"graph or legacy"*) API_KNOB=ok ;;
        *) API_KNOB="FAIL ($knob_out)"; FAILED=1 ;;
    esac
fi

COLS=
for api in $APIS; do
    for algo in $ALGOS; do
        COLS="$COLS $api:$algo"
        echo
        echo "== moonlit, MOONLIT_CONV_API=$api MOONLIT_CONV_ALGO=$algo"
        # shellcheck disable=SC2086 # ARGS and ML_ARGS are lists of flags
        MOONLIT_CONV_API=$api MOONLIT_CONV_ALGO=$algo "$BIN" tests/gpu/bench_conv.lua --device "$DEVICE" \
            $QUICK_FLAG $ARGS $ML_ARGS > "$LOG_DIR/ml-$api-$algo.log" 2>&1 || FAILED=1
        grep -v '^RESULT ' "$LOG_DIR/ml-$api-$algo.log"
    done
done

if [ "${SKIP_PEER:-0}" != 1 ]; then
    echo
    echo "== peer (PyTorch, cudnn.benchmark off and on)"
    # shellcheck disable=SC2086
    "$PYTHON" tests/bench/peer/peer_conv.py --shapes "@$LOG_DIR/shapes.json" --device "$DEVICE" --benchmark both \
        $ARGS > "$LOG_DIR/peer.log" 2>&1 || FAILED=1
    grep -v '^RESULT ' "$LOG_DIR/peer.log"
fi

echo
echo "== convolutions per step, moonlit vs peer, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)," \
     "$(date -u +%Y-%m-%d), moonlit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
# shellcheck disable=SC2086 # one argument per API:rule
python3 - "$LOG_DIR" $COLS <<'EOF'
import glob, json, os, sys

log_dir, algos = sys.argv[1], sys.argv[2:]
rows = {}      # (side, algo) -> name -> RESULT
order = []     # shape names in the order of the list
for path in sorted(glob.glob(os.path.join(log_dir, "ml-*.log"))) + [os.path.join(log_dir, "peer.log")]:
    if not os.path.exists(path):
        continue
    for line in open(path, errors="replace"):
        if not line.startswith("RESULT "):
            continue
        try:
            r = json.loads(line[7:])
        except ValueError:
            continue
        # moonlit's rows by "api:rule" (rows of a bench without the api field ran the legacy API)
        key = r["algo"] if r["side"] != "moonlit" else "%s:%s" % (r.get("api", "legacy"), r["algo"])
        rows.setdefault((r["side"], key), {})[r["name"]] = r
        if r["side"] == "moonlit" and r["name"] not in order:
            order.append(r["name"])
with open(os.path.join(log_dir, "shapes.json")) as f:
    for s in json.load(f):
        if s["name"] not in order:
            order.append(s["name"])

cols = [("moonlit", a) for a in algos] + [("peer", "cudnn.benchmark=False"), ("peer", "cudnn.benchmark=True")]
label = {c: (c[1] if c[0] == "moonlit" else "peer " + ("bench" if c[1].endswith("True") else "heur")) for c in cols}
base = ("moonlit", algos[0]) if algos else None
peer_off, peer_on = cols[-2], cols[-1]


def get(col, name, key):
    r = rows.get(col, {}).get(name)
    return None if r is None or "error" in r else r.get(key)


def num(v, width, prec=3):
    return ("%*.*f" % (width, prec, v)) if v is not None else "%*s" % (width, "-")


def ratio(a, b):
    return a / b if a is not None and b else None


def gemm_step(col, name):
    """The step's time of a 1x1 shape had its passes been the GEMMs bench_conv.lua timed."""
    r = rows.get(col, {}).get(name)
    if r is None or r.get("gemm_fwd_ms") is None:
        return None
    return sum((r.get("gemm_%s_ms" % p) or 0) * r["count_" + p] for p in ("fwd", "dgrad", "wgrad"))


counts = {}
for name in order:
    for col in cols:
        r = rows.get(col, {}).get(name)
        if r:
            counts[name] = "%d/%d/%d" % (r["count_fwd"], r["count_dgrad"], r["count_wgrad"])
            break

print("time per step (ms, pass time x calls): moonlit per MOONLIT_CONV_API:MOONLIT_CONV_ALGO, the peer with cuDNN's heuristic "
      "(benchmark off, as its step runs) and measured (benchmark on); ratios are moonlit %s / peer" %
      (algos[0] if algos else "-"))
head = "%-40s %8s " % ("shape", "f/d/w") + " ".join("%15s" % label[c] for c in cols) + \
       " %10s %8s %8s" % ("as GEMM", "/heur", "/bench")
print(head)
totals = {c: 0.0 for c in cols}
missing = {c: False for c in cols}
for name in order:
    vals = [get(c, name, "step_ms") for c in cols]
    for c, v in zip(cols, vals):
        if v is None:
            missing[c] = True
        else:
            totals[c] += v
    b = get(base, name, "step_ms") if base else None
    print("%-40s %8s " % (name, counts.get(name, "-")) + " ".join(num(v, 15) for v in vals) +
          " %s %s %s" % (num(gemm_step(base, name), 10), num(ratio(b, get(peer_off, name, "step_ms")), 8, 2),
                         num(ratio(b, get(peer_on, name, "step_ms")), 8, 2)))
tot = [None if missing[c] else totals[c] for c in cols]
b = tot[0] if algos else None
print("%-40s %8s " % ("total", "") + " ".join(num(v, 15) for v in tot) + " %10s %s %s" %
      ("", num(ratio(b, tot[-2]), 8, 2), num(ratio(b, tot[-1]), 8, 2)))
print("(a column's total is '-' when one of its shapes is missing; as GEMM: 1x1 shapes through F.linear, %s)" %
      (algos[0] if algos else "-"))


def host_step(col):
    """Host time (ms) of the step's calls: host us per call x calls, over the shapes; None if not measured."""
    total, seen = 0.0, False
    for r in rows.get(col, {}).values():
        for p in ("fwd", "dgrad", "wgrad"):
            h = r.get(p + "_host_us")
            if h is not None:
                total += h * r["count_" + p] / 1e3
                seen = True
    return total if seen else None


print()
print("host time per step (ms; calls issued without synchronising): " +
      ", ".join("%s %s" % (label[c], num(host_step(c), 0)) for c in cols if c[0] == "moonlit"))

print()
print("per pass (ms per call): moonlit %s | peer benchmark off | peer benchmark on" % (algos[0] if algos else "-"))
print("%-40s " % "shape" + " | ".join("%8s %8s %8s" % ("fwd", "dgrad", "wgrad") for _ in range(3)))
for name in order:
    parts = []
    for col in (base, peer_off, peer_on):
        parts.append(" ".join(num(get(col, name, p + "_ms"), 8, 4) for p in ("fwd", "dgrad", "wgrad")))
    print("%-40s " % name + " | ".join(parts))
for col in cols:
    for name, r in sorted(rows.get(col, {}).items()):
        if "error" in r:
            print("%s %s: %s: %s" % (col[0], col[1], name, r["error"]))
EOF
echo
echo "MOONLIT_CONV_ALGO=bogus is a Lua error naming the variable and the values: $KNOB"
echo "MOONLIT_CONV_API=bogus is a Lua error naming the variable and the values: $API_KNOB"
exit $FAILED
