-- check_dist.lua — ml.dist on CUDA tensors through NCCL: every collective
-- on f32, bf16 and f16 tensors against values worked out on the host, an
-- async all_reduce ordered before the compute that follows its wait(),
-- the host collectives, NCCL_NVLS_ENABLE=0 in each worker's environment,
-- and argument errors that name the mistake.  World size 1 runs the real
-- NCCL path too (a communicator of one rank).  --device cpu runs the same
-- checks over the TCP backend, so the script itself is tested on a CPU box.
--   build/moonlit tests/gpu/check_dist.lua [--num_workers N] [--device cuda|cpu]
-- Each rank prints its failures; rank 0 ends with "N passed, N failed"
-- (all ranks); the exit status is non-zero when a check failed.
local ml = require "moonlit"
local dist = ml.dist

local p = ml.argparse.new("check_dist.lua", "ml.dist collectives on CUDA tensors (NCCL), checked on every rank.")
p:option("num_workers", {type = "integer", default = 1, help = "workers, one GPU each"})
p:option("device", {type = "string", default = "cuda", choices = {"cuda", "cpu"}, help = "cuda (NCCL) or cpu (TCP)"})
p:option("big_mb", {type = "integer", default = 256, help = "size of the timed all_reduce, MiB"})
local o = p:parse(arg or {})
if ml.train.launch_if_needed(o.num_workers, {device = o.device}) then return end

local on_gpu = o.device == "cuda"
local worker = ml.train.init_worker(o.device)
if not worker then
    -- one process: world size 1 through the same path
    dist.init{rank = 0, world_size = 1, backend = on_gpu and "nccl" or "cpu", master_port = dist.free_port()}
end
local R, W = dist.rank(), dist.world_size()
local dev = on_gpu and "cuda" or "cpu"

local passed, failed = 0, 0
local function check(ok, what)
    if ok then passed = passed + 1 else
        failed = failed + 1
        print(string.format("FAIL rank %d of %d: %s", R, W, what))
        io.stdout:flush()
    end
end

-- max |got - want| / max(1, |want|) over the elements (host copies, f64)
local function rel_err(got, want)
    local g, w = got:to("cpu"):double(), want:to("cpu"):double()
    return ((g - w):abs() / w:abs():clamp(1, math.huge)):max():item()
end

local TOL = {f32 = 1e-6, bf16 = 2 ^ -7, f16 = 2 ^ -10}   -- avg may multiply by 1/W before adding
local S = W * (W + 1) / 2
local n = 1037                                        -- not a multiple of anything NCCL aligns to

-- x_r[i] = (r + 1) * c_i, c_i = (i - 1) % 4 + 1: small integers, exact in every dtype
local cl = {}
for i = 1, n do cl[i] = (i - 1) % 4 + 1 end
local c = ml.tensor(cl)
local function x(r, dtype) return (c * (r + 1)):to(dtype):to(dev) end

print(string.format("rank %d of %d on %s (%s backend), NCCL_NVLS_ENABLE=%s", R, W, dev, dist.backend(),
                    tostring(os.getenv("NCCL_NVLS_ENABLE"))))
if on_gpu then check(os.getenv("NCCL_NVLS_ENABLE") == "0", "NCCL_NVLS_ENABLE=0 in this worker's environment") end

