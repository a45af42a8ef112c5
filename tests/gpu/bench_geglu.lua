-- bench_geglu.lua — the fused GEGLU (F.geglu) beside the unfused form it
-- replaced in GEGLU:forward (two narrows, gelu, product), on SD 1.x
-- feed-forward shapes: h [B, S, 2n] as proj gives it.  Per row: ms forward
-- and forward + backward, the kernels each launches (core.profile, one
-- run), and the fused op's bandwidth against a plain copy of h.  Then the
-- difference between the two in bf16 (the fused op rounds once, the unfused
-- form rounds gelu(gate) first).  Run from the repository root on a GPU:
--
--     build/moonlit tests/gpu/bench_geglu.lua
--
-- Bytes counted: forward reads h and writes out (3n per row); backward reads
-- h and dout and writes dh (5n per row).
local ml = require "moonlit"
local core = ml.core
local F = ml.F

local ok, why = core.cuda_available()
if not ok then
    print("bench_geglu: no usable GPU: " .. tostring(why))
    os.exit(1)
end

local DEV, ITERS = "cuda", 20

local function unfused(h)
    local n = h:size(-1) // 2
    return h:narrow(-1, 1, n) * ml.gelu(h:narrow(-1, n + 1, n))
end

local function time(fn)
    fn()
    return core.cuda_time(function() for _ = 1, ITERS do fn() end end) / ITERS
end

local function launches(fn)
    local calls = 0
    for _, e in ipairs(core.profile(fn)) do calls = calls + e.calls end
    return calls
end

-- {B, S, n}: SD 1.x at 512x512, the 64x64 / 32x32 / 16x16 levels (n = 4 * channels), batch 4
local shapes = {{4, 4096, 1280}, {4, 1024, 2560}, {4, 256, 5120}}
local rows = {}
for _, dt in ipairs {"bf16", "f32"} do
    for _, s in ipairs(shapes) do
        local B, S, n = s[1], s[2], s[3]
        ml.manual_seed(1)
        local h = ml.randn({B, S, 2 * n}, {device = DEV}):to(dt)
        h.requires_grad = true
        local g = ml.randn({B, S, n}, {device = DEV}):to(dt)
        local es = dt == "bf16" and 2 or 4
        local copy_t = time(function() local y <close> = h:detach():clone() end)
        local copy_bw = 2 * es * B * S * 2 * n / copy_t
        for _, form in ipairs {{"fused", F.geglu}, {"unfused", unfused}} do
            local name, fn = form[1], form[2]
            local fwd = time(function() local y <close> = fn(h) end)
            local both = time(function()
                local y = fn(h)
                y:backward(g)
                h.grad = nil
            end)
            local y
            local lf = launches(function() y = fn(h) end)
            local lb = launches(function() y:backward(g) end)
            h.grad = nil
            local bytes = es * B * S * (3 * n + 5 * n)
            rows[#rows + 1] = {string.format("%s %-4s [%d,%d,%d]", name, dt, B, S, 2 * n), fwd, both, lf, lb,
                               bytes / both / copy_bw}
            collectgarbage()
        end
    end
end

local info = core.cuda_device_info(0)
print(string.format("device: %s; %d iterations each", info.name, ITERS))
print(string.format("%-30s %9s %11s %9s %9s %8s", "form dtype [B,S,2n]", "fwd ms", "fwd+bwd ms", "fwd kern",
                    "bwd kern", "of copy"))
for _, r in ipairs(rows) do
    print(string.format("%-30s %9.3f %11.3f %9d %9d %7.0f%%", r[1], r[2] * 1e3, r[3] * 1e3, r[4], r[5], 100 * r[6]))
end

-- bf16: fused vs unfused against the f32 result of the same bf16 inputs
do
    ml.manual_seed(2)
    local h = ml.randn({4, 1024, 2560}, {device = DEV}):bf16()
    local ref = F.geglu(h:float()):double()
    local f, u = F.geglu(h):double(), unfused(h):double()
    local fe, ue = (f - ref):abs(), (u - ref):abs()
    local rel = (f - u):abs() / (ref:abs() + 1e-30)
    print(string.format("bf16 vs f32: fused max err %.3g (mean %.3g), unfused max err %.3g (mean %.3g); "
                        .. "max |fused - unfused| / |ref| %.3g (2^-7 = %.3g); fused farther than unfused in %d "
                        .. "of %d elements", fe:max():item(), fe:mean():item(), ue:max():item(), ue:mean():item(),
                        rel:max():item(), 2 ^ -7, (fe - ue):gt(0):long():sum():item(), f:numel()))
end
