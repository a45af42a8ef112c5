-- test_launcher.lua — ml.train.run's worker launcher on CPU workers: the
-- environment each worker gets and its rank-prefixed output; a worker
-- killed with SIGKILL (also mid-run, inside DDP's collectives), or failing
-- on a bad flag, stops the others quickly with a message naming it;
-- SIGINT to the launcher stops every worker; no worker outlives the
-- launcher (kill -0 fails for each recorded pid).  Workers started as
-- torchrun starts them: only rank 0 writes files, and a bad flag on one
-- rank stops every rank at once.
local U = require "testutil"
local tests = {}

local sh_quote = U.shell_quote
local running_interpreter = U.running_interpreter
local BIN = os.getenv("MOONLIT_BIN") or running_interpreter() or "build/moonlit"
local core = require "moonlit.core"

-- Each worker records its pid (from /proc/self/stat: the reading process)
-- in <dir>/pid-<rank>, then acts out `mode`.
local SCRIPT = [[
local ml = require "moonlit"
local dir, mode, n = arg[1], arg[2], tonumber(arg[3])
ml.train.run(function(cfg, ctx)
    local f = io.open("/proc/self/stat")
    local pid = f:read("a"):match("^(%d+)")
    f:close()
    f = io.open(dir .. "/pid-" .. ctx.rank, "w"); f:write(pid); f:close()
    print(string.format("rank=%d world=%d local=%d env=%s,%s,%s nvls=%s", ctx.rank, ctx.world_size, ctx.local_rank,
                        os.getenv("RANK"), os.getenv("WORLD_SIZE"), os.getenv("LOCAL_RANK"), os.getenv("NCCL_NVLS_ENABLE")))
    io.stderr:write("to stderr from " .. ctx.rank .. "\n")
    if mode == "ok" then ml.dist.barrier(); return end
    if mode == "badflag" and ctx.rank == 1 then error("dreambooth: --lr must be >= 0", 0) end
    if mode == "sigkill" and ctx.rank == 1 then os.execute("kill -KILL " .. pid) end
    -- everyone else waits forever (until the launcher stops them)
    while true do os.execute("sleep 0.05") end
end, {num_workers = n, device = "cpu", summary = false})
]]

local function setup()
    local dir = U.temp_dir()
    U.write_file(dir .. "/w.lua", SCRIPT)
    return dir
end

local function run(dir, mode, n)
    local t0 = core.now()
    local p = io.popen(string.format("%s %s %s %s %d 2>&1; echo \"exit=$?\"", sh_quote(BIN), sh_quote(dir .. "/w.lua"),
                                     sh_quote(dir), mode, n))
    local text = p:read("a")
    p:close()
    return text, tonumber(text:match("exit=(%d+)%s*$")), core.now() - t0
end

local function alive(pid) return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true end

local function assert_no_survivors(t, dir, n)
    for r = 0, n - 1 do
        local f = io.open(dir .. "/pid-" .. r)
        if f then
            local pid = f:read("a"); f:close()
            t:assert(not alive(pid), "worker rank " .. r .. " (pid " .. pid .. ") outlived the launcher")
        end
    end
end

function tests.workers_get_their_rank_and_prefixed_output(t)
    local dir = setup()
    local text, code = run(dir, "ok", 3)
    t:assert(code == 0, "3 workers exit 0:\n" .. text)
    t:assert(text:find("\nrank=0 world=3 local=0 env=0,3,0 nvls=0", 1, true) or text:find("^rank=0 world=3"),
             "rank 0's lines are unprefixed:\n" .. text)
    for r = 1, 2 do
        t:assert(U.has(text, string.format("[rank %d] rank=%d world=3 local=%d env=%d,3,%d nvls=0", r, r, r, r, r)),
                 "rank " .. r .. "'s stdout line, prefixed:\n" .. text)
        t:assert(U.has(text, string.format("[rank %d] to stderr from %d", r, r)), "rank " .. r .. "'s stderr, prefixed")
    end
    assert_no_survivors(t, dir, 3)
    U.remove_tree(dir)
end

function tests.sigkilled_worker_stops_the_run(t)
    local dir = setup()
    local text, code, secs = run(dir, "sigkill", 3)
    t:assert(code ~= 0, "the launcher exits non-zero")
    t:assert(U.has(text, "worker rank 1") and U.has(text, "killed by SIGKILL"), "the message names the rank and signal:\n" .. text)
    -- SIGTERM reaches the others at once; 3 s of grace bounds the worst case
    t:assert(secs < 8, string.format("the run stopped in %.1f s", secs))
    assert_no_survivors(t, dir, 3)
    U.remove_tree(dir)
end

function tests.bad_flag_on_one_rank_does_not_hang_the_others(t)
    local dir = setup()
    local text, code, secs = run(dir, "badflag", 2)
    t:assert(code ~= 0, "the launcher exits non-zero")
    t:assert(U.has(text, "[rank 1] moonlit: dreambooth: --lr must be >= 0"), "rank 1's error is shown, prefixed:\n" .. text)
    t:assert(U.has(text, "worker rank 1") and U.has(text, "exited with code 1"), "the launcher names rank 1 and its exit code")
    t:assert(secs < 8, string.format("the run stopped in %.1f s", secs))
    assert_no_survivors(t, dir, 2)
    U.remove_tree(dir)
end

function tests.sigint_to_the_launcher_stops_every_worker(t)
    local dir = setup()
    local p = io.popen(string.format("%s %s %s hang 2 >%s 2>&1 & echo $!", sh_quote(BIN), sh_quote(dir .. "/w.lua"),
                                     sh_quote(dir), sh_quote(dir .. "/log")))
    local launcher = p:read("l")
    p:close()
    -- wait for both workers to be up
    local t0 = core.now()
    while not (core.is_file(dir .. "/pid-0") and core.is_file(dir .. "/pid-1")) and core.now() - t0 < 10 do
        os.execute("sleep 0.05")
    end
    os.execute("kill -INT " .. launcher)
    while alive(launcher) and core.now() - t0 < 15 do os.execute("sleep 0.05") end
    t:assert(not alive(launcher), "the launcher ended after SIGINT")
    local text = U.read_file(dir .. "/log")
    t:assert(U.has(text, "the launcher got SIGINT"), "the message names the interrupt:\n" .. text)
    assert_no_survivors(t, dir, 2)
    U.remove_tree(dir)
end

function tests.launcher_bad_options(t)
    local T = require("moonlit").train
    t:assert(U.has(U.error_of(T.launch, {num_workers = 2, nnodes = 2}), "needs master_addr"), "nnodes > 1 without master")
    t:assert(U.has(U.error_of(T.launch, {num_workers = 2, nnodes = 2, node_rank = 2, master_addr = "h"}),
                   "node_rank 2 is not below nnodes 2"), "node_rank out of range")
    t:assert(U.has(U.error_of(T.launch, {num_workers = 0}), "num_workers must be"), "num_workers 0")
end

-- Workers in lockstep through DDP (a collective every step): rank 1
-- SIGKILLs itself at step 3 while the others are inside a collective.
-- Rank 0 sees its peer's socket close and may fail before the launcher
-- stops it; either way the launcher names the killed rank (the cause),
-- not rank 0 (the effect).
local DDP_SCRIPT = [[
local ml = require "moonlit"
local dir, n = arg[1], tonumber(arg[2])
ml.train.run(function(cfg, ctx)
    local f = io.open("/proc/self/stat")
    local pid = f:read("a"):match("^(%d+)")
    f:close()
    f = io.open(dir .. "/pid-" .. ctx.rank, "w"); f:write(pid); f:close()
    local net = ml.nn.Linear(8, 8)
    local ddp = ml.train.ddp(net:parameters())
    for step = 1, 1000 do
        if step == 3 and ctx.rank == 1 then os.execute("kill -KILL " .. pid) end
        local loss = net(ml.randn({4, 8})):square():mean()
        loss:backward()
        ddp:finish()
        for _, p in ipairs(net:parameters()) do p.grad = nil end
        os.execute("sleep 0.05")
    end
end, {num_workers = n, device = "cpu", summary = false})
]]

function tests.sigkill_mid_run_names_the_killed_rank(t)
    local dir = U.temp_dir()
    U.write_file(dir .. "/ddp.lua", DDP_SCRIPT)
    local t0 = core.now()
    local p = io.popen(string.format("%s %s %s 3 2>&1; echo \"exit=$?\"", sh_quote(BIN), sh_quote(dir .. "/ddp.lua"), sh_quote(dir)))
    local text = p:read("a")
    p:close()
    local secs = core.now() - t0
    t:assert(not text:match("exit=0%s*$"), "the launcher exits non-zero:\n" .. text)
    t:assert(U.has(text, "ml.train.run: worker rank 1") and U.has(text, "was killed by SIGKILL"),
             "the launcher names rank 1 and SIGKILL:\n" .. text)
    t:assert(secs < 10, string.format("the run stopped in %.1f s", secs))
    assert_no_survivors(t, dir, 3)
    U.remove_tree(dir)
end

-- Workers started as torchrun or Slurm start them (RANK, WORLD_SIZE,
-- MASTER_ADDR, MASTER_PORT in the environment, no launcher of ours), each
-- with its own arguments.  Returns each rank's output and exit code, and
-- the seconds until all ended.
local function run_env_ranks(rank_args)
    local port = require("moonlit").dist.free_port()
    local dir = U.temp_dir()
    local parts = {}
    for r, args in ipairs(rank_args) do
        local q = {}
        for i, a in ipairs(args) do q[i] = sh_quote(a) end
        parts[#parts + 1] = string.format("(RANK=%d WORLD_SIZE=%d LOCAL_RANK=%d MASTER_ADDR=127.0.0.1 MASTER_PORT=%d " ..
                                          "%s %s >%s/out%d 2>&1; echo $? >%s/rc%d) &", r - 1, #rank_args, r - 1, port,
                                          sh_quote(BIN), table.concat(q, " "), dir, r - 1, dir, r - 1)
    end
    local t0 = core.now()
    os.execute(table.concat(parts, " ") .. " wait")
    local secs = core.now() - t0
    local outs, rcs = {}, {}
    for r = 0, #rank_args - 1 do
        outs[r] = U.read_file(dir .. "/out" .. r)
        rcs[r] = tonumber(U.read_file(dir .. "/rc" .. r):match("%d+"))
    end
    U.remove_tree(dir)
    return outs, rcs, secs
end

local function recipe_args(dir, out, extra)
    local a = {"examples/dreambooth.lua", "--model_dir", "tests/fixtures/sd1-tiny/pipeline", "--output_dir", out,
               "--instance_images_dir", dir .. "/inst", "--instance_prompt", "a photo of sks dog",
               "--class_images_dir", dir .. "/class", "--class_prompt", "a photo of a dog", "--resolution", "64",
               "--device", "cpu", "--num_class_images", "2", "--num_inference_steps", "2", "--lr", "1e-3",
               "--max_train_steps", "2", "--num_epochs", "2"}
    for _, v in ipairs(extra or {}) do a[#a + 1] = v end
    return a
end

local function recipe_images(dir)
    local ml = require "moonlit"
    for _, sub in ipairs({"inst", "class"}) do
        ml.core.mkdir_p(dir .. "/" .. sub)
        for i = 1, 2 do ml.image.save(string.format("%s/%s/%02d.png", dir, sub, i), ml.rand({64, 64, 3})) end
    end
end

-- Each rank gets its own --output_dir: whatever a rank other than 0 wrote
-- would land in its folder, which must not even exist afterwards; rank 0's
-- has the model, metrics, a checkpoint and validation samples.
function tests.only_rank_0_writes_files(t)
    local dir = U.temp_dir()
    recipe_images(dir)
    local extra = {"--checkpointing_steps", "1", "--validation_prompt", "a photo of sks dog", "--validation_steps", "1",
                   "--num_validation_images", "1", "--sample_batch_size", "1"}
    local outs, rcs = run_env_ranks({recipe_args(dir, dir .. "/out0", extra), recipe_args(dir, dir .. "/out1", extra)})
    t:assert(rcs[0] == 0 and rcs[1] == 0, "both ranks succeed:\n" .. outs[0] .. "\n---\n" .. outs[1])
    for _, f in ipairs({"unet/diffusion_pytorch_model.safetensors", "metrics.jsonl", "checkpoint-1/trainer_state.json",
                        "samples/step-1", "samples/progress.png"}) do
        t:assert(core.is_file(dir .. "/out0/" .. f) or core.is_dir(dir .. "/out0/" .. f), "rank 0 wrote " .. f)
    end
    t:assert(not core.is_dir(dir .. "/out1") and not core.is_file(dir .. "/out1"), "rank 1 wrote nothing into its output_dir")
    U.remove_tree(dir)
end

-- Flags that differ between ranks (each node has its own command line):
-- rank 1's are bad.  Rank 1 reports its own error, rank 0 names rank 1
-- and the cause, and neither waits for the other's timeout (300 s).
function tests.bad_flag_on_one_rank_stops_every_rank(t)
    local dir = U.temp_dir()
    recipe_images(dir)
    for _, case in ipairs({{"--lr", "-1", "dreambooth: --lr must be >= 0"},
                           {"--lr_typo", "1", "unknown option --lr_typo"}}) do
        local bad = recipe_args(dir, dir .. "/out", {case[1], case[2]})
        local outs, rcs, secs = run_env_ranks({recipe_args(dir, dir .. "/out"), bad})
        t:assert(rcs[0] ~= 0 and rcs[1] ~= 0, case[1] .. ": both ranks exit non-zero")
        t:assert(U.has(outs[1], case[3]), case[1] .. ": rank 1 reports its flag:\n" .. outs[1])
        t:assert(U.has(outs[0], "rank 1 stopped before training") and U.has(outs[0], case[3]),
                 case[1] .. ": rank 0 names rank 1 and its error:\n" .. outs[0])
        t:assert(secs < 20, string.format("%s: both ended in %.1f s", case[1], secs))
    end
    U.remove_tree(dir)
end

-- The recipe with --num_workers 2 on the sd1-tiny fixture: both ranks
-- train on their shard (1 of the 2 pairs each), rank 0 alone writes the metrics (one
-- row per step) and the tuned model.
function tests.dreambooth_on_two_cpu_workers(t)
    local ml = require "moonlit"
    local dir = U.temp_dir()
    for _, sub in ipairs({"inst", "class"}) do
        ml.core.mkdir_p(dir .. "/" .. sub)
        for i = 1, 2 do ml.image.save(string.format("%s/%s/%02d.png", dir, sub, i), ml.rand({64, 64, 3})) end
    end
    local args = {"examples/dreambooth.lua", "--model_dir", "tests/fixtures/sd1-tiny/pipeline", "--output_dir", dir .. "/out",
                  "--instance_images_dir", dir .. "/inst", "--instance_prompt", "a photo of sks dog",
                  "--class_images_dir", dir .. "/class", "--class_prompt", "a photo of a dog", "--resolution", "64",
                  "--device", "cpu", "--num_class_images", "2", "--lr", "1e-3", "--checkpointing_steps", "0",
                  "--max_train_steps", "1", "--num_epochs", "1", "--num_workers", "2"}
    for i, a in ipairs(args) do args[i] = sh_quote(a) end
    local p = io.popen(sh_quote(BIN) .. " " .. table.concat(args, " ") .. " 2>&1; echo \"exit=$?\"")
    local text = p:read("a")
    p:close()
    t:assert(text:match("exit=0%s*$"), "the recipe on 2 workers succeeds:\n" .. text)
    -- 2 pairs, sharded: rank 0 logs its half
    t:assert(U.has(text, "training: 1 pairs"), "each rank trains on its shard of the 2 pairs:\n" .. text)
    local rows = 0
    for _ in U.read_file(dir .. "/out/metrics.jsonl"):gmatch("[^\n]+") do rows = rows + 1 end
    t:assert(rows == 1, "one metrics row per step, written by rank 0 only (got " .. rows .. ")")
    t:assert(core.is_file(dir .. "/out/unet/diffusion_pytorch_model.safetensors"), "the tuned UNet is written")
    U.remove_tree(dir)
end

-- Class images split over 2 workers: image k is made by rank (k - 1) % 2,
-- and every image equals the one a single process makes (its seed is its own).
function tests.class_images_split_over_two_workers(t)
    local ml = require "moonlit"
    local dir = U.temp_dir()
    ml.core.mkdir_p(dir .. "/inst")
    for i = 1, 2 do ml.image.save(string.format("%s/inst/%02d.png", dir, i), ml.rand({64, 64, 3})) end
    local function recipe_args(class_dir, out, workers)
        local a = {"examples/dreambooth.lua", "--model_dir", "tests/fixtures/sd1-tiny/pipeline", "--output_dir", out,
                   "--instance_images_dir", dir .. "/inst", "--instance_prompt", "a photo of sks dog",
                   "--class_images_dir", class_dir, "--class_prompt", "a photo of a dog", "--resolution", "64",
                   "--device", "cpu", "--num_class_images", "3", "--num_inference_steps", "2", "--sample_batch_size", "1",
                   "--checkpointing_steps", "0", "--max_train_steps", "1", "--num_epochs", "1",
                   "--num_workers", tostring(workers)}
        for i, v in ipairs(a) do a[i] = sh_quote(v) end
        return table.concat(a, " ")
    end
    local p = io.popen(sh_quote(BIN) .. " " .. recipe_args(dir .. "/class2", dir .. "/out2", 2) .. " 2>&1; echo \"exit=$?\"")
    local text = p:read("a")
    p:close()
    t:assert(text:match("exit=0%s*$"), "the recipe on 2 workers succeeds:\n" .. text)
    t:assert(U.has(text, "class images (3 made)"), "3 class images made in all:\n" .. text)
    t:assert(U.has(text, "class images: 2/2") and not U.has(text, "class images: 3/3"),
             "rank 0 made its share only (images 1 and 3):\n" .. text)
    p = io.popen(sh_quote(BIN) .. " " .. recipe_args(dir .. "/class1", dir .. "/out1", 1) .. " 2>&1; echo \"exit=$?\"")
    text = p:read("a")
    p:close()
    t:assert(text:match("exit=0%s*$"), "the recipe on 1 worker succeeds:\n" .. text)
    for k = 1, 3 do
        local name = string.format("/class-%05d-seed%d.png", k, k - 1)
        local a, b = dir .. "/class2" .. name, dir .. "/class1" .. name
        if t:assert(core.is_file(a) and core.is_file(b), "class image " .. k .. " made in both runs") then
            t:assert(U.read_file(a) == U.read_file(b), "class image " .. k .. " is the same whichever worker made it")
        end
    end
    U.remove_tree(dir)
end

return tests
