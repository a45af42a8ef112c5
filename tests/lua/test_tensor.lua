-- test_tensor.lua — the Tensor object from Lua: constructors, dtypes, views
-- sharing storage, shape methods with 1-based (and negative) dims and
-- indices, conversions, printing, lifetime (free, <close>) and the error
-- messages of bad shapes, dtypes, indices and devices.
local ml = require "moonlit"
local util = require "testutil"

local tests = {}

-- Error message of f(...), or nil if it succeeded.
local error_of, has = util.error_of, util.has

local function min_of(x)
    return -(-x):max():item()
end

-- ---- constructors ------------------------------------------------------------

function tests.tensor_from_nested_tables(t)
    local x = ml.tensor({{1, 2, 3}, {4, 5, 6}})
    t:assertEq(x:size(), {2, 3})
    t:assertEq(x.dtype, "f32", "default dtype")
    t:assertEq(x.device, "cpu")
    t:assertEq(x:totable(), {{1, 2, 3}, {4, 5, 6}})
    local y = ml.tensor({{{1}, {2}}, {{3}, {4}}}, {dtype = "i64"})
    t:assertEq(y:size(), {2, 2, 1})
    t:assertEq(y:totable(), {{{1}, {2}}, {{3}, {4}}})
    t:assertEq(math.type(y:totable()[1][1][1]), "integer", "integer dtypes give Lua integers")
    local s = ml.tensor(2.5)
    t:assertEq(s:dim(), 0, "a number gives a 0-dim tensor")
    t:assertEq(s:size(), {})
    t:assertEq(s:item(), 2.5)
    local b = ml.tensor({true, false, true}, {dtype = "bool"})
    t:assertEq(b:totable(), {true, false, true})
    t:assertEq(ml.tensor({}):size(), {0})
    t:assert(ml.tensor({1, 2}, {requires_grad = true}).requires_grad)
end

function tests.tensor_from_ragged_or_bad_tables_errors(t)
    t:assert(has(error_of(ml.tensor, {{1, 2}, {3}}), "ragged"), "ragged rows")
    t:assert(has(error_of(ml.tensor, {{1, 2}, 3}), "ragged"), "mixed numbers and tables")
    t:assert(has(error_of(ml.tensor, {{1, 2}, {3, "a"}}), "expected numbers, got string"))
    t:assert(has(error_of(ml.tensor, "abc"), "table expected"))
    t:assert(has(error_of(ml.tensor, {1}, {dtype = "q8"}), "unknown dtype 'q8'"))
end

function tests.filled_constructors(t)
    t:assertEq(ml.zeros(2, 3):totable(), {{0, 0, 0}, {0, 0, 0}})
    t:assertEq(ml.zeros({2, 3}):size(), {2, 3}, "shape as a table")
    t:assertEq(ml.ones(3, {dtype = "i32"}):totable(), {1, 1, 1})
    t:assertEq(ml.ones(3, {dtype = "i32"}).dtype, "i32")
    t:assertEq(ml.full({2}, 7.5):totable(), {7.5, 7.5})
    t:assertEq(ml.full({2, 2}, 3, {dtype = "f64"}).dtype, "f64")
    t:assertEq(ml.empty(4, 5):size(), {4, 5})
    t:assertEq(ml.zeros(2, 0):numel(), 0)
    t:assert(ml.zeros(2, {requires_grad = true}).requires_grad)
    t:assert(has(error_of(ml.ones, -1), "negative size"))
end

function tests.like_constructors_keep_shape_dtype_device(t)
    local x = ml.ones(2, 3, {dtype = "i32"})
    for _, name in ipairs {"zeros_like", "ones_like", "empty_like"} do
        local y = ml[name](x)
        t:assertEq(y:size(), {2, 3}, name)
        t:assertEq(y.dtype, "i32", name)
        t:assertEq(y.device, "cpu", name)
    end
    t:assertEq(ml.zeros_like(x):totable(), {{0, 0, 0}, {0, 0, 0}})
    t:assertEq(ml.ones_like(x):totable()[2], {1, 1, 1})
    t:assertEq(ml.full_like(x, 4):totable()[1], {4, 4, 4})
    t:assertEq(ml.zeros_like(x, {dtype = "f64"}).dtype, "f64", "dtype override")
