-- verify_fixture.lua — check moonlit against a reference fixture folder made
-- with diffusers/transformers (format: docs/fixtures.md).
--
--   moonlit scripts/verify_fixture.lua <fixture_dir> [--only name,name] [--device cpu|cuda|cuda:N]
--
-- Loads <fixture_dir>/pipeline with moonlit's own loaders, then checks the
-- tokenizer, the three networks, every scheduler step, the pipeline image
-- and one DreamBooth training step (loss, grad norm, every gradient after
-- clipping, every parameter after one AdamW step).  Prints one line per
-- check (name, relative L2 error, tolerance, ok/FAIL) and exits non-zero if
-- any fails.  Sizes come from the configs: any fixture in this format works.
--
-- With --device cuda the models live on the GPU (in f32) and every input the
-- script feeds them, the schedulers' samples included, is moved there first;
-- results come back to the CPU only to be compared with the reference.
--
-- With --precision bf16-mixed (GPU only) the tolerances come from
-- <fixture_dir>/bf16_tolerances.json when it exists: each check may reach
-- 1.5 times the error PyTorch's own bf16 autocast shows on the same check,
-- and each line shows moonlit's error, PyTorch's, their ratio and ok/FAIL
-- (moonlit.fixture_tolerances; docs/fixtures.md, "bf16 tolerances").
--
--   moonlit scripts/verify_fixture.lua <fixture_dir> --write-tolerances <measured.json>
--
-- writes that file from the output of scripts/measure_autocast_error.py
-- and exits; it needs no GPU.
local ml = require "moonlit"
local FT = require "moonlit.fixture_tolerances"
local core = ml.core

local CHECKS = {"tokenizer", "text_encoder", "unet", "vae", "schedulers", "pipeline", "train"}
local args
do
    local p = ml.argparse.new("verify_fixture.lua", "Check moonlit against a reference fixture folder (docs/fixtures.md).")
    p:positional("dir", {help = "the fixture folder"})
    p:option("only", {type = "list", help = "run only these checks: " .. table.concat(CHECKS, ",")})
    p:option("device", {type = "string", default = "cpu", help = "cpu, cuda or cuda:N"})
    p:option("precision", {type = "string", default = "f32", choices = {"f32", "bf16-mixed"},
                           help = "bf16-mixed needs a GPU"})
    p:option("write-tolerances", {type = "string",
                                  help = "write <dir>/bf16_tolerances.json from this output of scripts/measure_autocast_error.py, then exit"})
    args = p:parse(arg)
    if args.only then
        local known, set = {}, {}
        for _, c in ipairs(CHECKS) do known[c] = true end
        for _, n in ipairs(args.only) do
            if not known[n] then p:error("--only: unknown check '" .. n .. "' (known: " .. table.concat(CHECKS, ",") .. ")") end
            set[n] = true
        end
        args.only = set
    end
end

local dir = args.dir
local TOLERANCE_FILE = dir .. "/bf16_tolerances.json"

if args.write_tolerances then
    local src = args.write_tolerances
    local ok, err = pcall(function()
        local measured = core.json_load(src, {null = core.json_null})
        local fixture = dir:gsub("/+$", ""):match("[^/]+$")
        local t = FT.from_measurement(measured, {fixture = fixture, where = src})
        core.json_save(TOLERANCE_FILE, t, {indent = 1})
        local n_checks, n_tensors = 0, 0
        for _ in pairs(t.checks) do n_checks = n_checks + 1 end
        for _ in pairs(t.tensors) do n_tensors = n_tensors + 1 end
        local m = t.measured
        print(string.format("verify_fixture: wrote %s: %d checks, %d tensors, measured with torch %s on %s (%s)",
                            TOLERANCE_FILE, n_checks, n_tensors, tostring(m.torch), tostring(m.device), tostring(m.date)))
        if m.device_type ~= "cuda" then
            print("verify_fixture: note: measured on " .. tostring(m.device_type) ..
                  "; moonlit's bf16-mixed runs on the GPU, so commit tolerances measured there")
        end
    end)
    if not ok then
        io.stderr:write("verify_fixture: --write-tolerances: " .. tostring(err) .. "\n")
        os.exit(2)
    end
    os.exit(0)
end

local dev = args.device
if dev ~= "cpu" then
    local available, why = core.cuda_available()
    if dev:sub(1, 4) ~= "cuda" then
        io.stderr:write("verify_fixture: --device must be cpu, cuda or cuda:N (got " .. dev .. ")\n")
        os.exit(2)
    elseif not available then
        io.stderr:write("verify_fixture: --device " .. dev .. ": no usable GPU: " .. tostring(why) .. "\n")
        os.exit(2)
    end
