-- moonlit — the Lua face of the tensor core.
--   local ml = require "moonlit"
-- Tensors and ops come from the C module moonlit.core; this file arranges
-- them as PyTorch/Torch7 users expect: ml.tensor, ml.zeros, ..., operators
-- and methods on tensors, ml.F (functional ops), ml.nn, ml.optim, and the
-- lazily loaded ml.image, ml.sd, ml.data, ml.train, ml.dist.
local core = require "moonlit.core"

local ml = {core = core}
for k, v in pairs(core) do ml[k] = v end

local Tensor = core.Tensor
local methods = Tensor.__methods

Tensor.__add = core.add
Tensor.__sub = core.sub
Tensor.__mul = core.mul
Tensor.__div = core.div
Tensor.__pow = core.pow
Tensor.__unm = core.neg
Tensor.__len = function(t) return t:size(1) end

-- The core functions the op registry marks as methods double as tensor
-- methods (host/op_registry.h; the views and the in-place writes are
-- methods already, set by the core).
for _, op in ipairs(core.op_registry()) do
    if op.fn and op.method then methods[op.lua] = core[op.lua] end
end

-- A count or size argument of chunk/split: a positive integer (an integral
-- float such as 2.0 is taken), else an error naming it.
local function positive_integer(op, what, v)
    local n = type(v) == "number" and math.tointeger(v)
    if not n then
        error(string.format("%s: %s must be an integer (got %s)", op, what, type(v) == "number" and tostring(v) or type(v)), 3)
    end
    if n < 1 then error(string.format("%s: %s must be at least 1 (got %d)", op, what, n), 3) end
    return n
end

