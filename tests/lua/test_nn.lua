-- test_nn.lua — ml.nn: the Module API (parameter order and PyTorch names,
-- containers, state_dict round trips incl. the torch conv layout, strict
-- loading errors, train/eval, to()), and PyTorch's default initialisation.
local ml = require "moonlit"
local util = require "testutil"
local nn = ml.nn

local tests = {}

local error_of, has = util.error_of, util.has

local function names(list)
    local out = {}
    for i, np in ipairs(list) do out[i] = np[1] end
    return out
end

-- A custom module with its own parameter, a buffer and children.
local Block = nn.Module:extend("Block")
function Block:init(dim)
    self:register_parameter("scale", ml.ones(dim))
    self:register_buffer("running", ml.zeros(dim))
    self.proj = self:add_module("proj", nn.Linear(dim, dim))
    self.norm = self:add_module("norm", nn.LayerNorm(dim))
end
function Block:forward(x) return self.norm(self.proj(x) * self.scale) end

function tests.parameter_order_and_names(t)
    local m = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
    t:assertEq(names(m:named_parameters()), {"0.weight", "0.bias", "2.weight", "2.bias"},
               "Sequential children are named from 0 like PyTorch")
    local ps = m:parameters()
    t:assertEq(#ps, 4)
    t:assert(rawequal(ps[1], m["0"].weight) and rawequal(ps[4], m["2"].bias), "same order as named_parameters")
    t:assertEq(ps[1]:size(), {4, 3}, "Linear weight is [out, in]")
    for _, p in ipairs(ps) do t:assert(p.requires_grad and p.is_leaf) end
    t:assertEq(m:num_parameters(), 4 * 3 + 4 + 2 * 4 + 2)
    local b = Block(3)
    t:assertEq(names(b:named_parameters()),
               {"scale", "proj.weight", "proj.bias", "norm.weight", "norm.bias"},
               "own parameters first, then children in registration order")
    t:assertEq(names(b:named_buffers()), {"running"})
    t:assertEq(names(b:named_modules()), {"", "proj", "norm"})
    t:assertEq(#b:children(), 2)
    t:assertEq(b:named_children()[1][1], "proj")
end

function tests.module_list_and_nesting(t)
    local l = nn.ModuleList({nn.Linear(2, 2), nn.Linear(2, 3)})
    l:append(Block(3))
    t:assertEq(#l, 3)
    t:assert(rawequal(l[1], l["0"]), "Lua access l[1] is child \"0\"")
    t:assertEq(l[2].out_features, 3)
    t:assertEq(names(l:named_parameters()), {"0.weight", "0.bias", "1.weight", "1.bias", "2.scale",
                                             "2.proj.weight", "2.proj.bias", "2.norm.weight", "2.norm.bias"})
    local n = 0
    for i, m in l:ipairs() do n = n + 1 t:assert(rawequal(m, l[i])) end
    t:assertEq(n, 3)
    local outer = nn.Sequential(nn.Sequential(nn.Linear(1, 1)), nn.Linear(1, 1))
    t:assertEq(names(outer:named_parameters()), {"0.0.weight", "0.0.bias", "1.weight", "1.bias"})
    local s = nn.Sequential({nn.Linear(1, 2), nn.ReLU()})
    t:assertEq(#s:children(), 2, "Sequential also takes a list")
    s:add(nn.Linear(2, 1))
    t:assertEq(names(s:named_parameters())[3], "2.weight", "add appends with the next index")
    t:assertEq(s(ml.ones(5, 1)):size(), {5, 1})
    local all = nn.parameters(l, outer)
    t:assertEq(#all, 9 + 4, "nn.parameters joins modules in order")
end

function tests.state_dict_round_trip(t)
    ml.manual_seed(1)
    local a = Block(4)
    ml.manual_seed(2)
    local b = Block(4)
    local x = ml.randn(2, 4)
    t:assert((a(x) - b(x)):abs():max():item() > 1e-3, "different initialisations")
    local sd = a:state_dict()
    t:assertEq(sd._order, {"scale", "proj.weight", "proj.bias", "norm.weight", "norm.bias", "running"},
               "parameters then buffers, in order")
    t:assert(not sd["proj.weight"].requires_grad, "detached by default")
    t:assert(a:state_dict({keep_vars = true})["proj.weight"].requires_grad, "keep_vars")
    local res = b:load_state_dict(sd)
    t:assertEq(res.missing, {})
    t:assertEq(res.unexpected, {})
    t:assertTensorEq(b(x), a(x), 0, "same outputs after loading")
    t:assert(not rawequal(b.proj.weight, a.proj.weight), "values were copied")
    t:assert(b.proj.weight.requires_grad, "parameters still require grad")
    -- dtype conversion on load
    local sd64 = {}
    for k, v in pairs(sd) do if type(k) == "string" then sd64[k] = v:double() end end
    b:load_state_dict(sd64)
    t:assertEq(b.proj.weight.dtype, "f32", "copied into the existing f32 tensors")
    -- assign replaces the tensors, converted to the parameter's dtype
    local c = Block(4)
    c:load_state_dict(sd64, {assign = true})
    t:assertEq(c.proj.weight.dtype, "f32")
    t:assert(c.proj.weight.requires_grad)
    t:assert(rawequal(c:parameters()[2], c.proj.weight), "the module tree holds the new tensor")
    t:assertTensorEq(c(x), a(x), 1e-6)
end

function tests.state_dict_torch_layout_permutes_conv_weights(t)
    local m = nn.Sequential(nn.Conv2d(2, 3, {3, 2}), nn.Linear(3, 3))
    local w = m["0"].weight
    t:assertEq(w:size(), {3, 3, 2, 2}, "stored [O, kh, kw, I]")
    local sd = m:state_dict({layout = "torch"})
    local tw = sd["0.weight"]
    t:assertEq(tw:size(), {3, 2, 3, 2}, "saved [O, I, kh, kw]")
    t:assertEq(tw[2][1][3][2]:item(), w[2][3][2][1]:item(), "element (o, i, y, x) = (o, y, x, i)")
    t:assertEq(tw[3][2][1][1]:item(), w[3][1][1][2]:item())
    t:assertEq(sd["1.weight"]:size(), {3, 3}, "only conv weights are permuted")
    t:assertEq(m:state_dict()["0.weight"]:size(), {3, 3, 2, 2}, "default layout is the native one")
    local m2 = nn.Sequential(nn.Conv2d(2, 3, {3, 2}), nn.Linear(3, 3))
    local e = error_of(m2.load_state_dict, m2, sd)
    t:assert(has(e, "0.weight") and has(e, "size mismatch"), "a torch layout file needs layout = 'torch'")
    m2:load_state_dict(sd, {layout = "torch"})
    t:assertTensorEq(m2["0"].weight, w, 0, "round trip through the torch layout")
    local m3 = nn.Sequential(nn.Conv2d(2, 3, {3, 2}), nn.Linear(3, 3))
    m3:load_state_dict(sd, {layout = "torch", assign = true})
    t:assertTensorEq(m3["0"].weight, w, 0, "assign converts the layout too")
    t:assert(m3["0"].weight:is_contiguous())
end

function tests.strict_loading_reports_every_problem(t)
    local m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    local before, bias_before = m["0"].weight:clone(), m["0"].bias:clone()
    local sd = {
        ["0.weight"] = ml.zeros(3, 3),          -- wrong shape
        ["0.bias"] = ml.zeros(3),
        ["1.weight"] = ml.zeros(1, 3),
        ["extra.weight"] = ml.zeros(1),         -- unexpected
    }                                           -- "1.bias" missing
    local e = error_of(m.load_state_dict, m, sd)
    t:assert(has(e, "Sequential"), tostring(e))
    t:assert(has(e, "size mismatch") and has(e, "0.weight: checkpoint [3, 3], model [3, 2]"), tostring(e))
    t:assert(has(e, "missing keys") and has(e, "1.bias"), tostring(e))
    t:assert(has(e, "unexpected keys") and has(e, "extra.weight"), tostring(e))
    t:assertTensorEq(m["0"].weight, before, 0, "nothing loaded when strict loading fails")
    t:assertTensorEq(m["0"].bias, bias_before, 0, "not even the tensors that matched")
    -- non-strict: missing and unexpected are returned, shapes still must match
    sd["0.weight"] = ml.ones(3, 2)
    local res = m:load_state_dict(sd, {strict = false})
    t:assertEq(res.missing, {"1.bias"})
    t:assertEq(res.unexpected, {"extra.weight"})
    t:assertTensorEq(m["0"].weight, ml.ones(3, 2), 0, "the rest was loaded")
    sd["0.weight"] = ml.ones(2, 2)
    t:assert(has(error_of(m.load_state_dict, m, sd, {strict = false}), "size mismatch"))
end

function tests.train_eval_flags(t)
    local m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.9)))
    t:assert(m.training and m["1"].training and m["2"]["0"].training, "modules start in training mode")
    t:assert(rawequal(m:eval(), m), "eval returns the module")
    t:assert(not m.training and not m["1"].training and not m["2"]["0"].training, "eval reaches every child")
    local x = ml.ones(4, 2)
    t:assertTensorEq(m(x), m(x), 0, "no dropout in eval mode")
    m:train()
    t:assert(m["2"]["0"].training)
    m:train(false)
    t:assert(not m["1"].training, "train(false) is eval")
end

function tests.to_converts_parameters_and_buffers(t)
    local b = Block(3)
    local before = b.proj.weight:clone()
    t:assert(rawequal(b:to("f64"), b), "to returns the module")
    t:assertEq(b.proj.weight.dtype, "f64")
    t:assertEq(b.running.dtype, "f64", "buffers too")
    t:assert(b.proj.weight.requires_grad and b.proj.weight.is_leaf, "converted parameters are leaves")
    t:assert(rawequal(b:parameters()[2], b.proj.weight), "parameters() sees the new tensors")
    t:assertTensorEq(b.proj.weight, before:double(), 0)
    t:assertEq(b(ml.ones(2, 3, {dtype = "f64"})).dtype, "f64")
    b:to{dtype = "f32"}
    t:assertEq(b.scale.dtype, "f32")
    if not ml.core.built_with_cuda then
        t:assert(has(error_of(b.to, b, "cuda"), "not available"), "to('cuda') on a CPU-only build")
    end
end

function tests.grad_helpers(t)
    local m = nn.Linear(2, 1)
    m(ml.ones(3, 2)):sum():backward()
    t:assert(m.weight.grad ~= nil)
    m:zero_grad()
    t:assertEq(m.weight.grad, nil, "zero_grad clears")
    m:requires_grad_(false)
    t:assert(not m.weight.requires_grad and not m.bias.requires_grad)
    t:assert(not m(ml.ones(1, 2)).requires_grad, "frozen module records nothing")
    m:requires_grad_()
    t:assert(m.weight.requires_grad)
end

function tests.layers_forward(t)
    local lin = nn.Linear(3, 2, {bias = false})
    t:assertEq(lin.bias, nil)
    t:assertEq(#lin:parameters(), 1)
    local x = ml.randn(4, 3)
    t:assertTensorEq(lin(x), x:matmul(lin.weight:t()), 1e-5)
    local conv = nn.Conv2d(3, 5, 3, {stride = 2, padding = 1})
    t:assertEq(conv(ml.randn(2, 8, 8, 3)):size(), {2, 4, 4, 5}, "NHWC in, NHWC out")
    t:assertEq(nn.LayerNorm(3)(x):size(), {4, 3})
    t:assertEq(nn.GroupNorm(2, 4)(ml.randn(1, 2, 2, 4), {silu = true}):size(), {1, 2, 2, 4})
    t:assertTensorEq(nn.GELU()(x), ml.gelu(x), 0)
    t:assertTensorEq(nn.GELU("tanh")(x), ml.gelu_tanh(x), 0)
    t:assertTensorEq(nn.SiLU()(x), x:silu(), 0)
    t:assertTensorEq(nn.Identity()(x), x, 0)
    t:assert(has(tostring(conv), "Conv2d(3, 5, kernel=3x3"))
    local Bare = nn.Module:extend("Bare")
    t:assert(has(error_of(function() return Bare()(x) end), "Bare: forward is not implemented"))
    t:assert(has(error_of(nn.GroupNorm, 3, 4), "divisible"))
end

-- ---- default initialisation (PyTorch's) -------------------------------------------

local function stats(x)
    local d = x:double()
    return d:mean():item(), d:var({1, 2}, {correction = 0}):item(), -(-d):max():item(), d:max():item()
end

function tests.linear_and_conv_init_as_pytorch(t)
    ml.manual_seed(10)
    local lin = nn.Linear(64, 256)
    local bound = 1 / math.sqrt(64)
    local mean, var, lo, hi = stats(lin.weight)
    t:assert(lo >= -bound and hi <= bound, "weight within +-1/sqrt(in)")
    t:assert(lo < -0.95 * bound and hi > 0.95 * bound, "and fills that range")
    t:assertNear(mean, 0, 0.005)
    t:assertNear(var, bound * bound / 3, 0.1 * bound * bound / 3, "uniform variance")
    local b = lin.bias:double()
    t:assert(b:abs():max():item() <= bound, "bias within +-1/sqrt(in)")
    local conv = nn.Conv2d(8, 32, 3)
    local cb = 1 / math.sqrt(8 * 3 * 3)
    local w = conv.weight:view(32, -1)
    mean, var, lo, hi = stats(w)
    t:assert(lo >= -cb and hi <= cb and hi > 0.9 * cb, "conv weight within +-1/sqrt(in*kh*kw)")
    t:assertNear(var, cb * cb / 3, 0.15 * cb * cb / 3)
end

function tests.norm_and_embedding_init_as_pytorch(t)
    local ln = nn.LayerNorm(5)
    t:assertEq(ln.weight:totable(), {1, 1, 1, 1, 1})
    t:assertEq(ln.bias:totable(), {0, 0, 0, 0, 0})
    t:assertEq(ln.eps, 1e-5)
    local gn = nn.GroupNorm(2, 4)
    t:assertEq(gn.weight:totable(), {1, 1, 1, 1})
    t:assertEq(gn.bias:totable(), {0, 0, 0, 0})
    t:assertEq(#nn.LayerNorm(5, {elementwise_affine = false}):parameters(), 0)
    t:assertEq(#nn.GroupNorm(2, 4, {affine = false}):parameters(), 0)
    ml.manual_seed(11)
    local emb = nn.Embedding(200, 100)
    local mean, var = stats(emb.weight)
    t:assertNear(mean, 0, 0.02, "Embedding ~ N(0, 1)")
    t:assertNear(var, 1, 0.03)
    local skipped = nn.no_init(function() return nn.Linear(2, 2) end)
    t:assertEq(skipped.weight:size(), {2, 2}, "no_init still builds the module")
end

return tests
