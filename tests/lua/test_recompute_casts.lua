-- test_recompute_casts.lua — saved autocast conversions kept as a recipe
-- (host/autograd.c, "saved casts"): a node that saves the conversion of a
-- parameter keeps the parameter and converts it again in backward, so the
-- conversion's memory is not held from forward to backward.  The CPU has
-- no bf16 compute, so the mechanism runs with f32 parameters and f64 as the
-- compute dtype, with the shadow cache off (with the cache the layers save
-- the persistent shadow instead).  Every comparison is exact: recomputing
-- must change no bits.
local ml = require "moonlit"
local nn = ml.nn
local core = ml.core

local T = {}

local U = require "testutil"
local mlp, convnet = U.cast_mlp, U.cast_convnet

-- fn() with the shadow cache off and recompute_casts set to `on`.
local function with_mode(on, fn)
    local prev_cache = nn.autocast_cache(false)
    local prev = core.recompute_casts(on)
    local res = table.pack(pcall(fn))
    core.recompute_casts(prev)
    nn.autocast_cache(prev_cache)
    if not res[1] then error(res[2], 0) end
    return table.unpack(res, 2, res.n)
end

local function train(make, x, on) return with_mode(on, function() return U.autocast_train(make, x) end) end

-- The bytes of the f64 conversions the layers save: every weight (linear,
-- conv2d and both norms save theirs) and the GroupNorm's bias (its fused
-- backward reads it); not the linear and conv biases.
local function saved_weight_bytes(m)
    local b = 0
    for _, layer in ipairs(m:children()) do
        if layer.weight then b = b + layer.weight:numel() * 8 end
    end
    return b
end

local function assert_bit_identical(t, make, x, extra_bytes)
    local off, on = train(make, x, false), train(make, x, true)
    U.assert_same_training(t, off, on)
    local m = make()
    local expect = saved_weight_bytes(m) + (extra_bytes or 0)
    t:assert(expect > 0, "the model has weights")
    t:assertEq(off.held - on.held, expect, "the graph no longer holds the weights' conversions")
end

function T.recomputing_saved_casts_is_bit_identical_and_holds_less(t)
    assert_bit_identical(t, mlp, ml.randn({5, 6}))
    -- GroupNorm also saves its bias (8 f64 values)
    assert_bit_identical(t, convnet, ml.randn({2, 6, 6, 3}), 8 * 8)
end

function T.a_parameter_written_between_forward_and_backward_is_refused(t)
    local x = ml.randn({5, 6})
    with_mode(true, function()
        local m = mlp()
        local loss = nn.autocast("f64", function() return (m(x) ^ 2):mean() end)
        ml.no_grad(function() m:children()[1].weight:add_(1) end)
        t:assertError(function() loss:backward() end, "conversion of a parameter")
        t:assertEq(m:children()[1].weight.grad, nil, "no gradient from the refused backward")
    end)
    -- kept as memory, the forward's values are still there: backward works
    with_mode(false, function()
        local m = mlp()
        local loss = nn.autocast("f64", function() return (m(x) ^ 2):mean() end)
        ml.no_grad(function() m:children()[1].weight:add_(1) end)
        loss:backward()
        t:assert(m:children()[1].weight.grad ~= nil, "backward ran")
    end)
end

function T.retain_graph_remakes_the_casts_each_time(t)
    local x = ml.randn({5, 6})
    with_mode(true, function()
        local m = mlp()
        local loss = nn.autocast("f64", function() return (m(x) ^ 2):mean() end)
        loss:backward(nil, {retain_graph = true})
        local g1 = m:children()[1].weight.grad:clone()
        loss:backward()
        t:assertTensorEq(m:children()[1].weight.grad, g1 * 2, 0, "the second backward adds the same gradient")
        t:assertEq(#core.saved_census(loss), 0, "nothing held after the last backward")
    end)
end

function T.only_untouched_conversions_of_leaves_are_recomputed(t)
    with_mode(true, function()
        local w = ml.randn({4, 3}, {requires_grad = true})
        local x = ml.randn({2, 3})
        -- a conversion of a non-leaf is kept as memory: its source may not live
        local w2 = (w * 1):double()
        local y = x:double():matmul(w2:t())
        local held = 0
        for _, e in ipairs(core.saved_census(y:sum())) do held = held + e.bytes end
        t:assert(held >= 4 * 3 * 8, "the non-leaf's conversion is held")
        -- a conversion written in place after it was made is kept as memory
        local wc = w:double()
        ml.no_grad(function() wc:mul_(2) end)
        local lin = core.linear(x:double(), wc)
        lin:sum():backward()
        t:assertTensorEq(w.grad, x:sum(1):expand(4, 3):contiguous() * 1, 0, "gradient through the written conversion")
    end)
end

function T.the_switch(t)
    local prev = core.recompute_casts()
    t:assertEq(prev, true, "on by default")
    t:assertEq(core.recompute_casts(false), true, "returns the previous setting")
    t:assertEq(core.recompute_casts(), false, "reads without changing")
    core.recompute_casts(prev)
    t:assertError(function() core.recompute_casts(1) end, "boolean expected")
end

return T