-- chunk(n, dim): n views along dim (the last may be smaller), as torch.chunk.
function methods.chunk(t, n, dim)
    dim = dim or 1
    n = positive_integer("chunk", "the number of chunks", n)
    local size = t:size(dim)
    -- size // n + (remainder and 1 or 0): (size + n - 1) // n overflows for n near 2^63
    local step = size // n + (size % n > 0 and 1 or 0)
    local out = {}
    local start = 1
    while start <= size do
        local len = math.min(step, size - start + 1)
        out[#out + 1] = t:narrow(dim, start, len)
        start = start + len
    end
    return table.unpack(out)
end

-- split(size, dim): views of `size` along dim (a table of sizes also works).
function methods.split(t, size, dim)
    dim = dim or 1
    local total, out, start = t:size(dim), {}, 1
    if type(size) == "table" then
        for i, len in ipairs(size) do
            len = type(len) == "number" and math.tointeger(len)
            if not len or len < 0 then
                error(string.format("split: size %d must be an integer >= 0 (got %s)", i, tostring(size[i])), 2)
            end
            if len > total - (start - 1) then
                error(string.format("split: sizes do not sum to the dimension's size %d (they pass it)", total), 2)
            end
            out[#out + 1] = t:narrow(dim, start, len)
            start = start + len
        end
        if start - 1 ~= total then error("split: sizes do not sum to the dimension's size", 2) end
    else
        size = positive_integer("split", "the split size", size)
        while start <= total do
            local len = math.min(size, total - start + 1)
            out[#out + 1] = t:narrow(dim, start, len)
            start = start + len
        end
    end
    return table.unpack(out)
end

function methods.flatten(t, first, last)
    first, last = first or 1, last or -1
    local nd = t:dim()
    if first < 0 then first = first + nd + 1 end
    if last < 0 then last = last + nd + 1 end
    local shape, n = {}, 1
    for i = 1, nd do
        if i < first or i > last then shape[#shape + 1] = t:size(i)
        else
            n = n * t:size(i)
            if i == last then shape[#shape + 1] = n end
        end
    end
    return t:view(shape)
end

function methods.type(t) return t.dtype end

ml.Tensor = Tensor
ml.F = require "moonlit.functional"
ml.nn = require "moonlit.nn"
ml.optim = require "moonlit.optim"

-- ml.no_grad(fn, ...) runs fn with gradient recording off and returns its results.
ml.no_grad = core.no_grad
ml.enable_grad = core.enable_grad

-- Heavier parts load on first use.
local lazy = {
    image = "moonlit.image", sd = "moonlit.sd", gradcheck = "moonlit.gradcheck", argparse = "moonlit.argparse",
    schedulers = "moonlit.schedulers", train = "moonlit.train",
    data = "moonlit.data",
    dist = "moonlit.dist",
}

-- ml.profile([opts,] fn, ...) -> report, fn's results.  report lists kernels
-- by total time ({name, ms, calls}); report:print(top) shows the first `top`
-- rows.  With opts.by_scope each row is one kernel in one scope ({name, scope,
-- ms, calls}): the layer class that called it in forward ("Linear", "GEGLU"),
-- "backward of <op>" for autograd's nodes, so a report shows which layer or
-- which backward emits, say, the copies.  report:by_scope(top) sums each
-- scope's kernels.
local Report = {}
Report.__index = Report
function Report:print(top)
    local total, scoped = 0, false
    for _, e in ipairs(self) do total = total + e.ms; scoped = scoped or e.scope ~= nil end
    local w = scoped and 72 or 36
    local fmt = "%-" .. w .. "s %10s %7s %7s"
    print(string.format(fmt, scoped and "kernel @ scope" or "kernel", "ms", "calls", "share"))
    for i = 1, math.min(top or 20, #self) do
        local e = self[i]
        local label = e.scope and (e.name .. " @ " .. e.scope) or e.name
        print(string.format("%-" .. w .. "s %10.2f %7d %6.1f%%", label:sub(1, w), e.ms, e.calls,
            total > 0 and 100 * e.ms / total or 0))
    end
    print(string.format("%-" .. w .. "s %10.2f", "total (timed kernels)", total))
end
-- Totals per scope (rows {scope, ms, calls}, by time), printed when top is given.
function Report:by_scope(top)
    local acc, rows = {}, {}
    for _, e in ipairs(self) do
        local k = e.scope or "(no scope)"
        local r = acc[k]
        if not r then r = {scope = k, ms = 0, calls = 0}; acc[k] = r; rows[#rows + 1] = r end
        r.ms, r.calls = r.ms + e.ms, r.calls + e.calls
    end
    table.sort(rows, function(a, b) return a.ms > b.ms end)
    if top then
        print(string.format("%-48s %10s %7s", "scope", "ms", "calls"))
        for i = 1, math.min(top, #rows) do
            print(string.format("%-48s %10.2f %7d", rows[i].scope:sub(1, 48), rows[i].ms, rows[i].calls))
        end
    end
    return rows
end
function ml.profile(...)
    local res = table.pack(core.profile(...))
    setmetatable(res[1], Report)
    return table.unpack(res, 1, res.n)
end

-- ml.cuda.available(), device_count(), memory_stats(dev), synchronize(dev), ...
-- (the core's cuda_* functions without the prefix; devices are 0-based as in "cuda:N").
ml.cuda = {}
for k, v in pairs(core) do
    local name = k:match("^cuda_(.+)$")
    if name then ml.cuda[name] = v end
end

-- The CLIP tokenizer of a model folder (vocab.json + merges.txt or tokenizer.json).
ml.load_tokenizer = core.tokenizer_load
setmetatable(ml, {__index = function(t, k)
    local mod = lazy[k]
    if mod then
        local m = require(mod)
        rawset(t, k, m)
        return m
    end
end})

-- How the REPL shows results: tensors by __tostring, tables by value
-- (sequences as {1, 2}, records as {k = v}), nested two levels deep.
local function show(v, depth)
    if type(v) == "string" then return depth > 0 and string.format("%q", v) or v end
    if type(v) ~= "table" or getmetatable(v) and getmetatable(v).__tostring then return tostring(v) end
    if depth >= 2 then return "{...}" end
    local parts, n = {}, #v
    for i = 1, math.min(n, 20) do parts[#parts + 1] = show(v[i], depth + 1) end
    if n > 20 then parts[#parts + 1] = "... (" .. n .. " items)" end
    local keys = {}
    for k in pairs(v) do
        if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
    end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for i, k in ipairs(keys) do
        if i > 20 then parts[#parts + 1] = "..." break end
        local ks = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. show(k, 2) .. "]"
        parts[#parts + 1] = ks .. " = " .. show(v[k], depth + 1)
    end
    return "{" .. table.concat(parts, ", ") .. "}"
end

function ml.repl_print(...)
    local out = {}
    for i = 1, select("#", ...) do out[i] = show((select(i, ...)), 0) end
    print(table.concat(out, "\t"))
end

ml.version = "0.1.0"
return ml
