-- moonlit.models.autoencoder_kl — diffusers' AutoencoderKL (the SD VAE),
-- built from its config.json.  Images and latents are NHWC.
--   vae:encode(x [N,H,W,3] in [-1,1]) -> DiagonalGaussian {mean, logvar, std}
--   vae:decode(z [N,h,w,4]) -> [N,H,W,3]
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local release = nn.release
local B = require "moonlit.models.blocks"
local config_check = require "moonlit.config_check"

local M = {}

local MidBlock = nn.Module:extend("UNetMidBlock2D")
function MidBlock:init(c, groups)
    local attns = nn.ModuleList()
    attns:append(B.Attention {query_dim = c, heads = 1, dim_head = c, bias = true, norm_num_groups = groups,
                              eps = 1e-6, residual_connection = true})
    local resnets = nn.ModuleList()
    for _ = 1, 2 do resnets:append(B.ResnetBlock2D {in_channels = c, out_channels = c, groups = groups, eps = 1e-6}) end
    self:add_module("attentions", attns)
    self:add_module("resnets", resnets)
end
-- Intermediates are released once used (nn.release), never the input.
function MidBlock:forward(h)
    local r1 = self.resnets[1](h)
    local a = self.attentions[1](r1)
    release(r1, h, a)
    local r2 = self.resnets[2](a)
    release(a, h, r2)
    return r2
end

-- x through each of fns in turn, releasing each intermediate once used
-- (never x).
local function chain(x, fns)
    local h = x
    for _, f in ipairs(fns) do
        local nh = f(h)
        release(h, x, nh)
        h = nh
    end
    return h
end

