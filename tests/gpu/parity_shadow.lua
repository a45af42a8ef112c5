-- parity_shadow.lua — the autocast shadow cache on the GPU
-- (lua/moonlit/nn.lua "mixed precision", core.cast_as, AdamW's shadow
-- write in kernels/cuda/optim.cu).  Loaded by test_parity.lua:
--   cast_as     the op against the CPU, forward and gradient (bf16, f16
--               shadows; a non-contiguous input);
--   adamw_step  multi-tensor AdamW with shadows, bit for bit against the
--               CPU, each step's shadow checked on its own device against
--               :to(dtype) of the stepped parameter (any differing bit is
--               an error naming the tensor);
--   cast_as     bf16-mixed training (Linear, Conv2d, GroupNorm, LayerNorm),
--               three AdamW steps with the cache on and off, bit for bit on
--               the device: outputs, every gradient, the final weights.  The
--               case returns the largest difference (0); the CPU run of the
--               same case computes in f64 (no bf16 compute there).
return function(case, ml)
    local nn = ml.nn
    local core = ml.core

    case("cast_as", "f32 through a bf16 shadow", function(x) return ml.cast_as(x, x:detach():to("bf16")):float() * 2 end,
         function(M) return {M.randn(300, 70)} end)
    case("cast_as", "non-contiguous f32 through an f16 shadow", function(x)
        return ml.cast_as(x, x:detach():to("f16")):float() * 2
    end, function(M) return {M.randn_nc(40, 30)} end)

    -- max |a - b| over two tensors of any dtype, as a number (0 means equal
    -- values; the dtypes compared are floating and NaN-free here).
    local function diff(a, b) return (a:double() - b:double()):abs():max():item() end

    local exact = {grad = false, rtol = 0, atol = 0}
    local id = function(x) return x end
    local SIZES = {1, 257, 0, 65536, 65537, 140000}
    local function shadow_steps(p_dt, s_dt, sh_dt, with_scale)
        return function(M)
            local P, G, Mo, V, S = {}, {}, {}, {}, {}
            for i, n in ipairs(SIZES) do
                P[i] = M.const(n):to(p_dt)
                Mo[i] = (M.const(n) * 1e-3):to(s_dt)
                V[i] = (M.const(n):abs() * 1e-5):to(s_dt)
                S[i] = M.const(n):to(sh_dt)   -- stale values: the step must overwrite all of them
            end
            for k = 1, 3 do
                for i, n in ipairs(SIZES) do G[i] = (M.const(n) * (1e-2 * k)):to(p_dt == "bf16" and "f32" or p_dt) end
                local opts = {seed = 5, offset = 1000 * k, shadows = S}
                if with_scale then
                    local _, c = ml.grad_norm_multi(G, 2, 0.5)
                    opts.grad_scale = c
                end
                ml.adamw_multi_(P, G, Mo, V, 1e-3, 0.9, 0.999, 1e-8, 1e-2, k, opts)
                for i = 1, #SIZES do
                    if SIZES[i] > 0 and diff(S[i], P[i]:to(sh_dt)) ~= 0 then
                        error(string.format("step %d, tensor %d (%d elements): the %s shadow is not :to('%s') of "
                                            .. "the stepped %s param", k, i, SIZES[i], sh_dt, sh_dt, p_dt))
                    end
                end
            end
            local parts = {}
            for i = 1, #SIZES do
                parts[#parts + 1] = P[i]:float():reshape(-1)
                parts[#parts + 1] = Mo[i]:float():reshape(-1)
                parts[#parts + 1] = V[i]:float():reshape(-1)
                parts[#parts + 1] = S[i]:float():reshape(-1)
            end
            return {ml.cat(parts, 1)}
        end
    end
    case("adamw_step", "shadows: f32 params, bf16 shadows, 3 steps", id, shadow_steps("f32", "f32", "bf16", false), exact)
    case("adamw_step", "shadows: f32 params, bf16 shadows, grad_scale", id, shadow_steps("f32", "f32", "bf16", true),
         exact)
    case("adamw_step", "shadows: f32 params, f16 shadows", id, shadow_steps("f32", "f32", "f16", false), exact)
    case("adamw_step", "shadows: bf16-sr params, f32 shadows", id, shadow_steps("bf16", "bf16", "f32", false), exact)
    case("adamw_step", "shadows: f64 params, f32 shadows", id, shadow_steps("f64", "f64", "f32", false), exact)

    -- bf16-mixed training with the cache on and off, on one device.
    local function train(dev, compute, cache)
        local prev = nn.autocast_cache(cache)
        ml.manual_seed(8)
        local net = nn.Sequential(nn.Conv2d(4, 32, 3, {padding = 1}), nn.GroupNorm(4, 32), nn.SiLU(),
                                  nn.Conv2d(32, 32, 1))
        local head = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 8))
        net:to(dev)
        head:to(dev)
        local frozen = net:children()[4]   -- a frozen 1x1 conv: shadowed once
        frozen.weight.requires_grad, frozen.bias.requires_grad = false, false
        local params = {}
        for _, p in ipairs(nn.parameters(net, head)) do if p.requires_grad then params[#params + 1] = p end end
        local opt = ml.optim.AdamW(params, {lr = 1e-3})
        local x = ml.randn({2, 8, 8, 4}):to(dev)
        local rec = {}
        for _ = 1, 3 do
            opt:zero_grad()
            local y = nn.autocast(compute, function()
                local h = net(x)
                return head(h:reshape(2 * 8 * 8, 32))
            end)
            ;(y:float() ^ 2):mean():backward()
            rec[#rec + 1] = y:detach():clone()
            for _, p in ipairs(params) do rec[#rec + 1] = p.grad:clone() end
            opt:step()
        end
        for _, p in ipairs(params) do rec[#rec + 1] = p:detach():clone() end
        nn.autocast_cache(prev)
        return rec
    end
    case("cast_as", "bf16-mixed training: cache on = cache off, bit for bit", id, function(M)
        local compute = M.dev == "cpu" and "f64" or "bf16"
        local off, on, off2 = train(M.dev, compute, false), train(M.dev, compute, true), train(M.dev, compute, false)
        -- Two runs without the cache must agree first, or a difference
        -- would be the device's nondeterminism, not the cache's.
        for i = 1, #off do
            local d = diff(off2[i], off[i])
            if d ~= 0 then error(string.format("on %s: two runs without the cache differ (tensor %d by %g): the "
                                               .. "training step is not deterministic here", M.dev, i, d)) end
        end
        local worst = 0
        for i = 1, #off do
            local d = diff(on[i], off[i])
            if d ~= 0 then error(string.format("on %s: tensor %d of the record differs by %g with the cache", M.dev, i, d)) end
            worst = math.max(worst, d)
        end
        return {ml.full({1}, worst, {device = M.dev})}
    end, exact)
end
