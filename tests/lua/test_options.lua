-- test_options.lua — strict options: unknown names and values are errors
-- naming the option and listing what is accepted (moonlit.options), and
-- DDIM's eta through generation; JSON's \u0000 decoded, not refused or cut.
local ml = require "moonlit"
local options = require "moonlit.options"
local util = require "testutil"
local core = ml.core

local FIX = "tests/fixtures/sd1-tiny/pipeline"

local model
local function tiny()
    model = model or ml.sd.load(FIX)
    return model
end

-- fn must fail with a message holding every one of the plain strings
local function fails_with(t, fn, parts, what)
    local err = util.error_of(fn)
    t:assert(err ~= nil, what .. ": expected an error")
    if not err then return end
    for _, p in ipairs(parts) do t:assert(util.has(err, p), what .. ": message has '" .. p .. "': " .. err) end
end

local T = {}

function T.check_options_helper(t)
    t:assertEq(options.check_options("f", nil, {"a"}), {}, "nil opts")
    local o = {a = 1, b = 2}
    t:assert(options.check_options("f", o, {"a", "b"}) == o, "returns the same table")
    t:assert(options.check_options("f", o, {a = true, b = true}) == o, "set form")
    fails_with(t, function() options.check_options("f", {a = 1, cc = 2, [1] = 3}, {"a", "b", "c"}) end,
               {"f: unknown options", "'cc'", "[1]", "accepted: a, b, c"}, "two unknown")
    fails_with(t, function() options.check_options("f", "x", {"a"}) end, {"f: options must be a table"}, "not a table")
    fails_with(t, function() options.check_choice("f", "mode", "z", {"x", "y"}) end,
               {"option 'mode' must be one of x, y", "'z'"}, "choice")
    t:assertEq(options.check_choice("f", "mode", "y", {"x", "y"}), "y")
end

function T.generate_rejects_misspelt_options(t)
    local m = tiny()
    fails_with(t, function() ml.sd.generate(m, {promt = "a dog", sed = 3}) end,
               {"sd.generate", "unknown options", "'promt' (did you mean 'prompt'?)", "'sed' (did you mean 'seed'?)",
                "accepted:", "negative_prompt"}, "promt/sed")
    fails_with(t, function() ml.sd.generate(m, {prompt = "a dog", seed = 1.5}) end, {"'seed' must be an integer"}, "seed")
    fails_with(t, function() ml.sd.generate(m, {prompt = "a", scheduler = "lms", num_inference_steps = 1}) end,
               {"unknown scheduler 'lms'", "accepted:", "ddim", "euler_ancestral"}, "unknown scheduler")
    -- eta belongs to DDIM only (diffusers passes it to schedulers whose step takes it)
    fails_with(t, function() ml.sd.generate(m, {prompt = "a", eta = 0.5, num_inference_steps = 1}) end,
               {"'eta' applies to the DDIM scheduler only", "PNDMScheduler"}, "eta on PNDM")
    fails_with(t, function() ml.sd.generate(m, {prompt = "a", eta = -1, scheduler = "ddim"}) end,
               {"'eta' must be a number >= 0"}, "negative eta")
    local gen = require("moonlit.pipelines.generate_images").generate_images
    fails_with(t, function() gen(m, {prompts = {"x"}, num_sample_per_prompt = 2}) end,
               {"generate_images", "'num_sample_per_prompt' (did you mean 'num_samples_per_prompt'?)"}, "generate_images")
end

function T.schedulers_reject_unknown_names(t)
    local cfg = tiny().scheduler.config
    fails_with(t, function() ml.schedulers.from_config(cfg, "lms") end, {"unknown scheduler 'lms'", "pndm"}, "lms")
    fails_with(t, function() ml.schedulers.from_config(cfg, 3) end, {"unknown scheduler 3"}, "number")
    t:assertEq(ml.schedulers.from_config(cfg, "ddim").config._class_name, "DDIMScheduler")
    t:assertEq(ml.schedulers.from_config(cfg).config._class_name, cfg._class_name, "no name: the config's class")
    local bogus = {}
    for k, v in pairs(cfg) do bogus[k] = v end
    bogus._class_name = "LMSDiscreteScheduler"
    fails_with(t, function() ml.schedulers.from_config(bogus) end,
               {"unknown scheduler 'LMSDiscreteScheduler' (the config's _class_name"}, "unsupported class in the config")
end

function T.sd_load_rejects_unknown_components_and_options(t)
    fails_with(t, function() ml.sd.load(FIX, {components = {"unet", "bogus"}}) end,
               {"sd.load", "option 'components' must be one of", "scheduler, text_encoder, tokenizer, unet, vae",
                "'bogus'"}, "bogus component")
    fails_with(t, function() ml.sd.load(FIX, {components = "unet"}) end, {"'components' must be a list"}, "string")
    fails_with(t, function() ml.sd.load(FIX, {devcie = "cpu"}) end,
               {"unknown option 'devcie' (did you mean 'device'?)", "accepted: components, device"}, "devcie")
