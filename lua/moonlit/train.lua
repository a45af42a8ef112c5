-- moonlit.train (ml.train) — the plumbing of a training loop, shaped like
-- Ray Train's: the script writes a train_fn(config, ctx) and hands it over.
--
--   ml.train.run(train_fn, {config = cfg, datasets = {train = ds}, num_workers = 1,
--                           output_dir = dir, device = "cpu"|"cuda", log_every = 10})
--     calls train_fn(cfg, ctx) and returns what it returns.  ctx has
--       ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.config, ctx.output_dir
--       ctx:dataset_shard("train")      this worker's part of a dataset
--       ctx:shard_plan("train", bs)     its batches per epoch, equal on every rank (uneven shards)
--       ctx:set_total_steps(n)          for the progress bar's ETA
--       ctx:report(metrics, {checkpoint = dir})   one step's numbers (step, loss, lr, images, ...)
--       ctx:log(text)                   a line that does not break the progress bar
--       ctx:add_output(what, path)      listed in the summary
--       ctx:is_main()                   rank 0: the only worker that writes files
--   Reports go to a one-line progress bar on a terminal (plain lines
--   otherwise, every log_every steps), and each is appended as one JSON
--   object to output_dir/metrics.jsonl.  A summary ends the run.
--
--   Checkpoints (a folder each, written beside the old one and renamed into
--   place, so a crash mid-save leaves the previous one valid):
--   ml.train.save_checkpoint(dir, {modules = {unet = m, ...}, optimizer = opt, step = n,
--                                  epoch = e, batch = b, extra = {...}})
--   ml.train.load_checkpoint(dir, {modules = ..., optimizer = opt}) -> state (step, epoch, batch, extra)
--   ml.train.latest_checkpoint(output_dir) -> path or nil
--   ml.train.prune_checkpoints(output_dir, keep)  -- deletes all but the `keep` newest
--
-- num_workers > 1 makes this process the launcher (train.launch below): it
-- starts the workers, which run the same command line, relays their output
-- and exits when they are done.  In a worker, ctx carries the rank, and only
-- ctx:is_main() writes.  DistributedDataParallel: moonlit.ddp (train.ddp).
local core = require "moonlit.core"
local options = require "moonlit.options"

local train = {}

train.lr_schedule = require "moonlit.lr_schedule"

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

-- ---- small file-system helpers -------------------------------------------------

local function exists(path) return core.is_dir(path) or core.is_file(path) end

-- rm -r in Lua (os.remove deletes files and empty folders).
local function remove_tree(path)
    if core.is_dir(path) then
        for _, name in ipairs(core.list_dir(path)) do
            if name ~= "." and name ~= ".." then remove_tree(join(path, name)) end
        end
    end
    if exists(path) then
        local ok, err = os.remove(path)
        if not ok then error("cannot remove " .. path .. ": " .. tostring(err), 0) end
    end
end
train.remove_tree = remove_tree

local function rename(a, b)
    local ok, err = os.rename(a, b)
    if not ok then error(string.format("cannot rename %s to %s: %s", a, b, tostring(err)), 0) end
end

-- ---- peak memory ----------------------------------------------------------------

local function cuda_index(device)
    local n = tostring(device):match("^cuda:?(%d*)$")
    if not n then return nil end
    return tonumber(n) or 0
end

-- Bytes: the caching allocator's peak on a GPU, the process's peak RSS on CPU.
local function peak_memory(device)
    local i = cuda_index(device)
    if i and core.cuda_available and core.cuda_available() then
        return core.cuda_memory_stats(i).peak, "GPU"
    end
    local f = io.open("/proc/self/status", "r")
    if f then
        local s = f:read("a")
        f:close()
        local kb = s:match("VmHWM:%s*(%d+)")
        if kb then return tonumber(kb) * 1024, "RSS" end
    end
    return nil
end
train.peak_memory = peak_memory

local function fmt_bytes(n)
    if not n then return "?" end
    if n >= 2 ^ 30 then return string.format("%.2f GiB", n / 2 ^ 30) end
    return string.format("%.0f MiB", n / 2 ^ 20)
end

