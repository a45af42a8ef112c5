-- moonlit.dist — collectives between the processes of a data-parallel run
-- (ml.dist).  One process group per process:
--
--   dist.init{rank = r, world_size = n, local_rank = l, backend = "cpu" | "nccl",
--             master_addr = "127.0.0.1", master_port = 29500, timeout_s = 300}
--   dist.all_reduce(t, {op = "sum" | "avg" | "max", async = false})   -- in place
--   dist.broadcast(t, root)                 -- in place, root 0-based
--   dist.all_gather(t) -> [world_size * t:size(1), ...]
--   dist.reduce_scatter(t, {op = "sum"}) -> this rank's chunk of dim 1
--   dist.barrier()
--   dist.all_reduce_number(x, op) -> number
--   dist.broadcast_string(s, root) -> string
--   dist.destroy()
--
-- The C side (host/dist.c, kernels/cuda/nccl.cu) does the work; this file
-- checks the Lua-level arguments so a mistake is named before any rank
-- starts talking.  docs/dist.md has the model, the timeouts and the errors.
local core = require "moonlit.core"

local dist = {}

-- The default for every blocking wait, in seconds.
dist.DEFAULT_TIMEOUT_S = 300

local function opts_table(what, opts)
    if opts == nil then return {} end
    if type(opts) ~= "table" then
        error(string.format("dist.%s: options must be a table (got %s)", what, type(opts)), 3)
    end
    return opts
end

-- An op given as "sum" or as {op = "sum", ...}.
local function op_of(what, opts)
    if type(opts) == "string" then return opts end
    local o = opts_table(what, opts).op or "sum"
    if o ~= "sum" and o ~= "avg" and o ~= "max" then
        error(string.format("dist.%s: op must be 'sum', 'avg' or 'max' (got %s)", what, tostring(o)), 3)
    end
    return o
end

local function root_of(what, root)
    root = root or 0
    if math.type(root) ~= "integer" and not (type(root) == "number" and math.tointeger(root)) then
        error(string.format("dist.%s: root must be an integer rank (got %s)", what, tostring(root)), 3)
    end
    return math.tointeger(root)
end

function dist.init(opts)
    opts = opts_table("init", opts)
    for k in pairs(opts) do
        if not ({rank = 1, world_size = 1, local_rank = 1, backend = 1, master_addr = 1, master_port = 1,
                 timeout_s = 1})[k] then
            error(string.format("dist.init: unknown option '%s'", tostring(k)), 2)
        end
    end
    core.dist_init(opts)
end

dist.is_initialized = core.dist_is_initialized
dist.rank = core.dist_rank
dist.world_size = core.dist_world_size
dist.local_rank = core.dist_local_rank
dist.backend = core.dist_backend
dist.barrier = core.dist_barrier
dist.destroy = core.dist_destroy
-- A TCP port that is free right now (another process may take it before
-- rank 0 listens: for tests and single-machine launches).
dist.free_port = core.dist_free_port

-- In place; returns t, or with async = true a work object w: w:wait()
-- orders later compute after the collective (on the GPU; the host does not
-- block) and returns t, w:done() says whether it has finished.
function dist.all_reduce(t, opts)
    local op = op_of("all_reduce", opts)
    local async = type(opts) == "table" and opts.async or false
    return core.dist_all_reduce(t, op, async and true or false)
end

function dist.broadcast(t, root)
    return core.dist_broadcast(t, root_of("broadcast", root))
end

function dist.all_gather(t)
    return core.dist_all_gather(t)
end

function dist.reduce_scatter(t, opts)
    return core.dist_reduce_scatter(t, op_of("reduce_scatter", opts))
end

function dist.all_reduce_number(x, op)
    if type(x) ~= "number" then
        error(string.format("dist.all_reduce_number: expects a number (got %s)", type(x)), 2)
    end
    return core.dist_all_reduce_number(x, op_of("all_reduce_number", op or "sum"))
end

-- root's string on every rank (the other ranks' argument is ignored; nil is fine).
function dist.broadcast_string(s, root)
    if s ~= nil and type(s) ~= "string" then
        error(string.format("dist.broadcast_string: expects a string (got %s)", type(s)), 2)
    end
    return core.dist_broadcast_string(s, root_of("broadcast_string", root))
end

return dist
