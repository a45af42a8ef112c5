-- bench_generate.lua — text-to-image generation timed as the peer's
-- peer/peer_train_step.py --infer does it: random-weight SD 1.4 built from a
-- configs folder, random token ids (no tokenizer needed), text encoder once,
-- 50 PNDM steps with classifier-free guidance 7.5 at 512x512, VAE decode.
--   moonlit tests/bench/bench_generate.lua [--configs configs/sd-v1-4] [--batch 1,4]
--       [--steps 50] [--size 512] [--precision bf16-sr|bf16-mixed|f32] [--device cuda]
-- bf16-sr loads bf16 weights (the peer's footprint); bf16-mixed keeps f32
-- weights and computes in bf16.  Each batch size runs once to warm up, then
-- once timed; prints seconds per batch, UNet iterations per second and the
-- peak GPU memory.
local ml = require "moonlit"
local core = ml.core
local S = require "moonlit.schedulers"

local p = ml.argparse.new("bench_generate.lua", "50-step text-to-image generation, timed per batch size.")
p:option("configs", {type = "string", default = "configs/sd-v1-4", help = "configs folder of the random model"})
p:option("batch", {type = "string", default = "1,4", help = "comma-separated batch sizes"})
p:option("steps", {type = "integer", default = 50, help = "denoising steps"})
p:option("size", {type = "integer", default = 512, help = "image size in pixels"})
p:option("precision", {type = "string", default = "bf16-sr", choices = {"f32", "bf16-mixed", "bf16-sr"},
                       help = "see above"})
p:option("device", {type = "string", default = "cuda", help = "cpu, cuda or cuda:N"})
p:option("profile", {type = "integer", default = 0,
                     help = "after timing, profile one denoising step at the first batch size: wall time against "
                         .. "the GPU time of its kernels (a step that waits on the host shows a gap), top N kernels"})
p:option("gc_credit_freed", {type = "boolean", default = true,
                             help = "gc_pacing{credit_freed}: bytes freed by hand (nn.release) do not bring "
                                 .. "the next collection closer (false: the older rule, to compare)"})
p:option("gc_minor_share", {type = "number", default = 0,
                            help = "young collections between the full ones at this share of the live tensor bytes "
                                .. "(core.gc_pacing's minor_share; 0: off)"})
local o = p:parse(arg or {})
if o.gc_minor_share > 0 then core.gc_pacing {minor_share = o.gc_minor_share} end
core.gc_pacing {credit_freed = o.gc_credit_freed}
local dev = o.device
local on_gpu = dev:sub(1, 4) == "cuda"
local function sync() if on_gpu then core.cuda_synchronize(0) end end
local now = core.now

local batches = {}
for b in o.batch:gmatch("[^,]+") do
    local n = math.tointeger(tonumber(b))
    if not n or n < 1 then error("bench_generate: --batch must list positive integers (got " .. o.batch .. ")") end
    batches[#batches + 1] = n
end

local t0 = now()
local m = ml.sd.from_configs(o.configs, {seed = 0, device = dev, dtype = o.precision == "bf16-sr" and "bf16" or "f32"})
m.precision = o.precision
m.unet:eval(); m.text_encoder:eval(); m.vae:eval()
print(string.format("init %.1f s on %s (%s)", now() - t0, dev, o.precision))
local pndm = {beta_start = 0.00085, beta_end = 0.012, beta_schedule = "scaled_linear", num_train_timesteps = 1000,
              set_alpha_to_one = false, skip_prk_steps = true, steps_offset = 1}
local ids = ml.randint(0, 49407, {2, 77}, {device = dev})
local udt = m.unet.conv_in.weight.dtype
local vae_scale = 2 ^ (#m.vae.config.block_out_channels - 1)
local lat_size = o.size // vae_scale

-- One denoising step: the UNet on the unconditional and conditional halves,
-- guidance, the scheduler's update.
local function denoise(sch, lat, t, context)
    local x = sch:scale_model_input(ml.cat({lat, lat}, 1), t)
    local e = m.unet(x:to(udt), t, context):float()
    local eu, ec = e:chunk(2, 1)
    return sch:step(eu + (ec - eu) * 7.5, t, lat)
end

local function setup(n)
    local emb = m.text_encoder(ids)                     -- [2, 77, 768]: unconditional, conditional
    local u, c = emb:narrow(1, 1, 1), emb:narrow(1, 2, 1)
    local context = ml.cat({u:expand(n, 77, u:size(3)), c:expand(n, 77, c:size(3))}, 1)
    local sch = S.PNDMScheduler(pndm)
    sch:set_timesteps(o.steps)
    local lat = ml.randn({n, lat_size, lat_size, m.unet.config.in_channels}, {device = dev})
    return sch, lat, context
end

local function generate(n)
    return ml.no_grad(ml.sd.autocast, m, function()
        local sch, lat, context = setup(n)
        for _, t in ipairs(sch.timesteps) do lat = denoise(sch, lat, t, context) end
        return m.vae:decode((lat / 0.18215):to(m.vae.decoder.conv_in.weight.dtype))
    end)
end

for _, n in ipairs(batches) do
    generate(n); sync()
    if on_gpu then core.cuda_reset_peak(0) end
    local gc0 = core.gc_pacing_stats()
    local a = now()
    generate(n); sync()
    local s = now() - a
    local gc1 = core.gc_pacing_stats()
    local peak = on_gpu and core.cuda_memory_stats(0).peak / 2 ^ 30 or 0
    print(string.format("generate %d steps batch %d: %.3f s (%.1f UNet it/s), peak %.2f GiB; Lua GC paced by tensor "
                        .. "memory: %d collections, %.1f ms%s", o.steps, n, s, o.steps / s, peak, gc1.steps - gc0.steps,
                        (gc1.ms - gc0.ms), o.gc_minor_share > 0 and string.format("; %d young, %.1f ms",
                        gc1.minor_steps - gc0.minor_steps, gc1.minor_ms - gc0.minor_ms) or ""))
end

if o.profile > 0 then
    local n = batches[1]
    ml.no_grad(ml.sd.autocast, m, function()
        local sch, lat, context = setup(n)
        local t1, t2 = sch.timesteps[1], sch.timesteps[2]
        lat = denoise(sch, lat, t1, context); sync()
        local a = now()
        local rep
        rep, lat = ml.profile(function() local l = denoise(sch, lat, t2, context); sync(); return l end)
        local wall = (now() - a) * 1e3
        local gpu = 0
        for _, e in ipairs(rep) do gpu = gpu + e.ms end
        local calls = 0
        for _, e in ipairs(rep) do calls = calls + e.calls end
        print(string.format("one denoising step at batch %d (profiled): wall %.2f ms, kernels %.2f ms in %d calls "
            .. "(%.1f us of wall per kernel)", n, wall, gpu, calls, calls > 0 and wall * 1e3 / calls or 0))
        rep:print(o.profile)
    end)
    -- and unprofiled, for the wall time per step without the events
    ml.no_grad(ml.sd.autocast, m, function()
        local sch, lat, context = setup(n)
        lat = denoise(sch, lat, sch.timesteps[1], context); sync()
        local a = now()
        local last = math.min(6, #sch.timesteps)
        for i = 2, last do lat = denoise(sch, lat, sch.timesteps[i], context) end
        sync()
        print(string.format("denoising step at batch %d, unprofiled: %.2f ms (mean of %d)", n,
            (now() - a) * 1e3 / math.max(last - 1, 1), last - 1))
    end)
end
