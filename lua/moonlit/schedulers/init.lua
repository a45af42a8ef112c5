-- moonlit.schedulers — noise schedulers built from scheduler_config.json,
-- with diffusers' names and semantics:
--   local S = require "moonlit.schedulers"
--   local sch = S.from_config(cfg)                 -- class from cfg._class_name
--   local sch = S.from_config(cfg, "euler")        -- or a chosen one, same betas
--   sch:set_timesteps(50); for _, t in ipairs(sch.timesteps) do ... sch:step(eps, t, x) end
local S = {}

local euler = require "moonlit.schedulers.euler"
S.DDPMScheduler = require "moonlit.schedulers.ddpm"
S.PNDMScheduler = require "moonlit.schedulers.pndm"
S.DDIMScheduler = require "moonlit.schedulers.ddim"
S.EulerDiscreteScheduler = euler.EulerDiscreteScheduler
S.EulerAncestralDiscreteScheduler = euler.EulerAncestralDiscreteScheduler
S.DPMSolverMultistepScheduler = require "moonlit.schedulers.dpmpp_2m"

local aliases = {
    ddpm = "DDPMScheduler", pndm = "PNDMScheduler", plms = "PNDMScheduler", ddim = "DDIMScheduler",
    euler = "EulerDiscreteScheduler", euler_a = "EulerAncestralDiscreteScheduler",
    euler_ancestral = "EulerAncestralDiscreteScheduler", dpmpp_2m = "DPMSolverMultistepScheduler",
    ["dpm++2m"] = "DPMSolverMultistepScheduler", dpmpp2m = "DPMSolverMultistepScheduler",
}

function S.class_name(name)
    if S[name] and type(S[name]) == "table" and name:match("Scheduler$") then return name end
    return aliases[name]
end

-- Keys that describe one scheduler class's own behaviour and do not carry
-- over when another class is built from the same config (diffusers keeps
-- them too, but each class then applies its own defaults for keys it lacks).
local carried = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
                 "clip_sample_range", "skip_prk_steps", "rescale_betas_zero_snr"}

-- from_config(cfg, [name], [overrides], [source]): cfg as read from scheduler_config.json.
-- The names from_config accepts, for error messages.
local function known_names()
    local list = {}
    for k in pairs(aliases) do list[#list + 1] = k end
    for k, v in pairs(S) do
        if type(v) == "table" and k:match("Scheduler$") then list[#list + 1] = k end
    end
    table.sort(list)
    return table.concat(list, ", ")
end

-- A name that is given must be known: it never falls back to the config's
-- own class (asking for "lms" and silently sampling with PNDM).  source: the
-- file cfg was read from, named in config errors.
function S.from_config(cfg, name, overrides, source)
    if name ~= nil and (type(name) ~= "string" or not S.class_name(name)) then
        error("scheduler: unknown scheduler " .. (type(name) == "string" and "'" .. name .. "'" or tostring(name)) ..
              " (accepted: " .. known_names() .. ")", 2)
    end
    local cls_name = name and S.class_name(name) or cfg._class_name
    local cls = cls_name and S[cls_name]
    if not cls then
        error("scheduler: " .. (source and source .. ": " or "") .. "unknown scheduler '" .. tostring(cfg._class_name) ..
              "' (the config's _class_name; accepted: " .. known_names() .. ")", 2)
    end
    local c = {}
    if name and cls_name ~= cfg._class_name then
        for _, k in ipairs(carried) do c[k] = cfg[k] end
    else
        for k, v in pairs(cfg) do c[k] = v end
    end
    for k, v in pairs(overrides or {}) do c[k] = v end
    return cls(c, source)
end

return S
