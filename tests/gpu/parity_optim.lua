-- parity_optim.lua — CPU vs GPU parity of the bf16-sr AdamW step
-- (kernels/cpu/optim.c, kernels/cuda/optim.cu): bf16 results are stored
-- with stochastic rounding whose bits come from the Philox stream
-- (seed, offset), so with a fixed seed both devices must give the same bits.
-- Both compute in f32 with IEEE rounding and no fused multiply-adds, and the
-- rounding draws the same lanes, hence rtol = atol = 0.  Loaded by
-- test_parity.lua; outputs are returned widened to f32 (exact for bf16).
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
end
