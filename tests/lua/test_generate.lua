-- test_generate.lua — examples/generate.lua and moonlit.pipelines.generate_images
-- on the tiny fixture model (2 denoising steps, 64x128 images): file names,
-- PNG metadata, per-image seeds (an image equals the same seed made alone:
-- pixel for pixel in batches of one, within 8-bit rounding in larger ones),
-- the contact sheet's layout, resuming with skip_existing, and the flag errors.
local ml = require "moonlit"
local util = require "testutil"
local has = util.has

local MODEL = "tests/fixtures/sd1-tiny/pipeline"
local SCRIPT = "examples/generate.lua"
local H, W = 64, 128

local tests = {}

local bin = util.moonlit_bin

local q = util.shell_quote

-- Runs generate.lua with `args` (a list); returns stdout, stderr, status.
local function run(args)
    local dir = util.temp_dir()
    local parts = {}
    for i, a in ipairs(args) do parts[i] = q(a) end
    local p = io.popen(string.format("%s %s %s >%s/out 2>%s/err; echo $?", q(bin()), SCRIPT,
                                     table.concat(parts, " "), dir, dir))
    local rc = tonumber(p:read("l"))
    p:close()
    local out, err = util.read_file(dir .. "/out"), util.read_file(dir .. "/err")
    util.remove_tree(dir)
    return out, err, rc
end

local function pixels(path) return ml.image.load(path, {dtype = "u8"}):float() end

local function same_pixels(t, a, b, what)
    local d = (pixels(a) - pixels(b)):abs():max():item()
    t:assertEq(d, 0.0, what .. ": max pixel difference")
end

-- One run shared by the tests that only read its files: 2 prompts x 3
-- samples, batches of 4 (so a batch spans both prompts), seed 42.
local shared
local function shared_run(t)
    if shared then return shared end
    local dir = util.temp_dir()
    local out, err, rc = run {MODEL, "--prompts", "a red fox, a lighthouse", "--num_samples_per_prompt", "3",
                              "--steps", "2", "--seed", "42", "--batch_size", "4", "--height", tostring(H),
                              "--width", tostring(W), "--negative_prompt", "blurry", "--output_dir", dir}
    shared = {dir = dir, out = out, err = err, rc = rc}
    return shared
end

function tests.files_are_named_by_prompt_sample_and_seed(t)
    local r = shared_run(t)
    if not t:assertEq(r.rc, 0, "exit status; stderr: " .. r.err) then return end
    local names = ml.core.list_dir(r.dir)
    table.sort(names)
    t:assertEq(names, {"contact_sheet.png", "p00-s000-seed42.png", "p00-s001-seed43.png", "p00-s002-seed44.png",
                       "p01-s000-seed45.png", "p01-s001-seed46.png", "p01-s002-seed47.png"})
    -- progress: one line per batch (6 images in batches of 4), then the timing line
    t:assert(has(r.out, "batch 1/2: 4/6 images") and has(r.out, "batch 2/2: 6/6 images"), r.out)
    t:assert(r.out:match("wrote 6 image%(s%) and .- in [%d.]+ s wall%-clock %([%d.]+ images/s"), r.out)
end

function tests.metadata_records_how_each_image_was_made(t)
    local r = shared_run(t)
    local m = ml.image.png_text(r.dir .. "/p01-s002-seed47.png")
    t:assertEq(m.prompt, "a lighthouse")
    t:assertEq(m.negative_prompt, "blurry")
    t:assertEq(m.seed, "47")
    t:assertEq(m.steps, "2")
    t:assertEq(m.scheduler, "PNDMScheduler")
    t:assertEq(m.guidance, "7.5")
    t:assertEq(m.height, tostring(H))
    t:assertEq(m.width, tostring(W))
    t:assertEq(m.model, MODEL)
    t:assertEq(ml.image.png_text(r.dir .. "/p00-s000-seed42.png").prompt, "a red fox")
    local img = ml.image.load(r.dir .. "/p00-s000-seed42.png")
    t:assertEq(img:shape(), {H, W, 3})
end

