-- test_config_validation.lua — the config schemas of moonlit.config_check:
-- every config in the repository passes; values of the wrong JSON type
-- (a string for a number), out of range (negative, zero groups), lists of
-- mismatched lengths, channels the groups or heads do not divide and huge
-- num_train_timesteps are refused, before anything is built, with a message
-- naming the file (or "config") and the key; unknown keys are ignored.
local ml = require "moonlit"
local util = require "testutil"
local CC = require "moonlit.config_check"
local S = require "moonlit.schedulers"
local core = ml.core

local T = {}

local UNET, VAE, CLIP = "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"
local SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"}
local SD14 = "configs/sd-v1-4/"

-- a shallow copy of cfg with keys set (a key set to `NIL` is removed)
local NIL = {}
local function with(cfg, changes)
    local out = {}
    for k, v in pairs(cfg) do out[k] = v end
    for k, v in pairs(changes) do if v == NIL then out[k] = nil else out[k] = v end end
    return out
end

local function json(path) return core.json_load(path) end

-- validate must fail with exactly `want` (when a string) after "<source>: "
local function refused(t, cls, cfg, want, what)
    local ok, msg = CC.validate(cls, cfg, "x/config.json")
    if not t:assert(not ok, (what or want) .. ": accepted") then return end
    t:assertEq(msg, "x/config.json: " .. want, what)
end

local function accepted(t, cls, cfg, what)
    local ok, msg = CC.validate(cls, cfg, "x/config.json")
    t:assert(ok, (what or cls) .. ": " .. tostring(msg))
end

-- ---- every config in the repository ----------------------------------------------------

function T.every_config_in_the_repo_passes(t)
    local classes = {unet = UNET, vae = VAE, text_encoder = CLIP}
    local p = io.popen("find configs models tests/fixtures -name config.json -o -name scheduler_config.json | sort")
    local n = {model = 0, scheduler = 0}
    for f in p:lines() do
        local comp = f:match("([%w_]+)/[%w_]+%.json$")
        local cfg = json(f)
        if comp == "scheduler" then
            n.scheduler = n.scheduler + 1
            t:assertNoError(function() S.from_config(cfg, nil, nil, f) end, f)
            -- and every other class built from its keys, as generate --scheduler does
            for _, cls in ipairs(SCHEDULERS) do
                t:assertNoError(function() S.from_config(cfg, cls, nil, f) end, f .. " as " .. cls)
            end
        elseif classes[comp] then
            n.model = n.model + 1
            accepted(t, classes[comp], cfg, f)
        end
    end
    p:close()
    t:assert(n.model >= 15 and n.scheduler >= 5, string.format("found %d model and %d scheduler configs",
                                                                n.model, n.scheduler))
end

-- the scheduler fixtures: every configuration diffusers was run with
function T.scheduler_fixture_configs_pass(t)
    local refs = json("tests/fixtures/schedulers/refs.json")
    local n = 0
    for _, sec in ipairs {"cases", "training", "fresh"} do
        for _, c in ipairs(refs[sec]) do
            n = n + 1
            local cls = c.class or "DDPMScheduler"
            t:assertNoError(function() S[cls](c.config) end, (c.name or sec) .. " " .. cls)
        end
    end
    t:assert(n > 500, n .. " configs")
end

-- ---- UNet2DConditionModel ------------------------------------------------------------

