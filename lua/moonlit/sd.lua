-- moonlit.sd (ml.sd) — Stable Diffusion folders in diffusers format.
--   local m = ml.sd.load(dir, {device = "cpu", precision = "f32", variant = nil, components = nil})
--     precision: "f32"; "bf16-mixed" (f32 weights, layers compute in bf16 under
--     sd.autocast); "bf16-sr" (bf16 weights, AdamW with stochastic rounding)
--     -> {unet, vae, text_encoder, tokenizer, scheduler, config, dir}
--   ml.sd.save(dir, m, {dtype = "f32"|"f16"|"bf16"})  -- a folder diffusers loads
--   ml.sd.generate(m, {prompt = ..., ...})            -- see moonlit.pipelines.stable_diffusion
-- Loading is strict: a missing, unexpected or mis-shaped tensor is reported
-- by name.  Weights are read once into memory the parameters own (never a
-- view of the file); a save replaces the model's files all together.
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local schedulers = require "moonlit.schedulers"
local options = require "moonlit.options"
local config_check = require "moonlit.config_check"

local sd = {}

sd.models = {
    CLIPTextModel = function() return require("moonlit.models.clip_text").CLIPTextModel end,
    UNet2DConditionModel = function() return require("moonlit.models.unet2d_condition").UNet2DConditionModel end,
    AutoencoderKL = function() return require("moonlit.models.autoencoder_kl").AutoencoderKL end,
}

local weight_base = {
    text_encoder = "model", unet = "diffusion_pytorch_model", vae = "diffusion_pytorch_model",
}
local default_class = {
    text_encoder = "CLIPTextModel", unet = "UNet2DConditionModel", vae = "AutoencoderKL",
}

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

-- A config as written (JSON null kept as core.json_null, so it saves back
-- unchanged) and a clean copy with nulls removed for building models.
local function without_nulls(v)
    if v == core.json_null then return nil end
    if type(v) ~= "table" then return v end
    local out = setmetatable({}, getmetatable(v))
    for k, x in pairs(v) do out[k] = without_nulls(x) end
    return out
end

local function read_json(path, what)
    if not core.is_file(path) then error(string.format("sd.load: %s missing: %s", what, path), 3) end
    local raw = core.json_load(path, {null = core.json_null})
    return without_nulls(raw), raw
end

-- Weight names as this project's modules use them.  The text encoder's keys
-- may carry transformers' "text_model." prefix (SD repos) or not (what
-- transformers 5 writes); position_ids is a buffer older files include.
local function normalise_key(component, k)
    if component == "text_encoder" then
        k = k:gsub("^text_model%.", "")
        if k == "embeddings.position_ids" then return nil end
    end
    return k
end

-- A network's config checked against its schema (moonlit.config_check:
-- keys missing, of the wrong type or out of range, lists of mismatched
-- lengths, ...) before anything is built; the error names the file and key.
local function check_config(cfg, cls_name, path, who)
    local ok, msg = config_check.validate(cls_name, cfg, path)
    if not ok then error((who or "sd.load") .. ": " .. msg, 0) end
end

-- Build a network from <dir>/config.json and load its weights.
function sd.load_component(dir, component, opts)
    opts = opts or {}
    local cfg, raw = read_json(join(dir, "config.json"), component .. " config")
    local cls_name = cfg._class_name or (cfg.architectures and cfg.architectures[1]) or default_class[component]
    local ctor = sd.models[cls_name]
    if not ctor then error("sd.load: unsupported model class '" .. tostring(cls_name) .. "' in " .. join(dir, "config.json"), 2) end
    check_config(cfg, cls_name, join(dir, "config.json"))
    local model = nn.no_init(function() return ctor()(cfg) end)
    if opts.dtype or opts.device then
        model:to{dtype = opts.dtype or "f32", device = opts.device or "cpu"}
    end
    local f = core.st_open_model(dir, weight_base[component], {variant = opts.variant})
    -- copy: each tensor owns its memory (read, not a view of the file's
    -- map), so a file changed or truncated later cannot touch the model;
    -- owned: load_state_dict may then keep them without a second copy.
    local weights = {}
    local ok, err = pcall(function()
        for _, k in ipairs(f:keys()) do
            local name = normalise_key(component, k)
            if name then weights[name] = f:get(k, {copy = true}) end
        end
    end)
    f:close()
    if ok then
        ok, err = pcall(model.load_state_dict, model, weights, {layout = "torch", assign = true, owned = true})
    end
    if not ok then error(string.format("sd.load: %s: %s", dir, tostring(err)), 2) end
    model:eval()
    model.config = cfg
    model.raw_config = raw
    model.component = component
    return model
