-- dreambooth.lua — fine-tune Stable Diffusion on a few photos of a subject
-- (DreamBooth with prior preservation), the way the Ray Train DreamBooth
-- example does it: class images from the pretrained model, instance images
-- repeated to the class-image count and zipped 1:1 with them, UNet + text
-- encoder trained with the prior-preserving loss, a diffusers folder out.
--
--   moonlit examples/dreambooth.lua --model_dir <sd folder> --output_dir out \
--       --instance_images_dir photos/ --instance_prompt "photo of unqtkn dog" \
--       --class_images_dir class/ --class_prompt "photo of a dog"
--
-- `--help` lists every flag.  Steps: load the model once; generate the class
-- images that are missing (same process, same weights); seed the training
-- stream from --seed; train (checkpoints, validation samples, metrics.jsonl);
-- save the tuned model.  Run as a module (loadfile(path)({as_module = true}))
-- it returns its pieces without running, for tests.
local ml = require "moonlit"
local argparse = require "moonlit.argparse"

local generate_images = require("moonlit.pipelines.generate_images").generate_images

local M = {}

-- ---- flags ----------------------------------------------------------------------

function M.parser()
    local p = argparse.new("dreambooth.lua",
        "Fine-tune Stable Diffusion on photos of a subject (DreamBooth with prior preservation).")
    -- the reference recipe's flags, names and defaults
    p:option("model_dir", {type = "string", required = true, help = "pretrained diffusers model folder"})
    p:option("output_dir", {type = "string", required = true, help = "where the tuned model, checkpoints, samples and metrics go"})
    p:option("instance_images_dir", {type = "string", required = true, help = "photos of the subject"})
    p:option("instance_prompt", {type = "string", required = true, help = "prompt naming the subject, e.g. \"photo of unqtkn dog\""})
    p:option("class_images_dir", {type = "string", required = true, help = "class (regularisation) images; missing ones are generated"})
    p:option("class_prompt", {type = "string", required = true, help = "prompt of the class, e.g. \"photo of a dog\""})
    p:option("train_batch_size", {type = "integer", default = 1, help = "instance images per step (as many class images are added)"})
    p:option("lr", {type = "number", default = 5e-6, help = "learning rate (AdamW)"})
    p:option("num_epochs", {type = "integer", default = 4, help = "passes over the zipped instance/class dataset"})
    p:option("max_train_steps", {type = "integer", default = 800, help = "stop after this many optimizer steps"})
    p:option("prior_loss_weight", {type = "number", default = 1.0, help = "weight of the class-image (prior) loss"})
    p:option("max_grad_norm", {type = "number", default = 1.0, help = "gradient clipping (total 2-norm)"})
    p:option("num_workers", {type = "integer", default = 1,
                             help = "data-parallel workers on this machine (one GPU each; docs/dist.md)"})
    -- several machines (docs/dist.md): each node runs this command with its node_rank
    p:option("nnodes", {type = "integer", default = 1, help = "machines taking part (each starts --num_workers workers)"})
    p:option("node_rank", {type = "integer", default = 0, help = "this machine's index, 0 .. nnodes-1"})
    p:option("master_addr", {type = "string", help = "address of node 0, reachable from every node (needed when nnodes > 1)"})
    p:option("master_port", {type = "integer", help = "TCP port on node 0 for the rendezvous (default: a free one, or 29500 across nodes)"})
    -- the flags of diffusers' train_dreambooth.py that users reach for
    p:option("seed", {type = "integer", default = 0, help = "seed of the training stream, the data order and the class images"})
    p:option("resolution", {type = "integer", default = 512, help = "training (and class image) size in pixels"})
    p:option("center_crop", {type = "boolean", default = false, help = "center crop instead of a random crop"})
    p:option("random_flip", {type = "boolean", default = false, help = "random horizontal flips of the training images"})
    p:option("precision", {type = "string", choices = {"f32", "bf16-mixed", "bf16-sr"}, help =
                           "f32, bf16-mixed (f32 weights, bf16 compute) or bf16-sr (bf16 weights, stochastic rounding); " ..
                           "default bf16-mixed on a GPU, f32 on the CPU"})
    p:option("device", {type = "string", help = "cpu, cuda or cuda:N (default: cuda when there is a GPU)"})
    p:option("num_class_images", {type = "integer", default = 100, help = "class images wanted in class_images_dir"})
    p:option("sample_batch_size", {type = "integer", default = 4, help = "batch size of class-image and validation generation"})
    p:option("num_inference_steps", {type = "integer", default = 50, help = "denoising steps of class and validation images"})
    p:option("guidance_scale", {type = "number", default = 7.5, help = "guidance of class and validation images"})
    p:option("train_text_encoder", {type = "boolean", default = true, help = "train the text encoder too (the reference does)"})
    p:option("lr_scheduler", {type = "string", default = "constant", choices = ml.train.lr_schedule.names,
                              help = "learning-rate schedule"})
    p:option("lr_warmup_steps", {type = "integer", default = 0, help = "linear warm-up steps of the schedule"})
    p:option("gradient_accumulation_steps", {type = "integer", default = 1, help = "micro-batches per optimizer step"})
    p:option("gradient_checkpointing", {type = "boolean", default = false,
                                        help = "recompute the UNet's (and a trained text encoder's) blocks in backward "
                                            .. "instead of keeping their activations: less memory, one more forward"})
    p:option("autocast_cache", {type = "boolean", default = true,
                                help = "bf16-mixed: keep bf16 copies of the weights across steps (false: convert them "
                                    .. "each forward and again in backward, 1.8 GiB less at SD 1.4's peak, a few % slower)"})
    p:option("cache_latents", {type = "boolean", default = false,
                               help = "encode each training image once (twice with --random_flip) before training and "
                                   .. "sample its latents from the kept posterior every step (needs --center_crop): no "
                                   .. "VAE encoder in the step"})
    p:option("adam_weight_decay", {type = "number", default = 1e-2, help = "AdamW weight decay"})
    p:option("checkpointing_steps", {type = "integer", default = 500, help = "save a resumable checkpoint every N steps (0: never)"})
    p:option("checkpoints_total_limit", {type = "integer", help = "keep only the N newest checkpoints"})
    p:option("resume_from_checkpoint", {type = "string", help = "'latest' or a checkpoint folder to continue from"})
    p:option("validation_prompt", {type = "string", help = "sample this prompt before training, every validation_steps and at the end"})
    p:option("validation_steps", {type = "integer", default = 100, help = "steps between validation samples"})
    p:option("num_validation_images", {type = "integer", default = 4, help = "images per validation"})
    p:option("snr_gamma", {type = "number", help = "min-SNR loss weighting gamma (5.0 is the usual value)"})
    p:option("offset_noise", {type = "boolean", default = false, help = "add offset noise (0.1 per channel) to the noise"})
    p:option("save_dtype", {type = "string", default = "f32", choices = {"f32", "f16", "bf16"}, help = "dtype of the saved model"})
    p:option("save_single_file", {type = "string",
                                  help = "also write the tuned model as one .safetensors in the original (LDM) layout the web UIs load"})
    -- LoRA (docs/lora.md): the Ray example's --use_lora
    p:option("use_lora", {type = "boolean", default = false,
                          help = "train LoRA adapters on the UNet's attention projections only; saves pytorch_lora_weights.safetensors"})
    p:option("lora_rank", {type = "integer", default = 4, help = "rank of the LoRA adapters"})
    p:option("lora_alpha", {type = "number", help = "LoRA alpha (scale alpha/rank; default: the rank)"})
    p:option("lora_text_encoder", {type = "boolean", default = false, help = "with --use_lora, adapters in the text encoder too"})
    return p