end
local TOL_MODULE, TOL_PIPE = 1e-5, 1e-4
if dev ~= "cpu" then TOL_MODULE, TOL_PIPE = 1e-4, 1e-4 end
-- bf16-mixed: f32 weights, every layer computing in bf16 (nn.autocast).
-- Its tolerances come from the fixture's bf16_tolerances.json; without one,
-- the blanket 2e-2 of docs/fixtures.md.
local precision = args.precision
if precision ~= "f32" and precision ~= "bf16-mixed" then
    io.stderr:write("verify_fixture: --precision must be f32 or bf16-mixed\n")
    os.exit(2)
end
if precision == "bf16-mixed" then
    if dev == "cpu" then
        io.stderr:write("verify_fixture: --precision bf16-mixed needs --device cuda (the CPU computes in f32/f64)\n")
        os.exit(2)
    end
    TOL_MODULE, TOL_PIPE = 2e-2, 2e-2
end

-- the tolerance file's rules, when bf16-mixed found one
local bf16
if precision == "bf16-mixed" then
    local ok, t, why = pcall(FT.load, TOLERANCE_FILE)
    if not ok then
        io.stderr:write("verify_fixture: " .. tostring(t) .. "\n")
        os.exit(2)
    end
    bf16 = t
    if bf16 then
        local m = bf16.measured
        print(string.format("bf16 tolerances from %s: max(%g x PyTorch's error, %g), each tensor of a set within %g x; "
                            .. "PyTorch %s autocast on %s, %s", TOLERANCE_FILE, bf16.factor, bf16.floor, bf16.tensor_factor,
                            tostring(m.torch), tostring(m.device), tostring(m.date)))
    else
        print("verify_fixture: " .. why .. ": every bf16 check uses the blanket tolerance 2e-2 " ..
              "(docs/fixtures.md, \"bf16 tolerances\", says how to measure PyTorch's)")
    end
end

local n_ok, n_fail = 0, 0

local function report(name, err, tol, pass)
    if pass == nil then pass = err <= tol end
    if err ~= err then pass = false end
    print(string.format("%-64s %10.3e  tol %.0e  %s", name, err, tol, pass and "ok" or "FAIL"))
    if pass then n_ok = n_ok + 1 else n_fail = n_fail + 1 end
    return pass
end

-- A tolerance file that lacks what a check needs stops the run: its
-- numbers belong to another version of the fixture.
local function tolerance_error(err)
    io.stderr:write("verify_fixture: " .. tostring(err) .. "\n")
    os.exit(2)
end

