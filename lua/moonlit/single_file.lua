-- moonlit.single_file — Stable Diffusion single-file checkpoints (the
-- original CompVis/LDM layout most shared SD 1.x/2.x models use).
--   local m = single_file.load(path, opts)     -- .safetensors or .ckpt
--   single_file.save(path, m, {dtype = "f16"})  -- .safetensors the web UIs load
-- Exposed as ml.sd.load_single_file / ml.sd.save_single_file; ml.sd.load
-- hands a regular *.safetensors / *.ckpt file here.  See docs/single_file.md.
--
-- Names: one table-driven function, ldm_name(component, key, ctx), gives the
-- LDM name of each of moonlit's (diffusers-named) weights.  Loading builds
-- the networks first and looks each weight up under that name, so a
-- missing, unexpected or mis-shaped tensor is reported by both names;
-- saving walks the same table the other way.
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local schedulers = require "moonlit.schedulers"
local config_check = require "moonlit.config_check"

local M = {}

local UNET, VAE = "model.diffusion_model.", "first_stage_model."
local CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

-- ---- names ---------------------------------------------------------------------

-- Renames of a key's first parts: {diffusers prefix, LDM prefix}.
local UNET_RESNET = {{"norm1", "in_layers.0"}, {"conv1", "in_layers.2"}, {"time_emb_proj", "emb_layers.1"},
                     {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}}
local VAE_RESNET = {{"conv_shortcut", "nin_shortcut"}}
local VAE_ATTN = {{"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out.0", "proj_out"}}
local UNET_FIXED = {["time_embedding.linear_1"] = "time_embed.0", ["time_embedding.linear_2"] = "time_embed.2",
                    conv_in = "input_blocks.0.0", conv_norm_out = "out.0", conv_out = "out.2"}
local OPENCLIP_FIXED = {["embeddings.token_embedding.weight"] = "token_embedding.weight",
                        ["embeddings.position_embedding.weight"] = "positional_embedding",
                        ["final_layer_norm.weight"] = "ln_final.weight", ["final_layer_norm.bias"] = "ln_final.bias"}
local OPENCLIP_LAYER = {{"layer_norm1", "ln_1"}, {"layer_norm2", "ln_2"}, {"self_attn.out_proj", "attn.out_proj"},
                        {"mlp.fc1", "mlp.c_fc"}, {"mlp.fc2", "mlp.c_proj"}}