end

-- Flags that parse but do not fit together; errors name them.
function M.check_args(a)
    local function bad(msg) error("dreambooth: " .. msg, 0) end
    if a.train_batch_size < 1 then bad("--train_batch_size must be >= 1") end
    if a.gradient_accumulation_steps < 1 then bad("--gradient_accumulation_steps must be >= 1") end
    if a.num_epochs < 1 then bad("--num_epochs must be >= 1") end
    if a.max_train_steps < 1 then bad("--max_train_steps must be >= 1") end
    if a.resolution < 8 or a.resolution % 8 ~= 0 then bad("--resolution must be a positive multiple of 8") end
    if a.num_class_images < 0 then bad("--num_class_images must be >= 0") end
    if a.lr < 0 then bad("--lr must be >= 0") end
    if a.cache_latents and not a.center_crop then
        bad("--cache_latents needs --center_crop: a random crop gives an image other pixels, so other latents, each epoch")
    end
    if a.checkpoints_total_limit and a.checkpoints_total_limit < 1 then bad("--checkpoints_total_limit must be >= 1") end
    if a.validation_steps < 1 then bad("--validation_steps must be >= 1") end
    if a.num_validation_images < 1 then bad("--num_validation_images must be >= 1") end
    if a.sample_batch_size < 1 then bad("--sample_batch_size must be >= 1") end
    if not ml.core.is_dir(a.model_dir) and not ml.core.is_file(a.model_dir) then bad("--model_dir: no such folder or file: " .. a.model_dir) end
    if a.save_single_file and a.use_lora then bad("--save_single_file writes a whole model; with --use_lora the adapters are saved alone") end
    if a.save_single_file and not a.save_single_file:match("%.safetensors$") then bad("--save_single_file must name a .safetensors file") end
    if not ml.core.is_dir(a.instance_images_dir) then bad("--instance_images_dir: no such folder: " .. a.instance_images_dir) end
    local function real(p) return (p:gsub("/+$", "")) end
    if real(a.output_dir) == real(a.model_dir) then bad("--output_dir must not be --model_dir (the base model would be overwritten)") end
    if a.device == nil then a.device = ml.train.default_device() end
    if a.precision == nil then a.precision = a.device:match("^cuda") and "bf16-mixed" or "f32" end
    if a.precision ~= "f32" and not a.device:match("^cuda") then
        bad("--precision " .. a.precision .. " needs a GPU (--device cuda); the CPU trains in f32")
    end
    local given = a._given or {}
    if a.use_lora then
        if a.lora_rank < 1 then bad("--lora_rank must be >= 1") end
        a.lora_alpha = a.lora_alpha or a.lora_rank
        if not (a.lora_alpha > 0) then bad("--lora_alpha must be > 0") end
        if given.train_text_encoder and a.train_text_encoder then
            bad("--train_text_encoder trains the whole text encoder; with --use_lora use --lora_text_encoder")
        end
    else
        for _, k in ipairs {"lora_rank", "lora_alpha", "lora_text_encoder"} do
            if given[k] then bad("--" .. k .. " needs --use_lora") end
        end
    end
    return a
