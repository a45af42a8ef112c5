-- test_image.lua — the image bindings (image_load, image_save, image_resize,
-- image_png_text of moonlit.core): dtypes, layouts, devices, metadata,
-- rounding, resampling against Pillow, and the error messages.
local ml = require "moonlit"     -- tensor operators and methods
local util = require "testutil"
local read_bytes, write_bytes = util.read_file, util.write_file
local core = ml.core

local FIX = "tests/fixtures/images/"

-- A scratch name prefix; every file a test makes starts with it.
local function scratch()
    local base = os.tmpname()
    local made = {base}
    local function path(suffix)
        made[#made + 1] = base .. suffix
        return base .. suffix
    end
    local function cleanup()
        for i = #made, 1, -1 do os.remove(made[i]) end
    end
    return path, cleanup
end

-- The rgb.* fixture pattern (see tests/fixtures/images/make_images.py) as a
-- nested table [y][x][c] of byte values.
local function pattern()
    local rows = {}
    for y = 0, 5 do
        local row = {}
        for x = 0, 7 do row[x + 1] = {x * 30, y * 40, (x + y) * 10 + 5} end
        rows[y + 1] = row
    end
    return rows
end

local function cuda_ok()
    return core.built_with_cuda and core.cuda_available and core.cuda_available()
end

return {
    load_u8_is_exact = function(t)
        local img = core.image_load(FIX .. "rgb.png", {dtype = "u8"})
        t:assertEq(img:size(), {6, 8, 3})
        t:assertEq(img.dtype, "u8")
        t:assertEq(img:totable(), pattern())
        t:assertTensorEq(core.image_load(FIX .. "rgba.png", {dtype = "u8"}), img, 0, "RGBA drops alpha")
        t:assertTensorEq(core.image_load(FIX .. "rgb.bmp", {dtype = "u8"}), img, 0, "BMP")
    end,

    load_f32_is_value_over_255 = function(t)
        local f = core.image_load(FIX .. "rgb.png")
        t:assertEq(f.dtype, "f32")
        t:assertEq(f.device, "cpu")
        local want = core.tensor(pattern()) / 255
        t:assertTensorEq(f, want, 1e-7)
        local g = core.image_load(FIX .. "gray.png", {dtype = "u8"}):totable()
        t:assertEq(g[2][3], {61, 61, 61}, "gray is replicated to RGB")
        local h = core.image_load(FIX .. "rgb.png", {dtype = "bf16"})
        t:assertEq(h.dtype, "bf16")
        t:assertTensorEq(h, want, 4e-3)
    end,

    load_jpeg_and_exif = function(t)
        local img = core.image_load(FIX .. "photo.jpg")
        t:assertEq(img:size(), {64, 64, 3})
        local ref = core.image_load(FIX .. "photo_jpg_decoded_by_pil.png")
        t:assertTensorEq(img, ref, 4 / 255 + 1e-6, "decodes like Pillow")
        local rot = core.image_load(FIX .. "exif_rot6.jpg", {dtype = "u8"})
        t:assertEq(rot:size(), {32, 16, 3}, "EXIF orientation applied")
    end,

    save_png_round_trip = function(t)
        local path, cleanup = scratch()
        local img = core.image_load(FIX .. "photo.png", {dtype = "u8"})
        core.image_save(path(".png"), img)
        t:assertTensorEq(core.image_load(path(".png"), {dtype = "u8"}), img, 0, "u8 PNG is lossless")
        -- float input: the same bytes come back
        core.image_save(path("f.png"), core.image_load(FIX .. "photo.png"))
        t:assertTensorEq(core.image_load(path("f.png"), {dtype = "u8"}), img, 0, "f32 PNG round trip")
        -- [1, H, W, 3] batch of one
        core.image_save(path("b.png"), img:unsqueeze(1))
        t:assertTensorEq(core.image_load(path("b.png"), {dtype = "u8"}), img, 0, "batch of one")
        -- [H, W, 1] grayscale comes back replicated
        local g = img:narrow(3, 2, 1)
        core.image_save(path("g.png"), g)
        t:assertTensorEq(core.image_load(path("g.png"), {dtype = "u8"}), g:expand(64, 64, 3), 0, "gray")
        -- a non-contiguous view is saved as what it shows
        local tr = img:transpose(1, 2)
        t:assert(not tr:is_contiguous())
        core.image_save(path("t.png"), tr)
        t:assertTensorEq(core.image_load(path("t.png"), {dtype = "u8"}), tr:contiguous(), 0, "transposed view")
        cleanup()
    end,

    save_jpeg_quality = function(t)
        local path, cleanup = scratch()
        local img = core.image_load(FIX .. "photo.png")
        core.image_save(path(".jpg"), img, {quality = 95})
        core.image_save(path("q30.jpeg"), img, {quality = 30})
        local hi = (core.image_load(path(".jpg")) - img):abs():mean():item()
        local lo = (core.image_load(path("q30.jpeg")) - img):abs():mean():item()
        t:assert(hi < 3 / 255, "quality 95 error " .. hi * 255)
        t:assert(hi < lo, "lower quality is worse")
        t:assert(#read_bytes(path("q30.jpeg")) < #read_bytes(path(".jpg")), "lower quality is smaller")
        cleanup()
    end,

    float_rounding_is_half_even_and_clamped = function(t)
        local path, cleanup = scratch()
        -- float32 values whose x*255 is exactly k + 0.5 in float32
        local x = core.tensor({{{0.009803921915590763, 0.01764705963432789, 0.04117647185921669},
                                {0.4960784316062927, 0.5, -0.25}, {1.5, 0 / 0, 1.0}}})
        t:assertEq(x:size(), {1, 3, 3})
        core.image_save(path(".png"), x)
        local got = core.image_load(path(".png"), {dtype = "u8"}):totable()
        t:assertEq(got, {{{2, 4, 10}, {126, 128, 0}, {255, 0, 255}}})
        cleanup()
    end,

    metadata_round_trip = function(t)
        local path, cleanup = scratch()
        local img = core.zeros({4, 5, 3})
        local meta = {
            prompt = "a photo of sks dog", negative_prompt = "", seed = 42, steps = 50,
            scheduler = "DDIM", guidance = 7.5, ["model name"] = "caf\u{e9} \u{72ac} \u{1f436}",
            flag = true,
        }
        core.image_save(path(".png"), img, {meta = meta})
        local back = core.image_png_text(path(".png"))
        t:assertEq(back, {
            prompt = "a photo of sks dog", negative_prompt = "", seed = "42", steps = "50",
            scheduler = "DDIM", guidance = "7.5", ["model name"] = "caf\u{e9} \u{72ac} \u{1f436}",
            flag = "true",
        })
        -- standard keys first in a fixed order, then the others sorted
        local bytes = read_bytes(path(".png"))
        local last = 0
        for _, k in ipairs {"prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", "flag", "model name"} do
            local at = bytes:find(k .. "\0", 1, true)
            t:assert(at and at > last, "key order at " .. k)
            last = at or last
        end
        t:assertEq(core.image_png_text(FIX .. "pil_text.png").unicode, "caf\u{e9} \u{72ac} \u{1f436}")
        t:assertEq(core.image_png_text(FIX .. "rgb.png"), {})
        -- JPEG keeps it as a comment
        core.image_save(path(".jpg"), img, {meta = {prompt = "hello", seed = 7}})
        t:assert(read_bytes(path(".jpg")):find("prompt: hello\nseed: 7", 1, true), "JPEG comment")
        cleanup()
    end,

    load_errors_name_the_file = function(t)
        local path, cleanup = scratch()
        t:assertError(function() core.image_load(FIX .. "missing.png") end, "missing.png': cannot open")
        write_bytes(path(".png"), "")
        t:assertError(function() core.image_load(path(".png")) end, "empty")
        write_bytes(path("txt.png"), "just some words")
        t:assertError(function() core.image_load(path("txt.png")) end, "not a JPEG, PNG or BMP image")
        local jpg = read_bytes(FIX .. "photo.jpg")
        write_bytes(path("cut.jpg"), jpg:sub(1, #jpg // 2))
        t:assertError(function() core.image_load(path("cut.jpg")) end, path("cut.jpg") .. "': truncated JPEG")
        t:assertError(function() core.image_load(FIX .. "rgb.png", {dtype = "i32"}) end, "dtype")
        t:assertError(function() core.image_png_text(FIX .. "rgb.jpg") end, "not a PNG file")
        cleanup()
    end,

    save_errors_leave_nothing = function(t)
        local path, cleanup = scratch()
        local img = core.zeros({4, 4, 3})
        t:assertError(function() core.image_save(path(".bmp"), img) end, "unknown image extension '.bmp'")
        t:assertError(function() core.image_save(path(".png"), core.zeros({2, 4, 4, 3})) end, "[2, 4, 4, 3]")
        t:assertError(function() core.image_save(path(".png"), core.zeros({4, 4, 5})) end, "C = 1..4")
        t:assertError(function() core.image_save(path(".png"), core.zeros({4, 4, 3}, {dtype = "i32"})) end, "int32")
        t:assertError(function() core.image_save(path(".jpg"), img, {quality = 101}) end, "quality")
        t:assertError(function() core.image_save(path(".png"), img, {meta = {prompt = {}}}) end, "meta.prompt")
        t:assertError(function() core.image_save(path(".png"), img, {meta = {["bad  key"] = "x"}}) end,
                      "not a valid PNG keyword")
        t:assertError(function() core.image_save(path(".d/out.png"), img) end, "No such file")
        t:assert(io.open(path(".png")) == nil, "no file from rejected saves")
        cleanup()
    end,

    resize_matches_pillow = function(t)
        local src8 = core.image_load(FIX .. "photo.png", {dtype = "u8"})
        for _, mode in ipairs {"bilinear", "bicubic"} do
            local ref = core.image_load(FIX .. "photo_ref_" .. mode .. "_27x40.png", {dtype = "u8"})
            local r8 = core.image_resize(src8, 27, 40, {mode = mode})
            t:assertEq(r8.dtype, "u8")
            t:assertTensorEq(r8, ref, 0, mode .. " u8 is bit-exact")
            local rf = core.image_resize(src8:float() / 255, 27, 40, {mode = mode})
            t:assertTensorEq(rf:clamp(0, 1), ref:float() / 255, 1 / 255 + 1e-6, mode .. " f32")
        end
        -- default mode is bilinear; [N, H, W, C] works image by image
        local f = core.image_load(FIX .. "photo.png")
        local batch = core.image_resize(f:unsqueeze(1):expand(2, 64, 64, 3), 27, 40)
        t:assertEq(batch:size(), {2, 27, 40, 3})
        t:assertTensorEq(batch:select(1, 2), core.image_resize(f, 27, 40, {mode = "bilinear"}), 0)
    end,

    resize_nearest_area_and_dtypes = function(t)
        local row = core.tensor({{{0}, {10}, {20}, {30}, {40}}})          -- [1, 5, 1]
        t:assertTensorEq(core.image_resize(row, 1, 3, {mode = "nearest"}), core.tensor({{{0}, {10}, {30}}}), 0)
        t:assertTensorEq(core.image_resize(row, 1, 3, {mode = "area"}), core.tensor({{{5}, {20}, {35}}}), 1e-6)
        local h = core.image_resize(row:half(), 1, 3, {mode = "area"})
        t:assertEq(h.dtype, "f16")
        t:assertTensorEq(h, core.tensor({{{5}, {20}, {35}}}), 1e-2)
        t:assertError(function() core.image_resize(row, 1, 3, {mode = "lanczos"}) end, "'lanczos'")
        t:assertError(function() core.image_resize(row, 0, 3) end, "height")
        t:assertError(function() core.image_resize(core.zeros({5, 5}), 2, 2) end, "[H, W, C]")
        t:assertError(function() core.image_resize(row:long(), 1, 3) end, "int64")
    end,

    other_devices = function(t)
        if not cuda_ok() then return end
        local path, cleanup = scratch()
        local img = core.image_load(FIX .. "photo.png", {device = "cuda"})
        t:assertEq(img.device, "cuda:0")
        local r = core.image_resize(img, 27, 40)
        t:assertEq(r.device, "cuda:0")
        t:assertTensorEq(r, core.image_resize(img:cpu(), 27, 40), 0)
        core.image_save(path(".png"), img:transpose(1, 2))
        t:assertTensorEq(core.image_load(path(".png")), img:cpu():transpose(1, 2):contiguous(), 0)
        cleanup()
    end,
}