end

-- sd.load(dir, opts): opts.components limits what is loaded (a list of
-- names among text_encoder, unet, vae, tokenizer, scheduler).
local precisions = {f32 = "f32", ["bf16-mixed"] = "f32", ["bf16-sr"] = "bf16"}

-- Weight dtype for a precision; errors clearly on unknown or CPU-bf16 combinations.
local function weight_dtype(opts)
    local p = opts.precision or "f32"
    if not precisions[p] then
        error("sd.load: unknown precision '" .. tostring(p) .. "' (expected f32, bf16-mixed or bf16-sr)", 3)
    end
    if p ~= "f32" and (opts.device or "cpu") == "cpu" then
        error("sd.load: precision " .. p .. " needs a CUDA device (the CPU computes in f32)", 3)
    end
    return opts.dtype or precisions[p]
end

-- Run fn(...) in the model's compute precision (bf16 for bf16-mixed).
function sd.autocast(m, fn, ...)
    if m.precision == "bf16-mixed" then return nn.autocast("bf16", fn, ...) end
    return fn(...)
end

sd.COMPONENTS = {"text_encoder", "unet", "vae", "tokenizer", "scheduler"}
sd.LOAD_OPTIONS = {"device", "precision", "dtype", "variant", "components"}

function sd.load(dir, opts)
    -- A single-file checkpoint (LDM layout) goes to its own loader and options.
    if type(dir) == "string" and core.is_file(dir) and (dir:lower():match("%.safetensors$") or dir:lower():match("%.ckpt$")) then
        return sd.load_single_file(dir, opts)
    end
    opts = options.check_options("sd.load", opts, sd.LOAD_OPTIONS)
    if opts.components ~= nil then
        if type(opts.components) ~= "table" then
            error("sd.load: option 'components' must be a list of names (got " .. type(opts.components) .. ")", 2)
        end
        for _, c in pairs(opts.components) do options.check_choice("sd.load", "components", c, sd.COMPONENTS) end
    end
    local wdt = weight_dtype(opts)
    if wdt ~= (opts.dtype or "f32") then
        local o2 = {}
        for k, v in pairs(opts) do o2[k] = v end
        o2.dtype = wdt
        opts = o2
    end
    if not core.is_dir(dir) then error("sd.load: model folder not found: " .. tostring(dir), 2) end
    -- A save killed after its commit point left the new files half moved in.
    local ok, err = pcall(core.folder_save_recover, dir)
    if not ok then error("sd.load: " .. tostring(err), 2) end
    local index, index_raw = read_json(join(dir, "model_index.json"), "model_index.json")
    local want = {}
    for _, c in ipairs(opts.components or sd.COMPONENTS) do want[c] = true end
    local m = {dir = dir, config = index, raw_config = index_raw, device = opts.device or "cpu",
               precision = opts.precision or "f32"}
    if want.tokenizer then
        m.tokenizer_dir = join(dir, "tokenizer")
        m.tokenizer = core.tokenizer_load(m.tokenizer_dir)
    end
    if want.scheduler then
        local path = join(dir, "scheduler/scheduler_config.json")
        m.scheduler_config, m.scheduler_raw_config = read_json(path, "scheduler config")
        m.scheduler = schedulers.from_config(m.scheduler_config, nil, nil, path)
    end
    for _, c in ipairs {"text_encoder", "unet", "vae"} do
        if want[c] then m[c] = sd.load_component(join(dir, c), c, opts) end
    end
    return m
