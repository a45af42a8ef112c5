-- test_checkpoint.lua — nn.checkpoint and enable_gradient_checkpointing:
-- the same gradients as without, fewer tensors kept between forward and
-- backward, and the failure cases (errors inside the recompute, inputs
-- written in place, retain_graph, random numbers replayed).
local ml = require "moonlit"
local nn = ml.nn

local T = {}

local function max_diff(a, b) return (a - b):abs():max():item() end

local function grads_of(params)
    local out = {}
    for i, p in ipairs(params) do out[i] = p.grad and p.grad:clone() or false end
    return out
end

local function zero(params) for _, p in ipairs(params) do p.grad = nil end end

function T.same_values_and_gradients_as_without(t)
    ml.manual_seed(0)
    local m = nn.Sequential(nn.Linear(4, 8, {dtype = "f64"}), nn.SiLU(), nn.Linear(8, 3, {dtype = "f64"}))
    local x = ml.randn({5, 4}, {dtype = "f64", requires_grad = true})
    local params = m:parameters()
    local function run(ck)
        zero(params); x.grad = nil
        local y = ck and nn.checkpoint(function(a) return m(a) end, x) or m(x);
        (y * y):sum():backward()
        return y, x.grad:clone(), grads_of(params)
    end
    local y1, gx1, g1 = run(false)
    local y2, gx2, g2 = run(true)
    t:assertEq(tostring(y2.grad_fn), "checkpoint", "the result's node")
    t:assertEq(max_diff(y1, y2), 0, "values")
    t:assertEq(max_diff(gx1, gx2), 0, "input gradient")
    for i = 1, #g1 do t:assertEq(max_diff(g1[i], g2[i]), 0, "parameter gradient " .. i) end
end

function T.unet_with_checkpointing_matches_and_keeps_less(t)
    ml.manual_seed(1)
    local m = ml.sd.from_configs("tests/fixtures/sd1-tiny/pipeline", {seed = 0})
    local unet = m.unet
    unet:train()
    local params = unet:parameters()
    local x = ml.randn({2, 8, 8, unet.config.in_channels})
    local ctx = ml.randn({2, 77, unet.config.cross_attention_dim}, {requires_grad = true})
    local tsteps = ml.tensor({10, 500}, {dtype = "i64"})
    local function run()
        zero(params); ctx.grad = nil
        collectgarbage("collect")
        local before = ml.memory_stats().storages
        local y = unet(x, tsteps, ctx)
        collectgarbage("collect")
        local kept = ml.memory_stats().storages - before;
        (y * y):mean():backward()
        return y, kept, ctx.grad:clone(), grads_of(params)
    end
    local y1, kept1, gc1, g1 = run()
    t:assert(unet:enable_gradient_checkpointing() > 0, "blocks marked")
    local y2, kept2, gc2, g2 = run()
    unet:disable_gradient_checkpointing()
    t:assertEq(max_diff(y1, y2), 0, "forward values unchanged")
    print(string.format("      (tensors kept between forward and backward: %d without, %d with checkpointing)", kept1, kept2))
    t:assert(kept2 < kept1 / 2, string.format("tensors kept for backward: %d with checkpointing, %d without", kept2, kept1))
    local worst = 0
    for i = 1, #g1 do
        t:assert(g2[i], "every parameter still gets a gradient")
        local scale = math.max(g1[i]:abs():max():item(), 1e-30)
        worst = math.max(worst, max_diff(g1[i], g2[i]) / scale)
    end
    -- the same ops in the same order; only sums of gradients from several
    -- blocks (temb, context) may be added in another order
    print(string.format("      (worst parameter gradient difference: %.3g of its scale)", worst))
    t:assert(worst < 1e-5, "parameter gradients within 1e-5 of their scale: " .. worst)
    t:assert(max_diff(gc1, gc2) / gc1:abs():max():item() < 1e-5, "context gradient")
    -- eval: no checkpoint node at all
    unet:enable_gradient_checkpointing()
    unet:eval()
    local y3 = unet(x, tsteps, ctx)
    t:assert(tostring(y3.grad_fn) ~= "checkpoint", "eval mode computes normally")
    unet:disable_gradient_checkpointing()
end

function T.random_numbers_replay_in_the_recompute(t)
    local w = ml.randn({6, 6}, {dtype = "f64", requires_grad = true})
    local x = ml.randn({4, 6}, {dtype = "f64", requires_grad = true})
    local function f(a) return ml.F.dropout(a:matmul(w), 0.5, true) end
    ml.manual_seed(7)
    local y1 = f(x); (y1 * y1):sum():backward()
    local g1 = w.grad:clone(); w.grad = nil
    ml.manual_seed(7)
    local y2 = nn.checkpoint(f, x); (y2 * y2):sum():backward()
    t:assertEq(max_diff(y1, y2), 0, "the same dropout mask forward")
    t:assertEq(max_diff(g1, w.grad), 0, "and in the recompute")
    -- the random stream after the step is where it would be without checkpointing
    ml.manual_seed(7); f(x); local a = ml.rand(3)
    ml.manual_seed(7); nn.checkpoint(f, x); local b = ml.rand(3)
    t:assertEq(max_diff(a, b), 0, "the stream goes on as without")
end

function T.failures(t)
    local w = ml.randn({3, 3}, {requires_grad = true})
    local x = ml.randn({2, 3}, {requires_grad = true})
    -- an error in the recompute reaches backward's caller
    local calls = 0
    local y = nn.checkpoint(function(a)
        calls = calls + 1
        if calls == 2 then error("recompute went wrong") end
        return a:matmul(w)
    end, x)
    local ok, err = pcall(function() y:sum():backward() end)
    t:assert(not ok and tostring(err):find("recompute went wrong", 1, true), tostring(err))
    -- fn must return a tensor
    ok, err = pcall(nn.checkpoint, function() return 1 end, x)
    t:assert(not ok and tostring(err):find("one tensor", 1, true), tostring(err))
    -- an input written in place before backward is refused, as for any saved tensor
    local x2 = ml.randn({2, 3})
    local xr = x2 * 1
    xr.requires_grad = true
    y = nn.checkpoint(function(a) return a:matmul(w) end, xr)
    ml.no_grad(function() xr:add_(1) end)
    ok, err = pcall(function() y:sum():backward() end)
    t:assert(not ok and tostring(err):find("checkpoint", 1, true), "names the node: " .. tostring(err))
    -- retain_graph: a second backward recomputes again and accumulates
    w.grad = nil
    y = nn.checkpoint(function(a) return a:matmul(w) end, x)
    y:sum():backward(nil, {retain_graph = true})
    local g1 = w.grad:clone()
    y:sum():backward()
    t:assert(max_diff(w.grad, g1 * 2) < 1e-6, "two backwards, twice the gradient")
    -- no input needs a gradient: fn runs normally, so w still gets one
    w.grad = nil
    local z = nn.checkpoint(function(a) return a:matmul(w) end, ml.randn({2, 3}))
    t:assert(tostring(z.grad_fn) ~= "checkpoint", "computed normally")
    z:sum():backward()
    t:assert(w.grad ~= nil, "the parameter inside still gets its gradient")
    -- under no_grad nothing is recorded
    local n = ml.no_grad(nn.checkpoint, function(a) return a:matmul(w) end, x)
    t:assert(n.grad_fn == nil, "no_grad: no node")
end

return T
