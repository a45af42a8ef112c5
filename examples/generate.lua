-- generate.lua — text to image with a diffusers-format Stable Diffusion
-- folder: several prompts, several samples each, in batches; one PNG per
-- image (its prompt, seed and settings in the PNG's text) and a contact
-- sheet of them all.
--
--   moonlit examples/generate.lua --model_dir <sd folder> --prompts "a red fox,a lighthouse" \
--       --num_samples_per_prompt 4 --steps 30 --seed 42 --output_dir outputs/generate
--   moonlit examples/generate.lua <sd folder> "a red fox, at dusk"     (the older form)
--
-- `--help` lists every flag.  Image s of prompt p (both from 0) is
-- outputs/.../p<p>-s<s>-seed<seed + p*n + s>.png (n samples per prompt) and
-- comes out the same alone: --seed <its seed> --num_samples_per_prompt 1
-- remakes it, whatever the batch size (moonlit.pipelines.generate_images).
--
-- --num_workers N starts N workers (one GPU each; docs/dist.md).  Batch b
-- of the one-process order goes to worker (b - 1) % N, so every batch holds
-- the same images as it would in one process and every file comes out the
-- same; each worker writes its own images, and after a barrier rank 0 reads
-- them all back for the contact sheet (across machines output_dir must be
-- shared storage).  Run as a module (loadfile(path)({as_module = true})) it
-- returns its pieces without running.
local ml = require "moonlit"
local argparse = require "moonlit.argparse"
local generate_images = require("moonlit.pipelines.generate_images").generate_images

local M = {}

-- The scheduler names --scheduler takes (moonlit.schedulers knows each).
M.SCHEDULERS = {}
for _, n in ipairs {"pndm", "ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m"} do
    if ml.schedulers.class_name(n) then M.SCHEDULERS[#M.SCHEDULERS + 1] = n end
end

function M.parser()
    local p = argparse.new("generate.lua", "Text to image with a diffusers-format Stable Diffusion folder. " ..
                           "Writes one PNG per image and contact_sheet.png (rows: prompts, columns: samples).")
    p:option("model_dir", {type = "string", help = "diffusers model folder (required; may also be the first argument)"})
    p:option("output_dir", {type = "string", default = "outputs/generate", help = "where the PNGs go"})
    p:option("prompts", {type = "list", help = "prompts, comma-separated (use --prompt for one with commas)"})
    p:option("prompt", {type = "string", help = "one prompt, commas kept (may also be the second argument)"})
    p:option("num_samples_per_prompt", {type = "integer", default = 1, help = "images per prompt"})
    p:option("steps", {type = "integer", default = 50, help = "denoising steps"})
    p:option("guidance_scale", {type = "number", default = 7.5, help = "classifier-free guidance (1 turns it off)"})
    p:option("scheduler", {type = "string", choices = M.SCHEDULERS, help = "sampler (default: the model folder's)"})
    p:option("seed", {type = "integer", default = 0,
                      help = "seed of the first image; image k (0-based, prompt-major) gets seed + k"})
    p:option("batch_size", {type = "integer", help = "images per forward pass (default: 4 on a GPU, 1 on the CPU)"})
    p:option("negative_prompt", {type = "string", default = "", help = "what to steer away from (every prompt)"})
    p:option("height", {type = "integer", help = "image height in pixels (default: the model's)"})
    p:option("width", {type = "integer", help = "image width in pixels (default: the model's)"})
    p:option("device", {type = "string", help = "cpu, cuda or cuda:N (default: cuda when there is a GPU)"})
    p:option("precision", {type = "string", choices = {"f32", "bf16-mixed", "bf16-sr"},
                           help = "f32, bf16-mixed or bf16-sr (default: bf16-mixed on a GPU, f32 on the CPU)"})
    p:option("num_workers", {type = "integer", default = 1,
                             help = "workers sharing the images (one GPU each); rank 0 writes the contact sheet"})
    p:option("lora_weights_dir", {type = "string",
                                  help = "LoRA weights to apply: a folder with pytorch_lora_weights.safetensors, or the file"})
    p:option("lora_scale", {type = "number", help = "strength of the LoRA weights (default 1)"})
    p:option("lora_merge", {type = "boolean", default = false, help = "merge the LoRA weights into the model (same images, faster)"})
    p:positional("model", {required = false, help = "model folder (the older form of --model_dir)"})
    p:positional("prompt_text", {required = false, help = "one prompt (the older form of --prompt)"})
    return p
end

-- Parses argv and settles the defaults that depend on each other; a bad
-- combination is reported like a bad flag (exit 2), or returned as nil,
-- message with {exit = false}.  {launcher = true} stops before the device
-- defaults: the launcher of several workers never touches CUDA.
function M.parse(argv, opts)
    local p = M.parser()
    local a, msg, kind = p:parse(argv, opts)
    if not a then return nil, msg, kind end
    local function bad(m)
        if opts and opts.exit == false then return nil, m, "error" end
        p:error(m)
    end
    if a.model_dir and a.model then return bad("the model folder is given twice (--model_dir and an argument)") end
    a.model_dir = a.model_dir or a.model
    if not a.model_dir then return bad("missing required option --model_dir") end
    local prompts = {}
    for _, s in ipairs(a.prompts or {}) do prompts[#prompts + 1] = s end
    if a.prompt then prompts[#prompts + 1] = a.prompt end
    if a.prompt_text then prompts[#prompts + 1] = a.prompt_text end
    if #prompts == 0 then return bad("no prompt: give --prompts (or --prompt)") end
    a.prompts = prompts
    for _, k in ipairs {"num_samples_per_prompt", "steps", "batch_size", "height", "width", "num_workers"} do
        if a[k] and a[k] < 1 then return bad("--" .. k .. " must be >= 1") end
    end
    if not ml.core.is_dir(a.model_dir) and not ml.core.is_file(a.model_dir) then
        return bad("--model_dir: no such folder or file: " .. a.model_dir)
    end
    if a.lora_weights_dir then
        if not ml.core.is_dir(a.lora_weights_dir) and not ml.core.is_file(a.lora_weights_dir) then
            return bad("--lora_weights_dir: no such folder or file: " .. a.lora_weights_dir)
        end
    elseif a.lora_scale ~= nil or (a._given or {}).lora_merge then
        return bad("--" .. (a.lora_scale ~= nil and "lora_scale" or "lora_merge") .. " needs --lora_weights_dir")
    end
    if opts and opts.launcher then return a end
    if not a.device then a.device = ml.cuda.available() and "cuda" or "cpu" end
    local on_gpu = a.device:match("^cuda") ~= nil
    if not on_gpu and a.device ~= "cpu" then return bad("--device must be cpu, cuda or cuda:N (got " .. a.device .. ")") end
    if on_gpu and not ml.cuda.available() then
        local _, why = ml.cuda.available()
        return bad("--device " .. a.device .. ": no usable GPU (" .. tostring(why) .. ")")
    end
    a.precision = a.precision or (on_gpu and "bf16-mixed" or "f32")
    if a.precision ~= "f32" and not on_gpu then return bad("--precision " .. a.precision .. " needs a GPU; the CPU computes in f32") end
    a.batch_size = a.batch_size or (on_gpu and 4 or 1)
    return a
end

-- Image k (1-based, prompt-major) is in batch (k - 1) // batch_size + 1 of
-- the one-process order; with world_size workers, rank r makes the batches
-- b with (b - 1) % world_size == r.
function M.share(a, rank, world_size)
    return function(p, s)
        local k = (p - 1) * a.num_samples_per_prompt + s
        return ((k - 1) // a.batch_size) % world_size == rank
    end
end

-- Loads the model, makes every image (this worker's share of them),
-- writes the contact sheet (rank 0); returns the list generate_images
-- returns and the sheet's path (nil on the other ranks).
function M.run(a, log)
    local worker = ml.train.init_worker(a.device)
    local rank, world = worker and worker.rank or 0, worker and worker.world_size or 1
    log = log or function(s) print(s) io.stdout:flush() end
    local t_load = ml.now()
    local m = ml.sd.load(a.model_dir, {device = a.device, precision = a.precision})
    log(string.format("loaded %s on %s (%s) in %.1f s", a.model_dir, a.device, a.precision, ml.now() - t_load))
    if a.lora_weights_dir then
        local got = ml.nn.lora.load_weights(m, a.lora_weights_dir, {scale = a.lora_scale or 1, merge = a.lora_merge})
        log(string.format("LoRA %s: rank %d, alpha %g, %d UNet and %d text encoder layers, scale %g%s", a.lora_weights_dir,
                          got.rank, got.alpha, got.unet or 0, got.text_encoder or 0, a.lora_scale or 1,
                          a.lora_merge and ", merged" or ""))
    end
    local total = #a.prompts * a.num_samples_per_prompt
    local all_batches = (total + a.batch_size - 1) // a.batch_size
    -- this worker's batches: b = rank + 1, rank + 1 + world, ...
    local batches = all_batches > rank and (all_batches - rank - 1) // world + 1 or 0
    local nbatch = 0
    local t_gen = ml.now()
    local made, info = generate_images(m, {
        prompts = a.prompts, num_samples_per_prompt = a.num_samples_per_prompt, seed = a.seed,
        batch_size = a.batch_size, steps = a.steps, guidance_scale = a.guidance_scale, scheduler = a.scheduler,
        negative_prompt = a.negative_prompt, height = a.height, width = a.width, output_dir = a.output_dir,
        model = a.model_dir, only = world > 1 and M.share(a, rank, world) or nil,
        progress = function(done, all, seconds)
            nbatch = nbatch + 1
            log(string.format("batch %d/%d: %d/%d images (%.2f s)", nbatch, batches, done, all, seconds))
        end,
    })
    local cells = {}
    if world > 1 then
        -- every worker's files are written: rank 0 reads them back (8-bit
        -- PNGs load as value/255 and save back to the same bytes)
        worker.dist.barrier()
        local count = math.tointeger(worker.dist.all_reduce_number(#made, "sum"))
        if rank ~= 0 then return made, nil end
        if count ~= total then error(string.format("generate: the workers made %d of %d images", count, total), 0) end
        local gi = require "moonlit.pipelines.generate_images"
        for p = 1, #a.prompts do
            for s = 1, a.num_samples_per_prompt do
                local seed = a.seed + (p - 1) * a.num_samples_per_prompt + (s - 1)
                cells[#cells + 1] = ml.image.load(a.output_dir:gsub("/+$", "") .. "/" .. gi.default_name(p, s, seed))
            end
        end
        info.seconds = ml.now() - t_gen
    else
        for i, r in ipairs(made) do cells[i] = r.image end
    end
    local sheet = a.output_dir:gsub("/+$", "") .. "/contact_sheet.png"
    ml.image.save(sheet, ml.image.grid(cells, {cols = a.num_samples_per_prompt}),
                  {meta = {prompt = table.concat(a.prompts, " | "), negative_prompt = a.negative_prompt,
                           seed = a.seed, steps = a.steps, scheduler = info.scheduler, guidance = a.guidance_scale,
                           model = a.model_dir}})
    log(string.format("wrote %d image(s) and %s in %.2f s wall-clock (%.3f images/s; %s, %d steps, %dx%d%s)",
                      #cells, sheet, info.seconds, #cells / math.max(info.seconds, 1e-9), info.scheduler, a.steps,
                      info.width, info.height, world > 1 and string.format(", %d workers", world) or ""))
    return made, sheet
end

function M.main(argv)
    if not ml.train.is_worker() then
        -- --num_workers > 1: this process checks the flags, starts the
        -- workers (which run this same command line) and waits
        local a = M.parse(argv, {launcher = true})
        if ml.train.launch_if_needed(a.num_workers, {device = a.device}) then return end
        return M.run(M.parse(argv))
    end
    -- a worker (ours, torchrun's, Slurm's) tells the other ranks about a
    -- bad flag instead of exiting alone, which would leave them waiting
    local a, msg, kind = M.parse(argv, {exit = false})
    if kind == "help" then io.stdout:write(msg) return end
    local worker = ml.train.init_worker(a and a.device)
    ml.train.all_ranks_ok(worker, a ~= nil, a == nil and "generate.lua: " .. tostring(msg) or nil)
    return M.run(a)
end

local first = ...
if type(first) == "table" and first.as_module then return M end
M.main(arg or {})
