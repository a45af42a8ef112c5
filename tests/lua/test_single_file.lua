-- test_single_file.lua — single-file (CompVis/LDM layout) checkpoints:
-- the .ckpt and .safetensors fixtures (scripts/make_single_file_fixture.py)
-- equal their diffusers folder, moonlit -> moonlit round trips are
-- bit-exact (SD 1.x CLIP and SD 2.x OpenCLIP text encoders), a .ckpt whose
-- pickle would run code is refused without running it, and broken or
-- foreign files are clear errors.
local ml = require "moonlit"
local util = require "testutil"
local core = ml.core
local single_file = require "moonlit.single_file"

local T = {}
local F = "tests/fixtures/single_file/"
local NETS = {"unet", "vae", "text_encoder"}

-- Every weight of a and b is bit-equal (b's dtype is what is compared in).
local function same_weights(t, a, b, what)
    for _, c in ipairs(NETS) do
        local sa, sb = a[c]:state_dict{layout = "torch"}, b[c]:state_dict{layout = "torch"}
        t:assertEq(#sa._order, #sb._order, what .. ": " .. c .. " weight count")
        local bad
        for _, k in ipairs(sb._order) do
            local x, y = sa[k], sb[k]
            if not x or (x:to(y.dtype) - y):abs():max():item() ~= 0 then
                bad = bad or k
            end
        end
        t:assert(bad == nil, string.format("%s: %s weight '%s' differs", what, c, tostring(bad)))
    end
end

local function reference()
    return ml.sd.load(F .. "pipeline", {components = NETS})
end

function T.ckpt_fixture_equals_diffusers_folder(t)
    local m = ml.sd.load_single_file(F .. "tiny.ckpt", {config = F .. "pipeline", components = NETS})
    same_weights(t, m, reference(), "tiny.ckpt")
    t:assertEq(m.global_step, 470000, "global_step read from the pickle")
    t:assertEq(m.family, "sd1")
end

function T.safetensors_fixture_equals_diffusers_folder(t)
    -- Through sd.load: a file (not a folder) goes to the single-file loader.
    local m = ml.sd.load(F .. "tiny.safetensors", {config = F .. "pipeline", components = {"unet", "vae", "text_encoder", "scheduler"}})
    same_weights(t, m, reference(), "tiny.safetensors")
    t:assert(m.tokenizer == nil and m.scheduler ~= nil, "the fixture folder has a scheduler and no tokenizer")
    t:assertError(function() ml.sd.load(F .. "tiny.safetensors", {config = F .. "pipeline", components = {"tokenizer"}}) end,
                  "holds no tokenizer")
end

function T.ema_option_takes_the_ema_copies(t)
    local raw = core.ckpt_load(F .. "tiny.ckpt")
    local m = ml.sd.load_single_file(F .. "tiny.ckpt", {config = F .. "pipeline", components = {"unet"}, ema = true})
    local w = m.unet:state_dict{layout = "torch"}
    local ema = raw["model_ema.diffusion_modelinput_blocks00weight"]:to("f32")
    t:assertTensorEq(w["conv_in.weight"], ema, 0, "conv_in from model_ema")
    local ref = reference().unet:state_dict{layout = "torch"}
    t:assert((w["conv_in.weight"] - ref["conv_in.weight"]):abs():max():item() > 0, "EMA weights differ from the non-EMA ones")
end

function T.configs_from_shapes_match_the_folder(t)
    local info = single_file.inspect(F .. "tiny.ckpt")
    local ref = reference()
    for _, k in ipairs {"block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                        "up_block_types", "in_channels", "out_channels", "use_linear_projection"} do
        t:assertEq(info.unet[k], ref.unet.config[k], "unet " .. k)
    end
    for _, k in ipairs {"block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"} do
        t:assertEq(info.vae[k], ref.vae.config[k], "vae " .. k)
    end
    for _, k in ipairs {"vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
                        "hidden_act"} do
        t:assertEq(info.text_encoder[k], ref.text_encoder.config[k], "text_encoder " .. k)
    end
    local sd2 = util.temp_dir()
    local m2 = ml.sd.load("tests/fixtures/sd2-tiny/pipeline", {components = NETS})
    ml.sd.save_single_file(sd2 .. "/m.safetensors", m2)
    local i2 = single_file.inspect(sd2 .. "/m.safetensors")
    t:assertEq(i2.family, "sd2", "OpenCLIP keys mean SD 2.x")
    t:assertEq(i2.unet.use_linear_projection, true)
    t:assertEq(i2.text_encoder.num_hidden_layers, m2.text_encoder.config.num_hidden_layers)
    util.remove_tree(sd2)
end

-- moonlit -> moonlit, both text-encoder layouts; f32 is bit-exact, f16 is
-- the f16 rounding of each weight.
function T.round_trip_is_bit_exact(t)
    local dir = util.temp_dir()
    for _, fam in ipairs {"sd1-tiny", "sd2-tiny"} do
        local src = "tests/fixtures/" .. fam .. "/pipeline"
        local m = ml.sd.load(src, {components = NETS})
        local path = dir .. "/" .. fam .. ".safetensors"
        ml.sd.save_single_file(path, m)
        local f = core.st_open(path)
        local keys = f:keys()
        f:close()
        local prefix = fam == "sd1-tiny" and "cond_stage_model.transformer.text_model." or "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
        local found = false
        for _, k in ipairs(keys) do if k:sub(1, #prefix) == prefix then found = true end end
        t:assert(found, fam .. ": text encoder written under " .. prefix)
        same_weights(t, ml.sd.load_single_file(path, {config = src, components = NETS}), m, fam .. " f32")
        ml.sd.save_single_file(path, m, {dtype = "f16"})
        local back = ml.sd.load_single_file(path, {config = src, components = NETS})
        for _, c in ipairs(NETS) do m[c]:to{dtype = "f16"}; m[c]:to{dtype = "f32"} end
        same_weights(t, back, m, fam .. " f16")
    end
    util.remove_tree(dir)
end

function T.malicious_ckpt_is_refused_without_running_it(t)
    local marker = "single_file_payload_ran"
    os.remove(marker)
    t:assertError(function() ml.sd.load_single_file(F .. "malicious.ckpt") end, "refused global 'posix.system'")
    t:assertError(function() core.ckpt_load(F .. "malicious.ckpt") end, "nothing in the file is executed")
    t:assert(io.open(marker) == nil, "the pickle's os.system payload must not have run")
end

function T.truncated_or_corrupt_zip_is_a_clear_error(t)
    local dir = util.temp_dir()
    local data = util.read_file(F .. "tiny.ckpt")
    util.write_file(dir .. "/half.ckpt", data:sub(1, #data // 2))
    t:assertError(function() ml.sd.load_single_file(dir .. "/half.ckpt") end, "half.ckpt: not a zip archive or truncated")
    -- The directory intact, a storage's bytes cut: the entry runs past the end.
    local cd = data:find("PK\1\2", 1, true)
    util.write_file(dir .. "/cut.ckpt", data:sub(1, cd - 1 - 4096) .. data:sub(cd))
    t:assertError(function() core.ckpt_load(dir .. "/cut.ckpt") end, "cut.ckpt")
    util.write_file(dir .. "/junk.ckpt", string.rep("\0\1\2\3", 100))
    t:assertError(function() core.ckpt_load(dir .. "/junk.ckpt") end, "end-of-central-directory")
    -- An opcode torch never writes (NEWOBJ) in place of the pickle's first.
    local pkl = data:find("data.pkl", 1, true)
    local start = data:find("\128\2", pkl, true)
    util.write_file(dir .. "/op.ckpt", data:sub(1, start + 1) .. "\129" .. data:sub(start + 3))
    t:assertError(function() core.ckpt_load(dir .. "/op.ckpt") end, "unsupported pickle opcode 0x81")
    util.remove_tree(dir)
end

function T.unknown_layout_names_what_was_expected(t)
    local dir = util.temp_dir()
    core.st_save(dir .. "/random.safetensors", {["foo.bar"] = ml.zeros(2), ["baz"] = ml.ones(3)})
    t:assertError(function() ml.sd.load(dir .. "/random.safetensors") end, "expected model.diffusion_model.* (UNet)")
    -- A diffusers folder's weight file is not a single-file checkpoint either.
    t:assertError(function() ml.sd.load_single_file(F .. "pipeline/unet/diffusion_pytorch_model.safetensors") end,
                  "not a Stable Diffusion checkpoint in the original (LDM) layout")
    t:assertError(function() ml.sd.load_single_file(F .. "tiny.ckpt", {emma = true}) end, "unknown option 'emma'")
    t:assertError(function() ml.sd.load_single_file(F .. "tiny.ckpt", {prediction_type = "x"}) end, "prediction_type")
    t:assertError(function() ml.sd.save_single_file(dir .. "/x.safetensors", reference(), {dtype = "f8"}) end, "dtype")
    util.remove_tree(dir)
end

-- examples/dreambooth.lua --save_single_file: the file holds the tuned
-- model, equal to the diffusers folder the recipe saves beside it.
function T.dreambooth_save_single_file(t)
    local dir = util.temp_dir()
    for _, sub in ipairs {"inst", "class"} do
        core.mkdir_p(dir .. "/" .. sub)
        for i = 1, 2 do ml.image.save(string.format("%s/%s/%02d.png", dir, sub, i), ml.rand({64, 64, 3})) end
    end
    local M = assert(loadfile("examples/dreambooth.lua"))({as_module = true})
    local quiet, saved = function() end, print
    print = quiet
    local ok, err = pcall(M.main, {"--model_dir", "tests/fixtures/sd1-tiny/pipeline", "--output_dir", dir .. "/out",
        "--instance_images_dir", dir .. "/inst", "--instance_prompt", "a photo of sks dog", "--class_images_dir",
        dir .. "/class", "--class_prompt", "a photo of a dog", "--resolution", "64", "--device", "cpu",
        "--num_class_images", "2", "--max_train_steps", "1", "--lr", "1e-3", "--checkpointing_steps", "0",
        "--save_single_file", dir .. "/tuned.safetensors"})
    print = saved
    t:assert(ok, tostring(err))
    if ok then
        local folder = ml.sd.load(dir .. "/out", {components = NETS})
        local file = ml.sd.load_single_file(dir .. "/tuned.safetensors", {config = dir .. "/out", components = NETS})
        same_weights(t, file, folder, "dreambooth --save_single_file")
        local base = ml.sd.load("tests/fixtures/sd1-tiny/pipeline", {components = {"unet"}})
        local a, b = file.unet:state_dict{layout = "torch"}, base.unet:state_dict{layout = "torch"}
        t:assert((a["conv_in.weight"] - b["conv_in.weight"]):abs():max():item() > 0, "the file holds the tuned weights")
    end
    util.remove_tree(dir)
end

-- --original_config: the LDM YAML (a subset) or JSON; its parameterization
-- picks the prediction type, prediction_type overrides both.
function T.original_config_yaml_and_json(t)
    local dir = util.temp_dir()
    util.write_file(dir .. "/v2.yaml", table.concat({
        "model:", "  base_learning_rate: 1.0e-4", "  target: ldm.models.diffusion.ddpm.LatentDiffusion",
        "  params:", "    parameterization: \"v\"  # 768-v", "    linear_start: 0.00085", "    scale_factor: 0.18215",
        "    unet_config:", "      params:", "        num_head_channels: 64", "        channel_mult: [ 1, 2, 4, 4 ]", ""}, "\n"))
    core.json_save(dir .. "/eps.json", {model = {params = {parameterization = "eps"}}})
    local function pred(o)
        o.config, o.components = F .. "pipeline", {"scheduler"}
        return ml.sd.load_single_file(F .. "tiny.ckpt", o).scheduler.config.prediction_type
    end
    t:assertEq(pred{}, "epsilon", "the folder's scheduler")
    t:assertEq(pred{original_config = dir .. "/v2.yaml"}, "v_prediction", "YAML parameterization v")
    t:assertEq(pred{original_config = dir .. "/eps.json"}, "epsilon", "JSON parameterization eps")
    t:assertEq(pred{original_config = dir .. "/v2.yaml", prediction_type = "epsilon"}, "epsilon", "the option wins")
    util.write_file(dir .. "/bad.yaml", "model:\n  - a\n")
    t:assertError(function() pred{original_config = dir .. "/bad.yaml"} end, "bad.yaml:2: YAML block lists")
    t:assertError(function() pred{original_config = dir .. "/none.yaml"} end, "original_config: cannot read")
    t:assertError(function() pred{original_config = dir .. "/none.yaml"} end, "No such file")
    -- a folder is named as one, not as missing
    t:assertError(function() pred{original_config = dir} end, "directory, not a regular file")
    util.remove_tree(dir)
end

return T
