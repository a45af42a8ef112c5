-- test_argparse.lua — moonlit.argparse: flag forms, types, booleans, lists,
-- choices, required options, unknown flags with suggestions, positionals,
-- --help, and the exit-mode behaviour (stderr, exit 2) in a child process.
local argparse = require "moonlit.argparse"
local util = require "testutil"
local has = util.has

local tests = {}

-- The parser of the DreamBooth recipe's shape.
local function parser()
    local p = argparse.new("demo.lua", "A demo of every option type.")
    p:option("model_dir", {type = "string", required = true, help = "diffusers model folder"})
    p:option("lr", {type = "number", default = 5e-6, help = "learning rate"})
    p:option("train_batch_size", {type = "integer", default = 1, help = "images per step"})
    p:option("precision", {type = "string", choices = {"f32", "bf16-mixed", "bf16-sr"}, default = "f32", help = "compute"})
    p:option("train_text_encoder", {type = "boolean", default = true, help = "train it too"})
    p:option("center_crop", {type = "boolean", default = false, help = "crop"})
    p:option("prompts", {type = "list", help = "comma-separated"})
    p:option("negative_prompt", {type = "string", help = "steer away"})
    p:option("steps", {type = "integer", help = "no default"})
    p:positional("model", {help = "a folder", required = false})
    return p
end

local function parse(argv, p) return (p or parser()):parse(argv, {exit = false}) end

-- The message of a failing parse (nil if it parsed).
local function err(argv, p)
    local a, msg, kind = parse(argv, p)
    if a then return nil end
    assert(kind == "error", "expected an error, got " .. tostring(kind))
    return msg
end

function tests.defaults_fill_every_declared_option(t)
    local a = parse {"--model_dir", "m"}
    t:assertEq(a.model_dir, "m")
    t:assertEq(a.lr, 5e-6)
    t:assertEq(math.type(a.train_batch_size), "integer")
    t:assertEq(a.train_batch_size, 1)
    t:assertEq(a.precision, "f32")
    t:assertEq(a.train_text_encoder, true)
    t:assertEq(a.center_crop, false)
    t:assertEq(a.prompts, nil)
    t:assertEq(a.steps, nil)
    t:assertEq(a._positional, {})
end

function tests.space_and_equals_forms(t)
    local a = parse {"--model_dir=m", "--lr", "0.25", "--train_batch_size=3", "--precision", "bf16-sr"}
    t:assertEq(a.model_dir, "m")
    t:assertEq(a.lr, 0.25)
    t:assertEq(a.train_batch_size, 3)
    t:assertEq(a.precision, "bf16-sr")
    -- the = form keeps everything after the first =, even more = and an empty value
    a = parse {"--model_dir=a=b", "--negative_prompt="}
    t:assertEq(a.model_dir, "a=b")
    t:assertEq(a.negative_prompt, "")
end

function tests.dash_and_underscore_spell_the_same_flag(t)
    local p = parser()
    local a = p:parse({"--model-dir", "m", "--train-batch-size", "4", "--no-train-text-encoder"}, {exit = false})
    t:assertEq(a.model_dir, "m")
    t:assertEq(a.train_batch_size, 4)
    t:assertEq(a.train_text_encoder, false)
    t:assert(p:given("train_batch_size") and p:given("train-batch-size"), "given() takes either spelling")
end

function tests.negative_numbers_are_values(t)
    local a = parse {"--model_dir", "m", "--lr", "-1", "--steps", "-3"}
    t:assertEq(a.lr, -1)
    t:assertEq(a.steps, -3)
    a = parse {"--model_dir", "m", "--lr", "-2.5e-3"}
    t:assertEq(a.lr, -2.5e-3)
end

function tests.a_flag_is_not_taken_as_a_value(t)
    local msg = err {"--model_dir", "m", "--negative_prompt", "--steps", "3"}
    t:assert(has(msg, "--negative_prompt needs a value"), msg)
    t:assert(has(msg, "--steps"), "names the flag it met: " .. tostring(msg))
    -- the = form takes it anyway
    local a = parse {"--model_dir", "m", "--negative_prompt=--steps"}
    t:assertEq(a.negative_prompt, "--steps")
    -- "-" alone is a value (stdin by convention)
    t:assertEq(parse({"--model_dir", "-"}).model_dir, "-")
end

function tests.value_missing_at_the_end(t)
    local msg = err {"--model_dir", "m", "--lr"}
    t:assertEq(msg, "--lr needs a value")
end