local function rename(rest, pairs_)
    for _, p in ipairs(pairs_) do
        if rest:sub(1, #p[1] + 1) == p[1] .. "." then return p[2] .. rest:sub(#p[1] + 1) end
    end
    return rest
end

-- LDM name of one weight, and how its tensor differs:
--   nil            same tensor
--   "conv1x1"      LDM stores a linear weight [C, C] as a 1x1 convolution [C, C, 1, 1]
--   {qkv = i}      OpenCLIP packs q, k, v (i = 1, 2, 3) into one in_proj tensor
-- ctx: {lpb = UNet layers per block, up_attn = {[i] = true}, vae_levels, text = "clip"|"openclip"}.
local function ldm_name(component, k, ctx)
    if component == "unet" then
        local head, leaf = k:match("^(.*)%.([^.]+)$")
        if UNET_FIXED[head] then return UNET .. UNET_FIXED[head] .. "." .. leaf end
        local lpb = ctx.lpb
        local i, kind, j, rest = k:match("^down_blocks%.(%d+)%.(%a+)%.(%d+)%.(.*)$")
        if i then
            local idx = 1 + tonumber(i) * (lpb + 1) + tonumber(j)
            if kind == "resnets" then return UNET .. "input_blocks." .. idx .. ".0." .. rename(rest, UNET_RESNET) end
            if kind == "attentions" then return UNET .. "input_blocks." .. idx .. ".1." .. rest end
            if kind == "downsamplers" and rest:match("^conv%.") then
                return UNET .. "input_blocks." .. (1 + tonumber(i) * (lpb + 1) + lpb) .. ".0.op." .. rest:sub(6)
            end
        end
        local r, rrest = k:match("^mid_block%.resnets%.(%d+)%.(.*)$")
        if r then return UNET .. "middle_block." .. 2 * tonumber(r) .. "." .. rename(rrest, UNET_RESNET) end
        local arest = k:match("^mid_block%.attentions%.0%.(.*)$")
        if arest then return UNET .. "middle_block.1." .. arest end
        i, kind, j, rest = k:match("^up_blocks%.(%d+)%.(%a+)%.(%d+)%.(.*)$")
        if i then
            local base = tonumber(i) * (lpb + 1)
            if kind == "resnets" then return UNET .. "output_blocks." .. (base + j) .. ".0." .. rename(rest, UNET_RESNET) end
            if kind == "attentions" then return UNET .. "output_blocks." .. (base + j) .. ".1." .. rest end
            if kind == "upsamplers" and rest:match("^conv%.") then
                local slot = ctx.up_attn[tonumber(i)] and 2 or 1
                return UNET .. "output_blocks." .. (base + lpb) .. "." .. slot .. ".conv." .. rest:sub(6)
            end
        end
    elseif component == "vae" then
        local part, rest = k:match("^(%a+coder)%.(.*)$")
        if not part then return VAE .. k end -- quant_conv, post_quant_conv
        local i, j, r = rest:match("^down_blocks%.(%d+)%.resnets%.(%d+)%.(.*)$")
        if i then return VAE .. part .. ".down." .. i .. ".block." .. j .. "." .. rename(r, VAE_RESNET) end
        i, r = rest:match("^down_blocks%.(%d+)%.downsamplers%.0%.(.*)$")
        if i then return VAE .. part .. ".down." .. i .. ".downsample." .. r end
        i, j, r = rest:match("^up_blocks%.(%d+)%.resnets%.(%d+)%.(.*)$")
        -- LDM counts the decoder's levels from the lowest resolution up.
        if i then return VAE .. part .. ".up." .. (ctx.vae_levels - 1 - i) .. ".block." .. j .. "." .. rename(r, VAE_RESNET) end
        i, r = rest:match("^up_blocks%.(%d+)%.upsamplers%.0%.(.*)$")
        if i then return VAE .. part .. ".up." .. (ctx.vae_levels - 1 - i) .. ".upsample." .. r end
        j, r = rest:match("^mid_block%.resnets%.(%d+)%.(.*)$")
        if j then return VAE .. part .. ".mid.block_" .. (j + 1) .. "." .. rename(r, VAE_RESNET) end
        r = rest:match("^mid_block%.attentions%.0%.(.*)$")
        if r then
            local name = rename(r, VAE_ATTN)
            return VAE .. part .. ".mid.attn_1." .. name, name:match("weight$") and name ~= "norm.weight" and "conv1x1" or nil
        end
        r = rest:match("^conv_norm_out%.(.*)$")
        if r then return VAE .. part .. ".norm_out." .. r end
        return VAE .. k
    elseif component == "text_encoder" then
        if ctx.text == "clip" then return CLIP .. "text_model." .. k end
        if OPENCLIP_FIXED[k] then return OPENCLIP .. OPENCLIP_FIXED[k] end
        local n, rest = k:match("^encoder%.layers%.(%d+)%.(.*)$")
        if n then
            local which, kind = rest:match("^self_attn%.([qkv])_proj%.(%a+)$")
            if which then
                return OPENCLIP .. "transformer.resblocks." .. n .. ".attn.in_proj_" .. kind, {qkv = ({q = 1, k = 2, v = 3})[which]}
            end
            return OPENCLIP .. "transformer.resblocks." .. n .. "." .. rename(rest, OPENCLIP_LAYER)
        end
    end
    error(string.format("single_file: no LDM name for %s weight '%s'", component, k), 0)
end
M.ldm_name = ldm_name

-- ---- reading -------------------------------------------------------------------

local function has_suffix(s, suf) return s:sub(-#suf) == suf end

-- name -> tensor, and the names in file order.
local function read_checkpoint(path)
    if has_suffix(path:lower(), ".ckpt") or has_suffix(path:lower(), ".pt") or has_suffix(path:lower(), ".pth") then
        local t, names, info = core.ckpt_load(path)
        return t, names, info
    end
    local f = core.st_open(path)
    local t, names = {}, {}
    local ok, err = pcall(function()
        for _, k in ipairs(f:keys()) do
            names[#names + 1] = k
            t[k] = f:get(k, {copy = true})
        end
    end)
    f:close()
    if not ok then error(err, 0) end
    return t, names, {}
end

local function count_indices(w, pattern)
    local n = -1
    for k in pairs(w) do
        local i = k:match(pattern)
        if i and tonumber(i) > n then n = tonumber(i) end
    end
    return n + 1
end

local function shape(w, k, path)
    local t = w[k]
    if not t then error(string.format("single_file: %s: weight '%s' missing", path, k), 0) end
    return t:size()
end

-- UNet config from the shapes (diffusers' UNet2DConditionModel keys).
local function unet_config(w, family, heads, path)
    local conv_in = shape(w, UNET .. "input_blocks.0.0.weight", path)
    local lpb = 0
    while w[UNET .. "input_blocks." .. (lpb + 1) .. ".0.in_layers.0.weight"] do lpb = lpb + 1 end
    local n_in = count_indices(w, "^" .. UNET:gsub("%.", "%%.") .. "input_blocks%.(%d+)%.")
    if lpb == 0 or n_in % (lpb + 1) ~= 0 then
        error(string.format("single_file: %s: cannot read the UNet's block structure (%d input blocks)", path, n_in), 0)
    end
    local levels = n_in // (lpb + 1)
    local cfg = {_class_name = "UNet2DConditionModel", in_channels = conv_in[2], block_out_channels = {},
                 out_channels = shape(w, UNET .. "out.2.weight", path)[1], layers_per_block = lpb,
                 down_block_types = {}, up_block_types = {}, norm_num_groups = 32, act_fn = "silu",
                 flip_sin_to_cos = true, freq_shift = 0, mid_block_type = "UNetMidBlock2DCrossAttn",
                 downsample_padding = 1, norm_eps = 1e-5, center_input_sample = false}
    local attn = {}
    for i = 0, levels - 1 do
        local b = UNET .. "input_blocks." .. (1 + i * (lpb + 1))
        cfg.block_out_channels[i + 1] = shape(w, b .. ".0.out_layers.3.weight", path)[1]
        attn[i + 1] = w[b .. ".1.proj_in.weight"] ~= nil
        cfg.down_block_types[i + 1] = attn[i + 1] and "CrossAttnDownBlock2D" or "DownBlock2D"
        cfg.up_block_types[levels - i] = attn[i + 1] and "CrossAttnUpBlock2D" or "UpBlock2D"
        if attn[i + 1] then
            cfg.cross_attention_dim = shape(w, b .. ".1.transformer_blocks.0.attn2.to_k.weight", path)[2]
            cfg.use_linear_projection = #shape(w, b .. ".1.proj_in.weight", path) == 2
        end
    end
    if not cfg.cross_attention_dim then error("single_file: " .. path .. ": the UNet has no cross-attention", 0) end
    -- Heads are not in the shapes: SD 1.x has 8 per layer; SD 2.x 64 channels each.
    if heads and heads.num_heads and heads.num_heads > 0 then
        cfg.attention_head_dim = heads.num_heads
    elseif family == "sd2" or (heads and heads.head_channels) then
        local hc = heads and heads.head_channels or 64
        cfg.attention_head_dim = {}
        for i, c in ipairs(cfg.block_out_channels) do cfg.attention_head_dim[i] = math.max(1, c // hc) end
    else
        cfg.attention_head_dim = 8
    end
    cfg.upcast_attention = family == "sd2"
    cfg.sample_size = family == "sd2" and 96 or 64
    return cfg
end

local function vae_config(w, path)
    local E = VAE .. "encoder."
    local levels = count_indices(w, "^" .. E:gsub("%.", "%%.") .. "down%.(%d+)%.")
    local lpb = count_indices(w, "^" .. E:gsub("%.", "%%.") .. "down%.0%.block%.(%d+)%.")
    if levels == 0 or lpb == 0 then error("single_file: " .. path .. ": cannot read the VAE's block structure", 0) end
    local cfg = {_class_name = "AutoencoderKL", in_channels = shape(w, E .. "conv_in.weight", path)[2],
                 out_channels = shape(w, VAE .. "decoder.conv_out.weight", path)[1],
                 latent_channels = shape(w, VAE .. "decoder.conv_in.weight", path)[2], layers_per_block = lpb,
                 block_out_channels = {}, down_block_types = {}, up_block_types = {}, norm_num_groups = 32,
                 act_fn = "silu", scaling_factor = 0.18215, sample_size = 512}
    for i = 0, levels - 1 do
        cfg.block_out_channels[i + 1] = shape(w, E .. "down." .. i .. ".block.0.conv2.weight", path)[1]
        cfg.down_block_types[i + 1] = "DownEncoderBlock2D"
        cfg.up_block_types[i + 1] = "UpDecoderBlock2D"
    end
    return cfg
end

local function text_config(w, text, path)
    local cfg = {architectures = {"CLIPTextModel"}, model_type = "clip_text_model", layer_norm_eps = 1e-5,
                 bos_token_id = 49406, eos_token_id = 49407, pad_token_id = 1}
    local emb, hidden_layers, fc1
    if text == "clip" then
        local P = CLIP .. "text_model."
        emb = shape(w, P .. "embeddings.token_embedding.weight", path)
        cfg.max_position_embeddings = shape(w, P .. "embeddings.position_embedding.weight", path)[1]
        hidden_layers = count_indices(w, "^" .. P:gsub("%.", "%%.") .. "encoder%.layers%.(%d+)%.")
        fc1 = shape(w, P .. "encoder.layers.0.mlp.fc1.weight", path)
        cfg.hidden_act = "quick_gelu"
        cfg.pad_token_id = 49407
    else
        emb = shape(w, OPENCLIP .. "token_embedding.weight", path)
        cfg.max_position_embeddings = shape(w, OPENCLIP .. "positional_embedding", path)[1]
        hidden_layers = count_indices(w, "^" .. OPENCLIP:gsub("%.", "%%.") .. "transformer%.resblocks%.(%d+)%.")
        -- SD 2.x conditions on the penultimate of OpenCLIP ViT-H's 24 layers,
        -- which diffusers expresses as a 23-layer text encoder.
        if hidden_layers == 24 then hidden_layers = 23 end
        fc1 = shape(w, OPENCLIP .. "transformer.resblocks.0.mlp.c_fc.weight", path)
        cfg.hidden_act = "gelu"
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 49406, 49407, 0
    end
    cfg.vocab_size, cfg.hidden_size = emb[1], emb[2]
    cfg.num_hidden_layers, cfg.intermediate_size = hidden_layers, fc1[1]
    cfg.num_attention_heads = math.max(1, cfg.hidden_size // 64)
    cfg.projection_dim = cfg.hidden_size
    return cfg
end

-- A small YAML subset: nested maps by indentation, scalars, inline [a, b] lists
-- (what the CompVis v1-inference.yaml / v2-inference-v.yaml files use).
local function yaml_scalar(s)
    s = s:gsub("%s+#.*$", ""):match("^%s*(.-)%s*$")
    if s == "" then return nil end
    if s:match("^%[.*%]$") then
        local out = {}
        for item in s:sub(2, -2):gmatch("[^,]+") do out[#out + 1] = yaml_scalar(item) end
        return out
    end
    if s == "true" or s == "True" then return true end
    if s == "false" or s == "False" then return false end
    if s == "null" or s == "~" then return nil end
    local n = tonumber(s)
    if n then return n end
    return (s:gsub("^['\"](.*)['\"]$", "%1"))
end

local function parse_yaml(text, path)
    local root = {}
    local stack = {{indent = -1, t = root}}
    local lineno = 0
    for line in (text .. "\n"):gmatch("(.-)\r?\n") do
        lineno = lineno + 1
        if not line:match("^%s*#") and line:match("%S") then
            local indent, key, rest = line:match("^(%s*)([%w_%-%.]+):%s*(.-)%s*$")
            if not indent then
                if line:match("^%s*%-") then
                    error(string.format("single_file: %s:%d: YAML block lists are not supported (use [a, b])", path, lineno), 0)
                end
                error(string.format("single_file: %s:%d: cannot read this line as 'key: value'", path, lineno), 0)
            end
            while #indent <= stack[#stack].indent do stack[#stack] = nil end
            local parent = stack[#stack].t
            if rest == "" or rest:match("^#") then
                parent[key] = {}
                stack[#stack + 1] = {indent = #indent, t = parent[key]}
            else
                parent[key] = yaml_scalar(rest)
            end
        end
    end
    return root
end

local function read_original_config(path)
    -- a FIFO or folder is named as such, not as missing (io.open of a FIFO waits for a writer)
    local ok, why = pcall(core.require_regular_file, path, "single_file: original_config: cannot read")
    if not ok then error(why, 0) end
    if has_suffix(path:lower(), ".json") then return core.json_load(path) end
    local f = assert(io.open(path, "rb"))
    local text = f:read("a")
    f:close()
    return parse_yaml(text, path)
end

local function dig(t, ...)
    for _, k in ipairs {...} do
        if type(t) ~= "table" then return nil end
        t = t[k]
    end
    return t
end

-- configs/sd-v1-4/tokenizer of this checkout (found from where this file is).
local function bundled_sd1_tokenizer()
    local me = package.searchpath("moonlit.single_file", package.path)
    local root = me and me:match("^(.-)lua/moonlit/single_file%.lua$")
    return root and (root == "" and "." or root:gsub("/$", "")) .. "/configs/sd-v1-4/tokenizer"
end

-- ---- loading -------------------------------------------------------------------

local load_options = {device = true, dtype = true, precision = true, components = true, config = true,
                      original_config = true, prediction_type = true, ema = true, variant = true}
local prediction_types = {epsilon = true, v_prediction = true}

-- The networks' weights, under moonlit's names, for one component.
local function component_weights(model, component, w, ctx, path, used)
    local state = model:state_dict{layout = "torch"}
    local out = {}
    for _, k in ipairs(state._order) do
        local name, how = ldm_name(component, k, ctx)
        local t = w[name]
        if not t and component == "text_encoder" and ctx.text == "clip" then
            name = CLIP .. k -- older checkpoints lack transformers' "text_model."
            t = w[name]
        end
        if not t then
            error(string.format("single_file: %s: %s weight '%s' (LDM name '%s') missing", path, component, k, name), 0)
        end
        used[name] = true
        if how == "conv1x1" and #t:size() == 4 then
            local s = t:size()
            t = t:view(s[1], s[2])
        elseif type(how) == "table" then
            local n = t:size(1) // 3
            t = t:narrow(1, (how.qkv - 1) * n + 1, n):contiguous()
        end
        out[k] = t
    end
    return out
end

-- Keys the loaders of every tool skip: buffers and heads SD does not use.
local function ignorable(k)
    return k:match("position_ids$") or k == OPENCLIP .. "text_projection" or k == OPENCLIP .. "logit_scale"
        or k:match("^" .. OPENCLIP:gsub("%.", "%%.") .. "transformer%.resblocks%.23%.")
end

-- What the shapes say, without building anything: {family, text, unet, vae,
-- text_encoder} (configs as diffusers writes them; heads and group counts
-- are SD's, as they are not in the shapes).
function M.inspect(path)
    local w = read_checkpoint(path)
    local text = w[OPENCLIP .. "token_embedding.weight"] and "openclip" or "clip"
    local family = text == "openclip" and "sd2" or "sd1"
    return {family = family, text = text, unet = unet_config(w, family, nil, path), vae = vae_config(w, path),
            text_encoder = text_config(w, text, path)}
end

function M.load(path, opts)
    opts = opts or {}
    for k in pairs(opts) do
        if not load_options[k] then
            local names = {}
            for n in pairs(load_options) do names[#names + 1] = n end
            table.sort(names)
            error(string.format("sd.load_single_file: unknown option '%s' (accepted: %s)", tostring(k),
                                table.concat(names, ", ")), 2)
        end
    end
    if opts.prediction_type ~= nil and not prediction_types[opts.prediction_type] then
        error("sd.load_single_file: option 'prediction_type' must be epsilon or v_prediction, not " ..
              tostring(opts.prediction_type), 2)
    end
    local precision = opts.precision or "f32"
    if precision ~= "f32" and precision ~= "bf16-mixed" and precision ~= "bf16-sr" then
        error("sd.load_single_file: unknown precision '" .. tostring(precision) .. "' (expected f32, bf16-mixed or bf16-sr)", 2)
    end
    if precision ~= "f32" and (opts.device or "cpu") == "cpu" then
        error("sd.load_single_file: precision " .. precision .. " needs a CUDA device (the CPU computes in f32)", 2)
    end
    -- A missing file, a folder and a FIFO each get their own message (a
    -- FIFO passed to the readers would also have waited for a writer).
    if type(path) ~= "string" then error("sd.load_single_file: path must be a string, not " .. type(path), 2) end
    local ok, why = pcall(core.require_regular_file, path, "sd.load_single_file: cannot read")
    if not ok then error(why, 2) end
    local sd = require "moonlit.sd"
    local w, names, info = read_checkpoint(path)
    if not w[UNET .. "input_blocks.0.0.weight"] or not w[VAE .. "encoder.conv_in.weight"] then
        local sample = {}
        for i = 1, math.min(3, #names) do sample[i] = "'" .. names[i] .. "'" end
        error(string.format("sd.load_single_file: %s: not a Stable Diffusion checkpoint in the original (LDM) layout: "
                            .. "expected %s* (UNet), %s* (VAE) and %s* or %s* (text encoder) keys; found %d keys%s",
                            path, UNET, VAE, CLIP, OPENCLIP, #names,
                            #sample > 0 and " such as " .. table.concat(sample, ", ") or ""), 2)
    end
    local text = w[OPENCLIP .. "token_embedding.weight"] and "openclip" or "clip"
    local family = text == "openclip" and "sd2" or "sd1"
    if opts.ema then
        -- LDM's EMA copies: "model_ema." + the name after "model." without dots.
        local n = 0
        for _, k in ipairs(names) do
            if k:sub(1, #UNET) == UNET then
                local e = w["model_ema." .. k:sub(#"model." + 1):gsub("%.", "")]
                if not e then error("sd.load_single_file: " .. path .. ": option ema: no EMA copy of " .. k, 2) end
                w[k] = e
                n = n + 1
            end
        end
    end

    -- Configs: a diffusers folder's (opts.config), else from the shapes,
    -- refined by the original LDM config when given.
    local orig = opts.original_config and read_original_config(opts.original_config)
    local ucfg_params = dig(orig, "model", "params", "unet_config", "params") or {}
    local heads
    if orig then
        heads = {num_heads = ucfg_params.num_heads, head_channels = ucfg_params.num_head_channels}
        if (ucfg_params.num_head_channels or -1) > 0 then heads.num_heads = nil end
        local target = tostring(dig(orig, "model", "params", "cond_stage_config", "target") or "")
        if target:match("OpenCLIP") then family = "sd2" end
    end
    local cfgs = {}
    local cdir = opts.config
    if cdir and not core.is_dir(cdir) then error("sd.load_single_file: option 'config': no such folder: " .. tostring(cdir), 2) end
    local function folder_cfg(c)
        local p = cdir and join(join(cdir, c), "config.json")
        if p and core.is_file(p) then return core.json_load(p) end
    end
    cfgs.unet = folder_cfg("unet") or unet_config(w, family, heads, path)
    cfgs.vae = folder_cfg("vae") or vae_config(w, path)
    cfgs.text_encoder = folder_cfg("text_encoder") or text_config(w, text, path)
    local scale = dig(orig, "model", "params", "scale_factor")
    if scale and not folder_cfg("vae") then cfgs.vae.scaling_factor = scale end
    -- Each config checked against its schema (moonlit.config_check) before
    -- the names below or the networks are made from it (the UNet's and the
    -- VAE's shape the names whatever is loaded).
    local wanted_text = not opts.components
    for _, c in ipairs(opts.components or {}) do if c == "text_encoder" then wanted_text = true end end
    for _, c in ipairs(wanted_text and {"text_encoder", "unet", "vae"} or {"unet", "vae"}) do
        local cfg = cfgs[c]
        local cls = cfg._class_name or (cfg.architectures and cfg.architectures[1])
        if not sd.models[cls] then
            error(string.format("sd.load_single_file: %s: unsupported %s model class '%s'", path, c, tostring(cls)), 2)
        end
        local source = folder_cfg(c) and join(join(cdir, c), "config.json")
            or string.format("%s (the %s config read from its shapes%s)", path, c,
                             opts.original_config and " and " .. opts.original_config or "")
        local ok, msg = config_check.validate(cls, cfg, source)
        if not ok then error("sd.load_single_file: " .. msg, 2) end
    end

    local want = {}
    for _, c in ipairs(opts.components or {"text_encoder", "unet", "vae", "tokenizer", "scheduler"}) do want[c] = true end
    local m = {dir = path, single_file = path, device = opts.device or "cpu", precision = opts.precision or "f32",
               config = {_class_name = "StableDiffusionPipeline"}}
    local lpb = cfgs.unet.layers_per_block or 2
    local up_attn = {}
    for i, t in ipairs(cfgs.unet.up_block_types) do up_attn[i - 1] = t:match("CrossAttn") ~= nil end
    local ctx = {lpb = lpb, up_attn = up_attn, vae_levels = #cfgs.vae.block_out_channels, text = text}
    local used = {}
    local dtype = opts.dtype or (opts.precision == "bf16-sr" and "bf16") or "f32"
    for _, c in ipairs {"text_encoder", "unet", "vae"} do
        if want[c] then
            local cfg = cfgs[c]
            local cls = cfg._class_name or (cfg.architectures and cfg.architectures[1])
            local ok, model = pcall(nn.no_init, function() return sd.models[cls]()(cfg) end)
            if not ok then
                error(string.format("sd.load_single_file: %s: cannot build the %s from %s config (%s); give option "
                                    .. "'config' (a diffusers folder whose %s/config.json fits the file)", path, c,
                                    folder_cfg(c) and "the given" or "the shapes'", tostring(model), c), 2)
            end
            model:to{dtype = dtype, device = opts.device or "cpu"}
            local weights = component_weights(model, c, w, ctx, path, used)
            local ok, err = pcall(model.load_state_dict, model, weights, {layout = "torch"})
            if not ok then error(string.format("sd.load_single_file: %s: %s: %s", path, c, tostring(err)), 2) end
            model:eval()
            model.config, model.raw_config, model.component = cfg, cfg, c
            m[c] = model
        end
    end
    -- Every weight of a loaded network's prefix must have found its place.
    local prefixes = {}
    if want.unet then prefixes[#prefixes + 1] = UNET end
    if want.vae then prefixes[#prefixes + 1] = VAE end
    if want.text_encoder then prefixes[#prefixes + 1] = text == "clip" and CLIP or OPENCLIP end
    local extra = {}
    for _, k in ipairs(names) do
        for _, p in ipairs(prefixes) do
            if k:sub(1, #p) == p and not used[k] and not ignorable(k) then extra[#extra + 1] = k end
        end
    end
    if #extra > 0 then
        error(string.format("sd.load_single_file: %s: %d unexpected weight(s), e.g. '%s' (does the config match the file?)",
                            path, #extra, extra[1]), 2)
    end

    if want.scheduler then
        local scfg
        local sp = cdir and join(cdir, "scheduler/scheduler_config.json")
        local source
        if sp and core.is_file(sp) then
            scfg = core.json_load(sp)
            source = sp
        else
            source = opts.original_config
            local P = dig(orig, "model", "params") or {}
            scfg = {_class_name = "PNDMScheduler", beta_start = P.linear_start or 0.00085, beta_end = P.linear_end or 0.012,
                    beta_schedule = "scaled_linear", num_train_timesteps = P.timesteps or 1000,
                    skip_prk_steps = true, steps_offset = 1, set_alpha_to_one = false, clip_sample = false,
                    timestep_spacing = "leading",
                    -- 2.x: the 768-v models (2.0-v, 2.1) are the ones shared most.
                    prediction_type = (P.parameterization == "v" or (P.parameterization == nil and family == "sd2"))
                        and "v_prediction" or "epsilon"}
        end
        local param = dig(orig, "model", "params", "parameterization")
        if param then scfg.prediction_type = param == "v" and "v_prediction" or "epsilon" end
        if opts.prediction_type then scfg.prediction_type = opts.prediction_type end
        m.scheduler_config, m.scheduler_raw_config = scfg, scfg
        m.scheduler = schedulers.from_config(scfg, nil, nil, source)
    end
    if want.tokenizer then
        local function has_vocab(d)
            return d and (core.is_file(join(d, "vocab.json")) or core.is_file(join(d, "tokenizer.json")))
        end
        local tdir = cdir and join(cdir, "tokenizer")
        -- SD 1.x uses CLIP's own tokenizer, the one of configs/sd-v1-4 (after
        -- scripts/fetch_clip_vocab.sh); SD 2.x pads differently, so it needs its folder.
        if not cdir and family == "sd1" then tdir = bundled_sd1_tokenizer() end
        if not has_vocab(tdir) then
            error("sd.load_single_file: " .. path .. ": a single-file checkpoint holds no tokenizer: give option " ..
                  "'config' (a diffusers folder with tokenizer/; for SD 1.x configs/sd-v1-4 after scripts/fetch_clip_vocab.sh) " ..
                  "or leave 'tokenizer' out of 'components'", 2)
        end
        m.tokenizer_dir = tdir
        m.tokenizer = core.tokenizer_load(tdir)
    end
    m.family, m.global_step = family, info.global_step
    return m
end

-- ---- saving --------------------------------------------------------------------

local save_dtypes = {f32 = true, f16 = true, bf16 = true}

local function text_layout(model)
    return (model.config and model.config.hidden_act == "gelu") and "openclip" or "clip"
end

function M.save(path, m, opts)
    opts = opts or {}
    for k in pairs(opts) do
        if k ~= "dtype" and k ~= "text_layout" then
            error("sd.save_single_file: unknown option '" .. tostring(k) .. "' (accepted: dtype, text_layout)", 2)
        end
    end
    if opts.dtype ~= nil and not save_dtypes[opts.dtype] then
        error("sd.save_single_file: option 'dtype' must be f32, f16 or bf16, not " .. tostring(opts.dtype), 2)
    end
    if type(m) ~= "table" or not (m.unet and m.vae and m.text_encoder) then
        error("sd.save_single_file: expected a model with unet, vae and text_encoder", 2)
    end
    if not has_suffix(path:lower(), ".safetensors") then
        error("sd.save_single_file: " .. tostring(path) .. ": the file name must end in .safetensors", 2)
    end
    local up_attn = {}
    for i, t in ipairs(m.unet.config.up_block_types) do up_attn[i - 1] = t:match("CrossAttn") ~= nil end
    local text = opts.text_layout or text_layout(m.text_encoder)
    if text ~= "clip" and text ~= "openclip" then
        error("sd.save_single_file: option 'text_layout' must be clip or openclip, not " .. tostring(text), 2)
    end
    local ctx = {lpb = m.unet.config.layers_per_block or 2, up_attn = up_attn,
                 vae_levels = #m.vae.config.block_out_channels, text = text}
    local out = {}
    local packed = {} -- OpenCLIP in_proj name -> {q, k, v}
    for _, c in ipairs {"unet", "vae", "text_encoder"} do
        local state = m[c]:state_dict{layout = "torch"}
        for _, k in ipairs(state._order) do
            local name, how = ldm_name(c, k, ctx)
            local t = state[k]
            if how == "conv1x1" then
                local s = t:size()
                t = t:contiguous():view(s[1], s[2], 1, 1)
            end
            if type(how) == "table" then
                packed[name] = packed[name] or {}
                packed[name][how.qkv] = t
            else
                out[name] = t
            end
        end
    end
    for name, parts in pairs(packed) do out[name] = core.cat({parts[1], parts[2], parts[3]}, 1) end
    core.st_save(path, out, {dtype = opts.dtype, metadata = {format = "pt"}})
end

return M