for _, dt in ipairs {"f32", "bf16", "f16"} do
    local tol = TOL[dt]
    local t = x(R, dt); dist.all_reduce(t, {op = "sum"})
    check(rel_err(t, c * S) <= tol, dt .. " all_reduce sum: rel err " .. rel_err(t, c * S))
    t = x(R, dt); dist.all_reduce(t, {op = "avg"})
    check(rel_err(t, c * (S / W)) <= tol, dt .. " all_reduce avg: rel err " .. rel_err(t, c * (S / W)))
    t = x(R, dt); dist.all_reduce(t, {op = "max"})
    check(rel_err(t, c * W) == 0, dt .. " all_reduce max")
    local b = ml.full({n}, R + 1, {dtype = dt}):to(dev); dist.broadcast(b, W - 1)
    check(rel_err(b, ml.full({n}, W)) == 0, dt .. " broadcast from rank " .. (W - 1))
    local g = dist.all_gather(ml.full({2, 3}, R, {dtype = dt}):to(dev))
    local want = {}
    for q = 0, W - 1 do want[#want + 1] = {q, q, q}; want[#want + 1] = {q, q, q} end
    check(g:size(1) == 2 * W and rel_err(g, ml.tensor(want)) == 0, dt .. " all_gather in rank order")
    local rl = {}
    for i = 1, 2 * W do rl[i] = {i, i, i} end
    local rows = ml.tensor(rl)
    local rs = dist.reduce_scatter((rows * (R + 1)):to(dt):to(dev), {op = "sum"})
    local mine = rows:narrow(1, 2 * R + 1, 2) * S
    check(rs:size(1) == 2 and rel_err(rs, mine) <= tol, dt .. " reduce_scatter: this rank's rows")
    -- async: the host does not wait; compute queued after wait() sees the sum
    t = x(R, dt)
    local w = dist.all_reduce(t, {op = "sum", async = true})
    w:wait()
    local doubled = t * 2
    check(rel_err(doubled, c * (2 * S)) <= tol, dt .. " async all_reduce, then compute after wait()")
    local t0 = ml.now()
    while not w:done() and ml.now() - t0 < 10 do end
    check(w:done(), dt .. " async work reports done")
end

-- a large all_reduce: values, and the bandwidth (information)
local numel = o.big_mb * 2 ^ 20 // 4
local big = ml.full({numel}, R + 1, {device = dev})
dist.all_reduce(big)
if on_gpu then ml.core.cuda_synchronize(0) end
local t0 = ml.now()
local reps = 5
for _ = 1, reps do dist.all_reduce(big, {op = "avg"}) end
if on_gpu then ml.core.cuda_synchronize(0) end
local secs = (ml.now() - t0) / reps
check(rel_err(big:narrow(1, numel, 1), ml.full({1}, S)) <= 1e-6, "large all_reduce: the last element")
-- bus bandwidth as nccl-tests counts it: 2 (W - 1) / W of the bytes cross each link
local busbw = W > 1 and o.big_mb / 1024 * 2 * (W - 1) / W / secs or 0
print(string.format("rank %d: all_reduce of %d MiB f32: %.2f ms, bus bandwidth %.1f GiB/s", R, o.big_mb, secs * 1e3, busbw))

-- host collectives (TCP on both backends)
dist.barrier()
check(dist.all_reduce_number(R, "sum") == W * (W - 1) / 2, "all_reduce_number sum")
check(dist.broadcast_string(R == 0 and "from rank 0" or nil, 0) == "from rank 0", "broadcast_string")

-- argument errors name what was wrong, and leave the group usable
local ok, err = pcall(dist.all_reduce, ml.ones({2, 3}, {device = dev}):t())
check(not ok and tostring(err):find("contiguous", 1, true), "a non-contiguous tensor is refused: " .. tostring(err))
if on_gpu then
    ok, err = pcall(dist.all_reduce, ml.ones({4}))
    check(not ok and tostring(err):find("needs a CUDA tensor", 1, true), "a CPU tensor on nccl is refused: " .. tostring(err))
end
local after = ml.ones({4}, {device = dev}); dist.all_reduce(after)
check(rel_err(after, ml.full({4}, W)) == 0, "the group still works after argument errors")

local total_passed = dist.all_reduce_number(passed, "sum")
local total_failed = dist.all_reduce_number(failed, "sum")
dist.destroy()
if R == 0 then print(string.format("%d passed, %d failed", total_passed, total_failed)) end
os.exit(failed == 0 and total_failed == 0 and 0 or 1)
