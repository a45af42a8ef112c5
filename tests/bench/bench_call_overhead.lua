-- bench_call_overhead.lua — what one Lua -> C call costs: small ops on
-- 1-element tensors, where the call, argument checks, allocation of the
-- result and its userdata are all there is.  Prints microseconds per call
-- (median of several runs, CPU time); the target is <= 2 us for x:add(y).
--   moonlit tests/bench/bench_call_overhead.lua [calls_per_run] [runs]
local ml = require "moonlit"

local p = ml.argparse.new("bench_call_overhead.lua", "Microseconds per Lua -> C call of small tensor ops.")
p:positional("calls_per_run", {type = "integer", required = false, default = 200000, help = "calls timed per run"})
p:positional("runs", {type = "integer", required = false, default = 7, help = "runs (the median is reported)"})
local args = p:parse(arg or {})
local N, RUNS = args.calls_per_run, args.runs
if N < 1 or RUNS < 1 then p:error("calls_per_run and runs must be >= 1") end
local TARGET_US = 2.0

local x, y = ml.ones(1), ml.ones(1)
local m = ml.ones(4, 4)

local cases = {
    {"empty loop (baseline)", function() end},
    {"t:size(1)", function() return x:size(1) end},
    {"t:dim()", function() return x:dim() end},
    {"t.dtype (field)", function() return x.dtype end},
    {"x:add(y)", function() return x:add(y) end},
    {"x + y (metamethod)", function() return x + y end},
    {"x:mul(2) (number operand)", function() return x:mul(2) end},
    {"x:item()", function() return x:item() end},
    {"x:view(1, 1)", function() return x:view(1, 1) end},
    {"m:matmul(m) 4x4", function() return m:matmul(m) end},
    {"x:add(y) under no_grad", function() return ml.no_grad(x.add, x, y) end},
}

local function median(v)
    table.sort(v)
    local n = #v
    return n % 2 == 1 and v[(n + 1) // 2] or (v[n // 2] + v[n // 2 + 1]) / 2
end

local function run_once(fn)
    local t0 = os.clock()
    for _ = 1, N do fn() end
    return (os.clock() - t0) / N * 1e6
end

-- Runs go round-robin over the cases, so a busy moment of the machine
-- spreads over all of them instead of skewing one.
for _, c in ipairs(cases) do for _ = 1, N // 10 do c[2]() end end   -- warm up
local runs = {}
for _ = 1, RUNS do
    for k, c in ipairs(cases) do
        runs[k] = runs[k] or {}
        table.insert(runs[k], run_once(c[2]))
    end
end

print(string.format("%d calls per run, median of %d runs (CPU time)", N, RUNS))
local results = {}
for k, c in ipairs(cases) do
    local us = median(runs[k])
    results[c[1]] = us
    print(string.format("  %-30s %7.3f us/call", c[1], us))
end
local add = results["x:add(y)"]
print(string.format("x:add(y): %.3f us/call (target <= %.1f us): %s", add, TARGET_US,
                    add <= TARGET_US and "ok" or "OVER TARGET"))
