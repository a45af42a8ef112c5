-- test_dreambooth_run.lua — scripts/dreambooth_run.sh runs its five steps on
-- the tiny SD 1 fixture (no download, two class images, two training steps,
-- 64x64 images, two denoising steps) and leaves the tuned model and the new
-- images; a failing step stops the run and names the step.
local ml = require "moonlit"
local U = require "testutil"
local core = require "moonlit.core"
local tests = {}

local SCRIPT = "scripts/dreambooth_run.sh"
local FIXTURE = "tests/fixtures/sd1-tiny/pipeline"
local TRAIN_ARGS = "--resolution 64 --device cpu --num_inference_steps 2 --sample_batch_size 2 --checkpointing_steps 0"
local GENERATE_ARGS = "--steps 2 --height 64 --width 64 --device cpu"

local q = U.shell_quote

local moonlit_bin = U.moonlit_bin

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

-- PNGs in dir, generate.lua's contact sheet aside.
local function images_in(dir)
    local p = io.popen("find " .. q(dir) .. " -maxdepth 1 -type f -iname '*.png' ! -name contact_sheet.png 2>/dev/null")
    local n = 0
    for _ in p:lines() do n = n + 1 end
    p:close()
    return n
end

-- The recipe's scripts are needed; say so plainly when one is missing.
local function recipe_present(t)
    for _, f in ipairs({SCRIPT, "examples/generate.lua", "examples/dreambooth.lua"}) do
        if not t:assert(exists(f), f .. " is missing: the five-step run needs it") then return false end
    end
    return t:assert(moonlit_bin(), "no moonlit binary known (set MOONLIT_BIN)")
end

-- A folder of three small subject photos, made here.
local function make_instance_images(dir)
    os.execute("mkdir -p " .. q(dir))
    ml.manual_seed(7)
    for i = 1, 3 do ml.image.save(string.format("%s/subject-%d.png", dir, i), ml.rand({64, 64, 3})) end
end

-- Runs the script with the test's settings plus `env`; returns (ok, output).
local function run(dir, env)
    local vars = {MOONLIT = moonlit_bin(), DATA_PREFIX = dir .. "/data", SKIP_DOWNLOAD = "1",
                  ORIG_MODEL_PATH = FIXTURE, INSTANCE_DIR = dir .. "/photos", NUM_CLASS_IMAGES = "2",
                  MAX_TRAIN_STEPS = "2", NUM_WORKERS = "1", EXTRA_TRAIN_ARGS = TRAIN_ARGS,
                  EXTRA_GENERATE_ARGS = GENERATE_ARGS}
    for k, v in pairs(env or {}) do vars[k] = v end
    local parts = {}
    for k, v in pairs(vars) do parts[#parts + 1] = k .. "=" .. q(v) end
    local p = io.popen(string.format("env %s timeout 300 %s 2>&1", table.concat(parts, " "), SCRIPT))
    local out = p:read("a")
    return p:close() == true, out
end

local function with_dir(body)
    local dir = U.temp_dir()
    local ok, err = pcall(body, dir)
    U.remove_tree(dir)
    if not ok then error(err, 0) end
end

function tests.five_steps_make_the_tuned_model_and_new_images(t)
    if not recipe_present(t) then return end
    with_dir(function(dir)
        make_instance_images(dir .. "/photos")
        local ok, out = run(dir)
        if not t:assert(ok, "the run failed:\n" .. out) then return end
        for i, name in ipairs({"download model", "copy subject images", "class images", "train", "generate"}) do
            t:assert(U.has(out, string.format("==== step %d/5: %s", i, name)), "header of step " .. i)
            t:assert(out:find(string.format("\n  %d  %s%%s+%%d+%%.%%d", i, name)), "time of step " .. i .. ":\n" .. out)
        end
        t:assert(U.has(out, "skipping the download"), "step 1 finds the model present")
        local data = dir .. "/data"
        t:assertEq(images_in(data .. "/images-own"), 3, "subject photos copied")
        t:assertEq(images_in(data .. "/images-reg"), 2, "NUM_CLASS_IMAGES class images generated")
        t:assert(not exists(data .. "/images-reg/contact_sheet.png"),
                 "the contact sheet is out of the class folder (training would use it)")
        t:assertEq(images_in(data .. "/images-new"), 5, "five new images")
        local tuned = data .. "/model-tuned"
        t:assert(exists(tuned .. "/model_index.json"), "tuned model_index.json")
        local unet_file = "/unet/diffusion_pytorch_model.safetensors"
        if t:assert(exists(tuned .. unet_file), "tuned UNet weights") then
            -- Two AdamW steps move every trained weight; the tuned UNet must differ.
            local a, b = core.st_load(FIXTURE .. unet_file), core.st_load(tuned .. unet_file)
            local moved = 0
            for k, v in pairs(a) do
                if t:assert(b[k], "tuned UNet lacks " .. k) then
                    moved = math.max(moved, (b[k]:float() - v:float()):abs():max():item())
                end
            end
            t:assert(moved > 0, "the tuned UNet equals the base model")
        end
    end)
end

function tests.failing_step_stops_the_run_and_is_named(t)
    if not recipe_present(t) then return end
    with_dir(function(dir)
        make_instance_images(dir .. "/photos")
        os.execute("mkdir -p " .. q(dir .. "/empty"))
        local ok, out = run(dir, {ORIG_MODEL_PATH = dir .. "/empty"})
        t:assert(not ok and U.has(out, "step 1 (download model) failed") and U.has(out, "SKIP_DOWNLOAD=1"),
                 "a missing model with SKIP_DOWNLOAD=1 stops step 1:\n" .. out)
        t:assert(not U.has(out, "step 2/5"), "nothing runs after the failing step")

        ok, out = run(dir, {EXTRA_TRAIN_ARGS = TRAIN_ARGS .. " --no_such_flag 1"})
        t:assert(not ok and U.has(out, "step 4 (train) failed"), "a training error stops step 4:\n" .. out)
        t:assert(not U.has(out, "step 5/5"), "step 5 does not run after step 4 failed")
        t:assert(U.has(out, "wall seconds per step"), "the times so far are printed")
    end)
end

function tests.bad_settings_are_refused_before_any_step(t)
    if not t:assert(exists(SCRIPT), SCRIPT .. " is missing") then return end
    with_dir(function(dir)
        local ok, out = run(dir, {INSTANCE_DIR = dir .. "/no-photos"})
        t:assert(not ok and U.has(out, "INSTANCE_DIR") and U.has(out, "no-photos"), "missing photos folder:\n" .. out)
        ok, out = run(dir, {MAX_TRAIN_STEPS = "two"})
        t:assert(not ok and U.has(out, "MAX_TRAIN_STEPS must be a positive whole number"), "bad number:\n" .. out)
        t:assert(not U.has(out, "==== step"), "no step started")
    end)
end

return tests
