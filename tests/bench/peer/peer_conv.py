"""Peer for tests/gpu/bench_conv.lua: SD 1.4's training-step convolutions in PyTorch, pass by pass.

For each shape: the forward (torch.nn.functional.conv2d), backward data and backward filter
(torch.ops.aten.convolution_backward with one output of the mask each), on channels_last tensors in
bf16 (the peer's training step: diffusers under bf16, eager), with torch.backends.cudnn.benchmark off
(the setting of the peer's step) and on (cuDNN's algorithms measured per shape).  The asymmetric
padding of the VAE's downsamplers is F.pad + an unpadded conv, as diffusers does it: the forward
time includes the pad; the backward passes run on the padded input.

Times are the median over --iters rounds of the mean of --reps back-to-back calls (CUDA events,
or the wall clock on the CPU), after one warm-up call, as bench_conv.lua times moonlit.  Passes the
step does not run (count 0) are skipped unless --all-passes.  TFLOP/s: 2 N Ho Wo O C kh kw per pass.

Prints a table per setting, then one line per shape and setting
  RESULT {"side": "peer", "algo": "cudnn.benchmark=False", "name": ..., "fwd_ms": ..., "dgrad_ms": ...,
          "wgrad_ms": ..., "step_ms": ..., ...}     (or "error": "..." for a shape that failed)
that scripts/bench_conv_vs_peer.sh joins with moonlit's by name.

Usage: python3 tests/bench/peer/peer_conv.py [--shapes JSON|@FILE] [--benchmark off|on|both]
           [--device cuda|cpu] [--quick] [--iters 9] [--reps 5] [--all-passes] [--moonlit build/moonlit]
  Without --shapes, the list comes from `MOONLIT tests/gpu/bench_conv.lua --list_shapes [--quick]`, so
  the shapes are written once, in bench_conv.lua.  --quick: those tiny shapes, for checking the script
  on a CPU.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", help="JSON list of shapes, or @FILE holding one (bench_conv.lua --list_shapes)")
ap.add_argument("--benchmark", default="both", choices=["off", "on", "both"],
                help="torch.backends.cudnn.benchmark setting(s) to time")
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], help="bf16 on cuda, f32 on cpu")
ap.add_argument("--quick", action="store_true", help="bench_conv.lua's tiny shapes")
ap.add_argument("--iters", type=int, default=9)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--all-passes", action="store_true", help="also time the passes the step does not run")
ap.add_argument("--moonlit", default="build/moonlit", help="the binary that lists the shapes")
args = ap.parse_args()
if args.iters < 1 or args.reps < 1:
    ap.error("--iters and --reps must be >= 1")

on_gpu = args.device.startswith("cuda")
if on_gpu and not torch.cuda.is_available():
    sys.exit("peer_conv: no usable GPU for torch (--device cpu --quick checks the script)")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
dtype_name = args.dtype or ("bf16" if on_gpu else "f32")
dt = DTYPES[dtype_name]
dev = torch.device(args.device)


def load_shapes():
    if args.shapes:
        text = args.shapes
        if text.startswith("@"):
            with open(text[1:]) as f:
                text = f.read()
        return json.loads(text)
    cmd = [args.moonlit, "tests/gpu/bench_conv.lua", "--list_shapes"] + (["--quick"] if args.quick else [])
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"peer_conv: could not list the shapes with {' '.join(cmd)} ({e}); give --shapes")
    return json.loads(out)


def sync():
    if on_gpu:
        torch.cuda.synchronize(dev)


def elapsed_ms(fn):
    """Milliseconds fn() takes, its GPU work included."""
    if on_gpu:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_pass(fn):
    """The median over iters rounds of the mean of reps calls, after one warm-up call."""
    sync()
    elapsed_ms(fn)
    rounds = [elapsed_ms(lambda: [fn() for _ in range(args.reps)]) / args.reps for _ in range(args.iters)]
    return statistics.median(rounds)


def out_side(side, lo, hi, k, stride):
    return (side + lo + hi - k) // stride + 1


def measure(s):
    N, H, W, C, O, kh, kw, stride = s["N"], s["H"], s["W"], s["C"], s["O"], s["kh"], s["kw"], s["stride"]
    top, bottom, left, right = s["pad"]
    Ho, Wo = out_side(H, top, bottom, kh, stride), out_side(W, left, right, kw, stride)
    torch.manual_seed(1)
    cl = torch.channels_last
    x = torch.randn(N, C, H, W, device=dev, dtype=dt).to(memory_format=cl)
    w = (torch.randn(O, C, kh, kw, device=dev) / (C * kh * kw) ** 0.5).to(dt).to(memory_format=cl)
    g = torch.randn(N, O, Ho, Wo, device=dev, dtype=dt).to(memory_format=cl)
    symmetric = top == bottom and left == right
    # as diffusers runs an asymmetric padding: F.pad, then a conv that pads nothing
    pad = (top, left) if symmetric else (0, 0)
    xp = x if symmetric else F.pad(x, (left, right, top, bottom)).contiguous(memory_format=cl)
    count = s["count"]
    want = lambda p: args.all_passes or count[p] > 0
    r = {}
    with torch.no_grad():
        if want("fwd"):
            if symmetric:
                r["fwd"] = time_pass(lambda: F.conv2d(x, w, None, stride, pad))
            else:
                r["fwd"] = time_pass(lambda: F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, stride, 0))

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(g, xp, w, None, [stride, stride], list(pad), [1, 1],
                                                               False, [0, 0], 1, mask)

        if want("dgrad"):
            r["dgrad"] = time_pass(backward([True, False, False]))
        if want("wgrad"):
            r["wgrad"] = time_pass(backward([False, True, False]))
    del x, w, g, xp
    if on_gpu:
        torch.cuda.empty_cache()
    return r, 2 * N * Ho * Wo * O * C * kh * kw


def fmt(v, spec):
    """v formatted by spec, or "-" as wide when v is missing."""
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


shapes = load_shapes()
device_name = torch.cuda.get_device_name(dev) if on_gpu else "cpu"
settings = {"off": [False], "on": [True], "both": [False, True]}[args.benchmark]
results = []
for bench in settings:
    torch.backends.cudnn.benchmark = bench
    algo = f"cudnn.benchmark={bench}"
    cudnn = torch.backends.cudnn.version() if on_gpu else None
    print(f"peer conv2d (torch {torch.__version__}, cuDNN {cudnn}) on {device_name}, {dtype_name}, channels_last, "
          f"{algo}; ms are medians of {args.iters} rounds of {args.reps} calls", flush=True)
    print(f"{'shape':40s} {'f/d/w':>8s} | {'fwd ms':>8s} {'TF/s':>6s} | {'dgrad ms':>8s} {'TF/s':>6s} | "
          f"{'wgrad ms':>8s} {'TF/s':>6s} | {'step ms':>9s}")
    totals = {"fwd": 0.0, "dgrad": 0.0, "wgrad": 0.0}
    for s in shapes:
        c = s["count"]
        row = {"side": "peer", "algo": algo, "device": device_name, "dtype": dtype_name, "torch": torch.__version__,
               "cudnn": cudnn, "name": s["name"], "count_fwd": c["fwd"], "count_dgrad": c["dgrad"],
               "count_wgrad": c["wgrad"]}
        for k in ("N", "H", "W", "C", "O", "kh", "kw", "stride", "pad"):
            row[k] = s[k]
        try:
            r, flops = measure(s)
        except Exception as e:  # a shape the library refuses is reported, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{s['name']:40s} error: {row['error']}")
            results.append(row)
            continue
        step = 0.0
        for p in ("fwd", "dgrad", "wgrad"):
            if p in r:
                row[p + "_ms"] = r[p]
                step += r[p] * c[p]
                totals[p] += r[p] * c[p]
        row["flops"], row["step_ms"] = flops, step
        tf = lambda p: None if p not in r else flops / (r[p] * 1e-3) / 1e12
        print(f"{s['name']:40s} {'%d/%d/%d' % (c['fwd'], c['dgrad'], c['wgrad']):>8s} | "
              f"{fmt(r.get('fwd'), '8.4f')} {fmt(tf('fwd'), '6.1f')} | {fmt(r.get('dgrad'), '8.4f')} "
              f"{fmt(tf('dgrad'), '6.1f')} | {fmt(r.get('wgrad'), '8.4f')} {fmt(tf('wgrad'), '6.1f')} | {step:9.3f}",
              flush=True)
        results.append(row)
    print(f"per step: forward {totals['fwd']:.3f} ms, backward data {totals['dgrad']:.3f} ms, backward filter "
          f"{totals['wgrad']:.3f} ms, total {sum(totals.values()):.3f} ms over {len(shapes)} shapes", flush=True)
for row in results:
    print("RESULT " + json.dumps(row), flush=True)
