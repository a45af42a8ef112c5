-- test_ddp.lua — DistributedDataParallel over CPU workers: after one SGD
-- step every rank holds the same weights, and they equal (f32 tolerance)
-- one process stepping on the concatenated batch; with small buckets (many
-- all-reduces launched during backward), an unused parameter (no rank has
-- a gradient: it stays nil), gradient accumulation (no collective before
-- the last micro-step, counted), bf16 buckets (within the rounding bound
-- stated below), a rank with no data joining a step with no backward, and
-- buckets packed again in the order gradients arrive.
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

local sh_quote = U.shell_quote
local running_interpreter = U.running_interpreter
local BIN = os.getenv("MOONLIT_BIN") or running_interpreter() or "build/moonlit"

-- The script each worker runs: data and its split are fixed before
-- ml.train.run; the model is made inside train_fn, after each rank's RNG
-- stream has moved, so the ranks start from different weights and only
-- the broadcast makes them equal.  The ddp's collectives go through a
-- wrapper of ml.dist that counts the tensor all-reduces.
--   args: out_dir world_size accum dtype mode
--   mode "split": the 12 rows split evenly; "join": rank 0 takes rows 1-6
--   (its loss scaled by world_size, as the recipe's weights do), the
--   others have no data and call only finish().
local SCRIPT = [[
local ml = require "moonlit"
local out, n, accum, dtype, mode = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
ml.manual_seed(7)
local B = 12
local x, y = ml.randn({B, 5}), ml.randn({B, 3})
ml.train.run(function(cfg, ctx)
    local net = ml.nn.Sequential(ml.nn.Linear(5, 16), ml.nn.Tanh(), ml.nn.Linear(16, 3))
    local unused = ml.randn({4}):requires_grad_(true)
    -- first in the list, so last in bucket order: the other buckets launch during backward
    local params = {unused}
    for _, p in ipairs(net:parameters()) do params[#params + 1] = p end
    local counted = {all_reduce = 0}
    local counting = setmetatable({all_reduce = function(t, o)
        counted.all_reduce = counted.all_reduce + 1
        return ml.dist.all_reduce(t, o)
    end}, {__index = ml.dist})
    local ddp = ctx.world_size > 1 and ml.train.ddp(params, {bucket_mb = 1e-4, dtype = dtype, dist = counting}) or nil
    local opt = ml.optim.SGD(params, {lr = 0.5})
    local lo, per, scale = 1, B // ctx.world_size, 1
    if mode == "join" then
        lo, per, scale = 1, ctx.rank == 0 and B // 2 or 0, ctx.world_size
        if ctx.world_size == 1 then per, scale = B // 2, 1 end
    else
        lo = ctx.rank * per + 1
    end
    local counts = {}
    local local_grads = {}
    for k = 1, accum do
        if ddp then ddp:set_sync(k == accum) end
        if per > 0 then
            local micro = per // accum
            local xs, ys = x:narrow(1, lo + (k - 1) * micro, micro), y:narrow(1, lo + (k - 1) * micro, micro)
            local loss = ml.F.mse_loss(net(xs), ys) * (scale / accum)
            loss:backward()
        end
        counts[#counts + 1] = counted.all_reduce
    end
    for i, p in ipairs(net:parameters()) do local_grads["g" .. i] = p.grad and p.grad:clone() or ml.zeros(p:size()) end
    if ddp then ddp:finish() end
    counts[#counts + 1] = counted.all_reduce
    local sd = {unused_grad_is_nil = ml.tensor({unused.grad == nil and 1 or 0}),
                counts = ml.tensor(counts), buckets = ml.tensor({ddp and #ddp.buckets or 0})}
    for i, p in ipairs(net:parameters()) do
        sd["avg" .. i] = p.grad:clone()
        sd["local" .. i] = local_grads["g" .. i]
    end
    opt:step()
    for i, p in ipairs(net:parameters()) do sd["p" .. i] = p end
    ml.core.st_save(out .. "/rank" .. ctx.rank .. ".safetensors", sd)
    if ddp then ddp:close() end
end, {num_workers = n, device = "cpu", summary = false})
]]

local function run_script(dir, n, accum, dtype, mode)
    local out = string.format("%s/n%da%d%s%s", dir, n, accum, dtype, mode)
    os.execute("mkdir -p " .. sh_quote(out))
    local cmd = string.format("%s %s %s %d %d %s %s 2>&1", sh_quote(BIN), sh_quote(dir .. "/ddp_mlp.lua"), sh_quote(out),
                              n, accum, dtype, mode)
    local p = io.popen(cmd)
    local text = p:read("a")
    local ok = p:close()
    return ok, text, out
end

local function saved(out, rank) return ml.core.st_load(out .. "/rank" .. rank .. ".safetensors") end

local function max_diff(a, b, prefix)
    local worst = 0
    for k, v in pairs(a) do
        if k:match("^" .. prefix .. "%d") then worst = math.max(worst, (v - b[k]):abs():max():item()) end
    end
    return worst
end

local function setup()
    local dir = U.temp_dir()
    U.write_file(dir .. "/ddp_mlp.lua", SCRIPT)
    return dir
end

function tests.ddp_step_equals_one_process_on_the_whole_batch(t)
    local dir = setup()
    local ok, text, out1 = run_script(dir, 1, 1, "f32", "split")
    t:assert(ok, "single process run failed:\n" .. text)
    local ref = saved(out1, 0)
    for _, case in ipairs({{2, 1}, {3, 1}, {2, 2}}) do
        local n, accum = case[1], case[2]
        local ok2, text2, out = run_script(dir, n, accum, "f32", "split")
        t:assert(ok2, string.format("%d workers (accum %d) failed:\n%s", n, accum, text2))
        if ok2 then
            local w0 = saved(out, 0)
            t:assert(w0.unused_grad_is_nil:item() == 1, "a parameter no rank used keeps grad = nil")
            -- f32: the averaged gradient sums in a different order than one
            -- process's matmul over 12 rows
            local d = max_diff(ref, w0, "p")
            t:assert(d <= 1e-5, string.format("%d workers, accum %d: rank 0 differs from one process by %.3g", n, accum, d))
            local dg = max_diff(ref, w0, "avg")
            t:assert(dg <= 1e-5, string.format("%d workers, accum %d: gradients differ from one process by %.3g", n, accum, dg))
            for r = 1, n - 1 do
                local wr = saved(out, r)
                local dr = max_diff(w0, wr, "p")
                t:assert(dr == 0, string.format("%d workers: rank %d differs from rank 0 by %.3g", n, r, dr))
            end
        end
    end
    U.remove_tree(dir)
end

-- Buckets launch during backward (all but the last, which holds the unused
-- parameter, so it waits for finish); with accumulation nothing is reduced
-- before the last micro-step.
function tests.collectives_are_counted(t)
    local dir = setup()
    for _, accum in ipairs({1, 3}) do
        local ok, text, out = run_script(dir, 2, accum, "f32", "split")
        if t:assert(ok, "2 workers, accum " .. accum .. " failed:\n" .. text) then
            local s = saved(out, 0)
            local counts, nb = s.counts:totable(), s.buckets:item()
            t:assertEq(nb, 5, "one bucket per parameter (bucket_mb = 1e-4)")
            for k = 1, accum - 1 do
                t:assertEq(counts[k], 0, string.format("accum %d: no all-reduce after micro-step %d", accum, k))
            end
            t:assertEq(counts[accum], nb - 1, string.format("accum %d: the buckets but the unused one launch during the last backward", accum))
            t:assertEq(counts[accum + 1], nb, string.format("accum %d: finish() launches the last bucket", accum))
        end
    end
    U.remove_tree(dir)
end

-- bf16 buckets: each rank's gradient is rounded to bf16 (relative error at
-- most 2^-8), the hub adds in double and rounds the average once more
-- (2^-8 of it).  So, elementwise, |avg - reference| <= 2^-7 * mean_r |g_r|
-- * 1.01 + 1e-6 (g_r: rank r's own gradient; 1e-6 for the f32 difference
-- of summing in another order).  Ranks still agree bit for bit.
function tests.bf16_buckets_within_rounding(t)
    local dir = setup()
    local ok, text, out1 = run_script(dir, 1, 1, "f32", "split")
    t:assert(ok, "single process run failed:\n" .. text)
    local ref = saved(out1, 0)
    local n = 2
    local ok2, text2, out = run_script(dir, n, 1, "bf16", "split")
    if not t:assert(ok2, "2 workers with bf16 buckets failed:\n" .. text2) then return end
    local ranks = {saved(out, 0), saved(out, 1)}
    local worst_ratio, any_rounding = 0, false
    for k, g in pairs(ref) do
        local i = k:match("^avg(%d+)$")
        if i then
            local mean_abs = (ranks[1]["local" .. i]:abs() + ranks[2]["local" .. i]:abs()) / n
            local bound = mean_abs * (2 ^ -7 * 1.01) + 1e-6
            local err = (ranks[1][k] - g):abs()
            worst_ratio = math.max(worst_ratio, (err / bound):max():item())
            if err:max():item() > 1e-6 then any_rounding = true end
            t:assertEq((ranks[1][k] - ranks[2][k]):abs():max():item(), 0.0, k .. ": ranks agree bit for bit")
        end
    end
    t:assert(worst_ratio <= 1, string.format("bf16 gradients within the bound (worst error / bound = %.3f)", worst_ratio))
    t:assert(any_rounding, "the bf16 buckets did round (else this test checks nothing)")
    U.remove_tree(dir)
end

-- A rank with no data (the end of an uneven shard) joins the step without
-- a backward: its zeros count in the average, so the rank with data scales
-- its loss by world_size (the recipe's weight), and the result equals one
-- process on that data.
function tests.rank_without_data_joins_the_step(t)
    local dir = setup()
    local ok, text, out1 = run_script(dir, 1, 1, "f32", "join")
    t:assert(ok, "single process run failed:\n" .. text)
    local ref = saved(out1, 0)
    for _, n in ipairs({2, 3}) do
        local ok2, text2, out = run_script(dir, n, 1, "f32", "join")
        if t:assert(ok2, n .. " workers, all but rank 0 without data, failed:\n" .. text2) then
            for r = 0, n - 1 do
                local d = max_diff(ref, saved(out, r), "p")
                t:assert(d <= 1e-5, string.format("%d workers: rank %d differs from one process by %.3g", n, r, d))
            end
            t:assertEq(saved(out, 1).unused_grad_is_nil:item(), 1, "the unused parameter still has no gradient")
        end
    end
    U.remove_tree(dir)
end

-- Parameters listed against their gradients' order of arrival (as
-- parameters(unet, text_encoder) lists the text encoder, whose gradients
-- come last, at the end): in the first step the first bucket fills last and
-- little launches during backward; from the second step the buckets follow
-- the order rank 0 saw.  Hooks on l1's parameters (whose gradients come
-- last) read how many all-reduces were launched by then.  Two SGD steps
-- still equal one process's.
local REORDER_SCRIPT = [[
local ml = require "moonlit"
local out, n = arg[1], tonumber(arg[2])
ml.manual_seed(7)
local B = 12
local x, y = ml.randn({B, 5}), ml.randn({B, 3})
ml.train.run(function(cfg, ctx)
    local l1, l2 = ml.nn.Linear(5, 16), ml.nn.Linear(16, 3)
    local net = ml.nn.Sequential(l1, ml.nn.Tanh(), l2)
    local unused = ml.randn({4}):requires_grad_(true)
    -- reversed, this is l1.bias, l1.weight, l2.bias, l2.weight, unused: l1's come last in backward
    local params = {unused, l2.weight, l2.bias, l1.weight, l1.bias}
    local launched = 0
    local counting = setmetatable({all_reduce = function(t, o)
        launched = launched + 1
        return ml.dist.all_reduce(t, o)
    end}, {__index = ml.dist})
    local ddp = ctx.world_size > 1 and ml.train.ddp(params, {bucket_mb = 1e-4, dist = counting}) or nil
    local opt = ml.optim.SGD(params, {lr = 0.5})
    -- how many all-reduces were launched when the first of l1's gradients arrived
    local step_now = 0
    local at_l1 = {}
    local function hook() if at_l1[step_now] == nil then at_l1[step_now] = launched end return nil end
    l1.weight:register_hook(hook)
    l1.bias:register_hook(hook)
    local per = B // ctx.world_size
    local lo = ctx.rank * per + 1
    for step = 1, 2 do
        step_now = step
        launched = 0
        opt:zero_grad()
        local loss = ml.F.mse_loss(net(x:narrow(1, lo, per)), y:narrow(1, lo, per))
        loss:backward()
        if ddp then ddp:finish() end
        opt:step()
    end
    local sd = {at_l1 = ml.tensor(at_l1)}
    for i, p in ipairs(net:parameters()) do sd["p" .. i] = p end
    ml.core.st_save(out .. "/rank" .. ctx.rank .. ".safetensors", sd)
    if ddp then ddp:close() end
end, {num_workers = n, device = "cpu", summary = false})
]]

function tests.buckets_follow_the_order_gradients_arrive_in(t)
    local dir = setup()
    U.write_file(dir .. "/reorder.lua", REORDER_SCRIPT)
    local function go(n)
        local out = dir .. "/r" .. n
        os.execute("mkdir -p " .. sh_quote(out))
        local p = io.popen(string.format("%s %s %s %d 2>&1", sh_quote(BIN), sh_quote(dir .. "/reorder.lua"), sh_quote(out), n))
        local text = p:read("a")
        return p:close(), text, out
    end
    local ok1, text1, out1 = go(1)
    t:assert(ok1, "one process failed:\n" .. text1)
    local ok2, text2, out2 = go(2)
    if not t:assert(ok2, "2 workers failed:\n" .. text2) then return end
    local r0, r1 = saved(out2, 0), saved(out2, 1)
    -- when l1's first gradient arrives, step 1 has launched nothing (bucket 1
    -- is an l1 parameter), step 2 the buckets of l2's two parameters
    t:assertEq(r0.at_l1:totable(), {0, 2}, "all-reduces launched before l1's gradients, steps 1 and 2")
    local d = max_diff(saved(out1, 0), r0, "p")
    t:assert(d <= 1e-5, string.format("two steps equal one process's (max diff %.3g)", d))
    t:assertEq(max_diff(r0, r1, "p"), 0.0, "ranks agree bit for bit")
    U.remove_tree(dir)
end

function tests.ddp_bad_options(t)
    t:assert(U.has(U.error_of(ml.train.ddp, {}, {}), "non-empty list"), "empty params")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {dtype = "f16"}), "dtype must be"), "bad dtype")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {bucket_mb = 0}), "bucket_mb"), "bad bucket size")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {bucket = 1}), "bucket_mb"), "unknown option")
end

return tests
