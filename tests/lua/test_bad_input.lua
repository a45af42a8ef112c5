-- test_bad_input.lua — inputs that once crashed, hung or gave silently wrong
-- results, each now a clear error: sizes whose products overflow, integer
-- arguments that do not fit, split/chunk sizes, files that are not regular
-- files, file names holding a NUL byte, huge scheduler configs, images
-- declaring huge sizes, in-place writes through views whose elements share
-- memory and tensor keys that name nothing.  Every input is made here; nothing is allocated at the
-- sizes named.
local ml = require "moonlit"
local util = require "testutil"
local S = require "moonlit.schedulers"
local core = ml.core
local F = ml.F
local has, error_of = util.has, util.error_of

local T = {}

-- fn must fail with a message containing every one of `parts`.
local function fails_with(t, fn, parts, what)
    local e = error_of(fn)
    if not e then t:assert(false, what .. ": no error raised") return end
    for _, p in ipairs(parts) do
        t:assert(has(e, p), string.format("%s: error '%s' does not mention '%s'", what, e, p))
    end
end

-- ---- sizes ----------------------------------------------------------------

function T.creation_sizes_that_overflow(t)
    -- numel 2^62 times 4 bytes wrapped to 0 bytes
    fails_with(t, function() return ml.ones(1 << 31, 1 << 31) end, {"[2147483648, 2147483648]", "too large"},
               "ones(2^31, 2^31)")
    -- the 64-byte rounding of the allocation wrapped
    fails_with(t, function() return ml.zeros {(1 << 62) - 1} end, {"[4611686018427387903]", "too large"},
               "zeros{2^62 - 1}")
    -- numel wrapped to 4: a 16-byte storage that a[2] then wrote past
    fails_with(t, function()
        local a = ml.zeros {(1 << 62) + 1, 4}
        a[2]:fill_(42)
    end, {"[4611686018427387905, 4]", "too large"}, "zeros{2^62 + 1, 4}")
    -- numel wrapped to 0
    fails_with(t, function() return ml.zeros {1 << 32, 1 << 32} end, {"[4294967296, 4294967296]"}, "zeros{2^32, 2^32}")
    -- a zero size does not excuse the rest: the strides would still overflow
    fails_with(t, function() return ml.zeros {0, 1 << 40, 1 << 40} end, {"too large"}, "zeros{0, 2^40, 2^40}")
    for _, make in ipairs {ml.empty, ml.rand, ml.randn} do
        fails_with(t, function() return make(1 << 40, 1 << 40) end, {"too large"}, "empty/rand/randn")
    end
    fails_with(t, function() return ml.full({1 << 31, 1 << 31}, 1) end, {"too large"}, "full")
    fails_with(t, function() return ml.randint(0, 5, {1 << 32, 1 << 32}) end, {"too large"}, "randint")
    fails_with(t, function() return ml.zeros({1 << 62}, {dtype = "f64"}) end, {"float64", "too large"}, "f64")
    -- byte-sized elements: 2^62 - 1 bytes passes the size check, and the
    -- allocation itself is refused with a message instead of wrapping
    fails_with(t, function() return ml.zeros({(1 << 62) - 1}, {dtype = "u8"}) end, {"memory"}, "u8 2^62")
    fails_with(t, function() return ml.arange(0, 1e300) end, {"arange", "too many"}, "arange(0, 1e300)")
end

function T.negative_and_non_integer_sizes(t)
    fails_with(t, function() return ml.zeros {2, -3} end, {"negative size -3", "[2, -3]"}, "zeros{2, -3}")
    fails_with(t, function() return ml.ones(-1) end, {"negative size -1"}, "ones(-1)")
    fails_with(t, function() return ml.zeros {2.5} end, {"must be an integer", "2.5"}, "zeros{2.5}")
    fails_with(t, function() return ml.zeros {2 ^ 63} end, {"must be an integer"}, "zeros{2^63}")
    fails_with(t, function() return ml.zeros {"4"} end, {"must be an integer", "string"}, "zeros{'4'}")
    fails_with(t, function() return ml.ones(3):view(-2, 3) end, {"invalid size -2"}, "view(-2, 3)")
    fails_with(t, function() return ml.ones(1, 3):expand(-2, 3) end, {"negative size -2"}, "expand(-2, 3)")
    -- integral floats are integers
    t:assertEq(ml.zeros {2.0, 3.0}:size(), {2, 3})
