-- ml.dist on the cpu backend: 2 and 3 worker processes (moonlit -e) run every
-- collective and print their results; dead, hung and misconfigured ranks
-- must fail fast with an error naming the rank.
local ml = require "moonlit"
local dist = ml.dist

local U = require "testutil"
local tests = {}

local moonlit_bin = U.moonlit_bin

local shell_quote = U.shell_quote

-- What every worker runs first: R, N, P (rank, world size, port) from the
-- environment, and out(name, tensor|value) printing "name=v1,v2,..." lines.
local PRELUDE = [[
local ml = require "moonlit"
local dist = ml.dist
local R, N, P = tonumber(os.getenv("DIST_R")), tonumber(os.getenv("DIST_N")), tonumber(os.getenv("DIST_P"))
local function flat(t)
    local v = t:to("f64"):reshape(t:numel()):totable()
    for i = 1, #v do v[i] = string.format("%.9g", v[i]) end
    return table.concat(v, ",")
end
local function out(name, v)
    io.write(name, "=", type(v) == "userdata" and flat(v) or tostring(v), "\n")
    io.flush()
end
]]

-- Start one process per rank (all at once), wait for all; returns the
-- outputs (rank order, 0-based index + 1) with "rc=N" as the last line.
-- world[r] may override the world size a rank is told.
local function run_ranks(n, body, opts)
    opts = opts or {}
    local bin = moonlit_bin()
    assert(bin, "no moonlit binary known (set MOONLIT_BIN)")
    local port = opts.port or dist.free_port()
    local script = PRELUDE .. body
    local pipes = {}
    for r = 0, n - 1 do
        local ws = opts.world and opts.world[r] or n
        local cmd = string.format("DIST_R=%d DIST_N=%d DIST_P=%d %s -e %s 2>&1; echo \"rc=$?\"", r, ws, port,
                                  shell_quote(bin), shell_quote(script))
        pipes[r + 1] = io.popen(cmd)
        if opts.stagger then os.execute("sleep " .. opts.stagger) end
    end
    local outs = {}
    for i, p in ipairs(pipes) do
        outs[i] = p:read("a")
        p:close()
    end
    return outs, port
end

local function field(out, name)
    return out:match("\n" .. name .. "=([^\n]*)") or out:match("^" .. name .. "=([^\n]*)")
end

