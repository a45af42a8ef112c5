-- moonlit.gradcheck (ml.gradcheck) — finite-difference check of gradients.
--
--   local ok, msg = ml.gradcheck(fn, {x, w, 3}, {eps = 1e-6, atol = 1e-5, rtol = 1e-3})
--
-- fn(...) receives the inputs (tensors or anything else) and returns one
-- floating-point tensor y.  For a fixed random projection w (f64, shape of
-- y) the scalar s = <y, w> is differentiated twice: analytically through
-- backward, and numerically by central differences, moving one element of
-- one input at a time by +-eps in place.  Every input that requires grad is
-- checked; each must be a CPU float64 leaf (f64 keeps the differences
-- meaningful).  An element passes when |analytic - numeric| <= atol +
-- rtol * |numeric|.  Returns true, summary or false, a message naming the
-- first failing input and element (1-based, like every Lua index).
--
-- fn must be deterministic (random ops: seed inside fn); the inputs' values
-- and .grad fields are the same afterwards as before.
local core = require "moonlit.core"

-- The 0-dim view of flat element k (0-based, row-major) of t, and its
-- 1-based multi-index.  Selecting keeps the view on t's storage even when t
-- is not contiguous, so writing to it perturbs t itself.
local function element(t, k)
    local sizes, idx = t:size(), {}
    for d = #sizes, 1, -1 do
        idx[d] = k % sizes[d] + 1
        k = k // sizes[d]
    end
    local v = t
    for d = 1, #sizes do v = v:select(1, idx[d]) end
    return v, idx
end

-- Gradient as a flat Lua list of numbers (logical order).
local function flat_values(g)
    if g:dim() == 0 then return {g:item()} end
    return g:reshape(-1):totable()
end

local function fmt_index(idx)
    return "{" .. table.concat(idx, ", ") .. "}"
end

local function gradcheck(fn, inputs, opts)
    opts = opts or {}
    local eps, atol, rtol = opts.eps or 1e-6, opts.atol or 1e-5, opts.rtol or 1e-3
    local n = inputs.n or #inputs
    local checked = {}
    for i = 1, n do
        local x = inputs[i]
        if core.is_tensor(x) and x.requires_grad then
            if x.dtype ~= "f64" or x.device ~= "cpu" then
                return false, string.format("gradcheck: input %d must be a CPU f64 tensor (got %s on %s)",
                                            i, x.dtype, x.device)
            end
            if not x.is_leaf then
                return false, string.format("gradcheck: input %d requires grad but is not a leaf", i)
            end
            checked[#checked + 1] = i
        end
    end
    if #checked == 0 then return false, "gradcheck: no input requires grad" end

    local function call()
        local y = fn(table.unpack(inputs, 1, n))
        if not core.is_tensor(y) then
            error("gradcheck: fn must return a tensor (got " .. type(y) .. ")", 0)
        end
        return y
    end

    -- analytic: backward of <y, w>, with the inputs' own .grad set aside
    local saved_grads = {}
    for _, i in ipairs(checked) do
        saved_grads[i] = inputs[i].grad
        inputs[i].grad = nil
    end
    local ok, res = pcall(function()
        local y = call()
        if y.dtype ~= "f64" and y.dtype ~= "f32" and y.dtype ~= "f16" and y.dtype ~= "bf16" then
            error("gradcheck: fn returned a " .. y.dtype .. " tensor; a floating-point output is needed", 0)
        end
        if not y.requires_grad then
            error("gradcheck: fn's output does not require grad (no input reached it through a differentiable op)", 0)
        end
        local w = core.randn(y:size(), {dtype = "f64"})
        core.sum(core.mul(y:double(), w)):backward()
        local grads = {}
        for _, i in ipairs(checked) do
            local g = inputs[i].grad
            if g and table.concat(g:size(), ",") ~= table.concat(inputs[i]:size(), ",") then
                error(string.format("gradcheck: input %d got a gradient of shape [%s] for shape [%s]", i,
                                    table.concat(g:size(), ", "), table.concat(inputs[i]:size(), ", ")), 0)
            end
            grads[i] = g and flat_values(g) or false   -- no gradient reached it: all zeros
        end
        return {w = w, grads = grads}
    end)
    for _, i in ipairs(checked) do inputs[i].grad = saved_grads[i] end
    if not ok then return false, tostring(res) end
    local w, grads = res.w, res.grads

    local function project()
        return core.sum(core.mul(call():double(), w)):item()
    end

    -- numeric: central differences, one element at a time, no recording
    return core.no_grad(function()
        local s0 = project()
        if math.abs(project() - s0) > atol then
            return false, "gradcheck: fn is not deterministic (two calls on the same inputs differ)"
        end
        local bad, first, total = 0, nil, 0
        for _, i in ipairs(checked) do
            local x = inputs[i]
            for k = 0, x:numel() - 1 do
                local e, idx = element(x, k)
                local orig = e:item()
                local pok, perr = pcall(function()
                    e:fill_(orig + eps)
                    local vp = project()
                    e:fill_(orig - eps)
                    local vm = project()
                    return (vp - vm) / (2 * eps)
                end)
                e:fill_(orig)
                if not pok then error(perr, 0) end
                local num = perr
                local ana = grads[i] and grads[i][k + 1] or 0
                total = total + 1
                if not (math.abs(ana - num) <= atol + rtol * math.abs(num)) then
                    bad = bad + 1
                    first = first or string.format("input %d element %s: analytic %.10g, numeric %.10g",
                                                   i, fmt_index(idx), ana, num)
                end
            end
        end
        if bad > 0 then
            return false, string.format("gradcheck: %d of %d elements differ (atol %g, rtol %g); first: %s",
                                        bad, total, atol, rtol, first)
        end
        return true, string.format("gradcheck: %d elements of %d inputs match", total, #checked)
    end)
end

return setmetatable({gradcheck = gradcheck}, {__call = function(_, ...) return gradcheck(...) end})
