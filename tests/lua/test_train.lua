-- test_train.lua — ml.train: learning-rate schedules against diffusers,
-- ctx:report and metrics.jsonl, checkpoints (bit-exact resume, atomic
-- saves, recovery of interrupted swaps, pruning) and run's errors.
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

local T = ml.train

function tests.lr_schedules_match_diffusers(t)
    local ref = ml.core.json_load("tests/fixtures/lr_schedules/diffusers.json")
    for name, lrs in pairs(ref.schedules) do
        local s = T.lr_schedule.new{name = name, base_lr = ref.base_lr, warmup_steps = ref.warmup_steps,
                                    total_steps = ref.total_steps}
        local worst = 0
        for k, want in ipairs(lrs) do worst = math.max(worst, math.abs(s:lr(k - 1) - want)) end
        -- diffusers computes in double precision too: equal to rounding
        t:assert(worst <= 1e-18, string.format("%s: worst difference %.3g", name, worst))
    end
    t:assert(U.has(U.error_of(T.lr_schedule.new, {name = "cosine_with_restarts", base_lr = 1}), "constant, constant_with_warmup"),
             "unknown schedule names what exists")
end

-- A small model and its data: the loop the resume test runs twice.
local function make_model()
    ml.manual_seed(3)
    return ml.nn.Sequential(ml.nn.Linear(4, 8), ml.nn.SiLU(), ml.nn.Linear(8, 2))
end

local function one_step(model, opt, x, y)
    opt:zero_grad()
    local h = model(x + ml.randn(x:size()) * 0.1)      -- draws from the global stream, as noise does
    local loss = ml.F.mse_loss(h, y)
    loss:backward()
    ml.optim.clip_grad_norm(model:parameters(), 1.0)
    opt:step()
    return loss:item()
end

-- Largest difference between two models' weights (0: bit-identical values).
local function weights_diff(a, b)
    local pa, pb, worst = a:parameters(), b:parameters(), 0
    for i = 1, #pa do worst = math.max(worst, (pa[i] - pb[i]):abs():max():item()) end
    return worst
end

function tests.resume_is_bit_exact(t)
    local dir = U.temp_dir()
    local x, y = ml.randn({16, 4}), ml.randn({16, 2})
    -- uninterrupted: 6 steps
    local m1 = make_model()
    local o1 = ml.optim.AdamW(m1:parameters(), {lr = 1e-2})
    ml.manual_seed(11)
    for _ = 1, 6 do one_step(m1, o1, x, y) end
    -- interrupted at 3, saved, and resumed in a fresh model and optimizer
    local m2 = make_model()
    local o2 = ml.optim.AdamW(m2:parameters(), {lr = 1e-2})
    ml.manual_seed(11)
    for _ = 1, 3 do one_step(m2, o2, x, y) end
    local ck = T.save_checkpoint(dir .. "/checkpoint-3", {modules = {net = m2}, optimizer = o2, step = 3, epoch = 1, batch = 4,
                                                          extra = {note = "x"}})
    ml.manual_seed(999)                         -- whatever happened since: the checkpoint restores the stream
    local m3 = make_model()
    ml.no_grad(function() for _, p in ipairs(m3:parameters()) do p:normal_() end end)
    local o3 = ml.optim.AdamW(m3:parameters(), {lr = 1e-2})
    local st = T.load_checkpoint(ck, {modules = {net = m3}, optimizer = o3})
    t:assertEq(st.step, 3, "step")
    t:assertEq(st.batch, 4, "data position")
    t:assertEq(st.extra.note, "x", "extra")
    for _ = 1, 3 do one_step(m3, o3, x, y) end
    local d = weights_diff(m1, m3)
    t:assert(d == 0, "weights after resume differ from the uninterrupted run by " .. d)
    local d2 = weights_diff(m1, m2)
    t:assert(d2 > 0, "the check can fail: 3 steps vs 6 steps differ")
    U.remove_tree(dir)
end

