-- bench_norms.lua — GroupNorm (32 groups; plain, and with the SiLU fused in
-- as F.group_norm(..., {silu = true}) gives it, the form SD's ResNet blocks
-- use) and LayerNorm (over the last dim), forward and backward, in bf16 and
-- f32, at the shapes SD 1.4's training step uses at 512x512, batch 4
-- (latents 64x64, channels last): GroupNorm on [B,64,64,320], [B,32,32,640],
-- [B,16,16,1280], [B,8,8,1280]; LayerNorm on the UNet transformers' tokens
-- [B*4096,320], [B*1024,640], [B*256,1280], [B*64,1280] and the text
-- encoder's [B*77,768].  Per row: kernel ms forward (recording the graph,
-- as in training) and kernel ms backward alone (the graph is built once and backward run
-- through it with retain_graph = true; dx, dweight and dbias all computed),
-- the bytes each pass must move, GB/s, and the share of the device's plain
-- copy bandwidth (a clone of a large tensor of the same dtype, measured
-- here).  Weight and bias are in x's dtype (the ops require it; under
-- nn.autocast the layers cast them so).  The target is >= 70% of copy for every pass; the last line counts
-- the passes that reach it.  Run from the repository root on a GPU machine:
--
--     build/moonlit tests/gpu/bench_norms.lua [--batch 4] [--iters 20] [--dtypes bf16,f32]
--     build/moonlit tests/gpu/bench_norms.lua --device cpu     -- smoke run
--
-- --device cpu is a smoke run: batch 1 and 2 iterations unless given, a
-- smaller copy, host timing (core.now); dtypes the CPU kernels lack
-- (bf16: they compute f32 and f64) are skipped with a note.
--
-- Bytes counted, es the element size, n = numel(x), C channels, S the
-- number of (sample, group) or row statistics, 4-byte f32 mean and rstd:
--   forward:  reads x, writes y (2*es*n), reads weight and bias (2*es*C),
--             writes mean and rstd (2*4*S);
--   backward: reads x and dy, writes dx (3*es*n), reads weight (es*C; and
--             bias with the fused SiLU, whose derivative needs the
--             pre-activation: another es*C), reads mean and rstd (2*4*S),
--             writes dweight and dbias (2*es*C).
local ml = require "moonlit"
local core = ml.core
local F = ml.F

local p = ml.argparse.new("bench_norms.lua",
                          "GroupNorm (+ fused SiLU) and LayerNorm forward / backward bandwidth at SD 1.4 shapes.")
p:option("device", {type = "string", default = "cuda", help = "cuda, cuda:N, or cpu for a smoke run"})
p:option("batch", {type = "integer", default = 0, help = "batch size (0: 4 on cuda, 1 on cpu)"})
p:option("iters", {type = "integer", default = 0, help = "timed calls per pass (0: 20 on cuda, 2 on cpu)"})
p:option("dtypes", {type = "list", default = {"bf16", "f32"}, help = "dtypes to measure"})
local o = p:parse(arg or {})
local ES = {bf16 = 2, f16 = 2, f32 = 4, f64 = 8}
for _, dt in ipairs(o.dtypes) do
    if not ES[dt] then p:error("--dtypes: unknown dtype '" .. dt .. "' (bf16, f16, f32, f64)") end
end

local DEV = o.device
local on_gpu = DEV:sub(1, 4) == "cuda"
if on_gpu then
    local ok, why = core.cuda_available()
    if not ok then
        print("bench_norms: no usable GPU: " .. tostring(why))
        os.exit(1)
    end
elseif DEV ~= "cpu" then
    p:error("--device must be cuda, cuda:N or cpu (got '" .. DEV .. "')")
end
local B = o.batch > 0 and o.batch or (on_gpu and 4 or 1)
local ITERS = o.iters > 0 and o.iters or (on_gpu and 20 or 2)
local GROUPS, EPS, TARGET = 32, 1e-5, 0.70

local function gbps(bytes, seconds) return bytes / seconds / 1e9 end

-- Seconds fn takes, every device synchronised around it on a GPU.
local function clock(fn)
    if on_gpu then return core.cuda_time(fn) end
    local t0 = core.now()
    fn()
    return core.now() - t0
end

-- One warm-up call, then the mean of ITERS timed calls (wall time).
local function time(fn)
    fn()
    return clock(function() for _ = 1, ITERS do fn() end end) / ITERS
end

