-- bench_attention.lua — time of the CUDA scaled dot-product attention on
-- Stable Diffusion's shapes (512 px, batch 2), forward and forward+backward,
-- in f32 and bf16.  Run from the repository root on a GPU machine:
--
--     build/moonlit tests/gpu/bench_attention.lua
--
-- TFLOP/s are nominal: 4 B H Sq Sk D flops for the forward (two products),
-- 2.5 times that for the backward (five products), halved under the causal
-- mask; the backward also recomputes the scores, which is not counted.
local ml = require "moonlit"
local core = ml.core

local ok, why = core.cuda_available()
if not ok then
    print("bench_attention: no usable GPU: " .. tostring(why))
    os.exit(1)
end

local DEV = "cuda"
local ITERS = 10
local sdpa = ml.F.scaled_dot_product_attention

local function time(fn)
    fn()
    return core.cuda_time(function()
        for _ = 1, ITERS do fn() end
    end) / ITERS
end

-- name, B, Sq, Sk, H, D, causal
local shapes = {
    {"SD1 64x64 self (D 40)", 2, 4096, 4096, 8, 40, false},
    {"SD1 64x64 cross (D 40, 77 keys)", 2, 4096, 77, 8, 40, false},
    {"SD1 32x32 self (D 80)", 2, 1024, 1024, 8, 80, false},
    {"SD1 16x16 self (D 160)", 2, 256, 256, 8, 160, false},
    {"SD2 64x64 self (D 64)", 2, 4096, 4096, 5, 64, false},
    {"CLIP text (D 64, causal)", 2, 77, 77, 12, 64, true},
    {"VAE mid-block 64x64 (D 512)", 1, 4096, 4096, 1, 512, false},
}

print(string.format("%-34s %-5s %10s %10s %10s %10s", "shape", "dtype", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s"))
for _, s in ipairs(shapes) do
    local name, B, Sq, Sk, H, D, causal = table.unpack(s)
    for _, dt in ipairs {"f32", "bf16"} do
        ml.manual_seed(1)
        local q = ml.randn({B, Sq, H, D}, {device = DEV}):to(dt)
        local k = ml.randn({B, Sk, H, D}, {device = DEV}):to(dt)
        local v = ml.randn({B, Sk, H, D}, {device = DEV}):to(dt)
        local g = ml.randn({B, Sq, H, D}, {device = DEV}):to(dt)
        local opts = {causal = causal}
        local fwd = time(function() ml.no_grad(function() return sdpa(q, k, v, opts) end) end)
        q.requires_grad, k.requires_grad, v.requires_grad = true, true, true
        local both = time(function()
            sdpa(q, k, v, opts):backward(g)
            q.grad, k.grad, v.grad = nil, nil, nil
        end)
        q.requires_grad, k.requires_grad, v.requires_grad = false, false, false
        local flops = 4 * B * H * Sq * Sk * D * (causal and 0.5 or 1)
        local bwd = math.max(both - fwd, 1e-9)
        print(string.format("%-34s %-5s %10.3f %10.2f %10.3f %10.2f", name, dt, fwd * 1e3, flops / fwd / 1e12,
                            bwd * 1e3, 2.5 * flops / bwd / 1e12))
        q, k, v, g = nil, nil, nil, nil
        collectgarbage()
    end
end
