-- bench_kernels.lua — bandwidth of the CUDA copy, elementwise, reduction,
-- random and AdamW kernels on large tensors, as a fraction of the device's
-- plain copy bandwidth (these kernels are memory-bound: ~80% or more is the
-- goal).  Run from the repository root on a GPU machine:
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
local st = core.cuda_memory_stats(0)
print(string.format("allocator: peak %.2f GiB, reserved %.2f GiB, %d cudaMalloc calls for %d allocations",
                    st.peak / 2 ^ 30, st.reserved / 2 ^ 30, st.num_cudamalloc, st.num_allocs))
