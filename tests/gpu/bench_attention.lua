-- bench_attention.lua — the CUDA scaled dot-product attention on Stable
-- Diffusion's shapes, beside PyTorch's SDPA timed in the same call
-- (tests/bench/peer/peer_attention.py, every backend it has: cudnn, flash,
-- efficient).  Run from the repository root on a GPU machine:
--
--     build/moonlit tests/gpu/bench_attention.lua [--dtype bf16|f16|f32] [--no-peer] [--no-own]
--
-- One row per shape: moonlit's forward and forward+backward milliseconds and
-- TFLOP/s, the same forward+backward on moonlit's own kernels only ("own":
-- this script again in a child process with MOONLIT_CUDNN_SDPA=0, so the
-- gain of the cuDNN path shows), the peer's fastest backend and its
-- forward+backward time, and the ratio moonlit / peer (below 1: moonlit is
-- faster).  bf16 / f16 calls go through cuDNN's fused attention where it
-- takes the shape (kernels/cuda/attention_cudnn.cu) and through moonlit's
-- kernels otherwise; a notice on stderr names each shape cuDNN refused.
--
-- TFLOP/s are nominal: 2 B H Sq Sk (D + Dv) flops for the forward (two
-- products), 2.5 times that for the backward (five products, FlashAttention's
-- convention), halved under the causal mask.  Times are means of ITERS runs
-- after one warm-up (moonlit) and medians of 20 after two (peer).
local ml = require "moonlit"
local core = ml.core

local args
do
    local p = ml.argparse.new("bench_attention.lua", "SDPA time on Stable Diffusion's shapes, beside PyTorch.")
    p:option("dtype", {default = "bf16", choices = {"bf16", "f16", "f32"}, help = "element type of q, k, v"})
    p:option("peer", {type = "boolean", default = true, help = "time PyTorch's SDPA too (python3 with torch)"})
    p:option("own", {type = "boolean", default = true, help = "time moonlit's own kernels too (MOONLIT_CUDNN_SDPA=0)"})
    p:option("json", {type = "boolean", default = false, help = "print one JSON object per shape, no table"})
    args = p:parse(arg or {})
end

local ok, why = core.cuda_available()
if not ok then
    print("bench_attention: no usable GPU: " .. tostring(why))
    os.exit(1)
end

local DEV = "cuda"
local ITERS = 10
local sdpa = ml.F.scaled_dot_product_attention

-- name, B, Sq, Sk, H, D, Dv, causal: Stable Diffusion 1.x at 512 px (latents
-- 64x64, 32x32, 16x16; cross attention over 77 text tokens; batch 2 for
-- generation with guidance, 4 for a DreamBooth step of 2 + 2 images), SD 2.x
-- (head width 64), CLIP's causal text encoder, a sequence that leaves partial
-- tiles, and the VAE's single wide head (beyond cuDNN's 256).
local shapes = {
    {"SD1 64x64 self (D 40)", 2, 4096, 4096, 8, 40, 40, false},
    {"SD1 64x64 self (D 40)", 4, 4096, 4096, 8, 40, 40, false},
    {"SD1 64x64 cross (D 40, 77 keys)", 4, 4096, 77, 8, 40, 40, false},
    {"SD1 32x32 self (D 80)", 4, 1024, 1024, 8, 80, 80, false},
    {"SD1 32x32 cross (D 80, 77 keys)", 4, 1024, 77, 8, 80, 80, false},
    {"SD1 16x16 self (D 160)", 4, 256, 256, 8, 160, 160, false},
    {"SD1 16x16 cross (D 160, 77 keys)", 4, 256, 77, 8, 160, 160, false},
    {"SD2 64x64 self (D 64, 5 heads)", 4, 4096, 4096, 5, 64, 64, false},
    {"CLIP text (D 64, causal)", 4, 77, 77, 12, 64, 64, true},
    {"odd length self (Sq 4097, D 40)", 1, 4097, 4097, 8, 40, 40, false},
    {"VAE mid-block 64x64 (D 512)", 1, 4096, 4096, 1, 512, 512, false},
}

local function key(name, B) return name .. " @" .. B end

local function time(fn)
    fn()
    return core.cuda_time(function()
        for _ = 1, ITERS do fn() end
    end) / ITERS
end

local function fwd_flops(s)
    local _, B, Sq, Sk, H, D, Dv, causal = table.unpack(s)
    return 2 * B * H * Sq * Sk * (D + Dv) * (causal and 0.5 or 1)
end

