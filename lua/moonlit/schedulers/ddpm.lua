-- moonlit.schedulers.ddpm — DDPMScheduler: the training-time forward
-- process (add_noise, get_velocity) and ancestral sampling.
local core = require "moonlit.core"
local C = require "moonlit.schedulers.common"

local DDPM = C.class("DDPMScheduler", {variance_type = "fixed_small", clip_sample = true,
                                       clip_sample_range = 1.0, thresholding = false})

-- variance_type: fixed_small, fixed_small_log or fixed_large (the config's
-- schema is in moonlit.config_check; the learned variances need a model
-- that predicts them, twice the channels)

function DDPM:set_timesteps(n)
    n = C.check_steps(self.__name, self.config, n)
    self.num_inference_steps = n
    self.timesteps = C.spaced_timesteps(self.config, n, self.__name)
end

-- The timestep a step lands on: the next one of the schedule (-1 after the
-- last), or t - 1 when no schedule was set (stepping through all of them).
function DDPM:previous_timestep(t)
    if not self.timesteps then return t - 1 end
    for i, v in ipairs(self.timesteps) do
        if v == t then return self.timesteps[i + 1] or -1 end
    end
    error(string.format("%s: timestep %s is not in the schedule", self.__name, tostring(t)), 3)
end

-- step(model_output, t, sample, {noise = tensor}) -> prev_sample, pred_original_sample
-- Without set_timesteps the chain runs over every training timestep.
function DDPM:step(model_output, t, sample, o)
    local cfg = self.config
    local prev_t = self:previous_timestep(t)
    local a = self.alphas_cumprod[t + 1]
    local a_prev = prev_t >= 0 and self.alphas_cumprod[prev_t + 1] or 1.0
    local beta, beta_prev = 1 - a, 1 - a_prev
    local cur_alpha = a / a_prev
    local cur_beta = 1 - cur_alpha
    local x0
    if cfg.prediction_type == "epsilon" then
        x0 = (sample - model_output * math.sqrt(beta)) / math.sqrt(a)
    elseif cfg.prediction_type == "v_prediction" then
        x0 = sample * math.sqrt(a) - model_output * math.sqrt(beta)
    else
        x0 = model_output
    end
    if cfg.clip_sample then x0 = core.clamp(x0, -cfg.clip_sample_range, cfg.clip_sample_range) end
    local c0 = math.sqrt(a_prev) * cur_beta / beta
    local cs = math.sqrt(cur_alpha) * beta_prev / beta
    local prev = x0 * c0 + sample * cs
    if t > 0 then
        local var = cur_beta
        if cfg.variance_type ~= "fixed_large" then var = math.max(beta_prev / beta * cur_beta, 1e-20) end
        local noise = o and o.noise or core.randn(sample:size(), {dtype = sample.dtype, device = sample.device})
        prev = prev + noise * math.sqrt(var)
    end
    return prev, x0
end

return DDPM
