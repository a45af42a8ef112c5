-- fingerprint_kernels.lua — a 64-bit fingerprint of the exact bits that
-- attention (forward and backward) and the multi-tensor optimizer kernels
-- (AdamW, gradient norm, scale) produce on one device, one row per case.
-- A change that should not move any bit (a refactor of the kernel
-- boundary, of where scratch memory comes from) is checked by running this
-- with the binary built before it and the one built after, on the same
-- machine, and diffing the two outputs:
--
--     build-old/moonlit tests/gpu/fingerprint_kernels.lua > before.txt
--     build/moonlit tests/gpu/fingerprint_kernels.lua > after.txt
--     diff before.txt after.txt && echo "same bits"
--
-- Options: --device cuda|cpu (default cuda; cpu exercises the script and
-- the CPU kernels).  Run it once per attention path worth comparing:
-- MOONLIT_CUDNN_SDPA=0 (moonlit's own flash and tensor-core kernels),
-- MOONLIT_CUDNN_SDPA=deterministic (cuDNN, deterministic backward).  cuDNN's
-- default backward accumulates dq with atomics, so its dq may differ from
-- run to run: the "repeat" column says whether a second run of the case in
-- the same process gave the same fingerprint, and a "no" row is not
-- comparable across binaries.
--
-- A fingerprint hashes the float64 bit pattern of every element (each
-- value widened exactly), in row-major order, of every result of the case:
-- each pattern goes through splitmix64's mixer (widened f32 and half values
-- have their low 29 or more bits zero, which a plain multiplicative hash
-- would never mix upwards), then is folded into the running hash, so any
-- changed bit of any element changes the fingerprint.
local ml = require "moonlit"
local core = ml.core

local args
do
    local p = ml.argparse.new("fingerprint_kernels.lua", "Exact-bits fingerprints of the attention and optimizer kernels.")
    p:option("device", {default = "cuda", choices = {"cuda", "cpu"}, help = "where the kernels run"})
    args = p:parse(arg or {})
end
local DEV = args.device
if DEV == "cuda" then
    local ok, why = core.cuda_available()
    if not ok then
        print("fingerprint_kernels: no usable GPU: " .. tostring(why))
        os.exit(1)
    end
end

-- 64-bit integer arithmetic wraps, and >> is a logical shift (Lua 5.4);
-- hex literals past 2^63 wrap to the same bits.
local function mix(x)
    x = (x ~ (x >> 30)) * 0xbf58476d1ce4e5b9
    x = (x ~ (x >> 27)) * 0x94d049bb133111eb
    return x ~ (x >> 31)
end

