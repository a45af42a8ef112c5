-- check_ddp_step.lua — DDP correctness of the DreamBooth training step on N
-- GPUs: rank 0 first computes the gradients of one process on the whole
-- global batch (every rank's images, concatenated); then every rank steps
-- on its own part through DDP.  Checked: the averaged gradients equal rank
-- 0's one-process gradients to the precision's tolerance, and after one
-- SGD step the weights of every rank are bit for bit rank 0's.
--   build/moonlit tests/gpu/check_ddp_step.lua [--num_workers N] [--configs configs/sd-v1-4]
--       [--size 256] [--batch 2] [--precision bf16-mixed|f32] [--grad_dtype f32|bf16] [--device cuda|cpu]
-- The model has random weights from the configs (UNet + text encoder
-- trained; latents drawn directly: the frozen VAE adds nothing here).
-- Tolerance, relative L2 of all gradients together: 1e-3 in f32 (another
-- batch size may pick other kernels: rounding, not bugs; a missing average
-- or a misplaced bucket is an error of order 1), 5e-2 in bf16-mixed (bf16
-- rounding of activations differs between batch sizes), plus 2^-7 with
-- bf16 buckets.  World size 1 goes through the real NCCL path too.
-- Ends with "RESULT {json}" and "N passed, N failed"; exit status 1 on failure.
local ml = require "moonlit"
local dist = ml.dist

local p = ml.argparse.new("check_ddp_step.lua", "DDP step vs one process on the concatenated batch.")
p:option("num_workers", {type = "integer", default = 1, help = "workers, one GPU each"})
p:option("configs", {type = "string", default = "configs/sd-v1-4", help = "configs folder of the random model"})
p:option("size", {type = "integer", default = 256, help = "image size in pixels (latents are size/8)"})
p:option("batch", {type = "integer", default = 2, help = "images per rank"})
p:option("precision", {type = "string", default = "bf16-mixed", choices = {"f32", "bf16-mixed"}, help = "compute precision"})
p:option("grad_dtype", {type = "string", default = "f32", choices = {"f32", "bf16"}, help = "dtype of DDP's buckets"})
p:option("bucket_mb", {type = "number", default = 25, help = "DDP bucket size in MiB"})
p:option("lr", {type = "number", default = 1e-3, help = "SGD learning rate of the step"})
p:option("device", {type = "string", default = "cuda", choices = {"cuda", "cpu"}, help = "cuda (NCCL) or cpu (TCP)"})
local o = p:parse(arg or {})
if ml.train.launch_if_needed(o.num_workers, {device = o.device}) then return end

local on_gpu = o.device == "cuda"
local dev = on_gpu and "cuda" or "cpu"
local worker = ml.train.init_worker(dev)
if not worker then
    dist.init{rank = 0, world_size = 1, backend = on_gpu and "nccl" or "cpu", master_port = dist.free_port()}
end
local R, W = dist.rank(), dist.world_size()
local function say(...) if R == 0 then print(string.format(...)) io.stdout:flush() end end

local t0 = ml.now()
local m = ml.sd.from_configs(o.configs, {seed = 0, device = dev})
m.precision = o.precision
m.unet:train()
m.text_encoder:train()
local params = ml.nn.parameters(m.unet, m.text_encoder)
say("model from %s on %s (%s) in %.1f s; %d trained tensors; world size %d, NCCL_NVLS_ENABLE=%s", o.configs, dev,
    o.precision, ml.now() - t0, #params, W, tostring(os.getenv("NCCL_NVLS_ENABLE")))

-- the global batch: one seed, drawn on the CPU, the same on every rank;
-- rank r's part is rows r*batch + 1 .. (r+1)*batch
ml.manual_seed(1234)
local G = W * o.batch
local hw = o.size // 8
local channels = m.unet.config.in_channels
local latents = ml.randn({G, hw, hw, channels})
local noise = ml.randn({G, hw, hw, channels})
local timesteps = ml.randint(0, 1000, {G})
local ids = ml.randint(0, m.text_encoder.config.vocab_size - 1, {G, 77})
local S = require "moonlit.schedulers"
local ddpm = S.DDPMScheduler {beta_start = 0.00085, beta_end = 0.012, beta_schedule = "scaled_linear",
                              num_train_timesteps = 1000, clip_sample = false}

-- mean squared error of the noise prediction over rows first..first+n-1
local function loss_of(first, n)
    local l = latents:narrow(1, first, n):to(dev)
    local e = noise:narrow(1, first, n):to(dev)
    local t = timesteps:narrow(1, first, n):to(dev)
    local c = ids:narrow(1, first, n):to(dev)
    local noisy = ddpm:add_noise(l, e, t)
    local pred = ml.sd.autocast(m, function() return m.unet(noisy, t, m.text_encoder(c)) end)
    return ml.F.mse_loss(pred:float(), e:float())
end

-- one process on the whole batch (rank 0), before DDP's grad-ready callback exists
local ref
if R == 0 then
    t0 = ml.now()
    loss_of(1, G):backward()
    ref = {}
    for i, q in ipairs(params) do ref[i] = q.grad and q.grad:clone() or false; q.grad = nil end
    if on_gpu then ml.core.cuda_synchronize(0) end
    say("one process on %d images: %.1f s", G, ml.now() - t0)
end

local ddp = ml.train.ddp(params, {bucket_mb = o.bucket_mb, dtype = o.grad_dtype})
t0 = ml.now()
loss_of(R * o.batch + 1, o.batch):backward()
ddp:finish()
if on_gpu then ml.core.cuda_synchronize(0) end
say("DDP step, %d images per rank, %d buckets (%s): %.1f s", o.batch, #ddp.buckets, o.grad_dtype, ml.now() - t0)

local passed, failed = 0, 0
local function check(ok, what)
    if ok then passed = passed + 1 else failed = failed + 1 end
    print(string.format("%s rank %d: %s", ok and "ok  " or "FAIL", R, what))
    io.stdout:flush()
end

local tol = (o.precision == "f32" and 1e-3 or 5e-2) + (o.grad_dtype == "bf16" and 2 ^ -7 or 0)
local result = {world = W, precision = o.precision, grad_dtype = o.grad_dtype, size = o.size, batch = o.batch, tol = tol}
if R == 0 then
    local diff2, ref2, worst_abs, missing, per = 0, 0, 0, 0, {}
    for i, q in ipairs(params) do
        local r = ref[i]
        if (r and true) ~= (q.grad ~= nil) then
            missing = missing + 1
        elseif r then
            local d = (q.grad:double() - r:double())
            local dn, rn = d:norm():item(), r:double():norm():item()
            diff2, ref2 = diff2 + dn * dn, ref2 + rn * rn
            worst_abs = math.max(worst_abs, d:abs():max():item())
            per[#per + 1] = {dn, rn, table.concat(q:shape(), "x")}
        end
    end
    local rel = math.sqrt(diff2 / math.max(ref2, 1e-300))
    -- the worst tensor among those that carry some of the gradient (a
    -- tensor whose gradient is nearly zero has no meaningful relative error)
    local worst, worst_shape = 0, "-"
    for _, e in ipairs(per) do
        if e[2] >= 1e-4 * math.sqrt(ref2) and e[1] / e[2] > worst then worst, worst_shape = e[1] / e[2], e[3] end
    end
    result.grad_rel_l2 = rel
    result.grad_rel_worst_tensor = worst
    result.weight_max_diff_vs_one_process = o.lr * worst_abs
    check(missing == 0, string.format("the same parameters have a gradient as in one process (%d differ)", missing))
    check(rel <= tol, string.format("averaged gradients vs one process on the %d images: rel L2 %.3e (tol %.0e); " ..
                                    "worst tensor %s rel %.3e", G, rel, tol, worst_shape, worst))
    say("      after one SGD step (lr %g) the weights differ from one process's by at most %.3e", o.lr, o.lr * worst_abs)
end

-- one SGD step, then every rank's weights against rank 0's, bit for bit
ml.optim.SGD(params, {lr = o.lr}):step()
local cross = 0
ml.no_grad(function()
    for _, q in ipairs(params) do
        local r0 = q:clone()
        dist.broadcast(r0, 0)
        cross = math.max(cross, (q - r0):abs():max():item())
    end
end)
local cross_all = dist.all_reduce_number(cross, "max")
result.cross_rank_max_diff = cross_all
check(cross == 0, string.format("weights after the step equal rank 0's bit for bit (max diff %.3e)", cross))

ddp:close()
local total_passed = dist.all_reduce_number(passed, "sum")
local total_failed = dist.all_reduce_number(failed, "sum")
result.pass = total_failed == 0
say("RESULT %s", ml.core.json_encode(result))
say("%d passed, %d failed", total_passed, total_failed)
dist.destroy()
os.exit(total_failed == 0 and 0 or 1)