end

function tests.arange(t)
    local a = ml.arange(5)
    t:assertEq(a:totable(), {0, 1, 2, 3, 4}, "end exclusive, from 0")
    t:assertEq(a.dtype, "i64", "integer arguments give int64")
    t:assertEq(ml.arange(1, 10, 3):totable(), {1, 4, 7})
    t:assertEq(ml.arange(3, 0, -1):totable(), {3, 2, 1})
    local f = ml.arange(0, 1, 0.25)
    t:assertEq(f.dtype, "f32")
    t:assertEq(f:totable(), {0, 0.25, 0.5, 0.75})
    t:assertEq(ml.arange(3, {dtype = "f64"}).dtype, "f64")
    t:assert(has(error_of(ml.arange), "arange"))
end

function tests.every_dtype_round_trips_small_integers(t)
    for _, dt in ipairs {"f32", "f64", "f16", "bf16", "i32", "i64", "u8"} do
        local x = ml.tensor({0, 1, 2, 100}, {dtype = dt})
        t:assertEq(x.dtype, dt)
        t:assertEq(x:totable(), {0, 1, 2, 100}, dt)
        t:assertEq(x:float():totable(), {0, 1, 2, 100}, dt .. " -> f32")
    end
    t:assertEq(ml.tensor({1}, {dtype = "float32"}).dtype, "f32", "long dtype names")
    t:assertEq(ml.tensor({1}, {dtype = "bfloat16"}).dtype, "bf16")
    t:assertEq(ml.tensor({1}, {dtype = "half"}).dtype, "f16")
end

function tests.random_constructors(t)
    ml.manual_seed(42)
    local a = ml.randn(100, 100)
    t:assertEq(a:size(), {100, 100})
    t:assertEq(a.dtype, "f32")
    t:assertNear(a:mean():item(), 0, 0.05, "randn mean")
    t:assertNear(a:var():item(), 1, 0.05, "randn variance")
    local r = ml.rand({50, 40}, {dtype = "f64"})
    t:assertEq(r.dtype, "f64")
    t:assert(min_of(r) >= 0 and r:max():item() < 1, "rand in [0, 1)")
    t:assertNear(r:mean():item(), 0.5, 0.03)
    local i = ml.randint(3, 7, {1000})
    t:assertEq(i.dtype, "i64")
    t:assert(min_of(i) == 3 and i:max():item() == 6, "randint in [low, high), every value drawn")
    t:assertEq(ml.randint(0, 2, 3, 4):size(), {3, 4}, "shape as varargs")
    t:assertEq(ml.randint(0, 5, {2}, {dtype = "i32"}).dtype, "i32")
    t:assert(has(error_of(ml.randint, 5, 5, {2}), "must be greater"))
    ml.manual_seed(7)
    local b1 = ml.randn(5)
    ml.manual_seed(7)
    t:assertTensorEq(ml.randn(5), b1, 0, "manual_seed reproduces")
    t:assert((ml.randn(5) - b1):abs():max():item() > 0, "the stream moves on")
end

-- ---- views share storage -----------------------------------------------------

