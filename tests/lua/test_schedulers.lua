-- test_schedulers.lua — every scheduler against diffusers' own runs
-- (tests/fixtures/schedulers, made by scripts/make_scheduler_refs.py):
-- timesteps exactly, init_noise_sigma, and every step's prev_sample,
-- pred_original_sample and scaled model input within relative L2 1e-5, over
-- timestep spacings, steps_offset, prediction types, set_alpha_to_one,
-- clip_sample, beta schedules, DDIM's eta, DDPM's variance types, PNDM's
-- Runge-Kutta warm-up; add_noise / get_velocity; and the errors bad
-- configurations get.
local ml = require "moonlit"
local core = ml.core
local S = require "moonlit.schedulers"

local DIR = "tests/fixtures/schedulers/"
local TOL = 1e-5

local refs, R
local function load()
    if not refs then
        refs = core.json_load(DIR .. "refs.json")
        R = core.st_load(DIR .. "refs.safetensors")
    end
    return refs, R
end

local function row(t, i) return t:narrow(1, i, 1) end

-- timesteps equal, or the first place they part
local function same_timesteps(t, got, want, name)
    for i = 1, math.max(#got, #want) do
        if got[i] ~= want[i] then
            return t:assert(false, string.format("%s timesteps: #%d is %s, diffusers has %s (%d vs %d timesteps)",
                                                 name, i, tostring(got[i]), tostring(want[i]), #got, #want))
        end
    end
    return true
end

-- Runs one recorded case; stops at its first disagreement so a broken
-- scheduler reports one line per case, naming it.
local function check_case(t, c)
    local _, r = load()
    local ok, sch = pcall(S[c.class], c.config)
    if not t:assert(ok, c.name .. ": construction failed: " .. tostring(sch)) then return end
    local ok2, err = pcall(sch.set_timesteps, sch, c.num_inference_steps)
    if not t:assert(ok2, c.name .. ": set_timesteps failed: " .. tostring(err)) then return end
    if not same_timesteps(t, sch.timesteps, c.timesteps, c.name) then return end
    if not t:assertNear(sch.init_noise_sigma, c.init_noise_sigma, 1e-6 * c.init_noise_sigma,
                        c.name .. " init_noise_sigma") then return end
    if c.steps == 0 then return end
    local prev, x0, scaled = r[c.name .. ".prev"], r[c.name .. ".x0"], r[c.name .. ".scaled"]
    local sample = r.x * c.init_noise_sigma
    for i = 1, c.steps do
        local ts = sch.timesteps[i]
        local where = string.format("%s step %d (t=%s)", c.name, i, tostring(ts))
        local inp = sch:scale_model_input(sample, ts)
        if scaled and not t:assertRelErr(inp, row(scaled, i), TOL, where .. " scale_model_input") then return end
        local o = {eta = c.eta, use_clipped_model_output = c.use_clipped_model_output}
        if c.noise then o.noise = row(r.noise, i) end
        for k, v in pairs(c.churn or {}) do o[k] = v end
        local p, x = sch:step(row(r.model_output, i), ts, sample, o)
        if x0 and not t:assertRelErr(x, row(x0, i), TOL, where .. " pred_original_sample") then return end
        if not t:assertRelErr(p, row(prev, i), TOL, where .. " prev_sample") then return end
        sample = row(prev, i)
    end
end

local function cases_matching(pattern, with_steps)
    local rf = load()
    local out = {}
    for _, c in ipairs(rf.cases) do
        if c.name:match(pattern) and (c.steps > 0) == with_steps then out[#out + 1] = c end
    end
    return out
end

local function run_all(t, pattern, with_steps, at_least)
    local cs = cases_matching(pattern, with_steps)
    t:assert(#cs >= at_least, string.format("%d cases match %s, expected %d or more", #cs, pattern, at_least))
    for _, c in ipairs(cs) do check_case(t, c) end
end

local T = {}

-- sampling runs: the grid of spacings x offsets x prediction types x step
-- counts and the option cases, one test per class
function T.ddpm_sampling(t) run_all(t, "^ddpm%.", true, 20) end
function T.ddim_sampling(t) run_all(t, "^ddim%.", true, 40) end
function T.pndm_sampling(t) run_all(t, "^pndm%.", true, 40) end
function T.euler_sampling(t) run_all(t, "^euler%.", true, 20) end
function T.euler_ancestral_sampling(t) run_all(t, "^euler_a%.", true, 19) end
function T.dpmpp_2m_sampling(t) run_all(t, "^dpmpp_2m%.", true, 20) end

-- schedules alone for many step counts (1 .. num_train_timesteps)
function T.schedules(t) run_all(t, "", false, 200) end

-- alphas_cumprod, add_noise and get_velocity for the three beta schedules,
-- with a tensor of timesteps and with one Lua number per sample
function T.training_add_noise_and_velocity(t)
    local rf, r = load()
    local orig, noise, ts = r["train.original"], r["train.noise"], r["train.timesteps"]
    local n = 0
    for _, c in ipairs(rf.training) do
        local k = c.name
        if not c.class then
            n = n + 1
            local ddpm = S.DDPMScheduler(c.config)
            t:assertTensorEq(core.tensor(ddpm.alphas_cumprod), r[k .. ".alphas_cumprod"], 0, k .. " alphas_cumprod")
            t:assertRelErr(ddpm:add_noise(orig, noise, ts), r[k .. ".add_noise"], TOL, k .. " add_noise")
            t:assertRelErr(ddpm:get_velocity(orig, noise, ts), r[k .. ".velocity"], TOL, k .. " get_velocity")
            for i, tv in ipairs(ts:totable()) do
                t:assertRelErr(ddpm:add_noise(row(orig, i), row(noise, i), tv), row(r[k .. ".add_noise"], i), TOL,
                               k .. " add_noise at t=" .. tv)
                t:assertRelErr(ddpm:get_velocity(row(orig, i), row(noise, i), tv), row(r[k .. ".velocity"], i),
                               TOL, k .. " get_velocity at t=" .. tv)
            end
            -- every class shares the forward process of its betas
            for _, cls in ipairs {"DDIMScheduler", "PNDMScheduler"} do
                t:assertRelErr(S[cls](c.config):add_noise(orig, noise, ts), r[k .. ".add_noise"], TOL,
                               k .. " " .. cls .. " add_noise")
            end
        else
            n = n + 1
            local sch = S[c.class](c.config)
            sch:set_timesteps(c.num_inference_steps)
            local kts = r[k .. ".timesteps"]
            t:assertRelErr(sch:add_noise(orig, noise, kts), r[k .. ".add_noise"], TOL, k .. " add_noise")
            for i, tv in ipairs(kts:totable()) do
                t:assertRelErr(sch:add_noise(row(orig, i), row(noise, i), tv), row(r[k .. ".add_noise"], i), TOL,
                               k .. " add_noise at t=" .. tv)
            end
        end
    end
    t:assertEq(n, 6, "training records")
end

function T.init_noise_sigma_before_set_timesteps(t)
    local rf = load()
    t:assertEq(#rf.fresh, 18, "records")
    for _, c in ipairs(rf.fresh) do
        t:assertNear(S[c.class](c.config).init_noise_sigma, c.init_noise_sigma, 1e-6 * c.init_noise_sigma,
                     c.class .. " " .. c.config.timestep_spacing)
    end
end

-- a DDPM without set_timesteps steps over every training timestep (t -> t - 1)
function T.ddpm_without_set_timesteps(t)
    local rf, r = load()
    local u = rf.unscheduled
    local sch = S.DDPMScheduler(u.config)
    for i, ts in ipairs(u.timesteps) do
        local p = sch:step(row(r.model_output, i), ts, r.x, {noise = row(r.noise, i)})
        t:assertRelErr(p, row(r["unscheduled.prev"], i), TOL, "t=" .. ts)
    end
end

function T.errors(t)
    local sd = {beta_start = 0.00085, beta_end = 0.012, beta_schedule = "scaled_linear"}
    t:assertError(function() S.from_config(sd, "heun") end, "unknown scheduler 'heun'")
    t:assertError(function() S.from_config({_class_name = "LMSDiscreteScheduler"}) end,
                  "unknown scheduler 'LMSDiscreteScheduler'")
    for _, cls in ipairs {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                          "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"} do
        t:assertError(function() S[cls] {beta_schedule = "sigmoid"} end, "unsupported beta_schedule 'sigmoid'", cls)
        t:assertError(function() S[cls] {prediction_type = "flow"} end, "unsupported prediction_type 'flow'", cls)
        t:assertError(function() S[cls] {timestep_spacing = "karras"} end, "unsupported timestep_spacing 'karras'",
                      cls)
        t:assertError(function() S[cls] {trained_betas = {0.1, 0.2}} end, "trained_betas has 2 entries", cls)
        t:assertError(function() S[cls] {thresholding = true} end, "thresholding", cls)
        t:assertError(function() S[cls] {rescale_betas_zero_snr = true} end, "rescale_betas_zero_snr", cls)
        local sch = S[cls](sd)
        t:assertError(function() sch:set_timesteps(1001) end, "1001 inference steps", cls)
        t:assertError(function() sch:set_timesteps(0) end, "inference steps", cls)
        if cls ~= "DDPMScheduler" then   -- DDPM steps t -> t - 1 without a schedule
            t:assertError(function() sch:step(core.zeros {1, 2, 2, 4}, 999, core.zeros {1, 2, 2, 4}) end,
                          "step called before set_timesteps", cls)
        end
    end
    t:assertError(function() S.DDPMScheduler {variance_type = "learned_range"} end, "variance_type 'learned_range'")
    t:assertError(function() S.DPMSolverMultistepScheduler {algorithm_type = "sde-dpmsolver++"} end,
                  "algorithm_type 'sde-dpmsolver++'")
    t:assertError(function() S.EulerDiscreteScheduler {use_karras_sigmas = true} end, "use_karras_sigmas")
    t:assertError(function() S.EulerDiscreteScheduler {final_sigmas_type = "one"} end, "final_sigmas_type 'one'")
    t:assertError(function() S.EulerDiscreteScheduler {interpolation_type = "log_linear"} end,
                  "interpolation_type 'log_linear'")
    -- a timestep outside the schedule
    for _, cls in ipairs {"DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"} do
        local sch = S[cls](sd)
        sch:set_timesteps(10)
        t:assertError(function() sch:step(core.zeros {1, 2, 2, 4}, 5, core.zeros {1, 2, 2, 4}) end,
                      "timestep 5 is not in the schedule", cls)
    end
    t:assertError(function() S.PNDMScheduler(sd):set_timesteps(3) end, "Runge-Kutta warm-up needs 4")
end

return T
