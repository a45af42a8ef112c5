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

return T