function T.unet(t)
    local u = json(SD14 .. "unet/config.json")
    accepted(t, UNET, u)
    -- unknown keys ignored; integral floats are integers; JSON null means absent
    accepted(t, UNET, with(u, {some_future_key = "x", act_fn = 7, block_out_channels = {320.0, 640, 1280, 1280},
                               num_attention_heads = core.json_null}), "unknown keys, 320.0, null")
    accepted(t, UNET, with(u, {attention_head_dim = {5, 10, 20, 20}}), "SD 2 heads per level")
    refused(t, UNET, with(u, {block_out_channels = {320, "640", 1280, 1280}}),
            'block_out_channels[2] must be a positive integer (got "640")', "string number in a list")
    refused(t, UNET, with(u, {in_channels = "4"}), 'in_channels must be a positive integer (got "4")')
    refused(t, UNET, with(u, {block_out_channels = {320, -640, 1280, 1280}}),
            "block_out_channels[2] is out of range: must be a positive integer (got -640)", "negative")
    refused(t, UNET, with(u, {block_out_channels = "320"}),
            'block_out_channels must be an array of positive integers (got "320")')
    refused(t, UNET, with(u, {block_out_channels = {}}), "block_out_channels must have at least 1 entry (got an empty table)")
    refused(t, UNET, with(u, {layers_per_block = 2.5}), "layers_per_block must be a positive integer (got 2.5)")
    refused(t, UNET, with(u, {norm_num_groups = 0}),
            "norm_num_groups is out of range: must be a positive integer (got 0)", "zero groups")
    refused(t, UNET, with(u, {norm_num_groups = 30}),
            "block_out_channels[1] = 320 is not divisible by norm_num_groups = 30")
    refused(t, UNET, with(u, {block_out_channels = {320, 640, 1280}}),
            "down_block_types has 4 entries but block_out_channels has 3 (one per level)", "mismatched lengths")
    refused(t, UNET, with(u, {up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D"}}),
            "up_block_types has 2 entries but block_out_channels has 4 (one per level)")
    refused(t, UNET, with(u, {attention_head_dim = {8, 8}}),
            "attention_head_dim has 2 entries but block_out_channels has 4 (one per level)")
    refused(t, UNET, with(u, {attention_head_dim = "8"}),
            'attention_head_dim must be a positive integer or an array of positive integers (got "8")')
    refused(t, UNET, with(u, {attention_head_dim = 7}),
            "block_out_channels[1] = 320 is not divisible by attention_head_dim = 7 (the attention heads of that level)")
    refused(t, UNET, with(u, {num_attention_heads = {8, 8, 8, 3}}),
            "block_out_channels[4] = 1280 is not divisible by num_attention_heads[4] = 3 (the attention heads of that level)")
    refused(t, UNET, with(u, {attention_head_dim = 0}),
            "attention_head_dim is out of range: must be a positive integer (got 0)")
    refused(t, UNET, with(u, {down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "SkipDownBlock2D",
                                                  "DownBlock2D"}}),
            "unsupported down_block_types[3] 'SkipDownBlock2D' (expected CrossAttnDownBlock2D or DownBlock2D)")
    refused(t, UNET, with(u, {flip_sin_to_cos = "false"}), 'flip_sin_to_cos must be true or false (got "false")')
    refused(t, UNET, with(u, {conv_in_kernel = 4}), "conv_in_kernel is out of range: must be a positive odd integer (got 4)")
    refused(t, UNET, with(u, {freq_shift = 160}),
            "freq_shift = 160 equals half of block_out_channels[1] = 320: the timestep embedding would divide by zero")
    refused(t, UNET, with(u, {mid_block_scale_factor = 0}),
            "mid_block_scale_factor is out of range: must be a positive number (got 0)")
    refused(t, UNET, with(u, {cross_attention_dim = {768, 768, 768, 768}}),
            "cross_attention_dim must be a positive integer (got an array of 4)")
    refused(t, UNET, with(u, {in_channels = NIL, cross_attention_dim = NIL}),
            "config key(s) missing for UNet2DConditionModel: cross_attention_dim, in_channels")
    -- what SD 1.x / 2.x do not use
    refused(t, UNET, with(u, {class_embed_type = "timestep"}), 'class_embed_type = "timestep" is not implemented')
    refused(t, UNET, with(u, {addition_embed_type = "text_time"}), 'addition_embed_type = "text_time" is not implemented')
    refused(t, UNET, with(u, {time_embedding_type = "fourier"}),
            "unsupported time_embedding_type 'fourier' (expected positional)")
    refused(t, UNET, with(u, {transformer_layers_per_block = {1, 2, 10, 1}}),
            "transformer_layers_per_block = 2 is not implemented (only 1)")
    refused(t, UNET, with(u, {only_cross_attention = {false, true, false, false}}),
            "only_cross_attention = true is not implemented")
    accepted(t, UNET, with(u, {only_cross_attention = false, transformer_layers_per_block = {1, 1, 1, 1}}))
end

-- ---- AutoencoderKL -------------------------------------------------------------------------

function T.vae(t)
    local v = json(SD14 .. "vae/config.json")
    accepted(t, VAE, v)
    accepted(t, VAE, with(v, {latents_mean = core.json_null, force_upcast = "yes", in_channels = NIL}), "defaults")
    refused(t, VAE, with(v, {latent_channels = "4"}), 'latent_channels must be a positive integer (got "4")')
    refused(t, VAE, with(v, {latent_channels = -4}), "latent_channels is out of range: must be a positive integer (got -4)")
    refused(t, VAE, with(v, {block_out_channels = {128, 256, 512, 500}}),
            "block_out_channels[4] = 500 is not divisible by norm_num_groups = 32")
    refused(t, VAE, with(v, {norm_num_groups = 0}), "norm_num_groups is out of range: must be a positive integer (got 0)")
    refused(t, VAE, with(v, {up_block_types = {"UpDecoderBlock2D"}}),
            "up_block_types has 1 entry but block_out_channels has 4 (one per level)")
    refused(t, VAE, with(v, {down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}}),
            "down_block_types has 3 entries but block_out_channels has 4 (one per level)")
    refused(t, VAE, with(v, {scaling_factor = "0.18215"}), 'scaling_factor must be a positive number (got "0.18215")')
    refused(t, VAE, with(v, {use_quant_conv = 0}), "use_quant_conv must be true or false (got 0)")
    refused(t, VAE, with(v, {mid_block_add_attention = false}),
            "unsupported mid_block_add_attention false (expected true)")
    refused(t, VAE, with(v, {block_out_channels = NIL}), "config key(s) missing for AutoencoderKL: block_out_channels")
