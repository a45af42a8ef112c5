-- moonlit.schedulers.euler — EulerDiscreteScheduler and
-- EulerAncestralDiscreteScheduler (k-diffusion style sigma samplers).
local core = require "moonlit.core"
local C = require "moonlit.schedulers.common"

local f32 = C.f32

local interp = C.interp

-- final_sigma: whether the class reads final_sigmas_type (Euler does; Euler
-- ancestral always ends at sigma 0, as in diffusers)
local function make(name, final_sigma)
    local defaults = {timestep_spacing = "linspace", interpolation_type = "linear"}
    if final_sigma then defaults.final_sigmas_type, defaults.timestep_type = "zero", "discrete" end
    -- the config's schema (interpolation_type linear, no Karras /
    -- exponential / beta sigmas, ...) is in moonlit.config_check
    local cls = C.class(name, defaults)

    function cls:setup()
        self.train_sigmas = C.train_sigmas(self.alphas_cumprod)
        -- before set_timesteps: the largest training sigma, as diffusers reports
        self.init_noise_sigma = self:_init_noise_sigma(self.train_sigmas[#self.train_sigmas])
    end

    function cls:_init_noise_sigma(smax)
        local sp = self.config.timestep_spacing
        if sp == "linspace" or sp == "trailing" then return smax end
        return f32(math.sqrt(f32(f32(smax * smax) + 1)))
    end

    function cls:set_timesteps(n)
        local cfg = self.config
        n = C.check_steps(name, cfg, n)
        self.num_inference_steps = n
        local ts = C.spaced(cfg, n, name)
        self.sigmas = {}
        for i, t in ipairs(ts) do
            ts[i] = f32(t)
            self.sigmas[i] = f32(interp(ts[i], self.train_sigmas))
        end
        self.sigmas[#ts + 1] = final_sigma and cfg.final_sigmas_type == "sigma_min" and self.train_sigmas[1] or 0.0
        self.timesteps = ts
        local smax = 0
        for _, s in ipairs(self.sigmas) do smax = math.max(smax, s) end
        self.init_noise_sigma = self:_init_noise_sigma(smax)
        self.step_index = nil
    end

    function cls:_index_for(t)
        C.need_timesteps(self)
        if self.step_index then return self.step_index end
        for i, v in ipairs(self.timesteps) do if v == t then self.step_index = i return i end end
        error(name .. ": timestep " .. tostring(t) .. " is not in the schedule", 3)
    end

    function cls:scale_model_input(sample, t)
        local s = self.sigmas[self:_index_for(t)]
        return sample / math.sqrt(s * s + 1)
    end

    -- x0 from the model output; epsilon uses the churned sigma_hat
    function cls:_pred_x0(model_output, sample, sigma, sigma_hat)
        local pt = self.config.prediction_type
        if pt == "epsilon" then return sample - model_output * (sigma_hat or sigma) end
        if pt == "v_prediction" then
            return model_output * (-sigma / math.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        end
        return model_output
    end

    -- x_t = x0 + sigma_t noise, sigma_t interpolated at t (tensor [N] or
    -- number) as set_timesteps does, so any schedule timestep matches
    function cls:add_noise(original, noise, timesteps)
        if type(timesteps) == "number" then
            return original + noise * f32(interp(timesteps, self.train_sigmas))
        end
        local sig = {}
        for i, t in ipairs(timesteps:to("cpu"):double():totable()) do sig[i] = f32(interp(t, self.train_sigmas)) end
        local shape = {#sig}
        for _ = 2, original:dim() do shape[#shape + 1] = 1 end
        local s = core.tensor(sig, {dtype = original.dtype, device = original.device}):view(shape)
        return original + noise * s
    end

    return cls
end

local Euler = make("EulerDiscreteScheduler", true)

-- step(model_output, t, sample, {s_churn = 0, s_tmin = 0, s_tmax = inf,
-- s_noise = 1, noise = tensor}) -> prev_sample, pred_original_sample.
-- s_churn > 0 first raises the noise level of sigmas within [s_tmin, s_tmax]
-- to sigma_hat (Karras et al.'s stochastic sampler).
function Euler:step(model_output, t, sample, o)
    o = o or {}
    local i = self:_index_for(t)
    local sigma = self.sigmas[i]
    local churn, tmin, tmax = o.s_churn or 0, o.s_tmin or 0, o.s_tmax or math.huge
    local gamma = 0
    if tmin <= sigma and sigma <= tmax then gamma = math.min(churn / (#self.sigmas - 1), math.sqrt(2) - 1) end
    local sigma_hat = f32(sigma * (gamma + 1))
    if gamma > 0 then
        local noise = o.noise or core.randn(sample:size(), {dtype = sample.dtype, device = sample.device})
        sample = sample + noise * ((o.s_noise or 1) * math.sqrt(sigma_hat ^ 2 - sigma ^ 2))
    end
    local x0 = self:_pred_x0(model_output, sample, sigma, sigma_hat)
    local d = (sample - x0) / sigma_hat
    local prev = sample + d * (self.sigmas[i + 1] - sigma_hat)
    self.step_index = i + 1
    return prev, x0
end

local EulerA = make("EulerAncestralDiscreteScheduler", false)

-- step(model_output, t, sample, {noise = tensor})
function EulerA:step(model_output, t, sample, o)
    local i = self:_index_for(t)
    local sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
    local x0 = self:_pred_x0(model_output, sample, sigma)
    local up = math.sqrt(sigma_to ^ 2 * (sigma ^ 2 - sigma_to ^ 2) / sigma ^ 2)
    local down = math.sqrt(sigma_to ^ 2 - up ^ 2)
    local d = (sample - x0) / sigma
    local prev = sample + d * (down - sigma)
    local noise = o and o.noise or core.randn(sample:size(), {dtype = sample.dtype, device = sample.device})
    prev = prev + noise * up
    self.step_index = i + 1
    return prev, x0
end

return {EulerDiscreteScheduler = Euler, EulerAncestralDiscreteScheduler = EulerA}
