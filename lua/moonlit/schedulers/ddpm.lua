-- moonlit.schedulers.ddpm — DDPMScheduler: the training-time forward
-- process (add_noise, get_velocity) and ancestral sampling.
local core = require "moonlit.core"
local C = require "moonlit.schedulers.common"

local DDPM = C.class("DDPMScheduler", {variance_type = "fixed_small", clip_sample = true,
                                       clip_sample_range = 1.0, thresholding = false})

function DDPM:set_timesteps(n)
    self.num_inference_steps = n
    self.timesteps = C.spaced_timesteps(self.config, n)
end

function DDPM:previous_timestep(t)
    local n = self.num_inference_steps or self.num_train_timesteps
    return t - self.num_train_timesteps // n
end

-- step(model_output, t, sample, {noise = tensor}) -> prev_sample, pred_original_sample
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
    elseif cfg.prediction_type == "sample" then
        x0 = model_output
    else
        error("DDPMScheduler: unsupported prediction_type " .. tostring(cfg.prediction_type))
    end
    if cfg.clip_sample then x0 = core.clamp(x0, -cfg.clip_sample_range, cfg.clip_sample_range) end
    local c0 = math.sqrt(a_prev) * cur_beta / beta
    local cs = math.sqrt(cur_alpha) * beta_prev / beta
    local prev = x0 * c0 + sample * cs
    if t > 0 then
        local var = math.max(beta_prev / beta * cur_beta, 1e-20)
        local noise = o and o.noise or core.randn(sample:size(), {dtype = sample.dtype, device = sample.device})
        prev = prev + noise * math.sqrt(var)
    end
    return prev, x0
end

return DDPM
