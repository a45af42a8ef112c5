-- moonlit.nn (ml.nn) — modules that own parameters, PyTorch style.
--
-- A module keeps parameters, buffers and children in registration order, so
-- named_parameters() and state_dict() produce the dotted names PyTorch
-- would ("down_blocks.0.resnets.1.conv1.weight"; list children count from 0
-- exactly as torch.nn.ModuleList does, since the names must match files).
-- Images are NHWC; Conv2d keeps its weight as [O, kh, kw, I]; state_dict
-- and load_state_dict convert to/from PyTorch's [O, I, kh, kw] when asked
-- with {layout = "torch"}.
local core = require "moonlit.core"
local F = require "moonlit.functional"

local nn = {}

-- ---- Module ---------------------------------------------------------------

local Module = {}
Module.__index = Module
Module.__name = "Module"
nn.Module = Module

local function class_call(cls, ...)
    local self = setmetatable({}, cls)
    Module._init(self)
    if cls.init then cls.init(self, ...) end
    return self
end

-- Define a module class: local Foo = nn.Module:extend("Foo"); function Foo:init(...) end;
-- function Foo:forward(...) end.  Foo(...) constructs.
function Module:extend(name)
    local cls = {}
    for k, v in pairs(self) do if k:sub(1, 2) == "__" then cls[k] = v end end
    cls.__index = cls
    cls.__name = name
    cls.__call = Module.__call
    cls.super = self
    return setmetatable(cls, {__index = self, __call = class_call})
end

function Module:_init()
    rawset(self, "_param_names", {})
    rawset(self, "_params", {})
    rawset(self, "_buffer_names", {})
    rawset(self, "_buffers", {})
    rawset(self, "_child_names", {})
    rawset(self, "_children", {})
    rawset(self, "training", true)
end

-- While a profile runs (ml.profile), the kernels a layer calls are filed
-- under its class name: the innermost layer's.
local profiling, profile_scope = core.profiling, core.profile_scope
local function leave_scope(outer, ...)
    profile_scope(outer)
    return ...
end
local function call_forward(self, ...)
    if not profiling() then return self:forward(...) end
    return leave_scope(profile_scope(self.__name), self:forward(...))
end
function Module.__call(self, ...)
    -- a layer marked by enable_gradient_checkpointing, while training with grad on
    if rawget(self, "_checkpoint") and self.training and core.is_grad_enabled() then
        return nn.checkpoint(call_forward, self, ...)
    end
    return call_forward(self, ...)
end

function Module:forward() error(self.__name .. ": forward is not implemented", 2) end

