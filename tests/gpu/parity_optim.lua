-- parity_optim.lua — CPU vs GPU parity of the optimizer kernels
-- (kernels/cpu/optim.c, kernels/cuda/optim.cu), bit for bit: the bf16-sr
-- AdamW step, whose stochastic rounding takes its bits from the Philox
-- stream (seed, offset); the multi-tensor AdamW over lists of mixed sizes
-- and dtypes, with and without a device grad_scale; and the total gradient
-- norm, clip coefficient and in-place scale.  Both devices compute in IEEE
-- arithmetic with no fused multiply-adds, draw the same lanes, and reduce
-- the norm in the same fixed order (kernels/optim.h), hence rtol = atol =
-- 0.  Loaded by test_parity.lua; outputs are returned widened to f32
-- (exact for bf16 and f16).  The multi-tensor cases sit under the
-- registry's adamw_step op, the optimizer family's one entry.
return function(case, ml)
    -- steps of AdamW on an [N, C] parameter held in p_dt with moments in
    -- s_dt and gradients in g_dt; step k uses offset 77 + k * numel, as a
    -- generator would advance.
    local function run(p_dt, s_dt, g_dt, lr, steps)
        return function(M)
            local p = M.const(300, 37):to(p_dt)
            local m = (M.const(300, 37) * 1e-2):to(s_dt)
            local v = (M.const(300, 37):abs() * 1e-4):to(s_dt)
            for k = 1, steps do
                local g = (M.const(300, 37) * 1e-2):to(g_dt)
                ml.adamw_step_(p, g, m, v, lr, 0.9, 0.999, 1e-8, 1e-2, k + 3, 1234, 77 + (k - 1) * p:numel())
            end
            return {ml.cat({p:float():reshape(-1), m:float():reshape(-1), v:float():reshape(-1)}, 1)}
        end
    end
    local exact = {grad = false, rtol = 0, atol = 0}
    local id = function(x) return x end
    case("adamw_step", "sr: 1 step bf16 param, bf16 moments, bf16 grad, lr 1e-3", id,
         run("bf16", "bf16", "bf16", 1e-3, 1), exact)
    case("adamw_step", "sr: 3 steps bf16 param, bf16 moments, bf16 grad, lr 5e-6", id,
         run("bf16", "bf16", "bf16", 5e-6, 3), exact)
    case("adamw_step", "sr: 2 steps bf16 param, f32 moments, f32 grad", id, run("bf16", "f32", "f32", 1e-4, 2), exact)
    case("adamw_step", "sr: 2 steps f32 param, bf16 moments, f32 grad", id, run("f32", "bf16", "f32", 1e-4, 2), exact)

    -- ---- multi-tensor ------------------------------------------------------

    -- Sizes around the lane width (256) and the chunk (65536), an empty and
    -- a one-element tensor.
    local SIZES = {1, 3, 257, 0, 65536, 65537, 1000, 140000}

    -- A list of SIZES with dtype combinations combos[(i - 1) % #combos + 1]
    -- ({param, grad, moments}).
    local function list(M, combos, k)
        local L = {p = {}, g = {}, m = {}, v = {}}
        for i, n in ipairs(SIZES) do
            local c = combos[(i - 1) % #combos + 1]
            L.p[i] = M.const(n):to(c[1])
            L.g[i] = (M.const(n) * 1e-2):to(c[2])
            L.m[i] = (M.const(n) * 1e-3):to(c[3])
            L.v[i] = (M.const(n):abs() * 1e-5):to(c[3])
        end
        return L
    end
    local function flat(ts)
        local parts = {}
        for _, t in ipairs(ts) do parts[#parts + 1] = t:float():reshape(-1) end
        return ml.cat(parts, 1)
    end

    -- Three steps of ml.adamw_multi_ over the list, fresh gradients each
    -- step, per-tensor steps (1, 2, 3, 1, ...); with_scale: every step
    -- clipped through the device coefficient (grad_scale), as the recipe's
    -- deferred clip does.
    local function multi(combos, with_scale)
        return function(M)
            local L = list(M, combos)
            local steps = {}
            for i = 1, #SIZES do steps[i] = (i - 1) % 3 + 1 end
            local norms = {}
            for k = 1, 3 do
                for i = 1, #SIZES do L.g[i] = (M.const(SIZES[i]) * (1e-2 * k)):to(L.g[i].dtype) end
                local opts = {seed = 99, offset = 1000 * k}
                if with_scale then
                    local n, c = ml.grad_norm_multi(L.g, 2, 0.5)
                    norms[#norms + 1], norms[#norms + 2] = n:reshape(1), c:reshape(1)
                    opts.grad_scale = c
                end
                ml.adamw_multi_(L.p, L.g, L.m, L.v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, steps, opts)
                for i = 1, #SIZES do steps[i] = steps[i] + 1 end
            end
            local all = {flat(L.p), flat(L.m), flat(L.v)}
            if with_scale then all[4] = flat(norms) end
            return {ml.cat(all, 1)}
        end
    end
    local F32 = {{"f32", "f32", "f32"}}
    local SR = {{"bf16", "bf16", "bf16"}}
    -- every combination both devices take (the CPU's bf16-sr step refuses f16 grads)
    local MIXED = {{"bf16", "bf16", "bf16"}, {"f32", "f32", "f32"}, {"f32", "bf16", "f32"}, {"bf16", "f32", "f32"},
                   {"f32", "f32", "bf16"}, {"bf16", "bf16", "f32"}, {"f32", "f16", "f32"}}
    case("adamw_step", "multi: 3 steps, f32 list of 8 sizes", id, multi(F32), exact)
    case("adamw_step", "multi: 3 steps, bf16-sr list of 8 sizes", id, multi(SR), exact)
    case("adamw_step", "multi: 3 steps, 7 dtype combinations in one list", id, multi(MIXED), exact)
    case("adamw_step", "multi: f32 list, clip coefficient as grad_scale", id, multi(F32, true), exact)
    case("adamw_step", "multi: bf16-sr list, clip coefficient as grad_scale", id, multi(SR, true), exact)
    case("adamw_step", "multi: f64 list", id, multi({{"f64", "f64", "f64"}}), exact)

    -- The norm (2, inf, 1) and coefficient over mixed dtypes, then the
    -- gradients scaled in place by it.
    local function norm_scale(norm_type, max_norm)
        return function(M)
            local dts = {"f32", "bf16", "f16", "f32", "bf16", "f32", "f16", "f32"}
            local gs = {}
            for i, n in ipairs(SIZES) do gs[i] = (M.const(n) * 1e-2):to(dts[i]) end
            local n, c = ml.grad_norm_multi(gs, norm_type, max_norm)
            ml.scale_multi_(gs, c)
            return {ml.cat({n:reshape(1), c:reshape(1), flat(gs)}, 1)}
        end
    end
    case("adamw_step", "multi: 2-norm, coefficient and scale over f32/bf16/f16", id, norm_scale(2, 0.5), exact)
    case("adamw_step", "multi: inf-norm, coefficient and scale", id, norm_scale(math.huge, 1e-3), exact)
    -- pow() may round the last bit apart on the two devices: one ulp of f32
    case("adamw_step", "multi: 1-norm (pow path), coefficient and scale", id, norm_scale(1, 0.5),
         {grad = false, rtol = 2 ^ -22, atol = 0})
end
