-- pretrain_toy.lua — train the toy Stable Diffusion (models/toy-shapes) from
-- scratch on the synthetic shapes of scripts/shapes_dataset.lua, which never
-- show the held-out yellow star.
--
--   moonlit scripts/pretrain_toy.lua --out DIR [--device cuda] [--max_minutes 7] ...
--
-- Two stages, on one pool of pictures rendered once on the device:
--   1. the VAE: reconstruction MSE plus a small KL term, decoding a sample
--      of the posterior; then scaling_factor = 1 / std of the latents;
--   2. UNet + text encoder together on the pool's latents (a fresh posterior
--      sample every step) and captions: epsilon prediction with the DDPM
--      noise of the scheduler config, 10% of the captions replaced by "" so
--      classifier-free guidance works, AdamW with warm-up and cosine decay.
-- DIR receives the diffusers folder (weights in f16), written after stage 1
-- and again every --save_every_s seconds and at the end, so a run that is
-- stopped still leaves a usable model, plus vae_reconstructions.png and
-- samples.png (a few captions, the held-out one included).
-- --steps is an upper bound: stage 2 also stops at --max_minutes of wall
-- time since the start (its cosine schedule is then cut short).
local ml = require "moonlit"
local S = dofile("scripts/shapes_dataset.lua")

local function parse(argv)
    local p = require("moonlit.argparse").new("pretrain_toy.lua",
        "Pretrain the toy shapes Stable Diffusion (VAE, then UNet + text encoder) from scratch.")
    p:option("out", {type = "string", required = true, help = "output diffusers folder"})
    p:option("configs", {type = "string", default = "configs/toy-shapes", help = "folder of model configs"})
    p:option("tokenizer", {type = "string", default = "models/toy-shapes/tokenizer",
                           help = "CLIP tokenizer folder (vocab.json + merges.txt, see scripts/fetch_clip_vocab.sh)"})
    p:option("device", {type = "string", help = "cpu, cuda or cuda:N (default: cuda when there is a GPU)"})
    p:option("seed", {type = "integer", default = 0, help = "seed of the pictures, the weights and the noise"})
    p:option("pool", {type = "integer", default = 40000, help = "pictures rendered once and trained on"})
    p:option("vae_steps", {type = "integer", default = 1500, help = "VAE optimizer steps (0 with --vae_from)"})
    p:option("vae_batch", {type = "integer", default = 64, help = "VAE batch size"})
    p:option("vae_lr", {type = "number", default = 1e-3, help = "VAE learning rate"})
    p:option("kl_weight", {type = "number", default = 1e-4, help = "weight of the KL term (per latent element) against the pixel MSE"})
    p:option("vae_from", {type = "string", help = "take the VAE from this diffusers folder and skip stage 1"})
    p:option("steps", {type = "integer", default = 5500, help = "UNet + text encoder optimizer steps (at most)"})
    p:option("batch", {type = "integer", default = 256, help = "UNet batch size"})
    p:option("lr", {type = "number", default = 8e-4, help = "UNet + text encoder peak learning rate"})
    p:option("warmup", {type = "integer", default = 300, help = "linear warm-up steps of both stages"})
    p:option("caption_dropout", {type = "number", default = 0.1, help = "fraction of captions replaced by \"\""})
    p:option("precision", {type = "string", default = "f32", choices = {"f32", "bf16-mixed"},
                           help = "bf16-mixed computes in bf16 with f32 weights (GPU only; slower for a model this small)"})
    p:option("max_minutes", {type = "number", default = 6.4, help = "stop stage 2 at this wall time since the start"})
    p:option("save_every_s", {type = "number", default = 100, help = "seconds between saves of stage 2"})
    p:option("log_every", {type = "integer", default = 250, help = "steps between progress lines"})
    p:option("sample_steps", {type = "integer", default = 25, help = "denoising steps of samples.png"})
    p:option("guidance", {type = "number", default = 4.0, help = "guidance scale of samples.png"})
    local a = p:parse(argv)
    local function bad(msg) io.stderr:write("pretrain_toy: " .. msg .. "\n") os.exit(2) end
    for _, k in ipairs {"pool", "vae_batch", "batch", "log_every", "sample_steps"} do
        if a[k] < 1 then bad("--" .. k .. " must be >= 1") end
    end
    for _, k in ipairs {"vae_steps", "steps", "warmup"} do
        if a[k] < 0 then bad("--" .. k .. " must be >= 0") end
    end
    if a.caption_dropout < 0 or a.caption_dropout > 1 then bad("--caption_dropout must be in [0, 1]") end
    a.device = a.device or ml.train.default_device()
    if a.precision ~= "f32" and not a.device:match("^cuda") then bad("--precision " .. a.precision .. " needs --device cuda") end
    if not ml.core.is_file(a.tokenizer .. "/vocab.json") and not ml.core.is_file(a.tokenizer .. "/tokenizer.json") then
        bad("--tokenizer " .. a.tokenizer .. " has no vocab.json or tokenizer.json (run scripts/fetch_clip_vocab.sh)")
    end
    return a
