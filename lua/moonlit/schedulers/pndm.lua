-- moonlit.schedulers.pndm — PNDMScheduler: pseudo numerical methods for
-- diffusion models.  With skip_prk_steps (what Stable Diffusion ships) it is
-- the PLMS linear multistep sampler warmed up by repeating a timestep;
-- without, the first 12 steps are Runge-Kutta (PRK) steps, 4 per timestep.
local C = require "moonlit.schedulers.common"

local PNDM = C.class("PNDMScheduler", {skip_prk_steps = false, set_alpha_to_one = false})
-- (prediction_type epsilon or v_prediction: see moonlit.config_check)

local ORDER = 4   -- PRK's stages per timestep and PLMS's history length

function PNDM:setup()
    self.final_alpha_cumprod = self.config.set_alpha_to_one and 1.0 or self.alphas_cumprod[1]
end

function PNDM:set_timesteps(n)
    local cfg = self.config
    n = C.check_steps(self.__name, cfg, n)
    if not cfg.skip_prk_steps and n < ORDER then
        error(string.format("%s: the Runge-Kutta warm-up needs %d or more inference steps, got %d "
                            .. "(or set skip_prk_steps)", self.__name, ORDER, n), 0)
    end
    self.num_inference_steps = n
    local base = C.reverse(C.spaced_timesteps(cfg, n, self.__name))   -- ascending
    local out = {}
    if cfg.skip_prk_steps then
        -- PLMS warms up by repeating the second-to-last timestep (as diffusers does)
        for i = #base, 1, -1 do
            out[#out + 1] = base[i]
            if i == #base - 1 then out[#out + 1] = base[i] end
        end
        self.prk_timesteps = {}
    else
        -- the last ORDER timesteps, each with its half step above, every
        -- value twice but the outermost two
        local half = cfg.num_train_timesteps // n // 2
        local pairs_ = {}
        for i = #base - ORDER + 1, #base do
            pairs_[#pairs_ + 1] = base[i]
            pairs_[#pairs_ + 1] = base[i] + half
        end
        pairs_[#pairs_] = nil
        local twice = {}
        for _, v in ipairs(pairs_) do twice[#twice + 1] = v; twice[#twice + 1] = v end
        local prk = {}
        for i = #twice - 1, 2, -1 do prk[#prk + 1] = twice[i] end
        self.prk_timesteps = prk
        for _, v in ipairs(prk) do out[#out + 1] = v end
        for i = #base - 3, 1, -1 do out[#out + 1] = base[i] end
    end
    self.timesteps = out
    self.ets = {}
    self.counter = 0
    self.cur_sample = nil
    self.cur_model_output = nil
end

function PNDM:_prev_sample(sample, t, prev_t, eps)
    local a = self.alphas_cumprod[t + 1]
    local a_prev = prev_t >= 0 and self.alphas_cumprod[prev_t + 1] or self.final_alpha_cumprod
    local beta, beta_prev = 1 - a, 1 - a_prev
    if self.config.prediction_type == "v_prediction" then
        eps = eps * math.sqrt(a) + sample * math.sqrt(beta)
    end
    local sample_coeff = math.sqrt(a_prev / a)
    local denom = a * math.sqrt(beta_prev) + math.sqrt(a * beta * a_prev)
    return sample * sample_coeff - eps * ((a_prev - a) / denom)
end

-- One Runge-Kutta stage: stages 1-3 evaluate the model at the timestep and
-- its half step, stage 4 combines them (1/6, 1/3, 1/3, 1/6) from the
-- sample the timestep started at.
function PNDM:_step_prk(model_output, t, sample)
    local k = self.counter
    local prev_t = t - (k % 2 == 1 and 0 or self.num_train_timesteps // self.num_inference_steps // 2)
    t = self.prk_timesteps[k // 4 * 4 + 1]
    local stage = k % 4
    if stage == 0 then
        self.cur_model_output = model_output * (1 / 6)
        self.ets[#self.ets + 1] = model_output
        self.cur_sample = sample
    elseif stage == 1 or stage == 2 then
        self.cur_model_output = self.cur_model_output + model_output * (1 / 3)
    else
        model_output = self.cur_model_output + model_output * (1 / 6)
        self.cur_model_output = nil
    end
    local prev = self:_prev_sample(self.cur_sample or sample, t, prev_t, model_output)
    self.counter = k + 1
    return prev
end

-- step(model_output, t, sample) -> prev_sample
function PNDM:step(model_output, t, sample)
    C.need_timesteps(self)
    if self.counter < #self.prk_timesteps then return self:_step_prk(model_output, t, sample) end
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
