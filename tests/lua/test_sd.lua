-- test_sd.lua — diffusers folders: load, save, round trip, strict loading
-- errors, generation with PNG metadata.  Numerical agreement with diffusers
-- is checked by scripts/verify_fixture.lua (run by make test).
local ml = require "moonlit"
local util = require "testutil"
local tmpdir, rmrf = util.temp_dir, util.remove_tree
local core = ml.core

local FIX = "tests/fixtures/sd1-tiny/pipeline"

local copy_tree = util.copy_tree

local function max_abs_diff(a, b) return (a:double() - b:double()):abs():max():item() end

local T = {}

function T.load_builds_all_components(t)
    local m = ml.sd.load(FIX)
    t:assert(m.unet and m.vae and m.text_encoder and m.tokenizer and m.scheduler, "all components loaded")
    t:assertEq(m.unet:num_parameters(), core.json_load("tests/fixtures/sd1-tiny/meta.json").params.unet)
    t:assertEq(m.text_encoder:num_parameters(), core.json_load("tests/fixtures/sd1-tiny/meta.json").params.text_encoder)
    t:assertEq(m.vae:num_parameters(), core.json_load("tests/fixtures/sd1-tiny/meta.json").params.vae)
end

function T.save_load_round_trip_is_bit_exact(t)
    local m = ml.sd.load(FIX)
    local dir = tmpdir()
    ml.sd.save(dir, m)
    local m2 = ml.sd.load(dir)
    for _, c in ipairs {"unet", "vae", "text_encoder"} do
        local a, b = m[c]:state_dict(), m2[c]:state_dict()
        local worst = 0
        for _, k in ipairs(a._order) do worst = math.max(worst, max_abs_diff(a[k], b[k])) end
        t:assertEq(worst, 0, c .. " round trip")
    end
    -- the saved text encoder uses the text_model. prefix, as SD repos do
    local f = core.st_open(dir .. "/text_encoder/model.safetensors")
    t:assert(f:has("text_model.final_layer_norm.weight"), "text_model. prefix written")
    f:close()
    -- the saved files hold the same tensors (same layout) as the originals
    local orig = core.st_load(FIX .. "/unet/diffusion_pytorch_model.safetensors")
    local saved = core.st_load(dir .. "/unet/diffusion_pytorch_model.safetensors")
    local n = 0
    for k, v in pairs(orig) do
        n = n + 1
        t:assert(saved[k] ~= nil, "saved unet has " .. k)
        if saved[k] then t:assertEq(max_abs_diff(v, saved[k]), 0, k) end
    end
    t:assert(n > 100, "unet has many tensors")
    rmrf(dir)
end

function T.save_in_half_precision_rounds_once(t)
    local m = ml.sd.load(FIX, {components = {"vae"}})
    local dir = tmpdir()
    ml.sd.save(dir, {vae = m.vae, config = m.config, raw_config = m.raw_config}, {dtype = "bf16"})
    local f = core.st_open(dir .. "/vae/diffusion_pytorch_model.safetensors")
    t:assertEq(f:info("encoder.conv_in.weight").dtype, "bf16")
    f:close()
    local m2 = ml.sd.load(dir, {components = {"vae"}})
    local w, w2 = m.vae.encoder.conv_in.weight, m2.vae.encoder.conv_in.weight
    t:assertTensorEq(w:bf16():float(), w2, 0, "bf16 save = one rounding of the f32 weights")
    rmrf(dir)
end

function T.accepts_text_encoder_keys_without_prefix(t)
    local dir = tmpdir()
    copy_tree(FIX, dir)
    local w = core.st_load(FIX .. "/text_encoder/model.safetensors")
    local stripped = {}
    for k, v in pairs(w) do stripped[(k:gsub("^text_model%.", ""))] = v end
    core.st_save(dir .. "/text_encoder/model.safetensors", stripped)
    local a = ml.sd.load(FIX, {components = {"text_encoder"}})
    local b = ml.sd.load(dir, {components = {"text_encoder"}})
    local ids = core.tensor({{49406, 320, 1125, 49407}}, {dtype = "i64"})
    ml.no_grad(function() t:assertTensorEq(a.text_encoder(ids), b.text_encoder(ids), 0) end)
    rmrf(dir)
end

