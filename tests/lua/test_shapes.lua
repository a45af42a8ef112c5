-- test_shapes.lua — the synthetic shapes set (scripts/shapes_dataset.lua)
-- and the toy model pretrained on it (models/toy-shapes): determinism,
-- captions that say what is drawn, the held-out yellow star, the colour
-- features, the error messages, and that the committed model loads and
-- generates.
local ml = require "moonlit"
local util = require "testutil"

local S = dofile("scripts/shapes_dataset.lua")
local T = {}

local function pixel(img, x, y)      -- img [H, W, 3]; x, y 0-based pixel coordinates
    return img[math.floor(y) + 1][math.floor(x) + 1]:totable()
end

local function close(a, b, tol)
    for k = 1, 3 do if math.abs(a[k] - b[k]) > tol then return false end end
    return true
end

function T.same_seed_same_pictures(t)
    local a, b = S.sample(11, 24), S.sample(11, 24)
    t:assertEq(a, b, "specs of one seed")
    t:assertTensorEq(S.render(a), S.render(b), 0, "pictures of one seed")
    local c = S.sample(12, 24)
    local differs = false
    for i = 1, 24 do differs = differs or S.caption(a[i]) ~= S.caption(c[i]) or a[i].cx ~= c[i].cx end
    t:assert(differs, "another seed gives other pictures")
    -- a prefix of a longer draw is the shorter draw
    local long = S.sample(11, 40)
    for i = 1, 24 do t:assertEq(long[i], a[i], "spec " .. i .. " of a longer draw") end
end

-- The colour at a point inside each plain shape is the caption's colour, and
-- the corners are the background's.
function T.captions_say_what_is_drawn(t)
    local specs = S.sample(3, 200, {texture = "plain"})
    local imgs = S.render(specs)
    t:assertEq(imgs:size(), {200, 64, 64, 3})
    local seen = {}
    for i, s in ipairs(specs) do
        local cap = S.caption(s)
        t:assert(util.has(cap, " " .. s.color .. " " .. s.shape .. " on ") and util.has(cap, s.background .. " background"),
                 "caption names the colour, shape and background: " .. cap)
        -- the ring's centre is its hole: probe the middle of its band
        local px = s.shape == "ring" and s.cx + s.size * 0.7 or s.cx
        local img = imgs[i]
        t:assert(close(pixel(img, px, s.cy), S.COLORS[s.color], 1e-5),
                 string.format("picture %d (%s): the shape's colour at its centre", i, cap))
        t:assert(close(pixel(img, 0, 0), S.COLORS[s.background], 1e-6) and close(pixel(img, 63, 63), S.COLORS[s.background], 1e-6),
                 string.format("picture %d (%s): background in the corners", i, cap))
        seen[s.shape] = true
    end
    for _, name in ipairs(S.SHAPES) do t:assert(seen[name], "200 draws include a " .. name) end
end

function T.textures_mix_the_two_colours_inside_the_shape(t)
    for _, tex in ipairs {"striped", "dotted"} do
        local specs = S.sample(5, 6, {texture = tex})
        local imgs = S.render(specs)
        for i, s in ipairs(specs) do
            t:assert(util.has(S.caption(s), "a photo of a " .. tex .. " ") or util.has(S.caption(s), "a photo of an " .. tex .. " "),
                     "caption names the texture: " .. S.caption(s))
            -- the disc of radius size/3 lies inside every shape but the ring
            if s.shape ~= "ring" then
                local n_fg, n_bg = 0, 0
                for dy = -4, 4 do
                    for dx = -4, 4 do
                        local p = pixel(imgs[i], s.cx + dx, s.cy + dy)
                        if close(p, S.COLORS[s.color], 1e-3) then n_fg = n_fg + 1 end
                        if close(p, S.COLORS[s.background], 1e-3) then n_bg = n_bg + 1 end
                    end
                end
                t:assert(n_fg > 5 and n_bg > 1, string.format("%s %s: both colours at the centre (%d shape, %d background pixels)",
                                                              tex, s.shape, n_fg, n_bg))
            end
        end
    end
end

function T.held_out_combination_never_drawn(t)
    local n, stars, yellow = 0, 0, 0
    for _, s in ipairs(S.sample(0, 5000)) do
        t:assert(not S.is_held_out(s), "pretraining specs hold no yellow star")
        t:assert(not util.has(S.caption(s), "yellow star"), "no caption says yellow star: " .. S.caption(s))
        if s.shape == "star" then stars = stars + 1 end
        if s.color == "yellow" then yellow = yellow + 1 end
        n = n + 1
    end
    t:assert(stars > 500 and yellow > 400, string.format("stars (%d) and yellow shapes (%d) are still drawn", stars, yellow))
    for _, s in ipairs(S.sample(0, 50, {held_out = "only"})) do
        t:assert(S.is_held_out(s), "held_out = only draws yellow stars")
    end
    local found = false
    for _, s in ipairs(S.sample(0, 2000, {held_out = "include"})) do found = found or S.is_held_out(s) end
    t:assert(found, "held_out = include draws some yellow stars")
