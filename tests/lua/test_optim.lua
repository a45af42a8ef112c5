-- test_optim.lua — ml.optim against updates computed by hand with PyTorch's
-- formulas: AdamW (bias correction, decoupled weight decay), SGD (momentum,
-- dampening, nesterov, weight decay), clip_grad_norm, and the optimizer
-- state_dict round trip.
local ml = require "moonlit"
local util = require "testutil"
local optim = ml.optim

local tests = {}

local error_of, has = util.error_of, util.has

local function near_list(t, x, want, tol, msg)
    local got = x:totable()
    t:assertEq(#got, #want, msg)
    for i = 1, #want do t:assertNear(got[i], want[i], tol, string.format("%s [%d]", msg or "", i)) end
end

-- torch.optim.AdamW, one element at a time in plain Lua (f64).
local function adamw_reference(p, grads, o)
    local b1, b2 = o.betas[1], o.betas[2]
    local out = {}
    for i = 1, #p do
        local x, m, v = p[i], 0, 0
        for step, g in ipairs(grads) do
            x = x * (1 - o.lr * o.weight_decay)
            m = b1 * m + (1 - b1) * g[i]
            v = b2 * v + (1 - b2) * g[i] * g[i]
            local bc1, bc2 = 1 - b1 ^ step, 1 - b2 ^ step
            x = x - o.lr / bc1 * m / (math.sqrt(v) / math.sqrt(bc2) + o.eps)
        end
        out[i] = x
    end
    return out
end

-- torch.optim.SGD in plain Lua.
local function sgd_reference(p, grads, o)
    local out = {}
    for i = 1, #p do
        local x, buf = p[i], nil
        for _, gs in ipairs(grads) do
            local g = gs[i] + o.weight_decay * x
            if o.momentum ~= 0 then
                if buf == nil then buf = g else buf = o.momentum * buf + (1 - o.dampening) * g end
                if o.nesterov then g = g + o.momentum * buf else g = buf end
            end
            x = x - o.lr * g
        end
        out[i] = x
    end
    return out
end

local function run_steps(opt, p, grads)
    for _, g in ipairs(grads) do
        opt:zero_grad()
        p.grad = ml.tensor(g, {dtype = p.dtype})
        opt:step()
    end
end

function tests.adamw_two_steps_match_pytorch_formula(t)
    local init = {1.0, -2.0, 0.5}
    local grads = {{0.5, -1.0, 0.0}, {-0.25, 2.0, 1e-3}}
    local o = {lr = 0.1, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01}
    for _, dt in ipairs {"f64", "f32"} do
        local p = ml.tensor(init, {dtype = dt, requires_grad = true})
        local opt = optim.AdamW({p}, o)
        run_steps(opt, p, grads)
        near_list(t, p, adamw_reference(init, grads, o), dt == "f64" and 1e-12 or 1e-6, "AdamW " .. dt)
        t:assert(p.requires_grad and p.is_leaf, "still a leaf requiring grad")
        t:assertEq(opt.state[1].step, 2)
    end
end

function tests.adamw_defaults_as_pytorch(t)
    local p = ml.tensor({1.0}, {requires_grad = true})
    local opt = optim.AdamW({p})
    t:assertEq(opt.lr, 1e-3)
    t:assertEq(opt.betas, {0.9, 0.999})
    t:assertEq(opt.eps, 1e-8)
    t:assertEq(opt.weight_decay, 1e-2)
    local q = ml.tensor({3.0}, {requires_grad = true})
    local o = optim.AdamW({q}, {lr = 0.5, weight_decay = 0})
    run_steps(o, q, {{2.0}})
    t:assertNear(q:item(), 2.5, 1e-6, "first step moves by lr (sign of the gradient)")
end

function tests.adamw_skips_parameters_without_grad(t)
    local a = ml.tensor({1.0}, {requires_grad = true})
    local b = ml.tensor({1.0}, {requires_grad = true})
    local opt = optim.AdamW({a, b}, {lr = 0.1})
    a.grad = ml.tensor({1.0})
    opt:step()
    t:assert(a:item() < 1, "a moved")
    t:assertEq(b:item(), 1, "b has no gradient: untouched, not even decayed")
    t:assertEq(opt.state[2], nil)
end

function tests.sgd_matches_pytorch_formula(t)
    local init = {1.0, -2.0}
    local grads = {{0.5, -1.0}, {-0.25, 2.0}, {1.0, 1.0}}
    local configs = {
        {lr = 0.1, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false},
        {lr = 0.1, momentum = 0.9, dampening = 0, weight_decay = 0, nesterov = false},
        {lr = 0.1, momentum = 0.9, dampening = 0.1, weight_decay = 0.01, nesterov = false},
        {lr = 0.05, momentum = 0.8, dampening = 0, weight_decay = 0.1, nesterov = true},
    }
    for k, o in ipairs(configs) do
        local p = ml.tensor(init, {dtype = "f64", requires_grad = true})
        run_steps(optim.SGD({p}, o), p, grads)
        near_list(t, p, sgd_reference(init, grads, o), 1e-12, "SGD config " .. k)
    end
    t:assert(has(error_of(optim.SGD, {ml.zeros(1)}, {}), "lr is required"))
end

function tests.optimizer_argument_errors(t)
    t:assert(has(error_of(optim.AdamW, {}), "empty parameter list"))
    t:assert(has(error_of(optim.AdamW, {ml.zeros(1), "x"}), "parameter 2 is not a tensor"))
end

function tests.zero_grad_clears(t)
    local p = ml.tensor({1.0}, {requires_grad = true})
    local opt = optim.AdamW({p})
    p.grad = ml.ones(1)
    opt:zero_grad()
    t:assertEq(p.grad, nil)
end

function tests.clip_grad_norm(t)
    local a = ml.tensor({1, 1}, {requires_grad = true})
    local b = ml.tensor({1}, {requires_grad = true})
    local c = ml.tensor({1}, {requires_grad = true})   -- no grad: ignored
    a.grad = ml.tensor({3, 4})
    b.grad = ml.tensor({12})
    local total = optim.clip_grad_norm({a, b, c}, 6.5)
    t:assertNear(total, 13, 1e-5, "returns the total 2-norm before clipping")
    near_list(t, a.grad, {1.5, 2}, 1e-5, "scaled by max_norm / total")
    near_list(t, b.grad, {6}, 1e-5)
    total = optim.clip_grad_norm({a, b}, 100)
    t:assertNear(total, 6.5, 1e-5)
    near_list(t, a.grad, {1.5, 2}, 1e-5, "below the limit: unchanged")
    a.grad = ml.tensor({-3, 4})
    b.grad = ml.tensor({1})
    t:assertNear(optim.clip_grad_norm({a, b}, 1, math.huge), 4, 1e-6, "inf norm is the largest |g|")
    near_list(t, a.grad, {-0.75, 1}, 1e-5)
    a.grad = ml.tensor({3, -4})
    b.grad = ml.tensor({1})
    t:assertNear(optim.clip_grad_norm_({a, b}, 100, 1), 8, 1e-5, "1-norm, underscore alias")
    t:assertEq(optim.clip_grad_norm({c}, 1), 0, "no gradients: norm 0")
end

function tests.adamw_state_dict_round_trip(t)
    local grads = {{0.5, -1.0}, {-0.25, 2.0}, {1.0, 0.5}, {0.1, -0.1}}
    local p = ml.tensor({1.0, -2.0}, {dtype = "f64", requires_grad = true})
    local opt = optim.AdamW({p}, {lr = 0.05, weight_decay = 0.1})
    run_steps(opt, p, {grads[1], grads[2]})
    local sd = opt:state_dict()
    t:assertEq(sd.state[1].step, 2)
    t:assertEq(sd.lr, 0.05)
    -- a fresh optimizer on a copy of the parameters continues identically
    local q = ml.no_grad(function() return p:clone() end)
    q.requires_grad = true
    local opt2 = optim.AdamW({q}, {lr = 1})
    opt2:load_state_dict(sd)
    t:assertEq(opt2.lr, 0.05)
    t:assertEq(opt2.weight_decay, 0.1)
    run_steps(opt, p, {grads[3], grads[4]})
    run_steps(opt2, q, {grads[3], grads[4]})
    t:assertTensorEq(q, p, 1e-15, "same trajectory after loading")
    near_list(t, p, adamw_reference({1.0, -2.0}, grads, {lr = 0.05, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.1}),
              1e-12, "and it is the uninterrupted one")
    opt2.state[1].exp_avg:zero_()
    t:assert(opt.state[1].exp_avg:abs():max():item() > 0, "the loaded state is a copy")
    -- state converts to the parameter's dtype
    local r = ml.tensor({1.0, -2.0}, {requires_grad = true})
    local opt3 = optim.AdamW({r})
    opt3:load_state_dict(sd)
    t:assertEq(opt3.state[1].exp_avg.dtype, "f32")
    t:assert(has(error_of(optim.AdamW({r}).load_state_dict, optim.AdamW({r}),
                          {lr = 1, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0, state = {[2] = sd.state[1]}}),
                 "state for parameter 2"))
end

-- bf16-sr: at lr 1e-5 every update is far below bf16's spacing near 1
-- (2^-8), so round to nearest would leave the weights untouched; the
-- stochastic rounding moves some of them, and on average by the f32 step.
function tests.adamw_bf16_params_move_with_stochastic_rounding(t)
    local n, steps = 4096, 20
    local p = ml.ones({n}, {dtype = "bf16", requires_grad = true})
    local opt = optim.AdamW({p}, {lr = 1e-5, weight_decay = 0})
    local seed, offset = ml.get_rng_state()
    for _ = 1, steps do
        opt:zero_grad()
        p.grad = ml.full({n}, 1e-3, {dtype = "bf16"})
        opt:step()
    end
    local s = opt.state[1]
    t:assertEq(s.exp_avg.dtype, "bf16", "moments default to the param's dtype")
    t:assertEq(s.exp_avg_sq.dtype, "bf16")
    t:assertEq(p.dtype, "bf16")
    local q = ml.no_grad(function() return p:to("f32") end)
    local moved = (q:lt(1)):sum():item()
    t:assert(moved > 0, "some weights moved")
    -- each step is -lr (constant gradient): mean drift about -lr * steps
    local drift = q:mean():item() - 1
    t:assertNear(drift, -1e-5 * steps, 0.3e-5 * steps, "mean drift of the bf16 weights")
    local seed2, offset2 = ml.get_rng_state()
    t:assertEq(seed2, seed)
    t:assertEq(offset2, offset + n // 2 * steps, "each step draws a fresh Philox block per two elements")
    -- state_dtype keeps f32 moments for bf16 params when asked
    local r = ml.ones({4}, {dtype = "bf16", requires_grad = true})
    local opt2 = optim.AdamW({r}, {lr = 1e-5, state_dtype = "f32"})
    r.grad = ml.full({4}, 1e-3, {dtype = "bf16"})
    opt2:step()
    t:assertEq(opt2.state[1].exp_avg.dtype, "f32")
    t:assertEq(opt2.state[1].exp_avg_sq.dtype, "f32")
end

return tests
