-- test_data.lua — ml.data: the lazy plan (shuffle, shard, zip, repeat_n,
-- limit, start_batch), the C loader threads (thread-count independence,
-- prefetch, errors, no leaked threads) and the transforms against
-- torchvision (tests/fixtures/transforms, scripts/make_transform_fixture.py).
local ml = require "moonlit"
local util = require "testutil"
local core = ml.core

local TF_FIX = "tests/fixtures/transforms/"
local IMG_FIX = "tests/fixtures/images/"

local tests = {}

-- A [h, w, 3] u8 image whose pixels depend on (x, y, seed).
local function pattern(h, w, seed)
    local rows = {}
    for y = 1, h do
        local row = {}
        for x = 1, w do
            row[x] = {(x * 7 + y * 3 + seed * 11) % 256, (x * y + seed * 5) % 256, (x * 13 + seed * 29 + y) % 256}
        end
        rows[y] = row
    end
    return ml.tensor(rows, {dtype = "u8"})
end

-- A folder of n PNGs of the given sizes ({h, w} pairs, cycled).
local function image_dir(n, sizes, prefix)
    local dir = util.temp_dir()
    for i = 1, n do
        local s = sizes[(i - 1) % #sizes + 1]
        core.image_save(string.format("%s/%s%02d.png", dir, prefix or "img", i), pattern(s[1], s[2], i))
    end
    return dir
end

local function collect(ds, opts)
    local out = {}
    for b in ds:iter_batches(opts) do out[#out + 1] = b end
    return out
end

local function ids(rows, key)
    local r = {}
    for i, row in ipairs(rows) do r[i] = row[key or "id"] end
    return r
end

local function items(n)
    local t = {}
    for i = 1, n do t[i] = {id = i} end
    return t
end

-- ---- the plan --------------------------------------------------------------

function tests.shards_cover_every_row_once_per_epoch(t)
    for _, n in ipairs {13, 5, 16} do
        local ds = ml.data.from_items(items(n)):random_shuffle(7)
        for ws = 1, 8 do
            for epoch = 1, 3 do
                local seen, total = {}, 0
                for rank = 0, ws - 1 do
                    local rows = ds:shard(rank, ws):rows(epoch)
                    t:assert(math.abs(#rows - n / ws) < 1, "shard sizes differ by at most one")
                    for _, r in ipairs(rows) do
                        seen[r.id] = (seen[r.id] or 0) + 1
                        total = total + 1
                    end
                end
                t:assertEq(total, n, string.format("rows over %d shards (n=%d, epoch %d)", ws, n, epoch))
                for i = 1, n do t:assertEq(seen[i], 1, "row " .. i .. " seen once") end
            end
        end
    end
    -- Row i of the epoch's order goes to rank i % world_size.
    local order = ids(ml.data.from_items(items(13)):random_shuffle(3):rows(2))
    local r1 = ids(ml.data.from_items(items(13)):random_shuffle(3):shard(1, 4):rows(2))
    t:assertEq(r1, {order[2], order[6], order[10]})
end

function tests.shuffle_is_a_permutation_fixed_by_seed_and_epoch(t)
    local ds = ml.data.from_items(items(50))
    local a1 = ids(ds:random_shuffle(1):rows(1))
    t:assertEq(a1, ids(ds:random_shuffle(1):rows(1)), "same seed and epoch")
    t:assert(not util.has(table.concat(a1, ","), table.concat(ids(ds:rows(1)), ",")), "shuffled")
    t:assert(table.concat(a1, ",") ~= table.concat(ids(ds:random_shuffle(1):rows(2)), ","), "epoch 2 differs")
    t:assert(table.concat(a1, ",") ~= table.concat(ids(ds:random_shuffle(2):rows(1)), ","), "seed 2 differs")
    local sorted = {table.unpack(a1)}
    table.sort(sorted)
    t:assertEq(sorted, ids(ds:rows(1)), "a permutation")
end

function tests.map_map_batches_add_column_drop_columns(t)
    local ds = ml.data.from_items{{x = 1}, {x = 2}, {x = 3}, 7}
    t:assertEq(ds:rows()[4], {item = 7})
    ds = ml.data.from_items{{x = 1}, {x = 2}, {x = 3}}
    local m = ds:map(function(r) return {x = r.x, y = r.x * 10} end)
    t:assertEq(ids(m:rows(), "y"), {10, 20, 30})
    local sizes = {}
    local mb = m:map_batches(function(b)
        sizes[#sizes + 1] = #b.x
        local z = {}
        for i, v in ipairs(b.x) do z[i] = v + b.y[i] end
        return {z = z}
    end, {batch_size = 2})
    t:assertEq(mb:rows(), {{z = 11}, {z = 22}, {z = 33}})
    t:assertEq(sizes, {2, 1}, "batches of 2")
    local ac = m:add_column("s", function(b)
        local out = {}
        for i, v in ipairs(b.x) do out[i] = "r" .. v end
        return out
    end):drop_columns{"y"}
    t:assertEq(ac:rows(), {{x = 1, s = "r1"}, {x = 2, s = "r2"}, {x = 3, s = "r3"}})
    -- Plain columns come as Lua lists.
    local b = collect(ac, {batch_size = 2})
    t:assertEq(#b, 2)
    t:assertEq(b[1].s, {"r1", "r2"})
    t:assertEq(b[2].x, {3})
    t:assertEq(#collect(ac, {batch_size = 2, drop_last = true}), 1, "drop_last")
    t:assertEq(#ac:limit(2):take(5), 2, "take after limit")
end

-- ---- transforms against torchvision ------------------------------------------

function tests.resize_and_center_crop_match_torchvision(t)
    local refs = ml.st_load(TF_FIX .. "refs.safetensors")
    local cases = ml.json_load(TF_FIX .. "cases.json")
    local n = 0
    for name, c in pairs(cases) do
        local tf = ml.data.ImageTransform{resize = c.resize, crop = c.crop > 0 and "center" or nil,
                                          size = c.crop > 0 and c.crop or nil, normalize = c.normalize}
        local got = core.data_load(TF_FIX .. c.input, tf)
        local want = refs[name]
        t:assertEq(got:size(), want:size(), name .. " shape")
        local mad = (got:double() - want:double()):abs():mean():item()
        t:assert(mad <= 1 / 255, string.format("%s: mean abs difference %.3g > 1/255", name, mad))
        t:assertTensorEq(got, want, 4 / 255, name .. " max abs difference")
        n = n + 1
    end
    t:assertEq(n, 6, "cases")
end

function tests.photos_become_rgb(t)
    -- EXIF orientation, grayscale, gray+alpha, RGBA and 16-bit PNG: what
    -- the image loader (tested against Pillow in test_image.lua) decodes.
    for _, f in ipairs {"exif_rot6.jpg", "exif_rot8.png", "gray.png", "gray.jpg", "gray_alpha.png", "rgba.png",
                        "rgb16.png", "rgb.bmp"} do
        local got = core.data_load(IMG_FIX .. f)
        t:assertEq(got:size(3), 3, f .. " has 3 channels")
        t:assertTensorEq(got, core.image_load(IMG_FIX .. f), 0, f)
    end
    -- Rotated: exif_rot6.jpg / exif_rot8.png are stored 32 wide, 16 high,
    -- and shown portrait.
    for _, f in ipairs {"exif_rot6.jpg", "exif_rot8.png"} do
        local r = core.data_load(IMG_FIX .. f)
        t:assertEq({r:size(1), r:size(2)}, {32, 16}, f .. ": EXIF rotation applied")
    end
    -- Adobe CMYK JPEG against Pillow's conversion (libjpeg vs stb IDCT: within 1/255).
    local cmyk = core.data_load(TF_FIX .. "cmyk.jpg")
    local pil = ml.st_load(TF_FIX .. "refs.safetensors").cmyk_rgb_by_pil:double() / 255
    t:assertTensorEq(cmyk, pil, 1.5 / 255, "CMYK -> RGB")
end

local function random_crop_dataset(dir, seed)
    return ml.data.read_images(dir)
        :map_batches(ml.data.ImageTransform{resize = 24, crop = "random", size = 16, hflip = 0.5, seed = seed or 0},
                     {column = "image", output = "pixels"})
        :drop_columns{"image"}
end

function tests.random_crops_are_crops_and_independent_of_threads(t)
    local dir = image_dir(6, {{40, 30}, {30, 45}, {24, 24}, {33, 50}})
    local ds = random_crop_dataset(dir)
    local one = collect(ds, {batch_size = 4, num_threads = 1})
    local three = collect(ds, {batch_size = 4, num_threads = 3, prefetch = 3})
    t:assertEq(#one, 2)
    t:assertEq(one[1].pixels:size(), {4, 16, 16, 3})
    t:assertEq(one[2].pixels:size(), {2, 16, 16, 3})
    for i = 1, 2 do t:assertTensorEq(three[i].pixels, one[i].pixels, 0, "batch " .. i .. ", 1 vs 3 threads") end
    t:assertTensorEq(collect(ds, {batch_size = 4, num_threads = 2})[1].pixels, one[1].pixels, 0, "rerun")
    local e2 = collect(ds, {batch_size = 4, epoch = 2})
    local diff = (e2[1].pixels - one[1].pixels):abs():max():item()
    t:assert(diff > 0, "epoch 2 draws other crops or flips")
    -- Each output is a (possibly flipped) window of the resized image.
    local full_tf = ml.data.ImageTransform{resize = 24}
    local rows = ds:rows(1)
    local flips = 0
    for i = 1, 6 do
        local full = core.data_load(rows[i].path, full_tf):totable()
        local crop = one[(i - 1) // 4 + 1].pixels:select(1, (i - 1) % 4 + 1):totable()
        local found = false
        for _, flip in ipairs {false, true} do
            for y0 = 0, #full - 16 do
                for x0 = 0, #full[1] - 16 do
                    local ok = true
                    for y = 1, 16 do
                        for x = 1, 16, 5 do
                            local sx = flip and (x0 + 17 - x) or (x0 + x)
                            if full[y0 + y][sx][2] ~= crop[y][x][2] then ok = false break end
                        end
                        if not ok then break end
                    end
                    if ok then found = true; if flip then flips = flips + 1 end break end
                end
                if found then break end
            end
            if found then break end
        end
        t:assert(found, "sample " .. i .. " is a window of its resized image")
    end
    t:assert(flips > 0 and flips < 6, "hflip = 0.5 flipped some but not all of 6 (got " .. flips .. ")")
    util.remove_tree(dir)
end

function tests.flip_and_normalize(t)
    local path = TF_FIX .. "b_64x33.png"
    local plain = core.data_load(path, ml.data.ImageTransform{resize = 20, crop = "center", size = 20})
    local flipped = core.data_load(path, ml.data.ImageTransform{resize = 20, crop = "center", size = 20, hflip = 1})
    local rev = {}
    for i = 1, 20 do rev[i] = 21 - i end
    t:assertTensorEq(flipped, ml.index_select(plain, 2, ml.tensor(rev, {dtype = "i64"})), 0, "hflip = 1 mirrors")
    local norm = core.data_load(path, ml.data.ImageTransform{resize = 20, crop = "center", size = 20, normalize = true})
    t:assertTensorEq(norm, plain * 2 - 1, 1e-6, "normalize: (x - 0.5) / 0.5")
    local function min(x) return -(-x):max():item() end
    t:assert(min(norm) >= -1 and norm:max():item() <= 1, "normalised range")
    t:assert(min(norm) < -0.5 and norm:max():item() > 0.5, "uses the range")
    t:assert(min(plain) >= 0 and plain:max():item() <= 1, "ToTensor range")
end

-- flip_drawn says, without decoding, which images the loader flips: over
-- three epochs of center crops with hflip = 0.5, each delivered image is
-- the unflipped one mirrored exactly when flip_drawn says so.
function tests.flip_drawn_is_the_loaders_draw(t)
    local dir = image_dir(6, {{40, 30}, {30, 45}, {24, 24}, {33, 50}})
    local function ds_of(hflip)
        return ml.data.read_images(dir)
            :map_batches(ml.data.ImageTransform{resize = 16, crop = "center", size = 16, hflip = hflip, seed = 3},
                         {column = "image", output = "pixels"})
            :drop_columns{"image"}
    end
    local plain = collect(ds_of(0), {batch_size = 6})[1].pixels
    local rev = {}
    for i = 1, 16 do rev[i] = 17 - i end
    local mirrored = ml.index_select(plain, 3, ml.tensor(rev, {dtype = "i64"}))
    local ds = ds_of(0.5)
    local rows = ds:rows(1)
    local seen = {[true] = 0, [false] = 0}
    for epoch = 1, 3 do
        local got = collect(ds, {batch_size = 6, epoch = epoch})[1].pixels
        for i = 1, 6 do
            local ref = rows[i].pixels
            local f = ml.data.flip_drawn(ref.transform.seed, epoch, ref.key, ref.transform.hflip)
            seen[f] = seen[f] + 1
            t:assertTensorEq(got:select(1, i), (f and mirrored or plain):select(1, i), 0,
                             string.format("epoch %d image %d (%s)", epoch, i, f and "flipped" or "not flipped"))
        end
    end
    t:assert(seen[true] > 0 and seen[false] > 0, string.format("both cases met (%d flipped, %d not)", seen[true], seen[false]))
    t:assert(not ml.data.flip_drawn(1, 1, 0, 0) and ml.data.flip_drawn(1, 1, 0, 1), "hflip 0 never flips, 1 always")
    t:assertError(function() ml.data.flip_drawn(1, 1, 0, 1.5) end, "hflip is a probability")
    util.remove_tree(dir)
end

-- ---- the DreamBooth shape -------------------------------------------------------

function tests.repeat_zip_limit_recipe(t)
    local inst = image_dir(5, {{30, 40}}, "inst")
    local cls = image_dir(12, {{40, 30}, {36, 36}}, "cls")
    local tf = ml.data.ImageTransform{resize = 16, crop = "center", size = 16, normalize = true}
    local instance = ml.data.read_images(inst):map_batches(tf, {output = "instance_image"})
        :add_column("instance_prompt_ids", function(b)
            local out = {}
            for i = 1, #b.path do
                local ids = {}
                for k = 1, 77 do ids[k] = (k == 1) and 49406 or i end
                out[i] = ids
            end
            return out
        end)
        :drop_columns{"image", "path"}
    local class = ml.data.read_images(cls):map_batches(tf, {output = "class_image"})
        :map(function(r) return {class_image = r.class_image, class_path = r.path,
                                 class_prompt_ids = ml.tensor({1, 2, 3}, {dtype = "i64"})} end)
    local n = class:count()
    t:assertEq(n, 12)
    local two = class:take(2)
    t:assertEq(#two, 2)
    t:assertEq(two[2].class_image:size(), {16, 16, 3}, "take decodes and transforms")
    t:assertEq(two[2].class_path, cls .. "/cls02.png")
    local ds = instance:repeat_n(math.ceil(n / 5)):limit(n):zip(class):random_shuffle(0)
    t:assertEq(ds:count(), 12)
    local batches = collect(ds, {batch_size = 4})
    t:assertEq(#batches, 3)
    local seen = {}
    for _, b in ipairs(batches) do
        t:assertEq(b.instance_image:size(), {4, 16, 16, 3})
        t:assertEq(b.class_image:size(), {4, 16, 16, 3})
        t:assertEq(b.instance_prompt_ids:size(), {4, 77})
        t:assertEq(b.instance_prompt_ids.dtype, "i64")
        t:assertEq(b.class_prompt_ids:size(), {4, 3})
        t:assertEq(b.class_prompt_ids.dtype, "i64")
        t:assertEq(b.instance_prompt_ids:totable()[1][1], 49406)
        for _, p in ipairs(b.class_path) do seen[p] = (seen[p] or 0) + 1 end
    end
    local count = 0
    for _, c in pairs(seen) do t:assertEq(c, 1); count = count + 1 end
    t:assertEq(count, 12, "every class image once")
    -- zip needs equal counts, and no column in both.
    t:assertError(function() instance:zip(class):count() end, "different row counts (5 and 12)")
    t:assertError(function() class:zip(class):count() end, "is in both datasets")
    util.remove_tree(inst)
    util.remove_tree(cls)
end

function tests.start_batch_resumes_the_epoch(t)
    local dir = image_dir(7, {{30, 40}, {40, 30}})
    local ds = random_crop_dataset(dir, 5):random_shuffle(9)
    local full = collect(ds, {batch_size = 2, epoch = 3})
    local tail = collect(ds, {batch_size = 2, epoch = 3, start_batch = 3})
    t:assertEq(#full, 4)
    t:assertEq(#tail, 2)
    for i = 1, 2 do
        t:assertTensorEq(tail[i].pixels, full[i + 2].pixels, 0, "batch " .. (i + 2))
        t:assertEq(tail[i].path, full[i + 2].path)
    end
    t:assertEq(#collect(ds, {batch_size = 2, start_batch = 5}), 0, "start just past the end")
    t:assertError(function() ds:iter_batches{batch_size = 2, start_batch = 6} end, "past the end of the epoch (4 batches)")
    util.remove_tree(dir)
end

-- ---- bad input ------------------------------------------------------------------

function tests.bad_inputs_name_what_is_wrong(t)
    t:assertError(function() ml.data.read_images("no/such/folder") end, "no such folder 'no/such/folder'")
    local dir = util.temp_dir()
    util.write_file(dir .. "/notes.txt", "hello")
    t:assertError(function() ml.data.read_images(dir) end, "no images")
    -- A truncated JPEG among good files: the error names it, from the iterator.
    local jpg = util.read_file(IMG_FIX .. "photo.jpg")
    util.write_file(dir .. "/b_cut.jpg", jpg:sub(1, #jpg // 2))
    core.image_save(dir .. "/a_good.png", pattern(20, 20, 1))
    core.image_save(dir .. "/c_good.png", pattern(20, 20, 2))
    local ds = ml.data.read_images(dir)
        :map_batches(ml.data.ImageTransform{resize = 16, crop = "center", size = 16}, {output = "x"})
        :drop_columns{"image"}
    t:assertEq(ds:count(), 3, "notes.txt skipped")
    local it = ds:iter_batches{batch_size = 1}
    t:assertEq(it().x:size(), {1, 16, 16, 3})
    t:assertError(function() it() end, dir .. "/b_cut.jpg")
    t:assertEq(it().x:size(), {1, 16, 16, 3}, "the next batch still comes")
    it:close()
    -- Images of different sizes in one batch, without a crop.
    local raw = ml.data.read_images(dir):limit(3)
    local e = util.error_of(function() collect(raw:drop_columns{"path"}:limit(1):zip(
        ml.data.read_images(IMG_FIX):limit(1):drop_columns{"image"}), {batch_size = 1}) end)
    t:assert(e == nil, "one image per batch has one size: " .. tostring(e))
    local mixed = util.temp_dir()
    core.image_save(mixed .. "/a.png", pattern(20, 20, 1))
    core.image_save(mixed .. "/b.png", pattern(21, 20, 1))
    t:assertError(function() collect(ml.data.read_images(mixed), {batch_size = 2}) end, "must have one size")
    -- The pixel cap, before decoding.
    local capped = ml.data.read_images(mixed, {max_pixels = 300})
    t:assertError(function() capped:take(1) end, "above the limit")
    t:assertError(function() collect(capped, {batch_size = 1}) end, mixed .. "/a.png")
    -- Crop larger than the resized image; bad options.
    t:assertError(function() core.data_load(mixed .. "/a.png", ml.data.ImageTransform{crop = "center", size = 30}) end,
                  "smaller than the crop size 30")
    t:assertError(function() ml.data.ImageTransform{crop = "middle", size = 4} end, "crop must be")
    t:assertError(function() ml.data.ImageTransform{hflip = 2} end, "hflip is a probability")
    t:assertError(function() ml.data.from_items(items(3)):shard(3, 3) end, "rank 3 is not below world_size 3")
    t:assertError(function() ml.data.from_items(items(3)):iter_batches{batchsize = 2} end, "unknown option 'batchsize'")
    t:assertError(function() ml.data.from_items(items(3)):map_batches(ml.data.ImageTransform{}):count() end,
                  "column 'image' of row 1 is not an image")
    util.remove_tree(dir)
    util.remove_tree(mixed)
end

-- The binary under test, as test_cli.lua finds it.
local function moonlit_bin()
    local bin = os.getenv("MOONLIT_BIN")
    if not bin and type(arg) == "table" and arg[-1] ~= nil then
        local i = -1
        while arg[i - 1] ~= nil do i = i - 1 end
        bin = arg[i]
    end
    return "'" .. (bin or "build/moonlit"):gsub("'", "'\\''") .. "'"
end

function tests.non_image_files_get_one_warning_naming_them(t)
    local dir = image_dir(2, {{8, 8}})
    util.write_file(dir .. "/notes.txt", "x")
    util.write_file(dir .. "/.DS_Store", "x")
    local script = dir .. "/../" .. dir:match("[^/]+$") .. "-read.lua"
    util.write_file(script, string.format(
        "local ml = require 'moonlit'\nio.stdout:write(ml.data.read_images(%q):count(), '\\n')\n", dir))
    local p = io.popen(moonlit_bin() .. " '" .. script .. "' 2>&1")
    local out = p:read("a")
    p:close()
    os.remove(script)
    local warnings = select(2, out:gsub("skipping", ""))
    t:assertEq(warnings, 1, "one warning: " .. out)
    t:assert(util.has(out, "skipping 2 non-image files") and util.has(out, dir .. "/notes.txt")
             and util.has(out, dir .. "/.DS_Store"), "names them: " .. out)
    t:assertEq(out:match("(%d+)%s*$"), "2", "two images counted: " .. out)
    util.remove_tree(dir)
end

-- ---- threads --------------------------------------------------------------------

function tests.no_threads_left_after_break_close_or_end(t)
    local dir = image_dir(8, {{20, 20}})
    local ds = ml.data.read_images(dir)
    collectgarbage()
    local base = core.data_live_threads()
    do
        local it = ds:iter_batches{batch_size = 1, num_threads = 2, prefetch = 2}
        local b = it()
        t:assertEq(b.image:size(), {1, 20, 20, 3})
        t:assertEq(core.data_live_threads(), base + 2, "two workers while batches remain")
        local s = it:stats()
        t:assertEq(s.batches, 1)
        t:assert(s.wait_ms >= 0 and s.decode_ms > 0, "timings")
    end
    collectgarbage()
    collectgarbage()
    t:assertEq(core.data_live_threads(), base, "an iterator out of scope and collected leaves no workers")
    for _ in ds:iter_batches{batch_size = 1, num_threads = 3} do break end
    t:assertEq(core.data_live_threads(), base, "a break out of `for b in ds:iter_batches{}` joins the workers")
    local kept = ds:iter_batches{batch_size = 1, num_threads = 3}
    for _ in kept do break end
    t:assertEq(core.data_live_threads(), base + 3, "an iterator kept in a variable keeps its workers")
    kept = nil   -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    t:assertEq(core.data_live_threads(), base, "collecting it joins them")
    local it = ds:iter_batches{batch_size = 3, num_threads = 2}
    it()
    it:close()
    t:assertEq(core.data_live_threads(), base, "close joins the workers")
    t:assertEq(it(), nil, "a closed iterator ends")
    local n = 0
    local it2 = ds:iter_batches{batch_size = 3}
    for _ in it2 do n = n + 1 end
    t:assertEq(n, 3)
    t:assertEq(core.data_live_threads(), base, "the end of the loop joins the workers")
    t:assertEq(it2:stats().batches, 3)
    util.remove_tree(dir)
end

-- On a GPU: the batches land on the device (pinned buffers, async copies
-- on the compute stream) and equal the CPU batches bit for bit; plain
-- integer columns follow the device.
function tests.cuda_batches_equal_cpu_batches(t)
    if not (core.built_with_cuda and core.cuda_available and core.cuda_available()) then return end
    local dir = image_dir(9, {{30, 40}, {40, 30}})
    local ds = random_crop_dataset(dir, 1):add_column("ids", function(b)
        local out = {}
        for i = 1, #b.path do out[i] = {i, 2, 3} end
        return out
    end)
    local cpu = collect(ds, {batch_size = 2, epoch = 2})
    collectgarbage()
    local base = core.data_live_threads()
    for round = 1, 3 do   -- reuses the pinned buffers once their copies are done
        local it = ds:iter_batches{batch_size = 2, epoch = 2, device = "cuda", prefetch = 2}
        local i = 0
        for b in it do
            i = i + 1
            t:assertEq(b.pixels.device, "cuda:0")
            t:assertEq(b.ids.device, "cuda:0")
            t:assertTensorEq(b.pixels, cpu[i].pixels, 0, "round " .. round .. ", batch " .. i)
            t:assertTensorEq(b.ids, cpu[i].ids, 0, "ids")
        end
        t:assertEq(i, 5)
    end
    t:assertEq(core.data_live_threads(), base)
    util.remove_tree(dir)
end

return tests