function tests.views_share_storage(t)
    local base = ml.zeros(3, 4)
    base:narrow(2, 2, 2):fill_(1)
    t:assertEq(base:totable(), {{0, 1, 1, 0}, {0, 1, 1, 0}, {0, 1, 1, 0}}, "narrow + fill_")
    base:select(1, 3):copy_(ml.tensor({5, 6, 7, 8}))
    t:assertEq(base:totable()[3], {5, 6, 7, 8}, "select + copy_")
    base:t():select(1, 1):fill_(9)
    t:assertEq(base:totable()[1][1], 9, "t() + select")
    t:assertEq(base:totable()[2][1], 9)
    base:view(12):narrow(1, 12, 1):fill_(-1)
    t:assertEq(base:totable()[3][4], -1, "view of contiguous data")
    base[2]:fill_(3)
    t:assertEq(base:totable()[2], {3, 3, 3, 3}, "t[i]")
    local d = base:detach()
    d:zero_()
    t:assertEq(base:sum():item(), 0, "detach shares storage")
    local u = base:unsqueeze(1)
    u:squeeze(1):select(2, 1):fill_(2)
    t:assertEq(base:totable()[1][1], 2, "squeeze/unsqueeze")
    local a, b = base:chunk(2, 2)
    b:fill_(4)
    t:assertEq(base:totable()[1], {2, 0, 4, 4}, "chunk")
end

function tests.clone_and_contiguous_copy(t)
    local x = ml.ones(2, 3)
    local c = x:clone()
    c:fill_(5)
    t:assertEq(x:sum():item(), 6, "clone owns its data")
    local nc = x:t()
    t:assert(not nc:is_contiguous())
    local cc = nc:contiguous()
    t:assert(cc:is_contiguous())
    cc:fill_(7)
    t:assertEq(x:sum():item(), 6, "contiguous() of a non-contiguous tensor copies")
    t:assertEq(x:contiguous():is_contiguous(), true)
end

function tests.reshape_of_non_contiguous_copies(t)
    local x = ml.arange(6):view(2, 3)
    local r = x:t():reshape(6)
    t:assertEq(r:totable(), {0, 3, 1, 4, 2, 5}, "logical order of the transpose")
    r:fill_(0)
    t:assertEq(x:totable(), {{0, 1, 2}, {3, 4, 5}}, "the base is untouched")
    t:assertEq(x:t():view(-1):size(), {6}, "view(-1)")
    t:assertEq(x:view(3, -1):size(), {3, 2})
    t:assert(has(error_of(x.view, x, 4, 2), "[4, 2]"), "bad view names the shape")
    t:assert(has(error_of(x.view, x, 4, 2), "[2, 3]"), "and the tensor's shape")
end

-- ---- shape methods, 1-based dims ----------------------------------------------

