-- test_toy_dreambooth.lua — what `make run` shows is real: DreamBooth on
-- the toy shapes model makes the samples of "a photo of sks star"
-- measurably closer to the subject (a yellow star on blue, which the base
-- model never saw) than the base model's samples are.
--
-- The feature is scripts/shapes_dataset.lua's: the mean colour of the
-- picture's border (background) and of the pixels far from it (the shape),
-- six numbers in [0, 1]; the distance is their L2 distance to the subject
-- photos' mean feature, averaged over the samples.  The base model's
-- samples sit about 1.2 away (purple stars on red); the test asks the tuned
-- model's to be at least 0.15 closer, with a shorter run than make run's.
local ml = require "moonlit"
local U = require "testutil"
local tests = {}

function tests.tuned_samples_are_closer_to_the_subject(t)
    local T = assert(loadfile("examples/toy_dreambooth.lua"))({as_module = true})
    local dir = U.temp_dir()
    local saved = print
    print = function() end
    local ok, res = pcall(T.run, {output_dir = dir .. "/out", max_train_steps = 160, num_class_images = 4,
                                  num_validation_images = 4, num_inference_steps = 15, seed = 0, device = "cpu"},
                          function() end)
    print = saved
    if not t:assert(ok, tostring(res)) then U.remove_tree(dir) return end
    t:assert(res.before > 0.9, string.format("the base model is far from the subject (%.3f)", res.before))
    t:assert(res.after < res.before - 0.15,
             string.format("tuned %.3f is not 0.15 closer to the subject than base %.3f", res.after, res.before))
    t:assert(ml.core.is_file(res.grid), "before_after.png written")
    local g = ml.image.load(res.grid)
    t:assertEq(g:size(1), 3 * 64 + 4 * 2, "three rows of 64x64 cells with 2-pixel padding")
    U.remove_tree(dir)
end

return tests
