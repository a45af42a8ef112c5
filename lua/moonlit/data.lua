-- ml.data — datasets for training, shaped like Ray Data.
--
--   local ds = ml.data.read_images(dir)              -- rows {image = <image ref>, path = ...}
--   ds = ds:map_batches(ml.data.ImageTransform{resize = 512, crop = "center", size = 512,
--                                              normalize = true}, {output = "pixels"})
--   for batch in ds:random_shuffle(0):iter_batches{batch_size = 4, epoch = e} do ... end
--
-- A dataset is a lazy plan: every operation returns a new dataset whose rows
-- are computed again for each epoch (so a shuffle before a shard still hands
-- every worker disjoint rows of that epoch's order).  Images are never
-- decoded in Lua: rows hold image refs (path, transform, stable key), and
-- iter_batches hands the decoding, resizing, cropping and batching to the C
-- loader threads (host/data_loader.c), which deliver [B, H, W, 3] f32
-- tensors.  See docs/data.md.
local core = require "moonlit.core"
local options = require "moonlit.options"

local M = {}

local IMAGE_EXT = {jpg = true, jpeg = true, png = true, bmp = true}
local DEFAULT_BATCH = 256            -- Ray's iter_batches default
local DEFAULT_MAP_BATCH = 4096       -- Ray's map_batches default

-- ---- image refs ----------------------------------------------------------

-- What a row holds instead of pixels: the file, the transform to apply (or
-- nil) and the key that seeds its random draws.
local ImageRef = {}
ImageRef.__index = ImageRef
ImageRef.__tostring = function(r)
    return string.format("ImageRef(%s%s)", r.path, r.transform and ", transformed" or "")
end
M.ImageRef = ImageRef

local function is_ref(v) return getmetatable(v) == ImageRef end
M.is_image_ref = is_ref

local Transform = {}
Transform.__index = Transform
Transform.__tostring = function(t)
    return string.format("ImageTransform{resize = %s, crop = %s, size = %s, hflip = %s, normalize = %s, seed = %d}",
        tostring(t.resize), tostring(t.crop), tostring(t.size), tostring(t.hflip), tostring(t.normalize), t.seed)
end

local function check_int(v, what, lo)
    if math.type(v) ~= "integer" and not (type(v) == "number" and v == math.floor(v)) then
        error(string.format("%s must be an integer, got %s", what, tostring(v)), 3)
    end
    v = math.tointeger(v)
    if lo and v < lo then error(string.format("%s must be >= %d, got %d", what, lo, v), 3) end
    return v
end

-- ImageTransform{resize, crop = "random"|"center"|nil, size, hflip, normalize, seed}:
-- torchvision's ToTensor, Resize (shorter side, bilinear, antialiased),
-- RandomCrop/CenterCrop, RandomHorizontalFlip and Normalize([0.5], [0.5]).
function M.ImageTransform(opts)
    opts = options.check_options("ImageTransform", opts, {"resize", "crop", "size", "hflip", "normalize", "seed"})
    local t = setmetatable({}, Transform)
    t.resize = opts.resize and check_int(opts.resize, "ImageTransform: resize", 1) or 0
    if opts.crop ~= nil and opts.crop ~= "random" and opts.crop ~= "center" then
        error("ImageTransform: crop must be \"random\", \"center\" or nil, got " .. tostring(opts.crop), 2)
    end
    t.crop = opts.crop
    if t.crop then
        t.size = check_int(opts.size or (t.resize > 0 and t.resize or nil) or error(
            "ImageTransform: crop needs a size", 2), "ImageTransform: size", 1)
    elseif opts.size then
        error("ImageTransform: size is the crop size; give crop = \"center\" or \"random\" with it", 2)
    end
    t.hflip = opts.hflip or 0
    if type(t.hflip) ~= "number" or t.hflip < 0 or t.hflip > 1 then
        error("ImageTransform: hflip is a probability in [0, 1], got " .. tostring(opts.hflip), 2)
    end
    t.normalize = opts.normalize and true or false
    t.seed = check_int(opts.seed or 0, "ImageTransform: seed")
    return t
end

local function fnv1a(s)
    local h = 0xcbf29ce484222325
    for i = 1, #s do h = (h ~ s:byte(i)) * 0x100000001b3 end
    return h
end

-- ---- datasets --------------------------------------------------------------

local Dataset = {}
Dataset.__index = Dataset
M.Dataset = Dataset

-- rows(epoch) returns a fresh list of fresh row tables (the caller owns them).
local function dataset(rows, what)
    return setmetatable({_rows = rows, _what = what}, Dataset)
end

Dataset.__tostring = function(d) return "Dataset(" .. d._what .. ")" end

local function copy(row)
    local r = {}
    for k, v in pairs(row) do r[k] = v end
    return r
end

local function list_images(dir, recursive, out, skipped)
    for _, name in ipairs(core.list_dir(dir)) do
        local path = dir:sub(-1) == "/" and dir .. name or dir .. "/" .. name
        if core.is_dir(path) then
            if recursive then list_images(path, recursive, out, skipped) end
        else
            local ext = name:match("%.([^./]+)$")
            if ext and IMAGE_EXT[ext:lower()] then out[#out + 1] = path
            else skipped[#skipped + 1] = path end
        end
    end
end

-- read_images(dir, {recursive = false, max_pixels = 64e6}): one row per
-- JPEG/PNG/BMP file (by extension), sorted by path.
function M.read_images(dir, opts)
    opts = options.check_options("read_images", opts, {"max_pixels", "recursive"})
    if type(dir) ~= "string" then error("read_images: expected a folder path, got " .. type(dir), 2) end
    if not core.is_dir(dir) then error("read_images: no such folder '" .. dir .. "'", 2) end
    local max_pixels = check_int(opts.max_pixels or 64000000, "read_images: max_pixels", 1)
    local paths, skipped = {}, {}
    list_images(dir, opts.recursive, paths, skipped)
    if #paths == 0 then
        error("read_images: no images (.jpg, .jpeg, .png, .bmp) in '" .. dir .. "'"
              .. (#skipped > 0 and " (" .. #skipped .. " other files)" or ""), 2)
    end
    table.sort(paths)
    if #skipped > 0 then
        table.sort(skipped)
        io.stderr:write(string.format("ml.data.read_images: skipping %d non-image file%s in '%s': %s\n",
            #skipped, #skipped == 1 and "" or "s", dir, table.concat(skipped, ", ")))
    end
    local refs = {}
    for i, p in ipairs(paths) do refs[i] = setmetatable({path = p, max_pixels = max_pixels}, ImageRef) end
    return dataset(function()
        local rows = {}
        for i, p in ipairs(paths) do rows[i] = {image = refs[i], path = p} end
        return rows
    end, "read_images " .. dir)
end

-- from_items{...}: one row per item; a table item is the row, any other
-- value v becomes {item = v}.
function M.from_items(items)
    if type(items) ~= "table" then error("from_items: expected a list, got " .. type(items), 2) end
    local n = #items
    return dataset(function()
        local rows = {}
        for i = 1, n do
            local v = items[i]
            rows[i] = type(v) == "table" and copy(v) or {item = v}
        end
        return rows
    end, "from_items")
end

function Dataset:map(fn)
    local src = self._rows
    return dataset(function(epoch)
        local rows = src(epoch)
        for i, r in ipairs(rows) do
            local out = fn(r)
            if type(out) ~= "table" then
                error(string.format("map: fn must return a row table, row %d gave %s", i, type(out)), 0)
            end
            rows[i] = out
        end
        return rows
    end, self._what .. ":map")
end

-- Rows [first, last] as a batch {col = {v1, v2, ...}}.
local function to_batch(rows, first, last)
    local batch = {}
    for i = first, last do
        for k, v in pairs(rows[i]) do
            local col = batch[k]
            if not col then col = {}; batch[k] = col end
            col[i - first + 1] = v
        end
    end
    return batch
end

local function batch_size_opt(opts, def, what)
    return check_int(opts and opts.batch_size or def, what .. ": batch_size", 1)
end

local function apply_transform(self, tf, opts)
    local column = opts.column or "image"
    local output = opts.output or column
    local src = self._rows
    -- Seeded per output column, so two image columns under one transform
    -- seed do not draw the same crops.
    local ctf = copy(tf)
    ctf.seed = tf.seed ~ fnv1a(output)
    ctf = setmetatable(ctf, Transform)
    return dataset(function(epoch)
        local rows = src(epoch)
        for i, r in ipairs(rows) do
            local v = r[column]
            if not is_ref(v) then
                error(string.format("map_batches(ImageTransform): column '%s' of row %d is not an image (%s)",
                    column, i, v == nil and "missing" or type(v)), 0)
            end
            if v.transform then
                error(string.format("map_batches(ImageTransform): column '%s' of row %d (%s) is transformed already",
                    column, i, v.path), 0)
            end
            r[output] = setmetatable({path = v.path, max_pixels = v.max_pixels, transform = ctf, key = i - 1}, ImageRef)
        end
        return rows
    end, self._what .. ":map_batches(ImageTransform)")
end

-- map_batches(fn, {batch_size}) with fn(batch) -> batch, or
-- map_batches(ImageTransform{...}, {column = "image", output = column}).
function Dataset:map_batches(fn, opts)
    if getmetatable(fn) == Transform then
        return apply_transform(self, fn, options.check_options("map_batches(ImageTransform)", opts, {"column", "output"}))
    end
    opts = options.check_options("map_batches", opts, {"batch_size"})
    if type(fn) ~= "function" and not (getmetatable(fn) and getmetatable(fn).__call) then
        error("map_batches: expected a function or an ml.data.ImageTransform, got " .. type(fn), 2)
    end
    local bs = batch_size_opt(opts, DEFAULT_MAP_BATCH, "map_batches")
    local src = self._rows
    return dataset(function(epoch)
        local rows, out = src(epoch), {}
        for first = 1, #rows, bs do
            local last = math.min(first + bs - 1, #rows)
            local b = fn(to_batch(rows, first, last))
            if type(b) ~= "table" then
                error("map_batches: fn must return a batch table {column = {values}}, got " .. type(b), 0)
            end
            local n
            for k, col in pairs(b) do
                if type(col) ~= "table" then
                    error(string.format("map_batches: column '%s' of the returned batch is not a list", tostring(k)), 0)
                end
                if n and #col ~= n then
                    error(string.format("map_batches: the returned columns differ in length (%d and %d)", n, #col), 0)
                end
                n = #col
            end
            local base = #out
            for i = 1, n or 0 do out[base + i] = {} end
            for k, col in pairs(b) do
                for i = 1, n do out[base + i][k] = col[i] end
            end
        end
        return out
    end, self._what .. ":map_batches")
end

-- add_column(name, fn): fn(batch) -> list of the column's values.
function Dataset:add_column(name, fn, opts)
    if type(name) ~= "string" then error("add_column: name must be a string", 2) end
    opts = options.check_options("add_column", opts, {"batch_size"})
    local bs = batch_size_opt(opts, DEFAULT_MAP_BATCH, "add_column")
    local src = self._rows
    return dataset(function(epoch)
        local rows = src(epoch)
        for first = 1, #rows, bs do
            local last = math.min(first + bs - 1, #rows)
            local vals = fn(to_batch(rows, first, last))
            if type(vals) ~= "table" or #vals ~= last - first + 1 then
                error(string.format("add_column('%s'): fn must return a list of %d values, got %s", name,
                    last - first + 1, type(vals) == "table" and #vals .. " values" or type(vals)), 0)
            end
            for i = first, last do rows[i][name] = vals[i - first + 1] end
        end
        return rows
    end, self._what .. ":add_column")
end

function Dataset:drop_columns(cols)
    if type(cols) == "string" then cols = {cols} end
    if type(cols) ~= "table" then error("drop_columns: expected a list of column names", 2) end
    local src = self._rows
    return dataset(function(epoch)
        local rows = src(epoch)
        for _, r in ipairs(rows) do
            for _, c in ipairs(cols) do r[c] = nil end
        end
        return rows
    end, self._what .. ":drop_columns")
end

-- zip(other): row i of both, merged; the counts must match and no column
-- may be in both.
function Dataset:zip(other)
    if getmetatable(other) ~= Dataset then error("zip: expected a dataset", 2) end
    local a, b = self._rows, other._rows
    return dataset(function(epoch)
        local ra, rb = a(epoch), b(epoch)
        if #ra ~= #rb then
            error(string.format("zip: the datasets have different row counts (%d and %d)", #ra, #rb), 0)
        end
        for i, r in ipairs(ra) do
            for k, v in pairs(rb[i]) do
                if r[k] ~= nil then
                    error(string.format("zip: column '%s' is in both datasets (rename one with map)", tostring(k)), 0)
                end
                r[k] = v
            end
        end
        return ra
    end, self._what .. ":zip")
end

function Dataset:repeat_n(n)
    n = check_int(n, "repeat_n: n", 0)
    local src = self._rows
    return dataset(function(epoch)
        local rows, out = src(epoch), {}
        for _ = 1, n do
            for _, r in ipairs(rows) do out[#out + 1] = copy(r) end
        end
        return out
    end, self._what .. ":repeat_n")
end

function Dataset:limit(n)
    n = check_int(n, "limit: n", 0)
    local src = self._rows
    return dataset(function(epoch)
        local rows = src(epoch)
        for i = #rows, n + 1, -1 do rows[i] = nil end
        return rows
    end, self._what .. ":limit")
end

-- random_shuffle(seed): a Fisher-Yates permutation drawn from (seed, epoch).
function Dataset:random_shuffle(seed)
    seed = check_int(seed or 0, "random_shuffle: seed")
    local src = self._rows
    return dataset(function(epoch)
        local rows = src(epoch)
        for i = #rows, 2, -1 do
            local j = core.data_hash_below(seed, epoch, i, 0, i) + 1
            rows[i], rows[j] = rows[j], rows[i]
        end
        return rows
    end, self._what .. ":random_shuffle")
end

-- shard(rank, world_size): rank is 0-based; row i (0-based) goes to rank
-- i % world_size.
function Dataset:shard(rank, world_size)
    world_size = check_int(world_size, "shard: world_size", 1)
    rank = check_int(rank, "shard: rank", 0)
    if rank >= world_size then
        error(string.format("shard: rank %d is not below world_size %d (ranks are 0-based)", rank, world_size), 2)
    end
    local src = self._rows
    return dataset(function(epoch)
        local rows, out = src(epoch), {}
        for i = rank + 1, #rows, world_size do out[#out + 1] = rows[i] end
        return out
    end, self._what .. ":shard")
end

-- flip_drawn(seed, epoch, key, hflip): whether an ImageTransform whose
-- image refs carry this seed (ref.transform.seed) flips the image of this
-- key (ref.key) in that epoch: the loader's own draw, for consumers that do
-- not decode the image (cached latents).
function M.flip_drawn(seed, epoch, key, hflip)
    return core.data_flip_drawn(seed, epoch, key, hflip)
end

-- The rows of one epoch (image refs, no pixels); for inspection and tests.
function Dataset:rows(epoch)
    return self._rows(check_int(epoch or 1, "rows: epoch", 1))
end

function Dataset:count() return #self._rows(1) end

local function load_ref(ref, epoch)
    return core.data_load(ref.path, ref.transform, epoch, ref.key or 0, ref.max_pixels)
end

-- take(n): the first n rows with images decoded and transformed ([H, W, 3] f32).
function Dataset:take(n)
    n = check_int(n or 20, "take: n", 0)
    local rows, out = self._rows(1), {}
    for i = 1, math.min(n, #rows) do
        local r = {}
        for k, v in pairs(rows[i]) do r[k] = is_ref(v) and load_ref(v, 1) or v end
        out[i] = r
    end
    return out
end

-- ---- iteration ---------------------------------------------------------------

local function is_int_list(v)
    if type(v) ~= "table" or getmetatable(v) or #v == 0 then return false end
    for i = 1, #v do if math.type(v[i]) ~= "integer" then return false end end
    return true
end

-- A batch column of plain values: tensors stacked, integer lists as an i64
-- tensor [B, L], anything else as a Lua list.
local function collate(name, vals, n, device)
    local first = vals[1]
    if core.is_tensor(first) then
        for i = 1, n do
            if not core.is_tensor(vals[i]) then
                error(string.format("iter_batches: column '%s' mixes tensors and other values (row %d)", name, i), 0)
            end
        end
        local ml = require "moonlit"
        return ml.stack(vals, 1):to(device)
    end
    if is_int_list(first) then
        local len = #first
        local all = true
        for i = 1, n do
            if not is_int_list(vals[i]) then all = false break end
            if #vals[i] ~= len then
                error(string.format("iter_batches: column '%s' holds integer lists of different lengths in one batch " ..
                    "(%d and %d): pad them to one length", name, len, #vals[i]), 0)
            end
        end
        if all then
            local ml = require "moonlit"
            return ml.tensor(vals, {dtype = "i64"}):to(device)
        end
    end
    return vals
end

local Iter = {}
Iter.__index = Iter

function Iter:close()
    if self._loader then
        self._last_stats = self._loader:stats()
        self._loader:close()
        self._loader = nil
    end
    self._done = true
end
Iter.__close = Iter.close
Iter.__gc = Iter.close

function Iter:stats()
    local s = self._loader and self._loader:stats() or self._last_stats
    s = s and copy(s) or {batches = 0, wait_ms = 0, last_wait_ms = 0, decode_ms = 0, threads = 0}
    s.live_threads = core.data_live_threads()
    if not self._image_cols then s.batches = self._taken end
    return s
end

function Iter:next()
    if self._done then return nil end
    local b = self._next_batch
    if b > self._last_batch then
        self:close()
        return nil
    end
    self._next_batch = b + 1
    local batch = {}
    if self._loader then
        local tensors = self._loader:next()
        for k, t in pairs(tensors) do batch[k] = t end
    end
    local rows, bs = self._plan, self._bs
    local first = (b - 1) * bs + 1
    local last = math.min(first + bs - 1, #rows)
    local cols = to_batch(rows, first, last)
    for k, vals in pairs(cols) do
        if not self._image_cols[k] then batch[k] = collate(k, vals, last - first + 1, self._device) end
    end
    self._taken = self._taken + 1
    return batch
end
Iter.__call = Iter.next

-- iter_batches{batch_size, drop_last, device, prefetch, epoch, start_batch, num_threads}
function Dataset:iter_batches(opts)
    opts = options.check_options("iter_batches", opts, {"batch_size", "drop_last", "device", "prefetch", "epoch",
                                                        "start_batch", "num_threads"})
    local bs = batch_size_opt(opts, DEFAULT_BATCH, "iter_batches")
    local epoch = check_int(opts.epoch or 1, "iter_batches: epoch", 1)
    local start = check_int(opts.start_batch or 1, "iter_batches: start_batch", 1)
    local prefetch = check_int(opts.prefetch or 2, "iter_batches: prefetch", 1)
    local threads = opts.num_threads and check_int(opts.num_threads, "iter_batches: num_threads", 1) or 0
    local device = opts.device or "cpu"
    local rows = self._rows(epoch)
    local n = #rows
    local nb = opts.drop_last and n // bs or (n + bs - 1) // bs
    if start > nb + 1 then
        error(string.format("iter_batches: start_batch %d is past the end of the epoch (%d batches)", start, nb), 2)
    end
    -- Image columns: every key holding an image ref in some row.
    local image_cols, names = {}, {}
    for _, r in ipairs(rows) do
        for k, v in pairs(r) do
            if is_ref(v) and not image_cols[k] then image_cols[k] = true; names[#names + 1] = k end
        end
    end
    table.sort(names, function(x, y) return tostring(x) < tostring(y) end)
    local it = setmetatable({_plan = rows, _bs = bs, _next_batch = start, _last_batch = nb, _device = device,
                             _image_cols = image_cols, _taken = 0}, Iter)
    if #names > 0 and start <= nb then
        local spec = {columns = names, batch_rows = {}, paths = {}, tf = {}, keys = {}, max_pixels = {},
                      transforms = {}, epoch = epoch, threads = threads, prefetch = prefetch, device = device}
        local tf_index = {}
        local paths, tfs, keys, maxp = spec.paths, spec.tf, spec.keys, spec.max_pixels
        local k = 0
        for b = start, nb do
            local first = (b - 1) * bs + 1
            local last = math.min(first + bs - 1, n)
            spec.batch_rows[#spec.batch_rows + 1] = last - first + 1
            for _, col in ipairs(names) do
                for i = first, last do
                    local ref = rows[i][col]
                    if not is_ref(ref) then
                        error(string.format("iter_batches: column '%s' holds images, but row %d has %s there", col, i,
                            ref == nil and "nothing" or "a " .. type(ref)), 2)
                    end
                    k = k + 1
                    paths[k] = ref.path
                    local t = ref.transform
                    if t then
                        local ti = tf_index[t]
                        if not ti then
                            spec.transforms[#spec.transforms + 1] = t
                            ti = #spec.transforms
                            tf_index[t] = ti
                        end
                        tfs[k] = ti
                    else
                        tfs[k] = 0
                    end
                    keys[k] = ref.key or 0
                    maxp[k] = ref.max_pixels or 0
                end
            end
        end
        it._loader = core.data_loader(spec)
    end
    -- The iterator is also the generic for's closing value, so
    -- `for b in ds:iter_batches{...} do ... break end` joins the threads
    -- at the break.
    return it, nil, nil, it
end

return M
