-- test_parity.lua — CPU vs GPU parity of every op the registry marks as
-- having a CUDA kernel, plus the random streams, GPU-only dtypes and the
-- caching allocator.  Needs a GPU; run from the repository root:
--
--     build/moonlit tests/gpu/test_parity.lua [filter]
--
-- (filter: a Lua pattern; only cases whose "op/name" matches run.)
--
-- What it checks:
--   ops       For each case, inputs are drawn on the CPU from one seed and
--             placed on each device (non-contiguous and broadcast views are
--             made on the device itself, so the GPU kernels see real
--             strides).  The op runs in f32 on both; the output and, for
--             differentiable ops, the gradient of every input (upstream
--             gradient random, the same on both) must agree within
--             |gpu - cpu| <= atol + rtol * |cpu| (default 1e-5 each).
--             Integer and bool outputs must be equal.  Every op with
--             cuda = 1 in moonlit.core.op_registry() must have a case.
--   rng       randn / rand / randint with one seed give the same values on
--             both devices (rand, randint: bit for bit; randn: bit for bit
--             except, rarely, the last bit where CUDA's and glibc's log/cos
--             differ), and advance the generator equally.
--   dtypes    bf16 / f16 kernels (GPU only) against the CPU's f32 result
--             rounded to the same dtype, within one unit of the last place.
--   adamw     Three AdamW steps match bit for bit (f32, and f32 params with
--             bf16 gradients).
--   allocator A small forward/backward/AdamW loop makes no cudaMalloc after
--             warm-up (100 steps) and returns allocated memory to baseline;
--             out-of-memory is a clear error, not a crash.
--
-- Prints one line per check (max abs / max rel error), then a summary and
-- "N passed, N failed" last; exits non-zero if anything failed.
local ml = require "moonlit"
local F = ml.F
local core = ml.core

local args
do
    local p = ml.argparse.new("test_parity.lua", "CPU vs GPU parity of every op the registry marks as CUDA-backed.")
    p:positional("filter", {required = false, help = "a Lua pattern: only cases whose op/name matches run"})
    args = p:parse(arg or {})
end
local filter = args.filter
-- MOONLIT_PARITY_DEVICE=cpu runs every case CPU against CPU (no GPU needed):
-- a check of this script itself, skipping the GPU-only parts.
local DEV = os.getenv("MOONLIT_PARITY_DEVICE") or "cuda"

-- ---- bookkeeping -----------------------------------------------------------

