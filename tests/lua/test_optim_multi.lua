-- test_optim_multi.lua — AdamW:step as one multi-tensor call and
-- clip_grad_norm computed on the device: both give the bits of the
-- one-tensor-at-a-time code they replaced (the loop of ml.adamw_step_
-- calls, the in-place clip followed by the step), the generator moves
-- exactly as far, and the norm matches a plain Lua computation.
local ml = require "moonlit"
local util = require "testutil"
local optim = ml.optim

local tests = {}
local has, error_of = util.has, util.error_of

-- Bit-for-bit equality (widening to f64 is exact for every float dtype).
local function same(a, b)
    if a.dtype ~= b.dtype or a:numel() ~= b:numel() then return false end
    if a:numel() == 0 then return true end
    return a:double():ne(b:double()):long():sum():item() == 0
end

local SHAPES = {{1}, {3}, {320}, {4, 5}, {0}, {65537}, {8, 3, 3, 4}, {2, 77}}

-- Parameters of SHAPES in dtype dt, deterministic values, and gradients of
-- step k.
local function params(dt)
    local ps = {}
    for i, s in ipairs(SHAPES) do
        ml.manual_seed(100 + i)
        ps[i] = ml.randn(s):to(dt)
        ps[i].requires_grad = true
    end
    return ps
end

local function set_grads(ps, k, skip)
    for i, p in ipairs(ps) do
        if i == skip then
            p.grad = nil
        else
            ml.manual_seed(1000 * k + i)
            p.grad = (ml.randn(p:size()) * 1e-2):to(p.dtype)
        end
    end
end

-- The former AdamW:step: one ml.adamw_step_ per parameter, default generator.
local function loop_step(ps, state, o, dt_state)
    ml.no_grad(function()
        for i, p in ipairs(ps) do
            if p.grad then
                local s = state[i]
                if not s then
                    s = {step = 0, m = ml.zeros_like(p, {dtype = dt_state or p.dtype}),
                         v = ml.zeros_like(p, {dtype = dt_state or p.dtype})}
                    state[i] = s
                end
                s.step = s.step + 1
                ml.adamw_step_(p, p.grad, s.m, s.v, o.lr, 0.9, 0.999, 1e-8, o.weight_decay, s.step)
            end
        end
    end)
end

local function adamw_matches_loop(t, dt, state_dtype)
    local o = {lr = 1e-3, weight_decay = 1e-2, state_dtype = state_dtype}
    local a, b = params(dt), params(dt)
    local opt, state = optim.AdamW(a, o), {}
    for k = 1, 3 do
        -- parameter 3 has no gradient at step 2: its step count falls behind
        set_grads(a, k, k == 2 and 3 or nil)
        set_grads(b, k, k == 2 and 3 or nil)
        ml.manual_seed(7)
        opt:step()
        local _, off_multi = ml.get_rng_state()
        ml.manual_seed(7)
        loop_step(b, state, o, state_dtype)
        local _, off_loop = ml.get_rng_state()
        t:assertEq(off_multi, off_loop, dt .. " step " .. k .. ": the generator moved as far as the loop moved it")
    end
    for i = 1, #a do
        t:assert(same(a[i], b[i]), string.format("%s param %d equals the loop's bit for bit", dt, i))
        if opt.state[i] then
            t:assert(same(opt.state[i].exp_avg, state[i].m) and same(opt.state[i].exp_avg_sq, state[i].v),
                     string.format("%s moments %d equal the loop's", dt, i))
            t:assertEq(opt.state[i].step, state[i].step, "step counts")
        end
    end
    t:assertEq(opt.state[3].step, 2, "the parameter without a gradient at step 2 took two steps")
    t:assertEq(opt.state[1].step, 3)
end

function tests.adamw_step_equals_the_loop_f32(t) adamw_matches_loop(t, "f32") end
function tests.adamw_step_equals_the_loop_f64(t) adamw_matches_loop(t, "f64") end
function tests.adamw_step_equals_the_loop_bf16_sr(t) adamw_matches_loop(t, "bf16") end
function tests.adamw_step_equals_the_loop_bf16_f32_moments(t) adamw_matches_loop(t, "bf16", "f32") end