end

local a = parse(arg)
local dev = a.device
local t_start = ml.now()
local function elapsed() return ml.now() - t_start end
local function log(fmt, ...) print(string.format("[%6.1fs] " .. fmt, elapsed(), ...)) io.stdout:flush() end
local function compute(fn)
    if a.precision == "bf16-mixed" then return ml.nn.autocast("bf16", fn) end
    return fn()
end
local function sync() if dev:match("^cuda") then ml.cuda.synchronize() end end

-- ---- the model ------------------------------------------------------------------

local m = ml.sd.from_configs(a.configs, {seed = a.seed, device = dev})
m.device = dev
m.tokenizer_dir = a.tokenizer
m.tokenizer = ml.load_tokenizer(a.tokenizer)
if a.vae_from then
    m.vae = ml.sd.load_component(a.vae_from .. "/vae", "vae", {device = dev})
end
local ddpm = require("moonlit.schedulers").from_config(m.scheduler_config, "ddpm")
for _, c in ipairs {"vae", "unet", "text_encoder"} do
    log("%s: %d parameters", c, m[c]:num_parameters())
end

local function save(what)
    ml.sd.save(a.out, m, {dtype = "f16"})
    log("saved %s to %s", what, a.out)
end

-- ---- the picture pool -------------------------------------------------------------

