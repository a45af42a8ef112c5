-- make_random_model.lua — a diffusers folder with random weights, built from
-- a folder of configs (model_index.json, unet/, vae/, text_encoder/,
-- scheduler/, tokenizer/), for tests and benchmarks without downloads.
--   moonlit scripts/make_random_model.lua <configs_dir> <out_dir> [--dtype f32|f16|bf16] [--seed N]
-- Weights use PyTorch's default initialisation (the modules' own init).
local ml = require "moonlit"

local src, out = arg[1], arg[2]
local dtype, seed = "f32", 0
for i = 3, #arg, 2 do
    if arg[i] == "--dtype" then dtype = arg[i + 1]
    elseif arg[i] == "--seed" then seed = tonumber(arg[i + 1])
    else io.stderr:write("make_random_model: unknown option " .. arg[i] .. "\n") os.exit(1) end
end
if not src or not out then
    io.stderr:write("usage: moonlit scripts/make_random_model.lua <configs_dir> <out_dir> [--dtype f32|f16|bf16] [--seed N]\n")
    os.exit(1)
end

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
