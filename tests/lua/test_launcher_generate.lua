-- test_launcher_generate.lua — examples/generate.lua --num_workers on CPU
-- workers: the batches are shared round-robin, each worker writes its own
-- images, rank 0 writes the contact sheet after a barrier, and every file
-- (images and sheet) is byte for byte the one a single process writes.
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

local MODEL = "tests/fixtures/sd1-tiny/pipeline"
local q = U.shell_quote

local function run(workers, dir)
    local args = {"examples/generate.lua", "--model_dir", MODEL, "--prompts", "a red fox,a lighthouse",
                  "--num_samples_per_prompt", "3", "--steps", "2", "--seed", "42", "--batch_size", "2",
                  "--height", "64", "--width", "64", "--device", "cpu", "--output_dir", dir,
                  "--num_workers", tostring(workers)}
    for i, a in ipairs(args) do args[i] = q(a) end
    local p = io.popen(q(U.moonlit_bin()) .. " " .. table.concat(args, " ") .. " 2>&1; echo \"exit=$?\"")
    local text = p:read("a")
    p:close()
    return text
end

function tests.two_workers_write_the_files_one_process_writes(t)
    local dir = U.temp_dir()
    local one = run(1, dir .. "/one")
    t:assert(one:match("exit=0%s*$"), "one process:\n" .. one)
    local two = run(2, dir .. "/two")
    t:assert(two:match("exit=0%s*$"), "two workers:\n" .. two)
    -- 6 images in batches of 2: rank 0 makes batches 1 and 3, rank 1 batch 2
    t:assert(U.has(two, "\nbatch 2/2: 4/4 images") or two:match("^batch 2/2: 4/4 images"), "rank 0 made 2 batches:\n" .. two)
    t:assert(U.has(two, "[rank 1] batch 1/1: 2/2 images"), "rank 1 made 1 batch:\n" .. two)
    t:assert(U.has(two, "wrote 6 image(s)") and U.has(two, "2 workers"), "rank 0 reports all 6 images:\n" .. two)
    t:assert(not U.has(two, "[rank 1] wrote"), "only rank 0 writes the contact sheet:\n" .. two)
    local names = ml.core.list_dir(dir .. "/one")
    table.sort(names)
    t:assertEq(#names, 7, "6 images and the contact sheet")
    local others = ml.core.list_dir(dir .. "/two")
    table.sort(others)
    t:assertEq(others, names, "the same files")
    for _, n in ipairs(names) do
        t:assert(U.read_file(dir .. "/one/" .. n) == U.read_file(dir .. "/two/" .. n), n .. " is byte for byte the same")
    end
    U.remove_tree(dir)
end

return tests
