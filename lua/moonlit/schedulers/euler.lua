-- moonlit.schedulers.euler — EulerDiscreteScheduler and
-- EulerAncestralDiscreteScheduler (k-diffusion style sigma samplers).
local core = require "moonlit.core"
local C = require "moonlit.schedulers.common"

local f32 = C.f32

-- np.interp over integer knots 0..#ys-1 (ys is 1-based)
local function interp(x, ys)
    if x <= 0 then return ys[1] end
    if x >= #ys - 1 then return ys[#ys] end
    local i = math.floor(x)
    local w = x - i
    return ys[i + 1] + (ys[i + 2] - ys[i + 1]) * w
end

local function make(name)
    local cls = C.class(name, {timestep_spacing = "linspace", interpolation_type = "linear"})

    function cls:setup()
        self.train_sigmas = {}
        for i, a in ipairs(self.alphas_cumprod) do self.train_sigmas[i] = f32(math.sqrt(f32(f32(1 - a) / a))) end
    end

    function cls:set_timesteps(n)
        local cfg = self.config
        local N = cfg.num_train_timesteps
        self.num_inference_steps = n
        local ts = {}
        if cfg.timestep_spacing == "linspace" then
            ts = C.reverse(C.linspace(0, N - 1, n))
        elseif cfg.timestep_spacing == "leading" then
            local ratio = N // n
            for i = 0, n - 1 do ts[i + 1] = C.round_even(i * ratio) + cfg.steps_offset end
            ts = C.reverse(ts)
        elseif cfg.timestep_spacing == "trailing" then
            local ratio = N / n
            local v = N
            while v > 0 do ts[#ts + 1] = C.round_even(v) - 1; v = v - ratio end
        else
            error(name .. ": unsupported timestep_spacing " .. tostring(cfg.timestep_spacing))
        end
        if cfg.use_karras_sigmas then error(name .. ": use_karras_sigmas is not implemented") end
        self.sigmas = {}
        for i, t in ipairs(ts) do
            ts[i] = f32(t)
            self.sigmas[i] = f32(interp(ts[i], self.train_sigmas))
        end
        self.sigmas[#ts + 1] = 0.0
        self.timesteps = ts
        local smax = 0
        for _, s in ipairs(self.sigmas) do smax = math.max(smax, s) end
        if cfg.timestep_spacing == "linspace" or cfg.timestep_spacing == "trailing" then
            self.init_noise_sigma = smax
        else
            self.init_noise_sigma = math.sqrt(smax * smax + 1)
        end
        self.step_index = nil
    end

    function cls:_index_for(t)
        if self.step_index then return self.step_index end
        for i, v in ipairs(self.timesteps) do if v == t then self.step_index = i return i end end
        error(name .. ": timestep " .. tostring(t) .. " is not in the schedule")
    end

    function cls:scale_model_input(sample, t)
        local s = self.sigmas[self:_index_for(t)]
        return sample / math.sqrt(s * s + 1)
    end

    function cls:_pred_x0(model_output, sample, sigma)
        local pt = self.config.prediction_type
        if pt == "epsilon" then return sample - model_output * sigma end
        if pt == "v_prediction" then
            return model_output * (-sigma / math.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        end
        if pt == "sample" then return model_output end
        error(name .. ": unsupported prediction_type " .. tostring(pt))
    end

    return cls
end

local Euler = make("EulerDiscreteScheduler")

function Euler:step(model_output, t, sample)
    local i = self:_index_for(t)
    local sigma = self.sigmas[i]
    local x0 = self:_pred_x0(model_output, sample, sigma)
    local d = (sample - x0) / sigma
    local prev = sample + d * (self.sigmas[i + 1] - sigma)
    self.step_index = i + 1
    return prev, x0
end

local EulerA = make("EulerAncestralDiscreteScheduler")

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