function tests.checkpoint_saves_are_atomic_and_recoverable(t)
    local dir = U.temp_dir()
    local m = make_model()
    local o = ml.optim.AdamW(m:parameters(), {lr = 1e-2})
    one_step(m, o, ml.randn({4, 4}), ml.randn({4, 2}))
    local p = dir .. "/checkpoint-1"
    -- a save killed earlier left a partial folder: the next save removes it
    ml.core.mkdir_p(p .. ".partial")
    U.write_file(p .. ".partial/garbage", "x")
    T.save_checkpoint(p, {modules = {net = m}, optimizer = o, step = 1})
    t:assert(not ml.core.is_dir(p .. ".partial"), "stale partial folder removed")
    t:assert(T.is_checkpoint(p), "checkpoint complete")
    -- saving over an existing checkpoint leaves one complete folder and no .old
    T.save_checkpoint(p, {modules = {net = m}, optimizer = o, step = 1})
    t:assert(T.is_checkpoint(p) and not ml.core.is_dir(p .. ".old"), "re-save swaps cleanly")
    -- killed between the two renames: only checkpoint-1.old is complete
    os.rename(p, p .. ".old")
    t:assertEq(T.latest_checkpoint(dir), p, "latest_checkpoint puts the old folder back")
    -- a folder without its state file is not a checkpoint
    ml.core.mkdir_p(dir .. "/checkpoint-9")
    t:assertEq(T.latest_checkpoint(dir), p, "incomplete checkpoint-9 ignored")
    t:assert(U.has(U.error_of(T.load_checkpoint, dir .. "/checkpoint-9", {}), "not a complete checkpoint"),
             "loading an incomplete checkpoint says so")
    -- a checkpoint of another model is refused by name
    local other = ml.nn.Sequential(ml.nn.Linear(4, 3))
    local err = U.error_of(T.load_checkpoint, p, {modules = {net = other}})
    t:assert(U.has(err, "size mismatch") or U.has(err, "missing"), "mismatched model named: " .. tostring(err))
    local o2 = ml.optim.AdamW(other:parameters(), {lr = 1})
    err = U.error_of(T.load_checkpoint, p, {optimizer = o2})
    t:assert(U.has(err, "optimizer state for 4 parameters"), "optimizer count mismatch: " .. tostring(err))
    U.remove_tree(dir)
end

function tests.prune_keeps_the_newest(t)
    local dir = U.temp_dir()
    local m = make_model()
    for _, s in ipairs {10, 2, 30, 4} do T.save_checkpoint(dir .. "/checkpoint-" .. s, {modules = {net = m}, step = s}) end
    T.prune_checkpoints(dir, 2)
    local left = {}
    for _, c in ipairs(T.list_checkpoints(dir)) do left[#left + 1] = c.step end
    t:assertEq(table.concat(left, ","), "10,30", "the two newest by step remain")
    U.remove_tree(dir)
end

function tests.report_writes_one_json_line_each(t)
    local dir = U.temp_dir()
    local saved_print = print
    local lines = {}
    print = function(...) lines[#lines + 1] = table.concat({...}, "\t") end
    local ok, res = pcall(T.run, function(cfg, ctx)
        t:assertEq(ctx.rank, 0, "rank")
        t:assertEq(ctx.world_size, 1, "world size")
        ctx:set_total_steps(3)
        for s = 1, 3 do ctx:report({step = s, loss = s == 2 and 0 / 0 or 1 / s, lr = 1e-4, images = 4}) end
        return "result"
    end, {output_dir = dir, device = "cpu", log_every = 1})
    print = saved_print
    if not t:assert(ok, tostring(res)) then return end
    t:assertEq(res, "result", "run returns train_fn's result")
    local f = io.open(dir .. "/metrics.jsonl")
    local n, rows = 0, {}
    for l in f:lines() do n = n + 1; rows[n] = ml.core.json_decode(l) end
    f:close()
    t:assertEq(n, 3, "one line per report")
    t:assertEq(rows[3].step, 3, "step recorded")
    t:assertEq(rows[2].loss, nil, "a NaN loss is written as null")
    t:assert(math.abs(rows[1].loss - 1) < 1e-12 and rows[1].images == 4, "values recorded")
    local all = table.concat(lines, "\n")
    t:assert(U.has(all, "step 3/3"), "progress shows step/total:\n" .. all)
    t:assert(U.has(all, "done: 3 steps"), "summary printed:\n" .. all)
    U.remove_tree(dir)
end

function tests.run_errors_are_clear(t)
    t:assert(U.has(U.error_of(T.run, function() end, {num_workers = 2, nnodes = 2}), "needs master_addr"),
             "a launch that cannot work is refused before any worker starts")
    t:assert(U.has(U.error_of(T.run, function() end, {num_workers = 0}), "num_workers must be"), "bad num_workers")
    local err = U.error_of(T.run, function(cfg, ctx) ctx:dataset_shard("valid") end, {datasets = {train = {}}, summary = false})
    t:assert(U.has(err, "no dataset named 'valid'") and U.has(err, "train"), "unknown dataset named: " .. tostring(err))
    local dir = U.temp_dir()
    U.write_file(dir .. "/file", "x")
    err = U.error_of(T.run, function() end, {output_dir = dir .. "/file/out"})
    t:assert(U.has(err, "output_dir"), "unusable output_dir named: " .. tostring(err))
    err = U.error_of(T.run, function() error("boom in train_fn") end, {summary = false})
    t:assert(U.has(err, "boom in train_fn"), "train_fn's error comes through: " .. tostring(err))
    U.remove_tree(dir)
end

return tests
