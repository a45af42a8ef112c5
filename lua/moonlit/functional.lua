-- moonlit.functional (ml.F) — stateless ops with PyTorch-like names.
-- Layout conventions: images are NHWC, conv weights [O, kh, kw, I],
-- attention tensors BSHD ([batch, seq, heads, head_dim]).
local core = require "moonlit.core"
local F = {}

-- The ops the registry puts in ml.F (host/op_registry.h); the wrappers
-- below replace those whose Lua signature differs from the core's.
for _, op in ipairs(core.op_registry()) do
    if op.F then F[op.lua] = core[op.lua] end
end

-- gelu(x, {approximate = "tanh"}) — exact erf form by default, as PyTorch.
function F.gelu(x, opts)
    if opts and opts.approximate == "tanh" then return core.gelu_tanh(x) end
    return core.gelu(x)
end

-- group_norm(x, num_groups, weight, bias, eps, {silu = true}) on channels-last x.
function F.group_norm(x, groups, weight, bias, eps, opts)
    return core.group_norm(x, groups, weight, bias, eps or 1e-5, opts and opts.silu or false)
end

-- layer_norm(x, weight, bias, eps): normalises over the last dimension.
function F.layer_norm(x, weight, bias, eps)
    return core.layer_norm(x, weight, bias, eps or 1e-5)
end

-- interpolate(x, {scale_factor = 2, mode = "nearest"}) on NHWC x.
function F.interpolate(x, opts)
    local mode = opts.mode or "nearest"
    assert(mode == "nearest", "interpolate: only mode = 'nearest' is implemented")
    return core.upsample_nearest2d(x, opts.scale_factor or 2)
end

return F
