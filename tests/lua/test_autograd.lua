-- test_autograd.lua — the autograd engine as Lua sees it: accumulation,
-- retain_graph, no_grad, detach, hooks, requires_grad rules, in-place
-- restrictions, .grad assignment, and the check that tensors saved for
-- backward were not modified in place since (through any view).
local ml = require "moonlit"
local util = require "testutil"

local tests = {}

local error_of, has = util.error_of, util.has

function tests.backward_computes_leaf_gradients(t)
    local x = ml.tensor({1, 2, 3}, {requires_grad = true})
    local w = ml.tensor({4, 5, 6}, {requires_grad = true})
    local y = (x * w):sum() + (x ^ 2):sum()
    y:backward()
    t:assertEq(x.grad:totable(), {4 + 2, 5 + 4, 6 + 6}, "d/dx = w + 2x")
    t:assertEq(w.grad:totable(), {1, 2, 3}, "d/dw = x")
    t:assert(x.is_leaf and not y.is_leaf)
    t:assertEq(y.grad_fn, "add", "grad_fn names the producing op")
end

function tests.backward_with_an_explicit_gradient(t)
    local x = ml.tensor({1, 2}, {requires_grad = true})
    local y = x * 2
    y:backward(ml.tensor({1, 10}))
    t:assertEq(x.grad:totable(), {2, 20})
    local e = error_of(function() (x * 2):backward() end)
    t:assert(has(e, "one-element"), "non-scalar needs a gradient: " .. tostring(e))
    e = error_of(function() ml.tensor({1}):backward() end)
    t:assert(has(e, "does not require grad"), tostring(e))
end

function tests.gradients_accumulate_across_backward_calls(t)
    local x = ml.tensor({1, 2, 3}, {requires_grad = true})
    ml.sum(x * 2):backward()
    t:assertEq(x.grad:totable(), {2, 2, 2})
    ml.sum(x * x):backward()
    t:assertEq(x.grad:totable(), {4, 6, 8}, "second backward adds")
    x.grad = nil
    ml.sum(x * 3):backward()
    t:assertEq(x.grad:totable(), {3, 3, 3}, "after clearing, starts over")
end

function tests.one_input_used_twice_sums_both_paths(t)
    local x = ml.tensor({2}, {requires_grad = true})
    local y = x * x * x + x:exp():log()
    y:sum():backward()
    t:assertNear(x.grad:item(), 3 * 4 + 1, 1e-5)
end

function tests.retain_graph_and_second_backward(t)
    local x = ml.tensor({1, 2, 3}, {requires_grad = true})
    local y = (x * x):sum()
    y:backward({retain_graph = true})
    t:assertEq(x.grad:totable(), {2, 4, 6})
    y:backward()
    t:assertEq(x.grad:totable(), {4, 8, 12}, "the retained graph runs again")
    local e = error_of(y.backward, y)
    t:assert(has(e, "second time") and has(e, "retain_graph"), "third backward: " .. tostring(e))
    local z = (x * 2):sum()
    z:backward(ml.tensor(1), {retain_graph = true})
    z:backward(ml.tensor(1))
    t:assertEq(x.grad:totable(), {8, 12, 16}, "explicit gradient and options together")
    local u = (x * 3):sum()
    u:backward(nil, {retain_graph = true})
    u:backward()
    t:assertEq(x.grad:totable(), {14, 18, 22}, "backward(nil, opts) keeps the graph as asked")
end

-- What backward cannot use is refused, never dropped.
function tests.backward_refuses_what_it_cannot_use(t)
    local x = ml.tensor({1, 2, 3}, {requires_grad = true})
    local y = (x * x):sum()
    local cases = {
        {function() y:backward(2) end, "gradient must be a tensor (got number)"},
        {function() y:backward("1") end, "gradient must be a tensor (got string)"},
        {function() y:backward(nil, 5) end, "options must be a table"},
        {function() y:backward(ml.tensor(1), "retain") end, "options must be a table"},
        {function() y:backward({retain = true}) end, "unknown option 'retain'"},
        {function() y:backward({retain_graph = true}, 1) end, "options come last"},
    }
    for i, c in ipairs(cases) do
        local e = error_of(c[1])
        t:assert(has(e, c[2]), "case " .. i .. ": " .. tostring(e))
    end
    t:assert(x.grad == nil, "no refused call wrote a gradient")
    y:backward()
    t:assertEq(x.grad:totable(), {2, 4, 6}, "the graph is intact after the refusals")
end