-- Seconds of kernel time per call: on a GPU the sum of the kernels' own
-- times (ml.profile's events) over ITERS calls, so that the host's work
-- (recording the graph, the Lua around each call), which at these sizes
-- takes longer than the kernels, does not count; wall time on the CPU.
-- Also returns the wall time per call.
local function kernel_time(fn)
    local wall = time(fn)
    if not on_gpu then return wall, wall end
    local report = ml.profile(function() for _ = 1, ITERS do fn() end end)
    local ms = 0
    for _, r in ipairs(report) do ms = ms + r.ms end
    return ms / 1e3 / ITERS, wall
end

-- ---- the reference: a plain copy of a large tensor, per dtype -------------
local COPY_N = on_gpu and 1280 * 51200 or 1280 * 4096   -- 65.5M elements (5.2M on the CPU)
local copy_bw = {}
for _, dt in ipairs(o.dtypes) do
    ml.manual_seed(1)
    local a = ml.randn({COPY_N}, {device = DEV}):to(dt)
    local t = time(function() local y <close> = a:clone() end)
    copy_bw[dt] = gbps(2 * ES[dt] * COPY_N, t)
    a:free()
    collectgarbage()
end

-- ---- the norms ------------------------------------------------------------
local gn_shapes = {{B, 64, 64, 320}, {B, 32, 32, 640}, {B, 16, 16, 1280}, {B, 8, 8, 1280}}
local ln_shapes = {{B * 4096, 320}, {B * 1024, 640}, {B * 256, 1280}, {B * 64, 1280}, {B * 77, 768}}

local forms = {
    {name = "group_norm", shapes = gn_shapes, stats = function(s) return s[1] * GROUPS end, bias_in_bwd = false,
     fn = function(x, w, b) return F.group_norm(x, GROUPS, w, b, EPS) end},
    {name = "group_norm+silu", shapes = gn_shapes, stats = function(s) return s[1] * GROUPS end, bias_in_bwd = true,
     fn = function(x, w, b) return F.group_norm(x, GROUPS, w, b, EPS, {silu = true}) end},
    {name = "layer_norm", shapes = ln_shapes, stats = function(s) return s[1] end, bias_in_bwd = false,
     fn = function(x, w, b) return F.layer_norm(x, w, b, EPS) end},
}

local function numel(s)
    local n = 1
    for _, d in ipairs(s) do n = n * d end
    return n
end

local rows, skipped, skip_seen = {}, {}, {}
for _, dt in ipairs(o.dtypes) do
    for _, form in ipairs(forms) do
        for _, s in ipairs(form.shapes) do
            local es, n, C, S = ES[dt], numel(s), s[#s], form.stats(s)
            ml.manual_seed(1)
            local x = ml.randn(s, {device = DEV}):to(dt)
            local w = (ml.randn({C}, {device = DEV}) * 0.1 + 1):to(dt)
            local b = (ml.randn({C}, {device = DEV}) * 0.1):to(dt)
            local dy = ml.randn(s, {device = DEV}):to(dt)
            local leaves = {x, w, b}
            for _, t in ipairs(leaves) do t.requires_grad = true end
            local ok, y = pcall(form.fn, x, w, b)
            if not ok then
                local key = form.name .. " " .. dt
                if not skip_seen[key] then
                    skip_seen[key] = true
                    skipped[#skipped + 1] = string.format("%s on %s (every shape): %s", key, DEV,
                                                          (tostring(y):gsub("^.-:%d+: ", "")))
                end
            else
                local fwd, fwd_wall = kernel_time(function() local z <close> = form.fn(x, w, b) end)
                local keep = {retain_graph = true}
                local bwd, bwd_wall = kernel_time(function()
                    y:backward(dy, keep)
                    for _, t in ipairs(leaves) do
                        local gt <close> = t.grad
                        t.grad = nil
                    end
                end)
                local fwd_bytes = 2 * es * n + 2 * es * C + 2 * 4 * S
                local bwd_bytes = 3 * es * n + (form.bias_in_bwd and 2 or 1) * es * C + 2 * 4 * S + 2 * es * C
                rows[#rows + 1] = {name = string.format("%s %s [%s]", form.name, dt, table.concat(s, ",")),
                                   copy = copy_bw[dt], fwd = fwd, fwd_bytes = fwd_bytes, bwd = bwd,
                                   bwd_bytes = bwd_bytes, fwd_wall = fwd_wall, bwd_wall = bwd_wall}
                y = nil
            end
            for _, t in ipairs(leaves) do t:free() end
            dy:free()
            collectgarbage()
        end
    end
end

-- ---- the table ------------------------------------------------------------
local where = on_gpu and core.cuda_device_info(DEV == "cuda" and 0 or tonumber(DEV:match("cuda:(%d+)"))).name
    or "cpu (smoke run)"
local copies = {}
for _, dt in ipairs(o.dtypes) do copies[#copies + 1] = string.format("%s %.1f GB/s", dt, copy_bw[dt]) end
print(string.format("device: %s; batch %d; %d iterations each; copy (clone of %.1f M elements): %s",
                    where, B, ITERS, COPY_N / 1e6, table.concat(copies, ", ")))
for _, why in ipairs(skipped) do print("skipped: " .. why) end
print("ms: kernel time per pass (GPU: the kernels' own event times, the host's work excluded); wall: the "
          .. "pass's wall time, host included")
print(string.format("%-38s %9s %8s %8s %8s %7s  %9s %8s %8s %8s %7s", "norm dtype [shape]", "fwd ms", "wall", "fwd MB",
                    "GB/s", "of copy", "bwd ms", "wall", "bwd MB", "GB/s", "of copy"))
local good, passes = 0, 0
for _, r in ipairs(rows) do
    local fbw, bbw = gbps(r.fwd_bytes, r.fwd), gbps(r.bwd_bytes, r.bwd)
    local ff, bf = fbw / r.copy, bbw / r.copy
    passes = passes + 2
    if ff >= TARGET then good = good + 1 end
    if bf >= TARGET then good = good + 1 end
    print(string.format("%-38s %9.4f %8.3f %8.1f %8.1f %6.0f%%  %9.4f %8.3f %8.1f %8.1f %6.0f%%", r.name,
                        r.fwd * 1e3, r.fwd_wall * 1e3, r.fwd_bytes / 1e6, fbw, 100 * ff, r.bwd * 1e3,
                        r.bwd_wall * 1e3, r.bwd_bytes / 1e6, bbw, 100 * bf))
end
print(string.format("norms: %d of %d passes at >= %d%% of copy bandwidth", good, passes, math.floor(100 * TARGET + 0.5)))