-- moonlit's times for every shape: {fwd = s, both = s} by key
local function measure()
    local res = {}
    for _, s in ipairs(shapes) do
        local name, B, Sq, Sk, H, D, Dv, causal = table.unpack(s)
        ml.manual_seed(1)
        local q = ml.randn({B, Sq, H, D}, {device = DEV}):to(args.dtype)
        local k = ml.randn({B, Sk, H, D}, {device = DEV}):to(args.dtype)
        local v = ml.randn({B, Sk, H, Dv}, {device = DEV}):to(args.dtype)
        local g = ml.randn({B, Sq, H, Dv}, {device = DEV}):to(args.dtype)
        local opts = {causal = causal}
        local r = {}
        r.fwd = time(function() ml.no_grad(function() return sdpa(q, k, v, opts) end) end)
        q.requires_grad, k.requires_grad, v.requires_grad = true, true, true
        r.both = time(function()
            sdpa(q, k, v, opts):backward(g)
            q.grad, k.grad, v.grad = nil, nil, nil
        end)
        res[key(name, B)] = r
        q, k, v, g = nil, nil, nil, nil
        collectgarbage()
    end
    return res
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Lines of JSON objects printed by a command; non-JSON lines are skipped.
local function json_lines(cmd)
    local out, f = {}, io.popen(cmd, "r")
    if not f then return out end
    for line in f:lines() do
        if line:sub(1, 1) == "{" then
            local okj, v = pcall(core.json_decode, line)
            if okj and type(v) == "table" then out[#out + 1] = v end
        end
    end
    f:close()
    return out
end

-- The binary running this script (the lowest index of arg).
local function interpreter()
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

local mine = measure()

if args.json then
    for _, s in ipairs(shapes) do
        local k = key(s[1], s[2])
        print(core.json_encode({key = k, fwd_ms = mine[k].fwd * 1e3, fwdbwd_ms = mine[k].both * 1e3}))
    end
    os.exit(0)
end

-- moonlit's own kernels, in a child that has the cuDNN path turned off
local own = {}
if args.own and args.dtype ~= "f32" then
    local cmd = "MOONLIT_CUDNN_SDPA=0 " .. shell_quote(interpreter()) .. " tests/gpu/bench_attention.lua --json --dtype " ..
                args.dtype .. " 2>/dev/null"
    for _, r in ipairs(json_lines(cmd)) do own[r.key] = r end
end

-- the peer: fastest backend per shape
local peer, peer_info, peer_note = {}, nil, nil
if args.peer then
    local list = {}
    for _, s in ipairs(shapes) do
        list[#list + 1] = {name = key(s[1], s[2]), B = s[2], Sq = s[3], Sk = s[4], H = s[5], D = s[6], Dv = s[7],
                           causal = s[8]}
    end
    local cmd = "python3 tests/bench/peer/peer_attention.py --dtype " .. args.dtype .. " --shapes " ..
                shell_quote(core.json_encode(list)) .. " 2>&1"
    local rows = json_lines(cmd)
    for _, r in ipairs(rows) do
        if r.info then
            peer_info = r.info
        elseif r.fwdbwd_ms then
            local best = peer[r.name]
            if not best or r.fwdbwd_ms < best.fwdbwd_ms then peer[r.name] = r end
        end
    end
    if #rows == 0 then peer_note = "peer: no results (python3 with torch on this machine?)" end
end

local info = core.cuda_device_info(0)
print(string.format("moonlit attention, %s, %s%s", info.name, args.dtype,
                    peer_info and string.format("; peer torch %s, cuDNN %s", peer_info.torch, peer_info.cudnn) or ""))
print(string.format("%-34s %2s %8s %8s %7s %7s %8s | %-9s %8s %8s %6s", "shape", "B", "fwd ms", "f+b ms", "fwd TF",
                    "f+b TF", "own f+b", "peer", "fwd ms", "f+b ms", "ratio"))
local function num(x, fmt) return x and string.format(fmt, x) or "-" end
for _, s in ipairs(shapes) do
    local k = key(s[1], s[2])
    local m, o, p = mine[k], own[k], peer[k]
    local f = fwd_flops(s)
    print(string.format("%-34s %2d %8.3f %8.3f %7.1f %7.1f %8s | %-9s %8s %8s %6s", s[1], s[2], m.fwd * 1e3,
                        m.both * 1e3, f / m.fwd / 1e12, 3.5 * f / m.both / 1e12, num(o and o.fwdbwd_ms, "%.3f"),
                        p and p.backend or "-", num(p and p.fwd_ms, "%.3f"), num(p and p.fwdbwd_ms, "%.3f"),
                        num(p and m.both * 1e3 / p.fwdbwd_ms, "%.2f")))
end
if peer_note then print(peer_note) end
print("ratio = moonlit f+b / peer's fastest f+b (below 1: moonlit faster); own = moonlit's kernels without cuDNN")
