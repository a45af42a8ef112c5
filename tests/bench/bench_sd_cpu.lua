-- bench_sd_cpu.lua — CPU numbers for the Stable Diffusion side:
--   tokenizer throughput (prompts/s), load time of a diffusers folder,
--   and the training step time on a fixture folder.
--   moonlit tests/bench/bench_sd_cpu.lua [--model DIR] [--fixture DIR]
-- (make a full-size random SD 1.4 folder with scripts/make_random_model.lua)
local ml = require "moonlit"
local core = ml.core

local p = ml.argparse.new("bench_sd_cpu.lua", "CPU numbers: tokenizer throughput, model load time, training step time.")
p:option("model", {type = "string", help = "a diffusers folder whose load time to measure"})
p:option("fixture", {type = "string", default = "tests/fixtures/sd1-tiny", help = "fixture folder (tokenizer prompts, training step)"})
local args = p:parse(arg or {})
local model_dir, fixture = args.model, args.fixture

local now = core.now
local clock = os.clock

-- tokenizer
local tok = core.tokenizer_load(fixture .. "/pipeline/tokenizer")
local prompts = core.json_load(fixture .. "/tokenizer.json").prompts
local n, t0 = 0, clock()
while clock() - t0 < 1.0 do
    for _, p in ipairs(prompts) do tok:encode(p, {padding = "max_length", max_length = 77}) end
    n = n + #prompts
end
print(string.format("tokenizer: %.0f prompts/s (warm cache, %d fixture prompts, CPU time)", n / (clock() - t0), #prompts))

-- load time
if model_dir then
    local w0, c0 = now(), clock()
    local m = ml.sd.load(model_dir)
    local params = 0
    for _, c in ipairs {"unet", "vae", "text_encoder"} do params = params + m[c]:num_parameters() end
    print(string.format("load %s: %.2f s wall, %.2f s CPU, %.1fM parameters", model_dir, now() - w0, clock() - c0, params / 1e6))
    m = nil
    collectgarbage()
end

-- one training step on the fixture (as scripts/verify_fixture.lua does it)
local m = ml.sd.load(fixture .. "/pipeline")
local r = core.st_load(fixture .. "/train_step.safetensors")
local params = ml.nn.parameters(m.unet, m.text_encoder)
local opt = ml.optim.AdamW(params, {lr = 1e-4})
local S = require "moonlit.schedulers"
local ddpm = S.from_config(m.scheduler_config, "ddpm")
local images = r.images:permute(1, 3, 4, 2):contiguous()
local function step()
    opt:zero_grad()
    local lat = ml.no_grad(function() return m.vae:encode(images):sample() * 0.18215 end)
    local noise = ml.randn_like and ml.randn_like(lat) or core.randn(lat:size())
    local noisy = ddpm:add_noise(lat, noise, r.timesteps)
    local pred = m.unet(noisy, r.timesteps, m.text_encoder(r.input_ids))
    local loss = ml.F.mse_loss(pred, noise)
    loss:backward()
    ml.optim.clip_grad_norm(params, 1.0)
    opt:step()
end
step()
local times = {}
for i = 1, 5 do
    local w = now()
    step()
    times[i] = now() - w
end
table.sort(times)
print(string.format("train step (%s, batch 4, CPU): median %.1f ms", fixture, times[3] * 1000))
