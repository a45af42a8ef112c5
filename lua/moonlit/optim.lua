-- moonlit.optim (ml.optim) — optimizers with PyTorch semantics.
--   AdamW: decoupled weight decay, bias correction, one fused kernel per
--          parameter (core.adamw_step_).  Moments are kept in opts.state_dtype,
--          by default the parameter's dtype: f32 params as before; bf16
--          params (the bf16-sr recipe) get bf16 moments, and the kernel
--          stores every bf16 result with stochastic rounding drawn from the
--          default generator, so updates far below bf16's spacing (lr 5e-6)
--          still move the weights on average instead of rounding away.
--   SGD:   momentum, dampening, nesterov, weight decay (coupled, as torch.optim.SGD).
--   clip_grad_norm(params, max_norm): total 2-norm over all grads, scaled in place.
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

function AdamW:step()
    core.no_grad(function()
        for i, p in ipairs(self.params) do
            local g = p.grad
            if g then
                local s = self.state[i]
                if not s then
                    local dt = {dtype = self.state_dtype or p.dtype}
                    s = {step = 0, exp_avg = core.zeros_like(p, dt), exp_avg_sq = core.zeros_like(p, dt)}
                    self.state[i] = s
                end
                s.step = s.step + 1
                core.adamw_step_(p, g, s.exp_avg, s.exp_avg_sq, self.lr, self.betas[1], self.betas[2],
                                 self.eps, self.weight_decay, s.step)
            end
        end
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

-- Returns the total norm before clipping (a number), as torch's clip_grad_norm_.
function optim.clip_grad_norm(params, max_norm, norm_type)
    norm_type = norm_type or 2
    local grads = {}
    for _, p in ipairs(params) do if p.grad then grads[#grads + 1] = p.grad end end
    if #grads == 0 then return 0 end
    local total = core.no_grad(function()
        if norm_type == math.huge then
            local m = 0
            for _, g in ipairs(grads) do m = math.max(m, g:abs():max():item()) end
            return m
        end
        local acc = 0
        for _, g in ipairs(grads) do acc = acc + g:norm(norm_type):item() ^ norm_type end
        return acc ^ (1 / norm_type)
    end)
    local coef = max_norm / (total + 1e-6)
    if coef < 1 then
        core.no_grad(function() for _, g in ipairs(grads) do g:mul_(coef) end end)
    end
    return total
end
optim.clip_grad_norm_ = optim.clip_grad_norm

return optim