function Module:register_parameter(name, t)
    if t ~= nil then t.requires_grad = true end
    nn._mark_parameter(t)
    if self._params[name] == nil then self._param_names[#self._param_names + 1] = name end
    self._params[name] = t
    rawset(self, name, t)
    return t
end

function Module:register_buffer(name, t)
    if self._buffers[name] == nil then self._buffer_names[#self._buffer_names + 1] = name end
    self._buffers[name] = t
    rawset(self, name, t)
    return t
end

function Module:add_module(name, m)
    name = tostring(name)
    if self._children[name] == nil then self._child_names[#self._child_names + 1] = name end
    self._children[name] = m
    rawset(self, name, m)
    return m
end

function Module:children()
    local out = {}
    for _, n in ipairs(self._child_names) do out[#out + 1] = self._children[n] end
    return out
end

function Module:named_children()
    local out = {}
    for _, n in ipairs(self._child_names) do out[#out + 1] = {n, self._children[n]} end
    return out
end

-- List of {name, tensor} in PyTorch's order: own parameters, then children.
function Module:named_parameters(prefix, out)
    out = out or {}
    prefix = prefix or ""
    for _, n in ipairs(self._param_names) do
        local p = self._params[n]
        if p ~= nil then out[#out + 1] = {prefix .. n, p} end
    end
    for _, c in ipairs(self._child_names) do
        self._children[c]:named_parameters(prefix .. c .. ".", out)
    end
    return out
end

function Module:parameters()
    local out = {}
    for _, np in ipairs(self:named_parameters()) do out[#out + 1] = np[2] end
    return out
end

function Module:named_buffers(prefix, out)
    out = out or {}
    prefix = prefix or ""
    for _, n in ipairs(self._buffer_names) do
        local b = self._buffers[n]
        if b ~= nil then out[#out + 1] = {prefix .. n, b} end
    end
    for _, c in ipairs(self._child_names) do self._children[c]:named_buffers(prefix .. c .. ".", out) end
    return out
end

function Module:named_modules(prefix, out)
    out = out or {}
    prefix = prefix or ""
    out[#out + 1] = {prefix, self}
    for _, c in ipairs(self._child_names) do
        self._children[c]:named_modules(prefix == "" and c or prefix .. "." .. c, out)
    end
    return out
end

function Module:num_parameters()
    local n = 0
    for _, p in ipairs(self:parameters()) do n = n + p:numel() end
    return n
end

function Module:train(on)
    if on == nil then on = true end
    for _, nm in ipairs(self:named_modules()) do rawset(nm[2], "training", on) end
    return self
end

function Module:eval() return self:train(false) end

function Module:zero_grad()
    for _, p in ipairs(self:parameters()) do p.grad = nil end
end

function Module:requires_grad_(on)
    if on == nil then on = true end
    for _, p in ipairs(self:parameters()) do p.requires_grad = on end
    return self
end

-- Replace every parameter and buffer by its conversion (device and/or
-- dtype, as t:to accepts).  Build optimizers after moving a model.
function Module:to(...)
    local args = table.pack(...)
    for _, nm in ipairs(self:named_modules()) do
        local m = nm[2]
        for _, n in ipairs(m._param_names) do
            local p = m._params[n]
            if p ~= nil then
                local q = core.no_grad(function() return p:to(table.unpack(args, 1, args.n)) end)
                if q ~= p then
                    q = q:detach()
                    q.requires_grad = p.requires_grad
                    nn._mark_parameter(q)
                    m._params[n] = q
                    rawset(m, n, q)
                end
            end
        end
        for _, n in ipairs(m._buffer_names) do
            local b = m._buffers[n]
            if b ~= nil then
                local q = b:to(table.unpack(args, 1, args.n))
                m._buffers[n] = q
                rawset(m, n, q)
            end
        end
    end
    return self
end

-- Module types whose 4-D weight is stored [O, kh, kw, I] here but
-- [O, I, kh, kw] in PyTorch files.
local function to_torch_layout(t) return t:permute(1, 4, 2, 3):contiguous() end

local function conv_weight_names(self)
    local set = {}
    for _, nm in ipairs(self:named_modules()) do
        local m = nm[2]
        if m._nhwc_weight then
            set[(nm[1] == "" and "" or nm[1] .. ".") .. "weight"] = true
        end
    end
    return set
end

-- state_dict{layout = "torch"|"nhwc", keep_vars = false} -> name -> tensor
-- (plus an ordered list of names in field `_order`).
function Module:state_dict(opts)
    opts = opts or {}
    local torch_layout = opts.layout == "torch"
    local convs = torch_layout and conv_weight_names(self) or {}
    local sd, order = {}, {}
    local function add(n, t)
        if convs[n] then t = to_torch_layout(t) end
        if not opts.keep_vars then t = t:detach() end
        sd[n] = t
        order[#order + 1] = n
    end
    for _, np in ipairs(self:named_parameters()) do add(np[1], np[2]) end
    for _, nb in ipairs(self:named_buffers()) do add(nb[1], nb[2]) end
    return setmetatable(sd, {__index = {_order = order}})
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

-- load_state_dict(sd, {strict = true, layout = "torch"|"nhwc", assign = false, owned = false})
-- Strict mode reports every missing, unexpected and mis-shaped tensor by
-- name in one error, before anything is changed.  By default values are
-- copied into the existing tensors (converting dtype/device); with
-- assign = true each parameter is replaced by the given tensor converted to
-- the parameter's dtype, device and layout, or by a copy of it when no
-- conversion was needed: parameters never share memory with the caller's
-- tensors.  owned = true says the caller hands the tensors over (nothing
-- else uses them, as with ml_st_read's results): those needing no
-- conversion are then taken without a copy (how large models load).
function Module:load_state_dict(sd, opts)
    opts = opts or {}
    local strict = opts.strict ~= false
    local convs = opts.layout == "torch" and conv_weight_names(self) or {}
    local targets, owners = {}, {}
    for _, nm in ipairs(self:named_modules()) do
        local prefix = nm[1] == "" and "" or nm[1] .. "."
        local m = nm[2]
        for _, n in ipairs(m._param_names) do
            if m._params[n] ~= nil then targets[prefix .. n] = m._params[n]; owners[prefix .. n] = {m, n, "_params"} end
        end
        for _, n in ipairs(m._buffer_names) do
            if m._buffers[n] ~= nil then targets[prefix .. n] = m._buffers[n]; owners[prefix .. n] = {m, n, "_buffers"} end
        end
    end
    local missing, unexpected, mismatched, pairs_ok = {}, {}, {}, {}
    for n, dst in pairs(targets) do
        local src = sd[n]
        if src == nil then missing[#missing + 1] = n
        else
            local want = dst:size()
            if convs[n] then want = {want[1], want[4], want[2], want[3]} end
            if shape_str(want) ~= shape_str(src:size()) then
                mismatched[#mismatched + 1] = string.format("%s: checkpoint %s, model %s", n,
                    shape_str(src:size()), shape_str(want))
            else
                pairs_ok[n] = src
            end
        end
    end
    for n in pairs(sd) do
        if type(n) == "string" and targets[n] == nil then unexpected[#unexpected + 1] = n end
    end
    table.sort(missing); table.sort(unexpected); table.sort(mismatched)
    local problems = {}
    if #mismatched > 0 then problems[#problems + 1] = "size mismatch:\n    " .. table.concat(mismatched, "\n    ") end
    if strict and #missing > 0 then problems[#problems + 1] = "missing keys:\n    " .. table.concat(missing, "\n    ") end
    if strict and #unexpected > 0 then problems[#problems + 1] = "unexpected keys:\n    " .. table.concat(unexpected, "\n    ") end
    if #problems > 0 then
        error("load_state_dict (" .. (self.__name or "Module") .. "): " .. table.concat(problems, "\n"), 2)
    end
    core.no_grad(function()
        for n, src in pairs(pairs_ok) do
            local dst = targets[n]
            -- Whether a conversion below makes a new tensor.  The layout
            -- change copies only when the permuted view is not already
            -- contiguous (it is for 1x1 convs), so it cannot be assumed.
            local fresh = src.dtype ~= dst.dtype or src.device ~= dst.device
            if convs[n] then
                local p = src:permute(1, 3, 4, 2)
                fresh = fresh or not p:is_contiguous()
                src = p:contiguous()
            end
            if opts.assign then
                -- The parameter must own its memory: the caller's tensor may
                -- be another model's parameter or a view of a mapped file.
                -- Only tensors handed over (opts.owned) are taken as they are.
                local q = src:to{dtype = dst.dtype, device = dst.device}
                if not fresh and not opts.owned then q = q:clone() end
                q = q:detach()
                q.requires_grad = dst.requires_grad
                local m, name, field = table.unpack(owners[n])
                if field == "_params" then nn._mark_parameter(q) end
                m[field][name] = q
                rawset(m, name, q)
            else
                dst:copy_(src)
            end
        end
    end)
    return {missing = missing, unexpected = unexpected}
end

function Module:__tostring()
    local lines = {(self.__name or "Module") .. "("}
    for _, c in ipairs(self._child_names) do
        local s = tostring(self._children[c]):gsub("\n", "\n  ")
        lines[#lines + 1] = "  (" .. c .. "): " .. s
    end
    if #lines == 1 then return (self.__name or "Module") .. "(" .. (self.extra_repr and self:extra_repr() or "") .. ")" end
    lines[#lines + 1] = ")"
    return table.concat(lines, "\n")
end

-- ---- initialisation helpers (PyTorch defaults) ----------------------------

nn.init = {}
-- While nn.no_init(fn) runs, initialisers leave tensors uninitialised:
-- models about to be loaded from a file skip the (slow) random fill.
local skip_init = false
function nn.no_init(fn, ...)
    local prev = skip_init
    skip_init = true
    local res = table.pack(pcall(fn, ...))
    skip_init = prev
    if not res[1] then error(res[2], 0) end
    return table.unpack(res, 2, res.n)
end
function nn.init.uniform_(t, lo, hi)
    if skip_init then return t end
    return core.no_grad(function() return core.uniform_(t, lo, hi) end)
end
function nn.init.normal_(t, mean, std)
    if skip_init then return t end
    return core.no_grad(function() return core.normal_(t, mean or 0, std or 1) end)
end
function nn.init.zeros_(t) return core.no_grad(function() return t:zero_() end) end
function nn.init.ones_(t) return core.no_grad(function() return t:fill_(1) end) end
-- kaiming_uniform_(a = sqrt(5)) as Linear/Conv2d use reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
local function default_uniform(t, fan_in)
    local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
    return nn.init.uniform_(t, -bound, bound)
end

local function opt(o, k, d) if o == nil or o[k] == nil then return d end return o[k] end

-- ---- mixed precision --------------------------------------------------------
-- nn.autocast(dtype, fn, ...) runs fn with every layer computing in dtype
-- (e.g. "bf16"): weights, biases and inputs are converted at each layer,
-- while the parameters themselves stay as they are (f32 master weights).
-- The conversions are recorded by autograd, so gradients arrive in the
-- parameters' own dtype.  This is the bf16-mixed recipe.
--
-- The shadow cache.  Converting every weight at every layer call costs a
-- copy kernel per weight per forward (SD 1.4's step: ~1,000 of them), for
-- values that change once per optimizer step, or never (frozen weights:
-- LoRA's base layers, the VAE).  So nn.cast keeps, per module parameter
-- and compute dtype, a shadow: the parameter converted, with the storage
-- version (core.storage_version: every in-place write through any view
-- bumps it) it was converted from.  While the version matches, cast hands
-- out the shadow through core.cast_as, which copies nothing and records
-- the same conversion node p:to(dtype) records (so p.grad gets the
-- gradient in p's dtype, as before).  When it does not (p:add_, copy_,
-- load_state_dict, SGD), cast converts afresh into a NEW tensor and keeps
-- that as the shadow: the old shadow's memory may be saved by a graph not
-- yet backwarded, which must keep the values it saved.  AdamW writes the
-- new weight into the shadow as it steps (optim.lua), so the next forward
-- converts nothing.  That write is in place: a graph recorded before the
-- step that saved the shadow (linear and conv save their weight) cannot be
-- backwarded after it; backward refuses, naming the op, as it does for any
-- saved tensor written in place (the ordinary loop, forward, backward,
-- step, never meets this).
--
-- Without the cache (nn.autocast_cache(false)), each layer converts its
-- weights at every call; the node that saves such a conversion keeps the
-- parameter instead and converts it again in backward
-- (core.recompute_casts, on by default), so those copies are not held from
-- forward to backward either; a parameter written in place between forward
-- and backward is then refused by backward, as a shadow written in place is.
--
-- Which tensors: the parameters of modules (registered with
-- register_parameter, or put in place by Module:to or load_state_dict),
-- trainable or frozen.  Inputs and other tensors are converted each call.
-- Memory: a shadow lives as long as its parameter (weak keys), 2 bytes per
-- f32 element for bf16 or f16; nn.autocast_cache_clear() drops them all.
local compute_dtype = nil
function nn.autocast(dtype, fn, ...)
    local prev = compute_dtype
    compute_dtype = dtype
    local res = table.pack(pcall(fn, ...))
    compute_dtype = prev
    if not res[1] then error(res[2], 0) end
    return table.unpack(res, 2, res.n)
end
function nn.compute_dtype() return compute_dtype end

local FLOAT_DTYPES = {f32 = 4, f64 = 8, f16 = 2, bf16 = 2}   -- the floating dtypes, with their element bytes
local is_parameter = setmetatable({}, {__mode = "k"})   -- tensor -> true: a module's parameter
local shadows = setmetatable({}, {__mode = "k"})        -- parameter -> {[dtype] = {tensor =, version =}}
local cache_enabled = true
local storage_version, cast_as, no_grad = core.storage_version, core.cast_as, core.no_grad
local function convert(p, dtype) return p:to(dtype) end

-- Marks t (a tensor or nil) as a module parameter: nn.cast may shadow it.
function nn._mark_parameter(t)
    if t ~= nil then is_parameter[t] = true end
    return t
end

local function cast_parameter(p, dtype)
    local per = shadows[p]
    local entry = per and per[dtype]
    local version = storage_version(p)
    if entry and entry.version == version then return cast_as(p, entry.tensor) end
    -- Converted outside the graph and handed out through cast_as like a
    -- kept shadow, so every use of the cache records the same node: a plain
    -- recorded conversion of a parameter is what autograd recomputes in
    -- backward instead of saving (core.recompute_casts), which would cost
    -- a conversion for memory the cache keeps anyway.
    local c = no_grad(convert, p, dtype)
    if not per then per = {}; shadows[p] = per end
    per[dtype] = {tensor = c, version = version}
    return cast_as(p, c)
end

-- t in the autocast dtype (t itself outside autocast, or when nil / not float)
function nn.cast(t)
    local dtype = compute_dtype
    if dtype and t ~= nil and t.dtype ~= dtype and FLOAT_DTYPES[t.dtype] then
        if cache_enabled and is_parameter[t] then return cast_parameter(t, dtype) end
        return t:to(dtype)
    end
    return t
end

-- nn.autocast_cache(on): turn the shadow cache on or off (on by default);
-- returns the previous setting.  Off, every cast converts (the shadows
-- already made stay until autocast_cache_clear or their parameter goes).
function nn.autocast_cache(on)
    local prev = cache_enabled
    if on ~= nil then cache_enabled = on and true or false end
    return prev
end

-- Drops every shadow; returns how many and their bytes.  The next cast of
-- each parameter converts it again.
function nn.autocast_cache_clear()
    local count, bytes = 0, 0
    for p, per in pairs(shadows) do
        for _, entry in pairs(per) do
            -- A parameter already collected (its finalizer ran) stays a key
            -- until the next collection, its shadow finalized with it.
            if not entry.tensor:is_freed() then
                count = count + 1
                bytes = bytes + entry.tensor:numel() * FLOAT_DTYPES[entry.tensor.dtype]
            end
        end
        shadows[p] = nil
    end
    return count, bytes
end

-- The shadow AdamW refreshes for parameter p: its entry ({tensor =,
-- version =}; with shadows in several dtypes, the first of bf16, f16,
-- f32, f64), or nil.  After writing the new weight into entry.tensor the
-- optimizer sets entry.version to p's new storage version; the other
-- dtypes' shadows are left stale and convert again on their next use.
local SHADOW_ORDER = {"bf16", "f16", "f32", "f64"}
function nn._autocast_shadow(p)
    local per = shadows[p]
    if not per then return nil end
    for _, dt in ipairs(SHADOW_ORDER) do
        if per[dt] then return per[dt] end
    end
    return nil
end
local cast = nn.cast

-- f(cast(x), cast(w), cast(b), ...), each converted copy freed once f
-- returns: a conversion made afresh (activations, parameters outside the
-- shadow cache) goes back to the allocator at once, not at the next
-- collection; what f's backward needs, its graph keeps by references of its
-- own.  (A cached shadow comes as a box of its own: freeing it leaves the
-- cache's.)
local function free_cast(c, orig)
    if c ~= nil and not rawequal(c, orig) then c:free() end
end
local function with_cast(f, x, w, b, ...)
    local xc, wc, bc = cast(x), cast(w), cast(b)
    local y = f(xc, wc, bc, ...)
    free_cast(xc, x); free_cast(wc, w); free_cast(bc, b)
    return y
end
nn._with_cast = with_cast

-- ---- gradient checkpointing ---------------------------------------------
-- nn.checkpoint(fn, ...) -> fn(...), a single tensor, computed without
-- keeping fn's intermediate activations: fn runs under no_grad, and the
-- backward of the result runs it again with grad on (from the same inputs,
-- random state and autocast dtype) and backpropagates through that second
-- run, which gives fn's parameters their gradients and the inputs theirs.
-- Memory: only the inputs are kept, for one extra forward of fn in backward
-- (torch.utils.checkpoint's reentrant form).  fn must be deterministic given
-- its inputs and the random state (dropout draws the same numbers again),
-- and return one tensor.  When no tensor argument requires grad, fn runs
-- normally: a result whose only path to the parameters is inside fn would
-- otherwise get no gradient (PyTorch's reentrant checkpoint warns of it).
function nn.checkpoint(fn, ...)
    local args = table.pack(...)
    if not core.is_grad_enabled() then return fn(...) end
    local wants = {}
    local any = false
    for i = 1, args.n do
        local a = args[i]
        wants[i] = core.is_tensor(a) and a.requires_grad
        any = any or wants[i]
    end
    if not any then return fn(...) end
    local dtype = compute_dtype
    local seed, offset = core.get_rng_state()
    local out = core.no_grad(fn, ...)
    if not core.is_tensor(out) then
        error("nn.checkpoint: fn must return one tensor (got " .. type(out) .. ")", 2)
    end
    -- the inputs as the second run sees them: same storage, no history
    local held = {}
    for i = 1, args.n do
        local a = args[i]
        held[i] = core.is_tensor(a) and a:detach() or a
    end
    local function backward(gout)
        local ins = {}
        for i = 1, args.n do
            local a = held[i]
            if wants[i] then a = a:detach(); a.requires_grad = true end
            ins[i] = a
        end
        local s_now, o_now = core.get_rng_state()
        core.set_rng_state(seed, offset)
        local ok, res = pcall(core.enable_grad, function()
            if dtype then return nn.autocast(dtype, fn, table.unpack(ins, 1, args.n)) end
            return fn(table.unpack(ins, 1, args.n))
        end)
        core.set_rng_state(s_now, o_now)
        if not ok then error(res, 0) end
        if res.requires_grad then res:backward(gout) end
        local grads = {}
        for i = 1, args.n do grads[i] = wants[i] and ins[i].grad or nil end
        return table.unpack(grads, 1, args.n)
    end
    return core.checkpoint_node(out, args, backward)
end

-- model:enable_gradient_checkpointing([classes]): every submodule whose class
-- name is in `classes` (a list; default: the model's own
-- _checkpoint_classes, which the SD models set to their blocks) computes
-- through nn.checkpoint while training.  disable_gradient_checkpointing()
-- undoes it.  Returns the number of layers marked.
function Module:enable_gradient_checkpointing(classes)
    classes = classes or self._checkpoint_classes
    if type(classes) ~= "table" or #classes == 0 then
        error(self.__name .. ":enable_gradient_checkpointing: give the layer classes to checkpoint", 2)
    end
    local set = {}
    for _, c in ipairs(classes) do set[c] = true end
    local n = 0
    for _, nm in ipairs(self:named_modules()) do
        if set[nm[2].__name] then rawset(nm[2], "_checkpoint", true); n = n + 1 end
    end
    return n
end
function Module:disable_gradient_checkpointing()
    for _, nm in ipairs(self:named_modules()) do rawset(nm[2], "_checkpoint", nil) end
end

-- ---- layers ---------------------------------------------------------------

local Linear = Module:extend("Linear")
nn.Linear = Linear
-- Linear(in, out, {bias = true, dtype =, device =}); weight [out, in] as PyTorch.
function Linear:init(in_features, out_features, o)
    self.in_features, self.out_features = in_features, out_features
    local topts = {dtype = opt(o, "dtype", "f32"), device = opt(o, "device", "cpu")}
    self:register_parameter("weight", default_uniform(core.empty({out_features, in_features}, topts), in_features))
    if opt(o, "bias", true) then
        self:register_parameter("bias", default_uniform(core.empty({out_features}, topts), in_features))
    end
end
function Linear:forward(x) return with_cast(core.linear, x, self.weight, self.bias) end
function Linear:extra_repr() return string.format("in=%d, out=%d, bias=%s", self.in_features, self.out_features, tostring(self.bias ~= nil)) end

local Conv2d = Module:extend("Conv2d")
nn.Conv2d = Conv2d
-- Conv2d(in, out, kernel, {stride = 1, padding = 0, bias = true}) on NHWC input;
-- weight [out, kh, kw, in].  stride and padding: a number, {h, w}, or (padding)
-- {top, bottom, left, right}.
function Conv2d:init(cin, cout, k, o)
    local kh, kw = type(k) == "table" and k[1] or k, type(k) == "table" and k[2] or k
    self.in_channels, self.out_channels, self.kernel_size = cin, cout, {kh, kw}
    self.stride = opt(o, "stride", 1)
    self.padding = opt(o, "padding", 0)
    rawset(self, "_nhwc_weight", true)
    local topts = {dtype = opt(o, "dtype", "f32"), device = opt(o, "device", "cpu")}
    local fan_in = cin * kh * kw
    self:register_parameter("weight", default_uniform(core.empty({cout, kh, kw, cin}, topts), fan_in))
    if opt(o, "bias", true) then self:register_parameter("bias", default_uniform(core.empty({cout}, topts), fan_in)) end
end
function Conv2d:forward(x)
    return with_cast(core.conv2d, x, self.weight, self.bias, {stride = self.stride, padding = self.padding})
end
function Conv2d:extra_repr()
    local function show(v) return type(v) == "table" and "{" .. table.concat(v, ", ") .. "}" or tostring(v) end
    return string.format("%d, %d, kernel=%dx%d, stride=%s, padding=%s", self.in_channels, self.out_channels,
        self.kernel_size[1], self.kernel_size[2], show(self.stride), show(self.padding))
end

local GroupNorm = Module:extend("GroupNorm")
nn.GroupNorm = GroupNorm
-- GroupNorm(groups, channels, {eps = 1e-5, affine = true}) over channels-last input.
function GroupNorm:init(groups, channels, o)
    assert(channels % groups == 0, "GroupNorm: channels must be divisible by groups")
    self.num_groups, self.num_channels, self.eps = groups, channels, opt(o, "eps", 1e-5)
    if opt(o, "affine", true) then
        local topts = {dtype = opt(o, "dtype", "f32"), device = opt(o, "device", "cpu")}
        self:register_parameter("weight", core.ones({channels}, topts))
        self:register_parameter("bias", core.zeros({channels}, topts))
    end
end
-- forward(x, {silu = true}) fuses the SiLU that follows most norms in SD.
function GroupNorm:forward(x, o)
    local xc, wc, bc = cast(x), cast(self.weight), cast(self.bias)
    local y = core.group_norm(xc, self.num_groups, wc, bc, self.eps, opt(o, "silu", false))
    free_cast(xc, x); free_cast(wc, self.weight); free_cast(bc, self.bias)
    return y
end

local LayerNorm = Module:extend("LayerNorm")
nn.LayerNorm = LayerNorm
function LayerNorm:init(dim, o)
    self.eps = opt(o, "eps", 1e-5)
    local topts = {dtype = opt(o, "dtype", "f32"), device = opt(o, "device", "cpu")}
    if opt(o, "elementwise_affine", true) then
        self:register_parameter("weight", core.ones({dim}, topts))
        self:register_parameter("bias", core.zeros({dim}, topts))
    end
end
function LayerNorm:forward(x) return with_cast(core.layer_norm, x, self.weight, self.bias, self.eps) end

local Embedding = Module:extend("Embedding")
nn.Embedding = Embedding
function Embedding:init(num, dim, o)
    local topts = {dtype = opt(o, "dtype", "f32"), device = opt(o, "device", "cpu")}
    self:register_parameter("weight", nn.init.normal_(core.empty({num, dim}, topts), 0, 1))
end
function Embedding:forward(ids)
    local w = cast(self.weight)
    local y = core.embedding(w, ids)
    free_cast(w, self.weight)
    return y
end

local Dropout = Module:extend("Dropout")
nn.Dropout = Dropout
function Dropout:init(p) self.p = p or 0.5 end
function Dropout:forward(x)
    if not self.training or self.p == 0 then return x end
    return core.dropout(x, self.p, true)
end

local function activation(name, fn)
    local cls = Module:extend(name)
    cls.forward = function(_, x) return fn(x) end
    nn[name] = cls
end
activation("SiLU", core.silu)
activation("ReLU", core.relu)
activation("Sigmoid", core.sigmoid)
activation("Tanh", core.tanh)
activation("QuickGELU", core.quick_gelu)
activation("Identity", function(x) return x end)
local GELU = Module:extend("GELU")
nn.GELU = GELU
function GELU:init(approximate) self.approximate = approximate or "none" end
function GELU:forward(x) return F.gelu(x, {approximate = self.approximate}) end

local Sequential = Module:extend("Sequential")
nn.Sequential = Sequential
function Sequential:init(...)
    local mods = select("#", ...) == 1 and type((...)) == "table" and getmetatable(...) == nil and (...) or {...}
    for i, m in ipairs(mods) do self:add_module(tostring(i - 1), m) end
end
function Sequential:forward(x)
    for _, m in ipairs(self:children()) do x = m(x) end
    return x
end
function Sequential:add(m) return self:add_module(tostring(#self._child_names), m) end

local ModuleList = Module:extend("ModuleList")
nn.ModuleList = ModuleList
-- Children are named "0", "1", ... ; Lua access is 1-based: list[1] is child "0".
function ModuleList:init(mods)
    for _, m in ipairs(mods or {}) do self:append(m) end
end
function ModuleList:append(m)
    local n = #self._child_names
    self:add_module(tostring(n), m)
    rawset(self, n + 1, m)
    return self
end
function ModuleList:__len() return #self._child_names end
function ModuleList:ipairs() return ipairs(self:children()) end

-- All parameters of several modules, in order (for one optimizer).
function nn.parameters(...)
    local out = {}
    for i = 1, select("#", ...) do
        for _, p in ipairs((select(i, ...)):parameters()) do out[#out + 1] = p end
    end
    return out
end

-- nn.release(t, ...): t:free() unless t is one of the values after it (nil
-- is ignored).  A forward calls it on each intermediate it is done with, so
-- that the memory goes back at once rather than at the next collection: the
-- graph holds what backward needs by references of its own, and a freed
-- box only drops the Lua side's.  The values kept are what a submodule might
-- have handed back unchanged (an input, an output), which must live on.
function nn.release(t, ...)
    if t == nil then return end
    for i = 1, select("#", ...) do
        if rawequal(t, (select(i, ...))) then return end
    end
    t:free()
end

-- ml.nn.lora (moonlit.lora) loads on first use: it builds on this module.
setmetatable(nn, {__index = function(t, k) if k == "lora" then rawset(t, k, require "moonlit.lora"); return rawget(t, k) end end})

return nn