end

-- ---- saving -------------------------------------------------------------------

local DIFFUSERS_VERSION = "0.40.0"

local function config_for_save(model, class_name, extra)
    local cfg = {}
    for k, v in pairs(model.raw_config or model.config or {}) do cfg[k] = v end
    if class_name == "CLIPTextModel" then
        cfg.architectures = cfg.architectures or {"CLIPTextModel"}
        cfg.model_type = cfg.model_type or "clip_text_model"
    else
        cfg._class_name = class_name
        cfg._diffusers_version = cfg._diffusers_version or DIFFUSERS_VERSION
    end
    for k, v in pairs(extra or {}) do cfg[k] = v end
    return cfg
end

local function save_component(dir, component, model, opts)
    core.mkdir_p(dir)
    local cls = default_class[component]
    core.json_save(join(dir, "config.json"), config_for_save(model, cls), {indent = 2, sort_keys = true})
    local state = model:state_dict{layout = "torch"}
    local out = {}
    for _, k in ipairs(state._order) do
        local name = component == "text_encoder" and "text_model." .. k or k
        out[name] = state[k]
    end
    local fname = weight_base[component] .. (opts.variant and "." .. opts.variant or "") .. ".safetensors"
    local meta = {format = "pt"}
    core.st_save(join(dir, fname), out, {dtype = opts.dtype, metadata = meta})
end

-- A config about to be written must be a JSON object (a table with string
-- keys); checked before anything is written.
local function check_object(v, what)
    if v == nil then return end
    local mt = getmetatable(v)
    if type(v) ~= "table" or (mt and mt.__jsontype == "array") or v[1] ~= nil then
        error(string.format("sd.save: %s must be a JSON object, not %s", what,
                            type(v) == "table" and "an array" or "a " .. type(v)), 3)
    end
end

local save_dtypes = {f32 = true, f16 = true, bf16 = true, f64 = true}