function tests.number_type(t)
    t:assert(has(err {"--model_dir", "m", "--lr", "fast"}, "--lr expects a number, got 'fast'"))
    t:assert(has(err {"--model_dir", "m", "--lr=1e999"}, "--lr expects a number"), "infinity is refused")
    t:assert(has(err {"--model_dir", "m", "--lr=nan"}, "--lr expects a number"), "nan is refused")
    t:assertEq(parse({"--model_dir", "m", "--lr", "3"}).lr, 3)
end

function tests.integer_type(t)
    t:assertEq(err {"--model_dir", "m", "--train_batch_size", "1.5"}, "--train_batch_size expects an integer, got '1.5'")
    t:assert(has(err {"--model_dir", "m", "--steps", "9223372036854775808"}, "--steps expects an integer"), "2^63")
    t:assert(has(err {"--model_dir", "m", "--steps", "ten"}, "--steps expects an integer"))
    local a = parse {"--model_dir", "m", "--steps", "9223372036854775807"}
    t:assertEq(a.steps, math.maxinteger)
    t:assertEq(math.type(parse({"--model_dir", "m", "--steps", "2e3"}).steps), "integer")
end

function tests.boolean_forms(t)
    local function val(...) return parse({"--model_dir", "m", ...}).center_crop end
    t:assertEq(val("--center_crop"), true)
    for _, w in ipairs {"true", "1", "yes", "on", "YES"} do t:assertEq(val("--center_crop=" .. w), true, w) end
    for _, w in ipairs {"false", "0", "no", "off", "Off"} do t:assertEq(val("--center_crop=" .. w), false, w) end
    t:assertEq(val("--center_crop", "--no_center_crop"), false)
    t:assertEq(val("--no-center-crop", "--center-crop"), true, "last wins")
    t:assert(has(err {"--model_dir", "m", "--center_crop=maybe"}, "--center_crop expects true/false"))
    t:assert(has(err {"--model_dir", "m", "--no_center_crop=1"}, "--no_center_crop takes no value"))
    t:assert(has(err {"--model_dir", "m", "--no_lr"}, "--lr is not a boolean"))
    -- a bare boolean does not swallow the next argument: it is a positional
    local a = parse {"--model_dir", "m", "--center_crop", "false"}
    t:assertEq(a.center_crop, true)
    t:assertEq(a.model, "false")
end

function tests.list_type(t)
    local a = parse {"--model_dir", "m", "--prompts", " a cat , a dog,,  ,x"}
    t:assertEq(a.prompts, {"a cat", "a dog", "x"})
    t:assertEq(parse({"--model_dir", "m", "--prompts="}).prompts, {})
    local p = argparse.new("x")
    p:option("names", {type = "list", default = {"a", "b"}})
    local a1 = p:parse({}, {exit = false})
    a1.names[1] = "changed"
    t:assertEq(p:parse({}, {exit = false}).names, {"a", "b"}, "each parse gets its own copy of a list default")
end

function tests.choices_are_checked_and_listed(t)
    local msg = err {"--model_dir", "m", "--precision", "bf16"}
    t:assertEq(msg, "--precision must be one of f32, bf16-mixed, bf16-sr (got 'bf16')")
end

function tests.required_options_are_named(t)
    t:assertEq(err {}, "missing required option --model_dir")
    local p = argparse.new("x")
    p:option("a", {required = true})
    p:option("b", {required = true, type = "integer"})
    t:assertEq(err({}, p), "missing required options --a, --b")
    t:assertEq(err({"--b", "1"}, p), "missing required option --a")
end

function tests.unknown_flags_are_named_with_a_suggestion(t)
    t:assertEq(err {"--model_dir", "m", "--promt", "x"}, "unknown option --promt (did you mean --prompts?)")
    t:assertEq(err {"--model_dir", "m", "--lrr=1"}, "unknown option --lrr (did you mean --lr?)")
    t:assertEq(err {"--model_dir", "m", "--trian_batch_size", "2"},
               "unknown option --trian_batch_size (did you mean --train_batch_size?)")
    -- a prefix is suggested, never taken
    t:assertEq(err {"--model_dir", "m", "--negative", "x"}, "unknown option --negative (did you mean --negative_prompt?)")
    t:assertEq(err {"--model_dir", "m", "--zzzzzz"}, "unknown option --zzzzzz")
    t:assert(has(err {"--model_dir", "m", "-x"}, "unknown option -x"))
end

function tests.last_of_a_repeated_flag_wins(t)
    local a = parse {"--model_dir", "a", "--lr", "1", "--model_dir", "b", "--lr=2"}
    t:assertEq(a.model_dir, "b")
    t:assertEq(a.lr, 2)
end