function T.strict_loading_names_every_problem(t)
    local dir = tmpdir()
    copy_tree(FIX, dir)
    local w = core.st_load(FIX .. "/vae/diffusion_pytorch_model.safetensors")
    w["decoder.conv_out.bias"] = nil                        -- missing
    w["encoder.extra.weight"] = core.zeros({3})              -- unexpected
    w["decoder.conv_in.bias"] = core.zeros({5})              -- wrong shape
    core.st_save(dir .. "/vae/diffusion_pytorch_model.safetensors", w)
    local ok, err = pcall(ml.sd.load, dir, {components = {"vae"}})
    t:assert(not ok, "strict load must fail")
    err = tostring(err)
    t:assert(err:find("decoder.conv_out.bias", 1, true), "names the missing tensor: " .. err)
    t:assert(err:find("encoder.extra.weight", 1, true), "names the unexpected tensor")
    t:assert(err:find("decoder.conv_in.bias", 1, true) and err:find("[5]", 1, true), "names the mis-shaped tensor and its shape")
    rmrf(dir)
end

function T.missing_config_key_is_named(t)
    local dir = tmpdir()
    copy_tree(FIX, dir)
    local cfg = core.json_load(FIX .. "/unet/config.json", {null = core.json_null})
    cfg.block_out_channels = nil
    core.json_save(dir .. "/unet/config.json", cfg)
    t:assertError(function() ml.sd.load(dir, {components = {"unet"}}) end, "block_out_channels")
    t:assertError(function() ml.sd.load(dir .. "/nope") end, "not found")
    rmrf(dir)
end

function T.truncated_weights_give_an_error_not_a_crash(t)
    local dir = tmpdir()
    copy_tree(FIX, dir)
    local p = dir .. "/unet/diffusion_pytorch_model.safetensors"
    local f = io.open(p, "rb")
    local data = f:read("a")
    f:close()
    f = io.open(p, "wb")
    f:write(data:sub(1, #data // 2))
    f:close()
    t:assertError(function() ml.sd.load(dir, {components = {"unet"}}) end, "diffusion_pytorch_model.safetensors")
    rmrf(dir)
end

function T.generate_writes_png_with_metadata(t)
    local m = ml.sd.load(FIX)
    local imgs, info = ml.sd.generate(m, {prompt = {"a dog", "a cat"}, num_images_per_prompt = 2,
                                          num_inference_steps = 3, seed = 7, scheduler = "euler"})
    t:assertEq(imgs:size(), {4, 64, 64, 3})
    t:assert(imgs:max():item() <= 1 and (-imgs):max():item() <= 0, "images in [0, 1]")
    local imgs2 = ml.sd.generate(m, {prompt = {"a dog", "a cat"}, num_images_per_prompt = 2,
                                     num_inference_steps = 3, seed = 7, scheduler = "euler"})
    t:assertTensorEq(imgs, imgs2, 0, "same seed, same images")
    local dir = tmpdir()
    ml.image.save(dir .. "/x.png", imgs:select(1, 1), {meta = {prompt = "a dog", seed = 7, steps = 3,
                                                             scheduler = info.scheduler, guidance = 7.5}})
    local txt = ml.image.png_text(dir .. "/x.png")
    t:assertEq(txt.prompt, "a dog")
    t:assertEq(txt.seed, "7")
    t:assertEq(txt.scheduler, "EulerDiscreteScheduler")
    rmrf(dir)
end

function T.precision_is_checked(t)
    t:assertError(function() ml.sd.load(FIX, {precision = "fp8"}) end, "unknown precision")
    t:assertError(function() ml.sd.load(FIX, {precision = "bf16-sr"}) end, "needs a CUDA device")
    local m = ml.sd.load(FIX, {components = {"vae"}})
    t:assertEq(m.precision, "f32")
end

function T.every_scheduler_runs_in_the_pipeline(t)
    local m = ml.sd.load(FIX)
    for _, s in ipairs {"pndm", "ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m"} do
        local img = ml.sd.generate(m, {prompt = "x", num_inference_steps = 4, seed = 1, scheduler = s})
        t:assertEq(img:size(), {1, 64, 64, 3}, s)
        local v = img:sum():item()
        t:assert(v == v, s .. " gives finite pixels")
    end
end

return T
