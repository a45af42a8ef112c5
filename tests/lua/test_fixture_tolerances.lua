-- test_fixture_tolerances.lua — moonlit.fixture_tolerances, the bf16
-- tolerances of scripts/verify_fixture.lua: the 1.5x-PyTorch rule and its
-- floor, the absolute rule for gradient tensors, the measurement -> file
-- conversion, errors naming the bad key, and verify_fixture
-- --write-tolerances end to end in a child process.
local FT = require "moonlit.fixture_tolerances"
local core = require "moonlit.core"
local util = require "testutil"
local has, q = util.has, util.shell_quote

local tests = {}

-- A measurement as scripts/measure_autocast_error.py writes it, small.
local function measurement()
    return {
        meta = {fixture = "sd1-tiny", precision = FT.BF16_PRECISION, device = "NVIDIA H200", device_type = "cuda",
                torch = "2.11.0", date = "2025-01-01T00:00:00Z", draws = 8, cudnn = core.json_null},
        checks = {["unet.out"] = 1e-2, ["vae.decode"] = 3e-2, ["schedulers.add_noise"] = 4e-8,
                  ["schedulers.alphas_cumprod"] = 0},
        draws = {["unet.out"] = {9e-3, 1e-2}},
        tensors = {["grad.unet.conv_in.weight"] = 4e-2,
                   ["grad.text_encoder.k_proj.bias"] = 1.5e4,
                   ["grad.text_encoder.embeddings.token_embedding.weight"] = {head = 2e-2, sum = 1e-3, sumsq = 5e-3, abssum = 0}},
        sets = {["train.grads"] = {{count = 3, median = 0.03, aggregate = 0.024}, {count = 3, median = 0.04, aggregate = 0.025}}},
    }
end

local function tolerances(m) return FT.validate(FT.from_measurement(m or measurement(), {fixture = "sd1-tiny"})) end

function tests.check_tolerance_is_factor_times_pytorch_with_a_floor(t)
    local tol = tolerances()
    local c = tol:check("unet.out")
    t:assertEq(c.pytorch, 1e-2)
    t:assertNear(c.tol, 1.5e-2, 1e-15)
    t:assertNear(tol:check("vae.decode").tol, 4.5e-2, 1e-15)
    -- PyTorch exact or near it: float32 agreement (the floor), not exactness
    t:assertEq(tol:check("schedulers.alphas_cumprod").tol, 1e-4)
    t:assertEq(tol:check("schedulers.add_noise").tol, 1e-4)
    t:assertEq(tol.factor, 1.5)
    t:assertEq(tol.floor, 1e-4)
end

function tests.tensor_rule_is_absolute_difference_against_pytorchs(t)
    local tol = tolerances()
    -- |ref| = 2: PyTorch's |diff| = 0.04 * 2 = 0.08; one tensor may reach 2x that
    local pass, allowed, pt = tol:tensor_ok("grad.unet.conv_in.weight", 0.159, 2, 1e-6)
    t:assert(pass, "0.159 <= 0.16")
    t:assertNear(allowed, 0.16, 1e-12)
    t:assertNear(pt, 0.08, 1e-12)
    t:assert(not (tol:tensor_ok("grad.unet.conv_in.weight", 0.161, 2, 1e-6)), "0.161 > 0.16")
    -- a gradient that is zero in exact arithmetic: the reference is float32
    -- noise of norm 1e-9, PyTorch's bf16 noise 1.5e4 times that
    t:assert((tol:tensor_ok("grad.text_encoder.k_proj.bias", 2.9e-5, 1e-9, 1e-6)), "within 2 x PyTorch's noise")
    t:assert(not (tol:tensor_ok("grad.text_encoder.k_proj.bias", 3.1e-5, 1e-9, 1e-6)), "past 2 x PyTorch's noise")
    -- the float32 rule stays as a floor: floor * |ref| + atol
    local _, floor_allowed = tol:tensor_ok("grad.text_encoder.embeddings.token_embedding.weight", 0, 10, 1e-3, "abssum")
    t:assertNear(floor_allowed, 1e-4 * 10 + 1e-3, 1e-15)
    -- the embedding's fields each have their own PyTorch error
    local _, head_allowed = tol:tensor_ok("grad.text_encoder.embeddings.token_embedding.weight", 0, 1, 0)
    t:assertNear(head_allowed, 4e-2, 1e-15)
    local _, sum_allowed = tol:tensor_ok("grad.text_encoder.embeddings.token_embedding.weight", 0, 100, 0, "sum")
    t:assertNear(sum_allowed, 2 * 1e-3 * 100, 1e-12)
    t:assertError(function() tol:tensor_ok("grad.unet.conv_in.weight", 0, 1, 0, "sum") end, "not the field \"sum\"")
