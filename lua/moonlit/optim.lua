-- moonlit.optim (ml.optim) — optimizers with PyTorch semantics.
--   AdamW: decoupled weight decay, bias correction; one fused multi-tensor
--          call per step for all parameters (core.adamw_multi_: on the GPU
--          one launch per dtype combination, whatever the number of
--          tensors).  Moments are kept in opts.state_dtype, by default the
--          parameter's dtype: f32 params as before; bf16 params (the
--          bf16-sr recipe) get bf16 moments, and the kernel stores every
--          bf16 result with stochastic rounding drawn from the default
--          generator, so updates far below bf16's spacing (lr 5e-6) still
--          move the weights on average instead of rounding away.
--          opt:step{grad_scale = coef} multiplies every gradient by a
--          device scalar as it is read (clip_grad_norm's coefficient).
--          Parameters with an autocast shadow (nn.autocast's cache) get it
--          refreshed by the same kernel: the new weight rounded to the
--          shadow's dtype, bit for bit what casting it after the step gives.
--   SGD:   momentum, dampening, nesterov, weight decay (coupled, as torch.optim.SGD).
--   clip_grad_norm(params, max_norm [, norm_type] [, opts]): the total norm
--          over all gradients, computed on their device in one pass
--          (core.grad_norm_multi), and the gradients scaled in place by
--          min(1, max_norm / (norm + 1e-6)).  Returns the norm as a number
--          (one host sync), or with {sync = false} as a 0-dim f32 tensor and
--          the coefficient as a second one (no sync); {sync = false,
--          scale_grads = false} leaves the gradients as they are for
--          opt:step{grad_scale = coef} to scale as it reads them.
local core = require "moonlit.core"

local optim = {}

local function param_list(params)
    local out = {}
    for i, p in ipairs(params) do
        if not core.is_tensor(p) then error(string.format("optimizer: parameter %d is not a tensor", i), 3) end
        out[i] = p
    end
    if #out == 0 then error("optimizer: empty parameter list", 3) end
    return out
end

local Optimizer = {}
Optimizer.__index = Optimizer

function Optimizer:zero_grad()
    for _, p in ipairs(self.params) do p.grad = nil end
end

-- ---- AdamW ----------------------------------------------------------------

local AdamW = setmetatable({}, {__index = Optimizer})
AdamW.__index = AdamW
optim.AdamW = setmetatable(AdamW, {__index = Optimizer, __call = function(cls, params, o)
    o = o or {}
    local self = setmetatable({}, cls)
    self.params = param_list(params)
    self.lr = o.lr or 1e-3
    self.betas = o.betas or {0.9, 0.999}
    self.eps = o.eps or 1e-8
    self.weight_decay = o.weight_decay == nil and 1e-2 or o.weight_decay
    self.state_dtype = o.state_dtype
    self.state = {}
    return self
end})

-- opts.grad_scale: a one-element f32 tensor on the parameters' device (or a
-- number) every gradient is multiplied by as the step reads it, rounded to
-- the gradient's dtype: the bits of scaling the gradients in place first,
-- without that pass over them and without reading the scale back.
function AdamW:step(opts)
    local grad_scale = opts and opts.grad_scale
    if grad_scale ~= nil and type(grad_scale) ~= "number" and not core.is_tensor(grad_scale) then
        error("AdamW:step: grad_scale must be a tensor or a number, got " .. type(grad_scale), 2)
    end
    core.no_grad(function()
        local ps, gs, ms, vs, steps, states, n = {}, {}, {}, {}, {}, {}, 0
        for i, p in ipairs(self.params) do
            local g = p.grad
            if g then
                local s = self.state[i]
                if not s then
                    local dt = {dtype = self.state_dtype or p.dtype}
                    s = {step = 0, exp_avg = core.zeros_like(p, dt), exp_avg_sq = core.zeros_like(p, dt)}
                    self.state[i] = s
                end
                n = n + 1
                ps[n], gs[n], ms[n], vs[n], steps[n], states[n] = p, g, s.exp_avg, s.exp_avg_sq, s.step + 1, s
            end
        end
        if n == 0 then return end
        if type(grad_scale) == "number" then grad_scale = core.full({}, grad_scale, {device = ps[1].device}) end
        -- The autocast shadows (moonlit.nn's cache) of the stepped
        -- parameters: the kernel writes each new weight there too, rounded
        -- as :to(dtype) rounds, so the next forward converts nothing.
        local shadow_of = require("moonlit.nn")._autocast_shadow
        local shadows, refreshed = nil, {}
        for k = 1, n do
            local entry = shadow_of(ps[k])
            if entry then
                shadows = shadows or {}
                shadows[k] = entry.tensor
                refreshed[#refreshed + 1] = {ps[k], entry}
            end
        end
        -- One call: it draws the stochastic-rounding bits of each parameter
        -- where the former loop of one call per parameter did, and moves
        -- the default generator past all of them.
        core.adamw_multi_(ps, gs, ms, vs, self.lr, self.betas[1], self.betas[2], self.eps, self.weight_decay, steps,
                          {grad_scale = grad_scale, shadows = shadows})
        for k, s in ipairs(states) do s.step = steps[k] end
        -- Each refreshed shadow now holds the weight at the version the
        -- step left (read after it: the step bumped it).
        for _, pe in ipairs(refreshed) do pe[2].version = core.storage_version(pe[1]) end
    end)
end

function AdamW:state_dict()
    return {lr = self.lr, betas = self.betas, eps = self.eps, weight_decay = self.weight_decay, state = self.state}
end

-- Copies the state (as torch does): the optimizer that produced sd, or a
-- second one loaded from it, must not update this one's moments.
function AdamW:load_state_dict(sd)
    self.lr, self.betas, self.eps, self.weight_decay = sd.lr, {sd.betas[1], sd.betas[2]}, sd.eps, sd.weight_decay
    self.state = {}
    for i, s in pairs(sd.state) do
        local p = self.params[i]
        if not p then error("AdamW:load_state_dict: state for parameter " .. i .. " but only " .. #self.params .. " parameters") end
        local to = {device = p.device, dtype = self.state_dtype or p.dtype}
        self.state[i] = {step = s.step, exp_avg = s.exp_avg:to(to):clone(), exp_avg_sq = s.exp_avg_sq:to(to):clone()}
    end
end

-- ---- SGD ------------------------------------------------------------------

local SGD = setmetatable({}, {__index = Optimizer})
SGD.__index = SGD
optim.SGD = setmetatable(SGD, {__index = Optimizer, __call = function(cls, params, o)
    o = o or {}
    local self = setmetatable({}, cls)
    self.params = param_list(params)
    self.lr = assert(o.lr, "SGD: lr is required")
    self.momentum = o.momentum or 0
    self.dampening = o.dampening or 0
    self.weight_decay = o.weight_decay or 0
    self.nesterov = o.nesterov or false
    self.state = {}
    return self
end})

function SGD:step()
    core.no_grad(function()
        for i, p in ipairs(self.params) do
            local g = p.grad
            if g then
                if self.weight_decay ~= 0 then g = g + p * self.weight_decay end
                if self.momentum ~= 0 then
                    local buf = self.state[i]
                    if not buf then
                        buf = g:clone()
                        self.state[i] = buf
                    else
                        buf:mul_(self.momentum):add_(g, 1 - self.dampening)
                    end
                    if self.nesterov then g = g + buf * self.momentum else g = buf end
                end
                p:add_(g, -self.lr)
            end
        end
    end)
end

-- ---- gradient clipping ----------------------------------------------------

-- clip_grad_norm(params, max_norm [, norm_type = 2] [, opts]), or with the
-- norm type in opts (clip_grad_norm(params, max_norm, {norm_type = 1})).
-- The total norm of all gradients (math.huge: the largest |g|) and the
-- coefficient min(1, max_norm / (norm + 1e-6)) are computed on the
-- gradients' device in one pass, in f32 as torch.nn.utils.clip_grad_norm_
-- does; a NaN norm clips nothing.
--   opts.sync (default true): return the norm as a number, as before; this
--     reads it back (one host sync).  false: return the norm and the
--     coefficient as 0-dim f32 tensors on the device, reading nothing back.
--   opts.scale_grads (default true): multiply the gradients in place by the
--     coefficient (one multi-tensor kernel, skipped on the device when the
--     coefficient is 1).  false: leave them and return the coefficient (a
--     tensor, also with sync) for opt:step{grad_scale = coef}, which
--     applies it as it reads them, with the same bits and without a pass
--     of its own.
function optim.clip_grad_norm(params, max_norm, norm_type, opts)
    if type(norm_type) == "table" and opts == nil then norm_type, opts = nil, norm_type end
    opts = opts or {}
    norm_type = norm_type or opts.norm_type or 2
    if type(max_norm) ~= "number" then error("clip_grad_norm: max_norm must be a number", 2) end
    if type(norm_type) ~= "number" then error("clip_grad_norm: norm_type must be a number", 2) end
    local sync = opts.sync ~= false
    local grads = {}
    for _, p in ipairs(params) do if p.grad then grads[#grads + 1] = p.grad end end
    if #grads == 0 then
        if sync then return 0 end
        local dev = params[1] and params[1].device or "cpu"
        return core.zeros({}, {device = dev}), core.ones({}, {device = dev})
    end
    local norm, coef = core.no_grad(function()
        local n, c = core.grad_norm_multi(grads, norm_type, max_norm)
        if opts.scale_grads ~= false then core.scale_multi_(grads, c) end
        return n, c
    end)
    if sync then return norm:item(), opts.scale_grads == false and coef or nil end
    return norm, coef
end
optim.clip_grad_norm_ = optim.clip_grad_norm

return optim
