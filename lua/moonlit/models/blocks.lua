-- moonlit.models.blocks — the building blocks diffusers' UNet and VAE share:
-- ResnetBlock2D, Attention, BasicTransformerBlock, Transformer2DModel,
-- Downsample2D, Upsample2D.  Parameter names equal diffusers' so that
-- state_dict keys match the files.  All activations are NHWC.
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local release = nn.release

local B = {}

-- ---- ResnetBlock2D --------------------------------------------------------

local ResnetBlock2D = nn.Module:extend("ResnetBlock2D")
B.ResnetBlock2D = ResnetBlock2D

-- o: in_channels, out_channels, temb_channels (nil for the VAE), groups, eps,
--    output_scale_factor
function ResnetBlock2D:init(o)
    local cin, cout = o.in_channels, o.out_channels or o.in_channels
    self.output_scale_factor = o.output_scale_factor or 1
    self:add_module("norm1", nn.GroupNorm(o.groups, cin, {eps = o.eps}))
    self:add_module("conv1", nn.Conv2d(cin, cout, 3, {padding = 1}))
    if o.temb_channels then self:add_module("time_emb_proj", nn.Linear(o.temb_channels, cout)) end
    self:add_module("norm2", nn.GroupNorm(o.groups, cout, {eps = o.eps}))
    self:add_module("conv2", nn.Conv2d(cout, cout, 3, {padding = 1}))
    if cin ~= cout then self:add_module("conv_shortcut", nn.Conv2d(cin, cout, 1)) end
end

-- x [N,H,W,Cin], temb [N,T] -> [N,H,W,Cout].  Each intermediate is
-- released (nn.release) once used: what backward needs the graph holds.
function ResnetBlock2D:forward(x, temb)
    local n1 = self.norm1(x, {silu = true})
    local h = self.conv1(n1)
    release(n1, x, h)
    if temb and self.time_emb_proj then
        local st = core.silu(temb)
        local t = self.time_emb_proj(st)                         -- [N, Cout]
        release(st, temb, t)
        local tv = t:view(t:size(1), 1, 1, t:size(2))
        local ht = h + tv
        release(tv, temb); release(t, temb); release(h, x)
        h = ht
    end
    local n2 = self.norm2(h, {silu = true})
    release(h, x, n2)
    h = self.conv2(n2)
    release(n2, x, h)
    local sc = self.conv_shortcut and self.conv_shortcut(x) or x
    local out = sc + h
    release(h, x); release(sc, x)
    if self.output_scale_factor ~= 1 then
        local scaled = out / self.output_scale_factor
        release(out, x)
        out = scaled
    end
    return out
end

-- ---- Attention ------------------------------------------------------------

local Attention = nn.Module:extend("Attention")
B.Attention = Attention

