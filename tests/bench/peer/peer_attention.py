"""Peer for tests/gpu/bench_attention.lua: PyTorch's scaled_dot_product_attention per backend.

For each shape, each backend PyTorch has on this GPU (cudnn, flash, efficient; math with --math) times the
forward and forward+backward with CUDA events, on tensors laid out as moonlit's: [B, S, H, D] in memory,
seen as [B, H, S, D] by a transpose (no copy), the way diffusers feeds SDPA.

Prints one JSON object per line: first {"info": {"device", "torch", "cudnn"}}, then per shape and backend
  {"name": ..., "dtype": ..., "backend": ..., "fwd_ms": ..., "fwdbwd_ms": ...}    or ... "error": "..."
then, with --table, a readable table.  bench_attention.lua runs it and merges the lines into its own table.

Usage: python3 tests/bench/peer/peer_attention.py --shapes JSON [--dtype bf16] [--iters 20] [--math] [--table]
  JSON: a list of {"name", "B", "Sq", "Sk", "H", "D", "Dv", "causal"} (bench_attention.lua passes its own);
  without --shapes, Stable Diffusion 1.x's self attention at 64x64 latents, batch 4.
"""
import argparse, json, sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", help="JSON list of shapes (see the module docstring)")
ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--math", action="store_true", help="also time the unfused math backend")
ap.add_argument("--table", action="store_true", help="print a table after the JSON lines")
args = ap.parse_args()

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
if args.math:
    BACKENDS.append(("math", SDPBackend.MATH))

shapes = json.loads(args.shapes) if args.shapes else [
    {"name": "SD1 64x64 self (D 40)", "B": 4, "Sq": 4096, "Sk": 4096, "H": 8, "D": 40, "Dv": 40, "causal": False}]


def timed(fn, iters):
    """Median milliseconds of fn() over iters runs, after two warm-ups."""
    fn()
    fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bshd(B, S, H, W, dt, grad):
    """[B, S, H, W] memory seen as [B, H, S, W]."""
    t = torch.randn(B, S, H, W, device="cuda", dtype=dt).transpose(1, 2)
    return t.detach().requires_grad_(grad)


dt = DTYPES[args.dtype]
print(json.dumps({"info": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cudnn": torch.backends.cudnn.version()}}), flush=True)
rows = []
for s in shapes:
    B, Sq, Sk, H, D, Dv, causal = s["B"], s["Sq"], s["Sk"], s["H"], s["D"], s.get("Dv", s["D"]), s["causal"]
    torch.manual_seed(1)
    q, k, v = bshd(B, Sq, H, D, dt, True), bshd(B, Sk, H, D, dt, True), bshd(B, Sk, H, Dv, dt, True)
    g = torch.randn(B, Sq, H, Dv, device="cuda", dtype=dt).transpose(1, 2)
    for name, backend in BACKENDS:
        row = {"name": s["name"], "dtype": args.dtype, "backend": name}
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def both():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)
                    q.grad = k.grad = v.grad = None

                row["fwd_ms"] = timed(fwd, args.iters)
                row["fwdbwd_ms"] = timed(both, args.iters)
        except Exception as e:  # a backend that does not take this shape or dtype says why
            row["error"] = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            q.grad = k.grad = v.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v, g
    torch.cuda.empty_cache()

if args.table:
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'shape':<36} {'backend':<10} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<36} {r['backend']:<10} {'-':>9} {'-':>11}  {r['error'][:60]}")
        else:
            print(f"{r['name']:<36} {r['backend']:<10} {r['fwd_ms']:9.3f} {r['fwdbwd_ms']:11.3f}")
sys.exit(0)