local results = {}
local function record(group, name, ok, abs_err, rel_err, note)
    results[#results + 1] = {group = group, name = name, ok = ok, abs = abs_err, rel = rel_err, note = note}
    local e = function(v) return v and string.format("%9.2e", v) or "        -" end
    print(string.format("%-4s %-9s %-58s %s %s  %s", ok and "ok" or "FAIL", group, name:sub(1, 58), e(abs_err),
                        e(rel_err), note or ""))
end

-- ---- comparing tensors -----------------------------------------------------

-- Max abs and max rel error of b (any device) against the reference a (CPU),
-- and whether every element is within atol + rtol*|a|.  NaN must match NaN.
local function compare(a, b, rtol, atol)
    b = b:cpu()
    local sa, sb = a:size(), b:size()
    if #sa ~= #sb then return false, nil, nil, "rank " .. #sa .. " vs " .. #sb end
    for i = 1, #sa do
        if sa[i] ~= sb[i] then return false, nil, nil, "shapes differ" end
    end
    if a.dtype ~= b.dtype then return false, nil, nil, "dtype " .. a.dtype .. " vs " .. b.dtype end
    if a:numel() == 0 then return true, 0, 0 end
    local float = a.dtype == "f32" or a.dtype == "f64" or a.dtype == "f16" or a.dtype == "bf16"
    if not float then
        local bad = a:long():ne(b:long()):long():sum():item()
        return bad == 0, bad, nil, bad > 0 and (bad .. " elements differ") or nil
    end
    local ad, bd = a:double(), b:double()
    local na, nb = ad:ne(ad), bd:ne(bd)
    if na:ne(nb):long():sum():item() > 0 then return false, nil, nil, "NaN in different places" end
    ad = ml.where(na, 0, ad)
    bd = ml.where(nb, 0, bd)
    local diff = (ad - bd):abs()
    local max_abs = diff:max():item()
    local max_rel = (diff / (ad:abs() + 1e-30)):max():item()
    local over = (diff - (ad:abs() * rtol + atol)):max():item()
    return over <= 0, max_abs, max_rel
end

-- ---- input makers ------------------------------------------------------------

-- Makers bound to a device: random values always come from the CPU stream
-- (so both devices get the same numbers), are placed on the device, and
-- views are taken there.  M.<kind>(shape...) is a leaf requiring grad;
-- M.<kind>_nc(shape...) a non-contiguous one (the storage holds the last two
-- dims swapped and the leaf is its transpose).
local gen = {
    randn = function(shape) return ml.randn(shape) end,
    positive = function(shape) return ml.rand(shape) + 0.5 end,   -- for sqrt, log, divisors
    away = function(shape)                                         -- |x| >= 0.2: off the kinks
        local x = ml.randn(shape)
        return x + x:sign() * 0.2
    end,
}

local function makers(dev)
    local M = {dev = dev}
    local function place(x) return dev == "cpu" and x or x:to(dev) end
    local function leaf(x) x.requires_grad = true return x end
    for kind, g in pairs(gen) do
        M[kind] = function(...) return leaf(place(g({...}))) end
        M[kind .. "_nc"] = function(...)
            local s = {...}
            s[#s], s[#s - 1] = s[#s - 1], s[#s]
            return leaf(place(g(s)):transpose(-1, -2))
        end
    end
    function M.const(...) return place(ml.randn({...})) end
    function M.mask(...) return place(ml.rand({...}):gt(0.5)) end
    function M.ints(lo, hi, ...) return place(ml.randint(lo, hi, {...}, {dtype = "i64"})) end
    function M.place(x) return place(x) end
    return M
end

-- ---- the cases ---------------------------------------------------------------

-- CASES[op] = list of {name, fn(inputs...), inputs(M) -> list, rtol, atol, grad}
local CASES = {}
local function case(op, name, fn, inputs, opts)
    opts = opts or {}
    CASES[op] = CASES[op] or {}
    table.insert(CASES[op], {name = name, fn = fn, inputs = inputs, rtol = opts.rtol or 1e-5,
                             atol = opts.atol or 1e-5, grad = opts.grad ~= false})
end

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
    local lhs = op == "pow" and "positive" or "randn"
    local rhs = (op == "div" or op == "pow") and "positive" or "randn"
    case(op, "same shape [37,29]", fn, function(M) return {M[lhs](37, 29), M[rhs](37, 29)} end)
    case(op, "broadcast [8,1,33] with [5,1]", fn, function(M) return {M[lhs](8, 1, 33), M[rhs](5, 1)} end)
    case(op, "row bias [64,48] with [48]", fn, function(M) return {M[lhs](64, 48), M[rhs](48)} end)
    case(op, "non-contiguous [40,24]", fn, function(M)
        return {M[lhs .. "_nc"](40, 24), M[rhs .. "_nc"](40, 24)}
    end)
    case(op, "0-dim with [6,7]", fn, function(M) return {M[lhs](), M[rhs](6, 7)} end)
    -- rows a multiple of the vector width: the inner-vec kernel, with a
    -- broadcast scalar and a per-image embedding
    case(op, "0-dim with [6,8]", fn, function(M) return {M[lhs](6, 8), M[rhs]()} end)
    case(op, "embedding [4,1,1,32] with [4,8,8,32]", fn, function(M) return {M[lhs](4, 1, 1, 32), M[rhs](4, 8, 8, 32)} end)
    case(op, "large [1000,1003] (vector path + tail)", fn, function(M) return {M[lhs](1000, 1003), M[rhs](1000, 1003)} end)
end
case("add", "tensor + number", function(a) return a + 2.5 end, function(M) return {M.randn_nc(33, 17)} end)
case("sub", "number - tensor", function(a) return 1.5 - a end, function(M) return {M.randn(1001)} end)
case("mul", "tensor * number", function(a) return a * -3 end, function(M) return {M.randn_nc(5, 9)} end)
case("div", "number / tensor", function(a) return 2 / a end, function(M) return {M.positive(300)} end)
case("pow", "tensor ^ 3", function(a) return a ^ 3 end, function(M) return {M.randn(17, 5)} end)
case("pow", "tensor ^ 0.5", function(a) return a ^ 0.5 end, function(M) return {M.positive(17, 5)} end)
case("add", "in-place add_ with alpha, broadcast",
     function(a, b) local c = a:detach():clone() c:add_(b, 0.5) return c end,
     function(M) return {M.const(12, 10), M.const(10)} end, {grad = false})

for _, cmp in ipairs {"eq", "ne", "lt", "le", "gt", "ge"} do
    case(cmp, "broadcast", function(a, b) return a[cmp](a, b) end,
         function(M) return {M.const(20, 30), M.const(30)} end, {grad = false})
    case(cmp, "with rounded values (ties)", function(a, b) return a:round()[cmp](a:round(), b:round()) end,
         function(M) return {M.const(50), M.const(50)} end, {grad = false})
    case(cmp, "with a number", function(a) return a[cmp](a, 0.25) end, function(M) return {M.const(333)} end,
         {grad = false})
end
case("lt", "integer", function(a, b) return a:lt(b) end,
     function(M) return {M.ints(0, 5, 40), M.ints(0, 5, 40)} end, {grad = false})

case("where", "same shape", function(c, a, b) return ml.where(c, a, b) end,
     function(M) return {M.mask(23, 19), M.randn(23, 19), M.randn(23, 19)} end)
case("where", "broadcast a [19], b [23,1]", function(c, a, b) return ml.where(c, a, b) end,
     function(M) return {M.mask(23, 19), M.randn(19), M.randn(23, 1)} end)
case("where", "rows: a [32] broadcast, b [16,1] broadcast", function(c, a, b) return ml.where(c, a, b) end,
     function(M) return {M.mask(16, 32), M.randn(32), M.randn(16, 1)} end)
case("where", "non-contiguous, number branch", function(c, a) return ml.where(c, a, 0) end,
     function(M) return {M.mask(12, 9), M.randn_nc(12, 9)} end)

local unary = {
    neg = "randn", sqrt = "positive", rsqrt = "positive", exp = "randn", log = "positive", abs = "away",
    sin = "randn", cos = "randn", square = "randn", silu = "randn", gelu = "randn", gelu_tanh = "randn",
    quick_gelu = "randn", sigmoid = "randn", tanh = "randn", relu = "away",
}
for op, make in pairs(unary) do
    local fn = function(x) return ml[op](x) end
    case(op, "[16,33,5]", fn, function(M) return {M[make](16, 33, 5)} end)
    case(op, "non-contiguous [40,31]", fn, function(M) return {M[make .. "_nc"](40, 31)} end)
    case(op, "large [4096,257]", fn, function(M) return {M[make](4096, 257)} end)
end
-- floor, round and sign: exact on both devices whatever the value (round
-- ties to even); the inputs span several integers and the .5 ties.  Their
-- gradient is 0, compared too.
for _, op in ipairs {"floor", "round", "sign"} do
    local fn = function(x) return (x * 3)[op](x * 3) end
    case(op, "[16,33,5]", fn, function(M) return {M.randn(16, 33, 5)} end)
    case(op, "non-contiguous [40,31]", fn, function(M) return {M.randn_nc(40, 31)} end)
    case(op, "large [4096,257]", fn, function(M) return {M.randn(4096, 257)} end)
    case(op, "ties at k + 0.5 and 0", function(x) return x[op](x) end,
         function(M) return {M.place(ml.arange(-20, 21):float() * 0.5)} end, {grad = false})
    case(op, "integer", function(x) return x[op](x) end, function(M) return {M.ints(-10, 10, 100)} end,
         {grad = false})
end
case("clamp", "both bounds", function(x) return x:clamp(-0.5, 0.5) end, function(M) return {M.randn(50, 40)} end)
case("clamp", "lower only, non-contiguous", function(x) return x:clamp(0) end, function(M) return {M.randn_nc(30, 20)} end)
case("clamp", "upper only", function(x) return x:clamp(nil, 0.3) end, function(M) return {M.randn(333)} end)
case("clamp", "integer", function(x) return x:clamp(-3, 4) end, function(M) return {M.ints(-10, 10, 100)} end,
     {grad = false})

for _, op in ipairs {"sum", "mean"} do
    case(op, "all of [37,41,3]", function(x) return x[op](x) end, function(M) return {M.randn(37, 41, 3)} end)
    case(op, "last dim of [300,500] (rows)", function(x) return x[op](x, -1) end, function(M) return {M.randn(300, 500)} end)
    case(op, "first dim of [5000,64] (columns)", function(x) return x[op](x, 1) end, function(M) return {M.randn(5000, 64)} end)
    case(op, "dims {1,3} keepdim of [6,7,8]", function(x) return x[op](x, {1, 3}, true) end,
         function(M) return {M.randn(6, 7, 8)} end)
    case(op, "dim -1, non-contiguous", function(x) return x[op](x, -1) end, function(M) return {M.randn_nc(70, 90)} end)
    case(op, "all of 3M elements (split reduction)", function(x) return x[op](x) end, function(M) return {M.randn(3000, 1000)} end)
    case(op, "long rows [4,100000]", function(x) return x[op](x, 2) end, function(M) return {M.randn(4, 100000)} end)
end
case("sum", "integer sum", function(x) return x:sum(1) end, function(M) return {M.ints(-50, 50, 300, 7)} end, {grad = false})
case("sum", "bool count", function(x) return x:sum() end, function(M) return {M.mask(1000)} end, {grad = false})
case("var", "all", function(x) return x:var() end, function(M) return {M.randn(30, 40)} end)
case("var", "dim 2, correction 0", function(x) return x:var(2, {correction = 0}) end, function(M) return {M.randn(64, 300)} end)
case("var", "dims {1,2} keepdim, non-contiguous", function(x) return x:var({1, 2}, {keepdim = true}) end,
     function(M) return {M.randn_nc(6, 30, 40)} end)
case("max", "all", function(x) return x:max() end, function(M) return {M.randn(300, 41)} end)
case("max", "dim 2 (warp path)", function(x) return (x:max(2)) end, function(M) return {M.randn(64, 300)} end)
case("max", "dim 1 keepdim, non-contiguous", function(x) return (x:max(1, true)) end, function(M) return {M.randn_nc(30, 40)} end)
case("max", "indices, dim 2", function(x) local _, i = x:max(2) return i end, function(M) return {M.randn(64, 300)} end,
     {grad = false})
case("max", "indices with ties and rows of 5", function(x) local _, i = x:round():max(2) return i end,
     function(M) return {M.const(100, 5)} end, {grad = false})
case("argmax", "dim 2 (warp path)", function(x) return x:argmax(2) end, function(M) return {M.const(64, 300)} end,
     {grad = false})
case("argmax", "dim 1 keepdim, non-contiguous", function(x) return x:t():argmax(1, true) end,
     function(M) return {M.const(40, 30)} end, {grad = false})
case("argmax", "ties (the first wins) in rows of 5", function(x) return x:round():argmax(2) end,
     function(M) return {M.const(100, 5)} end, {grad = false})
case("argmax", "integer input", function(x) return x:argmax(1) end, function(M) return {M.ints(-3, 3, 50, 7)} end,
     {grad = false})
case("norm", "2-norm of all", function(x) return x:norm() end, function(M) return {M.randn(300, 400)} end)
case("norm", "2-norm dim 2", function(x) return x:norm(2, 2) end, function(M) return {M.randn(30, 40)} end)
case("norm", "3-norm dims {1} keepdim", function(x) return x:norm(3, 1, true) end, function(M) return {M.away(30, 40)} end)
case("norm", "1-norm non-contiguous", function(x) return x:norm(1) end, function(M) return {M.away_nc(30, 40)} end)

for _, red in ipairs {"mean", "sum", "none"} do
    case("mse_loss", "reduction " .. red, function(a, b) return F.mse_loss(a, b, red) end,
         function(M) return {M.randn(20, 30), M.randn(20, 30)} end)
end
case("mse_loss", "target without grad, non-contiguous", function(a, b) return F.mse_loss(a, b) end,
     function(M) return {M.randn_nc(30, 20), M.const(30, 20)} end)
case("dropout", "p = 0.4, seeded", function(x) ml.manual_seed(99) return F.dropout(x, 0.4, true) end,
     function(M) return {M.randn(70, 50)} end)
case("dropout", "not training", function(x) return F.dropout(x, 0.5, false) end, function(M) return {M.randn(30)} end)

case("cat", "dim 1, three inputs", function(a, b, c) return ml.cat({a, b, c}, 1) end,
     function(M) return {M.randn(20, 30), M.randn(10, 30), M.randn(30, 30)} end)
case("cat", "dim 2, non-contiguous", function(a, b) return ml.cat({a, b}, 2) end,
     function(M) return {M.randn_nc(20, 30), M.randn(20, 20)} end)
case("stack", "new last dim, non-contiguous", function(a, b, c) return ml.stack({a, b, c}, 3) end,
     function(M) return {M.randn_nc(20, 30), M.randn(20, 30), M.randn(20, 30)} end)
case("stack", "dim 1", function(a, b) return ml.stack({a, b}, 1) end, function(M) return {M.randn(40), M.randn(40)} end)

case("view", "[20,60] -> [30,40]", function(x) return x:view(30, 40) end, function(M) return {M.randn(20, 60)} end)
case("view", "reshape of non-contiguous (copies)", function(x) return x:reshape(-1) end,
     function(M) return {M.randn_nc(20, 30)} end)
case("permute", "{3,1,2}", function(x) return x:permute(3, 1, 2) * 1 end, function(M) return {M.randn(12, 13, 14)} end)
case("permute", "NCHW -> NHWC contiguous (small C)", function(x) return x:permute(1, 3, 4, 2):contiguous() end,
     function(M) return {M.randn(2, 8, 16, 16)} end)
case("permute", "NCHW -> NHWC contiguous (tiled transpose)", function(x) return x:permute(1, 3, 4, 2):contiguous() end,
     function(M) return {M.randn(2, 40, 17, 19)} end)
case("permute", "2-D transpose of bf16 through f32", function(x) return x:bf16():t():contiguous():float() end,
     function(M) return {M.randn(70, 45)} end)
case("narrow", "dim 2", function(x) return x:narrow(2, 5, 20) * 1 end, function(M) return {M.randn(30, 40)} end)
case("select", "dim -1 index -1", function(x) return x:select(-1, -1) * 1 end, function(M) return {M.randn(30, 40)} end)
case("expand", "[30,1] -> [30,40]", function(x) return x:expand(30, 40) * 1 end, function(M) return {M.randn(30, 1)} end)
case("expand", "new leading dims", function(x) return x:expand({4, -1, 30}) * 1 end, function(M) return {M.randn(20, 1)} end)
case("contiguous", "of a non-contiguous leaf", function(x) return x:contiguous() end,
     function(M) return {M.randn_nc(30, 40)} end)
case("contiguous", "clone", function(x) return x:clone() end, function(M) return {M.randn(300)} end)
case("clone", "of a leaf", function(x) return x:clone() end, function(M) return {M.randn(300)} end)
case("clone", "of a non-contiguous leaf", function(x) return x:clone() * 2 end, function(M) return {M.randn_nc(30, 40)} end)
case("unsqueeze", "dim 2, broadcast against it", function(x) return x:unsqueeze(2) * x:unsqueeze(1) end,
     function(M) return {M.randn(30, 40)} end)
case("unsqueeze", "dim -1 of non-contiguous", function(x) return x:unsqueeze(-1):expand(40, 30, 3) * 1 end,
     function(M) return {M.randn_nc(40, 30)} end)
-- to_device: the GPU run goes to the CPU and back (two recorded copies, and
-- their backward the other way); the CPU run does nothing.  Its gradient is
-- checked here only (the registry's GRAD_BY_PARITY).
case("to_device", "to the CPU and back", function(x) return (x:cpu() * 2):to(x.device) end,
     function(M) return {M.randn(300, 70)} end)
case("to_device", "non-contiguous, with a dtype change", function(x)
    return x:to{device = "cpu", dtype = "f64"}:exp():to{device = x.device, dtype = "f32"}
end, function(M) return {M.randn_nc(40, 30)} end)
case("to_device", "used on both devices", function(x) return x:cpu():to(x.device) * x end,
     function(M) return {M.randn(1000)} end)
for _, dt in ipairs {"f64", "f16", "bf16", "i32", "i64", "u8", "bool"} do
    local float = dt == "f64" or dt == "f16" or dt == "bf16"
    case("to_dtype", "f32 -> " .. dt .. (float and " -> f32" or ""), function(x)
        local y = (x * 50):to(dt)
        return float and y:float() or y
    end, function(M) return {M.randn_nc(30, 40)} end, {grad = float})
end
case("to_dtype", "u8 -> bf16 -> i64", function(x) return x:to("u8"):to("bf16"):to("i64") end,
     function(M) return {M.ints(0, 256, 500)} end, {grad = false})
-- Contiguous conversions take 16 bytes per thread where both ends are
-- aligned (kernels/cuda/copy.cu): an odd length leaves a scalar tail, and a
-- view that starts one element in is not aligned (the scalar kernel).
for _, dt in ipairs {"bf16", "f16", "f64", "u8"} do
    local float = dt ~= "u8"
    local function back(y) return float and y:float() or y end
    case("to_dtype", "f32 -> " .. dt .. ", 1001 elements", function(x) return back((x * 50):to(dt)) end,
         function(M) return {M.randn(1001)} end, {grad = float})
    case("to_dtype", "f32 -> " .. dt .. ", a view one element in", function(x)
        return back((x * 50):narrow(1, 2, 998):to(dt))
    end, function(M) return {M.randn(1001)} end, {grad = float})
end
case("to_dtype", "bf16 -> f32, 1001 elements one element in", function(x)
    return x:bf16():narrow(1, 2, 999):float()
end, function(M) return {M.randn(1001)} end)

-- RNG ops: the input is the device name; values must be identical.
local function rng_case(op, name, fn, rtol)
    case(op, name, fn, function(M) return {M.dev} end, {grad = false, rtol = rtol or 0, atol = 0})
end
rng_case("randn", "[1000,37] f32", function(d) ml.manual_seed(7) return ml.randn({1000, 37}, {device = d}) end, 2.5e-7)
rng_case("randn", "f64", function(d) ml.manual_seed(8) return ml.randn({4099}, {device = d, dtype = "f64"}) end, 1e-15)
rng_case("randn", "bf16", function(d) ml.manual_seed(9) return ml.randn({5000}, {device = d, dtype = "bf16"}) end, 8e-3)
rng_case("randn", "normal_ into a transposed view", function(d)
    ml.manual_seed(10)
    local t = ml.zeros(30, 40, {device = d}):t()
    t:normal_(2, 3)
    return t
end, 2.5e-7)
rng_case("rand", "[777,13] f32", function(d) ml.manual_seed(11) return ml.rand({777, 13}, {device = d}) end)
rng_case("rand", "f64 and f16", function(d)
    ml.manual_seed(12)
    local a = ml.rand({1001}, {device = d, dtype = "f64"})
    local b = ml.rand({1001}, {device = d, dtype = "f16"})
    return ml.cat({a, b:double()}, 1)
end)
rng_case("rand", "uniform_ into a narrowed view", function(d)
    ml.manual_seed(13)
    local t = ml.zeros(50, 40, {device = d}):narrow(2, 3, 30)
    t:uniform_(-2, 5)
    return t
end)
rng_case("randint", "[0,1000) i64", function(d) ml.manual_seed(14) return ml.randint(0, 1000, {3001}, {device = d}) end)
rng_case("randint", "wide range [0,2^40) i64", function(d)
    ml.manual_seed(15)
    return ml.randint(0, 1 << 40, {1001}, {device = d})
end)
rng_case("randint", "i32, u8 and f32 outputs", function(d)
    ml.manual_seed(16)
    local a = ml.randint(-5, 300, {500}, {device = d, dtype = "i32"})
    local b = ml.randint(0, 256, {500}, {device = d, dtype = "u8"})
    local c = ml.randint(0, 1000, {500}, {device = d, dtype = "f32"})
    return ml.cat({a:long(), b:long(), c:long()}, 1)
end)

-- adamw_step: three steps from the same state must match bit for bit.
local function adamw_run(g_dtype)
    return function(M)
        local p, m, v = M.const(1000, 37), M.const(1000, 37):abs(), M.const(1000, 37):abs()
        local g1, g2, g3 = M.const(1000, 37), M.const(1000, 37), M.const(1000, 37)
        local gs = {g1, g2, g3}
        for step = 1, 3 do
            local g = gs[step]
            if g_dtype then
                -- the GPU takes the half-precision gradient as is, the CPU
                -- the same values in f32
                g = g:to(g_dtype)
                if M.dev == "cpu" then g = g:float() end
            end
            ml.adamw_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        end
        return {ml.cat({p:reshape(-1), m:reshape(-1), v:reshape(-1)}, 1)}
    end
end
case("adamw_step", "3 steps f32", function(x) return x end, adamw_run(nil), {grad = false, rtol = 0, atol = 0})
case("adamw_step", "3 steps, bf16 gradients on the GPU", function(x) return x end, adamw_run("bf16"),
     {grad = false, rtol = 0, atol = 0})

-- ---- running one case --------------------------------------------------------

local function is_tensor(x) return ml.is_tensor(x) end
local function is_float(t) return t.dtype == "f32" or t.dtype == "f64" or t.dtype == "f16" or t.dtype == "bf16" end

-- Inputs, output and gradients of a case on one device.
local function run_on(c, dev)
    ml.manual_seed(1234)
    local M = makers(dev)
    local inputs = c.inputs(M)
    local out = c.fn(table.unpack(inputs))
    local grads = {}
    if c.grad and is_float(out) and out.requires_grad then
        local gout = M.place(ml.randn(out:size()))
        out:backward(gout)
        for i, x in ipairs(inputs) do
            if is_tensor(x) and x.requires_grad then grads[i] = x.grad end
        end
    end
    return out, grads
end

local function run_case(op, c)
    local label = op .. ": " .. c.name
    local ok, err = pcall(function()
        local out_c, grads_c = run_on(c, "cpu")
        local out_g, grads_g = run_on(c, DEV)
        if DEV ~= "cpu" and out_g.device:sub(1, 4) ~= "cuda" then
            error("the GPU run produced a tensor on " .. out_g.device)
        end
        local good, a, r, why = compare(out_c, out_g, c.rtol, c.atol)
        local note = why
        for i, gc in pairs(grads_c) do
            local gg = grads_g[i]
            if not gg then
                good, note = false, "input " .. i .. " got no gradient on the GPU"
            else
                local g_ok, ga, gr, gwhy = compare(gc, gg, c.rtol, c.atol)
                if not g_ok then good, note = false, "grad of input " .. i .. ": " .. (gwhy or "values differ") end
                a = math.max(a or 0, ga or 0)
                r = math.max(r or 0, gr or 0)
            end
        end
        if next(grads_c) then note = (note and note .. "; " or "") .. "fwd+bwd" end
        record("op", label, good, a, r, note)
    end)
    if not ok then record("op", label, false, nil, nil, tostring(err):gsub("\n.*", "")) end
    collectgarbage()
end

-- ---- GPU-only dtypes: bf16 / f16 against the CPU's f32 rounded -------------------

local half_ops = {
    {"add broadcast", function(a, b) return a + b end, 2},
    {"mul", function(a, b) return a * b end, 2},
    {"silu", function(a) return a:silu() end, 1},
    {"gelu", function(a) return a:gelu() end, 1},
    {"exp", function(a) return a:exp() end, 1},
    {"sum dim 2", function(a) return a:sum(2) end, 1},
    {"mean all", function(a) return a:mean() end, 1},
    {"max dim 1", function(a) return (a:max(1)) end, 1},
    {"clamp", function(a) return a:clamp(-0.5, 0.7) end, 1},
    {"where", function(a, b) return ml.where(a:gt(0), a, b) end, 2},
}

local function run_half(dt, ulp)
    for _, h in ipairs(half_ops) do
        local name, fn, nin = h[1], h[2], h[3]
        if not filter or ("dtypes/" .. dt .. " " .. name):find(filter) then
            local ok, err = pcall(function()
                ml.manual_seed(77)
                local a = ml.randn({64, 96}):to(dt)
                local b = ml.randn({96}):to(dt)
                local args_c = {a:float(), b:float()}
                local args_g = {a:to(DEV), b:to(DEV)}
                local ref = fn(table.unpack(args_c, 1, nin)):to(dt)
                local got = fn(table.unpack(args_g, 1, nin))
                local good, ae, re, why = compare(ref, got, ulp, 1e-6)
                record("dtypes", dt .. " " .. name, good, ae, re, why)
            end)
            if not ok then record("dtypes", dt .. " " .. name, false, nil, nil, tostring(err):gsub("\n.*", "")) end
        end
    end
end

-- ---- allocator -------------------------------------------------------------------

local function stats() return core.cuda_memory_stats(0) end

local function test_allocator()
    collectgarbage()
    core.cuda_synchronize()
    local base = stats()
    ml.manual_seed(3)
    local w = ml.randn({256, 512}, {device = DEV})
    w.requires_grad = true
    local m, v = ml.zeros_like(w), ml.zeros_like(w)
    local x = ml.randn({256, 512}, {device = DEV})
    local t = ml.randn({256}, {device = DEV})
    local function step(i)
        local y = ((x * w):silu() + w:square():mean()):sum(2)
        local loss = F.mse_loss(y, t)
        loss:backward()
        ml.adamw_step_(w, w.grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, i)
        w.grad = nil
        loss, y = nil, nil
        collectgarbage()
    end
    for i = 1, 3 do step(i) end
    local warm = stats()
    for i = 4, 103 do step(i) end
    local after = stats()
    record("alloc", "no cudaMalloc in 100 steady-state steps", after.num_cudamalloc == warm.num_cudamalloc, nil, nil,
           string.format("cudaMalloc calls %d -> %d, %d allocations served", warm.num_cudamalloc,
                         after.num_cudamalloc, after.num_allocs - warm.num_allocs))
    record("alloc", "allocated bytes flat across steps", after.allocated == warm.allocated, nil, nil,
           string.format("%d -> %d bytes", warm.allocated, after.allocated))
    w, m, v, x, t = nil, nil, nil, nil, nil
    collectgarbage()
    local done = stats()
    record("alloc", "memory returns to baseline", done.allocated == base.allocated, nil, nil,
           string.format("baseline %d, now %d bytes; peak %.1f MiB, reserved %.1f MiB", base.allocated,
                         done.allocated, done.peak / 2 ^ 20, done.reserved / 2 ^ 20))
    core.cuda_empty_cache(0)
    local emptied = stats()
    record("alloc", "empty_cache returns free segments", emptied.reserved <= done.reserved, nil, nil,
           string.format("reserved %.1f -> %.1f MiB", done.reserved / 2 ^ 20, emptied.reserved / 2 ^ 20))
    local ok, err = pcall(ml.empty, {1 << 40}, {device = DEV})
    local msg = tostring(err)
    record("alloc", "4 TiB request: clear out-of-memory error", not ok and msg:find("out of GPU memory on cuda:0", 1, true)
           ~= nil, nil, nil, msg:sub(1, 110))
    local ok2 = pcall(function() return ml.ones(1000, {device = DEV}):sum():item() end)
    record("alloc", "allocations work after an out-of-memory error", ok2)
end

-- ---- main ---------------------------------------------------------------------------

local gpu = DEV ~= "cpu"
if gpu then
    local available, why = core.cuda_available()
    if not available then
        print("test_parity: no usable GPU: " .. tostring(why))
        print("0 passed, 1 failed")
        os.exit(1)
    end
    local info = core.cuda_device_info(0)
    print(string.format("device cuda:0: %s (compute capability %s, %d SMs, %.1f GiB); %d device(s)", info.name,
                        info.compute_capability, info.sm_count, info.total_mem / 2 ^ 30, core.cuda_device_count()))
else
    print("dry run: every case CPU against CPU")
end
print(string.format("%-4s %-9s %-58s %9s %9s  %s", "", "group", "check", "max abs", "max rel", "note"))

-- Helpers the case files share.  via(dt, fn): fn run in dtype dt — on the
-- GPU on dt copies of its float tensor inputs; on the CPU in f32 on inputs
-- rounded to dt, with the result rounded to dt — returned in f32.
local helpers = {}
function helpers.via(dt, fn)
    return function(...)
        local args = table.pack(...)
        for i = 1, args.n do
            local a = args[i]
            if ml.is_tensor(a) and is_float(a) then
                a = a:to(dt)
                if a.device == "cpu" then a = a:float() end
                args[i] = a
            end
        end
        return fn(table.unpack(args, 1, args.n)):to(dt):float()
    end
end

-- More cases live beside this file, one file per op family:
-- tests/gpu/parity_<family>.lua returns function(case, ml, helpers) that
-- registers them.
do
    local p = io.popen("ls tests/gpu/parity_*.lua 2>/dev/null")
    for f in p:lines() do dofile(f)(case, ml, helpers) end
    p:close()
end

-- every op the registry says runs on CUDA must have a case
local missing = {}
for _, op in ipairs(core.op_registry()) do
    if op.cuda and not CASES[op.name] then missing[#missing + 1] = op.name end
end
record("registry", "every cuda=1 op has a parity case", #missing == 0, nil, nil,
       #missing > 0 and ("missing: " .. table.concat(missing, ", ")) or nil)
-- an op whose gradient is checked nowhere else (GRAD_BY_PARITY) needs a case
-- that backpropagates
local unchecked = {}
for _, op in ipairs(core.op_registry()) do
    if op.differentiable and not op.gradcheck then
        local any = false
        for _, c in ipairs(CASES[op.name] or {}) do any = any or c.grad end
        if not any then unchecked[#unchecked + 1] = op.name end
    end
end
record("registry", "gradients only parity checks have a case with grad", #unchecked == 0, nil, nil,
       #unchecked > 0 and ("missing: " .. table.concat(unchecked, ", ")) or nil)

local ops = {}
for _, op in ipairs(core.op_registry()) do
    if op.cuda and CASES[op.name] then ops[#ops + 1] = op.name end
end
for op in pairs(CASES) do
    local listed = false
    for _, o in ipairs(core.op_registry()) do
        if o.name == op then listed = true end
    end
    if not listed then record("registry", "case names a registry op: " .. op, false) end
end
for _, op in ipairs(ops) do
    for _, c in ipairs(CASES[op]) do
        if not filter or (op .. "/" .. c.name):find(filter) then run_case(op, c) end
    end
end
-- the generator advanced equally: a draw after everything matches too
do
    ml.manual_seed(21)
    ml.randn({10})
    local _, off_c = ml.get_rng_state()
    ml.manual_seed(21)
    ml.randn({10}, {device = DEV})
    local _, off_g = ml.get_rng_state()
    record("rng", "generator offset advances equally", off_c == off_g, nil, nil, off_c .. " vs " .. off_g)
end
if gpu then
    run_half("bf16", 2 ^ -7)
    run_half("f16", 2 ^ -10)
end
if gpu and (not filter or ("alloc"):find(filter)) then
    local ok, err = pcall(test_allocator)
    if not ok then record("alloc", "allocator checks", false, nil, nil, tostring(err):gsub("\n.*", "")) end
end

-- ---- summary --------------------------------------------------------------------------

local passed, failed, by_group = 0, 0, {}
for _, r in ipairs(results) do
    local g = by_group[r.group] or {pass = 0, fail = 0, abs = 0, rel = 0}
    by_group[r.group] = g
    if r.ok then passed, g.pass = passed + 1, g.pass + 1 else failed, g.fail = failed + 1, g.fail + 1 end
    if r.abs and r.abs == r.abs then g.abs = math.max(g.abs, r.abs) end
    if r.rel and r.rel == r.rel then g.rel = math.max(g.rel, r.rel) end
end
print("")
print(string.format("%-10s %6s %6s %10s %10s", "group", "passed", "failed", "worst abs", "worst rel"))
for _, g in ipairs {"registry", "op", "rng", "dtypes", "alloc"} do
    local s = by_group[g]
    if s then print(string.format("%-10s %6d %6d %10.2e %10.2e", g, s.pass, s.fail, s.abs, s.rel)) end
end
if failed > 0 then
    print("\nfailed:")
    for _, r in ipairs(results) do
        if not r.ok then print("  " .. r.group .. " " .. r.name .. (r.note and (": " .. r.note) or "")) end
    end
end
print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
