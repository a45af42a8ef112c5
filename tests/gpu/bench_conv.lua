-- bench_conv.lua — every distinct convolution of SD 1.4's DreamBooth
-- training step, timed pass by pass: forward, backward data (dgrad) and
-- backward filter (wgrad), with the count of each pass per step, so that
-- time x count adds up to the step's convolution time.  The peer's side is
-- tests/bench/peer/peer_conv.py; scripts/bench_conv_vs_peer.sh runs both and
-- joins the tables.  Run from the repository root:
--
--     build/moonlit tests/gpu/bench_conv.lua [--dtype bf16] [--iters 9] [--reps 5] [--all_passes]
--     MOONLIT_CONV_ALGO=fastest build/moonlit tests/gpu/bench_conv.lua     -- one row set per choice rule
--     MOONLIT_CONV_API=legacy build/moonlit tests/gpu/bench_conv.lua       -- cuDNN's legacy API (default: graph)
--     build/moonlit tests/gpu/bench_conv.lua --device cpu --quick          -- tiny sizes, to check the script
--     build/moonlit tests/gpu/bench_conv.lua --list_shapes [--quick]       -- the shapes as JSON, for the peer
--     build/moonlit tests/gpu/bench_conv.lua --check_shapes                -- the list against the models (CPU, ~1 min)
--
-- The step (tests/bench/bench_train_step.lua): the VAE encoder at batch 4 on
-- 512x512 images under no_grad (forward only), then the UNet at batch 4 on
-- 64x64 latents, forward and backward; its conv_in needs no input gradient
-- (the noisy latents are not trained).  NHWC activations, [O, kh, kw, C]
-- filters, no bias unless --bias (the step's convolutions have one; the
-- graph API fuses its add into the forward, the legacy API adds it apart;
-- its gradient is a column sum either way).
--
-- A pass's time is the median over --iters rounds of the mean of --reps
-- back-to-back calls (synchronised before and after each round), after one
-- warm-up call; that first call, where moonlit measures cuDNN's algorithms
-- (kernels/cuda/conv2d.cu, MOONLIT_CONV_ALGO), is reported apart as
-- first_ms.  Backward passes run on a retained graph, one gradient at a
-- time, so moonlit's autograd bookkeeping is in the time as it is in a
-- step.  TFLOP/s: 2 N Ho Wo O C kh kw per pass.
--
-- Host time: "host us" is the wall time of issuing --host_calls calls of a
-- pass back to back without synchronising, divided by their count (the
-- device drained before and after): what a call costs the CPU, apart from
-- the GPU's time.  Where it is close to the GPU time, the GPU waits for the
-- host (cuDNN's legacy API does per-call set-up; the graph API runs a plan
-- built once).  Passes the step does not
-- run (count 0) are skipped unless --all_passes.  1x1 stride-1 convolutions
-- are also timed as the GEMM they are ([N H W, C] x [O, C]^T through
-- F.linear), to see whether cuDNN is slow on them.
--
-- Last, one line per shape "RESULT {json}" (side, algo, name, sizes, counts,
-- fwd_ms, dgrad_ms, wgrad_ms, step_ms, ...) for scripts.
local ml = require "moonlit"
local core = ml.core

local args
do
    local p = ml.argparse.new("bench_conv.lua", "SD 1.4 training-step convolutions, pass by pass.")
    p:option("device", {type = "string", default = "cuda", help = "cuda, cuda:N or cpu"})
    p:option("dtype", {choices = {"bf16", "f16", "f32"}, help = "element type (bf16 on cuda, f32 on cpu, which computes no bf16)"})
    p:option("iters", {type = "integer", default = 9, help = "timed rounds per pass (the median is kept)"})
    p:option("reps", {type = "integer", default = 5, help = "calls per round"})
    p:option("quick", {type = "boolean", default = false, help = "tiny sizes (batch 1, channels / 16, sides / 16)"})
    p:option("all_passes", {type = "boolean", default = false, help = "also time the passes the step does not run"})
    p:option("gemm", {type = "boolean", default = true, help = "time 1x1 stride-1 convolutions as a GEMM too"})
    p:option("bias", {type = "boolean", default = false, help = "give every convolution a bias [O]"})
    p:option("host_calls", {type = "integer", default = 20,
                            help = "calls issued without synchronising for the host time per call (0: not measured)"})
    p:option("only", {type = "string", default = "", help = "time only shapes whose name contains this text"})
    p:option("list_shapes", {type = "boolean", default = false, help = "print the shapes as one JSON list and stop"})
    p:option("check_shapes", {type = "boolean", default = false,
                              help = "check the list against the models of configs/sd-v1-4 and stop"})
    args = p:parse(arg or {})
    if args.iters < 1 or args.reps < 1 then p:error("--iters and --reps must be >= 1") end
    if args.host_calls < 0 then p:error("--host_calls must be >= 0") end
    args.dtype = args.dtype or (args.device:sub(1, 4) == "cuda" and "bf16" or "f32")
