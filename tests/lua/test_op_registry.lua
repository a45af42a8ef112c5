-- test_op_registry.lua — the op registry (host/op_registry.h) as Lua sees
-- it: every row reachable where it says (moonlit.core, tensor methods,
-- ml.F), ml.F made of nothing else, and the nodes ops record named by
-- their registry rows.
local ml = require "moonlit"
local core = ml.core

local tests = {}

local function registry()
    local by_name = {}
    for _, op in ipairs(core.op_registry()) do by_name[op.name] = op end
    return core.op_registry(), by_name
end

function tests.rows_are_complete(t)
    local ops, by_name = registry()
    t:assert(#ops > 60, "the registry lists its ops (" .. #ops .. ")")
    for _, op in ipairs(ops) do
        t:assert(type(op.name) == "string" and type(op.lua) == "string", "names of " .. tostring(op.name))
        for _, k in ipairs {"differentiable", "gradcheck", "cuda", "fn", "method", "F"} do
            t:assert(type(op[k]) == "boolean", op.name .. "." .. k .. " is a boolean")
        end
    end
    t:assertEq(by_name.sdpa.lua, "scaled_dot_product_attention")
    t:assertEq(by_name.adamw_step.lua, "adamw_step_")
    for _, name in ipairs {"floor", "round", "sign", "argmax", "unsqueeze", "to_device", "clone"} do
        t:assert(by_name[name], name .. " is in the registry")
    end
    t:assert(not by_name.argmax.differentiable and by_name.argmax.cuda, "argmax: no gradient, CUDA")
    t:assert(by_name.to_device.differentiable and not by_name.to_device.gradcheck,
             "to_device's gradient is checked by the parity suite")
end

function tests.every_row_is_reachable_where_it_says(t)
    local ops = registry()
    local methods = core.Tensor.__methods
    for _, op in ipairs(ops) do
        if op.fn then
            t:assert(type(core[op.lua]) == "function", "core." .. op.lua .. " (" .. op.name .. ")")
            t:assert(ml[op.lua] == core[op.lua], "ml." .. op.lua)
        end
        if op.method then t:assert(type(methods[op.lua]) == "function", "t:" .. op.lua .. "() (" .. op.name .. ")") end
        if op.F then t:assert(type(ml.F[op.lua]) == "function", "ml.F." .. op.lua) end
        if op.fn and op.method then
            t:assert(methods[op.lua] == core[op.lua], "the method " .. op.lua .. " is the core function")
        end
    end
end

-- ml.F is the registry's F column plus the wrappers functional.lua writes
-- for another signature (interpolate is upsample_nearest2d by options).
function tests.F_is_made_from_the_registry(t)
    local in_F = {interpolate = true}
    for _, op in ipairs(registry()) do
        if op.F then in_F[op.lua] = true end
    end
    for name, v in pairs(ml.F) do
        if type(v) == "function" then t:assert(in_F[name], "ml.F." .. name .. " is no registry op") end
    end
end

function tests.methods_of_registry_ops_and_in_place_writes(t)
    local x = ml.ones(3)
    for _, name in ipairs {"add_", "sub_", "mul_", "div_", "clamp_", "normal_", "uniform_"} do
        t:assert(type(x[name]) == "function", "t:" .. name .. "()")
        t:assert(core[name] == x[name], "core." .. name .. " is the method")
    end
    x:sub_(0.5):div_(4)
    t:assertTensorEq(x, ml.full({3}, 0.125), 0, "sub_ and div_ by numbers")
    x:sub_(ml.ones(3), 0.25)
    t:assertTensorEq(x, ml.full({3}, -0.125), 0, "sub_ with alpha")
end

-- What t.grad_fn prints is the name of a registry op, the one that ran.
function tests.nodes_are_registry_ops(t)
    local _, by_name = registry()
    local x = ml.randn({3, 4})
    x.requires_grad = true
    local q = x:view(1, 3, 1, 4)
    local cases = {
        {"x - 1", function() return x - 1 end, "add"},
        {"x / 2", function() return x / 2 end, "mul"},
        {"1 - x", function() return 1 - x end, "sub"},
        {"2 / x", function() return 2 / x end, "div"},
        {"floor", function() return x:floor() end, "floor"},
        {"round", function() return x:round() end, "round"},
        {"sign", function() return x:sign() end, "sign"},
        {"unsqueeze", function() return x:unsqueeze(1) end, "unsqueeze"},
        {"clone", function() return x:clone() end, "clone"},
        {"t()", function() return x:t() end, "permute"},
        {"reshape", function() return x:reshape(12) end, "view"},
        {"double", function() return x:double() end, "to_dtype"},
        {"log_softmax", function() return ml.F.log_softmax(x) end, "log_softmax"},
        {"mean", function() return x:mean() end, "mean"},
        {"attention", function() return ml.F.scaled_dot_product_attention(q, q, q) end, "sdpa"},
        {"gather", function() return ml.gather(x, 1, ml.tensor({{1, 3, 2, 1}}, {dtype = "i64"})) end, "gather"},
    }
    for _, c in ipairs(cases) do
        local y = c[2]()
        t:assertEq(y.grad_fn, c[3], c[1])
        t:assert(by_name[y.grad_fn], c[1] .. ": " .. tostring(y.grad_fn) .. " is a registry op")
    end
    t:assertEq(x:argmax(2).grad_fn, nil, "argmax records nothing")
    t:assertEq(x:gt(0).grad_fn, nil, "a comparison records nothing")
end

-- Indices from Lua are 1-based; the host converts them (gather,
-- index_select take them, max and argmax return them).
function tests.indices_are_one_based(t)
    local x = ml.tensor({{1, 5, 2}, {7, 0, 3}})
    local g = ml.gather(x, 2, ml.tensor({{3, 1}, {1, 1}}, {dtype = "i64"}))
    t:assertEq(g:totable(), {{2, 1}, {7, 7}})
    t:assertEq(ml.index_select(x, 2, ml.tensor({2, 3}, {dtype = "i32"})):totable(), {{5, 2}, {0, 3}})
    t:assertEq(x:argmax(2):totable(), {2, 1})
    local _, idx = x:max(1)
    t:assertEq(idx:totable(), {2, 1, 2})
    t:assertError(function() return ml.index_select(x, 2, ml.tensor({0}, {dtype = "i64"})) end, "out of range")
    t:assertError(function() return ml.gather(x, 2, ml.tensor({{1.5}})) end, "int32 or int64")
end

return tests
