-- bench_train_step.lua — one DreamBooth training step, timed as the peer's
-- bench/peer_train_step.py does it: VAE encode + text encoder fwd/bwd +
-- UNet fwd/bwd + prior-preserving loss + clip_grad_norm + AdamW, batch =
-- B instance + B class images, random weights built from a configs folder.
--   moonlit tests/bench/bench_train_step.lua [--configs configs/sd-v1-4] [--batch 2]
--       [--steps 10] [--device cuda] [--precision f32|bf16-mixed] [--size 512]
--   f32: everything in f32 (no TF32); bf16-mixed: f32 weights and AdamW state,
--   every layer computing in bf16 (nn.autocast); bf16-sr: bf16 weights and
--   AdamW moments updated with stochastic rounding (the peer's footprint).  --profile N prints the N
--   kernels that took the most GPU time in one step (ml.profile).
--   Data parallel: --num_workers N starts N workers (one GPU each), each
--   stepping on its own B+B images with DDP averaging the gradients over
--   NCCL (TCP on the CPU); --ddp with one worker sends the gradients through
--   DDP and the real collective path at world size 1 (what bucketing costs
--   on one GPU).  --bucket_mb and --grad_dtype are DDP's options.
-- Prints the median step time, TFLOP/s against the peer's FLOP count for
-- SD 1.4 at 512x512 (14.52 TFLOP per step at batch 2+2) and peak GPU memory,
-- and last a line "RESULT {json}" (world, step_ms_median over the slowest
-- rank, images_per_s over all workers, ...) for scripts.
local ml = require "moonlit"
local core = ml.core

local p = ml.argparse.new("bench_train_step.lua", "One DreamBooth training step, timed (median of --steps).")
p:option("configs", {type = "string", default = "configs/sd-v1-4", help = "configs folder of the random model"})
p:option("batch", {type = "integer", default = 2, help = "instance images per step (as many class images are added)"})
p:option("steps", {type = "integer", default = 10, help = "timed steps"})
p:option("device", {type = "string", default = "cuda", help = "cpu, cuda or cuda:N"})
p:option("precision", {type = "string", default = "f32", choices = {"f32", "bf16-mixed", "bf16-sr"}, help = "see above"})
p:option("size", {type = "integer", default = 512, help = "image size in pixels"})
p:option("profile", {type = "integer", default = 0, help = "print the N kernels that took the most GPU time in one step"})
p:option("profile_by_scope", {type = "integer", default = 0,
                              help = "print the N (kernel, layer or backward) pairs that took the most GPU time in one step"})
p:option("lora", {type = "integer", default = 0,
                  help = "train LoRA adapters of this rank on the UNet's attention instead of UNet + text encoder (0: full)"})
p:option("num_workers", {type = "integer", default = 1, help = "data-parallel workers, one GPU each (DDP over NCCL)"})
p:option("ddp", {type = "boolean", default = false, help = "with one worker: gradients through DDP at world size 1"})
p:option("bucket_mb", {type = "number", default = 25, help = "DDP bucket size in MiB"})
p:option("gradient_checkpointing", {type = "boolean", default = false,
                                    help = "recompute the UNet's and text encoder's blocks in backward (less memory)"})
p:option("grad_dtype", {type = "string", default = "f32", choices = {"f32", "bf16"}, help = "dtype of DDP's all-reduce"})
p:option("gc_sweep", {type = "integer", default = 0,
                      help = "after the timing: N steps under each of a set of collector pacings, one table row each "
                          .. "(step ms, peak, memory at the end of forward, collections per step)"})
p:option("autocast_cache", {type = "boolean", default = true,
                            help = "keep bf16 shadows of the f32 parameters across steps (bf16-mixed; false: convert "
                                .. "them in each forward and free each once its backward has passed)"})
p:option("recompute_casts", {type = "boolean", default = true,
                             help = "without the cache: convert the saved weights again in backward instead of "
                                 .. "keeping their conversions from forward (core.recompute_casts)"})
p:option("cache_latents", {type = "boolean", default = false,
                           help = "as dreambooth.lua --cache_latents: the images encoded once, each step samples "
                               .. "their kept posterior (the step without the VAE encoder)"})
p:option("saved_census", {type = "integer", default = 0,
                          help = "print the N ops whose saved tensors hold the most memory at the end of forward"})
local o = p:parse(arg or {})
if o.num_workers < 1 then p:error("--num_workers must be >= 1") end
if ml.train.launch_if_needed(o.num_workers, {device = o.device}) then return end
local dev = o.device
local on_gpu = dev:sub(1, 4) == "cuda"
local worker = ml.train.init_worker(dev)
if o.ddp and not worker then
    -- one process, world size 1, through the same collectives as a real run
    ml.dist.init{rank = 0, world_size = 1, backend = on_gpu and "nccl" or "cpu", master_port = ml.dist.free_port()}
end
local world, rank = worker and worker.world_size or 1, worker and worker.rank or 0
local use_ddp = ml.dist.is_initialized()
-- every worker times its own steps; rank 0 prints
local function say(...) if rank == 0 then print(string.format(...)) io.stdout:flush() end end
local function sync() if on_gpu then core.cuda_synchronize(0) end end
local now = core.now

local t0 = now()
local m = ml.sd.from_configs(o.configs, {seed = 0, device = dev,
                                         dtype = o.precision == "bf16-sr" and "bf16" or "f32"})
m.precision = o.precision
if not o.autocast_cache then ml.nn.autocast_cache(false) end
core.recompute_casts(o.recompute_casts)
local function compute(fn, ...) return ml.sd.autocast(m, fn, ...) end
say("init %.1f s on %s (%s): unet %.1fM, vae %.1fM, text %.1fM parameters", now() - t0, dev, o.precision,
    m.unet:num_parameters() / 1e6, m.vae:num_parameters() / 1e6, m.text_encoder:num_parameters() / 1e6)
m.vae:requires_grad_(false)
m.unet:train()
m.text_encoder:train()
local S = require "moonlit.schedulers"
local ddpm = S.DDPMScheduler {beta_start = 0.00085, beta_end = 0.012, beta_schedule = "scaled_linear",
                              num_train_timesteps = 1000, clip_sample = false}
local params = ml.nn.parameters(m.unet, m.text_encoder)
if o.gradient_checkpointing then
    say("gradient checkpointing: %d UNet blocks, %d text encoder layers", m.unet:enable_gradient_checkpointing(),
        m.text_encoder:enable_gradient_checkpointing())
end
if o.lora > 0 then
    -- the Ray example's --use_lora: adapters on the UNet's attention projections, text encoder frozen
    m.text_encoder:requires_grad_(false)
    m.text_encoder:eval()
    params = ml.nn.lora.inject(m.unet, {rank = o.lora})
    say("LoRA rank %d: %d adapter tensors, %.2fM parameters trained", o.lora, #params,
        (function() local n = 0 for _, q in ipairs(params) do n = n + q:numel() end return n / 1e6 end)())
end
local ddp
if use_ddp then
    ddp = ml.train.ddp(params, {bucket_mb = o.bucket_mb, dtype = o.grad_dtype})
    say("DDP: world size %d over %s, %d buckets of up to %g MiB (%s), NCCL_NVLS_ENABLE=%s", world, ml.dist.backend(),
        #ddp.buckets, o.bucket_mb, o.grad_dtype, tostring(os.getenv("NCCL_NVLS_ENABLE")))
end
local opt = ml.optim.AdamW(params, {lr = 5e-6})
local B = 2 * o.batch
local images = ml.rand({B, o.size, o.size, 3}, {device = dev}) * 2 - 1
if o.precision == "bf16-sr" then images = images:bf16() end
local ids = ml.randint(0, 49407, {B, 77}, {device = dev})

-- --cache_latents: the images' posterior, encoded once
local posterior = o.cache_latents and ml.no_grad(compute, function() return m.vae:encode(images) end) or nil

local function prior_preserving_loss(pred, target, weight)
    local h = pred:size(1) // 2
    return ml.F.mse_loss(pred:narrow(1, 1, h):float(), target:narrow(1, 1, h):float()) +
           ml.F.mse_loss(pred:narrow(1, h + 1, h):float(), target:narrow(1, h + 1, h):float()) * weight
end

-- One step; with `phases`, the time of each part is added to it (the GPU is
-- synchronised between parts, as the peer's CUDA events separate them).
-- `probe` (a table), when given, gets the CUDA memory at the end of forward
-- (allocated, and allocated after a full collection when probe.collect) and
-- the forward's peak; probe.gc_before_backward collects before backward.
local function step(phases, probe)
    local function mark(name, a)
        if not phases then return end
        sync()
        local b = now()
        phases[name] = (phases[name] or 0) + (b - a)
        return b
    end
    local a = phases and (sync() or now())
    opt:zero_grad()
    local latents = ml.no_grad(compute, function() return (posterior or m.vae:encode(images)):sample() * 0.18215 end)
    a = mark("vae_encode", a)
    local noise = ml.randn(latents:size(), {device = dev, dtype = latents.dtype})
    local t = ml.randint(0, 1000, {B}, {device = dev})
    local noisy = ddpm:add_noise(latents, noise, t)
    local pred = compute(function() return m.unet(noisy, t, m.text_encoder(ids)) end)
    local loss = prior_preserving_loss(pred, noise, 1.0)
    if probe and probe.census then
        local list, total = core.saved_census(loss), 0
        for _, e in ipairs(list) do total = total + e.bytes end
        say("  saved for backward at the end of forward: %.3f GiB in %d ops; the %d largest:", total / 2 ^ 30, #list,
            math.min(probe.census, #list))
        say("  %-28s %8s %8s %10s", "node", "nodes", "tensors", "MiB")
        for i = 1, math.min(probe.census, #list) do
            local e = list[i]
            say("  %-28s %8d %8d %10.1f", e.op, e.nodes, e.tensors, e.bytes / 2 ^ 20)
        end
    end
    if probe and on_gpu then
        local st = core.cuda_memory_stats(0)
        probe.fwd_alloc, probe.fwd_peak = st.allocated, st.peak
        if probe.collect or probe.gc_before_backward then
            collectgarbage()
            probe.fwd_live = core.cuda_memory_stats(0).allocated
        end
    end
    loss:backward()
    a = mark("text+unet fwd/bwd", a)
    if ddp then
        ddp:finish()
        a = mark("ddp finish", a)
    end
    -- as the recipe: the clip coefficient stays on the device and AdamW applies it
    local _, coef = ml.optim.clip_grad_norm(params, 1.0, {sync = false, scale_grads = false})
    opt:step{grad_scale = coef}
    mark("clip+adamw", a)
    return loss
end

t0 = now()
for _ = 1, 2 do step() end
sync()
say("warm-up (2 steps) %.1f s", now() - t0)
if on_gpu then core.cuda_reset_peak(0) end
local times = {}
for i = 1, o.steps do
    sync()
    local a = now()
    step()
    sync()
    times[i] = now() - a
end
table.sort(times)
local med = times[(#times + 1) // 2]
-- What the peak is made of: the memory that lives across steps (weights of
-- the three models, gradients, AdamW's moments); the rest of the peak is the
-- step's activations, workspaces and the allocator's slack.
if on_gpu then
    local size_of = {f64 = 8, f32 = 4, f16 = 2, bf16 = 2}
    local function bytes(ts) local b = 0 for _, q in ipairs(ts) do b = b + q:numel() * size_of[q.dtype] end return b end
    local grads, moments = {}, {}
    for _, q in ipairs(params) do if q.grad then grads[#grads + 1] = q.grad end end
    for _, st in pairs(opt.state) do moments[#moments + 1] = st.exp_avg; moments[#moments + 1] = st.exp_avg_sq end
    local w = bytes(ml.nn.parameters(m.unet, m.text_encoder, m.vae))
    local g, mo = bytes(grads), bytes(moments)
    local pk = core.cuda_memory_stats(0).peak
    say("  memory across steps: weights %.2f GiB, gradients %.2f GiB, AdamW moments %.2f GiB; the step's own "
        .. "(activations, workspaces, slack): %.2f GiB of the %.2f GiB peak", w / 2 ^ 30, g / 2 ^ 30, mo / 2 ^ 30,
        (pk - w - g - mo) / 2 ^ 30, pk / 2 ^ 30)
end
local peak = on_gpu and core.cuda_memory_stats(0).peak / 2 ^ 30 or 0
-- the ranks step in lockstep: the slowest median is the run's
local med_all = use_ddp and ml.dist.all_reduce_number(med, "max") or med
say("train step (batch %d+%d, %dx%d, %s%s): median %.1f ms, min %.1f ms, peak %.2f GiB", o.batch, o.batch, o.size,
    o.size, o.precision, use_ddp and string.format(", DDP on %d worker%s", world, world > 1 and "s" or "") or "",
    med_all * 1e3, times[1] * 1e3, peak)
if o.profile > 0 then
    local rep = ml.profile(step)
    say("  kernels of one step:")   -- every rank profiles (DDP's collectives pair up), rank 0 prints
    if rank == 0 then rep:print(o.profile) end
end
if o.profile_by_scope > 0 then
    local rep = ml.profile({by_scope = true}, step)
    say("  kernels of one step by scope:")
    if rank == 0 then rep:print(o.profile_by_scope); rep:by_scope(o.profile_by_scope) end
end
-- The collector's pacing against the peak: dead tensors hold their memory
-- until Lua collects their boxes, so the peak counts the garbage of the
-- step as well as what lives.  Each row: that pacing's median step, peak,
-- the allocation at the end of forward (and what of it still lives after
-- a full collection: activations saved for backward, weights, shadows),
-- and the collections it ran per step.
if o.gc_sweep > 0 and on_gpu then
    local defaults = core.gc_pacing()
    local rows = {
        {"default", {}},
        {"cuda_share 1/8", {cuda_share = 0.125}},
        {"cuda_share 1/32", {cuda_share = 1 / 32}},
        {"young 1/16", {minor_share = 1 / 16}},
        {"young 1/32", {minor_share = 1 / 32}},
        {"young 1/64", {minor_share = 1 / 64}},
        {"full before backward", {}, {gc_before_backward = true}},
        {"young 1/32 + full before bwd", {minor_share = 1 / 32}, {gc_before_backward = true}},
        {"no credit for freed", {credit_freed = false}},
        {"exact (full at fwd end)", {cuda_share = 1 / 64}, {collect = true}},
    }
    say("  collector pacing sweep (%d steps each, after one):", o.gc_sweep)
    say("  %-30s %9s %9s %10s %10s %10s %8s %8s %8s", "pacing", "median ms", "peak GiB", "fwd alloc", "fwd peak",
        "fwd live", "full/st", "young/st", "gc ms/st")
    for _, r in ipairs(rows) do
        local cfg = {}
        for k, v in pairs(defaults) do cfg[k] = v end
        for k, v in pairs(r[2]) do cfg[k] = v end
        cfg.minor_share = r[2].minor_share or 0
        core.gc_pacing(cfg)
        local probe = {}
        for k, v in pairs(r[3] or {}) do probe[k] = v end
        step(nil, probe)
        collectgarbage()
        sync()
        core.cuda_reset_peak(0)
        local g0 = core.gc_pacing_stats()
        local ts, fa, fp, fl = {}, 0, 0, 0
        for i = 1, o.gc_sweep do
            sync()
            local a = now()
            step(nil, probe)
            sync()
            ts[i] = now() - a
            fa, fp = math.max(fa, probe.fwd_alloc), math.max(fp, probe.fwd_peak)
            fl = math.max(fl, probe.fwd_live or 0)
        end
        local g1 = core.gc_pacing_stats()
        table.sort(ts)
        local n = o.gc_sweep
        say("  %-30s %9.1f %9.2f %10.2f %10.2f %10s %8.1f %8.1f %8.2f", r[1], ts[(n + 1) // 2] * 1e3,
            core.cuda_memory_stats(0).peak / 2 ^ 30, fa / 2 ^ 30, fp / 2 ^ 30,
            fl > 0 and string.format("%.2f", fl / 2 ^ 30) or "-", (g1.steps - g0.steps) / n,
            (g1.minor_steps - g0.minor_steps) / n, (g1.ms - g0.ms + g1.minor_ms - g0.minor_ms) / n)
    end
    defaults.minor_share = 0
    core.gc_pacing(defaults)
end
if o.saved_census > 0 then step(nil, {census = o.saved_census}) end
local phases = {}
local gc0 = core.gc_pacing_stats()
for _ = 1, 3 do step(phases) end
local gc1 = core.gc_pacing_stats()
say("  Lua GC paced by tensor memory: %.1f steps, %.1f ms per training step", (gc1.steps - gc0.steps) / 3,
    (gc1.ms - gc0.ms) / 3)
say("  phases (mean of 3, synchronised): vae_encode %.1f ms, text+unet fwd/bwd %.1f ms,%s clip+adamw %.1f ms",
    phases.vae_encode / 3 * 1e3, phases["text+unet fwd/bwd"] / 3 * 1e3,
    ddp and string.format(" ddp finish %.1f ms,", phases["ddp finish"] / 3 * 1e3) or "", phases["clip+adamw"] / 3 * 1e3)
local tflops
if o.configs:match("sd%-v1%-4") then
    -- the peer's FLOP count for SD 1.4 (14.52 TFLOP per step at 2+2, 512x512)
    local flops = 14.52e12 * (B / 4) * (o.size / 512) ^ 2
    tflops = flops / med_all / 1e12
    say("  %.1f TFLOP/s of model FLOPs per %s", tflops, on_gpu and "GPU" or "process")
end
say("RESULT %s", core.json_encode({world = world, ddp = use_ddp, step_ms_median = med_all * 1e3,
                                   step_ms_min = times[1] * 1e3, images_per_s = world * B / med_all,
                                   peak_gib = peak, tflops_per_gpu = tflops, precision = o.precision,
                                   batch = o.batch, size = o.size, grad_dtype = use_ddp and o.grad_dtype or nil}))
if ddp then ddp:close() end
if use_ddp then ml.dist.destroy() end
