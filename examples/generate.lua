-- generate.lua — text to image with a diffusers-format Stable Diffusion folder.
--   moonlit examples/generate.lua <model_dir> "<prompt>" [--out out.png] [--steps 50]
--       [--guidance 7.5] [--seed 0] [--scheduler pndm|ddim|euler|euler_ancestral|dpmpp_2m]
--       [--negative ""] [--num 1] [--height H] [--width W] [--device cpu|cuda]
-- Writes PNGs whose text chunks record prompt, seed, steps, scheduler and guidance.
local ml = require "moonlit"

local function usage(msg)
    if msg then io.stderr:write("generate: " .. msg .. "\n") end
    io.stderr:write("usage: moonlit examples/generate.lua <model_dir> \"<prompt>\" [--out out.png] [--steps N] " ..
                    "[--guidance G] [--seed S] [--scheduler NAME] [--negative TEXT] [--num N] [--height H] " ..
                    "[--width W] [--device DEV]\n")
    os.exit(msg and 1 or 0)
end

local o = {out = "out.png", steps = 50, guidance = 7.5, seed = 0, negative = "", num = 1, device = "cpu"}
local pos = {}
local i = 1
while i <= #arg do
    local a = arg[i]
    if a == "-h" or a == "--help" then usage() end
    local key = a:match("^%-%-(.+)$")
    if key then
        if o[key] == nil and key ~= "scheduler" and key ~= "height" and key ~= "width" then usage("unknown option " .. a) end
        local v = arg[i + 1]
        if v == nil then usage("option " .. a .. " needs a value") end
        if type(o[key]) == "number" or key == "height" or key == "width" then
            v = tonumber(v) or usage("option " .. a .. " needs a number")
        end
        o[key] = v
        i = i + 2
    else
        pos[#pos + 1] = a
        i = i + 1
    end
end
if #pos < 2 then usage("expected a model folder and a prompt") end

local m = ml.sd.load(pos[1], {device = o.device})
local t0 = os.clock()
local images, info = ml.sd.generate(m, {prompt = pos[2], negative_prompt = o.negative, num_images_per_prompt = o.num,
                                        num_inference_steps = o.steps, guidance_scale = o.guidance, seed = o.seed,
                                        scheduler = o.scheduler, height = o.height, width = o.width})
local meta = {prompt = pos[2], negative_prompt = o.negative, seed = o.seed, steps = o.steps,
              scheduler = info.scheduler, guidance = o.guidance}
local out = o.out
for k = 1, images:size(1) do
    local p = out
    if images:size(1) > 1 then p = out:gsub("(%.%w+)$", string.format("-%d%%1", k)) end
    ml.image.save(p, images:select(1, k), {meta = meta})
    print("wrote " .. p)
end
print(string.format("%d image(s) in %.2f s CPU time", images:size(1), os.clock() - t0))