end

function T.data_and_train_reject_unknown_options(t)
    local ds = ml.data.from_items {1, 2, 3}
    fails_with(t, function() ds:iter_batches{batch_size = 1, shuffle = true} end,
               {"iter_batches: unknown option 'shuffle'", "accepted: batch_size"}, "iter_batches")
    fails_with(t, function() ml.data.ImageTransform{resize = 8, flip = 0.5} end,
               {"ImageTransform: unknown option 'flip'", "hflip"}, "ImageTransform")
    fails_with(t, function() ml.data.read_images("tests", {recursve = true}) end,
               {"read_images: unknown option 'recursve' (did you mean 'recursive'?)"}, "read_images")
    fails_with(t, function() ds:map_batches(function(b) return b end, {batchsize = 2}) end,
               {"map_batches: unknown option 'batchsize'"}, "map_batches")
    fails_with(t, function() ds:map_batches(ml.data.ImageTransform{}, {col = "image"}) end,
               {"unknown option 'col'", "accepted: column, output"}, "map_batches(ImageTransform)")
    fails_with(t, function() ds:add_column("x", function(b) return b end, {size = 2}) end,
               {"add_column: unknown option 'size'"}, "add_column")
    fails_with(t, function() ml.train.run(function() end, {num_worker = 1}) end,
               {"ml.train.run: unknown option 'num_worker' (did you mean 'num_workers'?)"}, "train.run")
end

-- eta > 0 through the pipeline is DDIM's step with eta: the pipeline's
-- result equals stepping the scheduler by hand with the same noise stream
-- (DDIM's step itself is checked against diffusers with eta in
-- test_schedulers.lua), and differs from eta = 0.
function T.ddim_eta_reaches_the_scheduler(t)
    local m = tiny()
    local lat = core.randn({1, 4, 4, 4})
    local function run(eta)
        core.manual_seed(7)
        return ml.sd.generate(m, {prompt = "a dog", scheduler = "ddim", eta = eta, num_inference_steps = 3,
                                  latents = lat, guidance_scale = 1})
    end
    local a, a2, z = run(0.8), run(0.8), run(0)
    t:assertTensorEq(a, a2, 0, "same seed, same image")
    t:assert((a - z):abs():max():item() > 1e-4, "eta changes the image")
    -- by hand
    local P = require "moonlit.pipelines.stable_diffusion"
    local image = core.no_grad(function()
        local sch = ml.schedulers.from_config(m.scheduler.config, "ddim")
        sch:set_timesteps(3)
        core.manual_seed(7)
        local ctx = P.encode_prompts(m, {"a dog"})
        local x = lat * sch.init_noise_sigma
        for _, tt in ipairs(sch.timesteps) do
            local eps = m.unet(sch:scale_model_input(x, tt), tt, ctx)
            x = sch:step(eps, tt, x, {eta = 0.8})
        end
        return core.clamp(m.vae:decode(x / m.vae.scaling_factor) / 2 + 0.5, 0, 1)
    end)
    t:assertTensorEq(a, image, 1e-6, "pipeline = hand-stepped DDIM with eta")
end

-- \u0000 is valid JSON (prompt lists, metadata): strings keep the NUL byte;
-- a key holding one is refused by the JSON library with a clear message.
function T.json_strings_keep_nul(t)
    local v = core.json_decode('["a\\u0000b", {"p": "x\\u0000"}, "\\u0000"]')
    t:assertEq(v[1], "a\0b", "NUL inside")
    t:assertEq(#v[1], 3)
    t:assertEq(v[2].p, "x\0", "NUL at the end of an object value")
    t:assertEq(v[3], "\0", "only a NUL")
    local dir = util.temp_dir()
    util.write_file(dir .. "/p.json", '{"prompts": ["a\\u0000dog", "cat"]}')
    t:assertEq(core.json_load(dir .. "/p.json").prompts, {"a\0dog", "cat"}, "json_load")
    util.write_file(dir .. "/k.json", '{"k\\u0000x": 1}')
    fails_with(t, function() core.json_load(dir .. "/k.json") end, {dir .. "/k.json:1:", "NUL byte in object key"},
               "NUL in a key")
    fails_with(t, function() core.json_decode("[1,") end, {"json_decode:1:"}, "syntax error still located")
    fails_with(t, function() core.json_load(dir .. "/missing.json") end, {"missing.json"}, "missing file")
    util.remove_tree(dir)
end

return T