end

function T.views_whose_sizes_overflow(t)
    local x = ml.tensor {1, 2, 3}
    fails_with(t, function() return x:expand((1 << 62) + 1, 3) + 1 end, {"expand", "[4611686018427387905, 3]"},
               "expand(2^62 + 1, 3)")
    -- 2^61 x 3 elements fit in an int64, but not their float32 bytes
    fails_with(t, function() return x:expand(1 << 61, 3) end, {"expand", "too large"}, "expand(2^61, 3)")
    -- the product (2^62 + 1) * 4 wrapped to 4 and passed as a view of 4 elements
    fails_with(t, function() return ml.zeros(4):view((1 << 62) + 1, 4) end, {"view", "invalid"},
               "view(2^62 + 1, 4)")
    fails_with(t, function() return ml.zeros(4):view(1 << 32, 1 << 32, 0) end, {"view", "invalid"},
               "view(2^32, 2^32, 0)")
    -- reading a huge byte view as doubles: 2^62 elements are 2^65 bytes, which wrapped to 0
    local bytes = ml.zeros({1}, {dtype = "u8"}):expand(1 << 62)
    fails_with(t, function() return bytes:totable() end, {"too many elements"}, "totable of 2^62 bytes")
    fails_with(t, function() return tostring(bytes) end, {"too many elements"}, "tostring of 2^62 bytes")
    local ok = ml.ones(2, 3):expand(4, 2, 3)
    t:assertEq(ok:size(), {4, 2, 3})
    t:assertEq(ok:stride(1), 0)
end

function T.narrow_and_select_bounds(t)
    local a = ml.ones(3, 3)
    -- start + length overflowed and passed the bounds check
    fails_with(t, function() return a:narrow(1, math.maxinteger, 2) end, {"narrow", "out of range"},
               "narrow(1, maxinteger, 2)")
    fails_with(t, function() return a:narrow(1, 2, math.maxinteger) end, {"narrow", "out of range"},
               "narrow(1, 2, maxinteger)")
    fails_with(t, function() return a:narrow(1, math.mininteger, 1) end, {"narrow", "out of range"},
               "narrow(1, mininteger, 1)")
    fails_with(t, function() return a:narrow(1, 1.5, 1) end, {"narrow: start", "integer"}, "narrow start 1.5")
    fails_with(t, function() return a:select(1, math.mininteger) end, {"select", "out of range"}, "select(min)")
    fails_with(t, function() return a[1.5] end, {"tensor index must be an integer", "1.5"}, "t[1.5]")
    fails_with(t, function() return a[math.maxinteger] end, {"out of range"}, "t[maxinteger]")
    -- the host op keeps its own check for C callers
    t:assertEq(a:narrow(2, 3, 1):size(), {3, 1})
    t:assertEq(a:narrow(2, 4, 0):size(), {3, 0})
end

function T.cat_and_upsample_sizes(t)
    local big = ml.tensor {1}:expand(1 << 60)
    fails_with(t, function() return ml.cat({big, big, big, big, big, big, big, big}, 1) end, {"cat", "2^63"},
               "cat past 2^63")
    local x = ml.ones(1, 1, 2, 1)
    fails_with(t, function() return F.upsample_nearest2d(x:expand(1, 1 << 40, 2, 1), 1 << 30) end,
               {"upsample_nearest2d", "too large"}, "upsample of a huge view")
end

-- ---- integer arguments ----------------------------------------------------