end

function tests.errors_are_rounded_up_to_three_digits(t)
    t:assertEq(FT.round_up(0.0123456), 0.0124)
    t:assertEq(FT.round_up(3.849307913967841e-08), 3.85e-08)
    t:assertEq(FT.round_up(4e-2), 4e-2)
    t:assertEq(FT.round_up(0), 0.0)
    t:assertEq(FT.round_up(15420.3), 15500.0)
    for _, x in ipairs {1e-2, 0.1, 7.77e-7, 123.456, 0.0099999} do
        t:assert(FT.round_up(x) >= x, "never below the measurement: " .. x)
    end
    local m = measurement()
    m.checks["unet.out"] = 0.0123456
    t:assertNear(tolerances(m):check("unet.out").tol, 1.5 * 0.0124, 1e-15)
end

function tests.parameters_may_hold_two_flipped_elements(t)
    local tol = tolerances()
    t:assertEq(tol.param_flips, 2)
    t:assertNear(tol:flip_allowance(1e-3), 2e-3 * math.sqrt(2), 1e-15)
end

function tests.missing_entries_name_the_key(t)
    local tol = tolerances()
    t:assertError(function() tol:check("unet.nothing") end, "no entry for check \"unet.nothing\"")
    t:assertError(function() tol:tensor_ok("grad.unet.nothing", 1, 1, 0) end, "no entry for tensor \"grad.unet.nothing\"")
end

function tests.a_set_is_one_check_by_its_aggregate_over_the_worst_draw(t)
    local tol = tolerances()
    local s = tol:set("train.grads")
    t:assertNear(s.pytorch, 0.025, 1e-15)
    t:assertNear(s.tol, 1.5 * 0.025, 1e-15)
    t:assertNear(s.median, 0.04, 1e-15)
    t:assertEq(tol.tensor_factor, 2)
    t:assertError(function() tol:set("train.params") end, "no entry for set \"train.params\"")
end

function tests.bad_measurements_are_errors_naming_the_key(t)
    local function err_of(edit)
        local m = measurement()
        edit(m)
        return util.error_of(FT.from_measurement, m, {fixture = "sd1-tiny", where = "m.json"})
    end
    local e = err_of(function(m) m.checks["unet.out"] = "0.01" end)
    t:assert(has(e, "m.json") and has(e, "checks[\"unet.out\"]") and has(e, "finite number"), e)
    e = err_of(function(m) m.checks["vae.decode"] = -1 end)
    t:assert(has(e, "checks[\"vae.decode\"]") and has(e, "got -1"), e)
    e = err_of(function(m) m.checks["vae.decode"] = core.json_null end)
    t:assert(has(e, "checks[\"vae.decode\"]") and has(e, "got null"), e)
    e = err_of(function(m) m.checks["vae.decode"] = 0 / 0 end)
    t:assert(has(e, "checks[\"vae.decode\"]"), e)
    e = err_of(function(m) m.tensors["grad.text_encoder.embeddings.token_embedding.weight"].sumsq = nil end)
    t:assert(has(e, "tensors[\"grad.text_encoder.embeddings.token_embedding.weight\"].sumsq"), e)
    e = err_of(function(m) m.tensors["grad.text_encoder.embeddings.token_embedding.weight"].extra = 1 end)
    t:assert(has(e, "unknown field \"extra\""), e)
    e = err_of(function(m) m.checks = nil end)
    t:assert(has(e, "checks must be an object"), e)
    e = err_of(function(m) m.tensors = {} end)
    t:assert(has(e, "tensors is empty"), e)
    e = err_of(function(m) m.sets["train.grads"][2].aggregate = "x" end)
    t:assert(has(e, "sets[\"train.grads\"][2].aggregate"), e)
    -- the script's float32 self-check is not a bf16 measurement
    e = err_of(function(m) m.meta.precision = "float32, no autocast" end)
    t:assert(has(e, "meta.precision") and has(e, "float32, no autocast"), e)
    -- nor does one fixture's measurement fit another
    e = err_of(function(m) m.meta.fixture = "sd2-tiny" end)
    t:assert(has(e, "meta.fixture") and has(e, "sd2-tiny"), e)
