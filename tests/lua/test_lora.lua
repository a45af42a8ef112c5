-- test_lora.lua — ml.nn.lora on the sd1-tiny fixture: adapters land on the
-- attention projections and nowhere else; with B = 0 the model is the base
-- model exactly; merged equals unmerged; the file round-trips into the same
-- images (also through examples/generate.lua); a short
-- `dreambooth.lua --use_lora` run lowers the loss and changes only the LoRA
-- weights; bad options are errors naming them.
local ml = require "moonlit"
local U = require "testutil"
local lora = ml.nn.lora
local tests = {}

local MODEL = "tests/fixtures/sd1-tiny/pipeline"

local function unet_inputs()
    ml.manual_seed(7)
    return ml.randn({2, 8, 8, 4}), ml.tensor({10, 500}, {dtype = "i64"}), ml.randn({2, 77, 32})
end

-- Give every adapter's B random values (B starts at zero, which hides mistakes).
local function randomize_b(model, std)
    for _, l in ipairs(lora.layers(model)) do ml.nn.init.normal_(l[2].lora_B.weight, 0, std or 0.3) end
end

local function max_abs(a, b) return (a - b):abs():max():item() end

function tests.inject_targets_the_attention_projections(t)
    local m = ml.sd.load(MODEL)
    local before = {}
    for _, np in ipairs(m.unet:named_parameters()) do before[np[1]] = np[2] end
    local attn = 0
    for _, nm in ipairs(m.unet:named_modules()) do
        if nm[1]:match("%.attn[12]$") then attn = attn + 1 end
    end
    t:assert(attn > 0, "the fixture UNet has attention blocks")
    local params = lora.inject(m.unet, {rank = 2})
    local layers = lora.layers(m.unet)
    t:assertEq(#layers, 4 * attn, "one adapter per to_q/to_k/to_v/to_out.0 of each attention")
    t:assertEq(#params, 2 * #layers, "lora_A and lora_B of each layer returned")
    for _, l in ipairs(layers) do
        t:assert(l[1]:match("%.attn[12]%.to_[qkv]$") or l[1]:match("%.attn[12]%.to_out%.0$"), "adapter on " .. l[1])
        t:assertEq(l[2].lora_A.weight:size(), {2, l[2].in_features}, "A is [rank, in] at " .. l[1])
        t:assertEq(l[2].lora_B.weight:size(), {l[2].out_features, 2}, "B is [out, rank] at " .. l[1])
    end
    -- only the adapters train; the base names and tensors are all still there
    local trainable = 0
    for _, np in ipairs(m.unet:named_parameters()) do
        local is_lora = np[1]:match("%.lora_[AB]%.weight$") ~= nil
        t:assertEq(np[2].requires_grad, is_lora, "requires_grad of " .. np[1])
        if is_lora then trainable = trainable + 1
        else t:assert(before[np[1]] == np[2], "base parameter kept: " .. np[1]) end
    end
    t:assertEq(trainable, #params, "trainable parameters")
    local n = 0
    for _ in pairs(before) do n = n + 1 end
    t:assertEq(#m.unet:named_parameters(), n + #params, "parameters: the base ones plus the adapters'")
    -- the text encoder's defaults are CLIP's projection names
    local tp = lora.inject(m.text_encoder, {rank = 2})
    t:assertEq(#tp, 2 * 4 * m.text_encoder.config.num_hidden_layers, "q/k/v/out_proj of every CLIP layer")
    t:assert(lora.layers(m.text_encoder)[1][1]:match("^encoder%.layers%.0%.self_attn%.[qkvout]+_proj$"),
             "text encoder adapter names")
end

function tests.zero_b_is_the_base_model_exactly(t)
    local m = ml.sd.load(MODEL)
    local x, ts, ctx = unet_inputs()
    local ids = m.tokenizer:encode_batch({"a photo of sks dog"}, {padding = "max_length", max_length = 77})
    local ref = ml.no_grad(function() return m.unet(x, ts, ctx) end)
    local ref_te = ml.no_grad(function() return m.text_encoder(ids) end)
    lora.inject(m.unet, {rank = 4, alpha = 16})
    lora.inject(m.text_encoder, {rank = 4})
    t:assertEq(max_abs(ml.no_grad(function() return m.unet(x, ts, ctx) end), ref), 0, "UNet with B = 0")
    t:assertEq(max_abs(ml.no_grad(function() return m.text_encoder(ids) end), ref_te), 0, "text encoder with B = 0")
    -- A follows Linear's default init (kaiming-uniform a = sqrt(5): |A| <= 1/sqrt(in)), not zero
    local l = lora.layers(m.unet)[1][2]
    local amax = l.lora_A.weight:abs():max():item()
    t:assert(amax > 0 and amax <= 1 / math.sqrt(l.in_features) + 1e-7, "A init bound, got " .. amax)
    -- with B set, the output moves; removing the adapters gives the base model back
    randomize_b(m.unet)
    t:assert(max_abs(ml.no_grad(function() return m.unet(x, ts, ctx) end), ref) > 1e-3, "adapters change the output")
    t:assertEq(lora.remove(m.unet), 128, "layers unwrapped")
    t:assertEq(max_abs(ml.no_grad(function() return m.unet(x, ts, ctx) end), ref), 0, "after lora.remove")
end

function tests.merged_equals_unmerged(t)
    local m = ml.sd.load(MODEL)
    local x, ts, ctx = unet_inputs()
    lora.inject(m.unet, {rank = 4, alpha = 8})
    randomize_b(m.unet)
    local unmerged = ml.no_grad(function() return m.unet(x, ts, ctx) end)
    local n = lora.merge(m.unet)
    t:assertEq(n, 128, "layers merged")
    t:assertEq(#lora.layers(m.unet), 0, "no wrappers left")
    for _, np in ipairs(m.unet:named_parameters()) do
        t:assert(not np[1]:match("lora_"), "no LoRA parameter left: " .. np[1])
    end
    local merged = ml.no_grad(function() return m.unet(x, ts, ctx) end)
    -- f32 rounding of W + scale*B*A versus W x + scale*B(A x)
    local d = max_abs(merged, unmerged)
    t:assert(d <= 1e-4 * math.max(1, unmerged:abs():max():item()), "merged vs unmerged max diff " .. d)
    t:assert(max_abs(merged, ml.no_grad(function() return ml.sd.load(MODEL).unet(x, ts, ctx) end)) > 1e-3,
             "the merge changed the weights")
end

function tests.save_load_generate_round_trip(t)
    local dir = U.temp_dir()
    local m = ml.sd.load(MODEL)
    lora.inject(m.unet, {rank = 4, alpha = 8})
    lora.inject(m.text_encoder, {rank = 2})
    ml.manual_seed(3)
    randomize_b(m.unet); randomize_b(m.text_encoder)
    local file = lora.save_weights(dir .. "/lora", {unet = m.unet, text_encoder = m.text_encoder})
    t:assertEq(file, dir .. "/lora/" .. lora.WEIGHT_NAME, "file name diffusers looks for")
    local h = ml.core.st_open(file)
    local keys = h:keys()
    t:assertEq(#keys, 2 * (128 + 8), "two tensors per adapter")
    t:assert(h:has("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"), "PEFT UNet key")
    t:assert(h:has("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_B.weight"), "to_out.0 key")
    t:assert(h:has("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"), "text encoder key")
    local cfg = ml.core.json_decode(h:metadata().lora_adapter_metadata)
    h:close()
    t:assertEq({cfg["unet.r"], cfg["unet.lora_alpha"], cfg["text_encoder.r"], cfg["text_encoder.lora_alpha"]},
               {4, 8, 2, 2}, "rank and alpha in the metadata")
    local gen = {prompt = "a photo of sks dog", num_inference_steps = 2, seed = 5}
    local ref = ml.no_grad(ml.sd.generate, m, gen)
    -- a fresh model with the file: the same image, bit for bit
    local m2 = ml.sd.load(MODEL)
    local info = lora.load_weights(m2, dir .. "/lora")
    t:assertEq({info.unet, info.text_encoder}, {128, 8}, "layers loaded")
    t:assertEq(max_abs(ml.no_grad(ml.sd.generate, m2, gen), ref), 0, "unmerged load generates the same image")
    -- merged: the same within f32 rounding
    local m3 = ml.sd.load(MODEL)
    lora.load_weights(m3, file, {merge = true})
    t:assertEq(#lora.layers(m3.unet) + #lora.layers(m3.text_encoder), 0, "merged: no wrappers")
    local d = max_abs(ml.no_grad(ml.sd.generate, m3, gen), ref)
    t:assert(d <= 1e-4, "merged load vs in-memory image max diff " .. d)
    -- scale 0 is the base model
    local m4 = ml.sd.load(MODEL)
    lora.load_weights(m4, file, {scale = 0})
    t:assertEq(max_abs(ml.no_grad(ml.sd.generate, m4, gen), ml.no_grad(ml.sd.generate, ml.sd.load(MODEL), gen)), 0,
               "lora_scale 0 is the base model")
    t:assert(max_abs(ref, ml.no_grad(ml.sd.generate, ml.sd.load(MODEL), gen)) > 1e-3, "the adapters change the image")

    -- examples/generate.lua --lora_weights_dir, unmerged and merged
    local G = assert(loadfile("examples/generate.lua"))({as_module = true})
    local function run(extra)
        local argv = {"--model_dir", MODEL, "--prompt", "a photo of sks dog", "--steps", "2", "--seed", "5",
                      "--device", "cpu", "--output_dir", dir .. "/gen", "--lora_weights_dir", dir .. "/lora"}
        for _, v in ipairs(extra) do argv[#argv + 1] = v end
        local made = G.run(G.parse(argv, {exit = false}), function() end)
        return made[1].image
    end
    local plain, merged = run({}), run({"--lora_merge"})
    t:assertEq(max_abs(plain, ref:select(1, 1)), 0, "generate.lua applies the LoRA weights")
    d = max_abs(plain, merged)
    t:assert(d <= 1e-4, "generate.lua merged vs unmerged max diff " .. d)
    local _, msg = G.parse({"--model_dir", MODEL, "--prompt", "x", "--lora_scale", "0.5"}, {exit = false})
    t:assert(U.has(msg, "--lora_scale needs --lora_weights_dir"), "lora_scale alone: " .. tostring(msg))
    _, msg = G.parse({"--model_dir", MODEL, "--prompt", "x", "--lora_weights_dir", dir .. "/nothing"}, {exit = false})
    t:assert(U.has(msg, "--lora_weights_dir: no such"), "missing LoRA folder: " .. tostring(msg))
    U.remove_tree(dir)
end

function tests.bad_options_are_errors_naming_them(t)
    local m = ml.sd.load(MODEL)
    t:assertError(function() lora.inject(m.unet, {rank = 0}) end, "rank must be an integer >= 1 (got 0)")
    t:assertError(function() lora.inject(m.unet, {rank = 2.5}) end, "rank must be an integer")
    t:assertError(function() lora.inject(m.unet, {targets = {"to_q", "to_qq"}}) end, "target 'to_qq' matches no layer")
    t:assertError(function() lora.inject(m.unet, {rnak = 4}) end, "unknown option 'rnak'")
    t:assertError(function() lora.inject(m.unet, {alpha = -1}) end, "alpha must be a positive number")
    t:assertError(function() lora.inject(m.unet, {dropout = 1}) end, "dropout must be a number in [0, 1)")
    t:assertError(function() lora.inject(m.unet, {targets = {"conv_in"}}) end, "conv_in, a Conv2d, not a Linear")
    t:assertEq(#lora.layers(m.unet), 0, "failed injections change nothing")
    lora.inject(m.unet, {rank = 2})
    t:assertError(function() lora.inject(m.unet, {rank = 2}) end, "already has a LoRA adapter")
    -- loading: wrong rank, keys of another layout, missing file
    local dir = U.temp_dir()
    local file = lora.save_weights(dir .. "/a.safetensors", {unet = m.unet})
    local m2 = ml.sd.load(MODEL)
    lora.inject(m2.unet, {rank = 3})
    t:assertError(function() lora.load(m2.unet, ml.core.st_load(file), {prefix = "unet"}) end, "size mismatch")
    ml.core.st_save(dir .. "/kohya.safetensors", {["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"] = ml.zeros({2, 16})})
    t:assertError(function() lora.load_weights(ml.sd.load(MODEL), dir .. "/kohya.safetensors") end,
                  "not in diffusers' LoRA layout")
    t:assertError(function() lora.load_weights(ml.sd.load(MODEL), dir) end, "/pytorch_lora_weights.safetensors")
    t:assertError(function() lora.load_weights(ml.sd.load(MODEL), file, {sclae = 1}) end, "unknown option 'sclae'")
    t:assertError(function() lora.save_weights(dir, {vae = m.unet}) end, "unknown model 'vae'")
    t:assertError(function() lora.save_weights(dir, {unet = m2.text_encoder}) end, "no model given has LoRA layers")
    U.remove_tree(dir)
end

-- ---- examples/dreambooth.lua --use_lora ---------------------------------------------

local function write_images(dir, n, size)
    ml.core.mkdir_p(dir)
    ml.manual_seed(11 + n)
    for i = 1, n do
        local img = ml.rand({size, size, 3}) * 0.3
        img = ml.cat({img:narrow(3, 1, 1) + 0.6, img:narrow(3, 2, 2)}, 3)     -- reddish
        ml.image.save(string.format("%s/%02d.png", dir, i), ml.clamp(img, 0, 1))
    end
end

local function run_main(argv)
    local M = assert(loadfile("examples/dreambooth.lua"))({as_module = true})
    local saved = print
    print = function() end
    local ok, res = pcall(M.main, argv)
    print = saved
    if not ok then error(res, 0) end
    return res
end

local function db_args(dir, extra)
    local a = {"--model_dir", MODEL, "--output_dir", dir .. "/out", "--instance_images_dir", dir .. "/inst",
               "--instance_prompt", "a photo of sks dog", "--class_images_dir", dir .. "/class",
               "--class_prompt", "a photo of a dog", "--resolution", "64", "--device", "cpu",
               "--num_class_images", "2", "--num_inference_steps", "2", "--sample_batch_size", "2",
               "--checkpointing_steps", "0"}
    for _, v in ipairs(extra or {}) do a[#a + 1] = v end
    return a
end

-- Mean loss on the instance image with fixed draws.
local function instance_loss(m, dir)
    local M = assert(loadfile("examples/dreambooth.lua"))({as_module = true})
    m.noise_scheduler = require("moonlit.schedulers").from_config(m.scheduler_config, "ddpm")
    local img = ml.image.resize(ml.image.load(dir .. "/inst/01.png"), 64, 64) * 2 - 1
    local images = ml.cat({img:unsqueeze(1), img:unsqueeze(1)}, 1)
    local ids = m.tokenizer:encode_batch({"a photo of sks dog", "a photo of sks dog"},
                                         {padding = "max_length", max_length = 77, truncation = true})
    local total = 0
    for s = 1, 4 do
        ml.manual_seed(100 + s)
        local o = {noise = ml.randn({2, 8, 8, 4}), timesteps = ml.tensor({100 * s + 50, 100 * s + 50}, {dtype = "i64"}),
                   vae_eps = ml.randn({2, 8, 8, 4})}
        total = total + ml.no_grad(M.loss, m, images, ids, {prior_loss_weight = 0}, o):item()
    end
    return total / 4
end

function tests.dreambooth_use_lora_trains_only_the_adapters(t)
    local dir = U.temp_dir()
    write_images(dir .. "/inst", 2, 64)
    local res = run_main(db_args(dir, {"--use_lora", "--lora_rank", "4", "--lora_text_encoder", "--lr", "3e-2",
                                       "--max_train_steps", "10", "--num_epochs", "100", "--checkpointing_steps", "5"}))
    t:assertEq(res.steps, 10, "steps")
    local out = dir .. "/out"
    t:assert(ml.core.is_file(out .. "/" .. lora.WEIGHT_NAME), "pytorch_lora_weights.safetensors written")
    t:assert(not ml.core.is_dir(out .. "/unet"), "no full model written with --use_lora")
    -- only LoRA weights changed: every base tensor equals the pretrained one
    local base = ml.sd.load(MODEL)
    for _, part in ipairs {"unet", "text_encoder", "vae"} do
        local ref = base[part]:state_dict()
        local worst, n = 0, 0
        for k, v in pairs(res.model[part]:state_dict()) do
            if type(k) == "string" and not k:match("lora_") then
                worst = math.max(worst, max_abs(v, ref[k])); n = n + 1
            end
        end
        t:assert(n > 0, part .. " compared")
        t:assertEq(worst, 0, part .. ": base weights unchanged by a LoRA run")
    end
    local moved = 0
    for _, l in ipairs(lora.layers(res.model.unet)) do moved = math.max(moved, l[2].lora_B.weight:abs():max():item()) end
    t:assert(moved > 0, "UNet LoRA B trained")
    t:assert(#lora.layers(res.model.text_encoder) == 8, "--lora_text_encoder put adapters in the text encoder")
    -- the checkpoint holds only the adapters
    local ck = ml.core.st_open(out .. "/checkpoint-5/model-unet.safetensors")
    for _, k in ipairs(ck:keys()) do t:assert(k:match("%.lora_[AB]%.weight$"), "checkpoint key " .. k) end
    t:assertEq(#ck:keys(), 256, "checkpoint: the UNet's adapters")
    ck:close()
    -- the loss on the instance images fell
    local before = instance_loss(ml.sd.load(MODEL), dir)
    local tuned = ml.sd.load(MODEL)
    lora.load_weights(tuned, out)
    local after = instance_loss(tuned, dir)
    t:assert(after < before * 0.9, string.format("instance loss before %.4f, after %.4f", before, after))
    -- flags that need --use_lora, or contradict it
    t:assertError(function() run_main(db_args(dir, {"--lora_rank", "8"})) end, "--lora_rank needs --use_lora")
    t:assertError(function() run_main(db_args(dir, {"--use_lora", "--train_text_encoder"})) end,
                  "with --use_lora use --lora_text_encoder")
    t:assertError(function() run_main(db_args(dir, {"--use_lora", "--lora_rank", "0"})) end, "--lora_rank must be >= 1")
    U.remove_tree(dir)
end

return tests