function tests.no_grad_records_nothing_and_returns_values(t)
    local x = ml.tensor({1, 2}, {requires_grad = true})
    local y, extra = ml.no_grad(function(a, b) return a * 3, b end, x, "passed")
    t:assertEq(y:totable(), {3, 6}, "values computed")
    t:assertEq(extra, "passed", "arguments and results pass through")
    t:assert(not y.requires_grad, "no history")
    t:assertEq(y.grad_fn, nil)
    t:assert(ml.is_grad_enabled(), "restored afterwards")
    t:assert(has(error_of(ml.no_grad, function() error("boom") end), "boom"), "errors propagate")
    t:assert(ml.is_grad_enabled(), "restored after an error")
    local inner = ml.no_grad(function()
        t:assert(not ml.is_grad_enabled())
        return ml.enable_grad(function() return (x * 2).requires_grad end)
    end)
    t:assert(inner, "enable_grad inside no_grad records")
    local prev = ml.set_grad_enabled(false)
    t:assert(prev == true and not ml.is_grad_enabled())
    t:assert(not (x * 2).requires_grad)
    ml.set_grad_enabled(true)
end

function tests.detach(t)
    local x = ml.tensor({1, 2}, {requires_grad = true})
    local y = x * 2
    local d = y:detach()
    t:assert(not d.requires_grad and d.is_leaf and d.grad_fn == nil)
    t:assertEq(d:totable(), {2, 4})
    local z = (d * x):sum()
    z:backward()
    t:assertEq(x.grad:totable(), {2, 4}, "no gradient flows through the detached factor")
    -- detached tensors share storage
    ml.no_grad(function() d:fill_(0) end)
    t:assertEq(y:totable(), {0, 0})
end

function tests.hooks_modify_and_remove(t)
    local x = ml.tensor({1, 2, 3}, {requires_grad = true})
    local seen
    local id = x:register_hook(function(g)
        seen = g:totable()
        return g * 10
    end)
    t:assertEq(math.type(id), "integer")
    ml.sum(x * 2):backward()
    t:assertEq(seen, {2, 2, 2}, "the hook sees the incoming gradient")
    t:assertEq(x.grad:totable(), {20, 20, 20}, "its result replaces it")
    x:remove_hook(id)
    x.grad = nil
    ml.sum(x * 2):backward()
    t:assertEq(x.grad:totable(), {2, 2, 2}, "removed hooks no longer run")
    local calls = 0
    x.grad = nil
    x:register_hook(function() calls = calls + 1 end)
    x:sum():backward()
    t:assertEq(calls, 1)
    t:assertEq(x.grad:totable(), {1, 1, 1}, "a hook returning nil keeps the gradient")
end

function tests.hook_errors_surface_in_backward(t)
    local x = ml.tensor({1}, {requires_grad = true})
    x:register_hook(function() error("bad hook") end)
    local e = error_of(function() (x * 2):sum():backward() end)
    t:assert(has(e, "gradient hook failed") and has(e, "bad hook"), tostring(e))
    local y = ml.tensor({1}, {requires_grad = true})
    y:register_hook(function() return "nope" end)
    t:assert(has(error_of(function() y:sum():backward() end), "tensor or nil"))
    local h = ml.tensor({1}, {requires_grad = true}) * 2
    t:assert(has(error_of(h.register_hook, h, function() end), "leaf"), "hooks are for leaves")
end

function tests.requires_grad_rules(t)
    local i = ml.tensor({1, 2}, {dtype = "i64"})
    t:assert(has(error_of(function() i.requires_grad = true end), "floating point"), "int tensors can't")
    t:assert(has(error_of(i.requires_grad_, i), "floating point"))
    t:assert(has(error_of(ml.tensor, {1}, {dtype = "i32", requires_grad = true}), "floating point"))
    t:assert(has(error_of(ml.zeros, 2, {dtype = "i64", requires_grad = true}), "floating point"))
    t:assert(has(error_of(ml.full, {2}, 1, {dtype = "bool", requires_grad = true}), "floating point"))
    local f = ml.zeros(2)
    t:assert(rawequal(f:requires_grad_(), f), "requires_grad_ returns self")
    t:assert(f.requires_grad)
    f:requires_grad_(false)
    t:assert(not f.requires_grad)
    for _, dt in ipairs {"f64", "f16", "bf16"} do
        local x = ml.zeros(2, {dtype = dt})
        x.requires_grad = true
        t:assert(x.requires_grad, dt)
    end
    local x = ml.tensor({1}, {requires_grad = true})
    local y = x * 2
    t:assert(y.requires_grad, "results of ops on tensors requiring grad require grad")
    t:assert(not (ml.tensor({1}) * 2).requires_grad, "and only those")
    t:assert(has(error_of(function() y.requires_grad = false end), "leaf"), "can't clear on a non-leaf")
end

