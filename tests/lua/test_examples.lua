-- test_examples.lua — the shipped examples run and do what they say:
-- examples/train_mlp.lua trains (its loss falls at least 10x), both inside
-- this interpreter and as a script run by the moonlit binary, and names a
-- bad argument.  (examples/generate.lua is tested in test_generate.lua.)
local U = require "testutil"
local tests = {}

local SCRIPT = "examples/train_mlp.lua"

-- The binary running this suite: MOONLIT_BIN (set by tests/run_all.sh) or
-- the interpreter that started the runner (the lowest index of `arg`).
local moonlit_bin = U.moonlit_bin

local shell_quote = U.shell_quote

function tests.train_mlp_in_process(t)
    local saved_arg, saved_print = arg, print
    arg = {[0] = SCRIPT, "200"}
    print = function() end                      -- keep the suite's output readable
    local ok, res = pcall(dofile, SCRIPT)
    arg, print = saved_arg, saved_print
    if not t:assert(ok, "script failed: " .. tostring(res)) then return end
    t:assert(type(res) == "table" and res.first and res.last, "the script returns {first, last}")
    t:assert(res.first / res.last >= 10, string.format("loss fell only %.1fx (%.4g -> %.4g)",
                                                       res.first / res.last, res.first, res.last))
end

function tests.train_mlp_from_the_command_line(t)
    local bin = moonlit_bin()
    if not t:assert(bin, "no moonlit binary known (set MOONLIT_BIN)") then return end
    local p = io.popen(shell_quote(bin) .. " " .. SCRIPT .. " 200 cpu 2>&1")
    local out = p:read("a")
    local ok, how, code = p:close()
    t:assert(ok, string.format("exit %s %s:\n%s", tostring(how), tostring(code), out))
    local factor, first, last = out:match("loss fell ([%d%.]+)x %(([%d%.e%-]+) %-> ([%d%.e%-]+)%)")
    if not t:assert(factor, "no 'loss fell' line in:\n" .. out) then return end
    t:assert(tonumber(first) / tonumber(last) >= 10, "loss fell only " .. factor .. "x")
    t:assert(out:find("step  200", 1, true), "reports the last step")
end

function tests.train_mlp_names_a_bad_step_count(t)
    local bin = moonlit_bin()
    if not t:assert(bin, "no moonlit binary known (set MOONLIT_BIN)") then return end
    local p = io.popen(shell_quote(bin) .. " " .. SCRIPT .. " many 2>&1; echo \"rc=$?\"")
    local out = p:read("a")
    p:close()
    t:assert(out:find("train_mlp.lua: <steps> expects an integer, got 'many'", 1, true), out)
    t:assert(out:find("rc=2", 1, true), "exit status 2: " .. out)
end

return tests
