-- moonlit.pipelines.generate_images — many images of many prompts, in
-- batches, each one reproducible on its own: the generation step of
-- examples/generate.lua and of DreamBooth's class and validation images.
--
--   local gen = require("moonlit.pipelines.generate_images").generate_images
--   local made, info = gen(m, {prompts = {...}, num_samples_per_prompt = 1, seed = 0,
--       batch_size = 1, steps = 50, guidance_scale = 7.5, scheduler = nil,
--       negative_prompt = "" (or one per prompt), height = nil, width = nil,
--       output_dir = nil, name = fn(prompt_idx, sample_idx, seed) -> file name,
--       skip_existing = false, progress = fn(done, total, batch_seconds), meta = {...},
--       only = fn(prompt_idx, sample_idx) -> bool (make only these: a worker's share),
--       model = name for the PNG metadata (default m.dir), eta = 0 (DDIM only)})
--   Unknown option names are errors (see moonlit.options).
--   -> made: list of {path, prompt, prompt_idx, sample_idx, seed, image [H,W,3] in [0,1]},
--      info: {generated, skipped, seconds, scheduler, height, width}
--
-- Seeds: image s of prompt p (1-based) has seed `seed + (p-1)*n + (s-1)`
-- (n = num_samples_per_prompt), and its initial latents are drawn on the CPU
-- right after ml.manual_seed(that seed), one image at a time; a batch is
-- those latents stacked.  So every image comes out the same whatever the
-- batch size and whichever other images are made with it: rerunning with
-- --seed <its seed> --num_samples_per_prompt 1 gives it again.  Samplers
-- that add noise at every step (euler_ancestral, ddpm) would draw that noise
-- for the whole batch; for them batches are of one image, seeded the same way.
--
-- With output_dir every image is saved there as PNG (atomically, by
-- ml.image.save) with its prompt, negative prompt, seed, steps, scheduler,
-- guidance, size and model in the text chunks.  With skip_existing, images
-- whose file is already there are not made again (and not returned), so an
-- interrupted run resumes with the seeds the missing ones would have had.
local core = require "moonlit.core"
local image = require "moonlit.image"
local schedulers = require "moonlit.schedulers"
local pipeline = require "moonlit.pipelines.stable_diffusion"
local options = require "moonlit.options"

local G = {}

-- Samplers whose step draws fresh noise for the batch.
local STOCHASTIC = {EulerAncestralDiscreteScheduler = true, DDPMScheduler = true}

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

-- p00-s000-seed42.png: 0-based prompt and sample numbers, then the seed.
function G.default_name(prompt_idx, sample_idx, seed)
    return string.format("p%02d-s%03d-seed%d.png", prompt_idx - 1, sample_idx - 1, seed)
end

local function positive_integer(v, what, default)
    if v == nil then return default end
    if math.type(v) ~= "integer" or v < 1 then
        error(string.format("generate_images: %s must be an integer >= 1 (got %s)", what, tostring(v)), 3)
    end
    return v
end

G.OPTIONS = {"prompts", "num_samples_per_prompt", "seed", "batch_size", "steps", "guidance_scale", "scheduler",
             "negative_prompt", "height", "width", "output_dir", "name", "skip_existing", "progress", "meta", "only",
             "model", "eta"}

function G.generate_images(m, o)
    o = options.check_options("generate_images", o, G.OPTIONS)
    local prompts = o.prompts
    if type(prompts) == "string" then prompts = {prompts} end
    if type(prompts) ~= "table" or #prompts == 0 then error("generate_images: prompts must be a non-empty list", 2) end
    for i, p in ipairs(prompts) do
        if type(p) ~= "string" then error("generate_images: prompt " .. i .. " is not a string", 2) end
    end
    local negs = o.negative_prompt or ""
    if type(negs) == "string" then
        local one = negs
        negs = {}
        for i = 1, #prompts do negs[i] = one end
    elseif type(negs) ~= "table" or #negs ~= #prompts then
        error("generate_images: negative_prompt must be a string or one per prompt", 2)
    end
    local per = positive_integer(o.num_samples_per_prompt, "num_samples_per_prompt", 1)
    local batch = positive_integer(o.batch_size, "batch_size", 1)
    local steps = positive_integer(o.steps, "steps", 50)
    local guidance = o.guidance_scale or 7.5
    if type(guidance) ~= "number" then error("generate_images: guidance_scale must be a number", 2) end
    local seed = o.seed or 0
    local total = #prompts * per
    if math.type(seed) ~= "integer" or seed < 0 or seed > math.maxinteger - total then
        error("generate_images: seed must be an integer >= 0 (and seed + image count must fit in 64 bits)", 2)
    end
    if o.skip_existing and not o.output_dir then error("generate_images: skip_existing needs output_dir", 2) end
    local name = o.name or G.default_name

    local sch = schedulers.from_config(m.scheduler.config, o.scheduler)
    local sch_name = sch.config._class_name
    if STOCHASTIC[sch_name] then batch = 1 end
    local ucfg = m.unet.config
    local vae_scale = 1 << (#m.vae.config.block_out_channels - 1)
    local height = o.height or ucfg.sample_size * vae_scale
    local width = o.width or ucfg.sample_size * vae_scale
    -- any multiple of the VAE's factor: the UNet upsamples to each skip's
    -- size when the latents do not halve exactly at every level
    if math.type(height) ~= "integer" or math.type(width) ~= "integer" or height < vae_scale or width < vae_scale or
       height % vae_scale ~= 0 or width % vae_scale ~= 0 then
        error(string.format("generate_images: height and width must be positive multiples of %d for this model " ..
                            "(got %s x %s)", vae_scale, tostring(height), tostring(width)), 2)
    end
    local latent_shape = {1, height // vae_scale, width // vae_scale, ucfg.in_channels}

    -- every image to make, in prompt-major order
    local jobs, skipped = {}, 0
    for p = 1, #prompts do
        for s = 1, per do
            local sd_seed = seed + (p - 1) * per + (s - 1)
            local path
            if o.output_dir then
                local file = name(p, s, sd_seed)
                if type(file) ~= "string" or file == "" then
                    error("generate_images: name(" .. p .. ", " .. s .. ", " .. sd_seed .. ") gave no file name", 2)
                end
                path = join(o.output_dir, file)
            end
            if o.only and not o.only(p, s) then
                -- another worker's share (data-parallel class images): not made here
            elseif o.skip_existing and core.is_file(path) then
                skipped = skipped + 1
            else
                jobs[#jobs + 1] = {prompt_idx = p, sample_idx = s, seed = sd_seed, path = path,
                                   prompt = prompts[p], negative_prompt = negs[p]}
            end
        end
    end
    if o.output_dir and #jobs > 0 then core.mkdir_p(o.output_dir) end

    local model_name = o.model or m.dir
    local made, t0 = {}, core.now()
    for first = 1, #jobs, batch do
        local tb = core.now()
        local group, latents, ps, ns = {}, {}, {}, {}
        for k = first, math.min(first + batch - 1, #jobs) do
            local j = jobs[k]
            group[#group + 1] = j
            core.manual_seed(j.seed)
            latents[#latents + 1] = core.randn(latent_shape)
            ps[#ps + 1], ns[#ns + 1] = j.prompt, j.negative_prompt
        end
        local imgs = pipeline.generate(m, {prompt = ps, negative_prompt = ns, num_images_per_prompt = 1,
                                           num_inference_steps = steps, guidance_scale = guidance,
                                           scheduler = o.scheduler, height = height, width = width, eta = o.eta,
                                           latents = #latents == 1 and latents[1] or core.cat(latents, 1)})
        for k, j in ipairs(group) do
            j.image = imgs:select(1, k)
            if j.path then
                local meta = {prompt = j.prompt, negative_prompt = j.negative_prompt, seed = j.seed, steps = steps,
                              scheduler = sch_name, guidance = guidance, height = height, width = width,
                              model = model_name}
                for mk, mv in pairs(o.meta or {}) do meta[mk] = mv end
                image.save(j.path, j.image, {meta = meta})
            end
            made[#made + 1] = j
        end
        if o.progress then o.progress(#made, #jobs, core.now() - tb) end
    end
    return made, {generated = #made, skipped = skipped, seconds = core.now() - t0, scheduler = sch_name,
                  height = height, width = width}
end

return G
