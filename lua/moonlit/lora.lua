-- moonlit.lora (ml.nn.lora) — low-rank adapters (LoRA, Hu et al. 2021) on a
-- model's Linear layers, in the layout PEFT and diffusers use, so that the
-- weights moonlit trains load into diffusers' load_lora_weights and back.
--
--   local params = lora.inject(unet, {rank = 4, alpha = 4, targets = {...}, dropout = 0})
--   lora.state_dict(unet, {prefix = "unet"}) / lora.load(unet, sd, {prefix = "unet"})
--   lora.merge(unet)        -- W += scale * B A, wrappers removed (plain Linear again)
--   lora.remove(unet)       -- wrappers removed without merging (the base model again)
--   lora.set_scale(unet, s) -- multiply every adapter's alpha/rank by s
--   lora.save_weights(dir_or_file, {unet = unet, text_encoder = te})
--   lora.load_weights(m, dir_or_file, {scale = 1, merge = false})   (m from ml.sd.load)
--
-- A wrapped layer computes y = W x + b + (alpha / rank) * B (A dropout(x)):
-- A [rank, in] starts as Linear's default init (kaiming-uniform, a = sqrt(5),
-- as PEFT does), B [out, rank] starts at zero, so an injected model computes
-- exactly what the base model does until B has trained.  The wrapper keeps
-- the base layer's `weight` and `bias` under their own names and adds the
-- children `lora_A` and `lora_B`, so the model's parameter names stay the
-- base model's plus "<layer>.lora_A.weight" / "<layer>.lora_B.weight" —
-- the names PEFT gives them (without its adapter name).
local core = require "moonlit.core"
local nn = require "moonlit.nn"

local L = {}

-- The attention projections diffusers' and the Ray example's LoRA target.
L.UNET_TARGETS = {"to_q", "to_k", "to_v", "to_out.0"}
L.TEXT_ENCODER_TARGETS = {"q_proj", "k_proj", "v_proj", "out_proj"}
-- The file diffusers' load_lora_weights looks for in a folder.
L.WEIGHT_NAME = "pytorch_lora_weights.safetensors"
-- The safetensors metadata key diffusers reads the adapter config from.
local METADATA_KEY = "lora_adapter_metadata"

-- ---- the wrapped layer ------------------------------------------------------

local LoRALinear = nn.Module:extend("LoRALinear")
L.LoRALinear = LoRALinear

-- LoRALinear(base, {rank, alpha, dropout}): base is the nn.Linear it wraps.
function LoRALinear:init(base, o)
    rawset(self, "_base", base)
    self.in_features, self.out_features = base.in_features, base.out_features
    self.rank, self.alpha, self.dropout = o.rank, o.alpha, o.dropout or 0
    self.multiplier = 1
    self.scale = o.alpha / o.rank
    local w = base.weight
    local frozen_w, frozen_b = w.requires_grad, base.bias and base.bias.requires_grad
    self:register_parameter("weight", w)
    w.requires_grad = frozen_w
    if base.bias ~= nil then
        self:register_parameter("bias", base.bias)
        base.bias.requires_grad = frozen_b
    end
    local topts = {bias = false, dtype = w.dtype, device = w.device}
    self:add_module("lora_A", nn.Linear(base.in_features, o.rank, topts))
    self:add_module("lora_B", nn.Linear(o.rank, base.out_features, topts))
    nn.init.zeros_(self.lora_B.weight)
end

function LoRALinear:forward(x)
    local y = nn._with_cast(core.linear, x, self.weight, self.bias)
    if self.scale == 0 then return y end
    local h = x
    if self.dropout > 0 and self.training then h = core.dropout(x, self.dropout, true) end
    return y + self.lora_B(self.lora_A(h)) * self.scale
end

function LoRALinear:extra_repr()
    return string.format("in=%d, out=%d, rank=%d, alpha=%g, bias=%s", self.in_features, self.out_features,
                         self.rank, self.alpha, tostring(self.bias ~= nil))
end

-- The base Linear with the wrapper's current weight and bias (which Module:to
-- or load_state_dict may have replaced since the wrapping).
local function unwrapped(w)
    local base = w._base
    for _, n in ipairs {"weight", "bias"} do
        local t = w._params[n]
        if t ~= nil then base._params[n] = t; rawset(base, n, t) end
    end
    rawset(base, "training", w.training)
    return base
end

-- ---- finding and replacing layers --------------------------------------------