end

-- ---- CLIPTextModel -------------------------------------------------------------------------

function T.clip_text(t)
    local c = json(SD14 .. "text_encoder/config.json")
    accepted(t, CLIP, c)
    refused(t, CLIP, with(c, {hidden_size = "768"}), 'hidden_size must be a positive integer (got "768")')
    refused(t, CLIP, with(c, {num_attention_heads = 0}),
            "num_attention_heads is out of range: must be a positive integer (got 0)", "heads 0 (divided by)")
    refused(t, CLIP, with(c, {num_attention_heads = 7}), "hidden_size = 768 is not divisible by num_attention_heads = 7")
    refused(t, CLIP, with(c, {num_hidden_layers = 1.5}), "num_hidden_layers must be a positive integer (got 1.5)")
    refused(t, CLIP, with(c, {hidden_act = "swiglu"}),
            "unsupported hidden_act 'swiglu' (expected quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu or silu)")
    refused(t, CLIP, with(c, {layer_norm_eps = -1e-5}),
            "layer_norm_eps is out of range: must be a positive number (got -1e-05)")
    refused(t, CLIP, with(c, {vocab_size = NIL, max_position_embeddings = NIL}),
            "config key(s) missing for CLIPTextModel: max_position_embeddings, vocab_size")
end

-- ---- schedulers --------------------------------------------------------------------------

local function sched_refused(t, cls, cfg, want, what)
    local msg = util.error_of(function() return S[cls](cfg) end)
    if not t:assert(msg, (what or want) .. ": accepted by " .. cls) then return end
    t:assertEq(msg, cls .. ": config: " .. want, what)
end

