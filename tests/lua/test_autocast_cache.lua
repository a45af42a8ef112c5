-- test_autocast_cache.lua — nn.autocast's shadow cache (lua/moonlit/nn.lua,
-- "mixed precision"): each parameter converted once per change, handed out
-- through core.cast_as, refreshed by AdamW's kernel as it steps.  The CPU
-- has no bf16 compute, so the mechanism runs with f32 parameters and f64
-- as the compute dtype (the GPU's bf16 path is the same code).  Every
-- comparison here is exact: the cache must change no bits.
local ml = require "moonlit"
local nn = ml.nn
local core = ml.core

local T = {}

local U = require "testutil"
local mlp, convnet = U.cast_mlp, U.cast_convnet

-- Off, the saved conversions are kept as memory too (core.recompute_casts
-- off): the copy counts below and the in-place write between forward and
-- backward are those of the plain path; tests/lua/test_recompute_casts.lua
-- covers the recomputed one.
local function with_cache(on, fn, ...)
    local prev = nn.autocast_cache(on)
    local prev_recompute = core.recompute_casts(on)
    local res = table.pack(pcall(fn, ...))
    core.recompute_casts(prev_recompute)
    nn.autocast_cache(prev)
    if not res[1] then error(res[2], 0) end
    return table.unpack(res, 2, res.n)
end

local function train(make, x, cache) return with_cache(cache, U.autocast_train, make, x) end

local function assert_runs_equal(t, make, x)
    U.assert_same_training(t, train(make, x, false), train(make, x, true))
end

function T.training_with_the_cache_is_bit_identical(t)
    assert_runs_equal(t, mlp, ml.randn({5, 6}))
    assert_runs_equal(t, convnet, ml.randn({2, 6, 6, 3}))
end

local function copies(fn)
    local rep = ml.profile(fn)
    for _, e in ipairs(rep) do if e.name == "ml_copy_cpu" then return e.calls end end
    return 0
end

function T.after_a_step_the_forward_uses_the_refreshed_shadows(t)
    local m = mlp()
    local x = ml.randn({5, 6})
    local opt = ml.optim.AdamW(m:parameters(), {lr = 1e-2})
    local uncached = with_cache(false, function()
        return copies(function() nn.autocast("f64", function() return m(x) end) end)
    end)
    t:assertEq(uncached, 7, "x, the Linears' 2 weights and 2 biases, LayerNorm's 2")
    local first = copies(function() nn.autocast("f64", function() return m(x) end):sum():backward() end)
    local ref_first = with_cache(false, function()
        return copies(function() nn.autocast("f64", function() return m(x) end):sum():backward() end)
    end)
    t:assertEq(first, ref_first, "the first forward converts every parameter, as without the cache")
    m:zero_grad()
    first = copies(function() nn.autocast("f64", function() return m(x) end):sum():backward() end)
    t:assertEq(first, ref_first - 6, "a second forward before any step converts only x")
    opt:step()
    local w = m:children()[1].weight
    local entry = nn._autocast_shadow(w)
    t:assert(entry ~= nil, "the Linear's weight has a shadow")
    t:assertEq(entry.version, core.storage_version(w), "the step recorded the new version")
    t:assertTensorEq(entry.tensor, w:double(), 0, "the shadow is the stepped weight converted")
    local y
    local fwd = copies(function() y = nn.autocast("f64", function() return m(x) end) end)
    t:assertEq(fwd, 1, "after the step only the input is converted")
    t:assertEq(y.grad_fn, "linear")
    local ref = with_cache(false, function() return nn.autocast("f64", function() return m(x) end) end)
    t:assertTensorEq(y, ref, 0, "the output equals casting the updated weights")
end

function T.a_weight_changed_in_place_is_converted_again(t)
    local m = mlp()
    local x = ml.randn({5, 6})
    local lin = m:children()[1]
    local y1 = nn.autocast("f64", function() return m(x) end)
    local old = nn._autocast_shadow(lin.weight).tensor
    local w0 = lin.weight:detach():clone()
    core.no_grad(function() lin.weight:add_(1) end)
    local y2
    t:assertEq(copies(function() y2 = nn.autocast("f64", function() return m(x) end) end), 2,
               "the input and the changed weight")
    local ref = with_cache(false, function() return nn.autocast("f64", function() return m(x) end) end)
    t:assertTensorEq(y2, ref, 0, "the change is seen")
    t:assert(nn._autocast_shadow(lin.weight).tensor ~= old, "the new conversion is a new shadow")
    -- The first forward's graph saved the old shadow; converting afresh left
    -- it as it was, so both forwards backpropagate, with the gradients of
    -- the uncached path.
    ;(y1:sum() + y2:sum()):backward()
    local g = lin.weight.grad:clone()
    m:zero_grad()
    core.no_grad(function() lin.weight:copy_(w0) end)
    with_cache(false, function()
        local a = nn.autocast("f64", function() return m(x) end)
        core.no_grad(function() lin.weight:add_(1) end)
        local b = nn.autocast("f64", function() return m(x) end)
        ;(a:sum() + b:sum()):backward()
    end)
    t:assertTensorEq(g, lin.weight.grad, 0, "gradients across the change")
end

function T.writing_a_shadow_before_backward_is_refused(t)
    local m = mlp()
    local x = ml.randn({5, 6})
    local w = m:children()[1].weight
    nn.autocast("f64", function() return m(x) end):sum():backward()   -- shadows made
    local y = nn.autocast("f64", function() return m(x) end)
    core.no_grad(function() nn._autocast_shadow(w).tensor:add_(1) end)
    t:assertError(function() y:sum():backward() end, "modified by an inplace operation")
    -- An optimizer step between forward and backward writes the shadows in
    -- place too: refused the same way, never a gradient of other values.
    local m2 = mlp()
    local opt = ml.optim.AdamW(m2:parameters(), {lr = 1e-2})
    nn.autocast("f64", function() return m2(x) end):sum():backward()
    local y2 = nn.autocast("f64", function() return m2(x) end)
    opt:step()
    t:assertError(function() y2:sum():backward() end, "modified by an inplace operation")
end

function T.frozen_weights_are_converted_once(t)
    local m = mlp()
    local frozen = m:children()[1]
    frozen.weight.requires_grad, frozen.bias.requires_grad = false, false
    local trainable = {}
    for _, p in ipairs(m:parameters()) do if p.requires_grad then trainable[#trainable + 1] = p end end
    local opt = ml.optim.AdamW(trainable, {lr = 1e-2})
    local x = ml.randn({5, 6})
    local entry, first
    for s = 1, 4 do
        local n = copies(function() nn.autocast("f64", function() return m(x) end):sum():backward() end)
        -- after step 1 the 6 parameters' forward conversions are gone: the
        -- frozen Linear's never to come back, the others refreshed by AdamW
        first = first or n
        t:assertEq(n, s == 1 and first or first - 6, "step " .. s .. " copies")
        if s == 1 then entry = nn._autocast_shadow(frozen.weight) end
        t:assert(nn._autocast_shadow(frozen.weight) == entry, "the frozen weight keeps its shadow")
        opt:step()
        opt:zero_grad()
    end
end

function T.cache_clear_and_switch(t)
    local m = mlp()
    local x = ml.randn({5, 6})
    nn.autocast("f64", function() return m(x) end)
    local count, bytes = nn.autocast_cache_clear()
    t:assert(count >= 6, "the model's 6 shadows were dropped (got " .. count .. ")")
    t:assert(bytes >= (6 * 8 + 8 + 8 + 8 + 8 * 3 + 3) * 8, "their bytes")
    t:assertEq(nn._autocast_shadow(m:children()[1].weight), nil)
    t:assertEq(copies(function() nn.autocast("f64", function() return m(x) end) end), 7, "converted again")
    local prev = nn.autocast_cache(false)
    t:assertEq(prev, true)
    t:assertEq(copies(function() nn.autocast("f64", function() return m(x) end) end), 7, "off: every call converts")
    t:assertEq(copies(function() nn.autocast("f64", function() return m(x) end) end), 7)
    nn.autocast_cache(true)
    t:assertEq(copies(function() nn.autocast("f64", function() return m(x) end) end), 1, "on again")
    -- non-parameters are never cached
    local w = ml.randn({3, 6})
    t:assertEq(copies(function() nn.autocast("f64", function() return nn.cast(w) end) end), 1)
    t:assertEq(copies(function() nn.autocast("f64", function() return nn.cast(w) end) end), 1)
end

-- A checkpointed block recomputes its forward in backward: the recompute
-- takes the shadows too, with the gradients of the uncached path.
function T.checkpointed_blocks_use_the_shadows(t)
    local function run(cache)
        return with_cache(cache, function()
            local m = mlp()
            local opt = ml.optim.AdamW(m:parameters(), {lr = 1e-2})
            local x = ml.randn({5, 6})
            x.requires_grad = true
            local grads = {}
            for s = 1, 2 do
                opt:zero_grad()
                local y = nn.autocast("f64", function() return nn.checkpoint(function(h) return m(h) end, x) end)
                ;(y ^ 2):sum():backward()
                for _, p in ipairs(m:parameters()) do grads[#grads + 1] = p.grad:clone() end
                opt:step()
            end
            return grads
        end)
    end
    local off, on = run(false), run(true)
    for i = 1, #off do t:assertTensorEq(on[i], off[i], 0, "grad " .. i) end
end

-- ---- the ops ------------------------------------------------------------------

function T.cast_as_records_a_conversion_of_its_input(t)
    local p = ml.randn({4, 3})
    p.requires_grad = true
    local shadow = p:detach():double()
    local y = core.cast_as(p, shadow)
    t:assertEq(y.dtype, "f64")
    t:assertEq(y.grad_fn, "cast_as")
    t:assertTensorEq(y, shadow, 0)
    ;(y * ml.arange(1, 13, 1, {dtype = "f64"}):reshape(4, 3)):sum():backward()
    t:assertEq(p.grad.dtype, "f32")
    t:assertTensorEq(p.grad, ml.arange(1, 13, 1):reshape(4, 3), 0)
    t:assertError(function() core.cast_as(p, p:detach():clone()) end, "own dtype")
    t:assertError(function() core.cast_as(p, ml.zeros({3, 4}, {dtype = "f64"})) end, "does not match")
    local tracked = ml.zeros({4, 3}, {dtype = "f64"})
    tracked.requires_grad = true
    t:assertError(function() core.cast_as(p, tracked) end, "requires grad")
    t:assertError(function() core.cast_as(ml.tensor({1, 2}, {dtype = "i64"}), ml.zeros({2})) end, "floating")
end

-- The kernel's shadow is bit for bit the cast of the stepped parameter, for
-- each shadow dtype, with and without a grad_scale; the parameter and the
-- moments are bit for bit those of a step without a shadow.
function T.adamw_writes_the_rounded_weight_into_the_shadow(t)
    local sizes = {1, 300, 0, 70000}
    for _, combo in ipairs {{"f32", "bf16"}, {"f32", "f16"}, {"f32", "f64"}, {"f64", "f32"}, {"f64", "bf16"},
                            {"bf16", "f32"}} do
        local pdt, sdt = combo[1], combo[2]
        for _, scaled in ipairs {false, true} do
            local function lists()
                ml.manual_seed(11)
                local L = {p = {}, g = {}, m = {}, v = {}, sh = {}}
                for i, n in ipairs(sizes) do
                    L.p[i] = ml.randn({n}):to(pdt)
                    L.g[i] = (ml.randn({n}) * 1e-2):to(pdt == "bf16" and "f32" or pdt)
                    local st = pdt == "bf16" and "bf16" or pdt
                    L.m[i], L.v[i] = ml.zeros({n}, {dtype = st}), ml.zeros({n}, {dtype = st})
                    L.sh[i] = ml.zeros({n}, {dtype = sdt})
                end
                return L
            end
            local a, b = lists(), lists()
            local opts_a = {seed = 7, offset = 100, grad_scale = scaled and ml.full({}, 0.5) or nil}
            local opts_b = {seed = 7, offset = 100, grad_scale = opts_a.grad_scale, shadows = b.sh}
            for step = 1, 2 do
                core.adamw_multi_(a.p, a.g, a.m, a.v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, step, opts_a)
                local before = core.storage_version(b.sh[2])
                core.adamw_multi_(b.p, b.g, b.m, b.v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, step, opts_b)
                t:assertEq(core.storage_version(b.sh[2]), before + 1, "the shadow's version is bumped")
            end
            local what = pdt .. " -> " .. sdt .. (scaled and " scaled" or "")
            for i = 1, #sizes do
                t:assertTensorEq(b.p[i], a.p[i], 0, what .. ": param " .. i)
                t:assertTensorEq(b.m[i], a.m[i], 0, what .. ": exp_avg " .. i)
                t:assertTensorEq(b.v[i], a.v[i], 0, what .. ": exp_avg_sq " .. i)
                t:assertTensorEq(b.sh[i], b.p[i]:to(sdt), 0, what .. ": shadow " .. i)
            end
        end
    end
end

function T.adamw_shadow_errors(t)
    local p, g = ml.randn({8}), ml.randn({8})
    local m, v = ml.zeros({8}), ml.zeros({8})
    local function step(sh)
        core.adamw_multi_({p}, {g}, {m}, {v}, 1e-3, 0.9, 0.999, 1e-8, 0, 1, {shadows = {sh}})
    end
    t:assertError(function() step(ml.zeros({8})) end, "floating dtype other than the parameter's")
    t:assertError(function() step(ml.zeros({4}, {dtype = "bf16"})) end, "does not match")
    t:assertError(function() step(ml.zeros({8}, {dtype = "i32"})) end, "floating dtype")
    t:assertError(function() step(ml.zeros({8, 2}, {dtype = "f64"}):select(2, 1)) end, "contiguous")
    local both = ml.zeros({8}, {dtype = "f64"})
    t:assertError(function()
        core.adamw_multi_({p, ml.randn({8})}, {g, g:clone()}, {m, ml.zeros({8})}, {v, ml.zeros({8})}, 1e-3, 0.9,
                          0.999, 1e-8, 0, 1, {shadows = {both, both}})
    end, "shares memory")
    t:assertError(function() step("x") end, "not a live tensor")
    -- a parameter without a shadow in the list: nothing written for it
    local p2 = ml.randn({8})
    local before = p2:clone()
    core.adamw_multi_({p, p2}, {g, g:clone()}, {m, ml.zeros({8})}, {v, ml.zeros({8})}, 1e-3, 0.9, 0.999, 1e-8, 0, 1,
                      {shadows = {[2] = ml.zeros({8}, {dtype = "bf16"})}})
    t:assert((p2 - before):abs():max():item() > 0, "the second parameter was stepped")
end

return T