function tests.in_place_on_leaves_requiring_grad(t)
    local x = ml.tensor({1, 2}, {requires_grad = true})
    for _, f in ipairs {
        function() x:add_(1) end, function() x:mul_(2) end, function() x:sub_(ml.ones(2)) end,
        function() x:div_(2) end, function() x:div_(ml.ones(2)) end, function() x:clamp_(0, 1) end,
        function() x:fill_(3) end,
        function() x:zero_() end, function() x:copy_(ml.ones(2)) end,
    } do
        t:assert(has(error_of(f), "leaf tensor that requires grad"))
    end
    t:assertEq(x:totable(), {1, 2}, "nothing was written")
    ml.no_grad(function()
        x:add_(1)
        x:mul_(2)
    end)
    t:assertEq(x:totable(), {4, 6}, "works under no_grad")
    t:assert(x.requires_grad, "and keeps requires_grad")
    local y = x * 2
    t:assert(has(error_of(y.add_, y, 1), "part of an autograd graph"), "non-leaf in a graph")
    t:assertNoError(function() ml.zeros(2):add_(1) end, "plain tensors are free to change")
end

function tests.grad_assignment(t)
    local x = ml.tensor({1, 2}, {requires_grad = true})
    x.grad = ml.tensor({5, 5})
    t:assertEq(x.grad:totable(), {5, 5})
    x:sum():backward()
    t:assertEq(x.grad:totable(), {6, 6}, "backward accumulates into an assigned grad")
    x.grad = nil
    t:assertEq(x.grad, nil)
    local e = error_of(function() x.grad = ml.zeros(3) end)
    t:assert(has(e, "[3]") and has(e, "[2]"), tostring(e))
    -- .grad is the same tensor each time: in-place updates stick
    x.grad = ml.zeros(2)
    x.grad:add_(1)
    t:assertEq(x.grad:totable(), {1, 1})
end

function tests.views_pass_gradients_to_their_base(t)
    local x = ml.randn({3, 4}, {requires_grad = true})
    local y = x:t():narrow(1, 2, 2):select(2, 3)    -- x[3][2..3]
    ml.sum(y * ml.tensor({10, 20})):backward()
    local want = ml.zeros(3, 4)
    want[3]:narrow(1, 2, 2):copy_(ml.tensor({10, 20}))
    t:assertTensorEq(x.grad, want, 0)
end

function tests.graph_is_released_after_backward(t)
    -- saved tensors are dropped by backward: freeing the leaf box afterwards
    -- leaves nothing the graph still needs
    local x = ml.randn({4}, {requires_grad = true})
    local y = (x:exp() * x):sum()
    y:backward()
    local g = x.grad:clone()
    x:free()
    t:assert(has(error_of(y.backward, y), "second time"))
    t:assertEq(g:size(), {4})
end

-- PyTorch's rule: a tensor saved for backward must not be modified in
-- place before backward uses it.  The error names the op that saved it.
local function modified_error(e, op)
    return has(e, "modified by an inplace operation") and has(e, "of '" .. op .. "'")
end

function tests.saved_tensor_modified_in_place_fails_backward(t)
    local w = ml.ones({3}, {requires_grad = true})
    local x = ml.ones(3)
    local y = (w * x):sum()
    x:add_(10)
    local e = error_of(y.backward, y)
    t:assert(modified_error(e, "mul") and has(e, "is at version 1; expected version 0"), tostring(e))
    t:assertEq(w.grad, nil, "no gradient computed from the modified values")
    -- modified before the op saw it: nothing to refuse, gradient is x
    y = (w * x):sum()
    y:backward()
    t:assertEq(w.grad:totable(), {11, 11, 11})
    -- without the modification the example gives PyTorch's 1, 1, 1
    w.grad = nil
    local x2 = ml.ones(3)
    y = (w * x2):sum()
    y:backward()
    t:assertEq(w.grad:totable(), {1, 1, 1})
end

function tests.every_in_place_op_is_caught(t)
    local cases = {
        add_ = function(x) x:add_(1) end, add_tensor = function(x) x:add_(ml.ones(3), 2) end,
        sub_ = function(x) x:sub_(1) end, mul_ = function(x) x:mul_(ml.ones(3)) end,
        div_ = function(x) x:div_(2) end, div_tensor = function(x) x:div_(ml.full({3}, 2)) end,
        clamp_ = function(x) x:clamp_(0, 0.5) end,
        fill_ = function(x) x:fill_(7) end, zero_ = function(x) x:zero_() end,
        copy_ = function(x) x:copy_(ml.zeros(3)) end, normal_ = function(x) x:normal_() end,
        uniform_ = function(x) x:uniform_() end,
    }
    for name, modify in pairs(cases) do
        local w = ml.ones({3}, {requires_grad = true})
        local x = ml.ones(3)
        local y = (w * x):sum()
        modify(x)
        t:assert(modified_error(error_of(y.backward, y), "mul"), name .. " is seen by backward")
    end
