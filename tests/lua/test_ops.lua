-- test_ops.lua — forward values of every op family against values computed
-- by hand or by plain Lua loops on small inputs: elementwise ops with
-- broadcasting, comparisons, where, reductions (1-based dims, keepdim,
-- 1-based max indices), matmul shapes, linear, conv2d (NHWC), norms,
-- softmax, attention (BSHD), indexing ops, losses, dropout, in-place ops.
local ml = require "moonlit"
local util = require "testutil"
local F = ml.F

local tests = {}

local error_of, has = util.error_of, util.has

-- Flatten a nested totable() result.
local function flat(v, out)
    out = out or {}
    if type(v) ~= "table" then out[#out + 1] = v return out end
    for _, x in ipairs(v) do flat(x, out) end
    return out
end

-- Every element of tensor x within tol of the list (or nested list) want.
local function near_list(t, x, want, tol, msg)
    local got, exp = flat(x:totable()), flat(want)
    if not t:assertEq(#got, #exp, (msg or "") .. " element count") then return end
    for i = 1, #got do
        if not t:assertNear(got[i], exp[i], tol or 1e-6, string.format("%s element %d", msg or "", i)) then return end
    end
end

local function sigmoid(x) return 1 / (1 + math.exp(-x)) end

-- erf by its Taylor series: exact to double precision for |x| <= 3.
local function erf(x)
    local sum, term, n = 0, x, 0
    repeat
        local add = term / (2 * n + 1)
        sum = sum + add
        n = n + 1
        term = -term * x * x / n
    until math.abs(add) < 1e-17 or n > 200
    return 2 / math.sqrt(math.pi) * sum
end

local function map(list, f)
    local out = {}
    for i, v in ipairs(list) do out[i] = f(v) end
    return out
end

-- ---- elementwise ---------------------------------------------------------------

function tests.binary_arithmetic(t)
    local a = ml.tensor({{1, 2, 3}, {4, 5, 6}})
    local b = ml.tensor({10, 20, 30})
    near_list(t, a + b, {{11, 22, 33}, {14, 25, 36}}, 0, "add, broadcast")
    near_list(t, a - b, {{-9, -18, -27}, {-6, -15, -24}}, 0, "sub")
    near_list(t, a * b, {{10, 40, 90}, {40, 100, 180}}, 0, "mul")
    near_list(t, b / a, {{10, 10, 10}, {2.5, 4, 5}}, 1e-6, "div")
    near_list(t, a ^ ml.tensor({2}), {{1, 4, 9}, {16, 25, 36}}, 1e-5, "pow tensor")
    near_list(t, a:maximum(ml.tensor({{3}, {5}})), {{3, 3, 3}, {5, 5, 6}}, 0, "maximum [2,3] vs [2,1]")
    near_list(t, a:minimum(ml.tensor({{3}, {5}})), {{1, 2, 3}, {4, 5, 5}}, 0, "minimum")
    near_list(t, ml.add(a, 1), {{2, 3, 4}, {5, 6, 7}}, 0, "ml.add with a number")
    near_list(t, a:sub(b), (a - b):totable(), 0, "method form")
end

function tests.scalar_operands_on_either_side(t)
    local x = ml.tensor({1, 2, 4})
    near_list(t, x + 1, {2, 3, 5}, 0)
    near_list(t, 1 + x, {2, 3, 5}, 0)
    near_list(t, x - 1, {0, 1, 3}, 0)
    near_list(t, 1 - x, {0, -1, -3}, 0)
    near_list(t, x * 3, {3, 6, 12}, 0)
    near_list(t, 3 * x, {3, 6, 12}, 0)
    near_list(t, x / 2, {0.5, 1, 2}, 0)
    near_list(t, 2 / x, {2, 1, 0.5}, 0)
    near_list(t, x ^ 2, {1, 4, 16}, 1e-6)
    near_list(t, -x, {-1, -2, -4}, 0)
    t:assert(has(error_of(ml.add, 1, 2), "at least one tensor"))
end

function tests.broadcast_shapes(t)
    t:assertEq((ml.ones(2, 1, 3) + ml.ones(4, 1)):size(), {2, 4, 3})
    t:assertEq((ml.ones(3) * ml.ones(2, 3)):size(), {2, 3})
    t:assertEq((ml.tensor(2) * ml.ones(2, 3)):size(), {2, 3}, "0-dim broadcasts")
    local e = error_of(function() return ml.ones(2, 3) + ml.ones(4) end)
    t:assert(has(e, "[2, 3]") and has(e, "[4]"), tostring(e))
end

function tests.dtype_promotion(t)
    local i = ml.tensor({1, 2, 3}, {dtype = "i64"})
    t:assertEq((i + 1).dtype, "i64", "int + integer stays int")
    t:assertEq((i * 2.5).dtype, "f32", "int * float number is float")
    t:assertEq((i + ml.ones(3)).dtype, "f32", "int + f32 tensor")
    t:assertEq((ml.ones(2, {dtype = "f64"}) + ml.ones(2)).dtype, "f64", "f64 wins over f32")
    t:assertEq(i:sum():item(), 6)
end

function tests.unary_functions(t)
    local xs = {-2.5, -1, -0.3, 0, 0.4, 1, 2.7}
    local x = ml.tensor(xs, {dtype = "f64"})
    local cases = {
        neg = function(v) return -v end,
        exp = math.exp,
        abs = math.abs,
        sin = math.sin,
        cos = math.cos,
        square = function(v) return v * v end,
        sigmoid = sigmoid,
        tanh = function(v) return (math.exp(v) - math.exp(-v)) / (math.exp(v) + math.exp(-v)) end,
        relu = function(v) return math.max(v, 0) end,
        silu = function(v) return v * sigmoid(v) end,
        gelu = function(v) return 0.5 * v * (1 + erf(v / math.sqrt(2))) end,
        gelu_tanh = function(v)
            local u = math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3)
            return 0.5 * v * (1 + (math.exp(u) - math.exp(-u)) / (math.exp(u) + math.exp(-u)))
        end,
        quick_gelu = function(v) return v * sigmoid(1.702 * v) end,
        floor = math.floor,
        sign = function(v) return v > 0 and 1 or v < 0 and -1 or 0 end,
    }
    for name, f in pairs(cases) do
        near_list(t, ml[name](x), map(xs, f), 1e-12, name)
        near_list(t, ml[name](x:float()), map(xs, f), 1e-6, name .. " f32")
    end
    local p = {0.25, 1, 4, 9}
    local pt = ml.tensor(p, {dtype = "f64"})
    near_list(t, pt:sqrt(), {0.5, 1, 2, 3}, 1e-12, "sqrt")
    near_list(t, pt:rsqrt(), {2, 1, 0.5, 1 / 3}, 1e-12, "rsqrt")
    near_list(t, pt:log(), map(p, math.log), 1e-12, "log")
    near_list(t, F.gelu(x, {approximate = "tanh"}), ml.gelu_tanh(x):totable(), 0, "F.gelu approximate")
    near_list(t, ml.tensor({0.5, 1.5, 2.5, -1.5, 2.4}):round(), {0, 2, 2, -2, 2}, 0, "round half to even")
end

function tests.clamp(t)
    local x = ml.tensor({-2, -0.5, 0, 0.5, 2})
    near_list(t, x:clamp(-1, 1), {-1, -0.5, 0, 0.5, 1}, 0)
    near_list(t, x:clamp(0), {0, 0, 0, 0.5, 2}, 0, "lower only")
    near_list(t, x:clamp(nil, 0), {-2, -0.5, 0, 0, 0}, 0, "upper only")
    near_list(t, F.clamp(x, -0.5, 0.5), {-0.5, -0.5, 0, 0.5, 0.5}, 0)
end

function tests.comparisons(t)
    local a = ml.tensor({1, 2, 3})
    local b = ml.tensor({3, 2, 1})
    t:assertEq(a:eq(b):totable(), {false, true, false})
    t:assertEq(a:ne(b):totable(), {true, false, true})
    t:assertEq(a:lt(b):totable(), {true, false, false})
    t:assertEq(a:le(b):totable(), {true, true, false})
    t:assertEq(a:gt(b):totable(), {false, false, true})
    t:assertEq(a:ge(2):totable(), {false, true, true}, "with a number")
    t:assertEq(a:lt(2).dtype, "bool")
    t:assertEq(a:eq(ml.tensor({{1}, {3}})):totable(), {{true, false, false}, {false, false, true}}, "broadcast")
    t:assertEq(a:gt(1):float():sum():item(), 2, "bool converts to counts")
end

function tests.where(t)
    local c = ml.tensor({true, false, true}, {dtype = "bool"})
    near_list(t, ml.where(c, ml.tensor({1, 2, 3}), ml.tensor({-1, -2, -3})), {1, -2, 3}, 0)
    near_list(t, ml.where(c, ml.tensor({1, 2, 3}), 0), {1, 0, 3}, 0, "number branch")
    near_list(t, ml.where(c, 5, ml.tensor({1, 2, 3})), {5, 2, 5}, 0, "number first branch")
    near_list(t, F.where(ml.tensor({{true}, {false}}, {dtype = "bool"}), ml.tensor({1, 2}), ml.tensor({7})),
              {{1, 2}, {7, 7}}, 0, "broadcast")
    local x = ml.tensor({-1, 2, -3})
    near_list(t, ml.where(x:gt(0), x, x * 0.1), {-0.1, 2, -0.3}, 1e-7, "leaky relu")
end

-- ---- reductions ----------------------------------------------------------------

function tests.sum_mean_with_dims(t)
    local x = ml.tensor({{1, 2, 3}, {4, 5, 6}})
    t:assertEq(x:sum():item(), 21)
    t:assertEq(x:sum():dim(), 0, "full reduction is 0-dim")
    near_list(t, x:sum(1), {5, 7, 9}, 0, "dim 1")
    near_list(t, x:sum(2), {6, 15}, 0, "dim 2")
    near_list(t, x:sum(-1), {6, 15}, 0, "dim -1")
    t:assertEq(x:sum(2, true):size(), {2, 1}, "keepdim")
    t:assertEq(x:sum({1, 2}):item(), 21, "list of dims")
    t:assertEq(x:sum({1, 2}, true):size(), {1, 1})
    near_list(t, x:mean(1), {2.5, 3.5, 4.5}, 1e-6)
    near_list(t, x:mean(2, true), {{2}, {5}}, 1e-6)
    t:assertNear(x:mean():item(), 3.5, 1e-6)
    local y = ml.arange(24):view(2, 3, 4):float()
    near_list(t, y:sum({1, 3}), {0 + 1 + 2 + 3 + 12 + 13 + 14 + 15, 4 + 5 + 6 + 7 + 16 + 17 + 18 + 19,
                                 8 + 9 + 10 + 11 + 20 + 21 + 22 + 23}, 0, "dims 1 and 3")
end

function tests.var_and_norm(t)
    local x = ml.tensor({{1, 2, 3, 4}, {2, 4, 6, 8}})
    near_list(t, x:var(2), {5 / 3, 20 / 3}, 1e-5, "unbiased by default")
    near_list(t, x:var(2, {correction = 0}), {1.25, 5}, 1e-5, "population")
    t:assertEq(x:var(2, {keepdim = true}):size(), {2, 1})
    t:assertNear(x:var():item(), 37.5 / 7, 1e-5, "all elements")
    t:assertNear(ml.tensor({3, 4}):norm():item(), 5, 1e-6)
    t:assertNear(ml.tensor({3, -4}):norm(1):item(), 7, 1e-6)
    near_list(t, x:norm(2, 2), {math.sqrt(30), math.sqrt(120)}, 1e-5)
    t:assertEq(x:norm(2, 1, true):size(), {1, 4})
end

function tests.max_returns_one_based_indices(t)
    local x = ml.tensor({{1, 5, 2}, {7, 0, 3}})
    t:assertEq(x:max():item(), 7, "max of all")
    local v, i = x:max(2)
    near_list(t, v, {5, 7}, 0)
    t:assertEq(i:totable(), {2, 1}, "indices are 1-based")
    t:assertEq(i.dtype, "i64")
    v, i = x:max(1, true)
    t:assertEq(v:size(), {1, 3})
    t:assertEq(i:totable(), {{2, 1, 2}})
    t:assertEq(x:argmax(2):totable(), {2, 1})
    t:assertEq(x:argmax(-1, true):size(), {2, 1})
    -- the index selects the maximum back out
    local w = ml.randn(4, 6)
    local mv, mi = w:max(2, true)
    t:assertTensorEq(F.gather(w, 2, mi), mv, 0)
end

-- ---- matmul / linear -----------------------------------------------------------

function tests.matmul_values_and_shapes(t)
    local a = ml.tensor({{1, 2}, {3, 4}, {5, 6}})
    local b = ml.tensor({{1, 0, 2}, {0, 1, 3}})
    near_list(t, a:matmul(b), {{1, 2, 8}, {3, 4, 18}, {5, 6, 28}}, 1e-6, "[3,2] @ [2,3]")
    near_list(t, ml.matmul(ml.tensor({1, 2}), b), {1, 2, 8}, 1e-6, "1-D @ 2-D")
    near_list(t, a:matmul(ml.tensor({1, 1})), {3, 7, 11}, 1e-6, "2-D @ 1-D")
    t:assertEq(ml.tensor({1, 2, 3}):matmul(ml.tensor({4, 5, 6})):item(), 32, "1-D @ 1-D is a 0-dim dot")
    t:assertEq(ml.ones(2, 1, 3, 4):matmul(ml.ones(5, 4, 2)):size(), {2, 5, 3, 2}, "batch dims broadcast")
    t:assertEq(ml.ones(7, 3, 4):matmul(ml.ones(4, 2)):size(), {7, 3, 2})
    t:assertEq(ml.ones(4):matmul(ml.ones(2, 4, 3)):size(), {2, 3})
    t:assertEq(ml.ones(2, 3, 4):matmul(ml.ones(4)):size(), {2, 3})
    -- batched values: each batch is its own product
    local x = ml.randn(3, 2, 4)
    local y = ml.randn(3, 4, 5)
    local z = x:matmul(y)
    for i = 1, 3 do t:assertTensorEq(z[i], x[i]:matmul(y[i]), 1e-5, "batch " .. i) end
    t:assertTensorEq(x:matmul(y[1]), x:matmul(y[1]:expand(3, 4, 5)), 1e-5, "broadcast equals expand")
    local e = error_of(a.matmul, a, a)
    t:assert(has(e, "[3, 2]"), tostring(e))
    t:assert(has(error_of(ml.ones(2, 3, 4).matmul, ml.ones(2, 3, 4), ml.ones(3, 4, 2)), "[2, 3, 4]"), "batch mismatch")
end

function tests.linear(t)
    local x = ml.tensor({{1, 2}, {3, 4}})
    local w = ml.tensor({{1, 0}, {0, 1}, {1, 1}})
    local b = ml.tensor({0.5, -0.5, 0})
    near_list(t, F.linear(x, w, b), {{1.5, 1.5, 3}, {3.5, 3.5, 7}}, 1e-6, "x W^T + b")
    near_list(t, F.linear(x, w), {{1, 2, 3}, {3, 4, 7}}, 1e-6, "no bias")
    t:assertEq(F.linear(ml.ones(2, 5, 2), w, b):size(), {2, 5, 3}, "leading dims kept")
    local xr = ml.randn(4, 3)
    local wr = ml.randn(2, 3)
    t:assertTensorEq(F.linear(xr, wr), xr:matmul(wr:t()), 1e-5)
end

-- ---- conv2d (NHWC) -------------------------------------------------------------

-- Direct convolution in plain Lua: x [N,H,W,C], w [O,kh,kw,C] as nested tables.
local function naive_conv(x, w, b, stride, pt, pb, pl, pr)
    local N, H, W, C = #x, #x[1], #x[1][1], #x[1][1][1]
    local O, KH, KW = #w, #w[1], #w[1][1]
    local Ho = (H + pt + pb - KH) // stride + 1
    local Wo = (W + pl + pr - KW) // stride + 1
    local out = {}
    for n = 1, N do
        out[n] = {}
        for i = 1, Ho do
            out[n][i] = {}
            for j = 1, Wo do
                out[n][i][j] = {}
                for o = 1, O do
                    local s = b and b[o] or 0
                    for ki = 1, KH do
                        for kj = 1, KW do
                            local yi = (i - 1) * stride + ki - pt
                            local xj = (j - 1) * stride + kj - pl
                            if yi >= 1 and yi <= H and xj >= 1 and xj <= W then
                                for c = 1, C do s = s + x[n][yi][xj][c] * w[o][ki][kj][c] end
                            end
                        end
                    end
                    out[n][i][j][o] = s
                end
            end
        end
    end
    return out
end

function tests.conv2d_matches_a_naive_loop(t)
    ml.manual_seed(3)
    local x = ml.randn({2, 5, 6, 3}, {dtype = "f64"})
    local w = ml.randn({4, 3, 3, 3}, {dtype = "f64"})
    local b = ml.randn({4}, {dtype = "f64"})
    local xt, wt, bt = x:totable(), w:totable(), b:totable()
    local y = F.conv2d(x, w, b, {padding = 1})
    t:assertEq(y:size(), {2, 5, 6, 4}, "same padding keeps H, W")
    near_list(t, y, naive_conv(xt, wt, bt, 1, 1, 1, 1, 1), 1e-10, "stride 1 pad 1")
    y = F.conv2d(x, w, nil, {stride = 2})
    t:assertEq(y:size(), {2, 2, 2, 4})
    near_list(t, y, naive_conv(xt, wt, nil, 2, 0, 0, 0, 0), 1e-10, "stride 2 no pad, no bias")
    y = F.conv2d(x, w, b, {stride = 2, padding = {0, 1, 0, 1}})
    near_list(t, y, naive_conv(xt, wt, bt, 2, 0, 1, 0, 1), 1e-10, "asymmetric {top, bottom, left, right}")
    local y32 = F.conv2d(x:float(), w:float(), b:float(), {padding = 1})
    near_list(t, y32, naive_conv(xt, wt, bt, 1, 1, 1, 1, 1), 1e-4, "f32")
    t:assert(has(error_of(F.conv2d, x, w, b, {padding = {1, 2, 3}}), "{top, bottom, left, right}"),
             "a padding list of 3 is refused")
    t:assert(has(error_of(F.conv2d, x, w, b, {stride = {1, 2, 3}}), "option 'stride'"))
    local e = error_of(F.conv2d, ml.ones(1, 4, 4, 3), ml.ones(2, 3, 3, 2))
    t:assert(has(e, "[1, 4, 4, 3]") and has(e, "[2, 3, 3, 2]"), tostring(e))
end

-- A 1x1 convolution with stride 1 and no padding runs as a GEMM (the linear
-- kernels): same values as the direct loop, gradients to x, w and b, the
-- conv kernel not called; strided or padded 1x1 convolutions stay convolutions.
function tests.conv2d_1x1_runs_as_a_gemm(t)
    ml.manual_seed(4)
    local x = ml.randn({2, 3, 4, 5}, {dtype = "f64", requires_grad = true})
    local w = ml.randn({6, 1, 1, 5}, {dtype = "f64", requires_grad = true})
    local b = ml.randn({6}, {dtype = "f64", requires_grad = true})
    local y
    local rep = ml.profile(function() y = F.conv2d(x, w, b) end)
    local kernels = {}
    for _, e in ipairs(rep) do kernels[e.name] = e.calls end
    t:assertEq(kernels["ml_linear_forward_cpu"], 1, "one GEMM")
    t:assert(kernels["ml_conv2d_forward_cpu"] == nil, "no convolution kernel")
    t:assertEq(y:size(), {2, 3, 4, 6})
    near_list(t, y, naive_conv(x:totable(), w:totable(), b:totable(), 1, 0, 0, 0, 0), 1e-12, "values")
    -- gradients against the same map written with matmul
    local g = ml.randn({2, 3, 4, 6}, {dtype = "f64"})
    y:backward(g)
    local gx, gw, gb = x.grad:clone(), w.grad:clone(), b.grad:clone()
    local x2 = x:detach():clone(); x2.requires_grad = true
    local w2 = w:detach():clone(); w2.requires_grad = true
    local b2 = b:detach():clone(); b2.requires_grad = true
    local ref = x2:view(24, 5):matmul(w2:view(6, 5):t()) + b2
    ref:backward(g:view(24, 6))
    t:assert((gx - x2.grad):abs():max():item() < 1e-12, "dx")
    t:assert((gw - w2.grad):abs():max():item() < 1e-12, "dw keeps the [O, 1, 1, C] shape")
    t:assertEq(gw:size(), {6, 1, 1, 5})
    t:assert((gb - b2.grad):abs():max():item() < 1e-12, "db")
    -- not a plain GEMM: the convolution kernel still runs
    rep = ml.profile(function() F.conv2d(x, w, b, {stride = 2}); F.conv2d(x, w, nil, {padding = 1}) end)
    kernels = {}
    for _, e in ipairs(rep) do kernels[e.name] = e.calls end
    t:assertEq(kernels["ml_conv2d_forward_cpu"], 2, "strided and padded 1x1 stay convolutions")
    near_list(t, F.conv2d(x, w, b, {stride = 2}), naive_conv(x:totable(), w:totable(), b:totable(), 2, 0, 0, 0, 0),
              1e-12, "strided 1x1")
    -- a non-contiguous input is fine
    local xt = ml.randn({2, 5, 4, 3}, {dtype = "f64"}):permute(1, 4, 3, 2)
    near_list(t, F.conv2d(xt, w:detach(), nil), naive_conv(xt:totable(), w:totable(), nil, 1, 0, 0, 0, 0), 1e-12,
              "permuted input")
end

-- ---- norms -----------------------------------------------------------------------

function tests.group_norm_matches_manual_statistics(t)
    ml.manual_seed(4)
    local N, H, W, C, G = 2, 3, 3, 6, 3
    local x = ml.randn({N, H, W, C}, {dtype = "f64"}) * 2 + 1
    local w = ml.randn({C}, {dtype = "f64"})
    local b = ml.randn({C}, {dtype = "f64"})
    local eps = 1e-5
    -- reference: view as [N, H*W, G, C/G], statistics over dims 2 and 4
    local xg = x:view(N, H * W, G, C // G)
    local mean = xg:mean({2, 4}, true)
    local var = xg:var({2, 4}, {correction = 0, keepdim = true})
    local ref = ((xg - mean) / (var + eps):sqrt()):view(N, H, W, C) * w + b
    t:assertTensorEq(F.group_norm(x, G, w, b, eps), ref, 1e-10, "affine")
    t:assertTensorEq(F.group_norm(x, G, w, b, eps, {silu = true}), ref:silu(), 1e-10, "fused silu")
    local plain = F.group_norm(x, G)
    local m = plain:view(N, H * W, G, C // G):mean({2, 4})
    t:assertTensorEq(m, ml.zeros(N, G, {dtype = "f64"}), 1e-10, "normalised groups have mean 0")
    local gn = ml.nn.GroupNorm(G, C)
    t:assertTensorEq(gn(x:float()), plain:float(), 1e-4, "nn.GroupNorm")
    t:assert(has(error_of(F.group_norm, ml.ones(1, 2, 2, 6), 4), "4 groups"))
end

function tests.layer_norm_matches_manual_statistics(t)
    local x = ml.randn({3, 5}, {dtype = "f64"})
    local w = ml.randn({5}, {dtype = "f64"})
    local b = ml.randn({5}, {dtype = "f64"})
    local mean = x:mean(2, true)
    local var = x:var(2, {correction = 0, keepdim = true})
    local ref = (x - mean) / (var + 1e-5):sqrt()
    t:assertTensorEq(F.layer_norm(x), ref, 1e-10)
    t:assertTensorEq(F.layer_norm(x, w, b), ref * w + b, 1e-10)
    t:assertTensorEq(F.layer_norm(x, nil, nil, 0.1), (x - mean) / (var + 0.1):sqrt(), 1e-10, "eps")
    local e = error_of(F.layer_norm, ml.ones(2, 3), ml.ones(4))
    t:assert(has(e, "[4]") and has(e, "[2, 3]"), tostring(e))
end

-- ---- softmax, attention ----------------------------------------------------------

function tests.softmax(t)
    local x = ml.randn(3, 7) * 3
    t:assertTensorEq(F.softmax(x):sum(2), ml.ones(3), 1e-6, "rows sum to 1")
    t:assertTensorEq(F.softmax(x, 1):sum(1), ml.ones(7), 1e-6, "dim 1")
    local s = F.softmax(ml.tensor({1, 2, 3}, {dtype = "f64"}))
    local z = math.exp(1) + math.exp(2) + math.exp(3)
    near_list(t, s, {math.exp(1) / z, math.exp(2) / z, math.exp(3) / z}, 1e-12)
    near_list(t, F.softmax(ml.tensor({1000, 1000})), {0.5, 0.5}, 1e-6, "large inputs stay finite")
    t:assertTensorEq(F.log_softmax(x), F.softmax(x):log(), 1e-5, "log_softmax")
    near_list(t, F.log_softmax(ml.tensor({-1000, 0})), {-1000, 0}, 1e-3, "log_softmax stable")
    t:assertTensorEq(x:softmax(), F.softmax(x, -1), 0, "method, default last dim")
end

-- softmax(Q K^T * scale [+ causal mask]) V, head by head, in BSHD.
local function reference_attention(q, k, v, causal, scale)
    local B, Sq, H, D = table.unpack(q:size())
    local Sk = k:size(2)
    scale = scale or 1 / math.sqrt(D)
    local out = ml.zeros(B, Sq, H, D, {dtype = q.dtype})
    for bi = 1, B do
        for h = 1, H do
            local qh = q[bi]:select(2, h)       -- [Sq, D]
            local kh = k[bi]:select(2, h)       -- [Sk, D]
            local vh = v[bi]:select(2, h)
            local s = qh:matmul(kh:t()) * scale -- [Sq, Sk]
            if causal then
                local mask = ml.arange(Sk):view(1, Sk):gt(ml.arange(Sq):view(Sq, 1))
                s = ml.where(mask, -math.huge, s)
            end
            out[bi]:select(2, h):copy_(F.softmax(s, 2):matmul(vh))
        end
    end
    return out
end

function tests.attention_matches_explicit_softmax(t)
    ml.manual_seed(5)
    local sdpa = F.scaled_dot_product_attention
    local q = ml.randn({2, 3, 2, 4}, {dtype = "f64"})
    local k = ml.randn({2, 5, 2, 4}, {dtype = "f64"})
    local v = ml.randn({2, 5, 2, 4}, {dtype = "f64"})
    local y = sdpa(q, k, v)
    t:assertEq(y:size(), {2, 3, 2, 4}, "BSHD out, Sq rows")
    t:assertTensorEq(y, reference_attention(q, k, v), 1e-10, "not causal")
    t:assertTensorEq(sdpa(q, k, v, {scale = 0.3}), reference_attention(q, k, v, false, 0.3), 1e-10, "scale")
    local kc, vc = k:narrow(2, 1, 3), v:narrow(2, 1, 3)
    t:assertTensorEq(sdpa(q, kc, vc, {causal = true}), reference_attention(q, kc, vc, true), 1e-10, "causal")
    local y32 = sdpa(q:float(), k:float(), v:float())
    t:assertTensorEq(y32, y, 1e-5, "f32")
    -- the first query of a causal attention sees only the first key
    t:assertTensorEq(sdpa(q, kc, vc, {causal = true}):select(2, 1), vc:select(2, 1), 1e-12)
end

-- ---- indexing ----------------------------------------------------------------------

function tests.embedding(t)
    local w = ml.tensor({{0, 0}, {1, 1}, {2, 4}})
    near_list(t, F.embedding(w, ml.tensor({2, 0, 2}, {dtype = "i64"})), {{2, 4}, {0, 0}, {2, 4}}, 0,
              "ids are 0-based token ids")
    t:assertEq(F.embedding(w, ml.tensor({{0, 1}}, {dtype = "i32"})):size(), {1, 2, 2})
    local e = error_of(F.embedding, w, ml.tensor({1, 3}, {dtype = "i64"}))
    t:assert(has(e, "out of range") and has(e, "3"), "id 3 of a vocabulary of 3: " .. tostring(e))
    t:assert(has(error_of(F.embedding, w, ml.tensor({-1}, {dtype = "i64"})), "out of range"), "negative id")
    local m = ml.nn.Embedding(3, 2)
    t:assertTensorEq(m(ml.tensor({1}, {dtype = "i64"})), m.weight[2]:view(1, 2), 0, "nn.Embedding")
end

function tests.cat_stack(t)
    local a = ml.tensor({{1, 2}})
    local b = ml.tensor({{3, 4}, {5, 6}})
    near_list(t, ml.cat({a, b}, 1), {{1, 2}, {3, 4}, {5, 6}}, 0, "dim 1")
    near_list(t, ml.cat({b, b:narrow(2, 1, 1)}, 2), {{3, 4, 3}, {5, 6, 5}}, 0, "dim 2")
    near_list(t, ml.cat({a, b}), ml.cat({a, b}, 1):totable(), 0, "default dim 1")
    near_list(t, ml.stack({a[1], b[1]}, 1), {{1, 2}, {3, 4}}, 0)
    near_list(t, ml.stack({a[1], b[1]}, 2), {{1, 3}, {2, 4}}, 0)
    t:assertEq(ml.stack({ml.ones(2, 3), ml.ones(2, 3)}, -1):size(), {2, 3, 2})
    t:assert(has(error_of(ml.cat, {}), "non-empty"))
    t:assert(has(error_of(ml.cat, {a, 5}), "element 2 is not a live tensor"))
end

function tests.gather_index_select_one_based(t)
    local x = ml.tensor({{1, 2, 3}, {4, 5, 6}})
    near_list(t, F.gather(x, 2, ml.tensor({{3, 1}, {2, 2}}, {dtype = "i64"})), {{3, 1}, {5, 5}}, 0, "gather dim 2")
    near_list(t, F.gather(x, 1, ml.tensor({{2, 1, 2}}, {dtype = "i64"})), {{4, 2, 6}}, 0, "gather dim 1")
    near_list(t, F.index_select(x, 2, ml.tensor({3, 1}, {dtype = "i64"})), {{3, 1}, {6, 4}}, 0)
    near_list(t, F.index_select(x, 1, ml.tensor({2, 2}, {dtype = "i64"})), {{4, 5, 6}, {4, 5, 6}}, 0)
    t:assert(error_of(F.index_select, x, 1, ml.tensor({3}, {dtype = "i64"})) ~= nil, "index past the end")
    t:assert(error_of(F.gather, x, 2, ml.tensor({{0}}, {dtype = "i64"})) ~= nil, "index 0")
end

function tests.upsample_nearest(t)
    local x = ml.tensor({{{{1}, {2}}, {{3}, {4}}}})  -- [1, 2, 2, 1] NHWC
    local y = F.upsample_nearest2d(x, 2)
    t:assertEq(y:size(), {1, 4, 4, 1})
    near_list(t, y:view(4, 4), {{1, 1, 2, 2}, {1, 1, 2, 2}, {3, 3, 4, 4}, {3, 3, 4, 4}}, 0)
    t:assertTensorEq(F.interpolate(x, {scale_factor = 2}), y, 0)
    t:assertEq(F.upsample_nearest2d(ml.ones(2, 3, 1, 5), 3):size(), {2, 9, 3, 5}, "channels untouched")
end

-- ---- losses, dropout --------------------------------------------------------------

function tests.mse_loss(t)
    local a = ml.tensor({1, 2, 3})
    local b = ml.tensor({1, 0, 6})
    t:assertNear(F.mse_loss(a, b):item(), 13 / 3, 1e-6, "mean")
    t:assertNear(F.mse_loss(a, b, "sum"):item(), 13, 1e-6, "sum")
    near_list(t, F.mse_loss(a, b, "none"), {0, 4, 9}, 0, "none")
    t:assert(has(error_of(F.mse_loss, a, b, "max"), "reduction"))
end

function tests.dropout(t)
    local x = ml.ones(1000)
    t:assertTensorEq(F.dropout(x, 0), x, 0, "p = 0")
    t:assertTensorEq(F.dropout(x, 0.5, false), x, 0, "not training")
    t:assertTensorEq(F.dropout(x, 1), ml.zeros(1000), 0, "p = 1")
    ml.manual_seed(11)
    local y = F.dropout(x, 0.25)
    local kept = y:ne(0):float():sum():item()
    t:assert(kept > 700 and kept < 800, "about 75% kept: " .. kept)
    t:assertTensorEq(y:maximum(ml.tensor(0)), y, 0)
    near_list(t, ml.where(y:ne(0), y, 1 / 0.75), ml.full({1000}, 1 / 0.75):totable(), 1e-6,
              "kept values scaled by 1/(1-p)")
    t:assert(has(error_of(F.dropout, x, 1.5), "[0, 1]"))
    local d = ml.nn.Dropout(0.5)
    d:eval()
    t:assertTensorEq(d(x), x, 0, "nn.Dropout in eval mode")
end

-- ---- in-place ------------------------------------------------------------------------

function tests.in_place_ops(t)
    local x = ml.tensor({1, 2, 3})
    t:assert(rawequal(x:add_(1), x), "returns self")
    near_list(t, x, {2, 3, 4}, 0, "add_ number")
    x:add_(ml.tensor({1, 1, 1}), 2)
    near_list(t, x, {4, 5, 6}, 0, "add_ tensor with alpha")
    x:sub_(ml.tensor({1}))
    near_list(t, x, {3, 4, 5}, 0, "sub_ broadcast")
    x:sub_(1)
    x:mul_(2)
    near_list(t, x, {4, 6, 8}, 0, "mul_")
    x:mul_(ml.tensor({0.5, 1, 2}))
    near_list(t, x, {2, 6, 16}, 0, "mul_ tensor")
    x:div_(2)
    near_list(t, x, {1, 3, 8}, 0, "div_")
    -- a tensor divisor, broadcast to the destination's shape; integer divisors are cast
    local m = ml.tensor({{2, 4, 6}, {8, 10, 12}})
    t:assert(rawequal(m:div_(ml.tensor({3, 4, 6})), m), "div_ tensor returns self")
    near_list(t, m, {{2 / 3, 1, 1}, {8 / 3, 2.5, 2}}, 1e-7, "div_ tensor")
    m:div_(ml.tensor({{2}, {4}}))
    near_list(t, m, {{1 / 3, 0.5, 0.5}, {2 / 3, 0.625, 0.5}}, 1e-7, "div_ column broadcast")
    m:div_(ml.tensor({1, 2, 0}, {dtype = "i64"}))
    t:assertEq(m:totable()[1][3], math.huge, "x / 0 = inf")
    near_list(t, m:narrow(2, 1, 2), {{1 / 3, 0.25}, {2 / 3, 0.3125}}, 1e-7, "div_ by an int tensor")
    local h = ml.ones(3):bf16()
    h:div_(ml.tensor({1, 2, 4}))
    t:assertEq(h.dtype, "bf16")
    near_list(t, h:float(), {1, 0.5, 0.25}, 0, "div_ into bf16")
    x:clamp_(2, 5)
    near_list(t, x, {2, 3, 5}, 0, "clamp_")
    local v = ml.zeros(2, 3)
    v:narrow(2, 2, 1):add_(7)
    near_list(t, v, {{0, 7, 0}, {0, 7, 0}}, 0, "in place through a view")
    local u = ml.zeros(20000)
    ml.manual_seed(1)
    u:uniform_(-2, 2)
    t:assert(-(-u):max():item() >= -2 and u:max():item() < 2, "uniform_ range")
    u:normal_(3, 0.5)
    t:assertNear(u:mean():item(), 3, 0.02, "normal_ mean")
    t:assertNear(u:var():item(), 0.25, 0.02, "normal_ variance")
end

return tests
