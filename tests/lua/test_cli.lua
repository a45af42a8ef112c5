-- test_cli.lua — the moonlit command line and REPL, driven as a separate
-- process through pipes, files and a fifo (POSIX sh, mkfifo, kill, grep).
local util = require "testutil"
local sh_quote = util.shell_quote

-- The binary under test: MOONLIT_BIN, else the interpreter running this
-- suite (the lowest index of `arg`), else build/moonlit.
local running_interpreter = util.running_interpreter
local BIN = sh_quote(os.getenv("MOONLIT_BIN") or running_interpreter() or "build/moonlit")
local read_file, write_file, temp_dir, remove_tree = util.read_file, util.write_file, util.temp_dir, util.remove_tree

-- The first line a shell command prints.
local function shell(cmd)
    local p = assert(io.popen(cmd))
    local s = p:read("l")
    p:close()
    return s
end

-- Run `env BIN args` with `input` on stdin; returns stdout, stderr, exit status.
local function run(args, input, env)
    local dir = temp_dir()
    write_file(dir .. "/in", input or "")
    local cmd = string.format("%s %s %s <%s/in >%s/out 2>%s/err; echo $?",
        env or "", BIN, args, dir, dir, dir)
    local rc = tonumber(shell(cmd))
    local out, err = read_file(dir .. "/out"), read_file(dir .. "/err")
    remove_tree(dir)
    return out, err, rc
end

-- Lua code that announces it has started, then spins until interrupted.
local SPIN = [[io.stdout:write("started\n") io.stdout:flush() while true do end]]

