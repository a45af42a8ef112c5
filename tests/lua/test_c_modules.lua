-- test_c_modules.lua — Lua C modules built against Lua 5.4's headers (as
-- LuaRocks builds them) load into moonlit: the binary exports the Lua C API
-- (see the Makefile's EXPORT_LUA) and package.cpath finds them, in this
-- process and, through MOONLIT_PATH, in a fresh one.  Needs a C compiler
-- (cc, or $CC) and the Lua 5.4 headers (LUA_INCDIR, default the system's).
local util = require "testutil"

local sh_quote = util.shell_quote

local running_interpreter = util.running_interpreter
local BIN = os.getenv("MOONLIT_BIN") or running_interpreter() or "build/moonlit"
local CC = os.getenv("CC") or "cc"
local INC = os.getenv("LUA_INCDIR") or "/usr/include/lua5.4"

-- A module using the API a typical one does: a library table (luaL_newlib
-- checks the core's version and number sizes), arguments, a string field,
-- a table from Lua and a call back into Lua.
local MODULE_C = [[
#include <lua.h>
#include <lauxlib.h>
static int add(lua_State *L) {
    lua_pushinteger(L, luaL_checkinteger(L, 1) + luaL_checkinteger(L, 2));
    return 1;
}
static int call_twice(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_pushvalue(L, 1); lua_call(L, 0, 1);
    lua_pushvalue(L, 1); lua_call(L, 0, 1);
    lua_arith(L, LUA_OPADD);
    return 1;
}
static const luaL_Reg fns[] = {{"add", add}, {"call_twice", call_twice}, {NULL, NULL}};
int luaopen_tinymod(lua_State *L) {
    luaL_newlib(L, fns);
    lua_pushstring(L, LUA_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
]]

-- Builds tinymod.so in a new temp dir; returns the dir.
local function build_module(t)
    local dir = util.temp_dir()
    util.write_file(dir .. "/tinymod.c", MODULE_C)
    local cmd = string.format("%s -shared -fPIC -O1 -I%s -o %s %s 2>%s", CC, sh_quote(INC),
                              sh_quote(dir .. "/tinymod.so"), sh_quote(dir .. "/tinymod.c"), sh_quote(dir .. "/cc.log"))
    local ok = os.execute(cmd)
    t:assert(ok, "building the test module failed (" .. CC .. ", headers in " .. INC .. "): " ..
                 (util.read_file(dir .. "/cc.log") or ""))
    return ok and dir or nil, dir
end

local T = {}

function T.require_a_c_module_in_process(t)
    local dir, tmp = build_module(t)
    if dir then
        local saved = package.cpath
        package.cpath = dir .. "/?.so;" .. saved
        local ok, mod = pcall(require, "tinymod")
        package.cpath = saved
        package.loaded.tinymod = nil
        t:assert(ok, "require tinymod: " .. tostring(mod))
        if ok then
            t:assertEq(mod.add(40, 2), 42, "add")
            local n = 0
            t:assertEq(mod.call_twice(function() n = n + 1; return n end), 3, "calls back into Lua")
            t:assertEq(mod.version, "Lua 5.4", "built against 5.4's headers")
            t:assertError(function() mod.add("x", 1) end, "number expected")
        end
    end
    util.remove_tree(tmp)
end

-- a fresh process finds the module through MOONLIT_PATH (its dir/?.so goes to
-- package.cpath) and keeps Lua's own cpath after it
function T.moonlit_path_reaches_cpath(t)
    local dir, tmp = build_module(t)
    if dir then
        local script = tmp .. "/use.lua"
        util.write_file(script, [[
local m = require "tinymod"
print(m.add(1, 2), package.cpath)
]])
        local p = assert(io.popen(string.format("env -u LUA_CPATH -u LUA_CPATH_5_4 MOONLIT_PATH=%s %s %s 2>&1",
                                                sh_quote(dir), sh_quote(BIN), sh_quote(script))))
        local out = p:read("a")
        p:close()
        t:assert(util.has(out, "3\t" .. dir .. "/?.so;"), "module found through MOONLIT_PATH: " .. out)
        t:assert(util.has(out, "/usr/local/lib/lua/5.4/?.so"), "Lua's default cpath kept: " .. out)
        t:assert(not util.has(out, dir .. "/?.lua;" .. dir), "no Lua templates in cpath: " .. out)
    end
    util.remove_tree(tmp)
end

return T
