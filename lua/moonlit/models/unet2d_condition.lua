-- moonlit.models.unet2d_condition — diffusers' UNet2DConditionModel (the
-- Stable Diffusion 1.x / 2.x denoiser), built from its config.json.
--   unet(sample [N,H,W,C] NHWC, timesteps [N] or number, context [N,S,D]) -> [N,H,W,C]
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local B = require "moonlit.models.blocks"
local config_check = require "moonlit.config_check"
local release = nn.release

local M = {}

local function per_block(v, n)
    if type(v) == "table" then return v end
    local t = {}
    for i = 1, n do t[i] = v end
    return t
end

-- The config's types, ranges and cross-field rules, and the options SD
-- 1.x / 2.x do not use (class or addition embeddings, SDXL-style
-- conditioning, other time embeddings or mid blocks, several transformer
-- layers per block), are checked by moonlit.config_check before anything
-- is built.

-- ---- blocks ---------------------------------------------------------------

-- n Transformer2DModels for a block with o.cout channels
local function transformers(o, n)
    local list = nn.ModuleList()
    for _ = 1, n do
        list:append(B.Transformer2DModel {heads = o.heads, dim_head = o.cout // o.heads, in_channels = o.cout,
                                          groups = o.groups, cross_attention_dim = o.cross_dim,
                                          use_linear_projection = o.linear_proj})
    end
    return list
end

local DownBlock = nn.Module:extend("DownBlock2D")
function DownBlock:init(o)
    local resnets = nn.ModuleList()
    for j = 1, o.layers do
        resnets:append(B.ResnetBlock2D {in_channels = j == 1 and o.cin or o.cout, out_channels = o.cout,
                                        temb_channels = o.temb, groups = o.groups, eps = o.eps})
    end
    -- diffusers registers attentions before resnets; keep its parameter order
    if o.cross then self:add_module("attentions", transformers(o, o.layers)) end
    self:add_module("resnets", resnets)
    if o.downsample then
        local ds = nn.ModuleList()
        ds:append(B.Downsample2D(o.cout, o.downsample_padding))
        self:add_module("downsamplers", ds)
    end
end