local function nums(s)
    local v = {}
    for x in (s or ""):gmatch("[^,]+") do v[#v + 1] = tonumber(x) end
    return v
end

local function near_list(t, got, want, tol, what)
    if not t:assert(#got == #want, string.format("%s: %d values, expected %d", what, #got, #want)) then return end
    for i = 1, #want do
        if not t:assert(math.abs(got[i] - want[i]) <= tol * math.max(1, math.abs(want[i])),
                        string.format("%s[%d] = %s, expected %s", what, i, got[i], want[i])) then return end
    end
end

local COLLECTIVES = [[
dist.init{rank = R, world_size = N, master_port = P, timeout_s = 5}
out("rank", dist.rank()); out("world", dist.world_size()); out("backend", dist.backend())
-- rank r holds x_r = {r + 1, -0.5 (r + 1), 2^r, 1/3 (r + 1)}
local function x(r) return {r + 1, -0.5 * (r + 1), 2 ^ r, (r + 1) / 3} end
local t = ml.tensor(x(R)); dist.all_reduce(t, {op = "sum"}); out("sum", t)
t = ml.tensor(x(R)); dist.all_reduce(t, {op = "avg"}); out("avg", t)
t = ml.tensor(x(R)); dist.all_reduce(t, {op = "max"}); out("max", t)
t = ml.tensor(x(R)):to("bf16"); dist.all_reduce(t, "sum"); out("sum_bf16", t)
t = ml.tensor(x(R), {dtype = "f64"}); dist.all_reduce(t); out("sum_f64", t)
t = ml.tensor({R * 1000000007, -R}, {dtype = "i64"}); dist.all_reduce(t); out("sum_i64", t)
t = ml.tensor(x(R)); local w = dist.all_reduce(t, {op = "sum", async = true})
out("async_done", w:done()); out("async_same", w:wait() == t); out("async", t)
local b = ml.tensor({{R, 10 * R}, {100 + R, 7}}); dist.broadcast(b, N - 1); out("bcast", b)
local g = dist.all_gather(ml.tensor({{R, R + 0.5}})); out("gather_shape", g:size(1) .. "x" .. g:size(2)); out("gather", g)
local rows = {}
for i = 1, 2 * N do rows[i] = {i * (R + 1), -i} end
local rs = dist.reduce_scatter(ml.tensor(rows), {op = "sum"}); out("rs_shape", rs:size(1) .. "x" .. rs:size(2)); out("rs", rs)
dist.barrier()
out("num_sum", dist.all_reduce_number(R + 0.25, "sum"))
out("num_max", dist.all_reduce_number(-R, "max"))
out("str", dist.broadcast_string(R == 1 and "ckpt/step-7 \0 done" or nil, 1):gsub("%z", "<0>"))
-- collectives write through the in-place gate: a leaf requiring grad is
-- refused in grad mode on every rank (the root too), so no rank waits for
-- one that refused, and the group stays usable
local p = ml.full({2}, R + 1, {requires_grad = true})
local okb, eb = pcall(dist.broadcast, p, 0); out("bcast_leaf", tostring(okb) .. " " .. tostring(eb))
local oka, ea = pcall(dist.all_reduce, p); out("reduce_leaf", tostring(oka) .. " " .. tostring(ea))
ml.no_grad(function() dist.broadcast(p, 0) end); out("bcast_no_grad", p)
-- a write into a tensor saved for backward makes that backward fail
local wq = ml.ones({2}, {requires_grad = true})
local xs = ml.full({2}, R + 1)
local yq = (wq * xs):sum()
dist.all_reduce(xs)
local okg, eg = pcall(yq.backward, yq); out("saved_written", tostring(okg) .. " " .. tostring(eg))
-- a rank whose tensor differs in size: every rank gets an error naming it
local ok, err = pcall(dist.all_reduce, ml.zeros(R == 1 and 3 or 2))
out("mismatch", tostring(ok) .. " " .. tostring(err))
dist.destroy()
out("done", "yes")
]]

local function check_collectives(t, n)
    local outs = run_ranks(n, COLLECTIVES)
    local x = function(r) return {r + 1, -0.5 * (r + 1), 2 ^ r, (r + 1) / 3} end
    local sum, max = {0, 0, 0, 0}, {-math.huge, -math.huge, -math.huge, -math.huge}
    for r = 0, n - 1 do
        for i, v in ipairs(x(r)) do sum[i] = sum[i] + v; max[i] = math.max(max[i], v) end
    end
    local avg = {}
    for i = 1, 4 do avg[i] = sum[i] / n end
    local first
    for r = 0, n - 1 do
        local o = outs[r + 1]
        local tag = string.format("rank %d of %d", r, n)
        t:assert(o:find("rc=0", 1, true), tag .. " failed:\n" .. o)
        t:assertEq(field(o, "rank"), tostring(r), tag)
        t:assertEq(field(o, "world"), tostring(n), tag)
        t:assertEq(field(o, "backend"), "cpu", tag)
        near_list(t, nums(field(o, "sum")), sum, 1e-6, tag .. " sum")
        near_list(t, nums(field(o, "avg")), avg, 1e-6, tag .. " avg")
        near_list(t, nums(field(o, "max")), max, 1e-7, tag .. " max (f32 rounding of the inputs)")
        -- bf16: each input is rounded to 8 bits of mantissa, the sum once more
        near_list(t, nums(field(o, "sum_bf16")), sum, 2 * 2 ^ -8 * n, tag .. " bf16 sum")
        near_list(t, nums(field(o, "sum_f64")), sum, 1e-12, tag .. " f64 sum")
        local isum = 0
        for q = 0, n - 1 do isum = isum + q * 1000000007 end
        t:assertEq(field(o, "sum_i64"), string.format("%.9g,%.9g", isum, -(n - 1) * n / 2), tag .. " i64 sum")
        t:assert(field(o, "async_done") == "true" or field(o, "async_done") == "false", tag .. " w:done() is a boolean")
        t:assertEq(field(o, "async_same"), "true", tag .. " w:wait() returns the tensor")
        near_list(t, nums(field(o, "async")), sum, 1e-6, tag .. " async sum")
        local root = n - 1
        near_list(t, nums(field(o, "bcast")), {root, 10 * root, 100 + root, 7}, 0, tag .. " broadcast")
        t:assertEq(field(o, "gather_shape"), n .. "x2", tag .. " all_gather shape")
        local g = {}
        for q = 0, n - 1 do g[#g + 1] = q; g[#g + 1] = q + 0.5 end
        near_list(t, nums(field(o, "gather")), g, 0, tag .. " all_gather rank order")
        t:assertEq(field(o, "rs_shape"), "2x2", tag .. " reduce_scatter shape")
        -- rows i of rank q are {i (q + 1), -i}; this rank gets rows 2r+1, 2r+2 summed over q
        local f = n * (n + 1) / 2
        near_list(t, nums(field(o, "rs")), {(2 * r + 1) * f, -(2 * r + 1) * n, (2 * r + 2) * f, -(2 * r + 2) * n}, 0,
                  tag .. " reduce_scatter")
        near_list(t, {tonumber(field(o, "num_sum"))}, {n * (n - 1) / 2 + 0.25 * n}, 1e-12, tag .. " number sum")
        near_list(t, {tonumber(field(o, "num_max"))}, {0}, 0, tag .. " number max")
        t:assertEq(field(o, "str"), "ckpt/step-7 <0> done", tag .. " broadcast_string (with a NUL byte)")
        for _, k in ipairs {"bcast_leaf", "reduce_leaf"} do
            local e = field(o, k) or ""
            t:assert(e:find("^false") and e:find("leaf tensor that requires grad", 1, true)
                     and e:find(string.format("(rank %d of %d)", r, n), 1, true), tag .. " " .. k .. ": " .. e)
        end
        near_list(t, nums(field(o, "bcast_no_grad")), {1, 1}, 0, tag .. " broadcast under no_grad")
        local sw = field(o, "saved_written") or ""
        t:assert(sw:find("^false") and sw:find("modified by an inplace operation", 1, true),
                 tag .. " backward after the saved tensor was reduced: " .. sw)
        local m = field(o, "mismatch") or ""
        t:assert(m:find("^false") and m:find("all_reduce", 1, true) and m:find("rank 1", 1, true)
                 and m:find("same shape", 1, true), tag .. " size mismatch error: " .. m)
        t:assertEq(field(o, "done"), "yes", tag)
        -- every rank reports identical results (rank 0 reduces, in rank order)
        local res = table.concat({field(o, "sum"), field(o, "avg"), field(o, "max"), field(o, "sum_bf16"), field(o, "gather")}, ";")
        first = first or res
        t:assertEq(res, first, tag .. " bit-identical to rank 0")
    end
end

function tests.collectives_2_ranks(t) check_collectives(t, 2) end
function tests.collectives_3_ranks(t) check_collectives(t, 3) end

-- async = true on the cpu backend runs on the communication thread: the
-- call returns while a peer is still busy (w:done() false), compute goes
-- on, and w:wait() gives the sum.  Several in flight keep their order, a
-- blocking collective after them waits for them, and a work dropped
-- without wait() is finished before the next collective.
function tests.async_all_reduce_overlaps_a_slow_peer(t)
    local outs = run_ranks(2, [[
dist.init{rank = R, world_size = N, master_port = P, timeout_s = 10}
if R == 1 then os.execute("sleep 1") end
local t0 = ml.core.now()
local a, b = ml.full({1000}, R + 1), ml.full({3}, 10 * (R + 1))
local wa = dist.all_reduce(a, {op = "sum", async = true})
local wb = dist.all_reduce(b, {op = "avg", async = true})
out("call_s", string.format("%.3f", ml.core.now() - t0))
out("done_at_once", wa:done())
-- compute while the hub waits for rank 1
local m = ml.randn({64, 64})
for _ = 1, 20 do m = (m:matmul(m) / 64):tanh() end
out("computed", m:numel())
wa:wait(); wb:wait()
out("wait_s", string.format("%.3f", ml.core.now() - t0))
out("a", a:narrow(1, 1, 2)); out("b", b)
dist.all_reduce(ml.ones(2), {async = true})   -- dropped: the barrier runs after it
collectgarbage()
dist.barrier()
out("num", dist.all_reduce_number(R, "sum"))
dist.destroy()
]])
    local r0 = outs[1]
    t:assert(r0:find("rc=0", 1, true) and outs[2]:find("rc=0", 1, true), "both ranks succeed:\n" .. r0 .. outs[2])
    t:assert(tonumber(field(r0, "call_s") or "9") < 0.3, "rank 0's async calls return at once: " .. tostring(field(r0, "call_s")))
    t:assertEq(field(r0, "done_at_once"), "false", "rank 0's all_reduce is still waiting for rank 1")
    t:assert(tonumber(field(r0, "wait_s") or "0") >= 0.8, "rank 0's wait() returns after rank 1 joined: " .. tostring(field(r0, "wait_s")))
    for r = 0, 1 do
        local o = outs[r + 1]
        t:assertEq(field(o, "a"), "3,3", "rank " .. r .. ": the sum of 1 and 2")
        t:assertEq(field(o, "b"), "15,15,15", "rank " .. r .. ": the average of 10 and 20, second in flight")
        t:assertEq(field(o, "num"), "1.0", "rank " .. r .. ": a host collective after a dropped work")
    end
end

-- A peer that exits while an async all_reduce is in flight: w:wait() raises
-- the error naming it, and so does every later call.
function tests.async_error_surfaces_at_wait(t)
    local outs = run_ranks(2, [[
dist.init{rank = R, world_size = N, master_port = P, timeout_s = 5}
if R == 1 then os.execute("sleep 0.3") os.exit(0) end
local w = dist.all_reduce(ml.ones(8), {async = true})
local ok, err = pcall(w.wait, w)
out("err", tostring(ok) .. " " .. tostring(err))
local ok2, err2 = pcall(dist.barrier)
out("later", tostring(ok2) .. " " .. tostring(err2))
]])
    local err = field(outs[1], "err") or ""
    t:assert(err:find("^false") and err:find("dist.all_reduce (rank 0 of 2)", 1, true)
             and err:find("rank 1 closed its connection", 1, true), "rank 0: " .. outs[1])
    local later = field(outs[1], "later") or ""
    t:assert(later:find("^false") and later:find("failed earlier", 1, true), "rank 0 later: " .. later)
end

-- A rank that exits without calling the collective: the others fail at once
-- (EOF, not the 5 s timeout), naming it.
function tests.dead_rank_is_reported_at_once(t)
    local outs = run_ranks(3, [[
dist.init{rank = R, world_size = N, master_port = P, timeout_s = 5}
if R == 2 then os.exit(0) end
local t0 = ml.core.now()
local ok, err = pcall(dist.all_reduce, ml.ones(4))
out("elapsed", string.format("%.3f", ml.core.now() - t0))
out("err", tostring(ok) .. " " .. tostring(err))
local ok2, err2 = pcall(dist.barrier)
out("later", tostring(ok2) .. " " .. tostring(err2))
]])
    for r = 0, 1 do
        local o = outs[r + 1]
        local err = field(o, "err") or ""
        t:assert(err:find("^false") and err:find("dist.all_reduce (rank " .. r .. " of 3)", 1, true)
                 and err:find("rank 2 closed its connection", 1, true), "rank " .. r .. ": " .. o)
        local el = tonumber(field(o, "elapsed"))
        t:assert(el and el < 2, "rank " .. r .. " took " .. tostring(el) .. " s (EOF must be immediate)")
        local later = field(o, "later") or ""
        t:assert(later:find("^false") and later:find("failed earlier", 1, true), "rank " .. r .. " later: " .. later)
    end
end

-- A rank that hangs: rank 0 gives up after timeout_s naming it, and tells
-- rank 1, which reports the same cause.
function tests.hung_rank_times_out(t)
    local outs = run_ranks(3, [[
dist.init{rank = R, world_size = N, master_port = P, timeout_s = 5}
if R == 2 then os.execute("sleep 6.5") os.exit(0) end
local t0 = ml.core.now()
local ok, err = pcall(dist.all_reduce, ml.ones(4))
out("elapsed", string.format("%.3f", ml.core.now() - t0))
out("err", tostring(ok) .. " " .. tostring(err))
]])
    for r = 0, 1 do
        local o = outs[r + 1]
        local err = field(o, "err") or ""
        t:assert(err:find("^false") and err:find("rank 2 did not respond within 5 s", 1, true), "rank " .. r .. ": " .. o)
        local el = tonumber(field(o, "elapsed"))
        t:assert(el and el >= 4.5 and el < 6.5, "rank " .. r .. " gave up after " .. tostring(el) .. " s (timeout 5 s)")
    end
end

function tests.wrong_world_size_is_refused(t)
    local outs = run_ranks(2, [[
local ok, err = pcall(dist.init, {rank = R, world_size = N, master_port = P, timeout_s = 5})
out("err", tostring(ok) .. " " .. tostring(err))
]], {world = {[1] = 3}})
    for r = 0, 1 do
        local err = field(outs[r + 1], "err") or ""
        t:assert(err:find("^false") and err:find("rank 1 was started with world_size 3, rank 0 with 2", 1, true),
                 "rank " .. r .. ": " .. outs[r + 1])
    end
end

function tests.port_in_use_is_named(t)
    -- Two "rank 0"s on one port: the second cannot listen; the first times
    -- out waiting for its rank 1, naming it.
    local outs = run_ranks(2, [[
if R == 1 then R = 0 end
local ok, err = pcall(dist.init, {rank = R, world_size = 2, master_port = P, timeout_s = 2})
out("err", tostring(ok) .. " " .. tostring(err))
]], {stagger = 0.5})
    local first, second = field(outs[1], "err") or "", field(outs[2], "err") or ""
    t:assert(second:find("cannot listen on port", 1, true) and second:find("in use", 1, true)
             and second:find("master_port", 1, true), "second rank 0: " .. outs[2])
    t:assert(first:find("timed out after 2 s waiting for rank(s) 1 to connect", 1, true), "first rank 0: " .. outs[1])
end

-- In this process, world size 1 (no sockets): argument errors name the
-- collective and what was wrong; collectives are the identity.
function tests.argument_errors(t)
    t:assert(not dist.is_initialized())
    local ok, err = pcall(dist.all_reduce, ml.ones(2))
    t:assert(not ok and err:find("not initialised", 1, true), tostring(err))
    ok, err = pcall(dist.init, {rank = 2, world_size = 2})
    t:assert(not ok and err:find("rank must be in 0..1", 1, true), tostring(err))
    ok, err = pcall(dist.init, {rank = 0, world_size = 1, backend = "mpi"})
    t:assert(not ok and err:find("unknown backend 'mpi'", 1, true), tostring(err))
    ok, err = pcall(dist.init, {rank = 0, world_size = 1, tiemout_s = 3})
    t:assert(not ok and err:find("unknown option 'tiemout_s'", 1, true), tostring(err))
    if not ml.built_with_cuda then
        ok, err = pcall(dist.init, {rank = 0, world_size = 1, backend = "nccl"})
        t:assert(not ok and err:find("needs a CUDA build", 1, true), tostring(err))
    end
    dist.init{rank = 0, world_size = 1, master_port = dist.free_port()}
    t:assert(dist.is_initialized() and dist.rank() == 0 and dist.world_size() == 1 and dist.local_rank() == 0)
    ok, err = pcall(dist.init, {rank = 0, world_size = 1})
    t:assert(not ok and err:find("already initialised", 1, true), tostring(err))
    local m = ml.tensor({{1, 2}, {3, 4}})
    ok, err = pcall(dist.all_reduce, m:t())
    t:assert(not ok and err:find("dist.all_reduce (rank 0 of 1)", 1, true) and err:find("contiguous", 1, true), tostring(err))
    ok, err = pcall(dist.all_reduce, m, {op = "prod"})
    t:assert(not ok and err:find("op must be 'sum', 'avg' or 'max'", 1, true), tostring(err))
    ok, err = pcall(dist.all_reduce, ml.tensor({1, 2}, {dtype = "i64"}), {op = "avg"})
    t:assert(not ok and err:find("avg needs a floating-point tensor", 1, true), tostring(err))
    ok, err = pcall(dist.broadcast, m, 1)
    t:assert(not ok and err:find("root must be in 0..0", 1, true), tostring(err))
    ok, err = pcall(dist.all_gather, ml.scalar and ml.scalar(1) or ml.tensor(1))
    t:assert(not ok and err:find("all_gather", 1, true), tostring(err))
    -- in-place like every other write: refused on a leaf requiring grad in
    -- grad mode (broadcast checked nothing at world size 1), fine under no_grad
    local leaf = ml.ones({2}, {requires_grad = true})
    for _, f in ipairs {function() dist.all_reduce(leaf) end, function() dist.broadcast(leaf, 0) end} do
        ok, err = pcall(f)
        t:assert(not ok and err:find("(rank 0 of 1): in-place op on a leaf tensor that requires grad", 1, true),
                 tostring(err))
    end
    t:assertNoError(function() ml.no_grad(function() dist.all_reduce(leaf); dist.broadcast(leaf, 0) end) end)
    -- the group is still usable after argument errors; world size 1 is the identity
    dist.all_reduce(m, {op = "avg"})
    t:assertEq(m:totable(), {{1, 2}, {3, 4}})
    t:assertEq(dist.all_gather(m):totable(), {{1, 2}, {3, 4}})
    t:assertEq(dist.all_reduce_number(2.5, "max"), 2.5)
    t:assertEq(dist.broadcast_string("x", 0), "x")
    dist.barrier()
    dist.destroy()
    t:assert(not dist.is_initialized())
    dist.destroy()   -- twice is fine
end

return tests
