-- test_geglu.lua — ml.F.geglu, the fused GEGLU of Stable Diffusion's
-- feed-forward blocks: h [..., 2n] -> h[..., :n] * gelu(h[..., n:]).
-- Checked against the unfused expression it replaces (the two narrows, gelu
-- and the product): the same bits in f32 and f64 forward and backward; in
-- bf16/f16 one rounding instead of two, measured; its errors; empty and
-- non-contiguous inputs; one kernel each way (ml.profile).  Finite
-- differences are in test_gradcheck.lua, CPU-vs-GPU parity in
-- tests/gpu/parity_geglu.lua.
local ml = require "moonlit"
local F = ml.F

local T = {}

-- The form GEGLU:forward had before the fused op.
local function unfused(h)
    local n = h:size(-1) // 2
    return h:narrow(-1, 1, n) * ml.gelu(h:narrow(-1, n + 1, n))
end

local function max_abs_diff(a, b)
    if a:numel() == 0 then return 0 end
    return (a:double() - b:double()):abs():max():item()
end

-- Output and input gradient of fn(h) for a copy of h and upstream gradient g.
local function run(fn, h, g)
    local x = h:detach():clone()
    x.requires_grad = true
    local y = fn(x)
    y:backward(g)
    return y:detach(), x.grad
end