function T.integer_arguments_are_range_checked(t)
    local x, w = ml.ones(1, 4, 4, 1), ml.ones(1, 3, 3, 1)
    -- 2^32 + 1 was narrowed to 1, 1.5 truncated to 0
    fails_with(t, function() return F.conv2d(x, w, nil, {padding = 2 ^ 32 + 1}) end,
               {"padding", "4294967297", "out of range"}, "padding 2^32 + 1")
    fails_with(t, function() return F.conv2d(x, w, nil, {padding = (1 << 32) + 1}) end,
               {"padding", "out of range"}, "integer padding 2^32 + 1")
    fails_with(t, function() return F.conv2d(x, w, nil, {padding = 1.5}) end, {"padding", "integer", "1.5"},
               "padding 1.5")
    fails_with(t, function() return F.conv2d(x, w, nil, {padding = {1, 0.5}}) end, {"padding[2]", "integer"},
               "padding {1, 0.5}")
    fails_with(t, function() return F.conv2d(x, w, nil, {padding = {0, 0, 1, 2 ^ 40}}) end,
               {"padding[4]", "out of range"}, "four paddings")
    fails_with(t, function() return F.conv2d(x, w, nil, {stride = 0}) end, {"stride", "out of range"}, "stride 0")
    fails_with(t, function() return F.conv2d(x, w, nil, {stride = 1.5}) end, {"stride", "integer"}, "stride 1.5")
    -- the same values, integral, still work
    t:assertEq(F.conv2d(x, w, nil, {padding = 1.0}):size(), {1, 4, 4, 1})
    -- scale 2^32 + 2 acted as 2
    fails_with(t, function() return F.upsample_nearest2d(x, 2 ^ 32 + 2) end, {"scale", "out of range"},
               "upsample scale 2^32 + 2")
    fails_with(t, function() return F.upsample_nearest2d(x, 1.5) end, {"scale", "integer"}, "upsample 1.5")
    t:assertEq(F.upsample_nearest2d(x, 2):size(), {1, 8, 8, 1})
    fails_with(t, function() return F.group_norm(ml.ones(1, 2, 2, 4), 2 ^ 32 + 2) end, {"groups", "out of range"},
               "group_norm groups")
    fails_with(t, function() return F.group_norm(ml.ones(1, 2, 2, 4), 1.5) end, {"groups", "integer"}, "groups 1.5")
    fails_with(t, function() return ml.ones(3):var(1, {correction = 0.5}) end, {"correction", "integer"},
               "var correction 0.5")
    fails_with(t, function() return ml.ones(3):sum(1.5) end, {"dimension", "integer"}, "sum(1.5)")
    fails_with(t, function() return ml.ones(3):cuda(300) end, {"device index", "out of range"}, "cuda(300)")
    fails_with(t, function() return ml.manual_seed(1.5) end, {"seed", "integer"}, "manual_seed(1.5)")
    fails_with(t, function() return ml.randint(0.5, 3, {2}) end, {"low", "integer"}, "randint low 0.5")
    fails_with(t, function() return core.image_resize(ml.zeros(2, 2, 3), 2 ^ 31, 2) end, {"height", "out of range"},
               "image_resize height")
    -- seeds are 64-bit: the largest and the negative ones are accepted
    t:assertNoError(function() ml.manual_seed(math.maxinteger); ml.manual_seed(-1); ml.manual_seed(0) end, "seeds")
end

function T.hook_ids_pids_and_descriptors_are_range_checked(t)
    -- remove_hook((1 << 32) + id) was narrowed to id and removed that hook
    local x = ml.tensor({1, 2}, {requires_grad = true})
    local calls = 0
    local id = x:register_hook(function() calls = calls + 1 end)
    fails_with(t, function() x:remove_hook((1 << 32) + id) end, {"remove_hook", "id", "out of range"},
               "remove_hook 2^32 + id")
    fails_with(t, function() x:remove_hook(1.5) end, {"remove_hook", "integer"}, "remove_hook 1.5")
    x:sum():backward()
    t:assertEq(calls, 1, "the hook is still registered")
    x:remove_hook(id)
    x.grad = nil
    x:sum():backward()
    t:assertEq(calls, 1, "removed with its own id")
    -- (1 << 32) + 1 was pid 1; 2^32 was descriptor 0
    fails_with(t, function() core.kill_pid((1 << 32) + 1, "TERM") end, {"kill_pid", "pid", "out of range"},
               "kill_pid 2^32 + 1")
    fails_with(t, function() core.kill_pid(0, "TERM") end, {"kill_pid", "out of range"}, "kill_pid 0")
    fails_with(t, function() core.try_wait(-1) end, {"try_wait", "out of range"}, "try_wait -1")
    fails_with(t, function() core.close_fd(1 << 32) end, {"close_fd", "out of range"}, "close_fd 2^32")
    fails_with(t, function() core.read_fd(1 << 32) end, {"read_fd", "out of range"}, "read_fd 2^32")
    fails_with(t, function() core.poll_readable({1 << 32}, 0) end, {"poll_readable", "out of range"},
               "poll_readable fd 2^32")
    fails_with(t, function() core.poll_readable({}, (1 << 32) + 5) end, {"poll_readable", "timeout", "out of range"},
               "poll_readable timeout 2^32 + 5")
    t:assertEq(core.poll_readable({}, 0), {}, "no descriptors, no wait")
    -- a data transform's resize 2^32 + 8 acted as 8
    local img = "tests/fixtures/images/photo.png"
    fails_with(t, function() return core.data_load(img, {resize = (1 << 32) + 8}) end,
               {"data loader: resize", "out of range"}, "data transform resize 2^32 + 8")
    fails_with(t, function() return core.data_load(img, {size = 1.5, crop = "center"}) end,
               {"data loader: size", "integer"}, "data transform size 1.5")
    t:assertEq(core.data_load(img, {resize = 8}):size(1), 8, "resize 8 still works")