-- Total 2-norm, inf-norm and 1-norm in plain Lua doubles.
local function lua_norms(ps)
    local sq, mx, l1 = 0, 0, 0
    for _, p in ipairs(ps) do
        if p.grad and p.grad:numel() > 0 then
            for _, x in ipairs(p.grad:double():reshape(-1):totable()) do
                sq, l1 = sq + x * x, l1 + math.abs(x)
                mx = math.max(mx, math.abs(x))
            end
        end
    end
    return math.sqrt(sq), mx, l1
end

function tests.clip_grad_norm_number_and_device_forms(t)
    for _, dt in ipairs {"f32", "bf16", "f64"} do
        local a, b = params(dt), params(dt)
        set_grads(a, 1)
        set_grads(b, 1)
        local l2 = lua_norms(a)
        local n = optim.clip_grad_norm(a, 0.05)
        t:assert(type(n) == "number", "the number form returns a number")
        t:assertNear(n, l2, 1e-6 * l2, dt .. ": 2-norm against plain Lua")
        local nt, coef = optim.clip_grad_norm(b, 0.05, {sync = false})
        t:assert(ml.is_tensor(nt) and nt.dtype == "f32" and nt:dim() == 0, "the device form returns a 0-dim f32 tensor")
        t:assertEq(nt:item(), n, dt .. ": device form == number form")
        local want = 0.05 / (n + 1e-6)
        t:assertNear(coef:item(), want, 1e-6 * want, dt .. ": the coefficient")
        for i = 1, #a do t:assert(same(a[i].grad, b[i].grad), dt .. ": both forms scale the gradients alike " .. i) end
        local after = lua_norms(a)
        t:assertNear(after, 0.05, 0.05 * (dt == "bf16" and 1e-2 or 1e-5), dt .. ": clipped to max_norm")
    end
end

function tests.clip_grad_norm_other_norm_types(t)
    local a = params("f32")
    set_grads(a, 2)
    local _, mx, l1 = lua_norms(a)
    t:assertNear(optim.clip_grad_norm(a, 1e9, math.huge), mx, 1e-7 * mx, "inf-norm is the largest |g|")
    t:assertNear(optim.clip_grad_norm(a, 1e9, 1), l1, 1e-6 * l1, "1-norm")
    t:assertNear(optim.clip_grad_norm(a, 1e9, {norm_type = 1}), l1, 1e-6 * l1, "norm_type in the options table")
    local n, c = optim.clip_grad_norm(a, 1e9, math.huge, {sync = false})
    t:assertNear(n:item(), mx, 1e-7 * mx, "device inf-norm")
    t:assertEq(c:item(), 1, "max_norm above the norm: coefficient 1")
end

-- Clip deferred to the step (scale_grads = false, step{grad_scale}) gives
-- the bits of clipping in place and then stepping.
function tests.deferred_clip_equals_clip_then_step(t)
    for _, dt in ipairs {"f32", "bf16"} do
        local a, b = params(dt), params(dt)
        local oa, ob = optim.AdamW(a, {lr = 1e-3}), optim.AdamW(b, {lr = 1e-3})
        for k = 1, 3 do
            set_grads(a, k)
            set_grads(b, k)
            ml.manual_seed(9)
            local na = optim.clip_grad_norm(a, k == 2 and 1e9 or 0.05)   -- step 2 does not clip
            oa:step()
            ml.manual_seed(9)
            local nb, coef = optim.clip_grad_norm(b, k == 2 and 1e9 or 0.05, {sync = false, scale_grads = false})
            ob:step{grad_scale = coef}
            t:assertEq(nb:item(), na, dt .. ": the same norm")
        end
        for i = 1, #a do t:assert(same(a[i], b[i]), dt .. ": deferred clip, same parameter bits " .. i) end
        local n, c = optim.clip_grad_norm(b, 0.05, {scale_grads = false})
        t:assert(type(n) == "number" and ml.is_tensor(c), "sync with scale_grads = false: a number and the coefficient")
    end
    -- a number works as grad_scale too, and scale 1 is no scale
    local a, b = params("f32"), params("f32")
    set_grads(a, 1)
    set_grads(b, 1)
    optim.AdamW(a, {lr = 1e-3}):step{grad_scale = 1}
    optim.AdamW(b, {lr = 1e-3}):step()
    for i = 1, #a do t:assert(same(a[i], b[i]), "grad_scale = 1 changes nothing " .. i) end