-- o: query_dim, cross_attention_dim (nil = self), heads, dim_head, bias (q/k/v),
--    group_norm_groups + eps (the VAE's mid-block attention normalises inside)
function Attention:init(o)
    local inner = o.heads * o.dim_head
    self.heads, self.dim_head = o.heads, o.dim_head
    self.residual = o.residual_connection or false
    if o.norm_num_groups then
        self:add_module("group_norm", nn.GroupNorm(o.norm_num_groups, o.query_dim, {eps = o.eps or 1e-6}))
    end
    local kv = o.cross_attention_dim or o.query_dim
    self:add_module("to_q", nn.Linear(o.query_dim, inner, {bias = o.bias or false}))
    self:add_module("to_k", nn.Linear(kv, inner, {bias = o.bias or false}))
    self:add_module("to_v", nn.Linear(kv, inner, {bias = o.bias or false}))
    local out = nn.ModuleList()
    out:append(nn.Linear(inner, o.query_dim, {bias = true}))
    out:append(nn.Dropout(0))
    self:add_module("to_out", out)
end

-- x [B, S, C] (or [B,H,W,C] for the VAE form), context [B, S2, Cc] or nil
function Attention:forward(x, context)
    local input = x
    local shape4 = nil
    if x:dim() == 4 then
        shape4 = x:size()
        if self.group_norm then x = self.group_norm(x) end
        local flat = x:view(shape4[1], shape4[2] * shape4[3], shape4[4])
        release(x, input, flat)
        x = flat
    elseif self.group_norm then
        x = self.group_norm(x)
    end
    local b, s = x:size(1), x:size(2)
    local src = context or x
    local function heads(proj)
        local p = proj(src)
        local hv = p:view(b, src:size(2), self.heads, self.dim_head)
        release(p, src, hv)
        return hv
    end
    local q = self.to_q(x)
    local qv = q:view(b, s, self.heads, self.dim_head)
    release(q, x, qv)
    local k, v = heads(self.to_k), heads(self.to_v)
    release(x, input, context)
    local o = core.scaled_dot_product_attention(qv, k, v)
    release(qv, input, context); release(k, input, context); release(v, input, context)
    local ov = o:view(b, s, self.heads * self.dim_head)
    release(o, ov)
    local out = self.to_out[1](ov)
    release(ov, out)
    if shape4 then
        local o4 = out:view(shape4)
        release(out, o4)
        out = o4
    end
    if self.residual then
        local r = out + input
        release(out, input)
        out = r
    end
    return out
end

-- ---- FeedForward with GEGLU ------------------------------------------------

local GEGLU = nn.Module:extend("GEGLU")
function GEGLU:init(din, dout) self:add_module("proj", nn.Linear(din, dout * 2)) end
-- proj's output h is [..., 2 * dout]: hidden = h[..., :dout] times
-- gelu(gate = h[..., dout:]), fused (core.geglu): one kernel each way instead
-- of a strided gelu and product forward and, backward, two full-size
-- zero-filled narrow gradients summed.
function GEGLU:forward(x)
    local h = self.proj(x)
    local y = core.geglu(h)
    release(h, x, y)
    return y
end

local FeedForward = nn.Module:extend("FeedForward")
function FeedForward:init(dim, mult)
    local inner = dim * (mult or 4)
    local net = nn.ModuleList()
    net:append(GEGLU(dim, inner))
    net:append(nn.Dropout(0))
    net:append(nn.Linear(inner, dim))
    self:add_module("net", net)
end
function FeedForward:forward(x)
    local h = self.net[1](x)
    local y = self.net[3](h)
    release(h, x, y)
    return y
end

-- ---- BasicTransformerBlock / Transformer2DModel ----------------------------

local BasicTransformerBlock = nn.Module:extend("BasicTransformerBlock")
B.BasicTransformerBlock = BasicTransformerBlock
function BasicTransformerBlock:init(o)
    local dim = o.heads * o.dim_head
    self:add_module("norm1", nn.LayerNorm(dim))
    self:add_module("attn1", Attention {query_dim = dim, heads = o.heads, dim_head = o.dim_head})
    self:add_module("norm2", nn.LayerNorm(dim))
    self:add_module("attn2", Attention {query_dim = dim, cross_attention_dim = o.cross_attention_dim,
                                        heads = o.heads, dim_head = o.dim_head})
    self:add_module("norm3", nn.LayerNorm(dim))
    self:add_module("ff", FeedForward(dim))
end
-- f(norm(x), ...) + x, releasing norm(x) and f's output once used.
local function residual(x, norm, f, ...)
    local n = norm(x)
    local y = f(n, ...)
    release(n, x, y)
    local out = y + x
    release(y, x)
    return out
end
function BasicTransformerBlock:forward(x, context)
    local h1 = residual(x, self.norm1, self.attn1)
    local h2 = residual(h1, self.norm2, self.attn2, context)
    release(h1, x, context)
    local h3 = residual(h2, self.norm3, self.ff)
    release(h2, x, context)
    return h3
end

local Transformer2DModel = nn.Module:extend("Transformer2DModel")
B.Transformer2DModel = Transformer2DModel
-- o: heads, dim_head, in_channels, groups, cross_attention_dim, use_linear_projection
function Transformer2DModel:init(o)
    local inner = o.heads * o.dim_head
    self.use_linear_projection = o.use_linear_projection or false
    self:add_module("norm", nn.GroupNorm(o.groups, o.in_channels, {eps = 1e-6}))
    if self.use_linear_projection then
        self:add_module("proj_in", nn.Linear(o.in_channels, inner))
    else
        self:add_module("proj_in", nn.Conv2d(o.in_channels, inner, 1))
    end
    local blocks = nn.ModuleList()
    blocks:append(BasicTransformerBlock {heads = o.heads, dim_head = o.dim_head,
                                         cross_attention_dim = o.cross_attention_dim})
    self:add_module("transformer_blocks", blocks)
    if self.use_linear_projection then
        self:add_module("proj_out", nn.Linear(inner, o.in_channels))
    else
        self:add_module("proj_out", nn.Conv2d(inner, o.in_channels, 1))
    end
end

-- x [N,H,W,C], context [N,S,Cc] -> [N,H,W,C].  In NHWC a 1x1 conv and a
-- linear layer are the same map, so both projection styles need no transpose.
function Transformer2DModel:forward(x, context)
    local n, h, w = x:size(1), x:size(2), x:size(3)
    local normed = self.norm(x)
    local p = self.proj_in(normed)
    release(normed, x, p)
    local inner = p:size(4)
    local hs = p:view(n, h * w, inner)
    release(p, x, hs)
    for _, blk in ipairs(self.transformer_blocks:children()) do
        local nh = blk(hs, context)
        release(hs, x, context, nh)
        hs = nh
    end
    local hv = hs:view(n, h, w, inner)
    release(hs, x, hv)
    local po = self.proj_out(hv)
    release(hv, x, po)
    local out = po + x
    release(po, x)
    return out
end

-- ---- Down/Upsample2D ------------------------------------------------------

local Downsample2D = nn.Module:extend("Downsample2D")
B.Downsample2D = Downsample2D
-- padding 1: symmetric (UNet); padding 0: diffusers pads right and bottom by
-- one instead (VAE), which the conv does as padding {top, bottom, left, right}.
function Downsample2D:init(channels, padding)
    local pad = padding == 0 and {0, 1, 0, 1} or padding
    self:add_module("conv", nn.Conv2d(channels, channels, 3, {stride = 2, padding = pad}))
end
function Downsample2D:forward(x) return self.conv(x) end

local Upsample2D = nn.Module:extend("Upsample2D")
B.Upsample2D = Upsample2D
function Upsample2D:init(channels)
    self:add_module("conv", nn.Conv2d(channels, channels, 3, {padding = 1}))
end

-- Rounds to the nearest float32, so that index arithmetic below matches
-- PyTorch's, which computes the resize scale and source position in float.
local function f32(v) return (string.unpack("<f", string.pack("<f", v))) end

-- The 1-based source rows (or columns) that nearest-neighbour resizing from
-- n_in to n_out reads, as torch.nn.functional.interpolate(size=...) picks
-- them: floor(i * (n_in / n_out)) computed in float32, clamped to the input.
local function nearest_source_index(n_in, n_out, device)
    local scale = f32(n_in / n_out)
    local idx = {}
    for i = 0, n_out - 1 do
        local src = n_out == 2 * n_in and i >> 1 or math.floor(f32(i * scale))
        idx[i + 1] = math.min(src, n_in - 1) + 1
    end
    return core.tensor(idx, {dtype = "i64", device = device})
end
B.nearest_source_index = nearest_source_index

-- resize_nearest(x [N,H,W,C], {h, w}) -> [N,h,w,C]: nearest-neighbour resize
-- to a given size.  Exact doublings use the upsample kernel; other sizes
-- (an odd skip size in the UNet) gather rows then columns, which keeps
-- autograd and runs on every device index_select does.
function B.resize_nearest(x, size)
    local h, w = size[1], size[2]
    local H, W = x:size(2), x:size(3)
    if math.type(h) ~= "integer" or math.type(w) ~= "integer" or h < 1 or w < 1 then
        error(string.format("resize_nearest: size must be two positive integers (got %s x %s)",
                            tostring(h), tostring(w)), 2)
    end
    if h == 2 * H and w == 2 * W then return core.upsample_nearest2d(x, 2) end
    if h ~= H then x = core.index_select(x, 2, nearest_source_index(H, h, x.device)) end
    if w ~= W then x = core.index_select(x, 3, nearest_source_index(W, w, x.device)) end
    return x
end

-- forward(x, [output_size {h, w}]): twice the size, or exactly output_size
-- (diffusers' Upsample2D output_size, passed when a skip is not an exact
-- doubling of the map below it).
function Upsample2D:forward(x, output_size)
    local up = output_size and B.resize_nearest(x, output_size) or core.upsample_nearest2d(x, 2)
    local y = self.conv(up)
    release(up, x, y)
    return y
end

return B