end

-- ---- the shapes -------------------------------------------------------------

-- model, N, side (H = W), C, O, k (kh = kw), stride, padding (a number, or
-- {top, bottom, left, right}), and per step: forward, dgrad and wgrad
-- calls, then where in the model the calls are.
local shapes = {}
local function conv(model, N, side, C, O, k, stride, pad, nfwd, ndgrad, nwgrad, where)
    local asym = type(pad) == "table"
    local name = string.format("%s %dx%d%s %d->%d @%d%s", model, k, k, stride > 1 and " s" .. stride or "", C, O, side,
                               asym and " pad " .. table.concat(pad, ",") or "")
    shapes[#shapes + 1] = {name = name, model = model, N = N, H = side, W = side, C = C, O = O, kh = k, kw = k,
                           stride = stride, pad = asym and pad or {pad, pad, pad, pad},
                           count = {fwd = nfwd, dgrad = ndgrad, wgrad = nwgrad}, where = where}
end
-- UNet: forward, backward data, backward filter once each per call
local function unet(side, C, O, k, stride, n, where) conv("unet", 4, side, C, O, k, stride, k == 3 and 1 or 0, n, n, n, where) end
-- VAE encoder: forward only
local function vae(side, C, O, k, stride, n, where)
    conv("vae", 4, side, C, O, k, stride, stride == 2 and {0, 1, 0, 1} or (k == 3 and 1 or 0), n, 0, 0, where)
end