end

-- ---- split and chunk ------------------------------------------------------

function T.split_and_chunk_sizes(t)
    local x = ml.arange(0, 6)
    -- split(0) looped forever making empty views
    fails_with(t, function() return x:split(0) end, {"split", "at least 1"}, "split(0)")
    fails_with(t, function() return x:split(-2) end, {"split", "at least 1"}, "split(-2)")
    fails_with(t, function() return x:split(1.5) end, {"split", "integer"}, "split(1.5)")
    fails_with(t, function() return x:split({2, -1, 5}) end, {"split", "size 2"}, "split{2, -1, 5}")
    fails_with(t, function() return x:split({2, 5}) end, {"do not sum"}, "split{2, 5}")
    -- chunk(0) raised "attempt to perform 'n//0'"
    fails_with(t, function() return x:chunk(0) end, {"chunk", "at least 1"}, "chunk(0)")
    fails_with(t, function() return x:chunk(-1) end, {"chunk", "at least 1"}, "chunk(-1)")
    fails_with(t, function() return x:chunk("2") end, {"chunk", "integer"}, "chunk('2')")
    t:assertEq(#{x:chunk(math.maxinteger)}, 6, "chunk(maxinteger) gives one-element chunks")
    t:assertEq(#{x:split(math.maxinteger)}, 1)
    local a, b = x:split(4)
    t:assertEq(a:totable(), {0, 1, 2, 3})
    t:assertEq(b:totable(), {4, 5})
    local p, q, r = x:split({1, 0, 5})
    t:assertEq({p:numel(), q:numel(), r:numel()}, {1, 0, 5})
end

-- ---- in-place writes through overlapping views ------------------------------

local OVERLAP = {"more than one element of the written-to tensor refers to a single memory location",
                 "shape [4, 3]", "strides [0, 1]", "clone()", "contiguous()"}

local function overlap_fails(t, op, fn)
    local parts = {op .. ": "}
    for _, p in ipairs(OVERLAP) do parts[#parts + 1] = p end
    fails_with(t, fn, parts, op .. " into expand(4, 3)")
end

function T.inplace_writes_through_expanded_views_are_refused(t)
    -- every row of e is the one row of base: add_(1) added 1 four times (5s)
    local base = ml.ones(1, 3)
    local e = base:expand(4, 3)
    overlap_fails(t, "add_", function() e:add_(1) end)
    overlap_fails(t, "add_", function() e:add_(ml.ones(4, 3)) end)
    overlap_fails(t, "add_", function() e:add_(ml.ones(4, 3), 2) end)
    overlap_fails(t, "sub_", function() e:sub_(1) end)
    overlap_fails(t, "sub_", function() e:sub_(ml.ones(3)) end)
    overlap_fails(t, "mul_", function() e:mul_(2) end)
    overlap_fails(t, "mul_", function() e:mul_(ml.full({4, 3}, 2)) end)
    overlap_fails(t, "div_", function() e:div_(2) end)
    overlap_fails(t, "clamp_", function() e:clamp_(0, 0.5) end)
    overlap_fails(t, "fill_", function() e:fill_(7) end)
    overlap_fails(t, "zero_", function() e:zero_() end)
    overlap_fails(t, "copy_", function() e:copy_(ml.arange(12):view(4, 3)) end)
    overlap_fails(t, "normal_", function() e:normal_() end)
    overlap_fails(t, "uniform_", function() e:uniform_() end)
    t:assertTensorEq(base, ml.ones(1, 3), 0, "nothing was written")
    -- refused in no_grad too: the overlap is no autograd matter
    ml.no_grad(function() overlap_fails(t, "add_", function() e:add_(1) end) end)
    -- a stride-0 dim is refused wherever it sits, and whatever the other strides
    fails_with(t, function() ml.zeros(3, 1):expand(3, 5):fill_(1) end, {"fill_:", "shape [3, 5]", "strides [1, 0]"},
               "fill_ into zeros(3, 1):expand(3, 5)")
    fails_with(t, function() ml.tensor(2):expand(2, 2):mul_(3) end, {"mul_:", "shape [2, 2]", "strides [0, 0]"},
               "mul_ into a 0-dim tensor expanded")
    -- the way out the message names
    t:assertTensorEq(e:clone():add_(1), ml.full({4, 3}, 2), 0, "clone():add_(1)")
    t:assertTensorEq(e:contiguous():mul_(3), ml.full({4, 3}, 3), 0, "contiguous():mul_(3)")
end

function T.inplace_writes_through_views_without_overlap_work(t)
    -- an expanded tensor read as a source is fine; only the destination matters
    local d = ml.zeros(4, 3)
    d:copy_(ml.arange(3):view(1, 3):expand(4, 3))
    t:assertTensorEq(d, ml.tensor{{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2}}, 0, "copy_ from expand")
    d:add_(ml.ones(1, 3):expand(4, 3))
    t:assertTensorEq(d[4], ml.tensor{1, 2, 3}, 0, "add_ of an expanded source")
    -- transposed: strides [1, 3], no two elements shared
    local x = ml.arange(6):float():view(2, 3)
    local xt = x:t()
    t:assertEq(xt:is_contiguous(), false)
    xt:add_(10)
    xt:mul_(ml.tensor{{1, 2}, {1, 2}, {1, 2}})
    t:assertTensorEq(x, ml.tensor{{10, 11, 12}, {26, 28, 30}}, 0, "written through the transpose")
    xt:copy_(ml.tensor{{1, 4}, {2, 5}, {3, 6}})
    t:assertTensorEq(x, ml.tensor{{1, 2, 3}, {4, 5, 6}}, 0, "copy_ into the transpose")
    -- a permuted column of a 3-D tensor, and expanding along a size-1 dim to size 1
    local y = ml.zeros(2, 3, 4)
    y:permute(3, 1, 2):narrow(1, 2, 2):fill_(1)
    t:assertEq(y:sum():item(), 12.0, "two of the four columns filled")
    local col = ml.zeros(3, 1)
    col:expand(3, 1):add_(1)
    t:assertTensorEq(col, ml.ones(3, 1), 0, "expand to the same shape")
    -- empty tensors have nothing to overlap
    ml.zeros(0, 1):expand(0, 4):fill_(1)
end

function T.inplace_errors_name_the_op_called_once(t)
    -- sub_ and div_ run as add_ and mul_ of -s and 1/s; the message names what was called, with its scalar
    local i = ml.ones(3):int()
    -- div_ is true division, so an integer destination is refused whatever the divisor
    -- (div_(0.5) multiplied by 2 and kept the int32 tensor)
    for _, d in ipairs {2, 0.5, 1, ml.ones(3), ml.ones(3):int()} do
        fails_with(t, function() i:div_(d) end, {"div_:", "true division", "dtype int32"}, "int div_")
    end
    fails_with(t, function() ml.ones(3):long():div_(2) end, {"div_:", "dtype int64"}, "int64 div_(2)")
    t:assertEq(i:totable(), {1, 1, 1}, "the int tensor is unchanged")
    fails_with(t, function() ml.ones(2, 3):div_(ml.ones(4)) end, {"div_", "[4]", "[2, 3]"}, "div_ shape")
    fails_with(t, function() ml.ones(3):div_("2") end, {"tensor expected"}, "div_ by a string")
    fails_with(t, function() i:sub_(1.5) end, {"sub_: the result of a int32 tensor and 1.5 cannot"}, "int sub_(1.5)")
    fails_with(t, function() i:sub_(ml.ones(3), 2) end, {"sub_: result type float32"}, "int sub_(f32, 2)")
    -- the binding's prefix is not doubled on a host message that starts with the op already
    for _, c in ipairs {{"normal_", function() ml.ones(3):normal_(0, -1) end},
                        {"uniform_", function() ml.ones(3):uniform_(2, 1) end}} do
        local e = error_of(c[2])
        t:assert(e and has(e, c[1] .. ": ") and not has(e, c[1] .. ": " .. c[1]), tostring(e))
    end
end

-- ---- tensor keys that name nothing ---------------------------------------------

function T.unknown_tensor_keys_raise(t)
    local x = ml.ones(3)
    fails_with(t, function() return x.x end, {"tensor has no field or method 'x'"}, "x.x")
    fails_with(t, function() return x["shpae"] end, {"tensor has no field or method 'shpae'"}, "x['shpae']")
    -- a misspelt method names itself, not "attempt to call a nil value"
    fails_with(t, function() return x:sizee() end, {"tensor has no field or method 'sizee'"}, "x:sizee()")
    for _, k in ipairs {true, {}, print} do
        fails_with(t, function() return x[k] end, {"a tensor is indexed by an integer", "not a " .. type(k)},
                   "x[" .. type(k) .. "]")
    end
    fails_with(t, function() return x[1.5] end, {"tensor index"}, "x[1.5]")
    -- what exists still reads as before, nil included where nil is the value
    t:assertEq(x.grad, nil)
    t:assertEq(x.grad_fn, nil)
    t:assertEq(x.dtype, "f32")
    t:assertEq(x[2]:item(), 1.0)
    t:assert(rawget(ml.Tensor.__methods, "sizee") == nil and rawget(ml.Tensor.__methods, "size") ~= nil,
             "methods are probed without an error through ml.Tensor.__methods")
    -- a freed tensor still says so first
    local f = ml.ones(2)
    f:free()
    fails_with(t, function() return f.x end, {"freed tensor"}, "freed f.x")
end

-- ---- files that are not regular files ---------------------------------------

local function sh_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

function T.fifo_and_devices_are_refused(t)
    local dir = util.temp_dir()
    local fifo = dir .. "/pipe.png"
    t:assert(os.execute("mkfifo " .. sh_quote(fifo)), "mkfifo")
    -- opening a FIFO with no writer blocked forever
    fails_with(t, function() return ml.image.load(fifo) end, {"pipe.png", "FIFO", "not a regular file"},
               "image from a FIFO")
    fails_with(t, function() return core.image_png_text(fifo) end, {"FIFO"}, "png text from a FIFO")
    fails_with(t, function() return core.json_load(fifo) end, {"pipe.png", "FIFO"}, "JSON from a FIFO")
    -- a FIFO among a dataset's images: its loader thread waited in fopen
    fails_with(t, function() return core.data_load(fifo, ml.data.ImageTransform{}) end, {"pipe.png", "FIFO"},
               "data_load of a FIFO")
    fails_with(t, function() return ml.data.read_images(dir):take(1) end, {"pipe.png", "FIFO"}, "read_images")
    -- torch checkpoints: the zip reader waited in open() for a writer, and
    -- load_single_file called the FIFO missing
    local ckpt = dir .. "/pipe.ckpt"
    t:assert(os.execute("mkfifo " .. sh_quote(ckpt)), "mkfifo")
    fails_with(t, function() return core.ckpt_load(ckpt) end, {"pipe.ckpt", "FIFO", "not a regular file"},
               "ckpt_load of a FIFO")
    fails_with(t, function() return ml.sd.load_single_file(ckpt) end,
               {"sd.load_single_file", "pipe.ckpt", "FIFO", "not a regular file"}, "load_single_file of a FIFO")
    fails_with(t, function() return ml.sd.load_single_file(dir) end, {"sd.load_single_file", "directory"},
               "load_single_file of a folder")
    fails_with(t, function() return ml.sd.load_single_file(dir .. "/none.ckpt") end,
               {"sd.load_single_file", "none.ckpt", "No such file"}, "load_single_file of a missing file")
    fails_with(t, function() return ml.image.load("/dev/zero") end, {"/dev/zero", "device"}, "image from /dev/zero")
    fails_with(t, function() return core.json_load("/dev/zero") end, {"device"}, "JSON from /dev/zero")
    fails_with(t, function() return ml.image.load(dir) end, {"directory"}, "image from a folder")
    fails_with(t, function() return core.json_load(dir .. "/missing.json") end, {"missing.json"}, "missing JSON")
    util.remove_tree(dir)
end

-- ---- paths holding a NUL byte --------------------------------------------

function T.paths_with_a_nul_byte_are_refused(t)
    local dir = util.temp_dir()
    -- each of these names an existing file up to the NUL, which C's open and
    -- fopen read: "x.json\0junk" loaded x.json instead of failing
    core.json_save(dir .. "/x.json", {a = 1})
    core.st_save(dir .. "/w.safetensors", {w = ml.ones(2)})
    core.image_save(dir .. "/i.png", ml.zeros({2, 2, 3}, {dtype = "u8"}))
    core.mkdir_p(dir .. "/sub")
    local function nul(p) return p .. "\0junk" end
    local function refused(fn, op, what)
        fails_with(t, fn, {op, "NUL byte", "\\0junk"}, what or op)
    end
    refused(function() return core.json_load(nul(dir .. "/x.json")) end, "json_load: path")
    refused(function() return core.st_load(nul(dir .. "/w.safetensors")) end, "st_load: path")
    refused(function() return core.st_open(nul(dir .. "/w.safetensors")) end, "st_open: path")
    refused(function() return core.st_open(dir, {basename = nul("w")}) end, "st_open: option 'basename'")
    refused(function() return core.st_open_model(dir, "w", {variant = nul("fp16")}) end,
            "st_open_model: option 'variant'")
    refused(function() return core.st_open_model(nul(dir), "w") end, "st_open_model: dir")
    refused(function() return ml.image.load(nul(dir .. "/i.png")) end, "image_load: path")
    refused(function() return core.image_png_text(nul(dir .. "/i.png")) end, "image_png_text: path")
    refused(function() return core.data_load(nul(dir .. "/i.png")) end, "data_load: path")
    refused(function() return core.ckpt_load(nul(dir .. "/x.ckpt")) end, "ckpt_load: path")
    refused(function() return core.tokenizer_load(nul(dir)) end, "tokenizer_load: dir")
    refused(function() return core.is_file(nul(dir .. "/x.json")) end, "is_file: path")
    refused(function() return core.is_dir(nul(dir)) end, "is_dir: path")
    refused(function() return core.list_dir(nul(dir)) end, "list_dir: path")
    refused(function() return core.require_regular_file(nul(dir .. "/x.json")) end, "require_regular_file: path")
    refused(function() return core.spawn(nul("/bin/true"), {"true"}, {}) end, "spawn: program")
    fails_with(t, function() return core.spawn("/bin/true", {"true", nul("a")}, {}) end, {"argv[2]", "NUL byte"},
               "spawn argv")
    -- writes: nothing may appear under the name before the NUL
    refused(function() core.json_save(nul(dir .. "/y.json"), {a = 1}) end, "json_save: path")
    refused(function() core.st_save(nul(dir .. "/v.safetensors"), {w = ml.ones(2)}) end, "st_save: path")
    refused(function() core.image_save(nul(dir .. "/j.png"), ml.zeros({2, 2, 3}, {dtype = "u8"})) end,
            "image_save: path")
    refused(function() core.mkdir_p(nul(dir .. "/made")) end, "mkdir_p: path")
    refused(function() core.copy_file(dir .. "/x.json", nul(dir .. "/copy.json")) end, "copy_file: destination")
    refused(function() core.copy_file(nul(dir .. "/x.json"), dir .. "/copy.json") end, "copy_file: source")
    refused(function() core.folder_save_begin(nul(dir .. "/sub")) end, "folder_save_begin: dir")
    for _, name in ipairs {"y.json", "v.safetensors", "j.png", "made", "copy.json"} do
        t:assert(not core.is_file(dir .. "/" .. name) and not core.is_dir(dir .. "/" .. name),
                 name .. " was not written")
    end
    -- data loader: a path entry of a dataset
    fails_with(t, function()
        return core.data_loader {columns = {"image"}, batch_rows = {1}, paths = {nul(dir .. "/i.png")}, tf = {0},
                                 keys = {0}, max_pixels = {0}, transforms = {}}
    end, {"spec.paths entry", "NUL byte"}, "data loader path")
    -- the same paths without the NUL still work
    t:assertEq(core.json_load(dir .. "/x.json").a, 1)
    t:assertEq(core.st_load(dir .. "/w.safetensors").w:totable(), {1, 1})
    util.remove_tree(dir)
end

-- ---- scheduler configs ------------------------------------------------------

function T.num_train_timesteps_is_bounded(t)
    for _, cls in ipairs {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                          "DPMSolverMultistepScheduler"} do
        -- 1e8 took minutes and gigabytes, 2^40 never finished
        fails_with(t, function() return S[cls] {num_train_timesteps = 1e8} end,
                   {cls, "num_train_timesteps", "out of range", "1000000"}, cls .. " 1e8")
        fails_with(t, function() return S[cls] {num_train_timesteps = 1 << 40} end,
                   {"num_train_timesteps", "out of range"}, cls .. " 2^40")
        fails_with(t, function() return S[cls] {num_train_timesteps = 0} end, {"num_train_timesteps"}, cls .. " 0")
        fails_with(t, function() return S[cls] {num_train_timesteps = 10.5} end,
                   {"num_train_timesteps", "integer"}, cls .. " 10.5")
        fails_with(t, function() return S[cls] {num_train_timesteps = "1000"} end,
                   {"num_train_timesteps", "integer"}, cls .. " '1000'")
        t:assertEq(#S[cls]({num_train_timesteps = 100}).betas, 100, cls)
    end
end

-- ---- images declaring huge sizes --------------------------------------------

local function crc32(s)
    local crc = 0xFFFFFFFF
    for i = 1, #s do
        crc = crc ~ s:byte(i)
        for _ = 1, 8 do crc = (crc >> 1) ~ (0xEDB88320 & -(crc & 1)) end
    end
    return ~crc & 0xFFFFFFFF
end

local function chunk(kind, data) return string.pack(">I4", #data) .. kind .. data .. string.pack(">I4", crc32(kind .. data)) end

-- A well-formed PNG (valid chunk CRCs) whose header declares w x h RGB
-- pixels; its one IDAT holds only a few rows, so decoding would fail late,
-- after allocating the whole image.
local function png_declaring(w, h)
    local ihdr = string.pack(">I4I4BBBBB", w, h, 8, 2, 0, 0, 0)
    local idat = "\x78\x01\x01\x04\x00\xfb\xff\x00\x00\x00\x00\x00\x04\x00\x01"
    return "\x89PNG\r\n\x1a\n" .. chunk("IHDR", ihdr) .. chunk("IDAT", idat) .. chunk("IEND", "")
end

function T.huge_declared_images_are_refused_before_decoding(t)
    local dir = util.temp_dir()
    local path = dir .. "/huge.png"
    util.write_file(path, png_declaring(16000, 16000))
    fails_with(t, function() return ml.image.load(path) end, {"huge.png", "16000 x 16000", "256.0 megapixels",
                                                             "limit of 64.0", "max_pixels"}, "16000 x 16000 PNG")
    -- raising the limit lets it past the check to the decoder, which finds the data short
    local e = error_of(function() return ml.image.load(path, {max_pixels = 300e6}) end)
    t:assert(e and not has(e, "megapixels") and has(e, "huge.png"), "past the raised limit: " .. tostring(e))
    fails_with(t, function() return ml.image.load(path, {max_pixels = 0}) end, {"max_pixels", "out of range"},
               "max_pixels 0")
    fails_with(t, function() return ml.image.load(path, {max_pixels = 1.5}) end, {"max_pixels", "integer"},
               "max_pixels 1.5")
    -- a real image: refused under a small limit, loaded at its own size
    local real = "tests/fixtures/images/photo.png"
    local img = ml.image.load(real, {dtype = "u8"})
    local h, w = img:size(1), img:size(2)
    fails_with(t, function() return ml.image.load(real, {max_pixels = h * w - 1}) end, {"megapixels"}, "limit - 1")
    t:assertTensorEq(ml.image.load(real, {dtype = "u8", max_pixels = h * w}), img, 0, "limit = the image")
    util.remove_tree(dir)
end

return T
