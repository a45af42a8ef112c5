-- moonlit.image (ml.image) — read and write images as HWC tensors.
--   ml.image.load(path, {dtype = "f32"|"u8"})   -> [H, W, 3] (f32 in [0, 1])
--   ml.image.save(path, t, {meta = {...}, quality = 95})  -- PNG (text chunks) or JPEG
--   ml.image.resize(t, h, w, {mode = "bilinear"|"bicubic"|"nearest"|"area"})
--   ml.image.png_text(path) -> table of the PNG's text chunks
--   ml.image.save_batch(pattern, images, opts)  -- images [B,H,W,3]; pattern with %d
--   ml.image.grid(images, {cols, pad = 2, background = 1.0}) -> [H',W',C] (contact sheets)
local core = require "moonlit.core"

local image = {}

image.load = core.image_load
image.resize = core.image_resize
image.png_text = core.image_png_text

image.save = core.image_save

-- Save each image of a batch; `pattern` takes the 1-based index, e.g. "out-%03d.png".
function image.save_batch(pattern, images, opts)
    local paths = {}
    for i = 1, images:size(1) do
        local p = string.format(pattern, i)
        image.save(p, images:select(1, i), opts)
        paths[i] = p
    end
    return paths
end

-- grid(images, {cols = ceil(sqrt(n)), pad = 2, background = 1.0}) -> one
-- [H', W', C] f32 CPU tensor.  images: a list of [H, W, C] tensors or one
-- [B, H, W, C] tensor, in row-major order (image k goes to row
-- (k-1)//cols + 1).  Every cell has the size of the largest image; smaller
-- images sit centered in theirs.  `pad` pixels of `background` (a number or
-- one value per channel) go between cells and around the border, so
-- H' = rows*cell_h + (rows+1)*pad.  Labels are not drawn (no font here):
-- opts.labels is refused rather than ignored.
function image.grid(images, opts)
    opts = opts or {}
    if opts.labels ~= nil then error("image.grid: labels are not supported (write them in the PNG's meta instead)", 2) end
    local list = images
    if core.is_tensor(images) then
        if images:dim() ~= 4 then error("image.grid: a batch must be [B, H, W, C] (got " .. images:dim() .. " dims)", 2) end
        list = {}
        for i = 1, images:size(1) do list[i] = images:select(1, i) end
    elseif type(images) ~= "table" then
        error("image.grid: images must be a list of [H, W, C] tensors or a [B, H, W, C] tensor", 2)
    end
    local n = #list
    if n == 0 then error("image.grid: no images", 2) end
    local ch, cw, c = 0, 0, nil
    for i, t in ipairs(list) do
        if not core.is_tensor(t) or t:dim() ~= 3 then
            error(string.format("image.grid: image %d is not an [H, W, C] tensor", i), 2)
        end
        c = c or t:size(3)
        if t:size(3) ~= c then
            error(string.format("image.grid: image %d has %d channels, image 1 has %d", i, t:size(3), c), 2)
        end
        ch, cw = math.max(ch, t:size(1)), math.max(cw, t:size(2))
    end
    local cols = opts.cols or math.ceil(math.sqrt(n))
    local pad = opts.pad or 2
    if math.type(cols) ~= "integer" or cols < 1 then error("image.grid: cols must be an integer >= 1", 2) end
    if math.type(pad) ~= "integer" or pad < 0 then error("image.grid: pad must be an integer >= 0", 2) end
    cols = math.min(cols, n)
    local rows = (n + cols - 1) // cols
    -- each side fits easily in 64 bits; the total is what must stay sane
    local H, W = rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad
    if H > 1 << 20 or W > 1 << 20 or H * W * c > 1 << 34 then
        error(string.format("image.grid: a %dx%d grid of %dx%d cells is too large", rows, cols, ch, cw), 2)
    end
    local bg = opts.background or 1.0
    local sheet
    if type(bg) == "number" then
        sheet = core.full({H, W, c}, bg)
    elseif type(bg) == "table" and #bg == c then
        sheet = core.zeros({H, W, c})
        for k = 1, c do
            if type(bg[k]) ~= "number" then error("image.grid: background values must be numbers", 2) end
            sheet:select(3, k):fill_(bg[k])
        end
    else
        error(string.format("image.grid: background must be a number or %d numbers", c), 2)
    end
    for i, t in ipairs(list) do
        local r, col = (i - 1) // cols, (i - 1) % cols
        local y = pad + r * (ch + pad) + (ch - t:size(1)) // 2
        local x = pad + col * (cw + pad) + (cw - t:size(2)) // 2
        sheet:narrow(1, y + 1, t:size(1)):narrow(2, x + 1, t:size(2)):copy_(t:to{device = "cpu", dtype = "f32"})
    end
    return sheet
end

-- [H,W,3] in [0,1] -> [1,H,W,3] in [-1,1], the range the VAE expects.
function image.to_model_input(t)
    return (t * 2 - 1):unsqueeze(1)
end

return image