-- returns h and the list of skip tensors it produced
function DownBlock:forward(h, temb, context, skips)
    local resnets = self.resnets:children()
    for j, r in ipairs(resnets) do
        h = r(h, temb)
        if self.attentions then h = self.attentions[j](h, context) end
        skips[#skips + 1] = h
    end
    if self.downsamplers then
        h = self.downsamplers[1](h)
        skips[#skips + 1] = h
    end
    return h
end

local UpBlock = nn.Module:extend("UpBlock2D")
function UpBlock:init(o)
    local resnets = nn.ModuleList()
    for j = 1, o.layers + 1 do
        local skip = j == o.layers + 1 and o.cin or o.cout
        local rin = j == 1 and o.prev or o.cout
        resnets:append(B.ResnetBlock2D {in_channels = rin + skip, out_channels = o.cout,
                                        temb_channels = o.temb, groups = o.groups, eps = o.eps})
    end
    if o.cross then self:add_module("attentions", transformers(o, o.layers + 1)) end
    self:add_module("resnets", resnets)
    if o.upsample then
        local us = nn.ModuleList()
        us:append(B.Upsample2D(o.cout))
        self:add_module("upsamplers", us)
    end
end

-- Takes its skips off the end of the list; each is released once
-- concatenated (the list held the only other reference), as are the
-- intermediates made here (nn.release), never the input h.
function UpBlock:forward(h, temb, context, skips)
    local input = h
    for j, r in ipairs(self.resnets:children()) do
        local s = table.remove(skips)
        local c = core.cat({h, s}, 4)          -- channels last: cat on dim 4
        release(s, input, temb, context)
        release(h, input)
        h = r(c, temb)
        release(c, input, h)
        if self.attentions then
            local a = self.attentions[j](h, context)
            release(h, input, a)
            h = a
        end
    end
    if self.upsamplers then
        -- upsample to the size of the skip the next block concatenates: twice
        -- this size when the sample's sides divide by every downsampling, the
        -- rounded-up halves' inverse otherwise (diffusers' upsample_size)
        local nxt = skips[#skips]
        local u = self.upsamplers[1](h, nxt and {nxt:size(2), nxt:size(3)} or nil)
        release(h, input, u)
        h = u
    end
    return h
end

local MidBlock = nn.Module:extend("UNetMidBlock2DCrossAttn")
function MidBlock:init(o)
    local resnets = nn.ModuleList()
    for _ = 1, 2 do
        resnets:append(B.ResnetBlock2D {in_channels = o.c, out_channels = o.c, temb_channels = o.temb,
                                        groups = o.groups, eps = o.eps, output_scale_factor = o.scale})
    end
    local attns = nn.ModuleList()
    attns:append(B.Transformer2DModel {heads = o.heads, dim_head = o.c // o.heads, in_channels = o.c,
                                       groups = o.groups, cross_attention_dim = o.cross_dim,
                                       use_linear_projection = o.linear_proj})
    self:add_module("attentions", attns)
    self:add_module("resnets", resnets)
end
function MidBlock:forward(h, temb, context)
    local r1 = self.resnets[1](h, temb)
    local a = self.attentions[1](r1, context)
    release(r1, h, a)
    local r2 = self.resnets[2](a, temb)
    release(a, h, r2)
    return r2
end

-- ---- timestep embedding -----------------------------------------------------

local TimestepEmbedding = nn.Module:extend("TimestepEmbedding")
function TimestepEmbedding:init(cin, dim)
    self:add_module("linear_1", nn.Linear(cin, dim))
    self:add_module("linear_2", nn.Linear(dim, dim))
end
function TimestepEmbedding:forward(x) return self.linear_2(core.silu(self.linear_1(x))) end

-- Sinusoidal embedding as diffusers' get_timestep_embedding: exponent
-- -ln(10000) * i / (half - shift), sin then cos, swapped when flip_sin_to_cos.
function M.timestep_embedding(t, dim, flip_sin_to_cos, shift, device)
    local half = dim // 2
    local exponent = core.arange(0, half, {dtype = "f32", device = device}) * (-math.log(10000) / (half - shift))
    local freqs = exponent:exp()
    local emb = t:float():view(-1, 1) * freqs:view(1, half)
    local s, c = emb:sin(), emb:cos()
    local out = flip_sin_to_cos and core.cat({c, s}, 2) or core.cat({s, c}, 2)
    if dim % 2 == 1 then out = core.cat({out, core.zeros({out:size(1), 1}, {device = device})}, 2) end
    return out
end

-- ---- the model ----------------------------------------------------------------

local UNet = nn.Module:extend("UNet2DConditionModel")
M.UNet2DConditionModel = UNet
-- what unet:enable_gradient_checkpointing() recomputes in backward: every
-- resnet and transformer block, as diffusers' gradient checkpointing does
UNet._checkpoint_classes = {"ResnetBlock2D", "Transformer2DModel"}

function UNet:init(cfg)
    config_check.check("UNet2DConditionModel", cfg)
    self.config = cfg
    local boc = cfg.block_out_channels
    local nb = #boc
    local layers = cfg.layers_per_block or 2
    local groups = cfg.norm_num_groups or 32
    local eps = cfg.norm_eps or 1e-5
    local cross = cfg.cross_attention_dim
    -- diffusers reads attention_head_dim as the number of heads when
    -- num_attention_heads is unset (a historical naming quirk it keeps).
    local heads = per_block(cfg.num_attention_heads or cfg.attention_head_dim or 8, nb)
    local linear_proj = cfg.use_linear_projection or false
    local temb = boc[1] * 4
    self.flip_sin_to_cos = cfg.flip_sin_to_cos ~= false
    self.freq_shift = cfg.freq_shift or 0
    self.time_proj_dim = boc[1]

    self:add_module("conv_in", nn.Conv2d(cfg.in_channels, boc[1], cfg.conv_in_kernel or 3,
                                         {padding = ((cfg.conv_in_kernel or 3) - 1) // 2}))
    self:add_module("time_embedding", TimestepEmbedding(boc[1], temb))

    local down = nn.ModuleList()
    local cout = boc[1]
    for i, btype in ipairs(cfg.down_block_types) do
        local cin = cout
        cout = boc[i]
        if btype ~= "CrossAttnDownBlock2D" and btype ~= "DownBlock2D" then
            error("UNet2DConditionModel: unsupported down block type " .. btype)
        end
        down:append(DownBlock {cin = cin, cout = cout, temb = temb, layers = layers, groups = groups, eps = eps,
                               cross = btype == "CrossAttnDownBlock2D", heads = heads[i], cross_dim = cross,
                               linear_proj = linear_proj, downsample = i < nb,
                               downsample_padding = cfg.downsample_padding or 1})
    end
    self:add_module("down_blocks", down)

    local up = nn.ModuleList()
    local rev, rheads = {}, {}
    for i = nb, 1, -1 do rev[#rev + 1] = boc[i]; rheads[#rheads + 1] = heads[i] end
    local prev = rev[1]
    for i, btype in ipairs(cfg.up_block_types) do
        if btype ~= "CrossAttnUpBlock2D" and btype ~= "UpBlock2D" then
            error("UNet2DConditionModel: unsupported up block type " .. btype)
        end
        local co = rev[i]
        local ci = rev[math.min(i + 1, nb)]
        up:append(UpBlock {prev = prev, cin = ci, cout = co, temb = temb, layers = layers, groups = groups, eps = eps,
                           cross = btype == "CrossAttnUpBlock2D", heads = rheads[i], cross_dim = cross,
                           linear_proj = linear_proj, upsample = i < nb})
        prev = co
    end
    self:add_module("up_blocks", up)
    self:add_module("mid_block", MidBlock {c = boc[nb], temb = temb, groups = groups, eps = eps,
                                           scale = cfg.mid_block_scale_factor or 1, heads = heads[nb],
                                           cross_dim = cross, linear_proj = linear_proj})
    self:add_module("conv_norm_out", nn.GroupNorm(groups, boc[1], {eps = eps}))
    self:add_module("conv_out", nn.Conv2d(boc[1], cfg.out_channels, cfg.conv_out_kernel or 3,
                                          {padding = ((cfg.conv_out_kernel or 3) - 1) // 2}))
end

-- Children are registered in diffusers' order (conv_in, time_embedding,
-- down_blocks, up_blocks, mid_block, ...), so named_parameters() lists
-- tensors as PyTorch does: optimizer state and gradient buckets line up.
function UNet:forward(sample, timesteps, context)
    local n = sample:size(1)
    local dev = sample.device
    if type(timesteps) == "number" then
        timesteps = core.full({n}, timesteps, {dtype = "f32", device = dev})
    elseif timesteps:dim() == 0 or timesteps:numel() == 1 and n > 1 then
        timesteps = timesteps:float():view(1):expand(n)
    end
    local t_emb = M.timestep_embedding(timesteps, self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift, dev)
    if t_emb.dtype ~= sample.dtype then
        local cast = t_emb:to(sample.dtype)
        release(t_emb, cast)
        t_emb = cast
    end
    local emb = self.time_embedding(t_emb)
    release(t_emb, emb)

    -- Intermediates are released once used (nn.release); the down path's
    -- outputs live on in skips until the up blocks concatenate them.
    local h = self.conv_in(sample)
    local skips = {h}
    for _, blk in ipairs(self.down_blocks:children()) do h = blk(h, emb, context, skips) end
    h = self.mid_block(h, emb, context)
    for _, blk in ipairs(self.up_blocks:children()) do
        local nh = blk(h, emb, context, skips)
        release(h, sample, context, nh)
        h = nh
    end
    local n = self.conv_norm_out(h, {silu = true})
    release(h, sample, n)
    release(emb, sample, context)
    local out = self.conv_out(n)
    release(n, sample, out)
    return out
end

return M