end

function T.features_find_shape_and_background_colours(t)
    local specs = S.sample(9, 8, {texture = "plain"})
    local f = S.features(S.render(specs))
    for i, s in ipairs(specs) do
        t:assert(close(f[i].bg, S.COLORS[s.background], 1e-5), "background colour of picture " .. i)
        -- anti-aliased edge pixels pull the mean a little toward the background
        t:assert(close(f[i].fg, S.COLORS[s.color], 0.08), "shape colour of picture " .. i)
        t:assert(f[i].fg_fraction > 0.02 and f[i].fg_fraction < 0.5, "shape covers part of picture " .. i)
    end
    t:assertNear(S.feature_distance(f[1], f[1]), 0, 0)
    local flat = S.features(ml.full({1, 64, 64, 3}, 0.5))[1]
    t:assert(close(flat.fg, {0.5, 0.5, 0.5}, 1e-6) and flat.fg_fraction == 0, "a flat picture has no foreground")
end

function T.subject_pictures_are_yellow_stars_on_blue(t)
    local mf = {}
    for i = 1, 5 do
        local img = ml.image.load(string.format("examples/data/toy-subject/%06d.png", i))
        t:assertEq(img:size(), {64, 64, 3})
        mf[i] = S.features(img)[1]
        t:assert(close(mf[i].fg, S.COLORS.yellow, 0.08) and close(mf[i].bg, S.COLORS.blue, 0.01),
                 "subject picture " .. i .. " is yellow on blue")
    end
end

function T.bad_input_is_named(t)
    t:assert(util.has(util.error_of(S.sample, 0, 4, {held_out = "sometimes"}), "held_out must be exclude, only or include"))
    t:assert(util.has(util.error_of(S.sample, 1.5, 4), "seed must be an integer"))
    t:assert(util.has(util.error_of(S.sample, 0, -1), "n must be an integer >= 0"))
    local s = S.sample(0, 1)[1]
    s.shape = "hexagon"
    t:assert(util.has(util.error_of(S.render, {s}), "unknown shape 'hexagon' in spec 1"))
    s = S.sample(0, 1)[1]
    s.color = "teal"
    t:assert(util.has(util.error_of(S.render, {s}), "unknown colour 'teal'"))
    t:assert(util.has(util.error_of(S.render, {}), "at least one spec"))
    t:assert(util.has(util.error_of(S.features, ml.zeros(2, 3)), "features expects images"))
end

function T.script_writes_pictures_and_captions(t)
    local dir = util.temp_dir()
    local specs = S.write(dir, 4, 3)
    local lines = {}
    for line in util.read_file(dir .. "/captions.jsonl"):gmatch("[^\n]+") do lines[#lines + 1] = ml.core.json_decode(line) end
    t:assertEq(#lines, 3)
    local imgs = S.render(specs)
    for i, row in ipairs(lines) do
        t:assertEq(row.caption, S.caption(specs[i]))
        t:assertEq(row.file, string.format("%06d.png", i))
        -- PNG stores bytes: equal to the rendering within half a step
        t:assertTensorEq(ml.image.load(dir .. "/" .. row.file), imgs[i], 0.5 / 255 + 1e-6, "picture " .. i)
    end
    util.remove_tree(dir)
end

function T.committed_model_loads_and_generates(t)
    local dir = "models/toy-shapes"
    if not ml.core.is_file(dir .. "/tokenizer/vocab.json") then
        error("models/toy-shapes/tokenizer has no vocab.json: run scripts/fetch_clip_vocab.sh (make fixtures)")
    end
    local m = ml.sd.load(dir)
    t:assert(m.vae.scaling_factor > 0.2 and m.vae.scaling_factor < 5 and m.vae.scaling_factor ~= 1,
             "scaling_factor was measured on the latents: " .. m.vae.scaling_factor)
    local img = ml.sd.generate(m, {prompt = "a photo of a red circle on a blue background", num_inference_steps = 2,
                                   guidance_scale = 4, seed = 0})
    t:assertEq(img:size(), {1, 64, 64, 3})
    local lo, hi = -(-img):max():item(), img:max():item()
    t:assert(lo >= 0 and hi <= 1 and hi - lo > 0.05, string.format("an image in [0, 1] with contrast (%.3f..%.3f)", lo, hi))
end

return T