function T.schedulers_common_keys(t)
    local sd = json(SD14 .. "scheduler/scheduler_config.json")
    for _, cls in ipairs(SCHEDULERS) do
        t:assertNoError(function() S[cls](sd) end, cls)
        t:assertNoError(function() S[cls] {} end, cls .. " defaults")
        t:assertNoError(function() S[cls](with(sd, {junk = {1, 2}, num_train_timesteps = 1000.0})) end, cls .. " junk")
        sched_refused(t, cls, with(sd, {beta_start = "0.00085"}), 'beta_start must be a number in [0, 1) (got "0.00085")')
        sched_refused(t, cls, with(sd, {beta_end = 1}), "beta_end is out of range: must be a number in [0, 1) (got 1)")
        sched_refused(t, cls, with(sd, {beta_start = 0.02, beta_end = 0.01}),
                      "beta_start = 0.02 must be less than beta_end = 0.01")
        sched_refused(t, cls, with(sd, {num_train_timesteps = "1000"}),
                      'num_train_timesteps must be an integer from 2 to 1000000 (got "1000")')
        sched_refused(t, cls, with(sd, {num_train_timesteps = 1e8}),
                      "num_train_timesteps is out of range: must be an integer from 2 to 1000000 (got 100000000)")
        sched_refused(t, cls, with(sd, {num_train_timesteps = 1 << 40}),
                      "num_train_timesteps is out of range: must be an integer from 2 to 1000000 (got 1099511627776)")
        sched_refused(t, cls, with(sd, {num_train_timesteps = -1}),
                      "num_train_timesteps is out of range: must be an integer from 2 to 1000000 (got -1)")
        sched_refused(t, cls, with(sd, {steps_offset = -1}), "steps_offset is out of range: must be an integer >= 0 (got -1)")
        sched_refused(t, cls, with(sd, {steps_offset = 1000}),
                      "steps_offset = 1000 must be less than num_train_timesteps = 1000")
        sched_refused(t, cls, with(sd, {beta_schedule = 1}),
                      'beta_schedule must be one of "linear", "scaled_linear" or "squaredcos_cap_v2" (got 1)')
        sched_refused(t, cls, with(sd, {trained_betas = {0.1, "0.2"}}),
                      'trained_betas[2] must be a number in [0, 1) (got "0.2")')
        sched_refused(t, cls, with(sd, {trained_betas = {0.1, 0.2}}), "trained_betas has 2 entries, num_train_timesteps is 1000")
        sched_refused(t, cls, with(sd, {thresholding = "false"}), 'thresholding must be true or false (got "false")')
        sched_refused(t, cls, with(sd, {thresholding = true}), "thresholding = true is not implemented")
        sched_refused(t, cls, with(sd, {timestep_spacing = "karras"}),
                      "unsupported timestep_spacing 'karras' (expected leading, trailing or linspace)")
    end
    -- a bounded schedule is quick to build: the bound, not the schedule, refuses 1e8
    local t0 = os.clock()
    for _ = 1, 10 do pcall(S.DDPMScheduler, {num_train_timesteps = 1e8}) end
    t:assert(os.clock() - t0 < 1, "refusing 1e8 is immediate")
end

