-- moonlit.config_check — declarative schemas for the config keys moonlit
-- reads from diffusers / transformers configs (config.json of the UNet, VAE
-- and text encoder; scheduler_config.json), checked before anything is built.
--   local CC = require "moonlit.config_check"
--   local ok, msg = CC.validate("UNet2DConditionModel", cfg, "unet/config.json")
--   CC.check("DDIMScheduler", cfg)     -- raises "DDIMScheduler: config: ..."
-- A value of the wrong JSON type is an error, never coerced by Lua ("320"
-- is not 320); integral floats (320.0) count as integers.  Errors name the
-- file (or "config" for a table) and the key (list entries counted from 1):
--   unet/config.json: block_out_channels[2] must be a positive integer (got "320")
-- Keys a schema does not list are ignored: diffusers configs carry many that
-- moonlit has no use for.  Cross-field checks catch what would otherwise
-- end in a division by zero or an index out of range (list lengths, channels
-- divisible by norm_num_groups and by the attention heads, beta_start <
-- beta_end, ...).
local core = require "moonlit.core"

local CC = {}

-- The schedule is a Lua array of num_train_timesteps entries built in a
-- loop: 1e8 takes minutes and gigabytes, 2^40 never ends.  Trained models
-- use 1000; a million (about a second to build) leaves room for any real one.
CC.MAX_TRAIN_TIMESTEPS = 1000000

-- ---- showing values ---------------------------------------------------------------

local function json_type(v)
    local mt = getmetatable(v)
    return type(mt) == "table" and mt.__jsontype or nil
end

-- The length of v when it is a list (keys 1..n, no holes, not a JSON object).
local function list_len(v)
    if type(v) ~= "table" or json_type(v) == "object" then return nil end
    local n = 0
    for k in pairs(v) do
        if math.type(k) ~= "integer" or k < 1 then return nil end
        n = n + 1
    end
    for i = 1, n do if v[i] == nil then return nil end end
    return n
end

