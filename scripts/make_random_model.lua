-- make_random_model.lua — a diffusers folder with random weights, built from
-- a folder of configs (model_index.json, unet/, vae/, text_encoder/,
-- scheduler/, tokenizer/), for tests and benchmarks without downloads.
--   moonlit scripts/make_random_model.lua <configs_dir> <out_dir> [--dtype f32|f16|bf16] [--seed N]
-- Weights use PyTorch's default initialisation (the modules' own init).
local ml = require "moonlit"

local p = ml.argparse.new("make_random_model.lua", "A diffusers folder with random weights, from a folder of configs.")
p:positional("configs_dir", {help = "model_index.json and the components' configs"})
p:positional("out_dir", {help = "the diffusers folder to write"})
p:option("dtype", {type = "string", default = "f32", choices = {"f32", "f16", "bf16"}, help = "dtype of the saved weights"})
p:option("seed", {type = "integer", default = 0, help = "seed of the initialisation"})
local args = p:parse(arg)
local src, out, dtype, seed = args.configs_dir, args.out_dir, args.dtype, args.seed

local t0 = os.time()
local m = ml.sd.from_configs(src, {seed = seed})
if not m.tokenizer_dir then
    io.stderr:write("make_random_model: note: " .. src .. "/tokenizer has no vocabulary (run `make fixtures`); " ..
                    "the folder is written without a tokenizer\n")
end
local n = 0
for _, c in ipairs {"unet", "vae", "text_encoder"} do n = n + m[c]:num_parameters() end
ml.sd.save(out, m, {dtype = dtype})
print(string.format("wrote %s: %.1fM parameters (%s) in %d s", out, n / 1e6, dtype, os.time() - t0))