function T.schedulers_own_keys(t)
    sched_refused(t, "DDPMScheduler", {variance_type = "learned_range"},
                  "unsupported variance_type 'learned_range' (expected fixed_small, fixed_small_log or fixed_large)")
    sched_refused(t, "DDPMScheduler", {clip_sample_range = 0}, "clip_sample_range is out of range: must be a positive number (got 0)")
    sched_refused(t, "DDIMScheduler", {clip_sample_range = "1.0"}, 'clip_sample_range must be a positive number (got "1.0")')
    sched_refused(t, "DDIMScheduler", {set_alpha_to_one = 1}, "set_alpha_to_one must be true or false (got 1)")
    sched_refused(t, "PNDMScheduler", {skip_prk_steps = "true"}, 'skip_prk_steps must be true or false (got "true")')
    sched_refused(t, "PNDMScheduler", {prediction_type = "sample"},
                  "unsupported prediction_type 'sample' (expected epsilon or v_prediction)")
    for _, cls in ipairs {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"} do
        sched_refused(t, cls, {use_karras_sigmas = true}, "use_karras_sigmas = true is not implemented")
        sched_refused(t, cls, {use_karras_sigmas = "no"}, 'use_karras_sigmas must be true or false (got "no")')
        sched_refused(t, cls, {interpolation_type = "log_linear"}, "unsupported interpolation_type 'log_linear' (expected linear)")
    end
    sched_refused(t, "EulerDiscreteScheduler", {final_sigmas_type = "one"},
                  "unsupported final_sigmas_type 'one' (expected zero or sigma_min)")
    sched_refused(t, "EulerDiscreteScheduler", {timestep_type = "continuous"},
                  "unsupported timestep_type 'continuous' (expected discrete)")
    local D = "DPMSolverMultistepScheduler"
    sched_refused(t, D, {solver_order = 3}, "unsupported solver_order 3 (expected 2)")
    sched_refused(t, D, {solver_order = "2"}, 'solver_order must be 2 (got "2")')
    sched_refused(t, D, {algorithm_type = "sde-dpmsolver++"}, "unsupported algorithm_type 'sde-dpmsolver++' (expected dpmsolver++)")
    sched_refused(t, D, {lower_order_final = "true"}, 'lower_order_final must be true or false (got "true")')
    sched_refused(t, D, {variance_type = "learned_range"}, 'variance_type = "learned_range" is not implemented')
    sched_refused(t, D, {lambda_min_clipped = -5.1}, "lambda_min_clipped = -5.1 is not implemented (only -Infinity: no clipping)")
    sched_refused(t, D, {lambda_min_clipped = "-inf"}, 'lambda_min_clipped must be a number (got "-inf")')
    t:assertNoError(function() S[D] {lambda_min_clipped = -math.huge, use_karras_sigmas = false, variance_type = false} end,
                    "diffusers' defaults")
end

-- ---- where the configs are consumed ------------------------------------------------------

-- the constructors check before building (a table is "config")
function T.constructors_check_their_config(t)
    local U = require("moonlit.models.unet2d_condition").UNet2DConditionModel
    local V = require("moonlit.models.autoencoder_kl").AutoencoderKL
    local C = require("moonlit.models.clip_text").CLIPTextModel
    local u = json("configs/toy-shapes/unet/config.json")
    t:assertEq(util.error_of(function() return U(with(u, {block_out_channels = {32, "64"}})) end),
               'UNet2DConditionModel: config: block_out_channels[2] must be a positive integer (got "64")')
    t:assertEq(util.error_of(function() return U(with(u, {attention_head_dim = {4}})) end),
               "UNet2DConditionModel: config: attention_head_dim has 1 entry but block_out_channels has 2 (one per level)")
    t:assertEq(util.error_of(function() return V(with(json("configs/toy-shapes/vae/config.json"), {norm_num_groups = 0})) end),
               "AutoencoderKL: config: norm_num_groups is out of range: must be a positive integer (got 0)")
    t:assertEq(util.error_of(function()
        return C(with(json("configs/toy-shapes/text_encoder/config.json"), {num_attention_heads = 0}))
    end), "CLIPTextModel: config: num_attention_heads is out of range: must be a positive integer (got 0)")
    t:assertNoError(function() return U(u) end, "the toy UNet builds")
end

-- sd.load names the file and refuses a bad config before reading any weight
function T.sd_load_names_the_file(t)
    local dir = util.temp_dir()
    util.copy_tree("tests/fixtures/sd1-tiny/pipeline", dir .. "/m")
    local m = dir .. "/m"
    local u = core.json_load(m .. "/unet/config.json", {null = core.json_null})
    u.block_out_channels = core.json_array {16, "32", 32, 32}
    core.json_save(m .. "/unet/config.json", u, {indent = 2})
    os.remove(m .. "/unet/diffusion_pytorch_model.safetensors")
    t:assertEq(util.error_of(function() return ml.sd.load(m, {components = {"unet"}}) end),
               "sd.load: " .. m .. '/unet/config.json: block_out_channels[2] must be a positive integer (got "32")')
    local s = core.json_load(m .. "/scheduler/scheduler_config.json", {null = core.json_null})
    s.num_train_timesteps = 1e8
    core.json_save(m .. "/scheduler/scheduler_config.json", s, {indent = 2})
    t:assertEq(util.error_of(function() return ml.sd.load(m, {components = {"scheduler"}}) end),
               "PNDMScheduler: " .. m .. "/scheduler/scheduler_config.json: num_train_timesteps is out of range: must be "
               .. "an integer from 2 to 1000000 (got 100000000)")
    local v = core.json_load(m .. "/vae/config.json", {null = core.json_null})
    v.latent_channels = nil
    core.json_save(m .. "/vae/config.json", v, {indent = 2})
    t:assertEq(util.error_of(function() return ml.sd.from_configs(m) end),
               "sd.from_configs: " .. m .. '/unet/config.json: block_out_channels[2] must be a positive integer (got "32")')
    t:assertEq(util.error_of(function() return ml.sd.load(m, {components = {"vae"}}) end),
               "sd.load: " .. m .. "/vae/config.json: config key(s) missing for AutoencoderKL: latent_channels")
    util.remove_tree(dir)
end

function T.single_file_names_the_config(t)
    local dir = util.temp_dir()
    util.copy_tree("tests/fixtures/single_file/pipeline", dir .. "/cfg")
    local p = dir .. "/cfg/unet/config.json"
    local u = core.json_load(p, {null = core.json_null})
    u.norm_num_groups = 3
    core.json_save(p, u, {indent = 2})
    t:assertEq(util.error_of(function()
        return ml.sd.load_single_file("tests/fixtures/single_file/tiny.ckpt",
                                      {config = dir .. "/cfg", components = {"unet"}})
    end), "sd.load_single_file: " .. p .. ": block_out_channels[1] = 4 is not divisible by norm_num_groups = 3")
    util.remove_tree(dir)
end

-- diffusers writes DPM-Solver's default lambda_min_clipped as Python's bare
-- -Infinity (json.dump's allow_nan): a real scheduler_config.json reads it
-- as -math.huge, builds through from_config as sd.load does, and saves again
-- (without the key, since standard JSON cannot spell it and -Infinity is the
-- default); clipping values stay refused as before, and NaN with them
local DPM_CONFIG = [[
{
  "_class_name": "DPMSolverMultistepScheduler",
  "_diffusers_version": "0.27.0",
  "algorithm_type": "dpmsolver++",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "dynamic_thresholding_ratio": 0.995,
  "euler_at_final": false,
  "final_sigmas_type": "zero",
  "lambda_min_clipped": -Infinity,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "rescale_betas_zero_snr": false,
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "solver_order": 2,
  "solver_type": "midpoint",
  "steps_offset": 1,
  "thresholding": false,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false,
  "use_lu_lambdas": false,
  "variance_type": null
}
]]

function T.dpm_config_with_minus_infinity_loads(t)
    local dir = util.temp_dir()
    local path = dir .. "/scheduler_config.json"
    util.write_file(path, DPM_CONFIG)
    local cfg = core.json_load(path)
    t:assertEq(cfg.lambda_min_clipped, -math.huge)
    local sch = S.from_config(cfg, nil, nil, path)
    t:assertEq(sch.config.lambda_min_clipped, -math.huge)
    sch:set_timesteps(10)
    t:assertEq(#sch.timesteps, 10)
    -- the same file through sd.load's scheduler path, then saved and read back
    util.copy_tree("tests/fixtures/sd1-tiny/pipeline", dir .. "/m")
    util.write_file(dir .. "/m/scheduler/scheduler_config.json", DPM_CONFIG)
    local m = ml.sd.load(dir .. "/m", {components = {"scheduler"}})
    t:assert(getmetatable(m.scheduler) == S.DPMSolverMultistepScheduler, "a DPM-Solver scheduler")
    t:assertEq(m.scheduler_config.lambda_min_clipped, -math.huge)
    ml.sd.save(dir .. "/out", m)
    local saved = core.json_load(dir .. "/out/scheduler/scheduler_config.json")
    t:assertEq(saved.lambda_min_clipped, nil, "the default left out")
    t:assertEq(saved.solver_order, 2)
    local back = ml.sd.load(dir .. "/out", {components = {"scheduler"}})
    t:assert(getmetatable(back.scheduler) == S.DPMSolverMultistepScheduler, "read back as DPM-Solver")
    -- a clipping value, or NaN, in the file is still refused naming the file
    util.write_file(path, (DPM_CONFIG:gsub("%-Infinity", "-5.1")))
    t:assertError(function() S.from_config(core.json_load(path), nil, nil, path) end,
                  path .. ": lambda_min_clipped = -5.1 is not implemented")
    util.write_file(path, (DPM_CONFIG:gsub("%-Infinity", "NaN")))
    t:assertError(function() S.from_config(core.json_load(path), nil, nil, path) end,
                  "lambda_min_clipped must be a number (got NaN)")
    util.remove_tree(dir)
end

return T