-- Makes the second prompt's image of `seed` alone; returns its folder and path.
local function remake_alone(t, seed, extra)
    local dir = util.temp_dir()
    local args = {"--model_dir", MODEL, "--prompt", "a lighthouse", "--steps", "2", "--seed", tostring(seed),
                  "--num_samples_per_prompt", "1", "--height", tostring(H), "--width", tostring(W),
                  "--negative_prompt", "blurry", "--output_dir", dir}
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    local _, err, rc = run(args)
    t:assertEq(rc, 0, "exit status; stderr: " .. err)
    return dir, dir .. "/p00-s000-seed" .. seed .. ".png"
end

function tests.each_image_reproduces_alone_from_its_seed(t)
    -- batches of one (the CPU's default): bit for bit
    local run_dir = util.temp_dir()
    local _, err, rc = run {MODEL, "--prompts", "a red fox,a lighthouse", "--num_samples_per_prompt", "2",
                            "--steps", "2", "--seed", "42", "--height", tostring(H), "--width", tostring(W),
                            "--negative_prompt", "blurry", "--output_dir", run_dir}
    if not t:assertEq(rc, 0, "exit status; stderr: " .. err) then return end
    local dir, alone = remake_alone(t, 45)
    same_pixels(t, run_dir .. "/p01-s001-seed45.png", alone, "p01-s001-seed45.png")
    util.remove_tree(dir)
    util.remove_tree(run_dir)
end

-- In a batch the latents are the same, but BLAS does not promise the same
-- rounding for one row of a larger product (OpenBLAS picks kernels by
-- size), so a batched image matches its lone remake to a level of 8-bit
-- rounding, not bit for bit.
function tests.batched_images_match_their_lone_remake_within_rounding(t)
    local r = shared_run(t)
    -- p01-s001 was the first of the second batch; p01-s000 shared a batch with prompt 1's images
    for _, case in ipairs {{46, "p01-s001-seed46.png"}, {45, "p01-s000-seed45.png"}} do
        local dir, alone = remake_alone(t, case[1])
        local d = (pixels(r.dir .. "/" .. case[2]) - pixels(alone)):abs()
        t:assert(d:max():item() <= 2, case[2] .. ": max difference " .. d:max():item() .. " levels (<= 2)")
        t:assert(d:mean():item() <= 0.05, case[2] .. ": mean difference " .. d:mean():item() .. " levels (<= 0.05)")
        util.remove_tree(dir)
    end
    -- and the seeds do matter: neighbouring images differ
    local d = (pixels(r.dir .. "/p01-s000-seed45.png") - pixels(r.dir .. "/p01-s001-seed46.png")):abs():max():item()
    t:assert(d > 10, "images of different seeds differ (max difference " .. d .. ")")
end

function tests.contact_sheet_has_a_row_per_prompt_and_a_column_per_sample(t)
    local r = shared_run(t)
    local sheet = ml.image.load(r.dir .. "/contact_sheet.png", {dtype = "u8"}):float()
    local pad = 2
    t:assertEq(sheet:shape(), {2 * H + 3 * pad, 3 * W + 4 * pad, 3})
    -- cell (row 2, column 3) is p01-s002
    local cell = sheet:narrow(1, pad + H + pad + 1, H):narrow(2, pad + 2 * (W + pad) + 1, W)
    local d = (cell - pixels(r.dir .. "/p01-s002-seed47.png")):abs():max():item()
    t:assertEq(d, 0.0, "the sheet's cell equals the image")
end

function tests.stochastic_sampler_images_also_reproduce_alone(t)
    local m = ml.sd.load(MODEL)
    local gen = require("moonlit.pipelines.generate_images").generate_images
    local o = {prompts = {"a cat"}, num_samples_per_prompt = 2, seed = 7, batch_size = 2, steps = 2,
               scheduler = "euler_ancestral", height = H, width = W}
    local both = gen(m, o)
    t:assertEq(#both, 2)
    t:assertEq(both[2].seed, 8)
    local alone = gen(m, {prompts = {"a cat"}, seed = 8, steps = 2, scheduler = "euler_ancestral", height = H, width = W})
    t:assertTensorEq(alone[1].image, both[2].image, 0, "seed 8 alone equals seed 8 of the pair")
end

function tests.skip_existing_makes_only_the_missing_images(t)
    local m = ml.sd.load(MODEL)
    local gen = require("moonlit.pipelines.generate_images").generate_images
    local dir = util.temp_dir()
    local function name(p, s, seed) return string.format("class-%03d-seed%d.png", s, seed) end
    local o = {prompts = {"a dog"}, num_samples_per_prompt = 3, seed = 100, batch_size = 1, steps = 2,
               height = H, width = W, output_dir = dir, name = name, skip_existing = true}
    local calls = {}
    o.progress = function(done, total) calls[#calls + 1] = done .. "/" .. total end
    local first, info = gen(m, o)
    t:assertEq(#first, 3)
    t:assertEq(info.skipped, 0)
    t:assertEq(calls, {"1/3", "2/3", "3/3"})
    local kept = util.read_file(dir .. "/class-003-seed102.png")
    util.write_file(dir .. "/original-2.png", util.read_file(dir .. "/class-002-seed101.png"))
    os.remove(dir .. "/class-002-seed101.png")
    local again, info2 = gen(m, o)
    t:assertEq(#again, 1)
    t:assertEq(info2.skipped, 2)
    t:assertEq(again[1].seed, 101)
    t:assertEq(again[1].path, dir .. "/class-002-seed101.png")
    same_pixels(t, dir .. "/original-2.png", dir .. "/class-002-seed101.png", "the remade image")
    t:assertEq(util.read_file(dir .. "/class-003-seed102.png"), kept, "an existing image is left alone")
    util.remove_tree(dir)
end

function tests.generate_images_checks_its_options(t)
    local m = ml.sd.load(MODEL)
    local gen = require("moonlit.pipelines.generate_images").generate_images
    t:assertError(function() gen(m, {prompts = {}}) end, "prompts must be a non-empty list")
    t:assertError(function() gen(m, {prompts = {"x"}, batch_size = 0}) end, "batch_size must be an integer >= 1")
    t:assertError(function() gen(m, {prompts = {"x"}, height = 20}) end, "multiples of 8")
    t:assertError(function() gen(m, {prompts = {"x"}, seed = -1}) end, "seed must be an integer >= 0")
    t:assertError(function() gen(m, {prompts = {"x"}, skip_existing = true}) end, "skip_existing needs output_dir")
    t:assertError(function() gen(m, {prompts = {"x", "y"}, negative_prompt = {"n"}}) end, "one per prompt")
end

function tests.old_positional_form_still_works(t)
    local dir = util.temp_dir()
    local _, err, rc = run {MODEL, "a fox, at dusk", "--steps", "2", "--height", "64", "--width", "64",
                            "--output_dir", dir}
    t:assertEq(rc, 0, "exit status; stderr: " .. err)
    -- the positional prompt is one prompt, its comma kept
    t:assertEq(ml.image.png_text(dir .. "/p00-s000-seed0.png").prompt, "a fox, at dusk")
    util.remove_tree(dir)
end

function tests.flag_errors_exit_2_naming_the_flag(t)
    local cases = {
        {{MODEL, "--prompt", "x", "--negative_prompt", "--steps", "2"}, "generate.lua: --negative_prompt needs a value"},
        {{MODEL, "--prompt", "x", "--step", "2"}, "unknown option --step (did you mean --steps?)"},
        {{MODEL, "--prompt", "x", "--scheduler", "lms"}, "--scheduler must be one of pndm, ddim"},
        {{MODEL, "--prompt", "x", "--num_workers", "0"}, "--num_workers must be >= 1"},
        {{"--prompt", "x"}, "missing required option --model_dir"},
        {{MODEL}, "no prompt"},
        {{"no/such/model", "--prompt", "x"}, "--model_dir: no such folder or file: no/such/model"},
        {{MODEL, "--prompt", "x", "--precision", "bf16-mixed", "--device", "cpu"}, "--precision bf16-mixed needs a GPU"},
    }
    for _, c in ipairs(cases) do
        local out, err, rc = run(c[1])
        t:assertEq(rc, 2, table.concat(c[1], " "))
        t:assertEq(out, "", "nothing on stdout for " .. table.concat(c[1], " "))
        t:assert(has(err, c[2]) and has(err, "run with --help for usage"), "stderr: " .. err)
    end
    local out, _, rc = run {"--help"}
    t:assertEq(rc, 0)
    t:assert(has(out, "--num_samples_per_prompt INT") and has(out, "--scheduler {pndm,"), out)
end

function tests.zz_cleanup(t)
    if shared then util.remove_tree(shared.dir) end
    t:assert(true)
end

return tests
