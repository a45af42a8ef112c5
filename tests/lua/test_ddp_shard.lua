-- test_ddp_shard.lua — data-parallel sharding on CPU workers: through
-- ctx:dataset_shard and ctx:shard_plan, every row is seen exactly once per
-- epoch on 2 and 3 workers when the row count does not divide by them;
-- every rank takes the same number of batches (a rank whose shard ran out
-- joins with no data); the loss weights make the average over ranks the
-- mean over the global batch.  The same for the DreamBooth recipe's own
-- dataset (instance images repeated and zipped with the class images,
-- shuffled), and the recipe itself on 3 workers with uneven shards runs to
-- the end with rank 0 alone writing.
local ml = require "moonlit"
local U = require "testutil"
local core = ml.core
local tests = {}

local sh_quote = U.shell_quote
local BIN = os.getenv("MOONLIT_BIN") or U.running_interpreter() or "build/moonlit"

-- Each rank writes one line per batch it takes:
--   "<epoch> <batch> <rows got> <rows planned> <sum of the ranks' weights> <ids...>"
-- args: out_dir workers rows batch_size epochs source ("items" | "recipe")
local SCRIPT = [[
local ml = require "moonlit"
local out, n, size, bs, epochs, source = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]),
                                         tonumber(arg[5]), arg[6]
local ds, id_of
if source == "items" then
    local items = {}
    for i = 1, size do items[i] = {id = i} end
    ds = ml.data.from_items(items):random_shuffle(11)
    id_of = function(row) return tostring(row.id) end
else
    -- the recipe's dataset: image folders given in the environment
    local DB = assert(loadfile("examples/dreambooth.lua"))({as_module = true})
    local a = {instance_images_dir = os.getenv("INST"), class_images_dir = os.getenv("CLASS"),
               instance_prompt = "a photo of sks dog", class_prompt = "a photo of a dog", resolution = 64,
               center_crop = false, random_flip = false, seed = 3}
    ds = DB.build_dataset(a, ml.core.tokenizer_load("tests/fixtures/sd1-tiny/pipeline/tokenizer"))
    id_of = function(row)
        return row.instance_image.path:match("[^/]+$") .. "+" .. row.class_image.path:match("[^/]+$")
    end
end
ml.train.run(function(cfg, ctx)
    local plan = ctx:shard_plan("train", bs)
    local shard = ctx:dataset_shard("train")
    local f = assert(io.open(out .. "/rank" .. ctx.rank, "w"))
    for e = 1, epochs do
        local rows = shard:rows(e)
        local it = shard:iter_batches{batch_size = bs, epoch = e}
        local first = 1
        for k = 1, plan.batches do
            local batch = plan.rows[k] > 0 and it() or nil
            local got, ids = 0, {}
            if batch and source == "items" then
                -- the ids the loader delivered
                got = #batch.id
                for _, id in ipairs(batch.id) do ids[#ids + 1] = tostring(id) end
            elseif batch then
                -- decoded images carry no name: the rows this batch was made of
                got = batch.instance_prompt_ids:size(1)
                for i = first, first + got - 1 do ids[#ids + 1] = id_of(rows[i]) end
            end
            first = first + got
            -- a collective per batch: a rank taking fewer batches would break the run
            local wsum = ctx.dist and ctx.dist.all_reduce_number(plan.weight[k], "sum") or plan.weight[k]
            f:write(string.format("%d %d %d %d %.15g %s\n", e, k, got, plan.rows[k], wsum, table.concat(ids, ",")))
        end
        if it() ~= nil then error("rank " .. ctx.rank .. ": its shard has more batches than the plan") end
        it:close()
    end
    f:close()
end, {num_workers = n, device = "cpu", datasets = {train = ds}, summary = false})
]]

