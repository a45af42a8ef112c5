-- moonlit.schedulers.pndm — PNDMScheduler with skip_prk_steps (the PLMS
-- linear multistep sampler Stable Diffusion ships with).
local C = require "moonlit.schedulers.common"

local PNDM = C.class("PNDMScheduler", {skip_prk_steps = false, set_alpha_to_one = false})

function PNDM:setup()
    self.final_alpha_cumprod = self.config.set_alpha_to_one and 1.0 or self.alphas_cumprod[1]
end

function PNDM:set_timesteps(n)
    local cfg = self.config
    if not cfg.skip_prk_steps then
        error("PNDMScheduler: only skip_prk_steps = true (PLMS, as Stable Diffusion uses) is implemented")
    end
    self.num_inference_steps = n
    local N = cfg.num_train_timesteps
    local base = {}
    if cfg.timestep_spacing == "linspace" then
        for i, v in ipairs(C.linspace(0, N - 1, n)) do base[i] = C.round_even(v) end
    elseif cfg.timestep_spacing == "leading" then
        local ratio = N // n
        for i = 0, n - 1 do base[i + 1] = i * ratio + cfg.steps_offset end
    elseif cfg.timestep_spacing == "trailing" then
        local ratio = N / n
        local v = N
        local tmp = {}
        while v > 0 do tmp[#tmp + 1] = C.round_even(v) - 1; v = v - ratio end
        base = C.reverse(tmp)
    else
        error("PNDMScheduler: unsupported timestep_spacing " .. tostring(cfg.timestep_spacing))
    end
    -- PLMS warms up by repeating the second-to-last timestep (as diffusers does)
    local plms = {}
    for i = 1, #base - 1 do plms[#plms + 1] = base[i] end
    plms[#plms + 1] = base[#base - 1]
    plms[#plms + 1] = base[#base]
    self.timesteps = C.reverse(plms)
    self.ets = {}
    self.counter = 0
    self.cur_sample = nil
end

function PNDM:_prev_sample(sample, t, prev_t, eps)
    local a = self.alphas_cumprod[t + 1]
    local a_prev = prev_t >= 0 and self.alphas_cumprod[prev_t + 1] or self.final_alpha_cumprod
    local beta, beta_prev = 1 - a, 1 - a_prev
    if self.config.prediction_type == "v_prediction" then
        eps = eps * math.sqrt(a) + sample * math.sqrt(beta)
    elseif self.config.prediction_type ~= "epsilon" then
        error("PNDMScheduler: unsupported prediction_type " .. tostring(self.config.prediction_type))
    end
    local sample_coeff = math.sqrt(a_prev / a)
    local denom = a * math.sqrt(beta_prev) + math.sqrt(a * beta * a_prev)
    return sample * sample_coeff - eps * ((a_prev - a) / denom)
end

function PNDM:step(model_output, t, sample)
    local ratio = self.num_train_timesteps // self.num_inference_steps
    local prev_t = t - ratio
    local ets = self.ets
    if self.counter ~= 1 then
        while #ets > 3 do table.remove(ets, 1) end
        ets[#ets + 1] = model_output
    else
        prev_t = t
        t = t + ratio
    end
    local eps
    if #ets == 1 and self.counter == 0 then
        eps = model_output
        self.cur_sample = sample
    elseif #ets == 1 and self.counter == 1 then
        eps = (model_output + ets[#ets]) / 2
        sample = self.cur_sample
        self.cur_sample = nil
    elseif #ets == 2 then
        eps = (ets[#ets] * 3 - ets[#ets - 1]) / 2
    elseif #ets == 3 then
        eps = (ets[#ets] * 23 - ets[#ets - 1] * 16 + ets[#ets - 2] * 5) / 12
    else
        eps = (ets[#ets] * 55 - ets[#ets - 1] * 59 + ets[#ets - 2] * 37 - ets[#ets - 3] * 9) * (1 / 24)
    end
    local prev = self:_prev_sample(sample, t, prev_t, eps)
    self.counter = self.counter + 1
    return prev
end

return PNDM