local specs = S.sample(a.seed, a.pool)
local caption_of, captions, caption_index = {}, {}, {}
for i, s in ipairs(specs) do
    local c = S.caption(s)
    if not caption_index[c] then captions[#captions + 1] = c; caption_index[c] = #captions end
    caption_of[i] = caption_index[c]
end
captions[#captions + 1] = ""                        -- the dropped caption, last
local EMPTY = #captions
local caption_ids = m.tokenizer:encode_batch(captions, {padding = "max_length", max_length = 77, truncation = true}):to(dev)
local pool = {}
for first = 1, a.pool, 2048 do
    local part = {}
    for i = first, math.min(a.pool, first + 2047) do part[#part + 1] = specs[i] end
    pool[#pool + 1] = S.render(part, {device = dev})
end
pool = ml.cat(pool, 1)                               -- [P, 64, 64, 3] in [0, 1]
sync()
log("pool: %d pictures, %d distinct captions, rendered", a.pool, #captions - 1)

-- Batch indices drawn in Lua (seeded), so the caption dropout is decided
-- without reading anything back from the device.
local rng_state = a.seed * 7919 + 1
local function uniform()
    rng_state = (rng_state * 6364136223846793005 + 1442695040888963407)
    return (rng_state >> 11) * 2.0 ^ -53
end
local function draw(n)
    local idx = {}
    for i = 1, n do idx[i] = math.floor(uniform() * a.pool) + 1 end
    return idx
end

local function grid(rows)      -- list of lists of [H, W, 3] -> one picture
    local out = {}
    for r, row in ipairs(rows) do out[r] = ml.cat(row, 2) end
    return ml.cat(out, 1)
end

-- ---- stage 1: the VAE ---------------------------------------------------------------

local function train_vae()
    local vae = m.vae
    vae:train()
    local params = vae:parameters()
    local opt = ml.optim.AdamW(params, {lr = a.vae_lr, weight_decay = 0})
    local sched = ml.train.lr_schedule.new{name = "cosine", base_lr = a.vae_lr, warmup_steps = math.min(a.warmup, a.vae_steps),
                                           total_steps = a.vae_steps}
    local t0 = ml.now()
    for step = 1, a.vae_steps do
        opt.lr = sched:lr(step - 1)
        local x = ml.index_select(pool, 1, ml.tensor(draw(a.vae_batch), {dtype = "i64", device = dev})) * 2 - 1
        opt:zero_grad()
        local mse, kl = compute(function()
            local post = vae:encode(x)
            local recon = vae:decode(post:sample()):float()
            local mean, logvar = post.mean:float(), post.logvar:float()
            return ml.F.mse_loss(recon, x), ((mean:square() + logvar:exp() - logvar - 1) * 0.5):mean()
        end)
        local loss = mse + kl * a.kl_weight
        loss:backward()
        ml.optim.clip_grad_norm(params, 1.0)
        opt:step()
        if step % a.log_every == 0 or step == a.vae_steps then
            log("vae step %d/%d  mse %.5f  kl %.3f  lr %.2e  %.1f ms/step", step, a.vae_steps, mse:item(), kl:item(),
                opt.lr, (ml.now() - t0) * 1000 / step)
        end
    end
    vae:eval()
end

-- Posterior moments of the whole pool, and the latents' spread.
local function encode_pool()
    local means, stds = {}, {}
    ml.no_grad(function()
        for first = 1, a.pool, 1024 do
            local x = pool:narrow(1, first, math.min(1024, a.pool - first + 1)) * 2 - 1
            local post = compute(function() return m.vae:encode(x) end)
            means[#means + 1] = post.mean:float()
            stds[#stds + 1] = post.std:float()
        end
    end)
    local mean, std = ml.cat(means, 1), ml.cat(stds, 1)
    -- std of sampled latents: E[z^2] - E[z]^2 with z = mean + std * eps
    local ez = mean:mean():item()
    local ez2 = (mean:square() + std:square()):mean():item()
    return mean, std, math.sqrt(ez2 - ez * ez)
end

local function reconstruction_sheet(path)
    ml.no_grad(function()
        local x = pool:narrow(1, 1, 8)
        local r = compute(function() return m.vae:decode(m.vae:encode(x * 2 - 1):mode()) end):float()
        r = ml.clamp(r / 2 + 0.5, 0, 1)
        local top, bottom = {}, {}
        for i = 1, 8 do top[i] = x[i]:cpu(); bottom[i] = r[i]:cpu() end
        ml.image.save(path, grid({top, bottom}))
        log("vae: reconstruction mse on 8 pool pictures %.5f; %s", ml.F.mse_loss(r, x):item(), path)
    end)
end

if not a.vae_from then
    train_vae()
end
ml.core.mkdir_p(a.out)
reconstruction_sheet(a.out .. "/vae_reconstructions.png")
local lat_mean, lat_std, spread = encode_pool()
local sf = 1 / spread
m.vae.scaling_factor = sf
m.vae.config.scaling_factor = sf
if m.vae.raw_config then m.vae.raw_config.scaling_factor = sf end
log("latents: %s, std %.4f, scaling_factor %.5f", table.concat(lat_mean:size(), "x"), spread, sf)
if not a.vae_from then save("the trained VAE (UNet and text encoder still random)") end

-- ---- stage 2: UNet + text encoder ------------------------------------------------------

local SAMPLE_PROMPTS = {
    "a photo of a red circle on a blue background",
    "a photo of a striped green square on a white background",
    "a photo of a dotted purple triangle on a yellow background",
    "a photo of a white ring on a black background",
    "a photo of a blue star on an orange background",
    "a photo of an orange cross on a green background",
    "a photo of a star on a blue background",
    "a photo of a yellow star on a blue background",        -- held out: never in the pool
}

local function sample_sheet(path)
    m.unet:eval(); m.text_encoder:eval()
    local imgs = ml.sd.generate(m, {prompt = SAMPLE_PROMPTS, num_images_per_prompt = 4, num_inference_steps = a.sample_steps,
                                    guidance_scale = a.guidance, seed = a.seed, height = S.SIZE, width = S.SIZE})
    m.unet:train(); m.text_encoder:train()
    local rows = {}
    for p = 1, #SAMPLE_PROMPTS do
        local row = {}
        for k = 1, 4 do row[k] = imgs[(p - 1) * 4 + k] end
        rows[p] = row
    end
    ml.image.save(path, grid(rows), {meta = {prompts = table.concat(SAMPLE_PROMPTS, "\n")}})
    log("samples: %s (rows: %s)", path, table.concat(SAMPLE_PROMPTS, " | "))
end

local function train_unet()
    local unet, te = m.unet, m.text_encoder
    unet:train(); te:train()
    local params = {}
    for _, p in ipairs(unet:parameters()) do params[#params + 1] = p end
    for _, p in ipairs(te:parameters()) do params[#params + 1] = p end
    local opt = ml.optim.AdamW(params, {lr = a.lr, weight_decay = 1e-2})
    local sched = ml.train.lr_schedule.new{name = "cosine", base_lr = a.lr, warmup_steps = math.min(a.warmup, a.steps),
                                           total_steps = a.steps}
    local deadline = a.max_minutes * 60
    local last_save = elapsed()
    local t0, done = ml.now(), 0
    for step = 1, a.steps do
        opt.lr = sched:lr(step - 1)
        local idx = draw(a.batch)
        local cap = {}
        for i, k in ipairs(idx) do cap[i] = uniform() < a.caption_dropout and EMPTY or caption_of[k] end
        local it = ml.tensor(idx, {dtype = "i64", device = dev})
        local ids = ml.index_select(caption_ids, 1, ml.tensor(cap, {dtype = "i64", device = dev}))
        local mean, std = ml.index_select(lat_mean, 1, it), ml.index_select(lat_std, 1, it)
        local z = (mean + std * ml.randn(mean:size(), {device = dev})) * sf
        local noise = ml.randn(z:size(), {device = dev})
        local t = ml.randint(0, ddpm.config.num_train_timesteps, {a.batch}, {device = dev})
        local noisy = ddpm:add_noise(z, noise, t)
        opt:zero_grad()
        local loss = compute(function() return ml.F.mse_loss(unet(noisy, t, te(ids)):float(), noise) end)
        loss:backward()
        ml.optim.clip_grad_norm(params, 1.0)
        opt:step()
        done = step
        if step % a.log_every == 0 or step == a.steps then
            log("unet step %d/%d  loss %.4f  lr %.2e  %.1f ms/step", step, a.steps, loss:item(), opt.lr,
                (ml.now() - t0) * 1000 / step)
        end
        if elapsed() > deadline then
            log("stage 2 stops at step %d: --max_minutes %.1f reached", step, a.max_minutes)
            break
        end
        if elapsed() - last_save > a.save_every_s then
            save("step " .. step)
            sample_sheet(a.out .. "/samples.png")
            last_save = elapsed()
        end
    end
    return done
end

local steps = train_unet()
save(string.format("the model after %d UNet steps", steps))
sample_sheet(a.out .. "/samples.png")
log("done")
