-- check_index_base.lua — gather, index_select and argmax with Lua's 1-based
-- indices on one device against the CPU: the kernels take the base
-- themselves, so each call must run exactly one kernel (no pass shifting
-- the index or the result), give the CPU's values and gradients (bit for bit
-- in f32: both sum in index order), and report a bad index with the CPU's
-- message, in 1-based positions and ranges.
--   build/moonlit tests/gpu/check_index_base.lua          (cuda:0 against the CPU)
--   MOONLIT_PARITY_DEVICE=cpu build/moonlit tests/gpu/check_index_base.lua   (CPU against itself)
-- Prints one line per check, then "N passed, N failed"; exits 1 on a failure.
local ml = require "moonlit"
local F = ml.F

local DEV = os.getenv("MOONLIT_PARITY_DEVICE") or "cuda"
local KSUF = DEV == "cpu" and "_cpu" or "_cuda"
local passed, failed = 0, 0

local function record(what, ok, note)
    print(string.format("%-58s %s%s", what, ok and "ok" or "FAIL", note and ("  " .. note) or ""))
    if ok then passed = passed + 1 else failed = failed + 1 end
end

local function on(dev, t) return dev == "cpu" and t or t:to(dev) end

-- Elements that differ (any dtype; exact comparison).
local function differing(a, b)
    a, b = a:cpu(), b:cpu()
    if a:numel() ~= b:numel() then return -1 end
    if a:numel() == 0 then return 0 end
    return a:double():ne(b:double()):long():sum():item()
end

-- Kernel calls while fn runs: calls of `name` and of every kernel.
local function count(name, fn)
    local rep, out = ml.profile(fn)
    local mine, total = 0, 0
    for _, e in ipairs(rep) do
        total = total + e.calls
        if e.name == name then mine = mine + e.calls end
    end
    return mine, total, out
end

local function idx(list, dt) return ml.tensor(list, {dtype = dt or "i64"}) end

-- {label, kernel, function(x, i) -> y, x shape, 1-based index table, index dtype}
local cases = {
    {"gather dim 2, repeats", "ml_gather_forward", function(x, i) return F.gather(x, 2, i) end,
     {3, 4}, {{1, 1, 4}, {2, 3, 2}, {4, 4, 4}}},
    {"gather dim 1, int32, index smaller than input", "ml_gather_forward", function(x, i) return F.gather(x, 1, i) end,
     {6, 5}, {{6, 1, 2}, {3, 3, 5}}, "i32"},
    {"gather schedule lookup [1000] at 8 timesteps", "ml_gather_forward", function(x, i) return F.gather(x, 1, i) end,
     {1000}, {1, 1000, 500, 2, 999, 1, 37, 1000}},
    {"index_select dim 1, repeats", "ml_index_select_forward", function(x, i) return F.index_select(x, 1, i) end,
     {4, 3}, {3, 1, 3, 4}},
    {"index_select middle dim of [3,10,4], int32", "ml_index_select_forward",
     function(x, i) return F.index_select(x, 2, i) end, {3, 10, 4}, {10, 1, 1, 7, 10, 2}, "i32"},
}

for _, c in ipairs(cases) do
    local label, kernel, fn, shape, list, dt = table.unpack(c)
    ml.manual_seed(7)
    local xc = ml.randn(shape)
    local w = ml.randn(fn(xc, idx(list, dt)):size())
    local res = {}
    for _, dev in ipairs({"cpu", DEV}) do
        local x, i = on(dev, xc:clone()), on(dev, idx(list, dt))
        x.requires_grad = true
        local suffix = dev == "cpu" and "_cpu" or "_cuda"
        local mine, total, y = count(kernel .. suffix, function() return fn(x, i) end)
        local s = (y * on(dev, w)):sum()
        s:backward()
        res[dev] = {y = y, g = x.grad, mine = mine, total = total, i = i, list_after = i:cpu():long()}
    end
    local r = res[DEV]
    record(label .. ": one kernel", r.mine == 1 and r.total == 1,
           string.format("%s %d of %d calls", kernel .. KSUF, r.mine, r.total))
    record(label .. ": values", differing(res.cpu.y, r.y) == 0)
    record(label .. ": gradient (exact)", differing(res.cpu.g, r.g) == 0)
    record(label .. ": index left as given", differing(r.list_after, idx(list, dt)) == 0)
end

-- argmax: the kernel writes 1-based positions.
do
    ml.manual_seed(9)
    local xc = ml.randn({64, 300})
    for _, a in ipairs({{"argmax dim 2 (warp path)", 2, false}, {"argmax dim 1 keepdim (thread path)", 1, true}}) do
        local label, d, keep = a[1], a[2], a[3]
        local x = on(DEV, xc)
        local mine, total, got = count("ml_max_dim" .. KSUF, function() return x:argmax(d, keep) end)
        local want = xc:argmax(d, keep)
        -- 1-based positions of the maxima: gathering there reads the maxima
        local at = keep and got:cpu() or got:cpu():unsqueeze(d)
        local maxima = xc:max(d, true)
        record(label .. ": one kernel", mine == 1 and total == 1, string.format("%d of %d calls", mine, total))
        record(label .. ": same positions as the CPU", differing(want, got) == 0)
        record(label .. ": 1-based (gathering there reads the maxima)", differing(F.gather(xc, d, at), maxima) == 0)
    end
end

-- Errors: index 0 (before the first position) and one past the end, named
-- as the CPU names them.
local function message(fn, ...)
    local ok, err = pcall(fn, ...)
    if ok then return nil end
    return (tostring(err):gsub("^.-: ([%w_]+: index)", "%1"))
end

local bad = {
    {"gather index 0", function(x, i) return F.gather(x, 1, i) end, {2, 3}, {{1, 0, 2}}, "index 0 (element 2 of the indices)",
     "(valid: 1..2)"},
    {"index_select index past the end", function(x, i) return F.index_select(x, 2, i) end, {2, 3}, {1, 4},
     "index 4 (element 2 of the indices)", "(valid: 1..3)"},
}
for _, b in ipairs(bad) do
    local label, fn, shape, list, want1, want2 = table.unpack(b)
    local mc = message(fn, ml.randn(shape), idx(list))
    local mg = message(fn, on(DEV, ml.randn(shape)), on(DEV, idx(list)))
    record(label .. ": error in 1-based terms", mg ~= nil and mg:find(want1, 1, true) ~= nil
           and mg:find(want2, 1, true) ~= nil, mg)
    record(label .. ": same message as the CPU", mg ~= nil and mg == mc)
end

print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
