-- test_dreambooth.lua — examples/dreambooth.lua on the sd1-tiny fixture:
-- its loss is the fixture's training-step loss; a short run lowers the
-- loss on the instance images, writes metrics.jsonl and a model that loads
-- and generates; resume is bit-exact; generated class images do not change
-- the result; bad inputs are clear errors that lose nothing.
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

local SCRIPT = "examples/dreambooth.lua"
local FIXTURE = "tests/fixtures/sd1-tiny"
local MODEL = FIXTURE .. "/pipeline"

local function recipe() return assert(loadfile(SCRIPT))({as_module = true}) end

local function nchw_to_nhwc(t) return t:permute(1, 3, 4, 2):contiguous() end

-- Small, distinct images: the instance images are reddish, the class images bluish.
local function write_images(dir, n, tint, size)
    ml.core.mkdir_p(dir)
    ml.manual_seed(#dir + n)
    for i = 1, n do
        local img = ml.rand({size, size, 3}) * 0.3
        local c = img:select(3, tint) + 0.6
        img = ml.cat({tint == 1 and c:unsqueeze(3) or img:narrow(3, 1, 1), tint == 2 and c:unsqueeze(3) or img:narrow(3, 2, 1),
                      tint == 3 and c:unsqueeze(3) or img:narrow(3, 3, 1)}, 3)
        ml.image.save(string.format("%s/%02d.png", dir, i), ml.clamp(img, 0, 1))
    end
end

-- Run the recipe's main quietly; returns its result or raises its error.
local function run_main(argv)
    local M = recipe()
    local saved = print
    local out = {}
    print = function(...) out[#out + 1] = table.concat({...}, "\t") end
    local ok, res = pcall(M.main, argv)
    print = saved
    if not ok then error(res, 0) end
    return res, table.concat(out, "\n")
end

local function base_args(dir, extra)
    local a = {"--model_dir", MODEL, "--output_dir", dir .. "/out", "--instance_images_dir", dir .. "/inst",
               "--instance_prompt", "a photo of sks dog", "--class_images_dir", dir .. "/class",
               "--class_prompt", "a photo of a dog", "--resolution", "64", "--device", "cpu",
               "--num_class_images", "3", "--num_inference_steps", "2", "--sample_batch_size", "3",
               "--lr", "1e-3", "--checkpointing_steps", "0"}
    for _, v in ipairs(extra or {}) do a[#a + 1] = v end
    return a
end

local function param_diff(a, b)
    local pa, pb, worst = a:parameters(), b:parameters(), 0
    for i = 1, #pa do worst = math.max(worst, (pa[i] - pb[i]):abs():max():item()) end
    return worst
end

function tests.loss_is_the_fixture_training_step(t)
    local M = recipe()
    local r = ml.core.st_load(FIXTURE .. "/train_step.safetensors")
    local meta = ml.core.json_load(FIXTURE .. "/meta.json")
    local m = ml.sd.load(MODEL)
    m.noise_scheduler = require("moonlit.schedulers").from_config(m.scheduler_config, "ddpm")
    m.unet:train(); m.text_encoder:train()
    local a = {prior_loss_weight = meta.train.prior_loss_weight}
    local loss = M.loss(m, nchw_to_nhwc(r.images), r.input_ids, a,
                        {noise = nchw_to_nhwc(r.noise), timesteps = r.timesteps, vae_eps = nchw_to_nhwc(r.vae_eps)})
    local rel = math.abs(loss:item() - r.loss:item()) / math.abs(r.loss:item())
    -- the verification command's pipeline tolerance (f32 rounding through VAE, text encoder and UNet)
    t:assert(rel <= 1e-4, string.format("recipe loss %.8g vs diffusers %.8g (rel %.2g)", loss:item(), r.loss:item(), rel))
end

function tests.short_run_learns_and_saves_a_working_model(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 1, 80)
    local res, out = run_main(base_args(dir, {"--max_train_steps", "20", "--num_epochs", "100"}))
    t:assert(res.steps == 20, "20 steps taken, got " .. tostring(res.steps))
    t:assert(#ml.core.list_dir(dir .. "/class") == 3, "3 class images generated")
    -- one metrics line per step
    local n = 0
    for _ in io.lines(dir .. "/out/metrics.jsonl") do n = n + 1 end
    t:assertEq(n, 20, "metrics.jsonl lines")
    t:assert(U.has(out, "tuned model:"), "the summary says where the model is")
    -- the loss on the instance images with fixed draws: before (base model) vs after (tuned)
    local M = recipe()
    local function instance_loss(model_dir)
        local m = ml.sd.load(model_dir)
        m.noise_scheduler = require("moonlit.schedulers").from_config(m.scheduler_config, "ddpm")
        local a = {prior_loss_weight = 0, resolution = 64}
        local img = ml.image.load(dir .. "/inst/01.png")
        img = ml.image.resize(img, 64, 64) * 2 - 1
        local images = ml.cat({img:unsqueeze(1), img:unsqueeze(1)}, 1)
        local ids = m.tokenizer:encode_batch({"a photo of sks dog", "a photo of sks dog"},
                                             {padding = "max_length", max_length = 77, truncation = true})
        local total = 0
        for s = 1, 4 do
            ml.manual_seed(100 + s)
            local noise = ml.randn({2, 8, 8, 4})
            local ts = ml.tensor({100 * s + 50, 100 * s + 50}, {dtype = "i64"})
            local eps = ml.randn({2, 8, 8, 4})
            total = total + ml.no_grad(M.loss, m, images, ids, a, {noise = noise, timesteps = ts, vae_eps = eps}):item()
        end
        return total / 4
    end
    local before, after = instance_loss(MODEL), instance_loss(dir .. "/out")
    t:assert(after < before * 0.9, string.format("instance loss before %.4f, after %.4f", before, after))
    -- every component model_index.json names is a folder there (diffusers
    -- loads each one it lists; absent parts must be [null, null])
    local index = ml.core.json_load(dir .. "/out/model_index.json", {null = ml.core.json_null})
    for k, v in pairs(index) do
        if type(v) == "table" and v[1] ~= ml.core.json_null then
            t:assert(ml.core.is_dir(dir .. "/out/" .. k), "model_index.json lists " .. k .. " but the folder is missing")
        end
    end
    -- the saved folder generates
    local m = ml.sd.load(dir .. "/out")
    local img = ml.sd.generate(m, {prompt = "a photo of sks dog", num_inference_steps = 2, seed = 1})
    t:assertEq(img:size(), {1, 64, 64, 3}, "generated image shape")
    U.remove_tree(dir)
end

function tests.saved_index_lists_only_what_is_there(t)
    -- the original SD repos list safety_checker and feature_extractor, which
    -- moonlit neither loads nor writes: the saved index must mark them absent
    local dir = U.temp_dir()
    local m = ml.sd.load(MODEL)
    m.raw_config.safety_checker = ml.core.json_array({"stable_diffusion", "StableDiffusionSafetyChecker"})
    ml.sd.save(dir .. "/saved", m)
    local index = ml.core.json_load(dir .. "/saved/model_index.json", {null = ml.core.json_null})
    t:assert(index.safety_checker[1] == ml.core.json_null, "safety_checker marked [null, null]")
    for k, v in pairs(index) do
        if type(v) == "table" and v[1] ~= ml.core.json_null then
            t:assert(ml.core.is_dir(dir .. "/saved/" .. k), "model_index.json lists " .. k .. " but the folder is missing")
        end
    end
    U.remove_tree(dir)
end

function tests.resume_gives_the_same_weights(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 1, 64)
    local extra = {"--max_train_steps", "6", "--num_epochs", "100", "--checkpointing_steps", "3", "--train_batch_size", "1"}
    local full = run_main(base_args(dir, extra))
    t:assert(ml.train.is_checkpoint(dir .. "/out/checkpoint-3"), "checkpoint-3 written")
    -- an interrupted run leaves exactly checkpoint-3 behind: resume from it elsewhere
    local args2 = base_args(dir, extra)
    for i, v in ipairs(args2) do if v == dir .. "/out" then args2[i] = dir .. "/out2" end end
    ml.core.mkdir_p(dir .. "/out2")
    os.execute(string.format("cp -r '%s/out/checkpoint-3' '%s/out2/'", dir, dir))
    args2[#args2 + 1] = "--resume_from_checkpoint"
    args2[#args2 + 1] = "latest"
    local resumed = run_main(args2)
    t:assertEq(param_diff(full.model.unet, resumed.model.unet), 0, "UNet weights after resume")
    t:assertEq(param_diff(full.model.text_encoder, resumed.model.text_encoder), 0, "text encoder weights after resume")
    -- same run, class images already there from the first run: same weights
    local args3 = base_args(dir, {"--max_train_steps", "6", "--num_epochs", "100", "--checkpointing_steps", "0"})
    for i, v in ipairs(args3) do if v == dir .. "/out" then args3[i] = dir .. "/out3" end end
    local again = run_main(args3)
    t:assertEq(param_diff(full.model.unet, again.model.unet), 0, "weights do not depend on whether class images were generated")
    U.remove_tree(dir)
end

-- --gradient_checkpointing recomputes the UNet's and text encoder's blocks
-- in backward: the trained weights are those of the plain run.  The same
-- ops run again, but the gradients of what several blocks share (the time
-- embedding, the text encoder's output) are summed in another order, ~5e-7
-- of their scale apart (test_checkpoint.lua), and AdamW's first steps
-- divide by |g|, which amplifies that in near-zero gradients: bound the
-- weights to 1% of the 2 steps' largest possible move (2 x lr).
function tests.gradient_checkpointing_trains_the_same_weights(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 1, 64)
    local extra = {"--max_train_steps", "2", "--num_epochs", "100", "--train_batch_size", "1"}
    local plain = run_main(base_args(dir, extra))
    local args = base_args(dir, extra)
    for i, v in ipairs(args) do if v == dir .. "/out" then args[i] = dir .. "/out2" end end
    args[#args + 1] = "--gradient_checkpointing"
    local ck = run_main(args)
    local du, dt = param_diff(plain.model.unet, ck.model.unet), param_diff(plain.model.text_encoder, ck.model.text_encoder)
    local marked = 0
    for _, nm in ipairs(ck.model.unet:named_modules()) do if rawget(nm[2], "_checkpoint") then marked = marked + 1 end end
    t:assert(marked > 0, "the flag reached the UNet's blocks")
    local bound = 0.01 * 2 * 1e-3
    t:assert(du < bound and dt < bound, string.format("weights after 2 steps: UNet %.3g, text encoder %.3g apart (bound %.3g)",
                                                      du, dt, bound))
    U.remove_tree(dir)
end

-- The plain run of `extra` in dir/out and the same with --cache_latents in
-- dir/out2; checks the cached run's per-step losses against the plain
-- run's (relative 1e-6) and returns both results and the cached run's output.
local function plain_and_cached(t, dir, extra, steps)
    local plain = run_main(base_args(dir, extra))
    local args = base_args(dir, extra)
    for i, v in ipairs(args) do if v == dir .. "/out" then args[i] = dir .. "/out2" end end
    args[#args + 1] = "--cache_latents"
    local cached, out = run_main(args)
    local function losses(path)
        local r = {}
        for line in io.lines(path) do r[#r + 1] = ml.core.json_decode(line).loss end
        return r
    end
    local lp, lc = losses(dir .. "/out/metrics.jsonl"), losses(dir .. "/out2/metrics.jsonl")
    t:assertEq(#lc, steps, "steps of the cached run")
    for i = 1, #lp do
        t:assert(lc[i] and math.abs(lc[i] - lp[i]) <= 1e-6 * math.abs(lp[i]),
                 string.format("step %d loss: cached %.9g, plain %.9g", i, lc[i] or 0 / 0, lp[i]))
    end
    return plain, cached, out
end

-- --cache_latents: the images are encoded once before training and every
-- step samples from the kept posterior, drawing the same noise in the same
-- order as the plain run.  Only the cache pass's batches differ from the
-- training batches (3 images against 1+1), which can move the encoder's
-- outputs in the last bits: on this fixture the first two steps' losses
-- are bit for bit the plain run's and the third is 1e-7 apart.  So the
-- losses must agree to 1e-6, and the weights, where AdamW's first steps
-- (dividing by |g|) amplify last-bit differences of near-zero gradients,
-- to 3% of the 3 steps' largest possible move (3 x lr).
function tests.cached_latents_train_the_same_weights(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 1, 80)
    local extra = {"--max_train_steps", "3", "--num_epochs", "100", "--train_batch_size", "1", "--center_crop"}
    local plain, cached, out = plain_and_cached(t, dir, extra, 3)
    t:assert(U.has(out, "caching latents: class images 3/3") and U.has(out, "caching latents: instance images 2/2"),
             "the cache pass reports its progress: " .. out)
    local du, dt = param_diff(plain.model.unet, cached.model.unet), param_diff(plain.model.text_encoder, cached.model.text_encoder)
    local bound = 0.03 * 3 * 1e-3
    t:assert(du < bound and dt < bound, string.format("weights after 3 steps: UNet %.3g, text encoder %.3g apart (bound %.3g)",
                                                      du, dt, bound))
    -- the cache holds what encoding gives: one image's kept mean against a fresh encode of it
    local M = recipe()
    local m = ml.sd.load(MODEL)
    local a = M.check_args(M.parser():parse(base_args(dir, {"--center_crop", "--cache_latents"})))
    local _, counts = M.build_dataset(a, m.tokenizer)
    local cache = M.cache_latents(m, a, counts.sources, "cpu", function() end)
    local batch = counts.sources[1].dataset:iter_batches{batch_size = 1, epoch = 1}()
    local fresh = ml.no_grad(function() return m.vae:encode(batch.instance_image) end)
    local kept = cache.instance_key.moments[batch.instance_key[1]]
    t:assert(kept ~= nil, "the cache has the first instance image")
    local c = kept:size(3) // 2
    local d = (kept:narrow(3, 1, c) - fresh.mean:select(1, 1)):abs():max():item()
    t:assert(d <= 1e-5, string.format("cached mean vs a fresh encode: %.3g apart", d))
    U.remove_tree(dir)
end

-- --cache_latents --random_flip: each image is cached as is and mirrored,
-- and each step takes the one the loader would have flipped to.  Over two
-- epochs (3 pairs, batch 1, 6 steps) the losses follow the plain run with
-- flips (bound as above), and both orientations were used.
function tests.cached_latents_follow_the_flips(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 1, 64)
    local extra = {"--max_train_steps", "6", "--num_epochs", "100", "--train_batch_size", "1", "--center_crop",
                   "--random_flip"}
    local _, _, out = plain_and_cached(t, dir, extra, 6)
    t:assert(U.has(out, "caching latents: class images (mirrored) 3/3"), "the mirrored pass ran: " .. out)
    -- both orientations were drawn in those two epochs
    local M = recipe()
    local a = M.check_args(M.parser():parse(base_args(dir, extra)))
    local m = ml.sd.load(MODEL)
    a.cache_latents = true
    local _, counts = M.build_dataset(a, m.tokenizer)
    local seen = {[true] = 0, [false] = 0}
    for _, src in ipairs(counts.sources) do
        for _, row in ipairs(src.dataset:rows(1)) do
            for epoch = 1, 2 do
                local f = ml.data.flip_drawn(src.flip_seed, epoch, row[src.image_col].key, src.flip_p)
                seen[f] = seen[f] + 1
            end
        end
    end
    t:assert(seen[true] > 0 and seen[false] > 0, string.format("flipped %d, not %d", seen[true], seen[false]))
    U.remove_tree(dir)
end

function tests.bad_inputs_are_clear_errors(t)
    local dir = U.temp_dir()
    local function err_of(extra, replace)
        local a = base_args(dir, extra)
        for i, v in ipairs(a) do if replace and replace[v] then a[i] = replace[v] end end
        local ok, e = pcall(run_main, a)
        return ok and "no error" or tostring(e)
    end
    -- missing instance folder
    t:assert(U.has(err_of({}), "instance_images_dir"), "missing instance folder named")
    -- only non-images
    ml.core.mkdir_p(dir .. "/inst")
    U.write_file(dir .. "/inst/notes.txt", "hello")
    local e = err_of({"--max_train_steps", "1"})
    t:assert(U.has(e, dir .. "/inst"), "folder of only non-images named: " .. e)
    -- a corrupt JPEG is named
    write_images(dir .. "/inst", 1, 1, 64)
    U.write_file(dir .. "/inst/broken.jpg", "\255\216\255\224 this is not a jpeg")
    e = err_of({"--max_train_steps", "1"})
    t:assert(U.has(e, "broken.jpg"), "corrupt JPEG named: " .. e)
    os.remove(dir .. "/inst/broken.jpg")
    -- resume with no checkpoint
    e = err_of({"--resume_from_checkpoint", "latest"})
    t:assert(U.has(e, "no checkpoint"), "resume without checkpoint: " .. e)
    -- output over the base model
    e = err_of({}, {[dir .. "/out"] = MODEL})
    t:assert(U.has(e, "must not be --model_dir"), "output_dir = model_dir refused: " .. e)
    -- a model folder missing a component
    local broken = dir .. "/model"
    os.execute(string.format("cp -r '%s' '%s' && rm -rf '%s/unet'", MODEL, broken, broken))
    e = err_of({}, {[MODEL] = broken})
    t:assert(U.has(e, "unet"), "missing model component named: " .. e)
    -- an unwritable output folder (a path through a file)
    U.write_file(dir .. "/afile", "x")
    e = err_of({}, {[dir .. "/out"] = dir .. "/afile/out"})
    t:assert(U.has(e, "afile"), "unusable output folder named: " .. e)
    -- bf16 on the CPU
    e = err_of({"--precision", "bf16-mixed"})
    t:assert(U.has(e, "needs a GPU"), "bf16 on CPU refused: " .. e)
    -- cached latents with pixels that change each epoch
    e = err_of({"--cache_latents"})
    t:assert(U.has(e, "--cache_latents needs --center_crop"), "cache without a center crop refused: " .. e)
    U.remove_tree(dir)
end

-- A full disk, simulated by a 3 MB tmpfs (needs mount rights: root, as on
-- the CI machines).  The save of the tuned model fails with an error naming
-- what could not be written, and leaves no partial files of its own.
function tests.full_disk_is_a_clear_error(t)
    local dir = U.temp_dir()
    local mnt = dir .. "/tiny"
    ml.core.mkdir_p(mnt)
    if not os.execute(string.format("mount -t tmpfs -o size=3m tmpfs '%s' 2>/dev/null", mnt)) then
        print("    note: full-disk case not run: this user cannot mount a tmpfs")
        U.remove_tree(dir)
        return
    end
    write_images(dir .. "/inst", 1, 1, 64)
    local a = base_args(dir, {"--max_train_steps", "1"})
    for i, v in ipairs(a) do if v == dir .. "/out" then a[i] = mnt .. "/out" end end
    local ok, e = pcall(run_main, a)
    local leftovers = {}
    local p = io.popen(string.format("find '%s' -name '*.tmp*' -o -name '*.partial*' -o -name '.*' -type f", mnt))
    for l in p:lines() do leftovers[#leftovers + 1] = l end
    p:close()
    os.execute(string.format("umount '%s'", mnt))
    t:assert(not ok, "the save cannot fit in 3 MB")
    e = tostring(e)
    t:assert(U.has(e, mnt) and (U.has(e, "space") or U.has(e, "write")), "the error names the file and the cause: " .. e)
    t:assert(#leftovers == 0, "partial files left: " .. table.concat(leftovers, ", "))
    U.remove_tree(dir)
end

return tests