local function is_linear(m) return getmetatable(m) == nn.Linear end
local function is_lora(m) return getmetatable(m) == LoRALinear end

-- Put `new` where child `name` of `parent` was (same registration order);
-- ModuleList also indexes its children 1-based (list[1] is child "0").
local function replace_child(parent, name, old, new)
    parent:add_module(name, new)
    local i = math.tointeger(tonumber(name))
    if i and rawget(parent, i + 1) == old then rawset(parent, i + 1, new) end
end

-- Every child of every module: {full name, parent, child name, child}.
local function all_children(model)
    local out = {}
    for _, nm in ipairs(model:named_modules()) do
        local prefix, parent = nm[1], nm[2]
        for _, c in ipairs(parent:named_children()) do
            out[#out + 1] = {prefix == "" and c[1] or prefix .. "." .. c[1], parent, c[1], c[2]}
        end
    end
    return out
end

-- A target names a layer by its full dotted name or by its last components:
-- "to_q" matches "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
local function matches(full, target)
    return full == target or (#full > #target and full:sub(-#target - 1) == "." .. target)
end

-- The wrapped layers of a model: list of {name, LoRALinear}.
function L.layers(model)
    local out = {}
    for _, ch in ipairs(all_children(model)) do
        if is_lora(ch[4]) then out[#out + 1] = {ch[1], ch[4]} end
    end
    return out
end

local INJECT_OPTIONS = {rank = true, alpha = true, targets = true, dropout = true}

local function default_targets(model)
    return model.__name == "CLIPTextModel" and L.TEXT_ENCODER_TARGETS or L.UNET_TARGETS
end

local function check_inject_options(model, o)
    local function bad(msg) error("lora.inject: " .. msg, 3) end
    if type(o) ~= "table" then bad("options must be a table") end
    for k in pairs(o) do
        if not INJECT_OPTIONS[k] then
            bad("unknown option '" .. tostring(k) .. "' (accepted: alpha, dropout, rank, targets)")
        end
    end
    local rank = o.rank == nil and 4 or o.rank
    if math.type(rank) ~= "integer" or rank < 1 then bad("rank must be an integer >= 1 (got " .. tostring(rank) .. ")") end
    local alpha = o.alpha == nil and rank or o.alpha
    if type(alpha) ~= "number" or alpha ~= alpha or alpha <= 0 or alpha == math.huge then
        bad("alpha must be a positive number (got " .. tostring(alpha) .. ")")
    end
    local dropout = o.dropout == nil and 0 or o.dropout
    if type(dropout) ~= "number" or not (dropout >= 0 and dropout < 1) then
        bad("dropout must be a number in [0, 1) (got " .. tostring(dropout) .. ")")
    end
    local targets = o.targets == nil and default_targets(model) or o.targets
    if type(targets) ~= "table" or #targets == 0 then bad("targets must be a non-empty list of layer names") end
    for i, t in ipairs(targets) do
        if type(t) ~= "string" or t == "" then bad("targets[" .. i .. "] is not a layer name (got " .. tostring(t) .. ")") end
    end
    return {rank = rank, alpha = alpha, dropout = dropout, targets = targets}
end

-- inject(model, opts) -> list of the new LoRA parameters (lora_A then lora_B
-- of each layer, in the model's order).  Every other parameter of the model
-- is frozen (requires_grad = false).  Each target must match at least one
-- Linear layer; a layer already wrapped is an error.
function L.inject(model, opts)
    local o = check_inject_options(model, opts or {})
    local found, hits = {}, {}
    for _, ch in ipairs(all_children(model)) do
        for _, t in ipairs(o.targets) do
            if matches(ch[1], t) then
                if is_lora(ch[4]) then
                    error("lora.inject: layer " .. ch[1] .. " already has a LoRA adapter", 2)
                elseif not is_linear(ch[4]) then
                    error(string.format("lora.inject: target '%s' matches %s, a %s, not a Linear layer", t, ch[1],
                                        tostring(ch[4].__name)), 2)
                end
                hits[t] = true
                found[#found + 1] = {ch[1], ch[2], ch[3], ch[4], t}
                break
            end
        end
    end
    for _, t in ipairs(o.targets) do
        if not hits[t] then
            error(string.format("lora.inject: target '%s' matches no layer of the %s (defaults: UNet %s; text encoder %s)",
                                t, tostring(model.__name), table.concat(L.UNET_TARGETS, ", "),
                                table.concat(L.TEXT_ENCODER_TARGETS, ", ")), 2)
        end
    end
    model:requires_grad_(false)
    local params = {}
    for _, ch in ipairs(found) do
        local w = LoRALinear(ch[4], o)
        w.target = ch[5]
        w.lora_A.weight.requires_grad = true
        w.lora_B.weight.requires_grad = true
        rawset(w, "training", ch[4].training)
        replace_child(ch[2], ch[3], ch[4], w)
        params[#params + 1] = w.lora_A.weight
        params[#params + 1] = w.lora_B.weight
    end
    return params
end

-- The LoRA parameters of an injected model, in order (for an optimizer).
function L.parameters(model)
    local out = {}
    for _, l in ipairs(L.layers(model)) do
        out[#out + 1] = l[2].lora_A.weight
        out[#out + 1] = l[2].lora_B.weight
    end
    return out
end

-- Multiply every adapter's alpha/rank by s (diffusers' lora_scale).
function L.set_scale(model, s)
    if type(s) ~= "number" or s ~= s then error("lora.set_scale: scale must be a number", 2) end
    for _, l in ipairs(L.layers(model)) do
        l[2].multiplier = s
        l[2].scale = l[2].alpha / l[2].rank * s
    end
end

-- ---- state ---------------------------------------------------------------------

-- state_dict(model, {prefix = nil}) -> name -> tensor of the LoRA weights
-- only ("<prefix>.<layer>.lora_A.weight"), with `_order`.
function L.state_dict(model, o)
    local prefix = o and o.prefix and o.prefix .. "." or ""
    local sd, order = {}, {}
    for _, l in ipairs(L.layers(model)) do
        for _, ab in ipairs {"lora_A", "lora_B"} do
            local k = prefix .. l[1] .. "." .. ab .. ".weight"
            sd[k] = l[2][ab].weight:detach()
            order[#order + 1] = k
        end
    end
    return setmetatable(sd, {__index = {_order = order}})
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

-- load(model, sd, {prefix = nil, strict = true}): copies the LoRA weights of
-- sd (keys with the prefix; others are ignored) into the injected layers.
-- Missing, unexpected and mis-shaped keys are reported by name, before
-- anything changes.
function L.load(model, sd, o)
    o = o or {}
    local prefix = o.prefix and o.prefix .. "." or ""
    local targets = {}
    for _, l in ipairs(L.layers(model)) do
        targets[prefix .. l[1] .. ".lora_A.weight"] = l[2].lora_A.weight
        targets[prefix .. l[1] .. ".lora_B.weight"] = l[2].lora_B.weight
    end
    local missing, unexpected, mismatched = {}, {}, {}
    for k, dst in pairs(targets) do
        local src = sd[k]
        if src == nil then missing[#missing + 1] = k
        elseif shape_str(src:size()) ~= shape_str(dst:size()) then
            mismatched[#mismatched + 1] = string.format("%s: file %s, model %s", k, shape_str(src:size()), shape_str(dst:size()))
        end
    end
    for k in pairs(sd) do
        if type(k) == "string" and k:sub(1, #prefix) == prefix and targets[k] == nil then unexpected[#unexpected + 1] = k end
    end
    table.sort(missing); table.sort(unexpected); table.sort(mismatched)
    local problems = {}
    if #mismatched > 0 then problems[#problems + 1] = "size mismatch:\n    " .. table.concat(mismatched, "\n    ") end
    if o.strict ~= false and #missing > 0 then problems[#problems + 1] = "missing keys:\n    " .. table.concat(missing, "\n    ") end
    if o.strict ~= false and #unexpected > 0 then
        problems[#problems + 1] = "unexpected keys (no such LoRA layer):\n    " .. table.concat(unexpected, "\n    ")
    end
    if #problems > 0 then error("lora.load: " .. table.concat(problems, "\n"), 2) end
    core.no_grad(function()
        for k, dst in pairs(targets) do if sd[k] ~= nil then dst:copy_(sd[k]) end end
    end)
    return {missing = missing, unexpected = unexpected}
end

-- An object ml.train.save_checkpoint / load_checkpoint take as a module:
-- checkpoints of a LoRA run then hold only the LoRA weights.
function L.trainable(model)
    return {
        state_dict = function() return L.state_dict(model) end,
        load_state_dict = function(_, sd) return L.load(model, sd) end,
    }
end

-- ---- merging ---------------------------------------------------------------------

-- merge(model): W += scale * B A in every wrapped layer (computed in f32,
-- stored in W's dtype), then each wrapper is replaced by its base Linear.
-- Returns the number of layers merged.
function L.merge(model)
    local n = 0
    for _, ch in ipairs(all_children(model)) do
        local w = ch[4]
        if is_lora(w) then
            core.no_grad(function()
                local delta = core.matmul(w.lora_B.weight:float(), w.lora_A.weight:float()) * w.scale
                w.weight:copy_(w.weight:float() + delta)
            end)
            replace_child(ch[2], ch[3], w, unwrapped(w))
            n = n + 1
        end
    end
    return n
end

-- remove(model): the wrappers replaced by their base layers, unmerged (the
-- base model again).  Returns the number of layers unwrapped.
function L.remove(model)
    local n = 0
    for _, ch in ipairs(all_children(model)) do
        if is_lora(ch[4]) then
            replace_child(ch[2], ch[3], ch[4], unwrapped(ch[4]))
            n = n + 1
        end
    end
    return n
end

-- ---- files in diffusers' layout --------------------------------------------------

-- moonlit's CLIP parameter names lack transformers' "text_model." prefix.
local COMPONENTS = {
    {name = "unet", file_prefix = "unet", inner = ""},
    {name = "text_encoder", file_prefix = "text_encoder", inner = "text_model."},
}

local function join(a, b) return a:sub(-1) == "/" and a .. b or a .. "/" .. b end

local function weights_path(path)
    if core.is_dir(path) then return join(path, L.WEIGHT_NAME) end
    return path
end

-- The adapter config of one model, as PEFT's LoraConfig fields.
local function adapter_config(model)
    local layers = L.layers(model)
    local first = layers[1][2]
    local seen, names = {}, {}
    for _, l in ipairs(layers) do
        if l[2].rank ~= first.rank or l[2].alpha ~= first.alpha then
            error("lora.save_weights: layers with different ranks or alphas are not supported (" .. l[1] .. ")", 3)
        end
        -- the inject targets ("to_q"), which PEFT matches as name suffixes as
        -- inject does, whatever prefix the other side's module names have
        if not seen[l[2].target] then seen[l[2].target] = true; names[#names + 1] = l[2].target end
    end
    table.sort(names)
    return {r = first.rank, lora_alpha = first.alpha, lora_dropout = first.dropout,
            target_modules = core.json_array(names), init_lora_weights = true}
end

-- save_weights(dir_or_file, {unet = m, text_encoder = m}, {dtype = "f32"}):
-- writes pytorch_lora_weights.safetensors into the folder (made if needed),
-- or to the path itself when it ends in .safetensors, with diffusers' key names ("unet.<layer>.lora_A.weight",
-- "text_encoder.text_model.<layer>.lora_A.weight") and the adapter config
-- (rank, alpha, target modules) in the metadata diffusers reads.  Returns
-- the file's path.
function L.save_weights(path, models, o)
    o = o or {}
    if type(models) ~= "table" then error("lora.save_weights: models must be a table {unet =, text_encoder =}", 2) end
    for k in pairs(models) do
        if k ~= "unet" and k ~= "text_encoder" then
            error("lora.save_weights: unknown model '" .. tostring(k) .. "' (accepted: unet, text_encoder)", 2)
        end
    end
    local tensors, meta, any = {}, {}, false
    for _, c in ipairs(COMPONENTS) do
        local model = models[c.name]
        if model ~= nil and #L.layers(model) > 0 then
            any = true
            local sd = L.state_dict(model)
            for _, k in ipairs(sd._order) do tensors[c.file_prefix .. "." .. c.inner .. k] = sd[k] end
            for k, v in pairs(adapter_config(model)) do meta[c.file_prefix .. "." .. k] = v end
        end
    end
    if not any then error("lora.save_weights: no model given has LoRA layers (call lora.inject first)", 2) end
    if type(path) ~= "string" or path == "" then error("lora.save_weights: path must be a folder or a .safetensors file", 2) end
    local file = path
    if not path:match("%.safetensors$") then
        core.mkdir_p(path)
        file = join(path, L.WEIGHT_NAME)
    end
    core.st_save(file, tensors, {dtype = o.dtype, metadata = {format = "pt", [METADATA_KEY] = core.json_encode(meta)}})
    return file
end

local function read_config(file)
    local h = core.st_open(file)
    local md = h:metadata() or {}
    h:close()
    if md[METADATA_KEY] == nil then return nil end
    local ok, cfg = pcall(core.json_decode, md[METADATA_KEY])
    if not ok or type(cfg) ~= "table" then
        error("lora.load_weights: " .. file .. ": metadata '" .. METADATA_KEY .. "' is not a JSON object", 3)
    end
    return cfg
end

-- load_weights(m, dir_or_file, {scale = 1, merge = false}): injects adapters
-- into m.unet (and m.text_encoder when the file has weights for it) at the
-- layers the file names, loads the weights, applies the scale and, with
-- merge, merges them into the base weights.  Rank and alpha come from the
-- file's adapter config (alpha = rank, diffusers' default, without one).
-- Returns {unet = layers, text_encoder = layers, rank =, alpha =}.
function L.load_weights(m, path, o)
    o = o or {}
    for k in pairs(o) do
        if k ~= "scale" and k ~= "merge" then
            error("lora.load_weights: unknown option '" .. tostring(k) .. "' (accepted: merge, scale)", 2)
        end
    end
    local file = weights_path(path)
    if not core.is_file(file) then
        error("lora.load_weights: no LoRA weights at " .. file ..
              (core.is_dir(path) and "" or " (give a folder holding " .. L.WEIGHT_NAME .. " or the file)"), 2)
    end
    local scale = o.scale == nil and 1 or o.scale
    if type(scale) ~= "number" or scale ~= scale then error("lora.load_weights: scale must be a number", 2) end
    local sd = core.st_load(file)
    local cfg = read_config(file) or {}
    -- group the keys by component and layer
    local per, bad = {}, {}
    for k, t in pairs(sd) do
        local done = false
        for _, c in ipairs(COMPONENTS) do
            local head = c.file_prefix .. "." .. c.inner
            if k:sub(1, #head) == head then
                local layer, ab = k:sub(#head + 1):match("^(.+)%.(lora_[AB])%.weight$")
                if layer then
                    per[c.name] = per[c.name] or {layers = {}, sd = {}, ranks = {}}
                    per[c.name].layers[layer] = true
                    per[c.name].sd[layer .. "." .. ab .. ".weight"] = t
                    if ab == "lora_A" then per[c.name].ranks[t:size(1)] = true end
                    done = true
                end
                break
            end
        end
        if not done then bad[#bad + 1] = k end
    end
    table.sort(bad)
    if #bad > 0 then
        error("lora.load_weights: " .. file .. ": keys not in diffusers' LoRA layout " ..
              "(unet.<layer>.lora_A.weight, text_encoder.text_model.<layer>.lora_B.weight):\n    " ..
              table.concat(bad, "\n    ", 1, math.min(#bad, 10)), 2)
    end
    if next(per) == nil then error("lora.load_weights: " .. file .. " holds no LoRA weights", 2) end
    local info = {}
    for _, c in ipairs(COMPONENTS) do
        local p = per[c.name]
        if p then
            local model = m[c.name]
            if model == nil then error("lora.load_weights: " .. file .. " has weights for the " .. c.name ..
                                       ", which the model lacks", 2) end
            local ranks = {}
            for r in pairs(p.ranks) do ranks[#ranks + 1] = r end
            if #ranks ~= 1 then error("lora.load_weights: " .. file .. ": the " .. c.name ..
                                      "'s layers have different ranks (not supported)", 2) end
            local rank = cfg[c.file_prefix .. ".r"] or ranks[1]
            if rank ~= ranks[1] then
                error(string.format("lora.load_weights: %s: metadata says rank %s for the %s, the weights have %d",
                                    file, tostring(rank), c.name, ranks[1]), 2)
            end
            local alpha = cfg[c.file_prefix .. ".lora_alpha"] or rank
            local targets = {}
            for layer in pairs(p.layers) do targets[#targets + 1] = layer end
            table.sort(targets)
            local ok, err = pcall(L.inject, model, {rank = rank, alpha = alpha, targets = targets})
            if not ok then error("lora.load_weights: " .. file .. ": " .. tostring(err), 2) end
            ok, err = pcall(L.load, model, p.sd)
            if not ok then error("lora.load_weights: " .. file .. ": " .. tostring(err), 2) end
            L.set_scale(model, scale)
            if o.merge then L.merge(model) end
            info[c.name] = #targets
            info.rank, info.alpha = rank, alpha
        end
    end
    return info
end

return L
