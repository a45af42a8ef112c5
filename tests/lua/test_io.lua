-- test_io.lua — the Lua face of safetensors and JSON IO: handles, loading
-- and saving tensor tables, dtype conversion, variants, JSON decoding and
-- the writer's Python-compatible output (byte-identical config.json files).
local core = require "moonlit.core"
local util = require "testutil"
local read_file, write_file, temp_dir, remove_tree = util.read_file, util.write_file, util.temp_dir, util.remove_tree

local FIX = "tests/fixtures/sd1-tiny/"

-- Error message of f(...), or nil if it succeeded.
local function error_of(f, ...)
    local ok, err = pcall(f, ...)
    if ok then return nil end
    return tostring(err)
end

local function same_list(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do
        if a[i] ~= b[i] then return false end
    end
    return true
end

-- Flatten a nested totable() result.
local function flat(t, out)
    out = out or {}
    if type(t) ~= "table" then out[#out + 1] = t return out end
    for _, v in ipairs(t) do flat(v, out) end
    return out
end

local tests = {}

-- ---- safetensors --------------------------------------------------------

function tests.open_fixture_and_inspect(t)
    local f <close> = core.st_open(FIX .. "unet.safetensors")
    t:assertEq(#f, 4)
    t:assert(same_list(f:keys(), {"encoder_hidden_states", "out", "sample", "timesteps"}),
             "keys sorted: " .. table.concat(f:keys(), ","))
    local info = f:info("sample")
    t:assertEq(info.dtype, "f32")
    t:assertEq(info.st_dtype, "F32")
    t:assert(same_list(info.shape, {2, 4, 8, 8}), "shape 1-based list")
    t:assertEq(info.nbytes, 2 * 4 * 8 * 8 * 4)
    t:assert(f:has("timesteps") and not f:has("nope"), "has()")
    local x = f:get("sample")
    t:assertEq(x.dtype, "f32")
    t:assert(same_list(x:size(), {2, 4, 8, 8}), "tensor shape")
    local ts = f:get("timesteps")
    t:assertEq(ts.dtype, "i32")
    local err = error_of(f.get, f, "sampel")
    t:assert(err and err:find("sampel", 1, true) and err:find("unet.safetensors", 1, true)
             and err:find("'sample'", 1, true), "missing name error: " .. tostring(err))
    t:assert(tostring(f):find("4 tensors", 1, true), tostring(f))
end

function tests.get_converts_dtype(t)
    local f <close> = core.st_open(FIX .. "unet.safetensors")
    local x32 = f:get("sample")
    local x16 = f:get("sample", {dtype = "f16"})
    local xb = f:get("sample", {dtype = "bf16"})
    t:assertEq(x16.dtype, "f16")
    t:assertEq(xb.dtype, "bf16")
    local a, b, c = flat(x32:totable()), flat(x16:totable()), flat(xb:totable())
    local worst16, worstb = 0, 0
    for i = 1, #a do
        worst16 = math.max(worst16, math.abs(a[i] - b[i]) / (math.abs(a[i]) + 1e-3))
        worstb = math.max(worstb, math.abs(a[i] - c[i]) / (math.abs(a[i]) + 1e-3))
    end
    t:assert(worst16 < 1e-3, "f16 relative error " .. worst16)
    t:assert(worstb < 1e-2, "bf16 relative error " .. worstb)
    local err = error_of(f.get, f, "sample", {dtype = "f8"})
    t:assert(err and err:find("unknown dtype", 1, true), tostring(err))
end

function tests.handle_close_keeps_tensors(t)
    local f = core.st_open(FIX .. "unet.safetensors")
    local x = f:get("out")
    local before = flat(x:totable())
    f:close()
    f:close()   -- twice is fine
    local err = error_of(f.keys, f)
    t:assert(err and err:find("closed", 1, true), tostring(err))
    t:assert(same_list(flat(x:totable()), before), "tensor outlives its handle")
end

function tests.open_model_directory_and_variant(t)
    local f <close> = core.st_open_model(FIX .. "pipeline/unet", "diffusion_pytorch_model.safetensors")
    t:assertEq(f:metadata().format, "pt")
    t:assert(same_list(f:info("conv_in.weight").shape, {16, 4, 3, 3}), "conv_in.weight shape")
    local g <close> = core.st_open(FIX .. "pipeline/text_encoder")
    t:assert(#g > 0, "directory opens model.safetensors")
    local err = error_of(core.st_open_model, FIX .. "pipeline/unet", nil, {variant = "fp16"})
    t:assert(err and err:find("diffusion_pytorch_model.fp16.safetensors", 1, true), tostring(err))

    local dir = temp_dir()
    local w = core.tensor({{1, 2}, {3, 4}})
    core.st_save(dir .. "/diffusion_pytorch_model.fp16.safetensors", {w = w}, {dtype = "f16"})
    local h <close> = core.st_open(dir, {variant = "fp16"})
    t:assertEq(h:info("w").dtype, "f16")
    local back = h:get("w", {dtype = "f32"})
    t:assert(same_list(flat(back:totable()), {1, 2, 3, 4}), "fp16 variant values")
    remove_tree(dir)
end

function tests.save_load_round_trip_every_dtype(t)
    local dir = temp_dir()
    local path = dir .. "/all.safetensors"
    local vals = {{1, 0, 3}, {0, 5, 1}}
    local tensors = {}
    for _, dt in ipairs({"f32", "f64", "f16", "bf16", "i32", "i64", "u8", "bool"}) do
        tensors["t_" .. dt] = core.tensor(vals, {dtype = dt})
    end
    tensors.scalar = core.tensor(2.5)
    tensors.transposed = core.tensor(vals):t()   -- non-contiguous
    core.st_save(path, tensors, {metadata = {format = "pt", note = "hi"}})
    local loaded = core.st_load(path)
    for name, x in pairs(tensors) do
        local y = loaded[name]
        t:assert(y ~= nil, "loaded " .. name)
        t:assertEq(y.dtype, x.dtype)
        t:assert(same_list(y:size(), x:size()), name .. " shape")
        t:assert(same_list(flat(y:totable()), flat(x:totable())), name .. " values")
    end
    local f <close> = core.st_open(path)
    local md = f:metadata()
    t:assertEq(md.format, "pt")
    t:assertEq(md.note, "hi")
    -- st_load with a dtype converts every float tensor on the way in
    local as16 = core.st_load(path, {dtype = "f16"})
    t:assertEq(as16.t_f32.dtype, "f16")
    remove_tree(dir)
end

function tests.save_with_dtype_conversion(t)
    local dir = temp_dir()
    local path = dir .. "/bf.safetensors"
    core.st_save(path, {w = core.tensor({1 / 3, 2, -7.25}), i = core.tensor({1, 2}, {dtype = "i64"})},
                 {dtype = "bf16"})
    local f <close> = core.st_open(path)
    t:assertEq(f:info("w").dtype, "bf16")
    t:assertEq(f:info("i").dtype, "i64")
    local w = flat(f:get("w", {dtype = "f32"}):totable())
    t:assertEq(w[2], 2)
    t:assertEq(w[3], -7.25)
    t:assert(math.abs(w[1] - 1 / 3) < 2e-3, "bf16 rounding of 1/3: " .. w[1])
    remove_tree(dir)
end

function tests.save_errors_leave_old_file(t)
    local dir = temp_dir()
    local path = dir .. "/keep.safetensors"
    core.st_save(path, {a = core.tensor({1, 2})})
    local before = read_file(path)
    local err = error_of(core.st_save, path, {a = "not a tensor"})
    t:assert(err and err:find("'a'", 1, true), tostring(err))
    err = error_of(core.st_save, path, {[1] = core.tensor({1})})
    t:assert(err and err:find("names must be strings", 1, true), tostring(err))
    err = error_of(core.st_save, path, {a = core.tensor({1})}, {dtype = "i32"})
    t:assert(err and err:find("float dtype", 1, true), tostring(err))
    err = error_of(core.st_save, path, {a = core.tensor({1})}, {metadata = {n = 3}})
    t:assert(err and err:find("metadata", 1, true), tostring(err))
    local freed = core.tensor({1})
    freed:free()
    err = error_of(core.st_save, path, {a = freed})
    t:assert(err and err:find("freed", 1, true), tostring(err))
    t:assertEq(read_file(path), before)
    err = error_of(core.st_save, dir .. "/missing/x.safetensors", {a = core.tensor({1})})
    t:assert(err and err:find("missing/x.safetensors", 1, true), tostring(err))
    remove_tree(dir)
end

-- Refusals that would otherwise write a file other than the one asked for
-- (a NUL cuts a C string short) or one no reader opens (a header past the
-- limit st_open accepts): an error naming the key, and nothing written.
function tests.save_refuses_nul_and_oversized_headers(t)
    local dir = temp_dir()
    local path = dir .. "/out.safetensors"
    local x = core.tensor({1, 2})
    local function listing()
        local p = assert(io.popen("ls -A '" .. dir .. "'"))
        local s = p:read("a")
        p:close()
        return s
    end
    local cases = {
        {{["a\0b"] = x}, nil, "tensor name 'a\\0b' holds a NUL byte"},
        {{a = x}, {metadata = {["k\0"] = "v"}}, "metadata key 'k\\0' holds a NUL byte"},
        {{a = x}, {metadata = {format = "pt", note = "x\0y"}}, "metadata value of 'note' holds a NUL byte"},
        {{a = x}, {metadata = {big = string.rep("x", 100 * 1000 * 1000 + 1)}},
         "over the 100000000-byte limit"},
    }
    for i, c in ipairs(cases) do
        local err = error_of(core.st_save, path, c[1], c[2])
        t:assert(err and err:find(path, 1, true) and err:find(c[3], 1, true),
                 "case " .. i .. ": " .. tostring(err))
        t:assertEq(listing(), "", "case " .. i .. " wrote nothing")
    end
    -- an existing file stays as it was
    core.st_save(path, {a = x})
    local before = read_file(path)
    t:assert(error_of(core.st_save, path, {["a\0"] = x}), "NUL name over an existing file")
    t:assertEq(read_file(path), before)
    t:assertEq(listing(), "out.safetensors\n")
    remove_tree(dir)
end

function tests.corrupt_file_errors_name_the_file(t)
    local dir = temp_dir()
    local path = dir .. "/bad.safetensors"
    local good = read_file(FIX .. "unet.safetensors")
    write_file(path, good:sub(1, #good - 10))
    local err = error_of(core.st_open, path)
    t:assert(err and err:find(path, 1, true) and err:find("truncated", 1, true), tostring(err))
    write_file(path, "\4\0\0\0\0\0\0\0[1] ")
    err = error_of(core.st_open, path)
    t:assert(err and err:find("JSON object", 1, true), tostring(err))
    err = error_of(core.st_load, dir .. "/none.safetensors")
    t:assert(err and err:find("none.safetensors", 1, true), tostring(err))
    remove_tree(dir)
end

-- ---- JSON ---------------------------------------------------------------

function tests.json_decode_types(t)
    local v = core.json_decode('{"i": 3, "r": 3.0, "e": 1e-5, "s": "h\\u00e9", "b": [true, false],'
                               .. ' "n": null, "o": {}, "a": [], "big": 9007199254740993}')
    t:assertEq(math.type(v.i), "integer")
    t:assertEq(math.type(v.r), "float")
    t:assertEq(v.e, 1e-5)
    t:assertEq(v.s, "h\xc3\xa9")
    t:assert(v.b[1] == true and v.b[2] == false, "booleans")
    t:assertEq(v.n, nil)
    t:assertEq(v.big, 9007199254740993)
    t:assertEq(core.json_encode(v.o), "{}")
    t:assertEq(core.json_encode(v.a), "[]")
    local w = core.json_decode('[1, null, 3]', {null = core.json_null})
    t:assertEq(w[2], core.json_null)
    t:assertEq(core.json_encode(w), "[1, null, 3]")
    t:assertEq(core.json_decode("42"), 42)
    t:assertEq(core.json_decode('"x"'), "x")
end

function tests.json_decode_errors(t)
    local err = error_of(core.json_decode, '{\n  "a": 1,\n  "b": ]\n}')
    t:assert(err and err:find("json_decode:3:", 1, true), tostring(err))
    local dir = temp_dir()
    write_file(dir .. "/c.json", '{"a": 1,,}')
    err = error_of(core.json_load, dir .. "/c.json")
    t:assert(err and err:find(dir .. "/c.json:1:", 1, true), tostring(err))
    err = error_of(core.json_load, dir .. "/missing.json")
    t:assert(err and err:find("missing.json", 1, true), tostring(err))
    remove_tree(dir)
end

-- Python's json writes NaN, Infinity and -Infinity for non-finite floats;
-- they are read as numbers, only where a value stands, and never out of a
-- string; the writer still refuses them
function tests.json_python_nonfinite_numbers(t)
    local has = util.has
    local v = core.json_decode('{"a": -Infinity, "b": [NaN, Infinity, 1.5], "s": "NaN", "t": "-Infinity",'
                               .. ' "u": "say \\"NaN\\", Infinity", "c": "\\u0001NaN"}')
    t:assertEq(v.a, -math.huge)
    t:assert(v.b[1] ~= v.b[1] and math.type(v.b[1]) == "float", "NaN is a float NaN")
    t:assertEq(v.b[2], math.huge)
    t:assertEq(v.b[3], 1.5)
    t:assertEq(v.s, "NaN")
    t:assertEq(v.t, "-Infinity")
    t:assertEq(v.u, 'say "NaN", Infinity')
    t:assertEq(v.c, "\1NaN", "a string holding a control character stays a string")
    t:assertEq(core.json_decode("-Infinity"), -math.huge)
    -- not Python's spellings, or not where a value stands: errors with the text's own columns
    local e = error_of(core.json_decode, "[1, NaN, 2 3]")
    t:assert(has(e, "json_decode:1:12"), tostring(e))
    for _, bad in ipairs {"[nan]", "[inf]", "[-NaN]", "[NaNa]", "[Infinity1]"} do
        t:assert(error_of(core.json_decode, bad) ~= nil, bad .. " refused")
    end
    e = error_of(core.json_decode, "{NaN: 1}")
    t:assert(has(e, "object key"), tostring(e))
    -- from a file, and the writer still refuses them
    local dir = temp_dir()
    write_file(dir .. "/c.json", '{"lambda_min_clipped": -Infinity}')
    t:assertEq(core.json_load(dir .. "/c.json").lambda_min_clipped, -math.huge)
    e = error_of(core.json_encode, {x = -math.huge})
    t:assert(has(e, "NaN or infinity"), tostring(e))
    e = error_of(core.json_save, dir .. "/d.json", {x = 0 / 0})
    t:assert(has(e, "NaN or infinity"), tostring(e))
    remove_tree(dir)
end

function tests.json_load_config(t)
    local c = core.json_load(FIX .. "pipeline/unet/config.json")
    t:assertEq(c._class_name, "UNet2DConditionModel")
    t:assertEq(math.type(c.in_channels), "integer")
    t:assert(same_list(c.block_out_channels, {16, 32, 32, 32}), "block_out_channels")
    t:assertEq(c.class_embed_type, nil)
    t:assertEq(math.type(c.norm_eps), "float")
end

function tests.json_encode_matches_python(t)
    local v = {a = 1, b = {1, 2.5, core.json_array()}, c = 'x"\n\xc3\xa9', d = 1.0, e = 0.1,
               f = core.json_object(), g = core.json_array(), h = true, i = core.json_null,
               z = {k = -3e-07}}
    -- json.dumps(v, indent=2, sort_keys=True, ensure_ascii=False)
    t:assertEq(core.json_encode(v, {indent = 2}),
        '{\n  "a": 1,\n  "b": [\n    1,\n    2.5,\n    []\n  ],\n  "c": "x\\"\\n\xc3\xa9",\n'
        .. '  "d": 1.0,\n  "e": 0.1,\n  "f": {},\n  "g": [],\n  "h": true,\n  "i": null,\n'
        .. '  "z": {\n    "k": -3e-07\n  }\n}')
    t:assertEq(core.json_encode(v),
        '{"a": 1, "b": [1, 2.5, []], "c": "x\\"\\n\xc3\xa9", "d": 1.0, "e": 0.1, "f": {}, '
        .. '"g": [], "h": true, "i": null, "z": {"k": -3e-07}}')
    t:assertEq(core.json_encode({}), "{}")
    t:assertEq(core.json_encode(setmetatable({}, {__jsontype = "array"})), "[]")
    t:assertEq(core.json_encode(core.json_object({[2] = "b", [10] = "a"})), '{"10": "a", "2": "b"}')
    t:assertEq(core.json_encode({1, nil, 3}), "[1, null, 3]")
    t:assertEq(core.json_encode("\1"), '"\\u0001"')
    -- escapes in lowercase hex, NUL bytes kept (in keys too), '/' as is
    t:assertEq(core.json_encode({["k\0"] = "\31/\0"}), '{"k\\u0000": "\\u001f/\\u0000"}')
    t:assertEq(core.json_encode({1e20, 1e-05, 2 ^ 63}), "[1e+20, 1e-05, 9.223372036854776e+18]")
end

function tests.json_floats_round_trip(t)
    local vals = {0.1, 1 / 3, 1e-5, 0.00085, 0.012, 1e300, -2.5e-310, 123456789.0, 2 ^ 53, math.pi}
    for i = 1, 200 do vals[#vals + 1] = (math.random() - 0.5) * 10 ^ math.random(-30, 30) end
    local back = core.json_decode(core.json_encode(vals))
    for i, x in ipairs(vals) do
        t:assert(back[i] == x and math.type(back[i]) == "float",
                 string.format("%.17g came back as %s", x, tostring(back[i])))
    end
    t:assertEq(core.json_encode(1.0), "1.0")
    t:assertEq(core.json_encode(1), "1")
    t:assertEq(core.json_encode(-0.0), "-0.0")
end

function tests.json_encode_errors(t)
    local cyc = {}
    cyc.self = cyc
    local cases = {
        {{a = {b = 0 / 0}}, "at $.a.b"},
        {{x = print}, "cannot encode a function"},
        {{1, 2, x = 3}, "mixes integer and string keys"},
        {cyc, "nested too deeply"},
        {{s = "\xff"}, "UTF-8"},
        {{[1] = 1, [100] = 2}, "sparse array"},
        {{[true] = 1}, "boolean"},
        {{list = {1, {math.huge}}}, "at $.list[2][1]"},
    }
    for _, c in ipairs(cases) do
        local err = error_of(core.json_encode, c[1])
        t:assert(err and err:find(c[2], 1, true), "expected '" .. c[2] .. "' in: " .. tostring(err))
    end
end

-- Writing back what diffusers wrote gives the same bytes.
function tests.json_save_reproduces_diffusers_configs(t)
    local dir = temp_dir()
    for _, name in ipairs({"unet/config.json", "vae/config.json", "text_encoder/config.json",
                           "scheduler/scheduler_config.json", "model_index.json",
                           "tokenizer/tokenizer_config.json"}) do
        local src = FIX .. "pipeline/" .. name
        local out = dir .. "/out.json"
        core.json_save(out, core.json_load(src, {null = core.json_null}))
        t:assertEq(read_file(out), read_file(src))
    end
    remove_tree(dir)
end

function tests.json_save_is_atomic(t)
    local dir = temp_dir()
    local path = dir .. "/config.json"
    core.json_save(path, {a = 1})
    t:assertEq(read_file(path), '{\n  "a": 1\n}\n')
    local err = error_of(core.json_save, path, {a = print})
    t:assert(err and err:find(path, 1, true), tostring(err))
    t:assertEq(read_file(path), '{\n  "a": 1\n}\n')
    err = error_of(core.json_save, dir .. "/nope/config.json", {a = 1})
    t:assert(err and err:find("nope/config.json", 1, true), tostring(err))
    local p = assert(io.popen("ls -A '" .. dir .. "'"))
    local listing = p:read("a")
    p:close()
    t:assertEq(listing, "config.json\n")
    remove_tree(dir)
end

return tests
