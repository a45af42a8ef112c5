-- moonlit.schedulers.dpmpp_2m — DPMSolverMultistepScheduler in its DPM++ 2M
-- form (algorithm_type "dpmsolver++", solver_order 2, midpoint solver,
-- lower-order final steps, final sigma zero or sigma_min).
local C = require "moonlit.schedulers.common"

local f32 = C.f32

local DPM = C.class("DPMSolverMultistepScheduler", {
    timestep_spacing = "linspace", solver_order = 2, algorithm_type = "dpmsolver++", solver_type = "midpoint",
    lower_order_final = true, euler_at_final = false, final_sigmas_type = "zero", use_karras_sigmas = false,
    thresholding = false,
})

local interp = C.interp

-- The config's schema (dpmsolver++, order 2, midpoint; no Karras sigmas,
-- Lu lambdas, lambda_min_clipped, ...) is in moonlit.config_check.

function DPM:setup()
    self.train_sigmas = C.train_sigmas(self.alphas_cumprod)
end

-- DPM-Solver spaces n + 1 points and drops the last (t = 0) one.
function DPM:set_timesteps(n)
    local cfg = self.config
    n = C.check_steps(self.__name, cfg, n)
    local N = cfg.num_train_timesteps
    self.num_inference_steps = n
    local ts = {}
    if cfg.timestep_spacing == "linspace" then
        local l = C.linspace(0, N - 1, n + 1)
        for i = n + 1, 2, -1 do ts[#ts + 1] = math.tointeger(C.round_even(l[i])) end
    elseif cfg.timestep_spacing == "leading" then
        local ratio = N // (n + 1)
        for i = n, 1, -1 do ts[#ts + 1] = i * ratio + cfg.steps_offset end
    else
        ts = C.spaced_timesteps(cfg, n, self.__name)
    end
    self.timesteps = ts
    self.sigmas = {}
    for i, t in ipairs(ts) do self.sigmas[i] = f32(interp(t, self.train_sigmas)) end
    if cfg.final_sigmas_type == "zero" then self.sigmas[#ts + 1] = 0.0
    else self.sigmas[#ts + 1] = self.train_sigmas[1] end
    self.model_outputs = {}
    self.lower_order_nums = 0
    self.step_index = nil
end

local function alpha_sigma(s)
    local a = 1 / math.sqrt(s * s + 1)
    return a, s * a
end

local function lambda(a, s) return math.log(a) - math.log(s) end

-- step(model_output, t, sample) -> prev_sample, pred_original_sample
function DPM:step(model_output, t, sample)
    C.need_timesteps(self)
    if not self.step_index then
        for i, v in ipairs(self.timesteps) do if v == t then self.step_index = i break end end
        if not self.step_index then error(self.__name .. ": timestep " .. tostring(t) .. " is not in the schedule", 2) end
    end
    local i, n = self.step_index, #self.timesteps
    local cfg = self.config
    local lower_final = i == n and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                    or cfg.final_sigmas_type == "zero")

    -- the data prediction x0 the solver works with
    local a_s, s_s = alpha_sigma(self.sigmas[i])
    local x0
    if cfg.prediction_type == "epsilon" then x0 = (sample - model_output * s_s) / a_s
    elseif cfg.prediction_type == "v_prediction" then x0 = sample * a_s - model_output * s_s
    else x0 = model_output end
    self.model_outputs[1] = self.model_outputs[2]
    self.model_outputs[2] = x0

    local a_t, s_t = alpha_sigma(self.sigmas[i + 1])
    local lam_t, lam_s0 = lambda(a_t, s_t), lambda(a_s, s_s)
    local h = lam_t - lam_s0
    local prev
    if self.lower_order_nums < 1 or lower_final then
        prev = sample * (s_t / s_s) - x0 * (a_t * (math.exp(-h) - 1))
    else
        local a_s1, s_s1 = alpha_sigma(self.sigmas[i - 1])
        local h0 = lam_s0 - lambda(a_s1, s_s1)
        local r0 = h0 / h
        local d1 = (self.model_outputs[2] - self.model_outputs[1]) * (1 / r0)
        local c = a_t * (math.exp(-h) - 1)
        prev = sample * (s_t / s_s) - x0 * c - d1 * (0.5 * c)
    end
    if self.lower_order_nums < cfg.solver_order then self.lower_order_nums = self.lower_order_nums + 1 end
    self.step_index = i + 1
    return prev, x0
end

return DPM
