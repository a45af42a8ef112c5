-- run.lua — runs tests/lua/test_*.lua (or the files given as arguments) and
-- prints one line per failing test and the total "N passed, N failed".
package.path = "tests/lua/?.lua;" .. package.path
local Tester = require "tester"

local files = {}
if #arg > 0 then
    for i = 1, #arg do files[#files + 1] = arg[i] end
else
    local p = io.popen("ls tests/lua/test_*.lua 2>/dev/null")
    for f in p:lines() do files[#files + 1] = f end
    p:close()
end

local passed, failed = 0, 0
for _, file in ipairs(files) do
    local chunk, err = loadfile(file)
    local suite
    if chunk then
        local ok, res = xpcall(chunk, debug.traceback)
        if ok then suite = res else err = res end
    end
    if type(suite) ~= "table" then
        print(string.format("FAIL %s: could not load: %s", file, tostring(err)))
        failed = failed + 1
    else
        local names = {}
        for name in pairs(suite) do names[#names + 1] = name end
        table.sort(names)
        local fp, ff = 0, 0
        for _, name in ipairs(names) do
            local t = Tester.new()
            local ok, e = xpcall(suite[name], debug.traceback, t)
            collectgarbage()
            if ok and #t.failures == 0 then
                fp = fp + 1
            else
                ff = ff + 1
                print(string.format("FAIL %s: %s", file, name))
                for _, f in ipairs(t.failures) do print("    " .. f) end
                if not ok then print("    " .. tostring(e):gsub("\n", "\n    ")) end
            end
        end
        print(string.format("   %s: %d passed, %d failed", file, fp, ff))
        passed, failed = passed + fp, failed + ff
    end
end
print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
