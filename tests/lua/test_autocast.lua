-- test_autocast.lua — nn.autocast: layers compute in the chosen dtype while
-- parameters keep theirs, and gradients come back in the parameters' dtype.
-- On the CPU the compute dtype is f64 (the GPU uses bf16: the same code path).
local ml = require "moonlit"
local nn = ml.nn

local T = {}

local function model()
    ml.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, {padding = 1}), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))
end

function T.computes_in_the_autocast_dtype_and_keeps_f32_params(t)
    local m = model()
    local x = ml.randn({2, 6, 6, 3})
    local y = nn.autocast("f64", function() return m(x) end)
    t:assertEq(y.dtype, "f64")
    t:assertEq(m:children()[1].weight.dtype, "f32", "parameters keep their dtype")
    t:assertEq(nn.compute_dtype(), nil, "autocast ends with the call")
end

function T.gradients_arrive_in_the_parameter_dtype_and_agree(t)
    local m = model()
    local x = ml.randn({2, 6, 6, 3})
    local loss = (m(x) ^ 2):mean()
    loss:backward()
    local ref = {}
    for i, p in ipairs(m:parameters()) do ref[i] = p.grad:clone() end
    m:zero_grad()
    local loss64 = nn.autocast("f64", function() return (m(x) ^ 2):mean() end)
    loss64:backward()
    t:assertNear(loss64:item(), loss:item(), 1e-5 * math.abs(loss:item()))
    for i, p in ipairs(m:parameters()) do
        t:assertEq(p.grad.dtype, "f32")
        t:assertRelErr(p.grad, ref[i], 1e-5, "grad " .. i)
    end
end

function T.autocast_restores_the_mode_after_an_error(t)
    t:assertError(function() nn.autocast("f64", function() error("boom") end) end, "boom")
    t:assertEq(nn.compute_dtype(), nil)
end

function T.sd_text_encoder_under_autocast(t)
    local m = ml.sd.load("tests/fixtures/sd1-tiny/pipeline", {components = {"text_encoder"}})
    local r = ml.core.st_load("tests/fixtures/sd1-tiny/text_encoder.safetensors")
    local y = ml.no_grad(function() return nn.autocast("f64", function() return m.text_encoder(r.input_ids) end) end)
    t:assertEq(y.dtype, "f64")
    t:assertRelErr(y, r.last_hidden_state, 1e-6, "f64 compute from f32 weights matches the reference")
end

return T