end

-- ---- class images ------------------------------------------------------------------

local IMAGE_EXT = {png = true, jpg = true, jpeg = true, bmp = true}
local function is_image_name(name)
    local ext = name:match("%.([%w]+)$")
    return ext and IMAGE_EXT[ext:lower()] or false
end

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

-- The file name of class image k: fixed by k alone, so a rerun regenerates
-- exactly the missing ones with the seeds they would have had.
function M.class_image_name(prompt_idx, sample_idx, seed)
    return string.format("class-%05d-seed%d.png", sample_idx, seed)
end

-- Fills class_images_dir up to num_class_images.  Images already there are
-- kept (the user's own count too); returns how many were generated.  With
-- share = {rank, world_size}, this worker makes only images k with
-- (k - 1) % world_size == rank: the workers split the missing images, and
-- each image is the same whichever worker makes it (its seed is its own).
function M.generate_class_images(m, a, log, share)
    local dir = a.class_images_dir
    ml.core.mkdir_p(dir)
    local foreign, ours = 0, 0
    for _, name in ipairs(ml.core.list_dir(dir)) do
        if is_image_name(name) then
            if name:match("^class%-%d+%-seed%-?%d+%.png$") then ours = ours + 1 else foreign = foreign + 1 end
        end
    end
    local want = a.num_class_images - foreign
    if ours >= want then return 0 end
    log(string.format("class images: %d in %s, generating %d more (\"%s\", %d steps)", foreign + ours, dir,
                      want - ours, a.class_prompt, a.num_inference_steps))
    local t0 = ml.now()
    local made = generate_images(m, {prompts = {a.class_prompt}, num_samples_per_prompt = want, seed = a.seed,
                         batch_size = a.sample_batch_size, steps = a.num_inference_steps,
                         guidance_scale = a.guidance_scale, height = a.resolution, width = a.resolution,
                         output_dir = dir, name = M.class_image_name, skip_existing = true,
                         only = share and function(_, k) return (k - 1) % share.world_size == share.rank end,
                         progress = function(done, total) log(string.format("class images: %d/%d", done, total)) end})
    local n = 0
    for _ in ipairs(made or {}) do n = n + 1 end
    log(string.format("class images: done in %.1f s", ml.now() - t0))
    return n
end

-- ---- the dataset ---------------------------------------------------------------------

-- The column holding the cache key of an image column's images (--cache_latents).
local function key_col(image_col) return (image_col:gsub("_image$", "_key")) end

-- As the reference builds it: images resized (shorter side) and cropped to
-- the resolution, normalised to [-1, 1]; prompts tokenized once; instance
-- images repeated to the class-image count and zipped 1:1 with the class
-- images; shuffled.  When the counts do not divide, both sides are repeated
-- to the larger count (the reference's integer division could drop
-- instance images or, with fewer class than instance images, all of them).
function M.build_dataset(a, tokenizer)
    local D = ml.data
    local function ids_of(prompt)
        return tokenizer:encode_batch({prompt}, {padding = "max_length", max_length = 77, truncation = true}):select(1, 1)
    end
    local instance_ids, class_ids = ids_of(a.instance_prompt), ids_of(a.class_prompt)
    -- the folder's images under the transform, flipped with probability hflip;
    -- with --cache_latents each row also holds its image's cache key (its
    -- row in the folder)
    local function images(dir, image_col, seed, hflip)
        local tf = D.ImageTransform{resize = a.resolution, size = a.resolution,
                                    crop = a.center_crop and "center" or "random",
                                    hflip = hflip, normalize = true, seed = seed}
        local ds = D.read_images(dir):map_batches(tf, {column = "image", output = image_col})
        if not a.cache_latents then return ds end
        return ds:add_column(key_col(image_col), function(batch)
            local out = {}
            for i, ref in ipairs(batch[image_col]) do out[i] = ref.key end
            return out
        end)
    end
    local sources = {}
    local function prepared(dir, image_col, ids_col, ids, seed)
        local ds = images(dir, image_col, seed, a.random_flip and 0.5 or 0)
        if a.cache_latents then
            -- what the cache encodes: each image as is and, with --random_flip,
            -- mirrored; and the training transform's flip draw, to pick one
            local first = ds:rows(1)[1]
            local tf = first and first[image_col].transform
            sources[#sources + 1] = {name = image_col:match("^(%a+)_"), image_col = image_col,
                                     dataset = images(dir, image_col, seed, 0),
                                     mirrored = a.random_flip and images(dir, image_col, seed, 1) or nil,
                                     flip_seed = tf and tf.seed, flip_p = tf and tf.hflip or 0}
        end
        return ds:drop_columns{"image", "path"}
            :add_column(ids_col, function(batch)
                local out = {}
                for i = 1, #batch[image_col] do out[i] = ids end
                return out
            end)
    end
    local inst = prepared(a.instance_images_dir, "instance_image", "instance_prompt_ids", instance_ids, a.seed)
    local cls = prepared(a.class_images_dir, "class_image", "class_prompt_ids", class_ids, a.seed + 1)
    local ni, nc = inst:count(), cls:count()
    local n = math.max(ni, nc)
    inst = inst:repeat_n((n + ni - 1) // ni):limit(n)
    cls = cls:repeat_n((n + nc - 1) // nc):limit(n)
    local ds = inst:zip(cls):random_shuffle(a.seed)
    -- with cached latents the steps need no pixels, so the loader decodes none
    if a.cache_latents then ds = ds:drop_columns{"instance_image", "class_image"} end
    return ds, {instance = ni, class = nc, pairs = n, sources = sources}
end

-- ---- cached latents ---------------------------------------------------------------

-- --cache_latents (kohya's scripts have the same option): every training
-- image is encoded once, before training, and each step samples its latents
-- from the kept posterior (mean and clamped log-variance) with fresh noise,
-- as encoding the image again would: the encoder is deterministic, and with
-- a center crop so are the pixels.  With --random_flip each image is
-- encoded as is and mirrored (as kohya's scripts do), and each step takes
-- the one the loader's own flip draw for that image and epoch picks
-- (ml.data.flip_drawn).  The encoder then runs once or twice per image
-- instead of once per image per step (at 512x512 a quarter of a bf16
-- step's time).  Batches of the cache pass differ from the training
-- batches, so values can differ from a fresh encode in the last bits.

-- {[key column] = {moments = {[key] = [h, w, 2C]}, mirrored = same or nil,
-- flip_seed, flip_p}} for the sources of build_dataset.
function M.cache_latents(m, a, sources, device, log)
    local vae = m.vae
    local dt = vae.encoder.conv_in.weight.dtype
    local cache = {}
    for _, src in ipairs(sources) do
        local kc = key_col(src.image_col)
        local entry = {flip_seed = src.flip_seed, flip_p = src.flip_p}
        for _, pass in ipairs {{"moments", src.dataset, ""}, {"mirrored", src.mirrored, " (mirrored)"}} do
            local field, ds, label = pass[1], pass[2], pass[3]
            if ds then
                local per, total, done, shown = {}, ds:count(), 0, 0
                for batch in ds:iter_batches{batch_size = a.sample_batch_size, device = device, epoch = 1} do
                    local g = ml.no_grad(ml.sd.autocast, m, function() return vae:encode(batch[src.image_col]:to(dt)) end)
                    local moments = ml.cat({g.mean, g.logvar}, 4)
                    for i, key in ipairs(batch[kc]) do per[key] = moments:select(1, i):clone() end
                    done = done + #batch[kc]
                    -- about ten lines however many images
                    if done == total or done - shown >= math.max(1, total // 10) then
                        log(string.format("caching latents: %s images%s %d/%d", src.name, label, done, total))
                        shown = done
                    end
                end
                entry[field] = per
            end
        end
        cache[kc] = entry
    end
    return cache
end

-- The posterior of a batch's images (instance half first) in that epoch,
-- from the cache.
function M.cached_posterior(cache, batch, epoch)
    local rows = {}
    for _, kc in ipairs {"instance_key", "class_key"} do
        local c = cache[kc]
        for _, key in ipairs(batch[kc]) do
            local flipped = c.mirrored and ml.data.flip_drawn(c.flip_seed, epoch, key, c.flip_p)
            rows[#rows + 1] = (flipped and c.mirrored or c.moments)[key]
        end
    end
    return require("moonlit.models.autoencoder_kl").DiagonalGaussian.new(ml.stack(rows, 1))
end

-- ---- the loss ---------------------------------------------------------------------------

-- One forward pass as the reference writes it.  images: [2B, H, W, 3] in
-- [-1, 1] (instance half first), ids: [2B, 77].  o.noise, o.timesteps and
-- o.vae_eps replace the random draws (tests feed a fixture's);
-- o.posterior replaces the VAE's encoding of images (--cache_latents).
function M.loss(m, images, ids, a, o)
    o = o or {}
    local compute = function(fn, ...) return ml.sd.autocast(m, fn, ...) end
    local vae, unet, te, sched = m.vae, m.unet, m.text_encoder, m.noise_scheduler
    local wdt = unet.conv_in.weight.dtype
    local latents = ml.no_grad(compute, function()
        local posterior = o.posterior or vae:encode(images:to(vae.encoder.conv_in.weight.dtype))
        return posterior:sample(o.vae_eps) * vae.scaling_factor
    end):float()
    local dev = latents.device
    local b = latents:size(1)
    local noise = o.noise or ml.randn(latents:size(), {device = dev})
    if a.offset_noise and not o.noise then
        noise = noise + ml.randn({b, 1, 1, latents:size(4)}, {device = dev}) * 0.1
    end
    local t = o.timesteps or ml.randint(0, sched.config.num_train_timesteps, {b}, {device = dev})
    local noisy = sched:add_noise(latents, noise, t)
    local pred = compute(function()
        return unet(noisy:to(wdt), t, te(ids))
    end):float()
    local target
    if sched.config.prediction_type == "v_prediction" then target = sched:get_velocity(latents, noise, t)
    elseif sched.config.prediction_type == "epsilon" then target = noise
    else error("dreambooth: prediction_type " .. tostring(sched.config.prediction_type) .. " is not supported") end
    local h = b // 2
    local pi, pc = pred:narrow(1, 1, h), pred:narrow(1, h + 1, h)
    local ti, tc = target:narrow(1, 1, h), target:narrow(1, h + 1, h)
    local prior = ml.F.mse_loss(pc, tc)
    local inst
    if a.snr_gamma then
        -- min-SNR weighting of the instance half (Hang et al. 2023), as diffusers applies it
        local ts = t:narrow(1, 1, h):to("cpu")
        local w = {}
        for i = 1, h do
            local ac = sched.alphas_cumprod[ts[i]:item() + 1]
            local snr = ac / (1 - ac)
            local base = sched.config.prediction_type == "v_prediction" and snr + 1 or snr
            w[i] = math.min(snr, a.snr_gamma) / base
        end
        local per = (pi - ti):square():view(h, -1):mean(2)
        inst = (per * ml.tensor(w):to(dev)):mean()
    else
        inst = ml.F.mse_loss(pi, ti)
    end
    return inst + prior * a.prior_loss_weight, pred
end

-- ---- validation samples -----------------------------------------------------------------

-- Images of the validation prompt with fixed seeds (the same noise at every
-- validation, so the rows of the progress sheet compare like with like).
function M.validate(m, a, step, log)
    local dir = join(join(a.output_dir, "samples"), "step-" .. step)
    local was_unet, was_te = m.unet.training, m.text_encoder.training
    m.unet:eval(); m.text_encoder:eval()
    local made = ml.no_grad(generate_images, m, {prompts = {a.validation_prompt}, num_samples_per_prompt = a.num_validation_images,
                                     seed = a.seed, batch_size = a.sample_batch_size, steps = a.num_inference_steps,
                                     guidance_scale = a.guidance_scale, height = a.resolution, width = a.resolution,
                                     output_dir = dir})
    m.unet:train(was_unet); m.text_encoder:train(was_te)
    log(string.format("validation: %d image(s) of \"%s\" in %s", #made, a.validation_prompt, dir))
    local row = {}
    for i, r in ipairs(made) do row[i] = r.image end
    return row
end

-- ---- the training loop --------------------------------------------------------------------

-- Optimizer steps an epoch of `batches` batches gives.
local function steps_per_epoch(batches, a)
    return (batches + a.gradient_accumulation_steps - 1) // a.gradient_accumulation_steps
end

function M.train_fn(m, a, sources)
    return function(cfg, ctx)
        local unet, te, vae = m.unet, m.text_encoder, m.vae
        vae:requires_grad_(false); vae:eval()
        unet:train()
        local trained = {unet = unet}
        if a.train_text_encoder then te:train(); trained.text_encoder = te
        else te:requires_grad_(false); te:eval() end
        local params = a.train_text_encoder and ml.nn.parameters(unet, te) or ml.nn.parameters(unet)
        -- bf16 shadows of the weights (nn.autocast's cache) or conversions made
        -- in each forward and again in each backward (core.recompute_casts)
        ml.nn.autocast_cache(a.autocast_cache ~= false)
        if a.gradient_checkpointing then
            unet:enable_gradient_checkpointing()
            if a.train_text_encoder then te:enable_gradient_checkpointing() end
        end
        if a.use_lora then
            -- only the adapters train, and checkpoints hold only them
            local lora, lo = ml.nn.lora, {rank = a.lora_rank, alpha = a.lora_alpha}
            te:requires_grad_(false); te:eval()
            params = lora.inject(unet, lo)
            trained = {unet = lora.trainable(unet)}
            if a.lora_text_encoder then
                for _, p in ipairs(lora.inject(te, lo)) do params[#params + 1] = p end
                te:train(); trained.text_encoder = lora.trainable(te)
            end
        end
        -- in a worker (ours, torchrun's or Slurm's, world size 1 too): weights
        -- broadcast from rank 0, gradients averaged in buckets during backward
        local ddp = ctx.dist and ml.train.ddp(params) or nil
        if ddp then
            ctx:log(string.format("DDP: world size %d over %s, %d buckets, NCCL_NVLS_ENABLE=%s", ctx.world_size,
                                  ctx.dist.backend(), #ddp.buckets, tostring(os.getenv("NCCL_NVLS_ENABLE"))))
        end
        local opt = ml.optim.AdamW(params, {lr = a.lr, weight_decay = a.adam_weight_decay})
        local cache
        if a.cache_latents then
            local t0 = ml.now()
            cache = M.cache_latents(m, a, sources, ctx.device, function(s) ctx:log(s) end)
            ctx:log(string.format("caching latents: done in %.1f s", ml.now() - t0))
        end
        local shard = ctx:dataset_shard("train")
        -- every rank takes plan.batches batches an epoch, even when the
        -- pairs do not divide by the world size (see ctx:shard_plan)
        local plan = ctx:shard_plan("train", a.train_batch_size)
        local batches = plan.batches
        local per_epoch = steps_per_epoch(batches, a)
        local total = math.min(a.max_train_steps, a.num_epochs * per_epoch)
        local sched = ml.train.lr_schedule.new{name = a.lr_scheduler, base_lr = a.lr,
                                               warmup_steps = a.lr_warmup_steps, total_steps = total}
        ctx:set_total_steps(total)

        local step, epoch0, batch0 = 0, 1, 1
        if a.resume_path then
            local st = ml.train.load_checkpoint(a.resume_path, {modules = trained, optimizer = opt})
            step, epoch0, batch0 = st.step, st.epoch, st.batch
            ctx:log(string.format("resumed from %s at step %d (epoch %d, batch %d)", a.resume_path, step, epoch0, batch0))
        end
        ctx:log(string.format("training: %d pairs, %d batches of %d+%d an epoch, %d steps (%d epochs max), lr %g, %s on %s",
                              shard:count(), batches, a.train_batch_size, a.train_batch_size, total, a.num_epochs,
                              a.lr, a.precision, ctx.device))
        local rows = {}
        if a.validation_prompt and ctx:is_main() and step == 0 then rows[#rows + 1] = M.validate(m, a, 0, function(s) ctx:log(s) end) end

        local function save_checkpoint(epoch, next_batch)
            if not ctx:is_main() then return end
            local dir = join(a.output_dir, "checkpoint-" .. step)
            ml.train.save_checkpoint(dir, {modules = trained, optimizer = opt, step = step, epoch = epoch,
                                           batch = next_batch, extra = {seed = a.seed}})
            ml.train.prune_checkpoints(a.output_dir, a.checkpoints_total_limit)
            return dir
        end

        local wait_total, progress_sheet, images_total = 0, nil, 0
        local function open(epoch, start)
            return shard:iter_batches{batch_size = a.train_batch_size, device = ctx.device, epoch = epoch,
                                      start_batch = math.min(start, plan.own_batches + 1), prefetch = 2}
        end
        -- the next epoch's loader starts while this one trains, so an epoch's
        -- first batch does not wait for cold threads
        local it = open(epoch0, batch0)
        for epoch = epoch0, a.num_epochs do
            if step >= total then break end
            it = it or open(epoch, 1)
            local nxt = epoch < a.num_epochs and step + per_epoch < total and open(epoch + 1, 1) or nil
            local micro, loss_sum, pairs_sum = 0, 0, 0
            local last_wait = 0
            for bi = (epoch == epoch0 and batch0 or 1), batches do
                -- a rank whose shard has run out joins the step with no data
                local batch
                if plan.rows[bi] > 0 then
                    batch = it()
                    if not batch then error(string.format("dreambooth: the data ended at batch %d of %d", bi, plan.own_batches), 0) end
                end
                if ddp then ddp:set_sync(micro + 1 == a.gradient_accumulation_steps or bi == batches) end
                if batch then
                    local images = not cache and ml.cat({batch.instance_image, batch.class_image}, 1) or nil
                    local ids = ml.cat({batch.instance_prompt_ids, batch.class_prompt_ids}, 1)
                    local loss = M.loss(m, images, ids, a, {posterior = cache and M.cached_posterior(cache, batch, epoch)})
                    local scale = plan.weight[bi] / a.gradient_accumulation_steps
                    local scaled = scale ~= 1 and loss * scale or loss
                    scaled:backward()
                    loss_sum = loss_sum + loss:item() * plan.weight[bi]
                end
                pairs_sum = pairs_sum + plan.global_rows[bi]
                micro = micro + 1
                if micro == a.gradient_accumulation_steps or bi == batches then
                    if ddp then
                        ddp:finish()
                        loss_sum = ctx.dist.all_reduce_number(loss_sum, "avg")
                    end
                    -- the norm and clip coefficient stay on the GPU: AdamW scales the
                    -- gradients as it reads them, and the norm is read once the step is queued
                    local gnorm, coef = ml.optim.clip_grad_norm(params, a.max_grad_norm,
                                                                {sync = false, scale_grads = false})
                    opt.lr = sched:lr(step)
                    opt:step{grad_scale = coef}
                    opt:zero_grad()
                    step = step + 1
                    local s = it:stats()
                    local wait = s.wait_ms - last_wait
                    last_wait = s.wait_ms
                    wait_total = wait_total + wait
                    local ckpt
                    if a.checkpointing_steps > 0 and step % a.checkpointing_steps == 0 and step < total then
                        ckpt = save_checkpoint(epoch, bi + 1)
                    end
                    -- images: this step's instance + class images over all ranks, per rank
                    ctx:report({step = step, epoch = epoch, loss = loss_sum / micro, lr = opt.lr, grad_norm = gnorm:item(),
                                images = 2 * pairs_sum / ctx.world_size, data_wait_ms = wait}, {checkpoint = ckpt})
                    images_total = images_total + 2 * pairs_sum
                    micro, loss_sum, pairs_sum = 0, 0, 0
                    if a.validation_prompt and ctx:is_main() and step % a.validation_steps == 0 and step < total then
                        rows[#rows + 1] = M.validate(m, a, step, function(x) ctx:log(x) end)
                    end
                    if step >= total then break end
                end
            end
            it:close()
            it = nxt
        end
        if it then it:close() end
        if ddp then ddp:close() end
        if a.validation_prompt and ctx:is_main() then rows[#rows + 1] = M.validate(m, a, step, function(s) ctx:log(s) end) end
        if #rows > 1 then
            local sheet = join(join(a.output_dir, "samples"), "progress.png")
            local cells = {}
            for _, r in ipairs(rows) do for _, img in ipairs(r) do cells[#cells + 1] = img end end
            ml.image.save(sheet, ml.image.grid(cells, {cols = a.num_validation_images}),
                          {meta = {prompt = a.validation_prompt, seed = a.seed}})
            progress_sheet = sheet
        end
        return {steps = step, images = images_total, data_wait_ms = wait_total, progress_sheet = progress_sheet}
    end
end

-- ---- main ------------------------------------------------------------------------------

function M.main(argv)
    -- A worker reports a bad flag to the other ranks instead of exiting
    -- alone (they would wait for it until their timeout): flags may differ
    -- between nodes.
    local in_worker = ml.train.is_worker()
    local parsed, parse_err, parse_kind = M.parser():parse(argv, in_worker and {exit = false} or nil)
    if parse_kind == "help" then io.stdout:write(parse_err) return end
    -- --num_workers > 1: this process only starts the workers (which run
    -- this same command line) and waits; they load the model and train
    if parsed and ml.train.launch_if_needed(parsed.num_workers, {device = parsed.device, nnodes = parsed.nnodes,
                                                                 node_rank = parsed.node_rank, master_addr = parsed.master_addr,
                                                                 master_port = parsed.master_port}) then
        return
    end
    local a, err = parsed, parse_err and "dreambooth.lua: " .. parse_err
    if a then
        local ok, e = pcall(M.check_args, a)
        if not ok then a, err = nil, e end
    end
    local worker = in_worker and ml.train.init_worker(a and a.device or (parsed and parsed.device)) or nil
    ml.train.all_ranks_ok(worker, a ~= nil, err)
    local main_rank = not worker or worker.rank == 0
    local function log(s) if main_rank then print(s); io.stdout:flush() end end
    if main_rank then ml.core.mkdir_p(a.output_dir) end
    if a.resume_from_checkpoint then
        if a.resume_from_checkpoint == "latest" then
            a.resume_path = ml.train.latest_checkpoint(a.output_dir)
            if not a.resume_path then
                error("dreambooth: --resume_from_checkpoint latest: no checkpoint in " .. a.output_dir, 0)
            end
        else
            a.resume_path = a.resume_from_checkpoint
            if not ml.train.is_checkpoint(a.resume_path) then
                error("dreambooth: --resume_from_checkpoint: " .. a.resume_path .. " is not a complete checkpoint", 0)
            end
        end
    end
    local t0 = ml.now()
    log(string.format("loading %s on %s (%s)", a.model_dir, a.device, a.precision))
    local m = ml.sd.load(a.model_dir, {device = a.device, precision = a.precision})
    -- training noise follows the model's own training process (DDPM with the
    -- folder's betas and prediction type), whatever its sampling scheduler
    m.noise_scheduler = require("moonlit.schedulers").from_config(m.scheduler_config, "ddpm")
    local phases = {{"load", ml.now() - t0}}

    t0 = ml.now()
    -- the workers split the missing class images; training waits for all of them
    local share = worker and worker.world_size > 1 and {rank = worker.rank, world_size = worker.world_size} or nil
    local made = M.generate_class_images(m, a, log, share)
    if share then
        worker.dist.barrier()
        made = math.tointeger(worker.dist.all_reduce_number(made, "sum")) or made
    end
    phases[#phases + 1] = {"class images (" .. made .. " made)", ml.now() - t0}

    -- the training stream starts here, whether or not class images were made
    ml.manual_seed(a.seed)
    local ds, counts = M.build_dataset(a, m.tokenizer)
    log(string.format("data: %d instance image(s), %d class image(s) -> %d pairs", counts.instance, counts.class, counts.pairs))
    t0 = ml.now()
    local res = ml.train.run(M.train_fn(m, a, counts.sources), {config = a, datasets = {train = ds}, num_workers = a.num_workers,
                                                output_dir = a.output_dir, device = a.device, summary = false})
    local train_s = ml.now() - t0
    phases[#phases + 1] = {string.format("training (%d steps)", res.steps), train_s}

    t0 = ml.now()
    m.unet:eval(); m.text_encoder:eval()
    if not main_rank then return {model = m, args = a, steps = res.steps} end
    if a.use_lora then
        ml.nn.lora.save_weights(a.output_dir, {unet = m.unet, text_encoder = m.text_encoder}, {dtype = a.save_dtype})
    else
        ml.sd.save(a.output_dir, m, {dtype = a.save_dtype})
    end
    if a.save_single_file then ml.sd.save_single_file(a.save_single_file, m, {dtype = a.save_dtype}) end
    phases[#phases + 1] = {"save", ml.now() - t0}

    log("")
    log("phase                                 seconds")
    local total = 0
    for _, ph in ipairs(phases) do
        log(string.format("%-36s %8.1f", ph[1], ph[2]))
        total = total + ph[2]
    end
    log(string.format("%-36s %8.1f", "total", total))
    local imgs = res.images
    log(string.format("training: %d steps, %d images, %.2f images/s (instance and class images%s)", res.steps, imgs,
                      imgs / math.max(train_s, 1e-9), worker and worker.world_size > 1 and ", all workers" or ""))
    log(string.format("data wait: %.1f ms in all, %.2f ms per step; peak memory %.2f GiB", res.data_wait_ms,
                      res.data_wait_ms / math.max(1, res.steps), (ml.train.peak_memory(a.device) or 0) / 2 ^ 30))
    log("tuned model:   " .. a.output_dir .. (a.use_lora and " (" .. ml.nn.lora.WEIGHT_NAME .. ")" or " (diffusers folder)"))
    log("metrics:       " .. join(a.output_dir, "metrics.jsonl"))
    if a.validation_prompt then log("samples:       " .. join(a.output_dir, "samples")) end
    if res.progress_sheet then log("before/after:  " .. res.progress_sheet .. " (rows: before training, each validation, after)") end
    log("class images:  " .. a.class_images_dir)
    return {model = m, args = a, steps = res.steps, phases = phases, progress_sheet = res.progress_sheet}
end

local first = ...
if type(first) == "table" and first.as_module then return M end
M.main(arg)
