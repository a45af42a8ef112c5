-- moonlit.ddp — DistributedDataParallel for a training loop's parameters
-- (ml.train.ddp): every rank holds the same weights and, after each step's
-- backward, the same gradients, averaged over the ranks.
--
--   local ddp = ml.train.ddp(params, {bucket_mb = 25, dtype = "f32" | "bf16"})
--   loss:backward()          -- buckets start their all-reduce as they fill
--   ddp:finish()             -- before clip_grad_norm and opt:step()
--   ddp:set_sync(false)      -- gradient accumulation: micro-steps that do not reduce
--   ddp:no_sync(fn, ...)     -- the same around one call
--   ddp:close()              -- drops the grad-ready callback
--
-- At creation every parameter is broadcast from rank 0.  Parameters that
-- require grad are packed, in reverse order (backward reaches the last
-- layers first), into buckets of about bucket_mb MiB, one per device and
-- parameter dtype.  Each bucket owns one flat buffer (allocated once);
-- when the grad-ready callback has seen every parameter of a bucket, its
-- gradients are copied in and one averaged all-reduce is launched
-- asynchronously while backward goes on.  The first reducing step records
-- the order gradients arrive in; all ranks then adopt rank 0's and the
-- buckets are packed again in that order once, before the next step
-- launches anything (PyTorch's DDP rebuilds its buckets the same way).
--
-- After finish(), each gradient is a view of its bucket's buffer (as
-- PyTorch's gradient_as_bucket_view): nothing is copied back, and a
-- gradient that is still that view next step (accumulated in place, no
-- zero_grad in between) is not copied in either.  So a p.grad kept past
-- the next backward is overwritten by it; clone it to keep it.  A bf16
-- bucket is converted back to the parameters' dtype once per bucket and
-- the gradients are views of that.
--
-- Buckets are always launched in order (bucket i only after bucket i-1):
-- collectives pair up by order across ranks, and the order in which
-- gradients become ready may differ between ranks.  A parameter that gets
-- no gradient this step (a branch the batch did not use, or a rank with no
-- data left) keeps its bucket, and those after it, waiting until finish(),
-- which launches all that is left with zeros for the missing gradients.
-- Its gradient is then the average over all ranks, zeros counted, which
-- is the gradient of the mean loss over the global batch; a parameter no
-- rank had a gradient for keeps grad = nil, as it would in one process.
-- Which gradients were missing goes over the host channel, not in the
-- buckets: finish() adds one number over the ranks (how many gradients
-- were missing anywhere) and, only when that is not zero, exchanges the
-- lists.  Frozen parameters (requires_grad false) are broadcast but never
-- bucketed, so a frozen text encoder needs no flag.
local core = require "moonlit.core"
local options = require "moonlit.options"

local M = {}

local DDP = {}
DDP.__index = DDP

local BYTES = {f32 = 4, bf16 = 2}

function M.new(params, o)
    o = options.check_options("ml.train.ddp", o, {"bucket_mb", "dtype", "dist"})
    if type(params) ~= "table" or #params == 0 then error("ml.train.ddp: params must be a non-empty list of tensors", 2) end
    local dtype = o.dtype or "f32"
    if not BYTES[dtype] then error("ml.train.ddp: dtype must be \"f32\" or \"bf16\" (got " .. tostring(dtype) .. ")", 2) end
    local bucket_mb = o.bucket_mb or 25
    if type(bucket_mb) ~= "number" or not (bucket_mb > 0) then
        error("ml.train.ddp: bucket_mb must be a number > 0 (got " .. tostring(bucket_mb) .. ")", 2)
    end
    local dist = o.dist or require "moonlit.dist"
    if not dist.is_initialized() then error("ml.train.ddp: ml.dist is not initialized (run under ml.train.run)", 2) end
    local self = setmetatable({dist = dist, dtype = dtype, sync = true, buckets = {}, of_key = {},
                               world_size = dist.world_size(), rank = dist.rank()}, DDP)
    core.no_grad(function()
        for i, p in ipairs(params) do
            if not core.is_tensor(p) then error("ml.train.ddp: params[" .. i .. "] is not a tensor", 0) end
            dist.broadcast(p, 0)
        end
    end)
    self.limit = bucket_mb * 2 ^ 20
    -- the trained parameters, numbered in reverse order: the first buckets'
    -- order, until the first step has shown the order gradients come in
    self.trained, self.number_of = {}, {}
    for i = #params, 1, -1 do
        local p = params[i]
        if p.requires_grad then
            self.trained[#self.trained + 1] = p
            self.number_of[core.tensor_key(p)] = #self.trained
        end
    end
    local order = {}
    for k = 1, #self.trained do order[k] = k end
    self:_build(order)
    self.recording, self.seen, self.seen_set = true, {}, {}
    self:_reset()
    core.set_grad_ready_callback(function(key) self:_on_ready(key) end)
    return self
end

-- (Re)packs the buckets with the parameters in `order` (numbers into
-- self.trained).  A gradient that is a view of an old bucket is copied into
-- its new segment first, and the old buffers are released at once.
function DDP:_build(order)
    local old = self.buckets
    local buckets, of_key, cur = {}, {}, nil
    for n, k in ipairs(order) do
        local p = self.trained[k]
        local bytes = p:numel() * BYTES[self.dtype]
        local device = tostring(p.device)
        if not cur or (cur.bytes > 0 and cur.bytes + bytes > self.limit) or cur.device ~= device
           or cur.param_dtype ~= p.dtype then
            cur = {params = {}, numbers = {}, offsets = {}, numel = 0, bytes = 0, device = device, param_dtype = p.dtype,
                   first = n - 1}
            buckets[#buckets + 1] = cur
        end
        cur.params[#cur.params + 1] = p
        cur.numbers[#cur.params] = k
        cur.offsets[#cur.params] = cur.numel
        cur.numel = cur.numel + p:numel()
        cur.bytes = cur.bytes + bytes
        of_key[core.tensor_key(p)] = {cur, #cur.params}
    end
    for _, b in ipairs(buckets) do
        b.flat = core.zeros({b.numel}, {dtype = self.dtype, device = b.device})
        b.convert = b.param_dtype ~= self.dtype
        -- each parameter's segment, shaped like it: the gradient it gets back
        b.segs, b.seg_keys = {}, {}
        for j, p in ipairs(b.params) do
            b.segs[j] = b.flat:narrow(1, b.offsets[j] + 1, p:numel()):view(p:size())
            b.seg_keys[j] = core.tensor_key(b.segs[j])
        end
    end
    if old then
        core.no_grad(function()
            for _, ob in ipairs(old) do
                for j, p in ipairs(ob.params) do
                    if p.grad and core.tensor_key(p.grad) == ob.seg_keys[j] then
                        local e = of_key[core.tensor_key(p)]
                        local seg = e[1].segs[e[2]]
                        seg:copy_(p.grad)
                        p.grad = seg
                    end
                    ob.segs[j]:free()
                end
                ob.flat:free()
            end
        end)
    end
    self.buckets, self.of_key = buckets, of_key
end

-- After the first reducing step: every rank adopts rank 0's order of
-- gradient arrival (parameters that never arrived last), so that the
-- first bucket is the first to fill and buckets launch during backward.
-- Parameter order and arrival order can differ a lot: parameters(unet,
-- text_encoder) lists the text encoder last, and reversed it would come
-- first, but its gradients arrive after the whole UNet's.
function DDP:_agree_on_order()
    self.recording = false
    local mine = {}
    for _, k in ipairs(self.seen) do mine[#mine + 1] = k end
    local got = {}
    for _, k in ipairs(mine) do got[k] = true end
    for k = 1, #self.trained do if not got[k] then mine[#mine + 1] = k end end
    local order = mine
    if self.world_size > 1 then
        local text = self.dist.broadcast_string(self.rank == 0 and table.concat(mine, ",") or nil, 0)
        order = {}
        for k in text:gmatch("%d+") do order[#order + 1] = tonumber(k) end
    end
    self.seen, self.seen_set = nil, nil
    local same = true
    local n = 0
    for _, b in ipairs(self.buckets) do
        for j = 1, #b.params do
            n = n + 1
            if b.numbers[j] ~= order[n] then same = false end
        end
    end
    if not same then self.pending_order = order end
end

-- Before a step launches anything: the agreed order, if it is new.
function DDP:_rebuild_if_pending()
    if self.pending_order then
        local order = self.pending_order
        self.pending_order = nil
        self:_build(order)
        self:_reset()
    end
end

function DDP:_reset()
    for _, b in ipairs(self.buckets) do b.ready, b.nready, b.work, b.missing = {}, 0, nil, {} end
    self.next_launch = 1
end

function DDP:_launch(b)
    for j, p in ipairs(b.params) do
        local g = p.grad
        if not g then
            b.segs[j]:zero_()
            b.missing[#b.missing + 1] = b.first + j
        elseif core.tensor_key(g) ~= b.seg_keys[j] then
            b.segs[j]:copy_(g)   -- converts to the bucket's dtype
        end
    end
    b.work = self.dist.all_reduce(b.flat, {op = "avg", async = true})
end

-- Launches, in order, every bucket from next_launch on that is complete.
function DDP:_launch_ready(all)
    while self.next_launch <= #self.buckets do
        local b = self.buckets[self.next_launch]
        if not all and b.nready < #b.params then break end
        self:_launch(b)
        self.next_launch = self.next_launch + 1
    end
end

function DDP:_on_ready(key)
    if not self.sync then return end
    self:_rebuild_if_pending()
    if self.recording then
        local k = self.number_of[key]
        if k and not self.seen_set[k] then
            self.seen_set[k] = true
            self.seen[#self.seen + 1] = k
        end
    end
    local e = self.of_key[key]
    if not e then return end
    local b, j = e[1], e[2]
    if not b.ready[j] then
        b.ready[j] = true
        b.nready = b.nready + 1
        if b.nready == #b.params then self:_launch_ready(false) end
    end
end

-- The parameters (numbers in bucket order) that no rank had a gradient for.
function DDP:_absent_everywhere()
    local mine = {}
    for _, b in ipairs(self.buckets) do
        for _, k in ipairs(b.missing) do mine[#mine + 1] = k end
    end
    if self.world_size == 1 then
        local absent = {}
        for _, k in ipairs(mine) do absent[k] = true end
        return absent
    end
    if self.dist.all_reduce_number(#mine, "sum") == 0 then return nil end
    local missing_on = {}
    local list = table.concat(mine, ",")
    for r = 0, self.world_size - 1 do
        local got = self.dist.broadcast_string(r == self.rank and list or nil, r)
        for k in got:gmatch("%d+") do
            k = tonumber(k)
            missing_on[k] = (missing_on[k] or 0) + 1
        end
    end
    local absent = {}
    for k, n in pairs(missing_on) do
        if n == self.world_size then absent[k] = true end
    end
    return absent
end

-- Waits for every bucket and hands the averaged gradients back as views of
-- the buckets.  Without sync (an accumulation micro-step) it does nothing.
function DDP:finish()
    local err = core.grad_ready_error()
    if err then self:_reset(); error("ml.train.ddp: " .. err, 2) end
    if not self.sync then return end
    self:_rebuild_if_pending()   -- a rank that took no backward this step
    self:_launch_ready(true)
    local absent = self:_absent_everywhere()
    core.no_grad(function()
        for _, b in ipairs(self.buckets) do
            b.work:wait()
            local src, keys = b.segs, b.seg_keys
            if b.convert then
                local full = b.flat:to(b.param_dtype)
                src, keys = {}, {}
                for j, p in ipairs(b.params) do src[j] = full:narrow(1, b.offsets[j] + 1, p:numel()):view(p:size()) end
            end
            for j, p in ipairs(b.params) do
                if absent and absent[b.first + j] then
                    p.grad = nil
                elseif keys[j] == nil or p.grad == nil or core.tensor_key(p.grad) ~= keys[j] then
                    p.grad = src[j]
                end
            end
        end
    end)
    if self.recording then self:_agree_on_order() end
    self:_reset()
end

function DDP:set_sync(on)
    self.sync = on and true or false
    if self.sync then self:_reset() end
end

function DDP:no_sync(fn, ...)
    local prev = self.sync
    self.sync = false
    local res = table.pack(pcall(fn, ...))
    self.sync = prev
    if not res[1] then error(res[2], 0) end
    return table.unpack(res, 2, res.n)
end

function DDP:close()
    core.set_grad_ready_callback(nil)
    self.buckets, self.of_key, self.pending_order = {}, {}, nil
end

return M