end

function tests.views_share_the_version(t)
    local w = ml.ones({3}, {requires_grad = true})
    -- saved through one view, written through another view of the storage
    local x = ml.ones(2, 3)
    local y = (w * x[1]):sum()
    x[2]:fill_(5)
    t:assert(modified_error(error_of(y.backward, y), "mul"), "sibling row")
    -- saved as a view, written through the base
    x = ml.ones(2, 3)
    y = (w * x:narrow(1, 2, 1):view(3)):sum()
    x:mul_(3)
    t:assert(modified_error(error_of(y.backward, y), "mul"), "base written")
    -- saved as the base, written through a view
    local w2 = ml.ones({2, 3}, {requires_grad = true})
    x = ml.ones(2, 3)
    y = (w2 * x):sum()
    x:t()[3]:zero_()
    t:assert(modified_error(error_of(y.backward, y), "mul"), "transposed view written")
    -- a clone has its own storage and version
    x = ml.ones(2, 3)
    y = (w2 * x:clone()):sum()
    x:add_(1)
    y:backward()
    t:assertEq(w2.grad:totable(), {{1, 1, 1}, {1, 1, 1}}, "a clone is not affected")
end

function tests.ops_saving_many_tensors_check_each(t)
    -- layer_norm saves x, weight, mean and rstd; sdpa saves q, k, v, out and lse
    local x = ml.randn({2, 4}, {requires_grad = true})
    local wt, b = ml.ones(4), ml.zeros(4)
    local y = ml.F.layer_norm(x, wt, b):sum()
    wt:mul_(2)
    local e = error_of(y.backward, y)
    t:assert(modified_error(e, "layer_norm") and has(e, "saved tensor 2"), tostring(e))
    local q = ml.randn({1, 3, 1, 4}, {requires_grad = true})
    local k, v = ml.randn(1, 3, 1, 4), ml.randn(1, 3, 1, 4)
    local out = ml.F.scaled_dot_product_attention(q, k, v)
    y = out:sum()
    v:add_(1)
    e = error_of(y.backward, y)
    t:assert(modified_error(e, "sdpa") and has(e, "saved tensor 3"), tostring(e))
    -- the op's own output is saved too: writing it under no_grad is caught
    out = ml.F.scaled_dot_product_attention(q, k, v)
    y = out:sum()
    ml.no_grad(function() out:fill_(0) end)
    e = error_of(y.backward, y)
    t:assert(modified_error(e, "sdpa") and has(e, "saved tensor 4"), tostring(e))
end

function tests.optimizer_step_between_retained_backwards(t)
    for _, make in ipairs {
        function(p) return ml.optim.AdamW({p}, {lr = 0.1}) end,
        function(p) return ml.optim.SGD({p}, {lr = 0.1}) end,
    } do
        local p = ml.tensor({1, 2, 3}, {requires_grad = true})
        local opt = make(p)
        local loss = (p * p):sum()
        loss:backward({retain_graph = true})
        opt:step()
        local e = error_of(loss.backward, loss)
        t:assert(modified_error(e, "mul"), "second backward after a step: " .. tostring(e))
        -- the ordinary loop: a fresh forward after the step is fine
        opt:zero_grad()
        loss = (p * p):sum()
        loss:backward()
        opt:step()
        t:assert(p.grad ~= nil, "training continues")
    end
end

function tests.saved_census_counts_each_storage_once(t)
    local core = ml.core
    local w = ml.ones({4, 4}, {requires_grad = true})
    local x = ml.ones(2, 4)
    t:assertEq(#core.saved_census(w), 0, "a leaf holds nothing")
    local h = x:matmul(w)           -- saves x and w
    local y = (h * h):sum()         -- mul saves h twice: one storage
    local by = {}
    local total = 0
    for _, e in ipairs(core.saved_census(y)) do by[e.op] = e; total = total + e.bytes end
    t:assert(by.mul and by.matmul, "mul and matmul listed")
    t:assertEq(by.mul.nodes, 1, "one mul node")
    t:assertEq(by.mul.tensors, 1, "h saved twice is one storage")
    t:assertEq(by.mul.bytes, 2 * 4 * 4, "h's bytes")
    t:assertEq(by.matmul.tensors, 2, "x and w")
    t:assertEq(total, (2 * 4 + 4 * 4 + 2 * 4) * 4, "every storage once")
    y:backward()
    t:assertEq(#core.saved_census(y), 0, "nothing held after backward")
end

return tests
