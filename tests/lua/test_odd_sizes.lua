-- test_odd_sizes.lua — sizes that do not divide by the UNet's overall
-- downsampling factor: the UNet upsamples to each skip's size as diffusers
-- does, checked against diffusers (tests/fixtures/sd1-tiny/odd_size.safetensors,
-- made by scripts/make_odd_size_fixture.py) and through generation and a
-- training step at such sizes.
local ml = require "moonlit"
local B = require "moonlit.models.blocks"
local core = ml.core

local FIX = "tests/fixtures/sd1-tiny"
-- the fixtures' tolerance: relative L2 error against diffusers in float32
local TOL = 1e-4

local function nchw_to_nhwc(x) return x:permute(1, 3, 4, 2):contiguous() end
-- finite: no NaN (x ~= x) and no infinity
local function finite(x)
    local s = x:double():abs():sum():item()
    return s == s and s < math.huge
end

local model
local function tiny()
    model = model or ml.sd.load(FIX .. "/pipeline")
    return model
end

local T = {}

-- PyTorch's interpolate(size=...) source rows for a few size pairs (printed
-- by torch.nn.functional.interpolate on arange inputs, 1-based here).
function T.nearest_indices_match_pytorch(t)
    local cases = {
        {2, 3, {1, 1, 2}}, {3, 5, {1, 1, 2, 2, 3}}, {4, 7, {1, 1, 2, 2, 3, 3, 4}},
        {7, 13, {1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7}}, {5, 3, {1, 2, 4}},
        {3, 9, {1, 1, 1, 2, 2, 2, 3, 3, 3}}, {10, 3, {1, 4, 7}},
    }
    for _, c in ipairs(cases) do
        local got = B.nearest_source_index(c[1], c[2]):totable()
        t:assertEq(got, c[3], c[1] .. " -> " .. c[2])
    end
    -- 49 -> 100: float32 rounding of 0.49 * i makes row 25 appear three times
    local idx = B.nearest_source_index(49, 100):totable()
    local count = {}
    for _, v in ipairs(idx) do count[v] = (count[v] or 0) + 1 end
    t:assertEq({count[1], count[24], count[25], count[26], count[49]}, {3, 2, 3, 2, 2}, "49 -> 100 repeats")
end

function T.resize_nearest_values_and_gradient(t)
    local x = core.arange(0, 2 * 3 * 5 * 2, {dtype = "f32"}):view(2, 3, 5, 2)
    x.requires_grad = true
    local y = B.resize_nearest(x, {5, 7})
    t:assertEq(y:size(), {2, 5, 7, 2})
    -- out[n, i, j, c] = x[n, rows[i], cols[j], c]
    local rows, cols = B.nearest_source_index(3, 5):totable(), B.nearest_source_index(5, 7):totable()
    local xs, ys = x:detach():totable(), y:detach():totable()
    local bad = 0
    for n = 1, 2 do for i = 1, 5 do for j = 1, 7 do for c = 1, 2 do
        if ys[n][i][j][c] ~= xs[n][rows[i]][cols[j]][c] then bad = bad + 1 end
    end end end end
    t:assertEq(bad, 0, "resized values are the picked source values")
    -- the gradient of each source is how many outputs read it
    y:sum():backward()
    local g = x.grad:totable()
    local function uses(list, k) local u = 0; for _, v in ipairs(list) do if v == k then u = u + 1 end end; return u end
    bad = 0
    for n = 1, 2 do for i = 1, 3 do for j = 1, 5 do for c = 1, 2 do
        if g[n][i][j][c] ~= uses(rows, i) * uses(cols, j) then bad = bad + 1 end
    end end end end
    t:assertEq(bad, 0, "gradient counts the reads")
    -- an exact doubling takes the upsample kernel and agrees with it
    t:assertTensorEq(B.resize_nearest(x:detach(), {6, 10}), core.upsample_nearest2d(x:detach(), 2), 0, "doubling")
    t:assertError(function() B.resize_nearest(x, {0, 3}) end, "size must be two positive integers")
end

function T.unet_at_odd_latent_sizes_matches_diffusers(t)
    local m = tiny()
    local r = core.st_load(FIX .. "/odd_size.safetensors")
    for _, name in ipairs {"unet", "unet_b"} do
        local out = core.no_grad(function()
            return m.unet(nchw_to_nhwc(r[name .. ".sample"]), r[name .. ".timesteps"], r[name .. ".encoder_hidden_states"])
        end)
        t:assertRelErr(out:permute(1, 4, 2, 3), r[name .. ".out"], TOL, name .. " at " ..
                       r[name .. ".sample"]:size(3) .. "x" .. r[name .. ".sample"]:size(4))
    end
end

function T.pipeline_at_40x56_matches_diffusers(t)
    local m = tiny()
    local r = core.st_load(FIX .. "/odd_size.safetensors")
    local img = ml.sd.generate(m, {prompt = "a dog", num_inference_steps = 3, guidance_scale = 7.5,
                                   latents = nchw_to_nhwc(r["pipeline.latents"]), height = 40, width = 56})
    t:assertEq(img:size(), {1, 40, 56, 3})
    t:assertRelErr(img, r["pipeline.image"], TOL, "40x56 image")
end

-- every size the multiple-of-8 check lets through generates, at the right size
function T.generate_shapes(t)
    local m = tiny()
    for _, hw in ipairs {{32, 48}, {32, 32}, {72, 64}, {8, 8}, {16, 16}, {24, 8}} do
        local img = ml.sd.generate(m, {prompt = "a dog", num_inference_steps = 1, seed = 1,
                                       height = hw[1], width = hw[2]})
        t:assertEq(img:size(), {1, hw[1], hw[2], 3}, hw[1] .. "x" .. hw[2])
        t:assert(finite(img), "finite image")
    end
end

-- at full size (VAE factor 8) any multiple of 8: the UNet's shape logic on
-- the latents of 520x520 and 600x800 images (65x65, 75x100)
function T.unet_full_size_latent_shapes(t)
    local m = tiny()
    local ctx = core.randn({1, 77, m.unet.config.cross_attention_dim})
    for _, hw in ipairs {{65, 65}, {75, 100}} do
        local out = core.no_grad(function() return m.unet(core.randn({1, hw[1], hw[2], 4}), 500, ctx) end)
        t:assertEq(out:size(), {1, hw[1], hw[2], 4}, hw[1] .. "x" .. hw[2] .. " latents")
    end
end

-- training at an odd size (as --resolution 520 gives): gradients reach the
-- first layer and are finite
function T.training_step_at_odd_size(t)
    local m = tiny()
    local unet = m.unet
    unet:zero_grad()
    local x = core.randn({2, 5, 7, 4})
    local pred = unet(x, core.tensor({3, 700}, {dtype = "i64"}), core.randn({2, 77, unet.config.cross_attention_dim}))
    local loss = ((pred - x) ^ 2):mean()
    loss:backward()
    local g = unet.conv_in.weight.grad
    t:assert(g ~= nil, "conv_in has a gradient")
    t:assert(finite(g) and g:abs():sum():item() > 0, "conv_in gradient finite and non-zero")
    unet:zero_grad()
end

return T
