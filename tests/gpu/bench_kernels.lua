-- bench_kernels.lua — bandwidth of the CUDA copy, elementwise, reduction,
-- random and AdamW kernels on large tensors, as a fraction of the device's
-- plain copy bandwidth (these kernels are memory-bound: ~80% or more is the
-- goal), then clip_grad_norm + AdamW over SD 1.4's parameter list.  Run from the repository root on a GPU machine:
--
--     build/moonlit tests/gpu/bench_kernels.lua
--
-- Bytes counted are the bytes each op must read and write once.
local ml = require "moonlit"
local core = ml.core

local ok, why = core.cuda_available()
if not ok then
    print("bench_kernels: no usable GPU: " .. tostring(why))
    os.exit(1)
end

local DEV = "cuda"
local N = 1280 * 51200               -- elements of the large operands (65.5M)
local ITERS = 20

local function gbps(bytes, seconds) return bytes / seconds / 1e9 end

-- One warm-up call, then the mean of ITERS timed calls.
local function time(fn)
    fn()
    return core.cuda_time(function()
        for _ = 1, ITERS do fn() end
    end) / ITERS
end

ml.manual_seed(1)
local a = ml.randn({N}, {device = DEV})
local b = ml.randn({N}, {device = DEV})
local ab = a:bf16()
local biasf = ml.randn({1280}, {device = DEV})
local bias = biasf:bf16()
local x4 = ml.randn({8, 320, 160, 160}, {device = DEV})   -- NCHW-shaped, 65.5M elements
local rows = ml.randn({N // 1280, 1280}, {device = DEV})
local p, g = ml.randn({N}, {device = DEV}), ml.randn({N}, {device = DEV})
local m, v = ml.zeros({N}, {device = DEV}), ml.zeros({N}, {device = DEV})

local results = {}
local function bench(name, bytes, fn)
    local t = time(fn)
    results[#results + 1] = {name = name, t = t, bw = gbps(bytes, t)}
    collectgarbage()
end

bench("copy f32 (clone)", 8 * N, function() local y <close> = a:clone() end)
bench("add f32", 12 * N, function() local y <close> = a + b end)
bench("add_ f32 in place", 12 * N, function() a:add_(b, 1e-9) end)
bench("bf16 [N/1280,1280] + bias [1280]", 4 * N, function()
    local y <close> = ab:view(N // 1280, 1280) + bias
end)
bench("f32 [N/1280,1280] + bias [1280]", 8 * N, function()
    local y <close> = a:view(N // 1280, 1280) + biasf
end)
bench("silu bf16", 4 * N, function() local y <close> = ab:silu() end)
bench("silu forward + backward f32", 20 * N, function()
    local x = a:detach()
    x.requires_grad = true
    local y = x:silu()
    y:backward(b)
    x.grad = nil
end)
bench("to bf16 (convert)", 6 * N, function() local y <close> = a:bf16() end)
bench("permute NCHW->NHWC contiguous f32", 8 * x4:numel(), function()
    local y <close> = x4:permute(1, 3, 4, 2):contiguous()
end)
bench("sum last dim f32 [N/1280,1280]", 4 * N, function() local y <close> = rows:sum(2) end)
bench("sum first dim f32 (bias grad)", 4 * N, function() local y <close> = rows:sum(1) end)
bench("sum all f32", 4 * N, function() local y <close> = a:sum() end)
bench("randn f32", 4 * N, function() local y <close> = ml.randn({N}, {device = DEV}) end)
bench("rand f32", 4 * N, function() local y <close> = ml.rand({N}, {device = DEV}) end)
bench("adamw f32 (p, g, m, v)", 28 * N, function()
    ml.adamw_step_(p, g, m, v, 1e-4, 0.9, 0.999, 1e-8, 0.01, 10)
end)

local info = core.cuda_device_info(0)
local copy_bw = results[1].bw
print(string.format("device: %s; %d iterations each; %.0f M elements", info.name, ITERS, N / 1e6))
print(string.format("%-38s %10s %10s %9s", "kernel", "ms", "GB/s", "of copy"))
for _, r in ipairs(results) do
    print(string.format("%-38s %10.3f %10.1f %8.0f%%", r.name, r.t * 1e3, r.bw, 100 * r.bw / copy_bw))
end
-- ---- the optimizer step at SD 1.4 size ----------------------------------------
-- clip_grad_norm + AdamW over the real UNet + text encoder parameter list
-- (shapes from configs/sd-v1-4: 882 tensors, 982.6 M elements), per
-- recipe: bf16-mixed (f32 params, grads and moments) and bf16-sr (bf16
-- throughout).  "before" is the former per-tensor path (a norm read back
-- per tensor, then a scale and an AdamW launch per tensor); "multi" the
-- multi-tensor path as the examples use it, clip in place then step;
-- "deferred" hands the clip coefficient to the step as grad_scale.  Bytes: what each path must read and write once
-- (norm: g; scale in place: g read and written; AdamW: p, m, v read and
-- written, g read).  Kernel calls: host-side calls counted by core.profile
-- in one run (the norm is two launches, counted as one call).
do
    local shapes, total = {}, 0
    for _, c in ipairs {"text_encoder", "unet"} do
        local cfg = core.json_load("configs/sd-v1-4/" .. c .. "/config.json")
        local cls = cfg._class_name or (cfg.architectures and cfg.architectures[1])
        local mod = ml.nn.no_init(function() return ml.sd.models[cls]()(cfg) end)
        for _, p in ipairs(mod:parameters()) do
            shapes[#shapes + 1] = p:size()
            total = total + p:numel()
        end
    end
    local OPT_ITERS = 5
    local function time_opt(fn)
        fn()
        return core.cuda_time(function() for _ = 1, OPT_ITERS do fn() end end) / OPT_ITERS
    end
    local function kernel_calls(fn)
        local prof = core.profile(fn)
        local calls = 0
        for _, e in ipairs(prof) do calls = calls + e.calls end
        return calls
    end
    -- Half the gradients' norm: the first clip halves them, and every later
    -- one still scales (by max_norm / (max_norm + 1e-6) < 1), so the work
    -- stays the same from iteration to iteration.
    local max_norm = 0.5 * 1e-4 * math.sqrt(total)
    local rows = {}
    for _, r in ipairs {{"bf16-mixed", "f32", 4}, {"bf16-sr", "bf16", 2}} do
        local recipe, dt, es = r[1], r[2], r[3]
        local ps, gs = {}, {}
        ml.manual_seed(3)
        for i, s in ipairs(shapes) do
            ps[i] = ml.randn(s, {device = DEV}):to(dt)
            ps[i].requires_grad = true
            ps[i].grad = ml.full(s, 1e-4, {device = DEV, dtype = dt})
            gs[i] = ps[i].grad
        end
        local opt = ml.optim.AdamW(ps, {lr = 1e-6})
        opt:step()   -- allocates the moments
        local norm_bytes, scale_bytes, step_bytes = es * total, 2 * es * total, 7 * es * total
        local paths = {
            {"before: per-tensor clip + step", norm_bytes + scale_bytes + step_bytes, function()
                ml.no_grad(function()
                    local acc = 0
                    for _, g in ipairs(gs) do acc = acc + g:norm():item() ^ 2 end
                    local coef = max_norm / (math.sqrt(acc) + 1e-6)
                    if coef < 1 then for _, g in ipairs(gs) do g:mul_(coef) end end
                    for i, p in ipairs(ps) do
                        local st = opt.state[i]
                        ml.adamw_step_(p, gs[i], st.exp_avg, st.exp_avg_sq, 1e-6, 0.9, 0.999, 1e-8, 1e-2, 2)
                    end
                end)
            end},
            {"multi: clip in place, then step", norm_bytes + scale_bytes + step_bytes, function()
                ml.optim.clip_grad_norm(ps, max_norm, {sync = false})
                opt:step()
            end},
            {"multi: deferred clip (grad_scale)", norm_bytes + step_bytes, function()
                local _, coef = ml.optim.clip_grad_norm(ps, max_norm, {sync = false, scale_grads = false})
                opt:step{grad_scale = coef}
            end},
            {"  norm + coefficient alone", norm_bytes, function() ml.grad_norm_multi(gs, 2, max_norm) end},
            {"  AdamW step alone", step_bytes, function() opt:step() end},
        }
        for _, path in ipairs(paths) do
            local t = time_opt(path[3])
            rows[#rows + 1] = {recipe = recipe, path = path[1], t = t, bw = gbps(path[2], t),
                               calls = kernel_calls(path[3])}
        end
        ps, gs, opt = nil, nil, nil
        collectgarbage()
        collectgarbage()
    end
    print(string.format("\noptimizer step, SD 1.4 UNet + text encoder: %d tensors, %.1f M elements, mean of %d",
                        #shapes, total / 1e6, OPT_ITERS))
    print(string.format("%-11s %-36s %9s %9s %8s %12s", "recipe", "path", "ms", "GB/s", "of copy", "kernel calls"))
    for _, r in ipairs(rows) do
        print(string.format("%-11s %-36s %9.3f %9.1f %7.0f%% %12d", r.recipe, r.path, r.t * 1e3, r.bw,
                            100 * r.bw / copy_bw, r.calls))
    end
end

local st = core.cuda_memory_stats(0)
print(string.format("allocator: peak %.2f GiB, reserved %.2f GiB, %d cudaMalloc calls for %d allocations",
                    st.peak / 2 ^ 30, st.reserved / 2 ^ 30, st.num_cudamalloc, st.num_allocs))
