-- moonlit.schedulers.ddim — DDIMScheduler (deterministic when eta = 0).
local core = require "moonlit.core"
local C = require "moonlit.schedulers.common"

local DDIM = C.class("DDIMScheduler", {clip_sample = true, clip_sample_range = 1.0, set_alpha_to_one = true,
                                       thresholding = false})

function DDIM:setup()
    self.final_alpha_cumprod = self.config.set_alpha_to_one and 1.0 or self.alphas_cumprod[1]
end

function DDIM:set_timesteps(n)
    n = C.check_steps(self.__name, self.config, n)
    self.num_inference_steps = n
    self.timesteps = C.spaced_timesteps(self.config, n, self.__name)
end

-- step(model_output, t, sample, {eta = 0, noise = tensor, use_clipped_model_output = false})
--   -> prev_sample, pred_original_sample
-- As in diffusers, the previous timestep is t - num_train_timesteps // steps
-- whatever the spacing.
function DDIM:step(model_output, t, sample, o)
    C.need_timesteps(self)
    o = o or {}
    local cfg = self.config
    local eta = o.eta or 0
    local prev_t = t - self.num_train_timesteps // self.num_inference_steps
    local a = self.alphas_cumprod[t + 1]
    local a_prev = prev_t >= 0 and self.alphas_cumprod[prev_t + 1] or self.final_alpha_cumprod
    local beta = 1 - a
    local x0, eps
    if cfg.prediction_type == "epsilon" then
        x0 = (sample - model_output * math.sqrt(beta)) / math.sqrt(a)
        eps = model_output
    elseif cfg.prediction_type == "v_prediction" then
        x0 = sample * math.sqrt(a) - model_output * math.sqrt(beta)
        eps = model_output * math.sqrt(a) + sample * math.sqrt(beta)
    else
        x0 = model_output
        eps = (sample - x0 * math.sqrt(a)) / math.sqrt(beta)
    end
    if cfg.clip_sample then x0 = core.clamp(x0, -cfg.clip_sample_range, cfg.clip_sample_range) end
    local var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    local std = eta * math.sqrt(var)
    -- the noise direction that agrees with the clipped x0 (as in Glide)
    if o.use_clipped_model_output then eps = (sample - x0 * math.sqrt(a)) / math.sqrt(beta) end
    local prev = x0 * math.sqrt(a_prev) + eps * math.sqrt(1 - a_prev - std * std)
    if eta > 0 then
        local noise = o.noise or core.randn(sample:size(), {dtype = sample.dtype, device = sample.device})
        prev = prev + noise * std
    end
    return prev, x0
end

return DDIM
