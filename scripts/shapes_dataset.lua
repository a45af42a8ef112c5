-- shapes_dataset.lua — a synthetic captioned image set for the toy Stable
-- Diffusion (models/toy-shapes): 64x64 RGB pictures of one shape (circle,
-- square, triangle, ring, star, cross) in one colour, plain, striped or
-- dotted, somewhere on a plain background of another colour, each with a
-- caption such as "a photo of a striped red circle on a blue background".
--
-- Everything is a pure function of the seed: the picture parameters come
-- from a splitmix64 stream in Lua (not from moonlit's tensor generator), and
-- the pictures are drawn with tensor ops from those parameters, so a seed
-- gives the same data on any device and in any process.
--
-- One combination, the yellow star (any texture, any background), is held
-- out: sample() never draws it unless asked to (`held_out = "only"`), so a
-- model pretrained on this set has never seen a yellow star, and DreamBooth
-- on a few yellow stars has something visible to teach it.
--
-- As a module:  local S = dofile("scripts/shapes_dataset.lua")
--   S.sample(seed, n, {held_out = "exclude"|"only"|"include"}) -> list of specs
--   S.caption(spec)                 -> "a photo of a ..."
--   S.render(specs, {device = "cpu"}) -> [N, 64, 64, 3] f32 in [0, 1]
--   S.features(images)              -> list of {fg = {r,g,b}, bg = {r,g,b}} per image
--   S.feature_distance(a, b)        -> L2 distance of two features (6 numbers)
-- As a script:
--   moonlit scripts/shapes_dataset.lua --out DIR [--n 16] [--seed 0] [--held_out exclude|only|include]
-- writes DIR/000001.png ... and DIR/captions.jsonl ({"file": ..., "caption": ..., plus the spec}).
local ml = require "moonlit"

local S = {}

S.SIZE = 64
S.SHAPES = {"circle", "square", "triangle", "ring", "star", "cross"}
S.TEXTURES = {"plain", "striped", "dotted"}
-- colour names are single CLIP tokens; values are sRGB in [0, 1]
S.COLORS = {
    red = {0.90, 0.10, 0.10}, green = {0.10, 0.70, 0.20}, blue = {0.15, 0.25, 0.90},
    yellow = {0.95, 0.85, 0.10}, purple = {0.55, 0.15, 0.75}, orange = {1.00, 0.55, 0.05},
    white = {0.95, 0.95, 0.95}, black = {0.05, 0.05, 0.05},
}
S.COLOR_NAMES = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
S.BACKGROUND_NAMES = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray"}
S.COLORS.gray = {0.50, 0.50, 0.50}
S.HELD_OUT = {shape = "star", color = "yellow"}

-- How far a shape reaches from its centre, in units of its size (the
-- triangle's apex is the farthest); positions keep this plus a margin inside
-- the picture, so the border pixels are always background.
local EXTENT = 1.2
local MARGIN = 2
S.MIN_SIZE, S.MAX_SIZE = 11, 20

function S.is_held_out(spec)
    return spec.shape == S.HELD_OUT.shape and spec.color == S.HELD_OUT.color
end

-- ---- deterministic parameters --------------------------------------------------

-- splitmix64 over Lua's wrapping 64-bit integers; returns a function giving
-- floats in [0, 1).
local function stream(seed)
    if math.type(seed) ~= "integer" then error("shapes_dataset: seed must be an integer (got " .. tostring(seed) .. ")", 3) end
    local state = seed
    return function()
        state = state + 0x9E3779B97F4A7C15
        local z = state
        z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ~ (z >> 27)) * 0x94D049BB133111EB
        z = z ~ (z >> 31)
        return (z >> 11) * 2.0 ^ -53
    end
end

local function pick(u, list) return list[math.floor(u() * #list) + 1] end

local HELD_OUT_MODES = {exclude = true, only = true, include = true}

-- n picture specs for a seed.  held_out: "exclude" (default; redraws the
-- held-out combination), "only" (every spec is a yellow star) or "include".
-- opts.texture / opts.background fix those fields (subject pictures).
function S.sample(seed, n, opts)
    opts = opts or {}
    local mode = opts.held_out or "exclude"
    if not HELD_OUT_MODES[mode] then
        error("shapes_dataset: held_out must be exclude, only or include (got " .. tostring(mode) .. ")", 2)
    end
    if math.type(n) ~= "integer" or n < 0 then error("shapes_dataset: n must be an integer >= 0 (got " .. tostring(n) .. ")", 2) end
    local u = stream(seed)
    local specs = {}
    while #specs < n do
        local spec = {}
        if mode == "only" then
            spec.shape, spec.color = S.HELD_OUT.shape, S.HELD_OUT.color
        else
            spec.shape, spec.color = pick(u, S.SHAPES), pick(u, S.COLOR_NAMES)
        end
        repeat spec.background = opts.background or pick(u, S.BACKGROUND_NAMES) until spec.background ~= spec.color
        -- half the pictures plain, a quarter each striped and dotted
        local t = u()
        spec.texture = opts.texture or (t < 0.5 and "plain" or t < 0.75 and "striped" or "dotted")
        spec.size = S.MIN_SIZE + u() * (S.MAX_SIZE - S.MIN_SIZE)
        local lo = spec.size * EXTENT + MARGIN
        spec.cx = lo + u() * (S.SIZE - 2 * lo)
        spec.cy = lo + u() * (S.SIZE - 2 * lo)
        if mode ~= "exclude" or not S.is_held_out(spec) then specs[#specs + 1] = spec end
    end
    return specs
end

-- "a" or "an" before a word (only "orange" among the words here needs "an")
local function article(word) return word:match("^[aeiou]") and "an " .. word or "a " .. word end

function S.caption(spec)
    local tex = spec.texture == "plain" and "" or spec.texture .. " "
    return string.format("a photo of %s %s on %s background", article(tex .. spec.color), spec.shape, article(spec.background))
end

-- ---- drawing ------------------------------------------------------------------

-- Signed distances (pixels, negative inside) of each shape, for a batch:
-- dx, dy [N, H, W] from the centre, r the radius, R [N, 1, 1] the size.
local sdf = {}
function sdf.circle(dx, dy, r, R) return r - R end
function sdf.ring(dx, dy, r, R) return (r - R * 0.7):abs() - R * 0.3 end
function sdf.square(dx, dy, r, R) return ml.maximum(dx:abs(), dy:abs()) - R * 0.85 end
function sdf.cross(dx, dy, r, R)
    local ax, ay, w = dx:abs(), dy:abs(), R * 0.32
    return ml.minimum(ml.maximum(ax - R, ay - w), ml.maximum(ax - w, ay - R))
end
-- equilateral, apex up, centroid at the centre: three half-planes at the inradius
function sdf.triangle(dx, dy, r, R)
    local inr = R * 0.6
    local c30, s30 = math.sqrt(3) / 2, 0.5
    local bottom = dy - inr
    local left = dx * (-c30) - dy * s30 - inr
    local right = dx * c30 - dy * s30 - inr
    return ml.maximum(ml.maximum(bottom, left), right)
end
-- five points up: the radius swings with cos(5 theta), theta measured from
-- straight up, computed from cos(theta) by the Chebyshev polynomial (no atan2)
function sdf.star(dx, dy, r, R)
    local c = -dy / (r + 1e-6)
    local c2 = c * c
    local cos5 = c * (c2 * (c2 * 16 - 20) + 5)
    local lobe = ml.clamp((cos5 + 1) * 0.5, 0, 1):pow(1.5)      -- clamped: rounding may leave [-1, 1]
    return (r - R * (0.48 + lobe * 0.52)) * 0.8
end

-- Soft coverage from a signed distance: one pixel of anti-aliasing.
local function coverage(d) return ml.clamp(-d + 0.5, 0, 1) end

local function column(specs, field, dev)
    local v = {}
    for i, s in ipairs(specs) do v[i] = s[field] end
    return ml.tensor(v, {device = dev}):view(#specs, 1, 1)
end

local function colours(specs, field, dev)
    local v = {}
    for i, s in ipairs(specs) do
        local c = S.COLORS[s[field]]
        if not c then error("shapes_dataset: unknown colour '" .. tostring(s[field]) .. "' in spec " .. i, 3) end
        v[i] = c
    end
    return ml.tensor(v, {device = dev}):view(#specs, 1, 1, 3)
end

-- 1 where spec i has the given value of field, else 0: [N, 1, 1]
local function indicator(specs, field, value, dev)
    local v, any = {}, false
    for i, s in ipairs(specs) do
        v[i] = s[field] == value and 1 or 0
        any = any or v[i] == 1
    end
    return any and ml.tensor(v, {device = dev}):view(#specs, 1, 1) or nil
end

-- Pictures for a list of specs: [N, 64, 64, 3] f32 in [0, 1] on opts.device.
function S.render(specs, opts)
    opts = opts or {}
    local dev = opts.device or "cpu"
    local n, H = #specs, S.SIZE
    if n == 0 then error("shapes_dataset: render needs at least one spec", 2) end
    for i, s in ipairs(specs) do
        local ok = false
        for _, name in ipairs(S.SHAPES) do ok = ok or name == s.shape end
        if not ok then error("shapes_dataset: unknown shape '" .. tostring(s.shape) .. "' in spec " .. i, 2) end
        ok = false
        for _, name in ipairs(S.TEXTURES) do ok = ok or name == s.texture end
        if not ok then error("shapes_dataset: unknown texture '" .. tostring(s.texture) .. "' in spec " .. i, 2) end
    end
    return ml.no_grad(function()
        -- pixel centres
        local xs = (ml.arange(H, {device = dev}):float() + 0.5):view(1, 1, H)
        local ys = (ml.arange(H, {device = dev}):float() + 0.5):view(1, H, 1)
        local dx = (xs - column(specs, "cx", dev)):expand(n, H, H)
        local dy = (ys - column(specs, "cy", dev)):expand(n, H, H)
        local R = column(specs, "size", dev)
        local r = (dx * dx + dy * dy):sqrt()
        local d = ml.zeros({n, H, H}, {device = dev})
        for _, name in ipairs(S.SHAPES) do
            local sel = indicator(specs, "shape", name, dev)
            if sel then d = d + sdf[name](dx, dy, r, R) * sel end
        end
        local mask = coverage(d)
        -- textures keep the shape's colour on part of it and let the
        -- background through elsewhere: diagonal stripes 6 px apart, or
        -- round holes on a 6 px lattice
        local P = 6
        local striped = indicator(specs, "texture", "striped", dev)
        if striped then
            local s = (dx + dy) / P
            local g = (s - s:floor() - 0.5):abs()                       -- 0.5 at stripe centres
            local on = ml.clamp((g - 0.25) * (P / math.sqrt(2)) + 0.5, 0, 1)
            mask = mask * (on * striped + (-striped + 1))
        end
        local dotted = indicator(specs, "texture", "dotted", dev)
        if dotted then
            local fx, fy = dx / P, dy / P
            fx = (fx - fx:floor() - 0.5) * P
            fy = (fy - fy:floor() - 0.5) * P
            local hole = coverage((fx * fx + fy * fy):sqrt() - 1.6)
            mask = mask * (-(hole * dotted) + 1)
        end
        local fg, bg = colours(specs, "color", dev), colours(specs, "background", dev)
        local m = mask:unsqueeze(4)
        return bg + (fg - bg) * m
    end)
end

-- ---- measuring pictures ------------------------------------------------------------

-- The mean colour of the background (the 2-pixel border, which no shape
-- reaches) and of the foreground (pixels farther than 0.25 from that colour)
-- of each image [N, H, W, 3] (or one [H, W, 3]).  An image with no
-- foreground pixel gets the background colour as its foreground.
function S.features(images)
    if images.ndim == 3 then images = images:unsqueeze(1) end
    if images.ndim ~= 4 or images:size(4) ~= 3 then
        error("shapes_dataset: features expects images [N, H, W, 3]", 2)
    end
    return ml.no_grad(function()
        local x = images:float():cpu()
        local n, h, w = x:size(1), x:size(2), x:size(3)
        local out = {}
        for i = 1, n do
            local im = x[i]
            local border = ml.cat({im:narrow(1, 1, 2):reshape(-1, 3), im:narrow(1, h - 1, 2):reshape(-1, 3),
                                   im:narrow(2, 1, 2):reshape(-1, 3), im:narrow(2, w - 1, 2):reshape(-1, 3)}, 1)
            local bg = border:mean(1)
            local far = (im - bg):norm(2, 3):gt(0.25):float():unsqueeze(3)   -- [H, W, 1]
            local count = far:sum():item()
            local fg = count > 0 and (im * far):sum({1, 2}) / count or bg
            out[i] = {fg = fg:totable(), bg = bg:totable(), fg_fraction = count / (h * w)}
        end
        return out
    end)
end

function S.feature_distance(a, b)
    local s = 0
    for k = 1, 3 do s = s + (a.fg[k] - b.fg[k]) ^ 2 + (a.bg[k] - b.bg[k]) ^ 2 end
    return math.sqrt(s)
end

-- The mean of a list of features (the "subject" a set of pictures shows).
function S.mean_feature(list)
    local m = {fg = {0, 0, 0}, bg = {0, 0, 0}}
    for _, f in ipairs(list) do
        for k = 1, 3 do m.fg[k] = m.fg[k] + f.fg[k] / #list; m.bg[k] = m.bg[k] + f.bg[k] / #list end
    end
    return m
end

-- ---- the script ------------------------------------------------------------------

local function write_atomic(path, text)
    local tmp = path .. ".partial"
    local f, err = io.open(tmp, "wb")
    if not f then error("shapes_dataset: cannot write " .. tmp .. ": " .. tostring(err), 0) end
    f:write(text)
    f:close()
    local ok, rerr = os.rename(tmp, path)
    if not ok then error("shapes_dataset: cannot rename " .. tmp .. " to " .. path .. ": " .. tostring(rerr), 0) end
end

-- Writes n pictures and captions.jsonl into dir; returns the specs.
function S.write(dir, seed, n, opts)
    ml.core.mkdir_p(dir)
    local specs = S.sample(seed, n, opts)
    local lines = {}
    local chunk = 256
    for first = 1, n, chunk do
        local part = {}
        for i = first, math.min(n, first + chunk - 1) do part[#part + 1] = specs[i] end
        local imgs = S.render(part)
        for j, spec in ipairs(part) do
            local i = first + j - 1
            local file = string.format("%06d.png", i)
            local caption = S.caption(spec)
            ml.image.save(dir .. "/" .. file, imgs[j], {meta = {prompt = caption, seed = seed}})
            local row = {file = file, caption = caption}
            for k, v in pairs(spec) do row[k] = v end
            lines[i] = ml.core.json_encode(row)
        end
    end
    write_atomic(dir .. "/captions.jsonl", table.concat(lines, "\n") .. (n > 0 and "\n" or ""))
    return specs
end

local function main(argv)
    local p = require("moonlit.argparse").new("shapes_dataset.lua",
        "Write synthetic shape pictures (PNG) and their captions (captions.jsonl) into a folder.")
    p:option("out", {type = "string", required = true, help = "folder to write into (created if missing)"})
    p:option("n", {type = "integer", default = 16, help = "number of pictures"})
    p:option("seed", {type = "integer", default = 0, help = "seed of the picture parameters"})
    p:option("held_out", {type = "string", default = "exclude", choices = {"exclude", "only", "include"},
                          help = "the held-out yellow star: never drawn, the only thing drawn, or drawn like the rest"})
    p:option("texture", {type = "string", choices = S.TEXTURES, help = "one texture for every picture"})
    p:option("background", {type = "string", choices = S.BACKGROUND_NAMES, help = "one background colour for every picture"})
    local o = p:parse(argv)
    if o.n < 0 then io.stderr:write("shapes_dataset: --n must be >= 0\n") return 2 end
    local ok, err = pcall(S.write, o.out, o.seed, o.n, {held_out = o.held_out, texture = o.texture, background = o.background})
    if not ok then io.stderr:write(tostring(err) .. "\n") return 1 end
    print(string.format("wrote %d pictures and captions.jsonl into %s", o.n, o.out))
    return 0
end

-- Run as a script only when it is the program itself (dofile returns S).
if arg and arg[0] and arg[0]:match("shapes_dataset%.lua$") then
    os.exit(main(arg))
end

return S