local function show(v)
    local tv = type(v)
    if v == nil or v == core.json_null then return "null" end
    if tv == "string" then
        local s = #v > 40 and v:sub(1, 37) .. "..." or v
        s = s:gsub('[%c"\\]', function(c)
            return ({['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t"})[c]
                or string.format("\\u%04x", c:byte())
        end)
        return '"' .. s .. '"'
    elseif tv == "number" then
        if math.type(v) == "integer" then return tostring(v) end
        if v ~= v then return "NaN" end
        if v == math.huge then return "Infinity" end
        if v == -math.huge then return "-Infinity" end
        return tostring(v)
    elseif tv == "table" then
        local n = list_len(v)
        if n == 0 then return json_type(v) == "array" and "an empty array" or "an empty table" end
        if n then return "an array of " .. n end
        return json_type(v) == "object" and "an object" or "a table that is not a list"
    end
    return tostring(v)
end
CC.show = show

-- A number as the message shows it: integral floats without ".0", so that
-- 1e8 reads 100000000.
local function shown_number(v)
    local i = math.type(v) == "float" and math.tointeger(v)
    if i then return tostring(i) end
    return show(v)
end

local function type_msg(key, desc, v) return string.format("%s must be %s (got %s)", key, desc, show(v)) end
local function range_msg(key, desc, v)
    return string.format("%s is out of range: must be %s (got %s)", key, desc,
                         type(v) == "number" and shown_number(v) or show(v))
end

-- ---- types ------------------------------------------------------------------------
-- A type is {desc = "a positive integer", plural = "positive integers",
-- check = function(v, key) -> nil | message, kind}; kind is "type" (not
-- this kind of value at all) or "range" (the right kind, a bad value).

local T = {}
CC.types = T

local function finite(v) return v == v and v ~= math.huge and v ~= -math.huge end

-- o: min, max (inclusive), odd
function T.int(o)
    o = o or {}
    local desc, plural
    if o.min and o.max then
        desc, plural = string.format("an integer from %d to %d", o.min, o.max),
                       string.format("integers from %d to %d", o.min, o.max)
    elseif o.min == 1 then
        desc, plural = "a positive integer", "positive integers"
    elseif o.min == 0 then
        desc, plural = "an integer >= 0", "integers >= 0"
    elseif o.min then
        desc, plural = "an integer >= " .. o.min, "integers >= " .. o.min
    else
        desc, plural = "an integer", "integers"
    end
    if o.odd then
        desc = desc:gsub("^an? (%a+) integer", "a %1 odd integer"):gsub("^an integer", "an odd integer")
        plural = plural:gsub("integers", "odd integers")
    end
    return {desc = desc, plural = plural, check = function(v, key)
        if type(v) ~= "number" or (math.type(v) == "float" and not (finite(v) and v == math.floor(v))) then
            return type_msg(key, desc, v), "type"
        end
        if (o.min and v < o.min) or (o.max and v > o.max) or (o.odd and v % 2 ~= 1) then
            return range_msg(key, desc, v), "range"
        end
    end}
end

-- o: min, max, min_open, max_open (exclusive bounds), inf (infinities allowed)
function T.num(o)
    o = o or {}
    local desc
    if o.min == 0 and o.min_open and not o.max then
        desc = "a positive number"
    elseif o.min and o.max then
        desc = string.format("a number in %s%s, %s%s", o.min_open and "(" or "[", shown_number(o.min),
                             shown_number(o.max), o.max_open and ")" or "]")
    elseif o.min then
        desc = string.format("a number %s %s", o.min_open and ">" or ">=", shown_number(o.min))
    elseif o.max then
        desc = string.format("a number %s %s", o.max_open and "<" or "<=", shown_number(o.max))
    else
        desc = o.inf and "a number" or "a finite number"
    end
    local plural = desc:gsub("^an? ", ""):gsub("number", "numbers", 1)
    return {desc = desc, plural = plural, check = function(v, key)
        if type(v) ~= "number" or v ~= v then return type_msg(key, desc, v), "type" end
        if not o.inf and not finite(v) then return range_msg(key, desc, v), "range" end
        if o.min and (v < o.min or (o.min_open and v == o.min)) then return range_msg(key, desc, v), "range" end
        if o.max and (v > o.max or (o.max_open and v == o.max)) then return range_msg(key, desc, v), "range" end
    end}
end

T.bool = {desc = "true or false", plural = "booleans (true or false)", check = function(v, key)
    if type(v) ~= "boolean" then return type_msg(key, "true or false", v), "type" end
end}

T.string = {desc = "a string", plural = "strings", check = function(v, key)
    if type(v) ~= "string" then return type_msg(key, "a string", v), "type" end
end}

-- anything (for keys that are refused whatever their value: see `off`)
T.any = {desc = "anything", plural = "anything", check = function() end}

-- One of a few values (strings, numbers or booleans).  A value of another
-- kind is a type error; one of the right kind but not listed reads as the
-- schedulers always said: "unsupported KEY 'value' (expected a, b or c)".
function T.enum(values)
    local names, quoted = {}, {}
    for i, v in ipairs(values) do names[i] = tostring(v); quoted[i] = type(v) == "string" and '"' .. v .. '"' or tostring(v) end
    local function list(t)
        if #t == 1 then return t[1] end
        return table.concat(t, ", ", 1, #t - 1) .. " or " .. t[#t]
    end
    local desc = #values == 1 and quoted[1] or "one of " .. list(quoted)
    local kind = type(values[1])
    return {desc = desc, plural = "values among " .. list(quoted), values = values, check = function(v, key)
        if type(v) ~= kind or (kind == "number" and v ~= v) then return type_msg(key, desc, v), "type" end
        for _, a in ipairs(values) do if v == a then return nil end end
        return string.format("unsupported %s %s (expected %s)", key,
                             kind == "string" and "'" .. v .. "'" or kind == "number" and shown_number(v) or tostring(v),
                             list(names)), "range"
    end}
end

-- A list whose entries are all of type elem.  o: min_len, desc
function T.array(elem, o)
    o = o or {}
    local desc = o.desc or "an array of " .. elem.plural
    return {desc = desc, plural = "arrays", is_array = true, check = function(v, key)
        local n = list_len(v)
        if not n then return type_msg(key, desc, v), "type" end
        if o.min_len and n < o.min_len then
            return string.format("%s must have at least %d entr%s (got %s)", key, o.min_len,
                                 o.min_len == 1 and "y" or "ies", show(v)), "range"
        end
        for i = 1, n do
            local m, kind = elem.check(v[i], string.format("%s[%d]", key, i))
            if m then return m, kind end
        end
    end}
end

-- A scalar or a list: the list's own error for a table, else the scalar's
-- (a value of neither kind names both).
function T.either(scalar, list)
    local desc = scalar.desc .. " or " .. list.desc
    return {desc = desc, plural = desc, check = function(v, key)
        if type(v) == "table" then return list.check(v, key) end
        local m, kind = scalar.check(v, key)
        if m and kind == "type" then return type_msg(key, desc, v), "type" end
        return m, kind
    end}
end

-- ---- schemas ----------------------------------------------------------------------
-- A schema: keys = {name = {type, required = true, default = v, off = true}},
-- checks = {function(c, where) -> nil | message} run on a copy of the config
-- with the defaults filled in.  `off`: a key moonlit does not implement; any
-- value but false (or absent / null) is refused.

CC.schemas = {}

local function schema(class, keys, checks)
    local order = {}
    for k in pairs(keys) do order[#order + 1] = k end
    table.sort(order)
    CC.schemas[class] = {class = class, keys = keys, order = order, checks = checks or {}}
end

local pos_int = T.int {min = 1}
local nonneg_int = T.int {min = 0}
local pos_num = T.num {min = 0, min_open = true}
local pos_ints = T.array(pos_int)
local heads_type = T.either(pos_int, pos_ints)

local function len_check(c, key, ref)
    if c[key] ~= nil and c[ref] ~= nil and #c[key] ~= #c[ref] then
        return string.format("%s has %d entr%s but %s has %d (one per level)", key, #c[key],
                             #c[key] == 1 and "y" or "ies", ref, #c[ref])
    end
end

-- every block_out_channels[i] a multiple of norm_num_groups (GroupNorm splits
-- the channels into that many groups)
local function groups_check(c)
    for i, ch in ipairs(c.block_out_channels) do
        if ch % c.norm_num_groups ~= 0 then
            return string.format("block_out_channels[%d] = %s is not divisible by norm_num_groups = %s", i,
                                 shown_number(ch), shown_number(c.norm_num_groups))
        end
    end
end

-- ---- UNet2DConditionModel -----------------------------------------------------------

schema("UNet2DConditionModel", {
    in_channels = {pos_int, required = true},
    out_channels = {pos_int, required = true},
    block_out_channels = {T.array(pos_int, {min_len = 1}), required = true},
    down_block_types = {T.array(T.enum {"CrossAttnDownBlock2D", "DownBlock2D"}), required = true},
    up_block_types = {T.array(T.enum {"CrossAttnUpBlock2D", "UpBlock2D"}), required = true},
    cross_attention_dim = {pos_int, required = true},
    layers_per_block = {pos_int, default = 2},
    norm_num_groups = {pos_int, default = 32},
    norm_eps = {pos_num},
    -- diffusers reads attention_head_dim as the number of heads when
    -- num_attention_heads is unset; either may be one number or one per level
    attention_head_dim = {heads_type},
    num_attention_heads = {heads_type},
    use_linear_projection = {T.bool},
    upcast_attention = {T.bool},
    flip_sin_to_cos = {T.bool},
    freq_shift = {nonneg_int, default = 0},
    conv_in_kernel = {T.int {min = 1, odd = true}},
    conv_out_kernel = {T.int {min = 1, odd = true}},
    downsample_padding = {nonneg_int},
    mid_block_scale_factor = {pos_num},
    sample_size = {pos_int},
    -- what SD 1.x / 2.x use; the rest is not implemented
    time_embedding_type = {T.enum {"positional"}},
    resnet_time_scale_shift = {T.enum {"default"}},
    mid_block_type = {T.enum {"UNetMidBlock2DCrossAttn"}},
    class_embed_type = {T.any, off = true},
    addition_embed_type = {T.any, off = true},
    dual_cross_attention = {T.bool, off = true},
    transformer_layers_per_block = {heads_type},
    only_cross_attention = {T.either(T.bool, T.array(T.bool))},
}, {
    function(c) return len_check(c, "down_block_types", "block_out_channels") end,
    function(c) return len_check(c, "up_block_types", "block_out_channels") end,
    groups_check,
    function(c)
        local key = c.num_attention_heads ~= nil and "num_attention_heads" or "attention_head_dim"
        local heads = c[key] or 8
        local nb = #c.block_out_channels
        if type(heads) == "table" and #heads ~= nb then return len_check(c, key, "block_out_channels") end
        -- the levels whose transformers (and the mid block's) split channels into heads
        local used = {[nb] = true}
        for i, bt in ipairs(c.down_block_types) do if bt == "CrossAttnDownBlock2D" then used[i] = true end end
        for j, bt in ipairs(c.up_block_types) do if bt == "CrossAttnUpBlock2D" then used[nb - j + 1] = true end end
        for i = 1, nb do
            local h = type(heads) == "table" and heads[i] or heads
            local ch = c.block_out_channels[i]
            if used[i] and ch % h ~= 0 then
                return string.format("block_out_channels[%d] = %s is not divisible by %s%s = %s (the attention heads of "
                                     .. "that level)", i, shown_number(ch), key,
                                     type(heads) == "table" and "[" .. i .. "]" or "", shown_number(h))
            end
        end
    end,
    function(c)
        -- the sinusoidal embedding divides by half its width minus freq_shift
        local half = c.block_out_channels[1] // 2
        if half == c.freq_shift then
            return string.format("freq_shift = %s equals half of block_out_channels[1] = %s: the timestep embedding "
                                 .. "would divide by zero", shown_number(c.freq_shift),
                                 shown_number(c.block_out_channels[1]))
        end
    end,
    function(c)
        local tl = c.transformer_layers_per_block
        for _, v in ipairs(type(tl) == "table" and tl or {tl}) do
            if v ~= 1 then
                return string.format("transformer_layers_per_block = %s is not implemented (only 1)", shown_number(v))
            end
        end
    end,
    function(c)
        local oc = c.only_cross_attention
        for _, v in ipairs(type(oc) == "table" and oc or {oc}) do
            if v then return "only_cross_attention = true is not implemented" end
        end
    end,
})

-- ---- AutoencoderKL ------------------------------------------------------------------

schema("AutoencoderKL", {
    in_channels = {pos_int, default = 3},
    out_channels = {pos_int, default = 3},
    latent_channels = {pos_int, required = true},
    block_out_channels = {T.array(pos_int, {min_len = 1}), required = true},
    down_block_types = {T.array(T.enum {"DownEncoderBlock2D"}), required = true},
    up_block_types = {T.array(T.enum {"UpDecoderBlock2D"}), required = true},
    layers_per_block = {pos_int, default = 2},
    norm_num_groups = {pos_int, default = 32},
    scaling_factor = {pos_num},
    use_quant_conv = {T.bool},
    use_post_quant_conv = {T.bool},
    -- the mid block always has its attention here
    mid_block_add_attention = {T.enum {true}},
}, {
    function(c) return len_check(c, "down_block_types", "block_out_channels") end,
    function(c) return len_check(c, "up_block_types", "block_out_channels") end,
    groups_check,
})

-- ---- CLIPTextModel ------------------------------------------------------------------

schema("CLIPTextModel", {
    vocab_size = {pos_int, required = true},
    hidden_size = {pos_int, required = true},
    intermediate_size = {pos_int, required = true},
    num_hidden_layers = {pos_int, required = true},
    num_attention_heads = {pos_int, required = true},
    max_position_embeddings = {pos_int, required = true},
    hidden_act = {T.enum {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}},
    layer_norm_eps = {pos_num},
}, {
    function(c)
        if c.hidden_size % c.num_attention_heads ~= 0 then
            return string.format("hidden_size = %s is not divisible by num_attention_heads = %s",
                                 shown_number(c.hidden_size), shown_number(c.num_attention_heads))
        end
    end,
})

-- ---- schedulers -----------------------------------------------------------------------
-- The scheduler constructors check their config with the class's defaults
-- filled in (moonlit.schedulers.common), so no defaults here; the cross-field
-- checks skip what is absent.

local beta = T.num {min = 0, max = 1, max_open = true}

local scheduler_keys = {
    num_train_timesteps = {T.int {min = 2, max = CC.MAX_TRAIN_TIMESTEPS}},
    beta_start = {beta},
    beta_end = {beta},
    beta_schedule = {T.enum {"linear", "scaled_linear", "squaredcos_cap_v2"}},
    trained_betas = {T.array(beta)},
    prediction_type = {T.enum {"epsilon", "v_prediction", "sample"}},
    timestep_spacing = {T.enum {"leading", "trailing", "linspace"}},
    steps_offset = {nonneg_int},
    -- dynamic thresholding needs per-sample quantiles; zero-SNR rescaling
    -- changes the betas: neither is implemented
    thresholding = {T.bool, off = true},
    rescale_betas_zero_snr = {T.bool, off = true},
}

local scheduler_checks = {
    function(c)
        if c.trained_betas == nil and (c.beta_schedule == "linear" or c.beta_schedule == "scaled_linear")
            and c.beta_start and c.beta_end and not (c.beta_start < c.beta_end) then
            return string.format("beta_start = %s must be less than beta_end = %s", show(c.beta_start), show(c.beta_end))
        end
    end,
    function(c)
        if c.trained_betas ~= nil and c.num_train_timesteps and #c.trained_betas ~= c.num_train_timesteps then
            return string.format("trained_betas has %d entries, num_train_timesteps is %s", #c.trained_betas,
                                 shown_number(c.num_train_timesteps))
        end
    end,
    function(c)
        -- even one inference step starts at timestep steps_offset
        if c.steps_offset and c.num_train_timesteps and c.steps_offset >= c.num_train_timesteps then
            return string.format("steps_offset = %s must be less than num_train_timesteps = %s",
                                 shown_number(c.steps_offset), shown_number(c.num_train_timesteps))
        end
    end,
}

local function scheduler(class, keys, checks)
    local all, cs = {}, {}
    for k, v in pairs(scheduler_keys) do all[k] = v end
    for k, v in pairs(keys or {}) do all[k] = v end
    for _, f in ipairs(scheduler_checks) do cs[#cs + 1] = f end
    for _, f in ipairs(checks or {}) do cs[#cs + 1] = f end
    schema(class, all, cs)
end

local clip_keys = {clip_sample = {T.bool}, clip_sample_range = {pos_num}}
local function with(a, b)
    local out = {}
    for k, v in pairs(a) do out[k] = v end
    for k, v in pairs(b or {}) do out[k] = v end
    return out
end

scheduler("DDPMScheduler", with(clip_keys, {
    -- the learned variances need a model that predicts them (twice the channels)
    variance_type = {T.enum {"fixed_small", "fixed_small_log", "fixed_large"}},
}))
scheduler("DDIMScheduler", with(clip_keys, {set_alpha_to_one = {T.bool}}))
scheduler("PNDMScheduler", {
    set_alpha_to_one = {T.bool}, skip_prk_steps = {T.bool},
    prediction_type = {T.enum {"epsilon", "v_prediction"}},
})

local sigma_keys = {
    interpolation_type = {T.enum {"linear"}},
    use_karras_sigmas = {T.bool, off = true},
    use_exponential_sigmas = {T.bool, off = true},
    use_beta_sigmas = {T.bool, off = true},
}
scheduler("EulerDiscreteScheduler", with(sigma_keys, {
    final_sigmas_type = {T.enum {"zero", "sigma_min"}},
    timestep_type = {T.enum {"discrete"}},
}))
-- Euler ancestral always ends at sigma 0, as in diffusers (no final_sigmas_type)
scheduler("EulerAncestralDiscreteScheduler", sigma_keys)
scheduler("DPMSolverMultistepScheduler", {
    algorithm_type = {T.enum {"dpmsolver++"}},
    solver_order = {T.enum {2}},
    solver_type = {T.enum {"midpoint"}},
    final_sigmas_type = {T.enum {"zero", "sigma_min"}},
    lower_order_final = {T.bool},
    euler_at_final = {T.bool},
    use_karras_sigmas = {T.bool, off = true},
    use_exponential_sigmas = {T.bool, off = true},
    use_beta_sigmas = {T.bool, off = true},
    use_lu_lambdas = {T.bool, off = true},
    use_flow_sigmas = {T.bool, off = true},
    variance_type = {T.any, off = true},
    lambda_min_clipped = {T.num {inf = true}},
}, {
    function(c)
        if c.lambda_min_clipped ~= nil and c.lambda_min_clipped > -math.huge then
            return string.format("lambda_min_clipped = %s is not implemented (only -Infinity: no clipping)",
                                 show(c.lambda_min_clipped))
        end
    end,
})

-- ---- checking -------------------------------------------------------------------------

-- validate(class, cfg, [source]) -> true, or nil and a message
-- "<source>: <what is wrong>" (source: the file, else "config").  A class
-- without a schema passes.
function CC.validate(class, cfg, source)
    local s = CC.schemas[class]
    local where = source or "config"
    if not s then return true end
    if type(cfg) ~= "table" or list_len(cfg) and list_len(cfg) > 0 then
        return nil, string.format("%s: must be a JSON object (got %s)", where, show(cfg))
    end
    local missing = {}
    for _, k in ipairs(s.order) do
        local v = cfg[k]
        if (v == nil or v == core.json_null) and s.keys[k].required then missing[#missing + 1] = k end
    end
    if #missing > 0 then
        return nil, string.format("%s: config key(s) missing for %s: %s", where, class, table.concat(missing, ", "))
    end
    local c = {}
    for k, v in pairs(cfg) do if v ~= core.json_null then c[k] = v end end
    for _, k in ipairs(s.order) do
        local spec, v = s.keys[k], c[k]
        if v ~= nil then
            local m = spec[1].check(v, k)
            if m then return nil, where .. ": " .. m end
            if spec.off and v ~= false then
                return nil, string.format("%s: %s = %s is not implemented", where, k, show(v))
            end
        elseif spec.default ~= nil then
            c[k] = spec.default
        end
    end
    for _, f in ipairs(s.checks) do
        local m = f(c)
        if m then return nil, where .. ": " .. m end
    end
    return true
end

-- check(class, cfg, [source]): validate, raising "<class>: <message>".
function CC.check(class, cfg, source)
    local ok, msg = CC.validate(class, cfg, source)
    if not ok then error(class .. ": " .. msg, 0) end
    return cfg
end

return CC