end

function tests.clip_grad_norm_edge_cases(t)
    local p = ml.tensor({1.0, 2.0}, {requires_grad = true})
    t:assertEq(optim.clip_grad_norm({p}, 1), 0, "no gradients: 0")
    local n, c = optim.clip_grad_norm({p}, 1, {sync = false})
    t:assertEq(n:item(), 0)
    t:assertEq(c:item(), 1)
    p.grad = ml.tensor({0 / 0, 1})
    t:assert(optim.clip_grad_norm({p}, 1) ~= optim.clip_grad_norm({p}, 1), "a NaN gradient gives a NaN norm")
    t:assertEq(p.grad[2]:item(), 1, "and clips nothing")
    t:assert(has(error_of(optim.clip_grad_norm, {p}, 1, 0), "norm_type must be > 0"), "norm_type 0")
    t:assert(has(error_of(optim.clip_grad_norm, {p}, -1), "max_norm must be >= 0"), "negative max_norm")
    t:assert(has(error_of(optim.clip_grad_norm, {p}, "1"), "max_norm must be a number"))
    local opt = optim.AdamW({p})
    t:assert(has(error_of(opt.step, opt, {grad_scale = "x"}), "grad_scale must be a tensor or a number"))
    t:assert(has(error_of(opt.step, opt, {grad_scale = ml.ones({2})}), "one-element float32"),
             "a two-element grad_scale is refused")
end

function tests.core_multi_ops_argument_errors(t)
    local p, g = ml.zeros({3}), ml.zeros({3})
    local m, v = ml.zeros({3}), ml.zeros({3})
    t:assert(has(error_of(ml.adamw_multi_, {p}, {g, g}, {m}, {v}, 1e-3, 0.9, 0.999, 1e-8, 0, 1), "1 params but 2 grads"))
    t:assert(has(error_of(ml.adamw_multi_, {p}, {g}, {m}, {v}, 1e-3, 0.9, 0.999, 1e-8, 0, {1, 2}), "1 params but 2 steps"))
    t:assert(has(error_of(ml.adamw_multi_, {p}, {g}, {m}, {v}, 1e-3, 0.9, 0.999, 1e-8, 0, 0), "step"))
    t:assert(has(error_of(ml.adamw_multi_, {}, {}, {}, {}, 1e-3, 0.9, 0.999, 1e-8, 0, 1), "empty"))
    t:assert(has(error_of(ml.adamw_multi_, {p, "x"}, {g, g}, {m, m}, {v, v}, 1e-3, 0.9, 0.999, 1e-8, 0, 1),
                 "element 2 is not a live tensor"))
    t:assert(has(error_of(ml.grad_norm_multi, {g, 5}, 2, 1), "element 2 is not a live tensor"))
    t:assert(has(error_of(ml.scale_multi_, {g}, 0.5), "tensor"), "scale must be a tensor")
    -- explicit seed and offset: the generator is left alone
    local s0, o0 = ml.get_rng_state()
    local pb = ml.ones({300}, {dtype = "bf16"})
    local mb, vb = ml.zeros({300}, {dtype = "bf16"}), ml.zeros({300}, {dtype = "bf16"})
    ml.adamw_multi_({pb}, {ml.ones({300}, {dtype = "bf16"})}, {mb}, {vb}, 1e-5, 0.9, 0.999, 1e-8, 0, 1,
                    {seed = 5, offset = 9})
    local s1, o1 = ml.get_rng_state()
    t:assertEq({s1, o1}, {s0, o0}, "an explicit seed draws nothing from the generator")
end

return tests