function T.forward_and_backward_are_the_unfused_bits_in_f32_and_f64(t)
    ml.manual_seed(1)
    -- n = 40 and an odd n = 13: rows of every length the kernels see
    for _, shape in ipairs {{4, 77, 80}, {3, 7, 26}, {5, 2}} do
        for _, dt in ipairs {"f32", "f64"} do
            local h = (ml.randn(shape) * 3):to(dt)
            local oshape = {table.unpack(shape)}
            oshape[#oshape] = oshape[#oshape] // 2
            local g = ml.randn(oshape):to(dt)
            local y, dh = run(F.geglu, h, g)
            local yu, dhu = run(unfused, h, g)
            local what = dt .. " " .. table.concat(shape, "x")
            t:assertEq(y.dtype, dt, what .. ": output dtype")
            t:assertEq(y:size(), oshape, what .. ": output shape")
            t:assertEq(max_abs_diff(y, yu), 0, what .. ": forward equals hidden * gelu(gate)")
            t:assertEq(max_abs_diff(dh, dhu), 0, what .. ": gradient equals the unfused autograd's")
            t:assertEq(dh.dtype, dt, what .. ": gradient dtype")
        end
    end
end

-- bf16/f16: the CPU computes in f32 and rounds the product once, so the
-- fused result is the f32 result rounded (bit for bit), and never farther
-- from it than the unfused form, which rounds gelu(gate) to the half type
-- first (as PyTorch's unfused GEGLU does).  Stated bounds between the two:
-- bf16 |fused - unfused| <= 2^-6 |ref| (two bf16 units in the last place;
-- measured at most one, 2^-7), f16 <= 2^-10 |ref| + 2^-24 (|a| + 1) (the
-- second term: f16's subnormal spacing 2^-24, which a small gelu(gate) of a
-- strongly negative gate rounds to before it is scaled by a).
function T.half_types_round_once(t)
    ml.manual_seed(5)
    local n = 96
    for _, c in ipairs {{"bf16", 2 ^ -6, 0}, {"f16", 2 ^ -10, 2 ^ -24}} do
        local dt, rtol, sub = c[1], c[2], c[3]
        local h = (ml.randn({16, 77, 2 * n}) * 2):to(dt)
        local fused = F.geglu(h)
        t:assertEq(fused.dtype, dt, dt .. ": output dtype")
        local ref = F.geglu(h:float())                    -- f32, the unfused bits (test above)
        t:assertEq(max_abs_diff(fused, ref:to(dt)), 0, dt .. ": the f32 result rounded once")
        local f, u, r = fused:double(), unfused(h):double(), ref:double()
        local a = h:narrow(-1, 1, n):double()
        local worse = ((f - r):abs() - (u - r):abs()):gt(0):long():sum():item()
        t:assertEq(worse, 0, dt .. ": no element farther from the f32 result than the unfused one")
        local over = ((f - u):abs() - (r:abs() * rtol + (a:abs() + 1) * sub)):max():item()
        t:assert(over <= 0, string.format("%s: |fused - unfused| within the stated bound (over by %g)", dt, over))
        local differ = (f - u):ne(0):long():sum():item()
        t:assert(differ > 0, dt .. ": the two roundings differ somewhere (else this test shows nothing)")
        -- the gradient in the half type: computed in f32 and rounded once too
        local g = ml.randn({16, 77, n}):to(dt)
        local _, dh = run(F.geglu, h, g)
        local _, dh32 = run(F.geglu, h:float(), g:float())
        t:assertEq(dh.dtype, dt, dt .. ": gradient dtype")
        t:assertEq(max_abs_diff(dh, dh32:to(dt)), 0, dt .. ": gradient is the f32 gradient rounded once")
    end
end

function T.bad_input_is_an_error_naming_it(t)
    t:assertError(function() F.geglu(ml.randn({3, 5})) end, "geglu: input of shape [3, 5] must have an even last dim")
    t:assertError(function() F.geglu(ml.randn({2, 7, 1})) end, "[2, 7, 1]")
    t:assertError(function() F.geglu(ml.tensor(1.5)) end, "input of shape [] must have an even last dim")
    t:assertError(function() F.geglu(ml.ones({2, 4}, {dtype = "i64"})) end,
                  "geglu: input must be a float tensor (got int64)")
    t:assertError(function() F.geglu() end, "tensor")
end

function T.empty_tensors(t)
    local h = ml.randn({0, 6}, {requires_grad = true})
    local y = F.geglu(h)
    t:assertEq(y:size(), {0, 3}, "no rows")
    y:sum():backward()
    t:assertEq(h.grad:size(), {0, 6}, "gradient of no rows")
    local w = ml.randn({3, 0}, {requires_grad = true})
    local z = F.geglu(w)
    t:assertEq(z:size(), {3, 0}, "rows of width 0")
    z:sum():backward()
    t:assertEq(w.grad:size(), {3, 0}, "gradient of rows of width 0")
end

function T.non_contiguous_input_and_gradient(t)
    ml.manual_seed(2)
    -- [6, 10] stored transposed: the halves are columns apart
    local base = ml.randn({10, 6})
    local h = base:t()
    t:assert(not h:is_contiguous(), "the input is a transposed view")
    local g = ml.randn({5, 6}):t()                        -- upstream gradient [6, 5], also strided
    local y, dh = run(F.geglu, h, g)
    local yu, dhu = run(unfused, h, g)
    t:assertEq(max_abs_diff(y, yu), 0, "forward of a strided input")
    t:assertEq(max_abs_diff(dh, dhu), 0, "gradient of a strided input and a strided upstream gradient")
    -- a narrowed input: 8 of the 12 columns of each row
    local wide = ml.randn({4, 12})
    local nh = wide:narrow(2, 3, 8)
    t:assertEq(max_abs_diff(F.geglu(nh), unfused(nh)), 0, "forward of a narrowed view")
end

function T.records_a_geglu_node(t)
    local h = ml.randn({2, 4}, {requires_grad = true})
    local y = F.geglu(h)
    t:assert(y.requires_grad, "the output requires grad")
    t:assertEq(y.grad_fn, "geglu", "its node is the registry op")
    local z = ml.no_grad(function() return F.geglu(h) end)
    t:assert(not z.requires_grad, "nothing recorded under no_grad")
end

local function calls(rep)
    local out = {}
    for _, e in ipairs(rep) do out[e.name] = e.calls end
    return out
end

-- The point of the op: one kernel forward, one backward (the unfused form
-- runs 2 forward and 8 backward: gelu's and the product's, then for each
-- narrow a zero fill and a strided copy, and their sum).
function T.one_kernel_each_way(t)
    local h = ml.randn({4, 16, 64}, {requires_grad = true})
    local g = ml.randn({4, 16, 32})
    local y
    local fwd = calls(ml.profile(function() y = F.geglu(h) end))
    t:assertEq(fwd, {ml_geglu_cpu = 1}, "forward kernels")
    local bwd = calls(ml.profile(function() y:backward(g) end))
    t:assertEq(bwd, {ml_geglu_backward_cpu = 1}, "backward kernels")
    h.grad = nil
    local u
    local ufwd = calls(ml.profile(function() u = unfused(h) end))
    local ubwd = calls(ml.profile(function() u:backward(g) end))
    local n_f, n_b = 0, 0
    for _, c in pairs(ufwd) do n_f = n_f + c end
    for _, c in pairs(ubwd) do n_b = n_b + c end
    t:assert(n_f == 2 and n_b == 8, string.format("the unfused form: %d forward, %d backward kernels", n_f, n_b))
end

-- The UNet's feed-forward (in BasicTransformerBlock) goes through the fused
-- op: its ff runs geglu's kernel, and equals the unfused form on its proj.
function T.feed_forward_block_uses_it(t)
    ml.manual_seed(3)
    local blocks = require "moonlit.models.blocks"
    local tb = blocks.BasicTransformerBlock {heads = 2, dim_head = 4, cross_attention_dim = 8}
    local x = ml.randn({2, 5, 8})
    local y
    local c = calls(ml.profile(function() y = tb.ff(x) end))
    t:assertEq(c.ml_geglu_cpu, 1, "the feed-forward runs the fused kernel once")
    t:assert(c.ml_unary_cpu == nil, "and no separate gelu")
    local geglu, out = tb.ff.net[1], tb.ff.net[3]
    t:assertEq(max_abs_diff(y, out(unfused(geglu.proj(x)))), 0, "same result as the unfused form")
end

return T