-- A check that has an entry in the tolerance file (key): under bf16-mixed
-- with the file, held to max(factor x PyTorch's error, floor) and shown
-- beside PyTorch's error; otherwise held to tol as before.

local function report_check(key, label, err, tol)
    if not bf16 then return report(label or key, err, tol) end
    local ok, t = pcall(bf16.check, bf16, key)
    if not ok then tolerance_error(t) end
    local pass = err <= t.tol
    if err ~= err then pass = false end
    local ratio = t.pytorch > 0 and string.format("x%6.2f", err / t.pytorch) or "      -"
    print(string.format("%-64s %10.3e  pytorch %9.3e  %s  tol %8.2e  %s", label or key, err, t.pytorch, ratio, t.tol,
                        pass and "ok" or "FAIL"))
    if pass then n_ok = n_ok + 1 else n_fail = n_fail + 1 end
    return pass
end

local function rel_l2(a, b)
    local ad, bd = a:to("cpu"):double(), b:to("cpu"):double()
    local num, den = (ad - bd):norm():item(), bd:norm():item()
    return den > 0 and num / den or num, num, den
end

local function check(name, got, want, tol)
    local gs, ws = table.concat(got:size(), "x"), table.concat(want:size(), "x")
    if gs ~= ws then
        print(string.format("%-64s shape %s vs reference %s  FAIL", name, gs, ws))
        n_fail = n_fail + 1
        return false
    end
    return report_check(name, nil, (rel_l2(got, want)), tol)
end

local function nchw_to_nhwc(t) return t:permute(1, 3, 4, 2):contiguous() end
local function nhwc_to_nchw(t) return t:permute(1, 4, 2, 3):contiguous() end

local function path(f) return dir .. "/" .. f end
local function want(name) return args.only == nil or args.only[name] end
local function load(f) return core.st_load(path(f)) end

local meta = core.json_load(path("meta.json"))
local m = ml.sd.load(path("pipeline"), {device = dev, precision = precision})
-- run fn in the model's compute precision
local function compute(fn, ...) return ml.sd.autocast(m, fn, ...) end

-- ---- tokenizer ------------------------------------------------------------------
if want("tokenizer") and core.is_file(path("tokenizer.json")) then
    local ref = core.json_load(path("tokenizer.json"))
    local bad, bad_pad = 0, 0
    for i, p in ipairs(ref.prompts) do
        local ids = m.tokenizer:encode(p, {padding = false, truncation = false})
        local exp = ref.ids[i]
        local same = #ids == #exp
        for j = 1, math.min(#ids, #exp) do if ids[j] ~= exp[j] then same = false end end
        if not same then bad = bad + 1 print("  tokenizer mismatch: " .. p) end
        local pad = m.tokenizer:encode(p, {padding = "max_length", max_length = 77, truncation = true})
        local pexp = ref.padded_ids[i]
        local psame = #pad == #pexp
        for j = 1, math.min(#pad, #pexp) do if pad[j] ~= pexp[j] then psame = false end end
        if not psame then bad_pad = bad_pad + 1 end
    end
    report(string.format("tokenizer.ids (%d prompts, mismatched fraction)", #ref.prompts), bad / #ref.prompts, 0)
    report("tokenizer.padded_ids (mismatched fraction)", bad_pad / #ref.prompts, 0)
end

-- ---- networks -------------------------------------------------------------------
ml.no_grad(function()
    if want("text_encoder") then
        local r = load("text_encoder.safetensors")
        check("text_encoder.last_hidden_state", compute(m.text_encoder, r.input_ids:to(dev)), r.last_hidden_state, TOL_MODULE)
    end
    if want("unet") then
        local r = load("unet.safetensors")
        local out = compute(m.unet, nchw_to_nhwc(r.sample):to(dev), r.timesteps:to(dev), r.encoder_hidden_states:to(dev))
        check("unet.out", nhwc_to_nchw(out), r.out, TOL_MODULE)
    end
    if want("vae") then
        local r = load("vae.safetensors")
        local post = compute(m.vae.encode, m.vae, nchw_to_nhwc(r.image):to(dev))
        check("vae.encode.mean", nhwc_to_nchw(post.mean), r.mean, TOL_MODULE)
        check("vae.encode.logvar", nhwc_to_nchw(post.logvar), r.logvar, TOL_MODULE)
        check("vae.decode", nhwc_to_nchw(compute(m.vae.decode, m.vae, nchw_to_nhwc(r.latents):to(dev))), r.decoded, TOL_MODULE)
    end
end)

-- ---- schedulers -----------------------------------------------------------------
-- How each sampler was configured: the fixture may say so in the file's
-- metadata ("configs": JSON name -> config); otherwise PNDM and DDIM are
-- built from the pipeline's scheduler config (diffusers' from_config, DDIM
-- with clip_sample = false as Stable Diffusion's own configs set it) and
-- Euler / DPM++ 2M from their class defaults with the pipeline's betas.
if want("schedulers") then
    local S = require "moonlit.schedulers"
    local r = load("schedulers.safetensors")
    local f = core.st_open(path("schedulers.safetensors"))
    local md = f:metadata() or {}
    f:close()
    local configs = md.configs and core.json_decode(md.configs) or {}
    local pcfg = m.scheduler_config
    local betas_only = {}
    for _, k in ipairs {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type"} do
        betas_only[k] = pcfg[k]
    end
    local classes = {pndm = "PNDMScheduler", ddim = "DDIMScheduler", euler = "EulerDiscreteScheduler",
                     dpmpp2m = "DPMSolverMultistepScheduler"}
    local function make(name)
        if configs[name] then return S[classes[name]](configs[name]) end
        if name == "pndm" then return S.from_config(pcfg, name) end
        if name == "ddim" then return S.from_config(pcfg, name, {clip_sample = false}) end
        return S[classes[name]](betas_only)
    end
    local ddpm = S.DDPMScheduler(betas_only)
    check("schedulers.alphas_cumprod", ddpm:alphas_cumprod_tensor(dev), r.alphas_cumprod, TOL_MODULE)
    local lat, noise = nchw_to_nhwc(r["add_noise.latents"]):to(dev), nchw_to_nhwc(r["add_noise.noise"]):to(dev)
    local ts = r["add_noise.timesteps"]:to(dev)
    check("schedulers.add_noise", nhwc_to_nchw(ddpm:add_noise(lat, noise, ts)), r["add_noise.out"], TOL_MODULE)
    if r["velocity.out"] then
        check("schedulers.get_velocity", nhwc_to_nchw(ddpm:get_velocity(lat, noise, ts)), r["velocity.out"], TOL_MODULE)
    end
    for _, name in ipairs {"pndm", "ddim", "euler", "dpmpp2m"} do
        if r[name .. ".timesteps"] then
            local sch = make(name)
            local n = 0
            while r[name .. "." .. n .. ".prev_sample"] do n = n + 1 end
            -- the number of inference steps that yields the stored schedule
            -- (PNDM's PLMS warm-up makes one more timestep than steps)
            local exp_ts = r[name .. ".timesteps"]:totable()
            local k = #exp_ts
            for cand = #exp_ts, 1, -1 do
                sch:set_timesteps(cand)
                if #sch.timesteps == #exp_ts then k = cand break end
            end
            sch:set_timesteps(k)
            local ts_ok = #exp_ts == #sch.timesteps
            for i = 1, #exp_ts do if math.abs(exp_ts[i] - sch.timesteps[i]) > 1e-3 then ts_ok = false end end
            report("schedulers." .. name .. ".timesteps", ts_ok and 0 or 1, 0)
            report_check("schedulers." .. name .. ".init_noise_sigma", nil,
                         math.abs(sch.init_noise_sigma - r[name .. ".init_noise_sigma"]:item()) / r[name .. ".init_noise_sigma"]:item(), TOL_MODULE)
            local x = nchw_to_nhwc(r[name .. ".init"]):to(dev)     -- already scaled by init_noise_sigma
            local worst_in, worst_out = 0, 0
            for i = 0, n - 1 do
                local t = sch.timesteps[i + 1]
                local scaled = sch:scale_model_input(x, t)
                worst_in = math.max(worst_in, (rel_l2(nhwc_to_nchw(scaled), r[name .. "." .. i .. ".scaled_input"])))
                x = sch:step(nchw_to_nhwc(r[name .. "." .. i .. ".model_output"]):to(dev), t, x)
                worst_out = math.max(worst_out, (rel_l2(nhwc_to_nchw(x), r[name .. "." .. i .. ".prev_sample"])))
            end
            report_check("schedulers." .. name .. ".scaled_input",
                         string.format("schedulers.%s.scaled_input (worst of %d steps)", name, n), worst_in, TOL_MODULE)
            report_check("schedulers." .. name .. ".prev_sample",
                         string.format("schedulers.%s.prev_sample (worst of %d steps)", name, n), worst_out, TOL_MODULE)
        end
    end
end

-- ---- pipeline -------------------------------------------------------------------
if want("pipeline") and meta.pipeline_call then
    local r = load("pipeline_out.safetensors")
    local pc = meta.pipeline_call
    local img = ml.sd.generate(m, {prompt = pc.prompt, negative_prompt = pc.negative_prompt,
                                   num_inference_steps = pc.num_inference_steps, guidance_scale = pc.guidance_scale,
                                   scheduler = pc.scheduler, latents = nchw_to_nhwc(r.latents):to(dev),
                                   height = r.image:size(2), width = r.image:size(3)})
    check("pipeline.image", img, r.image, TOL_PIPE)
end

-- ---- one DreamBooth training step ------------------------------------------------
if want("train") and core.is_file(path("train_step.safetensors")) then
    local r = load("train_step.safetensors")
    local tr = meta.train
    local te, unet, vae = m.text_encoder, m.unet, m.vae
    te:train(); unet:train()
    local params = ml.nn.parameters(unet, te)
    local opt = ml.optim.AdamW(params, {lr = tr.lr, betas = tr.betas, eps = tr.eps, weight_decay = tr.weight_decay})
    local latents = ml.no_grad(compute, function()
        local post = vae:encode(nchw_to_nhwc(r.images):to(dev))
        return post:sample(nchw_to_nhwc(r.vae_eps):to(dev)) * tr.vae_scaling
    end):float()
    check("train.latents", nhwc_to_nchw(latents), r.latents, TOL_MODULE)
    local noise = nchw_to_nhwc(r.noise):to(dev)
    local t = r.timesteps:to(dev)
    local S = require "moonlit.schedulers"
    local ddpm = S.from_config(m.scheduler_config, "ddpm")
    local noisy = ddpm:add_noise(latents, noise, t)
    local pred = compute(function() return unet(noisy, t, te(r.input_ids:to(dev))) end):float()
    check("train.model_pred", nhwc_to_nchw(pred), r.model_pred, TOL_PIPE)
    local target = meta.prediction_type == "v_prediction" and ddpm:get_velocity(latents, noise, t) or noise
    local half = pred:size(1) // 2
    local loss = ml.F.mse_loss(pred:narrow(1, 1, half), target:narrow(1, 1, half)) +
                 ml.F.mse_loss(pred:narrow(1, half + 1, half), target:narrow(1, half + 1, half)) * tr.prior_loss_weight
    report_check("train.loss", nil, math.abs(loss:item() - r.loss:item()) / math.abs(r.loss:item()), TOL_PIPE)
    loss:backward()
    local gnorm = ml.optim.clip_grad_norm(params, tr.max_grad_norm)
    report_check("train.grad_norm", nil, math.abs(gnorm - r.grad_norm:item()) / r.grad_norm:item(), TOL_PIPE)

    -- gradients (after clipping) and parameters (after one AdamW step)
    local named = {}
    for _, pair in ipairs(unet:named_parameters()) do named[#named + 1] = {"unet", pair[1], pair[2]} end
    for _, pair in ipairs(te:named_parameters()) do named[#named + 1] = {"text_encoder", pair[1], pair[2]} end
    local conv = {}
    for _, mod in ipairs {{"unet", unet}, {"text_encoder", te}} do
        for _, nm in ipairs(mod[2]:named_modules()) do
            if nm[2]._nhwc_weight then conv[mod[1] .. "." .. nm[1] .. ".weight"] = true end
        end
    end
    local function torch_layout(key, tns)
        if conv[key] then return tns:permute(1, 4, 2, 3):contiguous() end
        return tns
    end
    local clip_norm = math.min(gnorm, tr.max_grad_norm)
    -- Each tensor passes when |mine - ref| <= tol * |ref| + atol, or under
    -- bf16-mixed with the tolerance file when it is within the file's rule
    -- for that tensor (FT's tensor_ok). The summary gathers, for the file's
    -- rule, all tensors as one vector and the tensor nearest its tolerance.
    local function compare_set(prefix, get, tol, atol)
        local worst, worst_name, fails, count = 0, "", 0, 0
        local sum_num2, sum_den2, nearest, nearest_name, nearest_ratio = 0, 0, -1, "", nil
        local function judge(key, num, den, a, field)
            if not bf16 then return num <= tol * den + a end
            local ok, pass, allowed, pt_num = pcall(bf16.tensor_ok, bf16, prefix .. key, num, den, a, field)
            if not ok then tolerance_error(pass) end
            if num ~= num then pass = false end
            local share = allowed > 0 and num / allowed or (num > 0 and math.huge or 0)
            local ratio = pt_num > 0 and num / pt_num or nil
            if share > nearest then nearest, nearest_name, nearest_ratio = share, key .. (field and "." .. field or ""), ratio end
            if not pass then
                print(string.format("  %s%s%s: |diff| %.3e, pytorch's %.3e (%s), allowed %.3e", prefix, key,
                                    field and " (" .. field .. ")" or "", num, pt_num,
                                    ratio and string.format("x%.2f", ratio) or "-", allowed))
            end
            return pass
        end
        for _, e in ipairs(named) do
            local key = e[1] .. "." .. e[2]
            local mine = torch_layout(key, get(e[3]))
            local ref = r[prefix .. key]
            if ref then
                count = count + 1
                local _, num, den = rel_l2(mine, ref)
                sum_num2, sum_den2 = sum_num2 + num * num, sum_den2 + den * den
                local a = type(atol) == "function" and atol(key, ref) or atol
                local pass = judge(key, num, den, a)
                local rel = den > 0 and num / den or num
                if not pass then
                    fails = fails + 1
                    if not bf16 then print(string.format("  %s%s: rel %.3e (|diff| %.3e, |ref| %.3e)", prefix, key, rel, num, den)) end
                end
                if rel > worst and den * tol > a then worst, worst_name = rel, key end
            elseif r[prefix .. key .. ".head"] then
                count = count + 1
                local flat = mine:to("cpu"):contiguous():view(-1):double()
                local head = flat:narrow(1, 1, r[prefix .. key .. ".head"]:numel())
                local _, num, den = rel_l2(head, r[prefix .. key .. ".head"])
                local s = r[prefix .. key .. ".sum_sumsq_abssum"]:totable()
                local stats = {flat:sum():item(), (flat * flat):sum():item(), flat:abs():sum():item()}
                local a = type(atol) == "function" and atol(key, nil) or atol
                local pass = judge(key, num, den, a, bf16 and "head" or nil)
                for j, field in ipairs {"sum", "sumsq", "abssum"} do
                    local err = math.abs(stats[j] - s[j])
                    local ok
                    if bf16 then
                        ok = judge(key, err, math.abs(s[j]), a * math.sqrt(flat:numel()), field)
                    else
                        ok = err <= tol * math.abs(s[j]) + a * math.sqrt(flat:numel())
                    end
                    if not ok then pass = false end
                end
                if not pass then
                    fails = fails + 1
                    if not bf16 then print(string.format("  %s%s (head/stats) mismatch", prefix, key)) end
                end
            else
                fails = fails + 1
                print("  reference lacks " .. prefix .. key)
            end
        end
        local aggregate = sum_den2 > 0 and math.sqrt(sum_num2 / sum_den2) or math.sqrt(sum_num2)
        return worst, worst_name, fails, count,
               {aggregate = aggregate, nearest = nearest, nearest_name = nearest_name, nearest_ratio = nearest_ratio}
    end
    -- The line of a set under the tolerance file: all its tensors as one
    -- vector beside PyTorch's (the check), and the tensor nearest its own
    -- tolerance; ok when the aggregate is within the rule and every tensor
    -- within its own.
    local function report_set(set_name, label, count, fails, summary)
        local ok, t = pcall(bf16.set, bf16, set_name)
        if not ok then tolerance_error(t) end
        local pass = fails == 0 and summary.aggregate <= t.tol
        local ratio = t.pytorch > 0 and string.format("x%6.2f", summary.aggregate / t.pytorch) or "      -"
        local near = summary.nearest_name ~= "" and string.format("; nearest its own tolerance: %s at %.0f%%%s", summary.nearest_name,
                         100 * summary.nearest, summary.nearest_ratio and string.format(" (x%.2f pytorch)", summary.nearest_ratio) or "") or ""
        print(string.format("%-64s %10.3e  pytorch %9.3e  %s  tol %8.2e  %s", string.format("%s (%d tensors as one vector)", label, count),
                            summary.aggregate, t.pytorch, ratio, t.tol, pass and "ok" or "FAIL"))
        print(string.format("  %d of %d tensors past %g x pytorch%s", fails, count, bf16.tensor_factor, near))
        if pass then n_ok = n_ok + 1 else n_fail = n_fail + 1 end
    end
    -- Gradients that are exactly zero in exact arithmetic hold only f32 noise
    -- in the reference: compare with an absolute floor tied to the clipped
    -- global gradient norm.
    local atol = 1e-6 * clip_norm
    local worst, wname, fails, count, gsum = compare_set("grad.", function(p) return p.grad end, TOL_PIPE, atol)
    if bf16 then
        report_set("train.grads", "train.grads", count, fails, gsum)
    else
        report(string.format("train.grads (%d tensors; worst %s)", count, wname), worst, TOL_PIPE, fails == 0)
    end
    opt:step()
    -- A parameter whose reference gradient is only rounding noise moves by
    -- up to lr per element in one AdamW step, in a direction the noise
    -- decides: such tensors get a floor of lr * sqrt(numel).
    local function param_atol(key, ref)
        local g = r["grad." .. key]
        if g and ref and g:norm():item() <= atol then return tr.lr * math.sqrt(ref:numel()) end
        return 1e-7
    end
    local patol = param_atol
    if bf16 then
        -- bf16 noise decides the sign of some small gradient elements, and so
        -- which way AdamW moves them (moonlit.fixture_tolerances, PARAM_FLIPS)
        local flips = bf16:flip_allowance(tr.lr)
        patol = function(key, ref) return param_atol(key, ref) + flips end
    end
    local pworst, pname, pfails, pcount, psum = compare_set("param.", function(p) return p end, TOL_PIPE, patol)
    if bf16 then
        report_set("train.params", "train.params after AdamW", pcount, pfails, psum)
    else
        report(string.format("train.params after AdamW (%d tensors; worst %s)", pcount, pname), pworst, TOL_PIPE, pfails == 0)
    end
end

print(string.format("%d passed, %d failed", n_ok, n_fail))
os.exit(n_fail == 0 and 0 or 1)