-- UNet2DConditionModel, block_out_channels 320/640/1280/1280, 2 resnets per
-- down block and 3 per up block (their inputs concatenate a skip, so every
-- up resnet has a 1x1 shortcut), one transformer (1x1 proj_in + proj_out)
-- per resnet in the cross-attention blocks and the mid block.
conv("unet", 4, 64, 4, 320, 3, 1, 1, 1, 0, 1, "conv_in (the latents need no gradient)")
unet(64, 320, 320, 3, 1, 7, "down_blocks.0 resnets, up_blocks.3 conv2")
unet(64, 640, 320, 3, 1, 2, "up_blocks.3 resnets 1-2 conv1")
unet(64, 960, 320, 3, 1, 1, "up_blocks.3 resnet 0 conv1")
unet(64, 640, 640, 3, 1, 1, "up_blocks.2 upsampler")
unet(64, 320, 4, 3, 1, 1, "conv_out")
unet(32, 320, 640, 3, 1, 1, "down_blocks.1 resnet 0 conv1")
unet(32, 640, 640, 3, 1, 6, "down_blocks.1 resnets, up_blocks.2 conv2")
unet(32, 960, 640, 3, 1, 1, "up_blocks.2 resnet 2 conv1")
unet(32, 1280, 640, 3, 1, 1, "up_blocks.2 resnet 1 conv1")
unet(32, 1920, 640, 3, 1, 1, "up_blocks.2 resnet 0 conv1")
unet(32, 1280, 1280, 3, 1, 1, "up_blocks.1 upsampler")
unet(16, 640, 1280, 3, 1, 1, "down_blocks.2 resnet 0 conv1")
unet(16, 1280, 1280, 3, 1, 7, "down_blocks.2 resnets, up_blocks.1 conv2, up_blocks.0 upsampler")
unet(16, 1920, 1280, 3, 1, 1, "up_blocks.1 resnet 2 conv1")
unet(16, 2560, 1280, 3, 1, 2, "up_blocks.1 resnets 0-1 conv1")
unet(8, 1280, 1280, 3, 1, 11, "down_blocks.3, mid_block, up_blocks.0 conv2")
unet(8, 2560, 1280, 3, 1, 3, "up_blocks.0 conv1")
unet(64, 320, 320, 3, 2, 1, "down_blocks.0 downsampler")
unet(32, 640, 640, 3, 2, 1, "down_blocks.1 downsampler")
unet(16, 1280, 1280, 3, 2, 1, "down_blocks.2 downsampler")
unet(64, 320, 320, 1, 1, 10, "proj_in/proj_out of down_blocks.0, up_blocks.3")
unet(64, 640, 320, 1, 1, 2, "up_blocks.3 shortcuts 1-2")
unet(64, 960, 320, 1, 1, 1, "up_blocks.3 shortcut 0")
unet(32, 320, 640, 1, 1, 1, "down_blocks.1 shortcut")
unet(32, 640, 640, 1, 1, 10, "proj_in/proj_out of down_blocks.1, up_blocks.2")
unet(32, 960, 640, 1, 1, 1, "up_blocks.2 shortcut 2")
unet(32, 1280, 640, 1, 1, 1, "up_blocks.2 shortcut 1")
unet(32, 1920, 640, 1, 1, 1, "up_blocks.2 shortcut 0")
unet(16, 640, 1280, 1, 1, 1, "down_blocks.2 shortcut")
unet(16, 1280, 1280, 1, 1, 10, "proj_in/proj_out of down_blocks.2, up_blocks.1")
unet(16, 1920, 1280, 1, 1, 1, "up_blocks.1 shortcut 2")
unet(16, 2560, 1280, 1, 1, 2, "up_blocks.1 shortcuts 0-1")
unet(8, 1280, 1280, 1, 1, 2, "mid_block proj_in/proj_out")
unet(8, 2560, 1280, 1, 1, 3, "up_blocks.0 shortcuts")
-- AutoencoderKL's encoder, block_out_channels 128/256/512/512, 2 resnets
-- per block, downsamplers padding bottom/right by one (diffusers' pad).
vae(512, 3, 128, 3, 1, 1, "encoder.conv_in")
vae(512, 128, 128, 3, 1, 4, "down_blocks.0 resnets")
vae(256, 128, 256, 3, 1, 1, "down_blocks.1 resnet 0 conv1")
vae(256, 256, 256, 3, 1, 3, "down_blocks.1 resnets")
vae(128, 256, 512, 3, 1, 1, "down_blocks.2 resnet 0 conv1")
vae(128, 512, 512, 3, 1, 3, "down_blocks.2 resnets")
vae(64, 512, 512, 3, 1, 8, "down_blocks.3 resnets, mid_block resnets")
vae(64, 512, 8, 3, 1, 1, "encoder.conv_out")
vae(512, 128, 128, 3, 2, 1, "down_blocks.0 downsampler")
vae(256, 256, 256, 3, 2, 1, "down_blocks.1 downsampler")
vae(128, 512, 512, 3, 2, 1, "down_blocks.2 downsampler")
vae(256, 128, 256, 1, 1, 1, "down_blocks.1 shortcut")
vae(128, 256, 512, 1, 1, 1, "down_blocks.2 shortcut")
vae(64, 8, 8, 1, 1, 1, "quant_conv")

local function out_side(s, side, lo, hi, k) return (side + lo + hi - k) // s.stride + 1 end
local function out_hw(s)
    return out_side(s, s.H, s.pad[1], s.pad[2], s.kh), out_side(s, s.W, s.pad[3], s.pad[4], s.kw)
end
local function is_gemm(s) return s.kh == 1 and s.kw == 1 and s.stride == 1 and s.pad[1] + s.pad[2] + s.pad[3] + s.pad[4] == 0 end

-- --quick: the same list at toy size (the counts are kept)
if args.quick then
    for _, s in ipairs(shapes) do
        s.N, s.C, s.O = 1, math.max(1, s.C // 16), math.max(1, s.O // 16)
        s.H, s.W = math.max(4, s.H // 16), math.max(4, s.W // 16)
    end
end

-- ---- --check_shapes: the list against the models -----------------------------

-- Runs the UNet (forward with gradients, as in a step) and the VAE encoder
-- (under no_grad) of configs/sd-v1-4 at batch 1 on small inputs, recording
-- every conv2d call, and compares with the list scaled down the same way
-- (batch 4 -> 1, sides / 8).  Exits 1 on any difference.
local function check_shapes()
    local function read_json(path)
        local f = assert(io.open(path, "r"))
        local s = f:read("a")
        f:close()
        return core.json_decode(s)
    end
    local scale = 8
    local seen, calls = {}, 0
    local function key(N, H, W, C, O, kh, kw, stride, pad)
        return string.format("N%d %dx%d C%d O%d k%dx%d s%d pad %s", N, H, W, C, O, kh, kw, stride, table.concat(pad, ","))
    end
    local real_conv2d = core.conv2d
    core.conv2d = function(x, w, b, o)
        local xs, ws = x:size(), w:size()
        local st = type(o.stride) == "table" and o.stride[1] or o.stride or 1
        local p = o.padding or 0
        local pad = type(p) ~= "table" and {p, p, p, p} or #p == 2 and {p[1], p[1], p[2], p[2]} or p
        local k = key(xs[1], xs[2], xs[3], xs[4], ws[1], ws[2], ws[3], st, pad)
        local grad = core.is_grad_enabled()
        local c = seen[k] or {fwd = 0, dgrad = 0, wgrad = 0}
        c.fwd = c.fwd + 1
        if grad and x.requires_grad then c.dgrad = c.dgrad + 1 end
        if grad and w.requires_grad then c.wgrad = c.wgrad + 1 end
        seen[k] = c
        calls = calls + 1
        return real_conv2d(x, w, b, o)
    end
    local ok, err = pcall(function()
        local ucfg = read_json("configs/sd-v1-4/unet/config.json")
        local vcfg = read_json("configs/sd-v1-4/vae/config.json")
        local unet_model = ml.sd.models[ucfg._class_name]()(ucfg)
        local vae_model = ml.sd.models[vcfg._class_name]()(vcfg)
        ml.no_grad(function() vae_model:encode(ml.randn({1, 512 // scale, 512 // scale, 3})) end)
        local _ = unet_model(ml.randn({1, 64 // scale, 64 // scale, 4}), 10, ml.randn({1, 77, 768}))
    end)
    core.conv2d = real_conv2d
    if not ok then error(err, 0) end
    local want, bad = {}, 0
    for _, s in ipairs(shapes) do
        local k = key(1, s.H // scale, s.W // scale, s.C, s.O, s.kh, s.kw, s.stride, s.pad)
        if want[k] then print("check_shapes: listed twice: " .. s.name) bad = bad + 1 end
        want[k] = s
    end
    for k, c in pairs(seen) do
        local s = want[k]
        if not s then
            print(string.format("check_shapes: the models call %s (%d forward) but the list has no such shape", k, c.fwd))
            bad = bad + 1
        elseif s.count.fwd ~= c.fwd or s.count.dgrad ~= c.dgrad or s.count.wgrad ~= c.wgrad then
            print(string.format("check_shapes: %s: the list counts fwd/dgrad/wgrad %d/%d/%d, the models %d/%d/%d", s.name,
                                s.count.fwd, s.count.dgrad, s.count.wgrad, c.fwd, c.dgrad, c.wgrad))
            bad = bad + 1
        end
    end
    for k, s in pairs(want) do
        if not seen[k] then print("check_shapes: listed but never called: " .. s.name) bad = bad + 1 end
    end
    print(string.format("check_shapes: %d conv2d calls of %d distinct shapes; %d listed shapes; %s", calls,
                        (function() local n = 0 for _ in pairs(seen) do n = n + 1 end return n end)(), #shapes,
                        bad == 0 and "the list matches" or bad .. " difference(s)"))
    os.exit(bad == 0 and 0 or 1)
end

if args.check_shapes then check_shapes() end

if args.list_shapes then
    local list = {}
    for _, s in ipairs(shapes) do
        list[#list + 1] = {name = s.name, N = s.N, H = s.H, W = s.W, C = s.C, O = s.O, kh = s.kh, kw = s.kw,
                           stride = s.stride, pad = s.pad, count = s.count}
    end
    print(core.json_encode(list))
    os.exit(0)
end

-- ---- timing -------------------------------------------------------------------

local DEV = args.device
local on_gpu = DEV:sub(1, 4) == "cuda"
if on_gpu then
    local ok, why = core.cuda_available()
    if not ok then
        print("bench_conv: no usable GPU: " .. tostring(why) .. " (--device cpu --quick checks the script)")
        os.exit(1)
    end
end
local ALGO = os.getenv("MOONLIT_CONV_ALGO")
if ALGO == nil or ALGO == "" then ALGO = "measure" end
local API = os.getenv("MOONLIT_CONV_API")
if API == nil or API == "" then API = "graph" end

-- seconds fn() takes, all its GPU work included
local function elapsed(fn)
    if on_gpu then return core.cuda_time(fn) end
    local t0 = core.now()
    fn()
    return core.now() - t0
end

-- seconds of host time per call of fn: --host_calls calls issued without
-- synchronising, the device drained before and after (nil when not asked)
local function host_time(fn)
    if args.host_calls == 0 then return nil end
    if on_gpu then core.cuda_synchronize() end
    local t0 = core.now()
    for _ = 1, args.host_calls do fn() end
    local t = core.now() - t0
    if on_gpu then core.cuda_synchronize() end
    return t / args.host_calls
end

-- {first = s, median = s, host = s}: the first call, then the median over
-- iters rounds of the mean of reps calls, then the host time per call
local function time_pass(fn)
    local first = elapsed(fn)
    local t = {}
    for i = 1, args.iters do
        t[i] = elapsed(function()
            for _ = 1, args.reps do fn() end
        end) / args.reps
    end
    table.sort(t)
    return {first = first, median = t[(#t + 1) // 2], host = host_time(fn)}
end

local F = ml.F

-- the three passes of one shape, and the GEMM twin of a 1x1 one
local function measure(s)
    local Ho, Wo = out_hw(s)
    local r = {}
    ml.manual_seed(1)
    local x = ml.randn({s.N, s.H, s.W, s.C}, {device = DEV}):to(args.dtype)
    local w = (ml.randn({s.O, s.kh, s.kw, s.C}, {device = DEV}) * (1 / math.sqrt(s.C * s.kh * s.kw))):to(args.dtype)
    local g = ml.randn({s.N, Ho, Wo, s.O}, {device = DEV}):to(args.dtype)
    local b = args.bias and ml.randn({s.O}, {device = DEV}):to(args.dtype) or nil
    local opts = {stride = s.stride, padding = s.pad}
    local want = function(pass) return args.all_passes or s.count[pass] > 0 end
    if want("fwd") then
        r.fwd = time_pass(function() ml.no_grad(function() local y <close> = F.conv2d(x, w, b, opts) end) end)
    end
    -- backward on a retained graph whose only leaf needing a gradient is
    -- the one of the pass
    local function backward_pass(leaf, other)
        leaf.requires_grad, other.requires_grad = true, false
        local y = F.conv2d(x, w, b, opts)
        local res = time_pass(function()
            y:backward(g, {retain_graph = true})
            leaf.grad = nil
        end)
        leaf.requires_grad = false
        return res
    end
    if want("dgrad") then r.dgrad = backward_pass(x, w) end
    if want("wgrad") then r.wgrad = backward_pass(w, x) end
    if args.gemm and is_gemm(s) then
        -- the same products as a GEMM: [N H W, C] x [O, C]^T
        local x2 = x:view(s.N * s.H * s.W, s.C):clone()
        local w2 = w:view(s.O, s.C):clone()
        local g2 = g:view(s.N * s.H * s.W, s.O)
        r.gemm = {}
        if want("fwd") then
            r.gemm.fwd = time_pass(function() ml.no_grad(function() local y <close> = F.linear(x2, w2) end) end)
        end
        local function gemm_backward(leaf, other)
            leaf.requires_grad, other.requires_grad = true, false
            local y = F.linear(x2, w2)
            local res = time_pass(function()
                y:backward(g2, {retain_graph = true})
                leaf.grad = nil
            end)
            leaf.requires_grad = false
            return res
        end
        if want("dgrad") then r.gemm.dgrad = gemm_backward(x2, w2) end
        if want("wgrad") then r.gemm.wgrad = gemm_backward(w2, x2) end
    end
    x, w, g, b = nil, nil, nil, nil
    collectgarbage()
    return r
end

local PASSES = {"fwd", "dgrad", "wgrad"}
local function flops(s)
    local Ho, Wo = out_hw(s)
    return 2 * s.N * Ho * Wo * s.O * s.C * s.kh * s.kw
end

local device_name = on_gpu and core.cuda_device_info(DEV == "cuda" and 0 or tonumber(DEV:match(":(%d+)")) or 0).name or
                    "cpu"
print(string.format("moonlit conv2d on %s, %s, MOONLIT_CONV_API=%s MOONLIT_CONV_ALGO=%s%s%s; ms are medians of %d " ..
                    "rounds of %d calls; host us per call over %d unsynchronised calls%s", device_name, args.dtype, API,
                    ALGO, on_gpu and "" or " (cuDNN's only: no effect on cpu)", args.quick and ", quick sizes" or "",
                    args.iters, args.reps, args.host_calls, args.bias and "; with bias" or ""))
print(string.format("%-40s %8s | %8s %6s | %8s %6s | %8s %6s | %9s | %17s", "shape", "f/d/w", "fwd ms", "TF/s",
                    "dgrad ms", "TF/s", "wgrad ms", "TF/s", "step ms", "host us f/d/w"))
local function ms(t) return t and string.format("%.4f", t.median * 1e3) or "-" end
local function tf(t, f) return t and string.format("%.1f", f / t.median / 1e12) or "-" end
local function hus(t) return t and t.host and string.format("%.0f", t.host * 1e6) or "-" end

local results, total = {}, {fwd = 0, dgrad = 0, wgrad = 0, first = 0, host = 0}
local timed = 0
for _, s in ipairs(shapes) do
    if args.only == "" or s.name:find(args.only, 1, true) then
        local r = measure(s)
        local f = flops(s)
        local step = 0
        for _, pass in ipairs(PASSES) do
            if r[pass] then
                step = step + r[pass].median * s.count[pass]
                total[pass] = total[pass] + r[pass].median * s.count[pass]
                if s.count[pass] > 0 then total.first = total.first + r[pass].first end
                total.host = total.host + (r[pass].host or 0) * s.count[pass]
            end
        end
        print(string.format("%-40s %8s | %8s %6s | %8s %6s | %8s %6s | %9.3f | %17s", s.name,
                            s.count.fwd .. "/" .. s.count.dgrad .. "/" .. s.count.wgrad, ms(r.fwd), tf(r.fwd, f),
                            ms(r.dgrad), tf(r.dgrad, f), ms(r.wgrad), tf(r.wgrad, f), step * 1e3,
                            hus(r.fwd) .. "/" .. hus(r.dgrad) .. "/" .. hus(r.wgrad)))
        if r.gemm then
            print(string.format("%-40s %8s | %8s %6s | %8s %6s | %8s %6s |", "  as GEMM (F.linear)", "",
                                ms(r.gemm.fwd), tf(r.gemm.fwd, f), ms(r.gemm.dgrad), tf(r.gemm.dgrad, f),
                                ms(r.gemm.wgrad), tf(r.gemm.wgrad, f)))
        end
        results[#results + 1] = {s = s, r = r, step = step, flops = f}
        timed = timed + 1
    end
end
print(string.format("per step: forward %.3f ms, backward data %.3f ms, backward filter %.3f ms, total %.3f ms " ..
                    "over %d shapes; first calls (algorithm choice included) %.1f ms; host time of the step's " ..
                    "calls %.3f ms", total.fwd * 1e3, total.dgrad * 1e3, total.wgrad * 1e3,
                    (total.fwd + total.dgrad + total.wgrad) * 1e3, timed, total.first * 1e3, total.host * 1e3))

local function msf(t) return t and t.median * 1e3 or nil end
for _, e in ipairs(results) do
    local s, r = e.s, e.r
    local row = {side = "moonlit", algo = ALGO, api = API, bias = args.bias, device = device_name, dtype = args.dtype, name = s.name, N = s.N,
                 H = s.H, W = s.W, C = s.C, O = s.O, kh = s.kh, kw = s.kw, stride = s.stride, pad = s.pad,
                 count_fwd = s.count.fwd, count_dgrad = s.count.dgrad, count_wgrad = s.count.wgrad, flops = e.flops,
                 fwd_ms = msf(r.fwd), dgrad_ms = msf(r.dgrad), wgrad_ms = msf(r.wgrad), step_ms = e.step * 1e3,
                 fwd_first_ms = r.fwd and r.fwd.first * 1e3, dgrad_first_ms = r.dgrad and r.dgrad.first * 1e3,
                 wgrad_first_ms = r.wgrad and r.wgrad.first * 1e3,
                 fwd_host_us = r.fwd and r.fwd.host and r.fwd.host * 1e6,
                 dgrad_host_us = r.dgrad and r.dgrad.host and r.dgrad.host * 1e6,
                 wgrad_host_us = r.wgrad and r.wgrad.host and r.wgrad.host * 1e6}
    if r.gemm then
        row.gemm_fwd_ms, row.gemm_dgrad_ms, row.gemm_wgrad_ms = msf(r.gemm.fwd), msf(r.gemm.dgrad), msf(r.gemm.wgrad)
    end
    print("RESULT " .. core.json_encode(row))
end