function tests.size_stride_dim_numel(t)
    local x = ml.zeros(2, 3, 4)
    t:assertEq(x:size(), {2, 3, 4})
    t:assertEq(x:size(1), 2)
    t:assertEq(x:size(-1), 4, "negative dims count from the end")
    t:assertEq(x:shape(), {2, 3, 4})
    t:assertEq(x:stride(), {12, 4, 1})
    t:assertEq(x:stride(2), 4)
    t:assertEq(x:dim(), 3)
    t:assertEq(x.ndim, 3)
    t:assertEq(x:numel(), 24)
    t:assertEq(#x, 2, "#t is the first dim")
    t:assert(x:is_contiguous())
    t:assertEq(x:type(), "f32")
    t:assert(ml.is_tensor(x) and not ml.is_tensor({}))
end

function tests.permute_transpose(t)
    local x = ml.arange(24):view(2, 3, 4)
    local p = x:permute(3, 1, 2)
    t:assertEq(p:size(), {4, 2, 3})
    t:assertEq(p:stride(), {1, 12, 4})
    t:assertEq(p:select(1, 2):select(1, 2):select(1, 3):item(), x:select(1, 2):select(1, 3):select(1, 2):item())
    t:assertEq(x:permute({-1, 1, 2}):size(), {4, 2, 3}, "table form, negative dims")
    t:assertEq(x:transpose(1, 3):size(), {4, 3, 2})
    t:assertEq(x:transpose(-1, -2):size(), {2, 4, 3})
    local m = ml.tensor({{1, 2, 3}, {4, 5, 6}})
    t:assertEq(m:t():totable(), {{1, 4}, {2, 5}, {3, 6}})
    t:assert(has(error_of(m.t, ml.zeros(2, 2, 2)), "2-D"))
    t:assert(has(error_of(x.permute, x, 1, 1, 2), "permutation"))
    t:assert(has(error_of(x.permute, x, 1, 2), "expected 3 dims"))
end

function tests.narrow_select_index(t)
    local x = ml.tensor({{1, 2, 3, 4}, {5, 6, 7, 8}})
    t:assertEq(x:narrow(2, 2, 2):totable(), {{2, 3}, {6, 7}}, "narrow(dim, start, len), start 1-based")
    t:assertEq(x:narrow(2, -2, 2):totable(), {{3, 4}, {7, 8}}, "negative start counts from the end")
    t:assertEq(x:narrow(-1, 1, 1):totable(), {{1}, {5}})
    t:assertEq(x:select(1, 2):totable(), {5, 6, 7, 8})
    t:assertEq(x:select(2, -1):totable(), {4, 8}, "negative index")
    t:assertEq(x[1]:totable(), {1, 2, 3, 4}, "t[1] is the first row")
    t:assertEq(x[-1]:totable(), {5, 6, 7, 8})
    t:assertEq(x[2][3]:item(), 7)
    t:assertEq(x:select(1, 1):dim(), 1)
end

function tests.expand_squeeze_unsqueeze(t)
    local x = ml.tensor({{1}, {2}, {3}})
    local e = x:expand(3, 4)
    t:assertEq(e:size(), {3, 4})
    t:assertEq(e:stride(2), 0, "expanded dims have stride 0")
    t:assertEq(e:totable()[2], {2, 2, 2, 2})
    t:assertEq(x:expand({2, -1, 2}):size(), {2, 3, 2}, "-1 keeps a size, new leading dims")
    local y = ml.zeros(1, 2, 1, 3)
    t:assertEq(y:squeeze():size(), {2, 3})
    t:assertEq(y:squeeze(3):size(), {1, 2, 3})
    t:assertEq(y:squeeze(2):size(), {1, 2, 1, 3}, "squeezing a dim of size > 1 keeps it")
    t:assertEq(y:squeeze(-2):size(), {1, 2, 3})
    local v = ml.zeros(2, 3)
    t:assertEq(v:unsqueeze(1):size(), {1, 2, 3})
    t:assertEq(v:unsqueeze(3):size(), {2, 3, 1}, "one past the last dim")
    t:assertEq(v:unsqueeze(-1):size(), {2, 3, 1})
    t:assert(has(error_of(v.expand, v, 3, 3), "[2, 3]"))
end

function tests.chunk_split_flatten(t)
    local x = ml.arange(10)
    local parts = {x:chunk(3)}
    t:assertEq(#parts, 3)
    t:assertEq(parts[1]:totable(), {0, 1, 2, 3})
    t:assertEq(parts[3]:totable(), {8, 9}, "the last chunk may be smaller")
    local s = {x:split(4)}
    t:assertEq(#s, 3)
    t:assertEq(s[3]:totable(), {8, 9})
    local a, b = x:split({3, 7})
    t:assertEq(a:numel(), 3)
    t:assertEq(b:totable()[1], 3)
    t:assertError(function() x:split({3, 3}) end, "do not sum")
    local m = ml.zeros(2, 3, 4)
    t:assertEq((select(2, m:chunk(2, -1))):size(), {2, 3, 2})
    t:assertEq(m:flatten():size(), {24})
    t:assertEq(m:flatten(2):size(), {2, 12})
    t:assertEq(m:flatten(1, 2):size(), {6, 4})
    t:assertEq(m:flatten(-2, -1):size(), {2, 12})
end

-- ---- values out ----------------------------------------------------------------

function tests.totable_and_item(t)
    t:assertEq(ml.tensor({{1.5, 2}, {3, 4}}):totable(), {{1.5, 2}, {3, 4}})
    t:assertEq(ml.tensor(3):totable(), 3, "0-dim gives a number")
    t:assertEq(ml.tensor({7}, {dtype = "i32"}):item(), 7, "one element of any shape")
    t:assertEq(math.type(ml.tensor({7}, {dtype = "i64"}):item()), "integer")
    t:assertEq(ml.tensor(true, {dtype = "bool"}):item(), true)
    t:assertEq(ml.zeros(1, 1, 1):item(), 0)
    t:assert(has(error_of(function() return ml.zeros(2, 3):item() end), "6 elements"))
    local x = ml.arange(6):view(2, 3):t()
    t:assertEq(x:totable(), {{0, 3}, {1, 4}, {2, 5}}, "non-contiguous in logical order")
end

function tests.dtype_conversions(t)
    local x = ml.tensor({1, 2.5, -3})
    t:assertEq(x:double().dtype, "f64")
    t:assertEq(x:to("f64"):float():totable(), {1, 2.5, -3}, "f32 -> f64 -> f32")
    t:assertEq(x:to{dtype = "bf16"}.dtype, "bf16")
    t:assertEq(x:half().dtype, "f16")
    t:assertEq(x:long().dtype, "i64")
    t:assertEq(x:to(ml.zeros(1, {dtype = "i32"})).dtype, "i32", "to(other tensor)")
    t:assertEq(ml.tensor({2.7, -2.7, 0.5, -0.5}):int():totable(), {2, -2, 0, 0}, "float -> int truncates")
    t:assertEq(ml.tensor({2, 0, -1}):bool():totable(), {true, false, true})
    t:assertEq(ml.tensor({true, false}, {dtype = "bool"}):float():totable(), {1, 0})
    t:assert(x:float() ~= nil)
    t:assert(has(error_of(x.to, x, "xpu"), "neither a dtype"))
end

function tests.half_precision_rounding(t)
    -- f16: 10 mantissa bits, max 65504, subnormals down to 2^-24
    local h = ml.tensor({1 + 2 ^ -11, 1 + 3 * 2 ^ -11, 65504, 70000, 2 ^ -24, 2 ^ -26, 1 / 3}, {dtype = "f64"}):half():double()
    local v = h:totable()
    t:assertEq(v[1], 1, "half-way rounds to even (down)")
    t:assertEq(v[2], 1 + 2 ^ -9, "half-way rounds to even (up)")
    t:assertEq(v[3], 65504, "largest half")
    t:assertEq(v[4], math.huge, "overflow to inf")
    t:assertEq(v[5], 2 ^ -24, "smallest subnormal")
    t:assertEq(v[6], 0, "underflow to zero")
    t:assertEq(v[7], 0.333251953125, "1/3 to nearest half")
    -- bf16: 7 mantissa bits, f32's range
    local b = ml.tensor({1 + 2 ^ -8, 1 + 3 * 2 ^ -8, 256.9, 1e30, 1 / 3}, {dtype = "f64"}):bf16():double():totable()
    t:assertEq(b[1], 1, "half-way rounds to even (down)")
    t:assertEq(b[2], 1 + 2 ^ -6, "half-way rounds to even (up)")
    t:assertEq(b[3], 256, "256.9 to nearest")
    t:assert(b[4] < math.huge and math.abs(b[4] - 1e30) / 1e30 < 2 ^ -8, "bf16 keeps f32's range")
    t:assertEq(b[5], 0.333984375)
    -- round trip through f32 is exact for values a half type represents
    local exact = ml.tensor({0.5, -1.75, 1024, 3.140625})
    t:assertEq(exact:half():float():totable(), exact:totable())
    t:assertEq(exact:bf16():float():totable(), exact:totable())
end

function tests.copy_converts_and_broadcasts(t)
    local d = ml.zeros(2, 3)
    d:copy_(ml.tensor({1, 2, 3}, {dtype = "i64"}))
    t:assertEq(d:totable(), {{1, 2, 3}, {1, 2, 3}})
    t:assert(has(error_of(d.copy_, d, ml.zeros(3, 2)), "[3, 2]"))
    t:assert(has(error_of(d.copy_, d, ml.zeros(3, 2)), "[2, 3]"))
    local r = d:fill_(2)
    t:assert(rawequal(r, d), "in-place methods return self")
    t:assertEq(d:zero_():sum():item(), 0)
end

-- ---- printing ------------------------------------------------------------------

function tests.printing_small(t)
    t:assertEq(tostring(ml.tensor({{1, 2, 3}, {4, 5, 6}})),
        "tensor([[1., 2., 3.],\n        [4., 5., 6.]], shape=[2, 3], dtype=float32, device=cpu)")
    t:assertEq(tostring(ml.tensor({-1, 2.5})), "tensor([-1.0000,  2.5000], shape=[2], dtype=float32, device=cpu)")
    t:assertEq(tostring(ml.tensor({1, 2}, {dtype = "i64"})), "tensor([1, 2], shape=[2], dtype=int64, device=cpu)")
    t:assertEq(tostring(ml.tensor(3)), "tensor(3., shape=[], dtype=float32, device=cpu)")
    t:assertEq(tostring(ml.tensor({true, false}, {dtype = "bool"})),
        "tensor([ true, false], shape=[2], dtype=bool, device=cpu)")
    local g = ml.tensor({1}, {requires_grad = true})
    t:assert(has(tostring(g), "requires_grad=true"))
    t:assert(has(tostring(ml.tensor({1e10, 1e-10})), "e+10"), "scientific when the range is wide")
end

function tests.printing_abbreviates_beyond_1000_elements(t)
    local s = tostring(ml.arange(1000))
    t:assert(not has(s, "..."), "1000 elements print in full")
    s = tostring(ml.arange(2000))
    t:assert(#s < 200, "abbreviated: " .. #s .. " characters")
    t:assertEq(s, "tensor([   0,    1,    2,  ..., 1997, 1998, 1999], shape=[2000], dtype=int64, device=cpu)")
    s = tostring(ml.arange(2000):float():view(40, 50))
    t:assert(has(s, "shape=[40, 50], dtype=float32, device=cpu"), s)
    local lines = {}
    for l in s:gmatch("[^\n]*") do lines[#lines + 1] = l end
    t:assertEq(lines[1], "tensor([[   0.,    1.,    2.,  ...,   47.,   48.,   49.],")
    t:assertEq(lines[4], "        ...,", "rows abbreviated like PyTorch, no blank line")
    t:assertEq(lines[5], "        [1850., 1851., 1852.,  ..., 1897., 1898., 1899.],")
end

-- ---- errors and lifetime -------------------------------------------------------

function tests.shape_errors_name_both_shapes(t)
    local a, b = ml.ones(2, 3), ml.ones(3, 2)
    local e = error_of(function() return a + b end)
    t:assert(has(e, "[2, 3]") and has(e, "[3, 2]"), tostring(e))
    e = error_of(function() return a:matmul(a) end)
    t:assert(has(e, "[2, 3]") and has(e, "matmul"), tostring(e))
    e = error_of(ml.F.linear, ml.ones(2, 3), ml.ones(4, 2))
    t:assert(has(e, "[2, 3]") and has(e, "[4, 2]"), tostring(e))
    e = error_of(ml.cat, {ml.ones(2, 3), ml.ones(2, 4)}, 1)
    t:assert(has(e, "[2, 3]") and has(e, "[2, 4]"), tostring(e))
end

function tests.dtype_errors(t)
    local i = ml.ones(2, 2, {dtype = "i32"})
    t:assert(has(error_of(i.matmul, i, i), "float"), "matmul of ints")
    t:assert(has(error_of(ml.F.softmax, i), "float"))
    t:assert(has(error_of(ml.F.embedding, ml.ones(3, 2), ml.ones(2)), "int32 or int64"))
    t:assert(has(error_of(ml.zeros, 2, {dtype = "f8"}), "unknown dtype"))
end

function tests.out_of_range_dims_and_indices(t)
    local x = ml.zeros(2, 3)
    local e = error_of(x.size, x, 3)
    t:assert(has(e, "dimension 3 out of range") and has(e, "1-based"), tostring(e))
    t:assert(has(error_of(x.size, x, -3), "out of range"))
    t:assert(has(error_of(x.size, x, 0), "out of range"), "dim 0 does not exist")
    t:assert(has(error_of(x.sum, x, 3), "out of range"))
    t:assert(has(error_of(x.transpose, x, 1, 3), "out of range"))
    t:assert(has(error_of(x.unsqueeze, x, 4), "out of range"))
    t:assert(has(error_of(x.narrow, x, 1, 0, 1), "1-based"))
    t:assert(has(error_of(x.select, x, 2, 0), "1-based"))
    e = error_of(x.select, x, 2, 4)
    t:assert(has(e, "index 4 out of range") and has(e, "size 3"), "1-based index in the message: " .. tostring(e))
    e = error_of(x.narrow, x, 2, 3, 2)
    t:assert(has(e, "start 3") and has(e, "size 3"), "1-based start in the message: " .. tostring(e))
    t:assert(has(error_of(function() return x[3] end), "index 3 out of range"))
    t:assert(has(error_of(function() return x[0] end), "out of range"))
    t:assert(has(error_of(function() return ml.tensor(1)[1] end), "0-dim"))
end

function tests.freed_tensor(t)
    local x = ml.ones(3)
    t:assert(not x:is_freed())
    x:free()
    t:assert(x:is_freed())
    t:assert(has(error_of(x.size, x), "freed tensor"))
    t:assert(has(error_of(function() return x + 1 end), "freed tensor"))
    -- a freed second operand: the error must not leak the first (ASan run)
    t:assert(has(error_of(ml.add, ml.ones(2), x), "freed tensor"))
    t:assert(has(error_of(ml.where, ml.ones(2):gt(0), ml.ones(2), x), "freed tensor"))
    t:assert(has(error_of(ml.cat, {ml.ones(2), x}), "freed tensor"))
    t:assert(has(error_of(function() return x.dtype end), "freed tensor"))
    t:assertEq(tostring(x), "tensor(<freed>)")
    t:assertNoError(function() x:free() end, "free twice is safe")
end

function tests.close_variable_releases(t)
    local kept
    do
        local x <close> = ml.ones(3)
        kept = x
        t:assert(not x:is_freed())
    end
    t:assert(kept:is_freed(), "released at the end of the block")
    t:assert(has(error_of(kept.numel, kept), "freed tensor"))
end

function tests.fields(t)
    local x = ml.zeros(2, {dtype = "f64"})
    t:assertEq(x.dtype, "f64")
    t:assertEq(x.device, "cpu")
    t:assertEq(x.is_cuda, false)
    t:assertEq(x.requires_grad, false)
    t:assertEq(x.is_leaf, true)
    t:assertEq(x.grad, nil)
    t:assertEq(x.grad_fn, nil)
    t:assertError(function() return x.no_such_field end, "tensor has no field or method 'no_such_field'")
    t:assertError(function() x.dtype = "f32" end, "cannot set field 'dtype'")
end

function tests.cuda_on_a_cpu_only_build(t)
    if ml.core.built_with_cuda then return end
    local x = ml.ones(2)
    local e = error_of(x.to, x, "cuda")
    t:assert(has(e, "cuda:0 is not available") and has(e, "without CUDA"), tostring(e))
    t:assert(has(error_of(x.cuda, x), "not available"))
    t:assert(has(error_of(ml.ones, 2, {device = "cuda"}), "not available"))
    t:assert(x:to("cpu") ~= nil and x:cpu().device == "cpu")
end

return tests
