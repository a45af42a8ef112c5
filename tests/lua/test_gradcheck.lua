-- test_gradcheck.lua — finite-difference gradient checks of every
-- differentiable op, driven by the op registry: CASES[op] lists the checks of
-- one registry op (broadcast and non-contiguous inputs where they mean
-- something), and a test fails if any differentiable op of
-- moonlit.core.op_registry() has none.  Also tests ml.gradcheck itself.
-- GRADCHECK_VERBOSE=1 prints every case with its summary.
local ml = require "moonlit"
local F = ml.F
local gradcheck = require "moonlit.gradcheck"

-- ---- input makers (CPU f64 leaves requiring grad) --------------------------

local function leaf(x)
    x.requires_grad = true
    return x
end

local function randn(...)
    return leaf(ml.randn({...}, {dtype = "f64"}))
end

-- Non-contiguous leaf of the given shape: the storage holds the last two
-- dims swapped and the leaf is the transposed view of it.
local function randn_nc(...)
    local shape = {...}
    local s = {table.unpack(shape)}
    s[#s], s[#s - 1] = s[#s - 1], s[#s]
    local x = ml.randn(s, {dtype = "f64"}):transpose(-1, -2)
    assert(not x:is_contiguous())
    return leaf(x)
end

-- Values in [0.5, 1.5]: for sqrt, log, rsqrt, pow bases, divisors.
local function positive(...)
    return leaf(ml.rand({...}, {dtype = "f64"}) + 0.5)
end

-- Values with |x| >= 0.2: away from the kinks of abs, relu, sign-like ops.
local function away(...)
    local x = ml.randn({...}, {dtype = "f64"})
    return leaf(x + x:sign() * 0.2)
end

-- A tensor not requiring grad.
local function const(x)
    x.requires_grad = false
    return x
end

local function ids(list)
    return ml.tensor(list, {dtype = "i64"})
end

-- CASES[op] = list of {name, fn, inputs = function() return {...} end, opts}
local CASES = {}

local function case(op, name, fn, inputs, opts)
    CASES[op] = CASES[op] or {}
    table.insert(CASES[op], {name = name, fn = fn, inputs = inputs, opts = opts})
end

-- ---- elementwise binary --------------------------------------------------

local binary = {
    add = function(a, b) return a + b end,
    sub = function(a, b) return a - b end,
    mul = function(a, b) return a * b end,
    div = function(a, b) return a / b end,
    pow = function(a, b) return a ^ b end,
    maximum = function(a, b) return a:maximum(b) end,
    minimum = function(a, b) return a:minimum(b) end,
}
for op, fn in pairs(binary) do
    -- the base of pow and every divisor stay positive
    local lhs = op == "pow" and positive or randn
    local rhs = (op == "div" or op == "pow") and positive or randn
    if op == "maximum" or op == "minimum" then
        -- keep a and b apart so no element sits on the switch point
        case(op, "same shape", fn, function()
            local a = randn(2, 3)
            local b = ml.no_grad(function() return a:detach() + away(2, 3):detach() end)
            return {a, leaf(b)}
        end)
        case(op, "broadcast [2,3] with [3]", fn, function()
            local b = randn(3)
            local a = ml.no_grad(function() return b:detach():expand(2, 3) + away(2, 3):detach() end)
            return {leaf(a:contiguous()), b}
        end)
    else
        case(op, "same shape", fn, function() return {lhs(2, 3), rhs(2, 3)} end)
        case(op, "broadcast [2,1,3] with [4,1]", fn, function() return {lhs(2, 1, 3), rhs(4, 1)} end)
        case(op, "broadcast [3] with [2,3]", fn, function() return {lhs(3), rhs(2, 3)} end)
        case(op, "non-contiguous", fn, function()
            local a = lhs(3, 2)
            local b = rhs(3, 2)
            return {leaf(ml.no_grad(function() return a:detach():t():contiguous():t() end)),
                    leaf(ml.no_grad(function() return b:detach():t():contiguous():t() end))}
        end)
        case(op, "0-dim with [2,3]", fn, function() return {lhs(), rhs(2, 3)} end)
    end
end
case("add", "tensor + number", function(a) return a + 2.5 end, function() return {randn(2, 3)} end)
case("add", "number + tensor", function(a) return 2.5 + a end, function() return {randn_nc(2, 3)} end)
case("sub", "tensor - number", function(a) return a - 1.5 end, function() return {randn(2, 3)} end)
case("sub", "number - tensor", function(a) return 1.5 - a end, function() return {randn_nc(2, 3)} end)
case("mul", "tensor * number", function(a) return a * -3 end, function() return {randn_nc(2, 3)} end)
case("mul", "number * tensor", function(a) return 0.5 * a end, function() return {randn(4)} end)
case("div", "tensor / number", function(a) return a / 4 end, function() return {randn(2, 3)} end)
case("div", "number / tensor", function(a) return 2 / a end, function() return {positive(2, 3)} end)
case("pow", "tensor ^ 3", function(a) return a ^ 3 end, function() return {randn_nc(2, 3)} end)
case("pow", "tensor ^ 0.5", function(a) return a ^ 0.5 end, function() return {positive(2, 3)} end)
case("pow", "tensor ^ -2", function(a) return a ^ -2 end, function() return {positive(3)} end)

-- ---- where ---------------------------------------------------------------

local function mask(...)
    return ml.rand({...}) :gt(0.5)
end
case("where", "same shape", function(c, a, b) return ml.where(c, a, b) end,
     function() return {mask(2, 3), randn(2, 3), randn(2, 3)} end)
case("where", "broadcast a [3], b [2,1]", function(c, a, b) return ml.where(c, a, b) end,
     function() return {mask(2, 3), randn(3), randn(2, 1)} end)
case("where", "non-contiguous, number branch", function(c, a) return ml.where(c, a, 0) end,
     function() return {mask(2, 3), randn_nc(2, 3)} end)

-- ---- elementwise unary ---------------------------------------------------

local unary = {
    neg = randn, sqrt = positive, rsqrt = positive, exp = randn, log = positive, abs = away,
    sin = randn, cos = randn, square = randn, silu = randn, gelu = randn, gelu_tanh = randn,
    quick_gelu = randn, sigmoid = randn, tanh = randn, relu = away,
}
for op, make in pairs(unary) do
    local fn = function(x) return ml[op](x) end
    case(op, "[2,3,4]", fn, function() return {make(2, 3, 4)} end)
    case(op, "non-contiguous", fn, function()
        local x = make(4, 3)
        return {leaf(ml.no_grad(function() return x:detach():t() end))}
    end)
end
case("neg", "unary minus", function(x) return -x end, function() return {randn(3)} end)

-- floor, round and sign are flat between their jumps: the gradient is 0,
-- checked on values at least 0.2 from a jump, so the differences see none.
-- A backward that passed the gradient through, or none at all, fails.
local function between_jumps(jump_at)
    return function(...)
        local shape = {...}
        return function()
            local whole = (ml.randn(shape, {dtype = "f64"}) * 3):round()
            local frac = ml.rand(shape, {dtype = "f64"}) * 0.6 + 0.2   -- in [0.2, 0.8]
            return {leaf(whole + frac - jump_at)}
        end
    end
end
local stepwise = {floor = between_jumps(0), round = between_jumps(0.5)}
for op, make in pairs(stepwise) do
    case(op, "[2,3,4]", function(x) return x[op](x) end, make(2, 3, 4))
    case(op, "non-contiguous, scaled", function(x) return x:t()[op](x:t()) * 2 + x:t() end, make(3, 4))
end
case("sign", "[2,3,4]", function(x) return x:sign() end, function() return {away(2, 3, 4)} end)
case("sign", "times x (|x|)", function(x) return x:sign() * x end, function() return {away(5)} end)
case("gelu", "F.gelu approximate tanh", function(x) return F.gelu(x, {approximate = "tanh"}) end,
     function() return {randn(5)} end)

-- values at least 0.05 from the bounds, so no element sits on a kink
local function clamp_input(lo, hi)
    return function()
        local x = ml.randn({3, 4}, {dtype = "f64"})
        local m = (x - lo):abs():minimum((x - hi):abs()):lt(0.05)
        return {leaf(ml.where(m, x + 0.2, x))}
    end
end
case("clamp", "both bounds", function(x) return x:clamp(-0.5, 0.5) end, clamp_input(-0.5, 0.5))
case("clamp", "lower bound only", function(x) return x:clamp(0) end, clamp_input(0, math.huge))
case("clamp", "upper bound only", function(x) return x:clamp(nil, 0.3) end, clamp_input(-math.huge, 0.3))

-- geglu: value half times gelu of the gate half, both halves' gradients
case("geglu", "[2,3,8]", function(h) return F.geglu(h) end, function() return {randn(2, 3, 8)} end)
case("geglu", "non-contiguous [4,6]", function(h) return F.geglu(h) end, function() return {randn_nc(4, 6)} end)
case("geglu", "last dim 2 (n = 1), gate scaled", function(h) return F.geglu(h * 3) end,
     function() return {randn(5, 2)} end)

-- ---- reductions ------------------------------------------------------------

for _, op in ipairs {"sum", "mean"} do
    case(op, "all", function(x) return x[op](x) end, function() return {randn(2, 3, 4)} end)
    case(op, "dim 2", function(x) return x[op](x, 2) end, function() return {randn(2, 3, 4)} end)
    case(op, "dims {1,3} keepdim", function(x) return x[op](x, {1, 3}, true) end,
         function() return {randn(2, 3, 4)} end)
    case(op, "dim -1, non-contiguous", function(x) return x[op](x, -1) end,
         function() return {randn_nc(3, 4)} end)
end
case("var", "all", function(x) return x:var() end, function() return {randn(3, 4)} end)
case("var", "dim 2, correction 0", function(x) return x:var(2, {correction = 0}) end,
     function() return {randn(3, 4)} end)
case("var", "dims {1,2} keepdim, non-contiguous", function(x) return x:var({1, 2}, {keepdim = true}) end,
     function() return {randn_nc(2, 3, 4)} end)
case("max", "all", function(x) return x:max() end, function() return {randn(3, 4)} end)
case("max", "dim 2", function(x) return (x:max(2)) end, function() return {randn(3, 4)} end)
case("max", "dim 1 keepdim, non-contiguous", function(x) return (x:max(1, true)) end,
     function() return {randn_nc(3, 4)} end)
case("norm", "2-norm of all", function(x) return x:norm() end, function() return {randn(3, 4)} end)
case("norm", "2-norm dim 2", function(x) return x:norm(2, 2) end, function() return {randn(3, 4)} end)
case("norm", "3-norm dims {1} keepdim", function(x) return x:norm(3, 1, true) end,
     function() return {away(3, 4)} end)
case("norm", "1-norm non-contiguous", function(x) return x:norm(1) end, function()
    local x = away(4, 3)
    return {leaf(ml.no_grad(function() return x:detach():t() end))}
end)

-- ---- matmul / linear ---------------------------------------------------------

local mm = function(a, b) return a:matmul(b) end
case("matmul", "2-D @ 2-D", mm, function() return {randn(3, 4), randn(4, 2)} end)
case("matmul", "batched broadcast [2,1,3,4] @ [3,4,2]", mm, function() return {randn(2, 1, 3, 4), randn(3, 4, 2)} end)
case("matmul", "[2,3,4] @ [4,5]", mm, function() return {randn(2, 3, 4), randn(4, 5)} end)
case("matmul", "1-D @ 2-D", mm, function() return {randn(4), randn(4, 3)} end)
case("matmul", "2-D @ 1-D", mm, function() return {randn(3, 4), randn(4)} end)
case("matmul", "1-D @ 1-D", mm, function() return {randn(4), randn(4)} end)
case("matmul", "non-contiguous", mm, function() return {randn_nc(3, 4), randn_nc(4, 2)} end)
case("linear", "with bias", function(x, w, b) return F.linear(x, w, b) end,
     function() return {randn(2, 3, 4), randn(5, 4), randn(5)} end)
case("linear", "no bias", function(x, w) return F.linear(x, w) end, function() return {randn(3, 4), randn(2, 4)} end)
case("linear", "non-contiguous x and w", function(x, w, b) return F.linear(x, w, b) end,
     function() return {randn_nc(3, 4), randn_nc(2, 4), randn(2)} end)

-- ---- conv2d (NHWC input, [O,kh,kw,I] weight) -------------------------------

case("conv2d", "3x3 stride 1 padding 1, bias", function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end,
     function() return {randn(2, 4, 4, 2), randn(3, 3, 3, 2), randn(3)} end)
case("conv2d", "3x3 stride 2 no padding, no bias", function(x, w) return F.conv2d(x, w, nil, {stride = 2}) end,
     function() return {randn(1, 5, 5, 2), randn(2, 3, 3, 2)} end)
case("conv2d", "stride {1,2} padding {1,0}, 2x3 kernel",
     function(x, w, b) return F.conv2d(x, w, b, {stride = {1, 2}, padding = {1, 0}}) end,
     function() return {randn(1, 4, 5, 3), randn(2, 2, 3, 3), randn(2)} end)
case("conv2d", "asymmetric padding {0,1,0,1} stride 2",
     function(x, w, b) return F.conv2d(x, w, b, {stride = 2, padding = {0, 1, 0, 1}}) end,
     function() return {randn(1, 4, 4, 2), randn(2, 3, 3, 2), randn(2)} end)
case("conv2d", "1x1 kernel, non-contiguous NCHW-permuted x",
     function(x, w, b) return F.conv2d(x, w, b) end, function()
         local x = ml.randn({1, 3, 4, 4}, {dtype = "f64"}):permute(1, 3, 4, 2)
         return {leaf(x), randn(2, 1, 1, 3), randn(2)}
     end)

-- ---- group_norm / layer_norm -------------------------------------------------

case("group_norm", "affine", function(x, w, b) return F.group_norm(x, 2, w, b) end,
     function() return {randn(2, 3, 3, 4), randn(4), randn(4)} end)
case("group_norm", "affine + fused silu", function(x, w, b) return F.group_norm(x, 2, w, b, 1e-5, {silu = true}) end,
     function() return {randn(2, 3, 3, 4), randn(4), randn(4)} end)
case("group_norm", "no affine, fused silu", function(x) return F.group_norm(x, 3, nil, nil, 1e-5, {silu = true}) end,
     function() return {randn(1, 2, 2, 6)} end)
case("group_norm", "[N,L,C] one group, non-contiguous", function(x, w, b) return F.group_norm(x, 1, w, b) end,
     function() return {randn_nc(2, 5, 4), randn(4), randn(4)} end)
case("layer_norm", "affine", function(x, w, b) return F.layer_norm(x, w, b) end,
     function() return {randn(2, 3, 5), randn(5), randn(5)} end)
case("layer_norm", "no affine", function(x) return F.layer_norm(x) end, function() return {randn(3, 4)} end)
case("layer_norm", "non-contiguous", function(x, w, b) return F.layer_norm(x, w, b, 1e-6) end,
     function() return {randn_nc(4, 3), randn(3), randn(3)} end)

-- ---- softmax ---------------------------------------------------------------

for _, op in ipairs {"softmax", "log_softmax"} do
    case(op, "last dim", function(x) return F[op](x) end, function() return {randn(2, 3, 4)} end)
    case(op, "dim 1", function(x) return F[op](x, 1) end, function() return {randn(3, 4)} end)
    case(op, "non-contiguous, dim -1", function(x) return F[op](x, -1) end, function() return {randn_nc(3, 5)} end)
end

-- ---- attention (BSHD) ----------------------------------------------------

local sdpa = F.scaled_dot_product_attention
case("sdpa", "not causal, Sq ~= Sk", function(q, k, v) return sdpa(q, k, v) end,
     function() return {randn(2, 3, 2, 4), randn(2, 5, 2, 4), randn(2, 5, 2, 4)} end)
case("sdpa", "causal", function(q, k, v) return sdpa(q, k, v, {causal = true}) end,
     function() return {randn(1, 4, 2, 3), randn(1, 4, 2, 3), randn(1, 4, 2, 3)} end)
case("sdpa", "scale 0.7", function(q, k, v) return sdpa(q, k, v, {scale = 0.7}) end,
     function() return {randn(1, 3, 1, 4), randn(1, 2, 1, 4), randn(1, 2, 1, 4)} end)
case("sdpa", "q,k,v narrowed from one packed projection (non-contiguous), causal",
     function(qkv)
         return sdpa(qkv:narrow(4, 1, 3), qkv:narrow(4, 4, 3), qkv:narrow(4, 7, 3), {causal = true})
     end, function() return {randn(1, 3, 2, 9)} end)

-- ---- indexing --------------------------------------------------------------

case("embedding", "repeated ids (0-based)", function(w, i) return F.embedding(w, i) end,
     function() return {randn(5, 3), ids({{0, 2}, {2, 4}})} end)
case("embedding", "1-D ids", function(w, i) return F.embedding(w, i) end,
     function() return {randn(4, 2), ids({3, 3, 1})} end)
case("cat", "dim 1, three inputs", function(a, b, c) return ml.cat({a, b, c}, 1) end,
     function() return {randn(2, 3), randn(1, 3), randn(3, 3)} end)
case("cat", "dim 2, non-contiguous", function(a, b) return ml.cat({a, b}, 2) end,
     function() return {randn_nc(2, 3), randn(2, 2)} end)
case("cat", "dim -1 of 3-D", function(a, b) return ml.cat({a, b}, -1) end,
     function() return {randn(2, 2, 1), randn(2, 2, 3)} end)
case("stack", "dim 1", function(a, b) return ml.stack({a, b}, 1) end, function() return {randn(2, 3), randn(2, 3)} end)
case("stack", "new last dim, non-contiguous", function(a, b, c) return ml.stack({a, b, c}, 3) end,
     function() return {randn_nc(2, 3), randn(2, 3), randn(2, 3)} end)
case("stack", "dim -1", function(a, b) return ml.stack({a, b}, -1) end, function() return {randn(4), randn(4)} end)
case("gather", "dim 2, repeated indices (1-based)", function(x, i) return F.gather(x, 2, i) end,
     function() return {randn(3, 4), ids({{1, 1, 4}, {2, 3, 2}, {4, 4, 4}})} end)
case("gather", "dim 1", function(x, i) return F.gather(x, 1, i) end,
     function() return {randn(3, 2), ids({{3, 1}, {3, 3}})} end)
case("index_select", "dim 1, repeated", function(x, i) return F.index_select(x, 1, i) end,
     function() return {randn(4, 3), ids({3, 1, 3})} end)
case("index_select", "dim 2, non-contiguous", function(x, i) return F.index_select(x, 2, i) end,
     function() return {randn_nc(2, 4), ids({4, 2})} end)
case("upsample_nearest2d", "scale 2", function(x) return F.upsample_nearest2d(x, 2) end,
     function() return {randn(1, 2, 3, 2)} end)
case("upsample_nearest2d", "scale 3, non-contiguous", function(x) return F.upsample_nearest2d(x, 3) end,
     function() return {leaf(ml.randn({2, 1, 2, 2}, {dtype = "f64"}):permute(1, 3, 4, 2))} end)
case("upsample_nearest2d", "F.interpolate", function(x) return F.interpolate(x, {scale_factor = 2}) end,
     function() return {randn(1, 2, 2, 3)} end)

-- ---- losses, dropout ---------------------------------------------------------

for _, red in ipairs {"mean", "sum", "none"} do
    case("mse_loss", "reduction " .. red, function(a, b) return F.mse_loss(a, b, red) end,
         function() return {randn(2, 3), randn(2, 3)} end)
end
case("mse_loss", "target without grad, non-contiguous", function(a, b) return F.mse_loss(a, b) end,
     function() return {randn_nc(3, 2), const(ml.randn({3, 2}, {dtype = "f64"}))} end)
case("dropout", "p = 0", function(x) return F.dropout(x, 0) end, function() return {randn(3, 4)} end)
case("dropout", "p = 0.4 with a fixed seed", function(x)
    ml.manual_seed(99)
    return F.dropout(x, 0.4, true)
end, function() return {randn(4, 5)} end)
case("dropout", "not training", function(x) return F.dropout(x, 0.5, false) end, function() return {randn(3)} end)

-- ---- views and conversions ---------------------------------------------------

case("view", "[2,6] -> [3,4]", function(x) return x:view(3, 4) end, function() return {randn(2, 6)} end)
case("view", "-1 and table shape", function(x) return x:view({-1, 2}) end, function() return {randn(2, 3, 2)} end)
case("view", "reshape of non-contiguous (copies)", function(x) return x:reshape(6) end,
     function() return {randn_nc(2, 3)} end)
case("view", "flatten", function(x) return x:flatten(2) end, function() return {randn(2, 3, 2)} end)
case("permute", "{3,1,2}", function(x) return x:permute(3, 1, 2) end, function() return {randn(2, 3, 4)} end)
case("permute", "transpose(1, -1)", function(x) return x:transpose(1, -1) end, function() return {randn(2, 3, 4)} end)
case("permute", "t() of non-contiguous", function(x) return x:t() * 1 end, function() return {randn_nc(2, 3)} end)
case("narrow", "dim 2", function(x) return x:narrow(2, 2, 2) end, function() return {randn(3, 4)} end)
case("narrow", "negative start", function(x) return x:narrow(1, -2, 2) end, function() return {randn(4, 2)} end)
case("narrow", "chunk and split", function(x)
    local a, b = x:chunk(2, 2)
    local c, d = x:split({1, 2}, 1)
    return ml.cat({(a * 2 + b):reshape(-1), (c:expand(2, 4) - d):reshape(-1)}, 1)
end, function() return {randn(3, 4)} end)
case("select", "dim 1", function(x) return x:select(1, 2) end, function() return {randn(3, 4)} end)
case("select", "dim -1 index -1", function(x) return x:select(-1, -1) end, function() return {randn(3, 4)} end)
case("select", "t[i]", function(x) return x[2] * x[3] end, function() return {randn_nc(3, 2)} end)
case("expand", "[3,1] -> [3,4]", function(x) return x:expand(3, 4) end, function() return {randn(3, 1)} end)
case("expand", "new leading dims, -1 keeps", function(x) return x:expand({2, -1, 3}) end,
     function() return {randn(4, 1)} end)
case("expand", "squeeze and unsqueeze", function(x) return x:squeeze(2):unsqueeze(1):expand(2, 3, 2) end,
     function() return {randn(3, 1, 2)} end)
case("contiguous", "of a non-contiguous leaf", function(x) return x:contiguous() end,
     function() return {randn_nc(3, 4)} end)
case("contiguous", "clone", function(x) return x:clone() end, function() return {randn(3)} end)
case("contiguous", "of a transposed view", function(x) return x:t():contiguous() * 2 end,
     function() return {randn(2, 3)} end)
case("clone", "of a leaf", function(x) return x:clone() end, function() return {randn(3)} end)
case("clone", "of a non-contiguous leaf, then scaled", function(x) return x:clone() * 3 end,
     function() return {randn_nc(3, 4)} end)
case("unsqueeze", "dim 1", function(x) return x:unsqueeze(1) end, function() return {randn(3, 2)} end)
case("unsqueeze", "dim -1 of non-contiguous", function(x) return x:unsqueeze(-1) * 2 end,
     function() return {randn_nc(2, 3)} end)
case("unsqueeze", "middle dim, broadcast against it", function(x) return x:unsqueeze(2) * x:unsqueeze(1) end,
     function() return {randn(3, 2)} end)
-- through f32 and back: f32 rounding (~6e-8) needs a larger step for the
-- differences to mean anything; the op is linear, so a large step is exact
case("to_dtype", "f64 -> f32 -> f64", function(x) return (x:float() * 3):double() end,
     function() return {randn(2, 3)} end, {eps = 1e-2, atol = 1e-4})
case("to_dtype", "to{dtype = 'f32'}", function(x) return x:to{dtype = "f32"} end,
     function() return {randn(4)} end, {eps = 1e-2, atol = 1e-4})
-- the autocast shadow: x's values taken from a copy made beside it, the
-- gradient converted back to x's dtype as to_dtype's
case("cast_as", "f64 through an f32 shadow", function(x) return ml.cast_as(x, x:detach():float()):double() * 3 end,
     function() return {randn(2, 3)} end, {eps = 1e-2, atol = 1e-4})

-- ---- tests -------------------------------------------------------------------

local tests = {}

local function run_cases(t, op)
    for _, c in ipairs(CASES[op]) do
        ml.manual_seed(1234)
        local inputs = c.inputs()
        local ok, msg = gradcheck(c.fn, inputs, c.opts)
        if os.getenv("GRADCHECK_VERBOSE") then print(op, c.name, msg) end
        t:assert(ok, op .. " (" .. c.name .. "): " .. tostring(msg))
    end
end

for op in pairs(CASES) do
    tests["grad_" .. op] = function(t) run_cases(t, op) end
end

-- Every op whose gradient the registry says is checked by finite
-- differences (grad = GRAD) has a case.  The other differentiable ones
-- (GRAD_BY_PARITY: to_device, whose gradient needs two devices) are
-- checked by the parity suite, which compares their gradients on the CPU
-- and the GPU; they must run on CUDA for that.
function tests.every_differentiable_op_has_a_case(t)
    local missing = {}
    for _, op in ipairs(ml.core.op_registry()) do
        if op.gradcheck and not (CASES[op.name] and #CASES[op.name] > 0) then
            missing[#missing + 1] = op.name
        end
    end
    t:assert(#missing == 0, "differentiable ops without a gradcheck case: " .. table.concat(missing, ", "))
end

function tests.differentiable_ops_without_a_case_are_checked_by_parity(t)
    local n = 0
    for _, op in ipairs(ml.core.op_registry()) do
        if op.differentiable and not op.gradcheck then
            n = n + 1
            t:assert(op.cuda, op.name .. ": its gradient is left to the parity suite, but it has no CUDA kernel")
            t:assert(not CASES[op.name], op.name .. ": has a gradcheck case but the registry says GRAD_BY_PARITY")
        end
        t:assert(op.differentiable or not op.gradcheck, op.name .. ": NO_GRAD and gradcheck at once")
    end
    t:assert(n >= 1, "to_device's gradient is the parity suite's")
end

function tests.every_case_names_a_registry_op(t)
    local known = {}
    for _, op in ipairs(ml.core.op_registry()) do known[op.name] = true end
    for op in pairs(CASES) do t:assert(known[op], "case for unknown op '" .. op .. "'") end
end

-- ---- the checker itself ------------------------------------------------------

function tests.gradcheck_detects_a_wrong_gradient(t)
    -- x * detach(x): the value is x^2, but backward only sees one factor
    local x = randn(3)
    local ok, msg = gradcheck(function(a) return a * a:detach() end, {x})
    t:assert(not ok, "a wrong gradient passed")
    t:assert(msg and msg:find("input 1 element {", 1, true), "message names the element: " .. tostring(msg))
end

function tests.gradcheck_detects_a_missing_gradient(t)
    local x, y = randn(2), randn(2)
    local ok, msg = gradcheck(function(a, b) return a + b:detach() end, {x, y})
    t:assert(not ok, "an input that got no gradient passed")
    t:assert(msg and msg:find("input 2", 1, true), tostring(msg))
end

function tests.gradcheck_accepts_non_tensor_arguments(t)
    local ok, msg = gradcheck(function(a, s, o) return a * s + o.shift end, {randn(3), 2.5, {shift = 1}})
    t:assert(ok, tostring(msg))
end

function tests.gradcheck_rejects_bad_inputs(t)
    local ok, msg = gradcheck(function(a) return a * 2 end, {leaf(ml.randn({3}))})
    t:assert(not ok and msg:find("f64", 1, true), "f32 input: " .. tostring(msg))
    ok, msg = gradcheck(function(a) return a * 2 end, {ml.randn({3}, {dtype = "f64"})})
    t:assert(not ok and msg:find("no input requires grad", 1, true), tostring(msg))
    local x = randn(3)
    ok, msg = gradcheck(function(a) return a * 2 end, {x * 1})
    t:assert(not ok and msg:find("not a leaf", 1, true), tostring(msg))
    ok, msg = gradcheck(function(a) return a:argmax(1) end, {x})
    t:assert(not ok and msg:find("floating-point output", 1, true), tostring(msg))
    ok, msg = gradcheck(function(a) return 3 end, {x})
    t:assert(not ok and msg:find("must return a tensor", 1, true), tostring(msg))
end

function tests.gradcheck_detects_nondeterminism(t)
    local ok, msg = gradcheck(function(a) return F.dropout(a, 0.5, true) end, {randn(20)})
    t:assert(not ok, "unseeded dropout passed")
    t:assert(msg and (msg:find("not deterministic", 1, true) or msg:find("differ", 1, true)), tostring(msg))
end

function tests.gradcheck_leaves_inputs_unchanged(t)
    local x = randn_nc(2, 3)
    local before = x:clone()
    local g = ml.ones(2, 3, {dtype = "f64"})
    x.grad = g
    local ok = gradcheck(function(a) return a:exp() end, {x})
    t:assert(ok)
    t:assertTensorEq(x, before, 0, "values restored")
    t:assertTensorEq(x.grad, g, 0, ".grad restored")
    t:assert(x.requires_grad)
end

function tests.gradcheck_reaches_through_ml_gradcheck(t)
    local ok = ml.gradcheck(function(a) return a:sin() end, {randn(2)})
    t:assert(ok)
end

function tests.dropout_mask_is_consistent(t)
    -- the same seed gives the same mask, and backward uses the forward's mask
    local x = randn(50)
    ml.manual_seed(5)
    local y1 = F.dropout(x, 0.3, true)
    ml.manual_seed(5)
    local y2 = F.dropout(x, 0.3, true)
    t:assertTensorEq(y1, y2, 0, "same seed, same output")
    y1:sum():backward()
    local kept = y1:ne(0):double()
    t:assertTensorEq(x.grad, kept / 0.7, 1e-12, "gradient is the mask scaled by 1/(1-p)")
    local n = kept:sum():item()
    t:assert(n > 20 and n < 50, "about 70% kept: " .. n)
end

return tests