-- Every file of the folder, written under `root` (the staging folder).
local function write_folder(root, m, opts)
    for _, c in ipairs {"text_encoder", "unet", "vae"} do
        if m[c] then save_component(join(root, c), c, m[c], opts) end
    end
    if m.tokenizer_dir then
        core.mkdir_p(join(root, "tokenizer"))
        for _, f in ipairs {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"} do
            local src = join(m.tokenizer_dir, f)
            if core.is_file(src) then core.copy_file(src, join(join(root, "tokenizer"), f)) end
        end
    end
    if m.scheduler then
        core.mkdir_p(join(root, "scheduler"))
        local cfg = {}
        for k, v in pairs(m.scheduler_raw_config or {}) do cfg[k] = v end
        for k, v in pairs(m.scheduler.config) do cfg[k] = v end
        -- DPM-Solver's lambda_min_clipped is -Infinity in diffusers' files,
        -- which json_save (standard JSON only) cannot write; -Infinity is
        -- also diffusers' default for it, so leaving the key out reads back
        -- the same in diffusers and here.
        if cfg.lambda_min_clipped == -math.huge then cfg.lambda_min_clipped = nil end
        cfg._diffusers_version = cfg._diffusers_version or DIFFUSERS_VERSION
        core.json_save(join(root, "scheduler/scheduler_config.json"), cfg, {indent = 2, sort_keys = true})
    end
    local index = {}
    for k, v in pairs(m.raw_config or m.config or {}) do index[k] = v end
    index._class_name = index._class_name or "StableDiffusionPipeline"
    index._diffusers_version = index._diffusers_version or DIFFUSERS_VERSION
    if m.text_encoder then index.text_encoder = {"transformers", "CLIPTextModel"} end
    if m.tokenizer_dir then index.tokenizer = {"transformers", "CLIPTokenizer"} end
    if m.unet then index.unet = {"diffusers", "UNet2DConditionModel"} end
    if m.vae then index.vae = {"diffusers", "AutoencoderKL"} end
    if m.scheduler then index.scheduler = {"diffusers", m.scheduler.config._class_name} end
    -- Components this folder does not hold (safety_checker, feature_extractor
    -- of the original SD repos) are marked absent as diffusers marks optional
    -- parts left out, [null, null]; listed, diffusers would look for their folders.
    local written = {text_encoder = m.text_encoder, tokenizer = m.tokenizer_dir, unet = m.unet, vae = m.vae,
                     scheduler = m.scheduler}
    for k, v in pairs(index) do
        if type(v) == "table" and #v == 2 and type(k) == "string" and k:sub(1, 1) ~= "_" and not written[k] then
            index[k] = core.json_array({core.json_null, core.json_null})
        end
    end
    index.requires_safety_checker = false
    core.json_save(join(root, "model_index.json"), index, {indent = 2, sort_keys = true})
end

-- sd.save(dir, m, opts): writes every component present in m, atomically
-- as a whole: a reader (or a save killed half-way) finds the model's files
-- all old or all new; other files in dir are left alone (see docs/sd.md).
function sd.save(dir, m, opts)
    opts = opts or {}
    if type(m) ~= "table" then error("sd.save: expected a model table, got " .. type(m), 2) end
    if opts.dtype ~= nil and not save_dtypes[opts.dtype] then
        error("sd.save: option 'dtype' must be f32, f16, bf16 or f64, not " .. tostring(opts.dtype), 2)
    end
    check_object(m.raw_config or m.config, "the model's model_index.json config")
    check_object(m.scheduler_raw_config, "the scheduler config")
    for _, c in ipairs {"text_encoder", "unet", "vae"} do
        if m[c] then check_object(m[c].raw_config or m[c].config, "the " .. c .. " config") end
    end
    core.mkdir_p(dir)
    local staging = core.folder_save_begin(dir)
    local ok, err = pcall(write_folder, staging, m, opts)
    if not ok then
        core.folder_save_abort(staging)
        error(err, 0)
    end
    core.folder_save_commit(dir, staging)
end

-- Models with fresh random weights from a folder of configs (tests, benchmarks).
function sd.from_configs(dir, opts)
    opts = opts or {}
    local m = {dir = dir}
    m.config, m.raw_config = read_json(join(dir, "model_index.json"), "model_index.json")
    if opts.seed then core.manual_seed(opts.seed) end
    for _, c in ipairs {"text_encoder", "unet", "vae"} do
        local cfg, raw = read_json(join(dir, c .. "/config.json"), c .. " config")
        local cls = cfg._class_name or (cfg.architectures and cfg.architectures[1]) or default_class[c]
        if not sd.models[cls] then
            error("sd.from_configs: unsupported model class '" .. tostring(cls) .. "' in " .. join(dir, c .. "/config.json"), 2)
        end
        check_config(cfg, cls, join(dir, c .. "/config.json"), "sd.from_configs")
        m[c] = sd.models[cls]()(cfg)
        m[c].config = cfg
        m[c].raw_config = raw
        if opts.device or opts.dtype then m[c]:to{device = opts.device or "cpu", dtype = opts.dtype or "f32"} end
    end
    local tdir = join(dir, "tokenizer")
    if core.is_file(join(tdir, "vocab.json")) or core.is_file(join(tdir, "tokenizer.json")) then
        m.tokenizer_dir = tdir
        m.tokenizer = core.tokenizer_load(tdir)
    end
    local spath = join(dir, "scheduler/scheduler_config.json")
    m.scheduler_config, m.scheduler_raw_config = read_json(spath, "scheduler config")
    m.scheduler = schedulers.from_config(m.scheduler_config, nil, nil, spath)
    return m
end

-- Single-file checkpoints in the original (LDM) layout: see moonlit.single_file.
function sd.load_single_file(path, opts) return require("moonlit.single_file").load(path, opts) end
function sd.save_single_file(path, m, opts) return require("moonlit.single_file").save(path, m, opts) end

function sd.generate(m, opts)
    return require("moonlit.pipelines.stable_diffusion").generate(m, opts)
end

return sd