-- Runs the script on n workers; returns success, output, each rank's lines.
local function run(dir, n, size, bs, epochs, source, env)
    local out = string.format("%s/%s-n%d-s%d-b%d", dir, source, n, size, bs)
    core.mkdir_p(out)
    local cmd = string.format("%s%s %s %s %d %d %d %d %s 2>&1", env or "", sh_quote(BIN), sh_quote(dir .. "/shard.lua"),
                              sh_quote(out), n, size, bs, epochs, source)
    local p = io.popen(cmd)
    local text = p:read("a")
    local ok = p:close()
    local lines = {}
    for r = 0, n - 1 do
        lines[r] = {}
        local f = io.open(out .. "/rank" .. r)
        if f then
            for l in f:lines() do lines[r][#lines[r] + 1] = l end
            f:close()
        end
    end
    return ok, text, lines
end

local function parse(line)
    local e, k, got, planned, wsum, ids = line:match("^(%d+) (%d+) (%d+) (%d+) (%S+) ?(.*)$")
    local list = {}
    for id in (ids or ""):gmatch("[^,]+") do list[#list + 1] = id end
    return tonumber(e), tonumber(k), tonumber(got), tonumber(planned), tonumber(wsum), list
end

-- Checks the runs of n workers against one process: per epoch, the ids of
-- all ranks together are the single process's ids (as a multiset: the
-- recipe repeats instance images), each exactly once.
local function check(t, dir, n, size, bs, epochs, source, env)
    local ok1, text1, ref = run(dir, 1, size, bs, epochs, source, env)
    if not t:assert(ok1, "one process failed:\n" .. text1) then return end
    local ok, text, lines = run(dir, n, size, bs, epochs, source, env)
    local tag = string.format("%s, %d rows, %d workers, batch %d", source, size, n, bs)
    if not t:assert(ok, tag .. ": the run failed:\n" .. text) then return end
    local want = {}
    for _, l in ipairs(ref[0]) do
        local e, _, _, _, _, ids = parse(l)
        want[e] = want[e] or {}
        for _, id in ipairs(ids) do want[e][id] = (want[e][id] or 0) + 1 end
    end
    local batches
    for r = 0, n - 1 do
        t:assert(#lines[r] % epochs == 0, tag .. ": rank " .. r .. " wrote whole epochs")
        batches = batches or #lines[r]
        t:assertEq(#lines[r], batches, tag .. ": rank " .. r .. " takes as many batches as rank 0")
    end
    local seen = {}
    for r = 0, n - 1 do
        for _, l in ipairs(lines[r]) do
            local e, k, got, planned, wsum, ids = parse(l)
            t:assertEq(got, planned, string.format("%s: rank %d epoch %d batch %d: rows delivered = rows planned", tag, r, e, k))
            t:assertEq(#ids, planned, tag .. ": ids listed per planned row")
            t:assert(math.abs(wsum - n) < 1e-9, string.format("%s: batch %d: the weights add up to the world size (%g)", tag, k, wsum))
            seen[e] = seen[e] or {}
            for _, id in ipairs(ids) do seen[e][id] = (seen[e][id] or 0) + 1 end
        end
    end
    for e = 1, epochs do
        local extra = {}
        for id, c in pairs(seen[e] or {}) do if c ~= (want[e] or {})[id] then extra[#extra + 1] = id .. "x" .. c end end
        for id, c in pairs(want[e] or {}) do if (seen[e] or {})[id] ~= c then extra[#extra + 1] = id .. " wanted x" .. c end end
        table.sort(extra)
        t:assert(#extra == 0, string.format("%s: epoch %d covers every row exactly once (differences: %s)", tag, e,
                                            table.concat(extra, " ")))
    end
end

function tests.every_row_once_per_epoch_on_uneven_shards(t)
    local dir = U.temp_dir()
    U.write_file(dir .. "/shard.lua", SCRIPT)
    for _, c in ipairs({{2, 7, 1}, {2, 7, 2}, {3, 10, 2}, {3, 11, 3}, {3, 2, 1}}) do
        check(t, dir, c[1], c[2], c[3], 2, "items")
    end
    U.remove_tree(dir)
end

local function images(dir, n)
    core.mkdir_p(dir)
    for i = 1, n do ml.image.save(string.format("%s/%02d.png", dir, i), ml.rand({64, 64, 3})) end
end

function tests.recipe_dataset_rows_once_per_epoch(t)
    local dir = U.temp_dir()
    U.write_file(dir .. "/shard.lua", SCRIPT)
    -- 3 instance and 5 class images: 5 pairs, instance images repeated
    images(dir .. "/inst", 3)
    images(dir .. "/class", 5)
    local env = string.format("INST=%s CLASS=%s ", sh_quote(dir .. "/inst"), sh_quote(dir .. "/class"))
    check(t, dir, 2, 5, 1, 2, "recipe", env)
    check(t, dir, 3, 5, 2, 2, "recipe", env)
    U.remove_tree(dir)
end

-- The recipe on 3 workers with 4 pairs in batches of 1: shards of 2, 1 and
-- 1 pairs, so ranks 1 and 2 join every epoch's second step with no data.
-- Before equal plans, rank 0's second step waited for ranks that had
-- finished.  Rank 0 alone writes metrics (one row per step) and the model.
function tests.recipe_on_three_workers_with_uneven_shards(t)
    local dir = U.temp_dir()
    images(dir .. "/inst", 2)
    images(dir .. "/class", 4)
    local args = {"examples/dreambooth.lua", "--model_dir", "tests/fixtures/sd1-tiny/pipeline", "--output_dir", dir .. "/out",
                  "--instance_images_dir", dir .. "/inst", "--instance_prompt", "a photo of sks dog",
                  "--class_images_dir", dir .. "/class", "--class_prompt", "a photo of a dog", "--resolution", "64",
                  "--device", "cpu", "--num_class_images", "4", "--lr", "1e-3", "--checkpointing_steps", "0",
                  "--max_train_steps", "10", "--num_epochs", "2", "--num_workers", "3"}
    for i, a in ipairs(args) do args[i] = sh_quote(a) end
    local p = io.popen(sh_quote(BIN) .. " " .. table.concat(args, " ") .. " 2>&1; echo \"exit=$?\"")
    local text = p:read("a")
    p:close()
    t:assert(text:match("exit=0%s*$"), "the recipe on 3 workers with uneven shards succeeds:\n" .. text)
    t:assert(U.has(text, "training: 2 pairs, 2 batches of 1+1 an epoch, 4 steps"), "rank 0's plan: 2 batches an epoch:\n" .. text)
    t:assert(U.has(text, "training: 4 steps, 16 images"), "4 pairs x 2 epochs x 2 images, counted over all ranks:\n" .. text)
    local rows = 0
    for _ in U.read_file(dir .. "/out/metrics.jsonl"):gmatch("[^\n]+") do rows = rows + 1 end
    t:assertEq(rows, 4, "one metrics row per step, from rank 0 only")
    U.remove_tree(dir)
end

-- In this process (world size 1): the plan is the dataset's batches, and
-- bad arguments are named.
function tests.shard_plan_arguments(t)
    local o = {datasets = {train = ml.data.from_items({1, 2, 3})}, device = "cpu", summary = false}
    local plan = ml.train.run(function(cfg, c) return c:shard_plan("train", 2) end, o)
    t:assertEq(plan.batches, 2)
    t:assertEq(plan.own_batches, 2)
    t:assertEq(plan.rows, {2, 1})
    t:assertEq(plan.global_rows, {2, 1})
    t:assertEq(plan.weight, {1, 1})
    local err = U.error_of(ml.train.run, function(cfg, c) return c:shard_plan("train", 0) end, o)
    t:assert(U.has(err, "batch_size must be an integer >= 1"), tostring(err))
    err = U.error_of(ml.train.run, function(cfg, c) return c:shard_plan("val", 1) end, o)
    t:assert(U.has(err, "no dataset named 'val'"), tostring(err))
end

return tests