end

function tests.bad_tolerance_files_are_errors_naming_the_key(t)
    local function err_of(edit)
        local f = FT.from_measurement(measurement(), {fixture = "sd1-tiny"})
        edit(f)
        return util.error_of(FT.validate, f, "tol.json")
    end
    local e = err_of(function(f) f.factor = 0.5 end)
    t:assert(has(e, "tol.json: factor must be a number >= 1"), e)
    e = err_of(function(f) f.floor = "small" end)
    t:assert(has(e, "floor must be a finite number >= 0") and has(e, "\"small\""), e)
    e = err_of(function(f) f.tensors["grad.unet.conv_in.weight"] = {1, 2} end)
    t:assert(has(e, "tensors[\"grad.unet.conv_in.weight\"].head"), e)
    e = err_of(function(f) f.tensor_factor = 1.2 end)
    t:assert(has(e, "tensor_factor must be a number >= factor"), e)
    e = err_of(function(f) f.param_flips = 1.5 end)
    t:assert(has(e, "param_flips must be an integer >= 0"), e)
    e = err_of(function(f) f.measured = nil end)
    t:assert(has(e, "measured must be an object"), e)
end

function tests.file_round_trip_and_unreadable_files(t)
    local dir = util.temp_dir()
    local path = dir .. "/bf16_tolerances.json"
    local missing, why = FT.load(path)
    t:assertEq(missing, nil)
    t:assert(has(why, "not found"), why)
    core.json_save(path, FT.from_measurement(measurement(), {fixture = "sd1-tiny"}), {indent = 1})
    local tol = FT.load(path)
    t:assertNear(tol:check("unet.out").tol, 1.5e-2, 1e-15)
    t:assertEq(tol.measured.device, "NVIDIA H200")
    t:assertEq(tol.measured.cudnn, core.json_null)
    util.write_file(path, '{"factor": 1.5, "floor": ')
    local e = util.error_of(FT.load, path)
    t:assert(has(e, path), e)
    util.write_file(path, '{"factor": 1.5, "floor": 1e-4, "tensor_factor": 2, "param_flips": 2, "measured": {}, "checks": {"unet.out": null}, "tensors": {"a": 1}}')
    e = util.error_of(FT.load, path)
    t:assert(has(e, path .. ": checks[\"unet.out\"]") and has(e, "got null"), e)
    util.remove_tree(dir)
end

-- verify_fixture --write-tolerances: needs no GPU and loads no model
function tests.verify_fixture_writes_the_tolerance_file(t)
    local bin = util.moonlit_bin()
    if not bin then t:assert(false, "no moonlit binary known") return end
    local dir = util.temp_dir()
    local fixture = dir .. "/sd1-tiny"
    core.mkdir_p(fixture)
    local src = dir .. "/measured.json"
    core.json_save(src, measurement())
    local function run(argv)
        local p = io.popen(q(bin) .. " scripts/verify_fixture.lua " .. argv .. " 2>&1; echo \"rc=$?\"")
        local out = p:read("a")
        p:close()
        return out
    end
    local out = run(q(fixture .. "/") .. " --write-tolerances " .. q(src))
    t:assert(has(out, "rc=0") and has(out, "4 checks, 3 tensors"), out)
    local tol = FT.load(fixture .. "/bf16_tolerances.json")
    t:assert(tol ~= nil, "file written")
    if tol then t:assertNear(tol:check("vae.decode").tol, 4.5e-2, 1e-15) end
    -- a measurement of another fixture is refused, and the file stays as it was
    local other = measurement()
    other.meta.fixture = "sd2-tiny"
    other.checks["vae.decode"] = 1
    core.json_save(src, other)
    out = run(q(fixture) .. " --write-tolerances " .. q(src))
    t:assert(has(out, "rc=2") and has(out, "meta.fixture"), out)
    tol = FT.load(fixture .. "/bf16_tolerances.json")
    if tol then t:assertNear(tol:check("vae.decode").tol, 4.5e-2, 1e-15) end
    out = run(q(fixture) .. " --write-tolerances " .. q(dir .. "/absent.json"))
    t:assert(has(out, "rc=2") and has(out, "absent.json"), out)
    util.remove_tree(dir)
end

return tests