-- DownEncoderBlock2D / UpDecoderBlock2D: a stack of resnets, then an
-- optional down- or upsampler (the two differ only in that last step).
local function resnet_stack(name, sampler_field, make_sampler)
    local cls = nn.Module:extend(name)
    function cls:init(cin, cout, layers, groups, resample)
        local resnets = nn.ModuleList()
        for j = 1, layers do
            resnets:append(B.ResnetBlock2D {in_channels = j == 1 and cin or cout, out_channels = cout,
                                            groups = groups, eps = 1e-6})
        end
        self:add_module("resnets", resnets)
        if resample then
            local list = nn.ModuleList()
            list:append(make_sampler(cout))
            self:add_module(sampler_field, list)
        end
    end
    function cls:forward(h)
        local fns = self.resnets:children()
        local s = self[sampler_field]
        if s then fns[#fns + 1] = s[1] end
        return chain(h, fns)
    end
    return cls
end

local EncBlock = resnet_stack("DownEncoderBlock2D", "downsamplers", function(c) return B.Downsample2D(c, 0) end)
local DecBlock = resnet_stack("UpDecoderBlock2D", "upsamplers", function(c) return B.Upsample2D(c) end)

local Encoder = nn.Module:extend("Encoder")
function Encoder:init(cfg)
    local boc, groups, layers = cfg.block_out_channels, cfg.norm_num_groups or 32, cfg.layers_per_block or 2
    self:add_module("conv_in", nn.Conv2d(cfg.in_channels or 3, boc[1], 3, {padding = 1}))
    local down = nn.ModuleList()
    local cout = boc[1]
    for i, btype in ipairs(cfg.down_block_types) do
        assert(btype == "DownEncoderBlock2D", "AutoencoderKL: unsupported down block type " .. btype)
        local cin = cout
        cout = boc[i]
        down:append(EncBlock(cin, cout, layers, groups, i < #boc))
    end
    self:add_module("down_blocks", down)
    self:add_module("mid_block", MidBlock(boc[#boc], groups))
    self:add_module("conv_norm_out", nn.GroupNorm(groups, boc[#boc], {eps = 1e-6}))
    self:add_module("conv_out", nn.Conv2d(boc[#boc], 2 * cfg.latent_channels, 3, {padding = 1}))
end
local function norm_out_silu(m) return function(h) return m(h, {silu = true}) end end

function Encoder:forward(x)
    local fns = {self.conv_in}
    for _, b in ipairs(self.down_blocks:children()) do fns[#fns + 1] = b end
    for _, f in ipairs {self.mid_block, norm_out_silu(self.conv_norm_out), self.conv_out} do fns[#fns + 1] = f end
    return chain(x, fns)
end

local Decoder = nn.Module:extend("Decoder")
function Decoder:init(cfg)
    local boc, groups, layers = cfg.block_out_channels, cfg.norm_num_groups or 32, cfg.layers_per_block or 2
    local nb = #boc
    self:add_module("conv_in", nn.Conv2d(cfg.latent_channels, boc[nb], 3, {padding = 1}))
    local up = nn.ModuleList()
    local prev = boc[nb]
    for i, btype in ipairs(cfg.up_block_types) do
        assert(btype == "UpDecoderBlock2D", "AutoencoderKL: unsupported up block type " .. btype)
        local cout = boc[nb - i + 1]
        up:append(DecBlock(prev, cout, layers + 1, groups, i < nb))
        prev = cout
    end
    self:add_module("up_blocks", up)
    self:add_module("mid_block", MidBlock(boc[nb], groups))
    self:add_module("conv_norm_out", nn.GroupNorm(groups, boc[1], {eps = 1e-6}))
    self:add_module("conv_out", nn.Conv2d(boc[1], cfg.out_channels or 3, 3, {padding = 1}))
end
function Decoder:forward(z)
    local fns = {self.conv_in, self.mid_block}
    for _, b in ipairs(self.up_blocks:children()) do fns[#fns + 1] = b end
    fns[#fns + 1] = norm_out_silu(self.conv_norm_out)
    fns[#fns + 1] = self.conv_out
    return chain(z, fns)
end

-- ---- the posterior ------------------------------------------------------------

local Gaussian = {}
Gaussian.__index = Gaussian
M.DiagonalGaussian = Gaussian

-- moments [N,h,w,2C] -> mean, logvar (clamped to [-30, 20] as diffusers does)
function Gaussian.new(moments)
    local c = moments:size(4) // 2
    local self = setmetatable({}, Gaussian)
    self.mean = moments:narrow(4, 1, c)
    self.logvar = core.clamp(moments:narrow(4, c + 1, c), -30, 20)
    self.std = (self.logvar * 0.5):exp()
    return self
end

-- sample(eps): mean + std * eps; eps defaults to fresh standard normal noise.
function Gaussian:sample(eps)
    eps = eps or core.randn(self.mean:size(), {dtype = self.mean.dtype, device = self.mean.device})
    return self.mean + self.std * eps
end

function Gaussian:mode() return self.mean end

-- ---- the model ------------------------------------------------------------------

local VAE = nn.Module:extend("AutoencoderKL")
M.AutoencoderKL = VAE

function VAE:init(cfg)
    config_check.check("AutoencoderKL", cfg)
    self.config = cfg
    self.scaling_factor = cfg.scaling_factor or 0.18215
    local lc = cfg.latent_channels
    self:add_module("encoder", Encoder(cfg))
    self:add_module("decoder", Decoder(cfg))
    if cfg.use_quant_conv ~= false then self:add_module("quant_conv", nn.Conv2d(2 * lc, 2 * lc, 1)) end
    if cfg.use_post_quant_conv ~= false then self:add_module("post_quant_conv", nn.Conv2d(lc, lc, 1)) end
end

function VAE:encode(x)
    local m = self.encoder(x)
    if self.quant_conv then m = self.quant_conv(m) end
    return Gaussian.new(m)
end

function VAE:decode(z)
    if self.post_quant_conv then z = self.post_quant_conv(z) end
    return self.decoder(z)
end

function VAE:forward(x) return self:decode(self:encode(x):mode()) end

return M