local function fmt_duration(s)
    if s ~= s or s == math.huge then return "?" end
    s = math.floor(s + 0.5)
    if s >= 3600 then return string.format("%d:%02d:%02d", s // 3600, s // 60 % 60, s % 60) end
    return string.format("%d:%02d", s // 60, s % 60)
end
train.fmt_duration = fmt_duration

-- ---- JSON lines -------------------------------------------------------------------

-- JSON has no NaN or infinity: they are written as null (and the progress
-- line shows "nan"), so one bad step cannot make the log unreadable.
local function json_safe(v)
    if type(v) == "number" and (v ~= v or v == math.huge or v == -math.huge) then return core.json_null end
    if type(v) == "table" and not core.is_tensor(v) then
        local out = {}
        for k, x in pairs(v) do out[k] = json_safe(x) end
        return setmetatable(out, getmetatable(v))
    end
    if core.is_tensor(v) then return v:numel() == 1 and json_safe(v:item()) or tostring(v) end
    return v
end

-- ---- the progress display -----------------------------------------------------------

local Progress = {}
Progress.__index = Progress

local function stdout_is_terminal()
    local mode = os.getenv("MOONLIT_PROGRESS")
    if mode == "bar" then return true end
    if mode == "plain" then return false end
    return os.execute("test -t 1") == true
end

function Progress.new(o)
    return setmetatable({tty = stdout_is_terminal(), log_every = o.log_every or 10, shown = false,
                         device = o.device, prefix = o.prefix or ""}, Progress)
end

function Progress:line(r)
    local parts = {}
    if r.total then
        parts[#parts + 1] = string.format("step %d/%d", r.step, r.total)
    else
        parts[#parts + 1] = string.format("step %d", r.step)
    end
    if self.tty and r.total and r.total > 0 then
        local w = 20
        local k = math.min(w, math.floor(w * r.step / r.total))
        parts[#parts + 1] = "[" .. string.rep("#", k) .. string.rep("-", w - k) .. "]"
    end
    if r.loss then parts[#parts + 1] = string.format("loss %.4f", r.loss) end
    if r.lr then parts[#parts + 1] = string.format("lr %.2e", r.lr) end
    if r.rate then parts[#parts + 1] = string.format("%.2f img/s", r.rate) end
    if r.eta then parts[#parts + 1] = "ETA " .. fmt_duration(r.eta) end
    if r.mem then parts[#parts + 1] = "mem " .. fmt_bytes(r.mem) end
    return self.prefix .. table.concat(parts, "  ")
end

function Progress:show(r, last)
    if self.tty then
        io.stdout:write("\r\27[K" .. self:line(r))
        if last then io.stdout:write("\n") end
        io.stdout:flush()
        self.shown = not last
    elseif last or r.step == 1 or r.step % self.log_every == 0 then
        print(self:line(r))
        io.stdout:flush()
    end
end

function Progress:log(text)
    if self.shown then io.stdout:write("\r\27[K") end
    print(self.prefix .. text)
    self.shown = false
    io.stdout:flush()
end

function Progress:finish()
    if self.shown then io.stdout:write("\n"); io.stdout:flush() end
    self.shown = false
end

-- ---- the worker context ---------------------------------------------------------------

local Context = {}
Context.__index = Context

function Context:is_main() return self.rank == 0 end

function Context:dataset_shard(name)
    local ds = self.datasets[name or "train"]
    if not ds then
        local have = {}
        for k in pairs(self.datasets) do have[#have + 1] = k end
        table.sort(have)
        error(string.format("dataset_shard: no dataset named '%s' (datasets: %s)", tostring(name),
                            #have > 0 and table.concat(have, ", ") or "none"), 2)
    end
    if self.world_size == 1 then return ds end
    return ds:shard(self.rank, self.world_size)
end

-- shard_plan(name, batch_size): one epoch's batches as every rank sees
-- them.  When the dataset does not divide by the world size, the shards
-- differ by a row, and a rank whose shard has run out must still take the
-- step (every rank calls the same collectives): it joins with no data, its
-- zero gradient counted in DDP's average.  So each rank scales its mean
-- loss of batch k by weight[k] = rows[k] * world_size / global_rows[k],
-- and the average over ranks of the scaled losses (which DDP's gradient
-- average follows) is the mean over the batch's rows on all ranks.
--   plan.batches          batches per epoch on every rank (the largest shard's count)
--   plan.own_batches      batches of this rank's shard (what its iterator yields)
--   plan.rows[k], plan.global_rows[k], plan.weight[k]   (weight 1 when shards are even)
function Context:shard_plan(name, batch_size)
    if math.type(batch_size) ~= "integer" or batch_size < 1 then
        error("shard_plan: batch_size must be an integer >= 1 (got " .. tostring(batch_size) .. ")", 2)
    end
    self:dataset_shard(name)   -- names a missing dataset
    local ds, w = self.datasets[name or "train"], self.world_size
    local counts = {}
    for r = 0, w - 1 do counts[r] = w == 1 and ds:count() or ds:shard(r, w):count() end
    local batches = 0
    for r = 0, w - 1 do batches = math.max(batches, (counts[r] + batch_size - 1) // batch_size) end
    local plan = {batches = batches, own_batches = (counts[self.rank] + batch_size - 1) // batch_size,
                  rows = {}, global_rows = {}, weight = {}}
    for k = 1, batches do
        local all = 0
        for r = 0, w - 1 do all = all + math.max(0, math.min(batch_size, counts[r] - (k - 1) * batch_size)) end
        local mine = math.max(0, math.min(batch_size, counts[self.rank] - (k - 1) * batch_size))
        plan.rows[k], plan.global_rows[k] = mine, all
        plan.weight[k] = mine * w == all and 1 or mine * w / all
    end
    return plan
end

function Context:set_total_steps(n) self.total_steps = n end

function Context:log(text)
    if self:is_main() then self.progress:log(text) end
end

function Context:add_output(what, path)
    self.outputs[#self.outputs + 1] = {what, path}
end

-- report(metrics, {checkpoint = dir}): metrics.step (else a running count),
-- metrics.images (images this step, for images/s), any other numbers.
function Context:report(metrics, opts)
    local now = core.now()
    self.reports = self.reports + 1
    local step = metrics.step or self.reports
    if not self.first_report_time then
        -- the first step's images count from the start of the loop
        self.first_report_time = self.start_time
    end
    -- every rank steps in lockstep on its own batch: the global count is
    -- this rank's times the world size
    self.images = self.images + (metrics.images or 0) * self.world_size
    self.last_step = step
    self.last_loss = metrics.loss
    local elapsed = now - self.first_report_time
    local rate = elapsed > 0 and self.images / elapsed or nil
    local row = {}
    for k, v in pairs(metrics) do row[k] = v end
    row.step = step
    row.time = now - self.start_time
    if opts and opts.checkpoint then row.checkpoint = opts.checkpoint end
    if self:is_main() then
        if self.metrics_file then
            self.metrics_file:write(core.json_encode(json_safe(row)), "\n")
            self.metrics_file:flush()
        end
        local total = self.total_steps
        local eta
        if total and step > 0 then eta = (now - self.start_time) / step * (total - step) end
        local loss = metrics.loss
        if type(loss) == "number" and loss ~= loss then loss = 0 / 0 end
        self.progress:show({step = step, total = total, loss = loss, lr = metrics.lr, rate = rate, eta = eta,
                            mem = peak_memory(self.device)}, total ~= nil and step >= total)
    end
end

-- ---- data-parallel workers ------------------------------------------------------------------

-- A process is a worker when its environment says so: torchrun's variables
-- (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which our own
-- launcher sets too) or Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
-- master SLURM_LAUNCH_NODE_IPADDR unless MASTER_ADDR is set).  A one-task
-- Slurm step is not a worker: it may launch workers itself.
local DEFAULT_PORT = 29500

local function env_int(name, lo)
    local v = os.getenv(name)
    if v == nil or v == "" then return nil end
    local n = math.tointeger(tonumber(v))
    if not n or n < lo then error(string.format("ml.train: environment variable %s=%s is not an integer >= %d", name, v, lo), 0) end
    return n
end

function train.worker_env()
    local w
    if os.getenv("RANK") and os.getenv("RANK") ~= "" then
        w = {rank = env_int("RANK", 0), world_size = env_int("WORLD_SIZE", 1), local_rank = env_int("LOCAL_RANK", 0),
             master_addr = os.getenv("MASTER_ADDR"), master_port = env_int("MASTER_PORT", 1), source = "RANK"}
        if not w.world_size then error("ml.train: RANK is set but WORLD_SIZE is not", 0) end
    elseif (env_int("SLURM_NTASKS", 1) or 1) > 1 and os.getenv("SLURM_PROCID") then
        w = {rank = env_int("SLURM_PROCID", 0), world_size = env_int("SLURM_NTASKS", 1), local_rank = env_int("SLURM_LOCALID", 0),
             master_addr = os.getenv("MASTER_ADDR") or os.getenv("SLURM_LAUNCH_NODE_IPADDR"),
             master_port = env_int("MASTER_PORT", 1), source = "SLURM_PROCID"}
    else
        return nil
    end
    if w.rank >= w.world_size then
        error(string.format("ml.train: rank %d (%s) is not below the world size %d", w.rank, w.source, w.world_size), 0)
    end
    w.local_rank = w.local_rank or w.rank
    w.master_addr = w.master_addr or "127.0.0.1"
    w.master_port = w.master_port or DEFAULT_PORT
    return w
end

function train.is_worker() return train.worker_env() ~= nil end

-- Worker output reaches the launcher through a pipe: line buffering keeps
-- each rank's lines timely and whole.
if train.worker_env() then io.stdout:setvbuf("line") end

-- Joins this worker to its group (ml.dist.init) once; later calls return
-- the same identity.  Needed before any collective (class images use a
-- barrier before training starts); ml.train.run calls it itself.
local joined
function train.init_worker(device)
    if joined then return joined end
    local w = train.worker_env()
    if not w then return nil end
    device = device or train.default_device()
    local ok, dist = pcall(require, "moonlit.dist")
    if not ok then
        if w.world_size > 1 then error("ml.train: worker rank " .. w.rank .. " needs ml.dist: " .. tostring(dist), 0) end
        dist = nil
    end
    if dist and not dist.is_initialized() then
        dist.init{rank = w.rank, world_size = w.world_size, local_rank = w.local_rank,
                  backend = tostring(device):match("^cuda") and "nccl" or "cpu",
                  master_addr = w.master_addr, master_port = w.master_port}
    end
    -- Per-rank random streams: the same seed, each rank's Philox counter
    -- moved 2^40 blocks further per rank, so rank 0 draws what a single
    -- process would and a run is reproducible for a given world size.
    if w.world_size > 1 then
        local seed, offset = core.get_rng_state()
        core.set_rng_state(seed, offset + w.rank * (1 << 40))
    end
    w.device, w.dist = device, dist
    joined = w
    return w
end

-- For a worker's setup before its first collective (flags, folders): every
-- rank says whether its own setup worked, and if one failed every rank
-- raises an error, the failed ones their own, the others naming the first
-- rank that failed and why.  Without it, a rank that stops early (a flag
-- only its node got wrong) leaves the others waiting for it until their
-- timeout.  worker: what init_worker returned (nil: a single process,
-- which just raises err).
function train.all_ranks_ok(worker, ok, err)
    if not worker or worker.world_size == 1 or not worker.dist then
        if not ok then error(err, 0) end
        return
    end
    local dist = worker.dist
    if dist.all_reduce_number(ok and 0 or 1, "sum") == 0 then return end
    local first_rank, first_err
    for r = 0, worker.world_size - 1 do
        local msg = dist.broadcast_string(r == worker.rank and (ok and "" or tostring(err)) or nil, r)
        if msg ~= "" and not first_rank then first_rank, first_err = r, msg end
    end
    if not ok then error(err, 0) end
    error(string.format("ml.train: rank %d stopped before training: %s", first_rank, first_err), 0)
end

-- The command line this process was started with: the interpreter and its
-- options (arg's negative indices), the script arg[0] and its arguments.
local function own_command_line()
    if type(arg) ~= "table" or arg[0] == nil then
        error("ml.train.run: more than one worker needs a script started from the command line " ..
              "(the workers run the same command line)", 0)
    end
    local lo = 0
    while arg[lo - 1] ~= nil do lo = lo - 1 end
    local argv = {}
    for i = lo, #arg do argv[#argv + 1] = tostring(arg[i]) end
    local exe = core.self_exe() or argv[1]
    if not exe:find("/", 1, true) then
        error("ml.train.run: cannot tell the path of the running binary '" .. exe .. "'", 0)
    end
    return exe, argv
end

-- GPUs the workers can have, without initialising CUDA in the launcher:
-- the entries of CUDA_VISIBLE_DEVICES when set, else the driver's count.
local function visible_gpus()
    local cvd = os.getenv("CUDA_VISIBLE_DEVICES")
    local list = {}
    if cvd ~= nil then
        for id in cvd:gmatch("[^,%s]+") do list[#list + 1] = id end
        return list
    end
    local n = core.cuda_peek_device_count and core.cuda_peek_device_count() or 0
    for i = 0, (n or 0) - 1 do list[#list + 1] = tostring(i) end
    return list
end

local GRACE_S = 3   -- SIGTERM, then SIGKILL after this many seconds
local SETTLE_S = 0.5   -- how long a non-zero exit waits for a signal death to blame instead

-- Starts this node's workers, relays their output line by line (rank 0
-- unprefixed, others "[rank r] "), and waits.  The first worker to fail
-- (non-zero exit or a signal), or SIGINT/SIGTERM to the launcher, stops
-- the rest: SIGTERM, then SIGKILL after GRACE_S.  Every worker is reaped.
-- Returns true when all exited 0, else raises an error naming the rank and
-- the cause.
function train.launch(o)
    o = options.check_options("ml.train.launch", o, {"num_workers", "nnodes", "node_rank", "master_addr",
                                                      "master_port", "device", "grace_s"})
    local n, nnodes, node_rank = o.num_workers or 1, o.nnodes or 1, o.node_rank or 0
    local function int_opt(name, v, lo)
        if math.type(v) ~= "integer" or v < lo then
            error(string.format("ml.train.run: %s must be an integer >= %d (got %s)", name, lo, tostring(v)), 0)
        end
    end
    int_opt("num_workers", n, 1); int_opt("nnodes", nnodes, 1); int_opt("node_rank", node_rank, 0)
    if node_rank >= nnodes then error(string.format("ml.train.run: node_rank %d is not below nnodes %d", node_rank, nnodes), 0) end
    if nnodes > 1 and not o.master_addr then
        error("ml.train.run: nnodes > 1 needs master_addr (the address of node 0, which every node reaches)", 0)
    end
    if o.master_port ~= nil then int_opt("master_port", o.master_port, 1) end
    local port = o.master_port or (nnodes == 1 and core.free_tcp_port()) or DEFAULT_PORT
    local exe, argv = own_command_line()
    local device = o.device and tostring(o.device) or nil
    local gpus = {}
    if device == nil or device:match("^cuda") then
        gpus = visible_gpus()
        if #gpus > 0 and #gpus < n then
            error(string.format("ml.train.run: num_workers = %d needs one GPU each; %d visible%s", n, #gpus,
                                os.getenv("CUDA_VISIBLE_DEVICES") and " (CUDA_VISIBLE_DEVICES)" or ""), 0)
        end
        if device and #gpus == 0 then error("ml.train.run: device " .. device .. " but no GPU is visible", 0) end
    end
    local world = n * nnodes
    local kids, by_fd = {}, {}
    local function emit(k, stream, line)
        local f = stream == "err" and io.stderr or io.stdout
        f:write(k.rank == 0 and "" or "[rank " .. k.rank .. "] ", line, "\n")
        f:flush()
    end
    local function stop_all(sig)
        for _, k in ipairs(kids) do if not k.status then core.kill_pid(k.pid, sig) end end
    end
    core.trap_stop_signals(true)
    local ok, err = pcall(function()
        for i = 0, n - 1 do
            local rank = node_rank * n + i
            local env = {RANK = rank, WORLD_SIZE = world, LOCAL_RANK = i, LOCAL_WORLD_SIZE = n,
                         MASTER_ADDR = o.master_addr or "127.0.0.1", MASTER_PORT = port, NCCL_NVLS_ENABLE = "0"}
            if #gpus > 0 then env.CUDA_VISIBLE_DEVICES = gpus[i + 1] end
            local pid, out_fd, err_fd = core.spawn(exe, argv, env)
            local k = {rank = rank, pid = pid, bufs = {}, open = 2}
            kids[#kids + 1] = k
            by_fd[out_fd] = {k, "out"}; by_fd[err_fd] = {k, "err"}
        end
    end)
    if not ok then
        stop_all("SIGKILL")
        for _, k in ipairs(kids) do while not core.try_wait(k.pid) do core.poll_readable({}, 10) end end
        for fd in pairs(by_fd) do core.close_fd(fd) end
        core.trap_stop_signals(false)
        error("ml.train.run: starting workers: " .. tostring(err), 0)
    end
    local failure, stop_time, killed = nil, nil, false
    local exit_failure, exit_failure_time
    local grace = o.grace_s or GRACE_S
    while true do
        local fds = {}
        for fd in pairs(by_fd) do fds[#fds + 1] = fd end
        local running = 0
        for _, k in ipairs(kids) do if not k.status then running = running + 1 end end
        if running == 0 and #fds == 0 then break end
        local ready = core.poll_readable(fds, 100)
        for _, fd in ipairs(ready) do
            local k, stream = by_fd[fd][1], by_fd[fd][2]
            local chunk = core.read_fd(fd)
            local buf = (k.bufs[stream] or "") .. (chunk or "")
            local from = 1
            while true do
                local nl = buf:find("\n", from, true)
                if not nl then break end
                emit(k, stream, buf:sub(from, nl - 1))
                from = nl + 1
            end
            k.bufs[stream] = buf:sub(from)
            if not chunk then
                if k.bufs[stream] ~= "" then emit(k, stream, k.bufs[stream]) end
                k.bufs[stream] = ""
                core.close_fd(fd)
                by_fd[fd] = nil
            end
        end
        local ended = {}
        for _, k in ipairs(kids) do
            if not k.status then
                local how, detail = core.try_wait(k.pid)
                if how then
                    k.status, k.detail = how, detail
                    ended[#ended + 1] = k
                end
            end
        end
        -- A worker killed by a signal is the cause, and the errors of the
        -- others (they lost a peer) the effect; but a killed process may
        -- become reapable after its peers saw its sockets close and exited.
        -- So a non-zero exit is the cause only if no worker dies of a
        -- signal within SETTLE_S of it (our own SIGTERM comes after that).
        for _, k in ipairs(ended) do
            if not failure and k.status == "signal" then
                failure = string.format("worker rank %d (pid %d) was killed by %s", k.rank, k.pid, k.detail)
            elseif not exit_failure and k.status ~= "signal" and k.detail ~= 0 then
                exit_failure = string.format("worker rank %d (pid %d) exited with code %d", k.rank, k.pid, k.detail)
                exit_failure_time = core.now()
            end
        end
        if not failure and exit_failure and core.now() - exit_failure_time > SETTLE_S then failure = exit_failure end
        local sig = core.stop_signal_caught()
        if sig and not failure then failure = "the launcher got " .. sig end
        if failure and not stop_time then
            stop_time = core.now()
            stop_all("SIGTERM")
        end
        if stop_time and not killed and core.now() - stop_time > grace then
            killed = true
            stop_all("SIGKILL")
        end
        -- a worker's own child could hold a pipe open after every worker ended
        if running == 0 and #fds > 0 then
            local t = stop_time or core.now()
            stop_time = t
            if core.now() - t > grace then
                for fd in pairs(by_fd) do core.close_fd(fd) end
                by_fd = {}
            end
        end
    end
    core.trap_stop_signals(false)
    failure = failure or exit_failure
    if failure then
        error(string.format("ml.train.run: %s; all %d workers of this node have ended", failure, #kids), 0)
    end
    return true
end

-- For scripts that do heavy work before ml.train.run (loading a model):
-- call this first.  In a launcher (num_workers > 1 or nnodes > 1, not a
-- worker itself) it runs the workers and returns true once they all
-- succeeded (the script should then return); in a worker or a single
-- process it returns false at once.
function train.launch_if_needed(num_workers, o)
    o = o or {}
    if train.is_worker() then return false end
    if (num_workers or 1) == 1 and (o.nnodes or 1) == 1 then return false end
    local lo = {num_workers = num_workers}
    for k, v in pairs(o) do lo[k] = v end
    return train.launch(lo)
end

-- ---- run ------------------------------------------------------------------------------------

function train.default_device()
    if core.cuda_available and core.cuda_available() then return "cuda" end
    return "cpu"
end

function train.run(train_fn, opts)
    opts = options.check_options("ml.train.run", opts, {"num_workers", "config", "output_dir", "device", "datasets",
                                                         "log_every", "summary", "nnodes", "node_rank", "master_addr",
                                                         "master_port"})
    if type(train_fn) ~= "function" then error("ml.train.run: train_fn must be a function", 2) end
    local nw = opts.num_workers or 1
    if math.type(nw) ~= "integer" or nw < 1 then
        error("ml.train.run: num_workers must be an integer >= 1 (got " .. tostring(nw) .. ")", 2)
    end
    local w = train.worker_env()
    if not w and (nw > 1 or (opts.nnodes or 1) > 1) then
        -- the launcher: the workers run this same script; code after
        -- ml.train.run runs in them, not here, so the launcher ends here
        train.launch{num_workers = nw, nnodes = opts.nnodes, node_rank = opts.node_rank,
                     master_addr = opts.master_addr, master_port = opts.master_port, device = opts.device}
        io.stdout:flush()
        os.exit(0, true)
    end
    local cfg = opts.config or {}
    local device = opts.device or cfg.device or train.default_device()
    if w then w = train.init_worker(device) end
    local out = opts.output_dir or cfg.output_dir
    local ctx = setmetatable({
        rank = w and w.rank or 0, world_size = w and w.world_size or 1, local_rank = w and w.local_rank or 0,
        device = device, dist = w and w.dist,
        config = cfg, output_dir = out, datasets = opts.datasets or {},
        reports = 0, images = 0, outputs = {}, start_time = core.now(),
        progress = Progress.new{log_every = opts.log_every, device = opts.device},
    }, Context)
    if out and ctx:is_main() then
        local ok, err = pcall(core.mkdir_p, out)
        if not ok then error("ml.train.run: cannot create output_dir " .. out .. ": " .. tostring(err), 2) end
        local path = join(out, "metrics.jsonl")
        local f, err = io.open(path, "a")
        if not f then error("ml.train.run: output_dir is not writable: " .. tostring(err), 2) end
        ctx.metrics_file = f
        ctx.metrics_path = path
    end
    local res = table.pack(xpcall(train_fn, debug.traceback, cfg, ctx))
    ctx.progress:finish()
    if ctx.metrics_file then ctx.metrics_file:close() end
    if not res[1] then error(res[2], 0) end
    local wall = core.now() - ctx.start_time
    ctx.summary = {steps = ctx.last_step or 0, wall_s = wall, images = ctx.images,
                   images_per_s = wall > 0 and ctx.images / wall or 0, peak_memory = peak_memory(ctx.device)}
    if ctx:is_main() and opts.summary ~= false then
        local s = ctx.summary
        print(string.format("done: %d steps in %s, %d images, %.2f images/s, peak memory %s (%s)", s.steps,
                            fmt_duration(s.wall_s), s.images, s.images_per_s, fmt_bytes(s.peak_memory),
                            select(2, peak_memory(ctx.device)) or "?"))
        if ctx.metrics_path then print("  metrics:     " .. ctx.metrics_path) end
        for _, o in ipairs(ctx.outputs) do print(string.format("  %-12s %s", o[1] .. ":", o[2])) end
    end
    return table.unpack(res, 2, res.n)
end

-- ---- checkpoints -------------------------------------------------------------------------

local STATE_FILE = "trainer_state.json"
local FORMAT = "moonlit-checkpoint"

local function sorted_keys(t)
    local ks = {}
    for k in pairs(t) do ks[#ks + 1] = k end
    table.sort(ks)
    return ks
end

-- A checkpoint folder is complete when its state file exists: that file is
-- written last, inside the temporary folder, before the rename.
function train.is_checkpoint(dir)
    return core.is_file(join(dir, STATE_FILE))
end

function train.save_checkpoint(dir, s)
    dir = dir:gsub("/+$", "")
    local tmp, old = dir .. ".partial", dir .. ".old"
    remove_tree(tmp)            -- a save killed earlier left this behind
    local ok, err = pcall(core.mkdir_p, tmp)
    if not ok then error("save_checkpoint: cannot create " .. tmp .. ": " .. tostring(err), 2) end
    local files = {}
    for _, name in ipairs(sorted_keys(s.modules or {})) do
        local sd = s.modules[name]:state_dict()
        local t = {}
        for _, k in ipairs(sd._order) do t[k] = sd[k] end
        local f = "model-" .. name .. ".safetensors"
        core.st_save(join(tmp, f), t)
        files[#files + 1] = f
    end
    local opt_state
    if s.optimizer then
        local osd = s.optimizer:state_dict()
        local tensors, steps = {}, {}
        for i, st in pairs(osd.state) do
            tensors[i .. ".exp_avg"] = st.exp_avg
            tensors[i .. ".exp_avg_sq"] = st.exp_avg_sq
            steps[tostring(i)] = st.step
        end
        if next(tensors) then core.st_save(join(tmp, "optimizer.safetensors"), tensors) end
        opt_state = {lr = osd.lr, betas = osd.betas, eps = osd.eps, weight_decay = osd.weight_decay,
                     steps = core.json_object(steps), num_params = #s.optimizer.params}
    end
    local seed, offset = core.get_rng_state()
    core.json_save(join(tmp, STATE_FILE), {
        format = FORMAT, version = 1, step = s.step or 0, epoch = s.epoch or 1, batch = s.batch or 1,
        rng = {seed = seed, offset = offset}, optimizer = opt_state, files = files,
        extra = core.json_object(s.extra or {}),
    })
    -- swap: the old folder stays complete until the new one is in place
    remove_tree(old)
    if exists(dir) then rename(dir, old) end
    rename(tmp, dir)
    remove_tree(old)
    return dir
end

function train.load_checkpoint(dir, s)
    s = s or {}
    local path = join(dir, STATE_FILE)
    if not core.is_dir(dir) then error("load_checkpoint: no checkpoint folder " .. dir, 2) end
    if not core.is_file(path) then
        error("load_checkpoint: " .. dir .. " is not a complete checkpoint (no " .. STATE_FILE .. ")", 2)
    end
    local st = core.json_load(path)
    if st.format ~= FORMAT then error("load_checkpoint: " .. path .. " is not a moonlit checkpoint", 2) end
    for _, name in ipairs(sorted_keys(s.modules or {})) do
        local f = join(dir, "model-" .. name .. ".safetensors")
        if not core.is_file(f) then error("load_checkpoint: " .. dir .. " has no weights for '" .. name .. "'", 2) end
        local ok, err = pcall(s.modules[name].load_state_dict, s.modules[name], core.st_load(f))
        if not ok then error("load_checkpoint: " .. f .. ": " .. tostring(err), 2) end
    end
    if s.optimizer then
        local o = st.optimizer
        if not o then error("load_checkpoint: " .. dir .. " holds no optimizer state", 2) end
        if o.num_params ~= #s.optimizer.params then
            error(string.format("load_checkpoint: %s: optimizer state for %d parameters, the optimizer has %d",
                                dir, o.num_params, #s.optimizer.params), 2)
        end
        local tensors = {}
        if core.is_file(join(dir, "optimizer.safetensors")) then tensors = core.st_load(join(dir, "optimizer.safetensors")) end
        local state = {}
        for k, step in pairs(o.steps or {}) do
            local i = math.tointeger(tonumber(k))
            state[i] = {step = step, exp_avg = tensors[k .. ".exp_avg"], exp_avg_sq = tensors[k .. ".exp_avg_sq"]}
            if not state[i].exp_avg or not state[i].exp_avg_sq then
                error("load_checkpoint: optimizer.safetensors lacks the moments of parameter " .. k, 2)
            end
        end
        s.optimizer:load_state_dict({lr = o.lr, betas = o.betas, eps = o.eps, weight_decay = o.weight_decay, state = state})
    end
    if s.restore_rng ~= false then core.set_rng_state(st.rng.seed, st.rng.offset) end
    return st
end

-- checkpoint-N folders of output_dir, oldest first.
function train.list_checkpoints(output_dir)
    local out = {}
    if not core.is_dir(output_dir) then return out end
    for _, name in ipairs(core.list_dir(output_dir)) do
        local n = name:match("^checkpoint%-(%d+)$")
        local p = join(output_dir, name)
        if n and train.is_checkpoint(p) then out[#out + 1] = {step = tonumber(n), path = p} end
    end
    table.sort(out, function(a, b) return a.step < b.step end)
    return out
end

-- A save killed between its two renames leaves checkpoint-N.old complete
-- and checkpoint-N missing: put it back before looking.
local function recover_interrupted_swaps(output_dir)
    if not core.is_dir(output_dir) then return end
    for _, name in ipairs(core.list_dir(output_dir)) do
        local base = name:match("^(checkpoint%-%d+)%.old$")
        if base then
            local p = join(output_dir, base)
            if not exists(p) and train.is_checkpoint(join(output_dir, name)) then rename(join(output_dir, name), p) end
        end
    end
end

function train.latest_checkpoint(output_dir)
    recover_interrupted_swaps(output_dir)
    local l = train.list_checkpoints(output_dir)
    return l[#l] and l[#l].path or nil
end

function train.prune_checkpoints(output_dir, keep)
    if not keep then return end
    local l = train.list_checkpoints(output_dir)
    for i = 1, #l - keep do remove_tree(l[i].path) end
end

-- ---- DistributedDataParallel (moonlit.ddp) --------------------------------------------------

function train.ddp(params, o) return require("moonlit.ddp").new(params, o) end

return train