function tests.given_tells_passed_from_defaulted(t)
    local p = parser()
    local a = p:parse({"--model_dir", "m", "--lr", "5e-6"}, {exit = false})
    t:assert(p:given("lr"), "--lr was given (even with the default's value)")
    t:assert(not p:given("train_batch_size"), "--train_batch_size was not given")
    t:assertEq(a._given.lr, true)
    t:assertEq(a._given.train_batch_size, nil)
    t:assert(p:given("model_dir"))
end

function tests.positionals_fill_in_order_with_types(t)
    local p = argparse.new("train_mlp.lua")
    p:positional("steps", {type = "integer", required = false, default = 500})
    p:positional("device", {required = false, default = "cpu"})
    local a = p:parse({}, {exit = false})
    t:assertEq(a.steps, 500)
    t:assertEq(a.device, "cpu")
    a = p:parse({"200", "cuda"}, {exit = false})
    t:assertEq(a.steps, 200)
    t:assertEq(a.device, "cuda")
    t:assertEq(a._positional, {200, "cuda"})
    local _, msg = p:parse({"many"}, {exit = false})
    t:assertEq(msg, "<steps> expects an integer, got 'many'")
    _, msg = p:parse({"1", "cpu", "extra"}, {exit = false})
    t:assertEq(msg, "unexpected argument 'extra'")
    local q = argparse.new("q")
    q:positional("input")
    _, msg = q:parse({}, {exit = false})
    t:assertEq(msg, "missing argument <input>")
    -- "--" ends the flags
    a = q:parse({"--", "--not-a-flag"}, {exit = false})
    t:assertEq(a.input, "--not-a-flag")
end

function tests.help_lists_every_option(t)
    local p = parser()
    local a, text, kind = p:parse({"--model_dir", "m", "--help"}, {exit = false})
    t:assertEq(a, nil)
    t:assertEq(kind, "help")
    t:assertEq(text, p:help())
    t:assert(text:sub(1, #p:usage()) == p:usage(), "starts with the usage line")
    t:assert(has(p:usage(), "usage: demo.lua --model_dir STRING [options] [model]"), p:usage())
    t:assert(has(text, "A demo of every option type."), "description")
    for _, s in ipairs {"--lr NUMBER", "learning rate", "default: 5e-06", "--train_batch_size INT", "default: 1",
                        "--precision {f32,bf16-mixed,bf16-sr}", "default: f32", "--[no_]train_text_encoder",
                        "default: true", "--prompts A,B,...", "(list)", "required", "-h, --help"} do
        t:assert(has(text, s), "help lacks '" .. s .. "':\n" .. text)
    end
    t:assertEq(select(3, p:parse({"-h"}, {exit = false})), "help")
end

function tests.declaration_mistakes_are_errors(t)
    local p = argparse.new("x")
    p:option("a", {})
    t:assertError(function() p:option("a", {}) end, "declared twice")
    t:assertError(function() p:option("b", {type = "float"}) end, "unknown type 'float'")
    t:assertError(function() p:option("c", {type = "integer", default = 1.5}) end, "default does not have type integer")
    t:assertError(function() p:option("d", {choices = {"x"}, default = "y"}) end, "must be one of x")
    t:assertError(function() argparse.new("") end, "prog")
end

-- Exit mode, as a script uses it: stdout/stderr and the exit status.
local bin = util.moonlit_bin

local function run_script(src, args)
    local dir = util.temp_dir()
    util.write_file(dir .. "/s.lua", src)
    local q = util.shell_quote
    local p = io.popen(string.format("%s %s/s.lua %s >%s/out 2>%s/err; echo $?", q(bin()), dir, args, dir, dir))
    local rc = tonumber(p:read("l"))
    p:close()
    local out, e = util.read_file(dir .. "/out"), util.read_file(dir .. "/err")
    util.remove_tree(dir)
    return out, e, rc
end

local SCRIPT = [[
local p = require("moonlit.argparse").new("probe.lua", "A probe.")
p:option("steps", {type = "integer", default = 2})
local a = p:parse(arg)
print("steps=" .. a.steps)
]]

function tests.exit_mode_errors_go_to_stderr_with_status_2(t)
    local out, e, rc = run_script(SCRIPT, "--stpes 3")
    t:assertEq(rc, 2)
    t:assertEq(out, "")
    t:assertEq(e, "probe.lua: unknown option --stpes (did you mean --steps?)\nrun with --help for usage\n")
end

function tests.exit_mode_help_goes_to_stdout_with_status_0(t)
    local out, e, rc = run_script(SCRIPT, "--help")
    t:assertEq(rc, 0)
    t:assertEq(e, "")
    t:assert(has(out, "usage: probe.lua [options]") and has(out, "--steps INT"), out)
    out, _, rc = run_script(SCRIPT, "--steps=7")
    t:assertEq(out, "steps=7\n")
    t:assertEq(rc, 0)
end

return tests