-- Folds the elements of t (and its element count) into h.
local function fold(h, t)
    local vals = t:detach():cpu():to("f64"):reshape(-1):totable()
    h = mix(h ~ #vals)
    for i = 1, #vals do
        h = mix(h + mix(string.unpack("<i8", string.pack("<d", vals[i]))))
    end
    return h
end

local function fingerprint(list)
    local h = 0x9e3779b97f4a7c15
    for _, t in ipairs(list) do h = fold(h, t) end
    return string.format("%016x", h)
end

local rows = {}
-- Runs make() twice (it returns the case's result tensors) and records
-- the first fingerprint and whether the second matched.
local function case(family, name, make)
    local first = fingerprint(make())
    local again = fingerprint(make())
    rows[#rows + 1] = {family, name, first, first == again and "yes" or "no"}
    collectgarbage()
end

-- ---- attention ---------------------------------------------------------------

local sdpa = ml.F.scaled_dot_product_attention
-- name, B, Sq, Sk, H, D, Dv, causal: the head widths of SD (40, 80, 160)
-- and CLIP (64), cross attention over 77 keys, partial tiles, the VAE's
-- single wide head (beyond cuDNN's 256: the tensor-core path in f16/bf16).
local shapes = {
    {"heads 4, D 8, causal", 2, 13, 13, 4, 8, 8, true},
    {"cross, 77 keys, D 40", 2, 70, 77, 2, 40, 40, false},
    {"D 80, causal, partial tiles", 1, 100, 100, 2, 80, 80, true},
    {"D 160, cross", 2, 40, 77, 2, 160, 160, false},
    {"D 64, Dv 32, Sq != Sk", 1, 50, 90, 3, 64, 32, false},
    {"single head D 512", 1, 64, 64, 1, 512, 512, false},
}
local dtypes = DEV == "cuda" and {"f32", "bf16", "f16"} or {"f32", "f64"}

for _, dt in ipairs(dtypes) do
    for _, s in ipairs(shapes) do
        local name, B, Sq, Sk, H, D, Dv, causal = table.unpack(s)
        case("sdpa " .. dt, name, function()
            ml.manual_seed(1)
            local q = ml.randn({B, Sq, H, D}, {device = DEV}):to(dt)
            local k = ml.randn({B, Sk, H, D}, {device = DEV}):to(dt)
            local v = ml.randn({B, Sk, H, Dv}, {device = DEV}):to(dt)
            local g = ml.randn({B, Sq, H, Dv}, {device = DEV}):to(dt)
            q.requires_grad, k.requires_grad, v.requires_grad = true, true, true
            local out = sdpa(q, k, v, {causal = causal})
            out:backward(g)
            return {out, q.grad, k.grad, v.grad}
        end)
    end
end

-- ---- optimizer -----------------------------------------------------------------

-- A list of parameters of mixed sizes (a bias, a matrix, one past a
-- 65536-element chunk, an empty one) in the given dtypes, with gradients
-- and moments, drawn from seed 2.
local function params(p_dt, g_dt, s_dt)
    ml.manual_seed(2)
    local sizes = {{320}, {37, 300}, {65537}, {0}}
    local ps, gs, ms, vs = {}, {}, {}, {}
    for i, sz in ipairs(sizes) do
        ps[i] = ml.randn(sz, {device = DEV}):to(p_dt)
        gs[i] = (ml.randn(sz, {device = DEV}) * 1e-2):to(g_dt)
        ms[i] = (ml.randn(sz, {device = DEV}) * 1e-2):to(s_dt)
        vs[i] = (ml.randn(sz, {device = DEV}):abs() * 1e-4):to(s_dt)
    end
    return ps, gs, ms, vs
end

local function adamw_case(name, p_dt, g_dt, s_dt, clip)
    case("adamw_multi", name, function()
        local ps, gs, ms, vs = params(p_dt, g_dt, s_dt)
        local out = {}
        for step = 1, 3 do
            local opts = {seed = 1234, offset = 77 + step * 100000}
            if clip then
                local norm, coef = core.grad_norm_multi(gs, 2, 0.05)
                opts.grad_scale = coef
                out[#out + 1] = norm
            end
            core.adamw_multi_(ps, gs, ms, vs, 1e-3, 0.9, 0.999, 1e-8, 1e-2, step + 3, opts)
        end
        for i = 1, #ps do
            out[#out + 1] = ps[i]; out[#out + 1] = ms[i]; out[#out + 1] = vs[i]
        end
        return out
    end)
end

if DEV == "cuda" then
    adamw_case("f32 params, f32 grads", "f32", "f32", "f32", false)
    adamw_case("f32 params, bf16 grads, clipped (device grad_scale)", "f32", "bf16", "f32", true)
    adamw_case("f32 params, f16 grads", "f32", "f16", "f32", false)
    adamw_case("bf16-sr: bf16 params, bf16 moments", "bf16", "bf16", "bf16", false)
    adamw_case("bf16-sr: f32 params, bf16 moments, clipped", "f32", "f32", "bf16", true)
else
    adamw_case("f32 params, f32 grads", "f32", "f32", "f32", false)
    adamw_case("f32 params, f32 grads, clipped", "f32", "f32", "f32", true)
    adamw_case("bf16-sr: bf16 params, bf16 moments", "bf16", "bf16", "bf16", false)
end
adamw_case("f64", "f64", "f64", "f64", true)

for _, nt in ipairs({2, math.huge, 1.5}) do
    for _, dt in ipairs(DEV == "cuda" and {"f32", "bf16", "f64"} or {"f32", "f64"}) do
        case("grad_norm + scale_", string.format("norm_type %s, %s", tostring(nt), dt), function()
            local _, gs = params("f32", dt, "f32")
            local norm, coef = core.grad_norm_multi(gs, nt, 0.01)   -- every norm type clips
            core.scale_multi_(gs, coef)
            local out = {norm, coef}
            for i = 1, #gs do out[#out + 1] = gs[i] end
            return out
        end)
    end
end

-- ---- the table -------------------------------------------------------------------

local env = os.getenv("MOONLIT_CUDNN_SDPA")
print(string.format("device %s, MOONLIT_CUDNN_SDPA=%s", DEV, env or "(unset)"))
print(string.format("%-20s %-52s %-16s %s", "family", "case", "fingerprint", "repeat"))
for _, r in ipairs(rows) do print(string.format("%-20s %-52s %-16s %s", r[1], r[2], r[3], r[4])) end
