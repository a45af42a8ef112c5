-- test_image_grid.lua — ml.image.grid: layout (cells of the largest size,
-- smaller images centered, padding between and around), a batch tensor as
-- input, per-channel backgrounds, and the errors.
local ml = require "moonlit"

local tests = {}

-- An [h, w, 3] image whose every pixel is v.
local function flat(h, w, v) return ml.full({h, w, 3}, v) end

-- The grid pixel at (y, x) (1-based), as {r, g, b}.
local function px(g, y, x)
    local p = g:select(1, y):select(1, x)
    return {p:select(1, 1):item(), p:select(1, 2):item(), p:select(1, 3):item()}
end

function tests.layout_of_cells_padding_and_centering(t)
    -- cell size = largest image: 4 x 6; two columns, two rows, pad 1
    local g = ml.image.grid({flat(4, 6, 0.1), flat(2, 2, 0.2), flat(4, 6, 0.3)}, {cols = 2, pad = 1, background = 1.0})
    t:assertEq(g:shape(), {2 * 4 + 3, 2 * 6 + 3, 3})
    t:assertEq(g.dtype, "f32")
    t:assertNear(px(g, 1, 1)[1], 1.0, 0, "border is background")
    t:assertNear(px(g, 2, 2)[1], 0.1, 1e-7, "image 1 starts after the pad")
    t:assertNear(px(g, 5, 7)[1], 0.1, 1e-7, "image 1 ends at its cell's corner")
    t:assertNear(px(g, 2, 8)[1], 1.0, 0, "the gap between columns")
    -- image 2 (2x2) centered in the cell at rows 2..5, columns 9..14: rows 3..4, columns 11..12
    t:assertNear(px(g, 3, 11)[1], 0.2, 1e-7)
    t:assertNear(px(g, 4, 12)[1], 0.2, 1e-7)
    t:assertNear(px(g, 2, 11)[1], 1.0, 0, "above the centered image")
    t:assertNear(px(g, 3, 10)[1], 1.0, 0, "left of the centered image")
    t:assertNear(px(g, 3, 13)[1], 1.0, 0, "right of the centered image")
    -- image 3 opens the second row; the empty fourth cell is background
    t:assertNear(px(g, 7, 2)[1], 0.3, 1e-7)
    t:assertNear(px(g, 7, 9)[1], 1.0, 0)
    -- the sum counts every pixel once: images plus background
    local n = g:size(1) * g:size(2)
    local expect = 3 * ((24 * 0.1 + 4 * 0.2 + 24 * 0.3) + (n - 52) * 1.0)
    t:assertNear(g:sum():item(), expect, 1e-3)
end

function tests.copies_the_pixels_exactly(t)
    ml.manual_seed(3)
    local a, b = ml.rand({5, 7, 3}), ml.rand({5, 7, 3})
    local g = ml.image.grid({a, b}, {cols = 1, pad = 0})
    t:assertEq(g:shape(), {10, 7, 3})
    t:assertTensorEq(g:narrow(1, 1, 5), a, 0)
    t:assertTensorEq(g:narrow(1, 6, 5), b, 0)
end

function tests.batch_tensor_and_default_columns(t)
    local batch = ml.zeros({5, 3, 3, 3})
    local g = ml.image.grid(batch, {pad = 0})
    -- 5 images: ceil(sqrt(5)) = 3 columns, 2 rows
    t:assertEq(g:shape(), {6, 9, 3})
    t:assertNear(g:sum():item(), 1 * 9 * 3, 0, "only the empty sixth cell is background")
    -- more columns than images: as many columns as images
    t:assertEq(ml.image.grid({flat(2, 2, 0), flat(2, 2, 0)}, {cols = 10, pad = 0}):shape(), {2, 4, 3})
end

function tests.background_per_channel(t)
    local g = ml.image.grid({flat(1, 1, 0)}, {pad = 1, background = {0.25, 0.5, 0.75}})
    t:assertEq(g:shape(), {3, 3, 3})
    t:assertEq(px(g, 1, 1), {0.25, 0.5, 0.75})
    t:assertEq(px(g, 2, 2), {0, 0, 0})
end

function tests.bad_input_is_named(t)
    t:assertError(function() ml.image.grid({}) end, "no images")
    t:assertError(function() ml.image.grid({ml.zeros(2, 2)}) end, "image 1 is not an [H, W, C] tensor")
    t:assertError(function() ml.image.grid({flat(2, 2, 0), ml.zeros(2, 2, 4)}) end, "image 2 has 4 channels")
    t:assertError(function() ml.image.grid(ml.zeros(2, 2, 3)) end, "a batch must be [B, H, W, C]")
    t:assertError(function() ml.image.grid({flat(2, 2, 0)}, {cols = 0}) end, "cols must be an integer >= 1")
    t:assertError(function() ml.image.grid({flat(2, 2, 0)}, {pad = -1}) end, "pad must be an integer >= 0")
    t:assertError(function() ml.image.grid({flat(2, 2, 0)}, {background = {1, 2}}) end, "background must be")
    t:assertError(function() ml.image.grid({flat(2, 2, 0)}, {labels = {"a"}}) end, "labels are not supported")
    t:assertError(function() ml.image.grid({flat(2, 2, 0)}, {pad = 1 << 21}) end, "too large")
end

return tests
