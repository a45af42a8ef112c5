-- moonlit.functional (ml.F) — stateless ops with PyTorch-like names.
-- Layout conventions: images are NHWC, conv weights [O, kh, kw, I],
-- attention tensors BSHD ([batch, seq, heads, head_dim]).
local core = require "moonlit.core"
local F = {}

for _, name in ipairs {
    "relu", "silu", "sigmoid", "tanh", "quick_gelu", "softmax", "log_softmax", "linear", "conv2d",
    "embedding", "dropout", "mse_loss", "scaled_dot_product_attention", "upsample_nearest2d",
    "matmul", "cat", "stack", "gather", "index_select", "where", "clamp",
} do
    F[name] = core[name]
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
