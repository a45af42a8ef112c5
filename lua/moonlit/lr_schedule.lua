-- moonlit.lr_schedule — learning-rate schedules with the names and formulas
-- of diffusers' get_scheduler (constant, constant_with_warmup, linear,
-- cosine), as pure functions of the optimizer step, so a checkpoint only
-- has to remember the step count to resume the schedule exactly.
--
--   local s = lr_schedule.new{name = "cosine", base_lr = 5e-6, warmup_steps = 50, total_steps = 800}
--   s:lr(k)   -- the rate for optimizer step k (0-based: k steps already taken)
--
-- Steps count optimizer updates (after gradient accumulation), as the
-- training loop calls them; the warmup ramps linearly from 0.
local S = {}
S.__index = S

local factors = {
    constant = function() return 1 end,
    constant_with_warmup = function(k, w)
        if k < w then return k / math.max(1, w) end
        return 1
    end,
    linear = function(k, w, n)
        if k < w then return k / math.max(1, w) end
        return math.max(0, (n - k) / math.max(1, n - w))
    end,
    cosine = function(k, w, n)
        if k < w then return k / math.max(1, w) end
        local progress = (k - w) / math.max(1, n - w)
        return math.max(0, 0.5 * (1 + math.cos(math.pi * progress)))
    end,
}

S.names = {"constant", "constant_with_warmup", "linear", "cosine"}

function S.new(o)
    local name = o.name or "constant"
    if not factors[name] then
        error(string.format("lr schedule: unknown name '%s' (expected %s)", tostring(name), table.concat(S.names, ", ")), 2)
    end
    local w, n = o.warmup_steps or 0, o.total_steps or 0
    if math.type(w) ~= "integer" or w < 0 then error("lr schedule: warmup_steps must be an integer >= 0", 2) end
    if math.type(n) ~= "integer" or n < 0 then error("lr schedule: total_steps must be an integer >= 0", 2) end
    if type(o.base_lr) ~= "number" or o.base_lr < 0 then error("lr schedule: base_lr must be a number >= 0", 2) end
    return setmetatable({name = name, base_lr = o.base_lr, warmup_steps = w, total_steps = n}, S)
end

function S:lr(k)
    return self.base_lr * factors[self.name](k, self.warmup_steps, self.total_steps)
end

return S
