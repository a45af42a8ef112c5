-- moonlit.image (ml.image) — read and write images as HWC tensors.
--   ml.image.load(path, {dtype = "f32"|"u8"})   -> [H, W, 3] (f32 in [0, 1])
--   ml.image.save(path, t, {meta = {...}, quality = 95})  -- PNG (text chunks) or JPEG
--   ml.image.resize(t, h, w, {mode = "bilinear"|"bicubic"|"nearest"|"area"})
--   ml.image.png_text(path) -> table of the PNG's text chunks
--   ml.image.save_batch(pattern, images, opts)  -- images [B,H,W,3]; pattern with %d
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

-- [H,W,3] in [0,1] -> [1,H,W,3] in [-1,1], the range the VAE expects.
function image.to_model_input(t)
    return (t * 2 - 1):unsqueeze(1)
end

return image
