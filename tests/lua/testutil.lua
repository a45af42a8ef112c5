-- testutil.lua — small helpers the Lua test files share.
local U = {}

-- The error message of f(...) as a string, or nil if it did not fail.
function U.error_of(f, ...)
    local ok, err = pcall(f, ...)
    if ok then return nil end
    return tostring(err)
end

-- Whether s contains pattern as plain text (nil-safe).
function U.has(s, pattern)
    return s ~= nil and s:find(pattern, 1, true) ~= nil
end

function U.read_file(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

function U.write_file(path, data)
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
end

local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
U.shell_quote = sh_quote

-- The moonlit binary running this suite: MOONLIT_BIN (set by
-- tests/run_all.sh), else the interpreter that started the runner (the
-- lowest index of `arg`); nil when neither is known.
function U.moonlit_bin()
    local bin = os.getenv("MOONLIT_BIN")
    if bin and bin ~= "" then return bin end
    if type(arg) ~= "table" or arg[-1] == nil then return nil end
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

-- The interpreter that started the runner, whatever MOONLIT_BIN says.
function U.running_interpreter()
    if type(arg) ~= "table" or arg[-1] == nil then return nil end
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

-- A fresh empty folder (mktemp -d); remove it with U.remove_tree.
function U.temp_dir()
    local p = assert(io.popen("mktemp -d"))
    local d = p:read("l")
    p:close()
    return assert(d, "mktemp -d failed")
end

-- cp -r in Lua through the core's file functions.
function U.copy_tree(src, dst)
    local core = require "moonlit.core"
    core.mkdir_p(dst)
    for _, name in ipairs(core.list_dir(src)) do
        local s, d = src .. "/" .. name, dst .. "/" .. name
        if core.is_dir(s) then U.copy_tree(s, d) else core.copy_file(s, d) end
    end
end

function U.remove_tree(dir) os.execute("rm -rf " .. sh_quote(dir)) end

return U
