-- test_profile.lua — ml.profile: per-kernel totals of what ran inside fn.
local ml = require "moonlit"

local T = {}

local function find(rep, name)
    for _, e in ipairs(rep) do if e.name == name then return e end end
end

function T.counts_the_kernels_that_ran(t)
    local x = ml.randn({64, 64}, {requires_grad = true})
    local rep, v = ml.profile(function()
        local y = x:matmul(x):silu():sum()
        y:backward()
        return y:item()
    end)
    t:assert(type(v) == "number", "fn's results follow the report")
    local mm = find(rep, "ml_matmul_forward_cpu")
    t:assert(mm and mm.calls == 1 and mm.ms >= 0, "matmul forward timed once")
    t:assert(find(rep, "ml_matmul_backward_cpu"), "matmul backward timed")
    t:assert(find(rep, "ml_unary_cpu") and find(rep, "ml_unary_backward_cpu"), "silu forward and backward timed")
    for i = 2, #rep do t:assert(rep[i - 1].ms >= rep[i].ms, "sorted by time") end
end

function T.repeated_calls_accumulate(t)
    local a = ml.randn({16, 16})
    local rep = ml.profile(function() for _ = 1, 5 do local _ = a + a end end)
    t:assertEq(find(rep, "ml_binary_cpu").calls, 5)
end

function T.errors_propagate_and_profiling_stops(t)
    t:assertError(function() ml.profile(function() error("inside") end) end, "inside")
    local rep = ml.profile(function() return 1 end)
    t:assertEq(#rep, 0, "a fresh profile after an error starts empty")
    t:assertError(function() ml.profile(function() ml.profile(function() end) end) end, "already profiling")
end

local function find_scoped(rep, name, scope)
    for _, e in ipairs(rep) do if e.name == name and e.scope == scope then return e end end
end

function T.by_scope_files_kernels_under_their_layer_and_backward(t)
    local nn = ml.nn
    local m = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    local x = ml.randn(5, 8)
    local rep = ml.profile({by_scope = true}, function()
        -- autocast to f64 casts each f32 weight and bias in Linear, and
        -- the casts' backward copies the gradients back to f32.
        nn.autocast("f64", function() m(x):float():sum():backward() end)
    end)
    local fw = find_scoped(rep, "ml_linear_forward_cpu", "Linear")
    t:assert(fw and fw.calls == 2, "both linear forwards filed under Linear")
    t:assertEq(find_scoped(rep, "ml_unary_cpu", "SiLU").calls, 1)
    t:assertEq(find_scoped(rep, "ml_linear_backward_cpu", "backward of linear").calls, 2)
    -- x, two weights, two biases cast in the Linears; backward casts the
    -- gradients of :float() and of the four parameters' casts (x needs
    -- none), which the shadow cache hands out as cast_as nodes
    t:assertEq(find_scoped(rep, "ml_copy_cpu", "Linear").calls, 5, "the autocast casts, by layer")
    t:assertEq(find_scoped(rep, "ml_copy_cpu", "backward of to_dtype").calls, 1, "the backward of :float()")
    t:assertEq(find_scoped(rep, "ml_copy_cpu", "backward of cast_as").calls, 4, "the parameters' casts' backward")
    t:assert(find_scoped(rep, "ml_sum_cpu", nil), "a kernel outside any layer has no scope")
    local rows = rep:by_scope()
    local seen = {}
    for _, r in ipairs(rows) do seen[r.scope] = r.calls end
    t:assertEq(seen["Linear"], 7, "per-scope totals: 2 linears + 5 casts")
    -- a plain profile after a scoped one has no scopes, and no stale scope leaks
    local plain = ml.profile(function() local _ = x + x end)
    for _, e in ipairs(plain) do t:assert(e.scope == nil, "no scope in a plain report") end
    t:assert(not ml.core.profiling(), "profiling is off after the call")
end

return T