-- Shell lines that wait (up to 10 s) until `file` says "started", then send
-- SIGINT to $pid.  A watchdog kills the process after about 20 s if the
-- interrupt is ignored, so a broken build fails the test instead of hanging
-- (3>&-: the watchdog must not hold a REPL's input fifo open).
local function interrupt_when_started(file)
    return table.concat({
        "(i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; kill -9 $pid) >/dev/null 2>&1 3>&- & dog=$!",
        "i=0; while ! grep -q started " .. file .. " && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done",
        "kill -INT $pid",
    }, "\n")
end

local tests = {}

function tests.expression_prints_its_value(t)
    local out, _, rc = run("", "1+1\n")
    t:assertEq(out, "2\n")
    t:assertEq(rc, 0)
end

function tests.all_returned_values_print(t)
    local out = run("", '1, "a", nil\n')
    t:assertEq(out, "1\ta\tnil\n")
end

function tests.statement_runs_when_not_an_expression(t)
    local out = run("", "x = 6\nprint(x * 7)\n")
    t:assertEq(out, "42\n")
end

function tests.multi_line_function_definition(t)
    local out, err = run("", "function sq(x)\n  return x * x\nend\nsq(7)\n")
    t:assertEq(out, "49\n")
    t:assert(not err:find("stdin:"), "unexpected error: " .. err)
end

function tests.incomplete_chunk_at_end_of_input_is_reported(t)
    local _, err, rc = run("", "local t = {\n")
    t:assert(err:find("<eof>", 1, true), "stderr: " .. err)
    t:assertEq(rc, 1)
end

function tests.error_shows_traceback_and_repl_goes_on(t)
    local out, err, rc = run("", 'error("boom")\nprint("after")\n')
    t:assert(err:find("stdin:1: boom", 1, true), "stderr: " .. err)
    t:assert(err:find("stack traceback:", 1, true), "no traceback in: " .. err)
    t:assertEq(out, "after\n")
    -- a piped session that hit an error reports it in its exit status
    t:assertEq(rc, 1)
end

function tests.exec_option(t)
    local out, _, rc = run("-e " .. sh_quote("print(40+2)"))
    t:assertEq(out, "42\n")
    t:assertEq(rc, 0)
end

function tests.exec_options_run_in_order_then_interactive(t)
    local out = run("-e x=40 -e " .. sh_quote("x = x + 2") .. " -i", "x\n")
    t:assertEq(out, "42\n")
end

function tests.version(t)
    local out, _, rc = run("--version")
    t:assert(out:match("^moonlit %d+%.%d+%.%d+"), "version line: " .. out)
    t:assert(out:find("Lua 5.4", 1, true), "no Lua version in: " .. out)
    t:assert(out:find("CUDA", 1, true), "no CUDA status in: " .. out)
    t:assertEq(rc, 0)
end

function tests.help(t)
    local out, _, rc = run("--help")
    t:assert(out:find("usage: moonlit", 1, true), "help: " .. out)
    t:assert(out:find("-e code", 1, true), "help does not list -e: " .. out)
    t:assertEq(rc, 0)
end

function tests.unknown_option_exits_1_with_usage(t)
    local out, err, rc = run("--bogus")
    t:assertEq(rc, 1)
    t:assertEq(out, "")
    t:assert(err:find("--bogus", 1, true), "stderr: " .. err)
    t:assert(err:find("usage:", 1, true), "stderr: " .. err)
end

function tests.exec_without_code_exits_1(t)
    local _, err, rc = run("-e")
    t:assertEq(rc, 1)
    t:assert(err:find("-e", 1, true), "stderr: " .. err)
end

function tests.script_receives_arg_and_varargs(t)
    local dir = temp_dir()
    local script = dir .. "/args.lua"
    write_file(script, [[
print(arg[0]:match("[^/]*$"))
print(arg[1], arg[2], #arg)
print(select("#", ...), ...)
print(arg[-1], arg[-2])
]])
    local out, _, rc = run("-e x=1 " .. script .. " a 'b c'")
    remove_tree(dir)
    t:assertEq(out, "args.lua\na\tb c\t2\n2\ta\tb c\nx=1\t-e\n")
    t:assertEq(rc, 0)
end

function tests.script_from_stdin(t)
    local out, _, rc = run("- one two", "print(select('#', ...), ...)\n")
    t:assertEq(out, "2\tone\ttwo\n")
    t:assertEq(rc, 0)
end

function tests.script_error_exits_1_with_traceback(t)
    local dir = temp_dir()
    local script = dir .. "/fails.lua"
    write_file(script, 'local function f() error("bad thing") end\nf()\nprint("not reached")\n')
    local out, err, rc = run(script)
    remove_tree(dir)
    t:assertEq(rc, 1)
    t:assertEq(out, "")
    t:assert(err:find("bad thing", 1, true), "stderr: " .. err)
    t:assert(err:find("stack traceback:", 1, true), "no traceback in: " .. err)
end

function tests.missing_script_exits_1(t)
    local _, err, rc = run("no/such/script.lua")
    t:assertEq(rc, 1)
    t:assert(err:find("cannot open no/such/script.lua", 1, true), "stderr: " .. err)
end

function tests.moonlit_path_finds_modules_first(t)
    local dir = temp_dir()
    os.execute("mkdir -p " .. sh_quote(dir .. "/b/moonlit"))
    write_file(dir .. "/b/cli_probe.lua", 'return {where = "b"}\n')
    write_file(dir .. "/b/moonlit/init.lua", 'return {probe = "override"}\n')
    local env = "MOONLIT_PATH=" .. sh_quote(dir .. "/a;" .. dir .. "/b/")
    local out, err = run("-e " .. sh_quote('print(require("cli_probe").where, require("moonlit").probe)'),
        nil, env)
    t:assertEq(out, "b\toverride\n")
    -- the REPL preloads the library (here the override) as `ml`
    local repl_out = run("", "ml.probe\n", env)
    remove_tree(dir)
    t:assertEq(repl_out, "override\n")
end

function tests.package_path_has_bundled_lua_before_defaults(t)
    local lua_dir = shell("cd \"$(dirname " .. BIN .. ")/../lua\" && pwd -P")
    t:assert(lua_dir, "no lua/ beside the binary's folder")
    local out = run("-e " .. sh_quote("print(package.path)"))
    local bundled = out:find(lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua;", 1, true)
    local cwd = out:find(";./?.lua", 1, true)
    t:assert(bundled, "bundled lua/ not in package.path: " .. out)
    t:assert(cwd and cwd > bundled, "./?.lua missing or before lua/: " .. out)
end

function tests.core_module_is_preloaded(t)
    local out = run("-e " .. sh_quote('print(type(require "moonlit.core"))'))
    t:assertEq(out, "table\n")
end

function tests.finalizers_run_at_exit(t)
    local out = run("-e " .. sh_quote('setmetatable({}, {__gc = function() print("released") end})'))
    t:assertEq(out, "released\n")
end

function tests.sigint_stops_running_script(t)
    local dir = temp_dir()
    local cmd = table.concat({
        BIN .. " -e " .. sh_quote(SPIN) .. " >" .. dir .. "/out 2>" .. dir .. "/err & pid=$!",
        interrupt_when_started(dir .. "/out"),
        "wait $pid; echo $?",
        "kill $dog 2>/dev/null",
    }, "\n")
    local rc = tonumber(shell(cmd))
    local err = read_file(dir .. "/err")
    remove_tree(dir)
    t:assertEq(rc, 1)   -- an error exit, not death by signal (130 or 137)
    t:assert(err:find("interrupted!", 1, true), "stderr: " .. err)
end

function tests.sigint_in_repl_stops_chunk_and_repl_goes_on(t)
    local dir = temp_dir()
    local cmd = table.concat({
        "mkfifo " .. dir .. "/in",
        BIN .. " <" .. dir .. "/in >" .. dir .. "/out 2>" .. dir .. "/err & pid=$!",
        "exec 3>" .. dir .. "/in",
        "printf '%s\\n' " .. sh_quote(SPIN) .. " >&3",
        interrupt_when_started(dir .. "/out"),
        "echo 'print(\"alive\")' >&3",
        "exec 3>&-",
        "wait $pid; echo $?",
        "kill $dog 2>/dev/null",
    }, "\n")
    local rc = tonumber(shell(cmd))
    local out, err = read_file(dir .. "/out"), read_file(dir .. "/err")
    remove_tree(dir)
    t:assertEq(out, "started\nalive\n")
    t:assert(err:find("interrupted!", 1, true), "stderr: " .. err)
    t:assert(rc ~= 130 and rc ~= 137, "killed by a signal: " .. tostring(rc))
end

-- Every example and script parses its flags with moonlit.argparse: --help
-- prints the usage (exit 0) and an unknown flag is named (exit 2).
local SCRIPTS = {
    "examples/generate.lua", "examples/train_mlp.lua", "scripts/make_random_model.lua", "scripts/verify_fixture.lua",
    "tests/bench/bench_call_overhead.lua", "tests/bench/bench_sd_cpu.lua", "tests/bench/bench_train_step.lua",
    "tests/gpu/test_parity.lua",
}

function tests.scripts_give_help_and_name_unknown_flags(t)
    for _, script in ipairs(SCRIPTS) do
        local name = script:match("[^/]+$")
        local out, err, rc = run(script .. " --help")
        t:assertEq(rc, 0, script .. " --help exit status; stderr: " .. err)
        t:assert(out:find("usage: " .. name, 1, true), script .. " --help: " .. out)
        out, err, rc = run(script .. " --no-such-flag=1")
        t:assertEq(rc, 2, script .. " with an unknown flag")
        t:assertEq(out, "", script .. ": nothing on stdout")
        t:assert(err:find(name .. ": unknown option --no-such-flag", 1, true), script .. " stderr: " .. err)
    end
end

return tests
