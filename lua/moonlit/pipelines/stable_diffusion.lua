-- moonlit.pipelines.stable_diffusion — text to image, as diffusers'
-- StableDiffusionPipeline does it: classifier-free guidance with the
-- unconditional (negative prompt) half first, the scheduler's
-- init_noise_sigma and scale_model_input, VAE decode of latents / scaling.
--
-- generate(m, {prompt = "..." | {...}, negative_prompt = "" | {...},
--              num_images_per_prompt = 1, height = 512, width = 512,
--              num_inference_steps = 50, guidance_scale = 7.5, seed = nil,
--              scheduler = nil (name: pndm, ddim, euler, ...), latents = nil (NHWC),
--              eta = 0 (DDIM only: the share of fresh noise per step, as
--                       diffusers' DDIMScheduler.step eta),
--              callback = fn(step, t, latents)})
-- Unknown option names are errors (see moonlit.options).
--   -> images [B, H, W, 3] f32 in [0, 1] (CPU), plus info {seed, steps, ...}
local core = require "moonlit.core"
local schedulers = require "moonlit.schedulers"
local options = require "moonlit.options"

local P = {}

local function as_list(v, n)
    if type(v) == "table" then return v end
    local out = {}
    for i = 1, n do out[i] = v end
    return out
end

function P.encode_prompts(m, prompts)
    local ids = m.tokenizer:encode_batch(prompts, {padding = "max_length", max_length = 77, truncation = true})
    local dev = m.device or "cpu"
    return m.text_encoder(ids:to(dev))
end

P.OPTIONS = {"prompt", "negative_prompt", "num_images_per_prompt", "height", "width", "num_inference_steps",
             "steps", "guidance_scale", "seed", "scheduler", "latents", "callback", "eta"}

-- Schedulers whose step takes eta (diffusers passes eta only to those).
local TAKES_ETA = {DDIMScheduler = true}

function P.generate(m, o)
    o = options.check_options("sd.generate", o, P.OPTIONS)
    assert(m.unet and m.vae and m.text_encoder and m.tokenizer, "generate: the model needs unet, vae, text_encoder and tokenizer")
    local prompts = type(o.prompt) == "table" and o.prompt or {o.prompt or ""}
    local per = o.num_images_per_prompt or 1
    local negs = as_list(o.negative_prompt or "", #prompts)
    if #negs ~= #prompts then error("generate: negative_prompt list must match the prompt list", 2) end
    local steps = o.num_inference_steps or o.steps or 50
    local guidance = o.guidance_scale or 7.5
    local ucfg = m.unet.config
    local vae_scale = 2 ^ (#m.vae.config.block_out_channels - 1)
    local height = o.height or ucfg.sample_size * vae_scale
    local width = o.width or ucfg.sample_size * vae_scale
    if height % vae_scale ~= 0 or width % vae_scale ~= 0 then
        error(string.format("generate: height and width must be multiples of %d (got %dx%d)", vae_scale, height, width), 2)
    end
    local dev = m.device or "cpu"
    local sch = o.scheduler and schedulers.from_config(m.scheduler.config, o.scheduler) or
                schedulers.from_config(m.scheduler.config)
    local eta = o.eta or 0
    if type(eta) ~= "number" or eta < 0 or eta ~= eta then
        error("generate: option 'eta' must be a number >= 0 (got " .. tostring(o.eta) .. ")", 2)
    end
    local sch_name = sch.config._class_name
    if eta ~= 0 and not TAKES_ETA[sch_name] then
        error("generate: option 'eta' applies to the DDIM scheduler only (this run uses " .. tostring(sch_name) ..
              "; pass scheduler = \"ddim\")", 2)
    end
    local step_opts = eta ~= 0 and {eta = eta} or nil
    local seed = o.seed
    if seed ~= nil and math.type(seed) ~= "integer" then
        error("generate: option 'seed' must be an integer (got " .. tostring(seed) .. ")", 2)
    end
    if seed then core.manual_seed(seed) end

    local udt = m.unet.conv_in.weight.dtype
    return core.no_grad(require("moonlit.sd").autocast, m, function()
        local all_p, all_n = {}, {}
        for i, p in ipairs(prompts) do
            for _ = 1, per do all_p[#all_p + 1] = p; all_n[#all_n + 1] = negs[i] end
        end
        local b = #all_p
        local cfg = guidance > 1
        local cond = P.encode_prompts(m, all_p)
        local context = cond
        if cfg then context = core.cat({P.encode_prompts(m, all_n), cond}, 1) end

        local lc = ucfg.in_channels
        local latents = o.latents
        if latents then
            latents = latents:to{device = dev, dtype = "f32"}
        else
            latents = core.randn({b, height // vae_scale, width // vae_scale, lc}, {device = dev})
        end
        sch:set_timesteps(steps)
        latents = latents * sch.init_noise_sigma
        for i, t in ipairs(sch.timesteps) do
            local x = cfg and core.cat({latents, latents}, 1) or latents
            x = sch:scale_model_input(x, t)
            -- the sampler works in f32; the networks take their weights' dtype (bf16-sr)
            local eps = m.unet(x:to(udt), t, context):float()
            if cfg then
                local u, c = eps:chunk(2, 1)
                eps = u + (c - u) * guidance
            end
            latents = sch:step(eps, t, latents, step_opts)
            if o.callback then o.callback(i, t, latents) end
        end
        local img = m.vae:decode((latents / m.vae.scaling_factor):to(m.vae.decoder.conv_in.weight.dtype))
        img = core.clamp(img:float() / 2 + 0.5, 0, 1):to("cpu")
        return img, {seed = seed, steps = steps, guidance = guidance, scheduler = sch.config._class_name,
                     prompts = all_p, negative_prompts = all_n, height = height, width = width}
    end)
end

return P
