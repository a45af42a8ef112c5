-- test_ddp.lua — DistributedDataParallel over CPU workers: after one SGD
-- step every rank holds the same weights, and they equal (f32 tolerance)
-- one process stepping on the concatenated batch; with small buckets (many
-- all-reduces launched during backward), an unused parameter (no rank has
-- a gradient: it stays nil), and gradient accumulation (set_sync(false) on
-- the first micro-step).
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

local sh_quote = U.shell_quote
local running_interpreter = U.running_interpreter
local BIN = os.getenv("MOONLIT_BIN") or running_interpreter() or "build/moonlit"

-- The script each worker runs: data and its split are fixed before
-- ml.train.run; the model is made inside train_fn, after each rank's RNG
-- stream has moved, so the ranks start from different weights and only
-- the broadcast makes them equal.
local SCRIPT = [[
local ml = require "moonlit"
local out, n, accum = arg[1], tonumber(arg[2]), tonumber(arg[3])
ml.manual_seed(7)
local B = 12
local x, y = ml.randn({B, 5}), ml.randn({B, 3})
ml.train.run(function(cfg, ctx)
    local net = ml.nn.Sequential(ml.nn.Linear(5, 16), ml.nn.Tanh(), ml.nn.Linear(16, 3))
    local unused = ml.randn({4}):requires_grad_(true)
    local params = net:parameters()
    params[#params + 1] = unused
    local ddp = ctx.world_size > 1 and ml.train.ddp(params, {bucket_mb = 1e-4}) or nil
    local opt = ml.optim.SGD(params, {lr = 0.5})
    local per = B // ctx.world_size
    local mine_x, mine_y = x:narrow(1, ctx.rank * per + 1, per), y:narrow(1, ctx.rank * per + 1, per)
    local micro = per // accum
    for k = 1, accum do
        if ddp then ddp:set_sync(k == accum) end
        local xs, ys = mine_x:narrow(1, (k - 1) * micro + 1, micro), mine_y:narrow(1, (k - 1) * micro + 1, micro)
        local loss = ml.F.mse_loss(net(xs), ys) / accum
        loss:backward()
    end
    if ddp then ddp:finish() end
    local sd = {unused_grad_is_nil = ml.tensor({unused.grad == nil and 1 or 0})}
    for i, p in ipairs(net:parameters()) do sd["p" .. i] = p end
    opt:step()
    ml.core.st_save(out .. "/rank" .. ctx.rank .. ".safetensors", sd)
    if ddp then ddp:close() end
end, {num_workers = n, device = "cpu", summary = false})
]]

local function run_script(dir, n, accum)
    local out = dir .. "/n" .. n .. "a" .. accum
    os.execute("mkdir -p " .. sh_quote(out))
    local cmd = string.format("%s %s %s %d %d 2>&1", sh_quote(BIN), sh_quote(dir .. "/ddp_mlp.lua"), sh_quote(out), n, accum)
    local p = io.popen(cmd)
    local text = p:read("a")
    local ok = p:close()
    return ok, text, out
end

local function weights(out, rank) return ml.core.st_load(out .. "/rank" .. rank .. ".safetensors") end

local function max_diff(a, b)
    local worst = 0
    for k, v in pairs(a) do worst = math.max(worst, (v - b[k]):abs():max():item()) end
    return worst
end

function tests.ddp_step_equals_one_process_on_the_whole_batch(t)
    local dir = U.temp_dir()
    U.write_file(dir .. "/ddp_mlp.lua", SCRIPT)
    local ok, text, out1 = run_script(dir, 1, 1)
    t:assert(ok, "single process run failed:\n" .. text)
    local ref = weights(out1, 0)
    for _, case in ipairs({{2, 1}, {3, 1}, {2, 2}}) do
        local n, accum = case[1], case[2]
        local ok2, text2, out = run_script(dir, n, accum)
        t:assert(ok2, string.format("%d workers (accum %d) failed:\n%s", n, accum, text2))
        if ok2 then
            local w0 = weights(out, 0)
            t:assert(w0.unused_grad_is_nil:item() == 1, "a parameter no rank used keeps grad = nil")
            -- f32: the averaged gradient sums in a different order than one
            -- process's matmul over 12 rows
            local d = max_diff(ref, w0)
            t:assert(d <= 1e-5, string.format("%d workers, accum %d: rank 0 differs from one process by %.3g", n, accum, d))
            for r = 1, n - 1 do
                local dr = max_diff(w0, weights(out, r))
                t:assert(dr == 0, string.format("%d workers: rank %d differs from rank 0 by %.3g", n, r, dr))
            end
        end
    end
    U.remove_tree(dir)
end

function tests.ddp_bad_options(t)
    t:assert(U.has(U.error_of(ml.train.ddp, {}, {}), "non-empty list"), "empty params")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {dtype = "f16"}), "dtype must be"), "bad dtype")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {bucket_mb = 0}), "bucket_mb"), "bad bucket size")
    t:assert(U.has(U.error_of(ml.train.ddp, {ml.zeros({2})}, {bucket = 1}), "bucket_mb"), "unknown option")
end

return tests
