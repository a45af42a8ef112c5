/* lua_fs.c — filesystem helpers for the Lua library: mkdir_p, is_dir,
 * is_file, require_regular_file, copy_file, list_dir. */
#include "mlua.h"
#include "fs.h"

static int l_mkdir_p(lua_State *L) {
    if (ml_mkdir_p(mlua_check_path(L, 1, "mkdir_p: path")) < 0) return mlua_error(L, NULL);
    return 0;
}
static int l_is_dir(lua_State *L) { lua_pushboolean(L, ml_is_dir(mlua_check_path(L, 1, "is_dir: path"))); return 1; }
static int l_is_file(lua_State *L) { lua_pushboolean(L, ml_is_file(mlua_check_path(L, 1, "is_file: path"))); return 1; }
/* require_regular_file(path, what): nothing if path is a regular file, else
 * the error of ml_require_regular_file ("<what> '<path>': it is a FIFO
 * (named pipe), not a regular file", or why it cannot be opened), so Lua
 * code can say what is wrong instead of "no such file". */
static int l_require_regular_file(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "require_regular_file: path");
    if (ml_require_regular_file(path, luaL_optstring(L, 2, "cannot read")) < 0) return mlua_error(L, NULL);
    return 0;
}
static int l_copy_file(lua_State *L) {
    if (ml_copy_file(mlua_check_path(L, 1, "copy_file: source"), mlua_check_path(L, 2, "copy_file: destination")) < 0) return mlua_error(L, NULL);
    return 0;
}
static int l_list_dir(lua_State *L) {
    int n = 0;
    char **list = ml_list_dir(mlua_check_path(L, 1, "list_dir: path"), &n);
    if (!list) return mlua_error(L, NULL);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) { lua_pushstring(L, list[i]); lua_rawseti(L, -2, i + 1); }
    ml_free_list(list);
    return 1;
}

void mlua_open_fs(lua_State *L) {
    static const luaL_Reg f[] = {
        {"mkdir_p", l_mkdir_p}, {"is_dir", l_is_dir}, {"is_file", l_is_file},
        {"require_regular_file", l_require_regular_file},
        {"copy_file", l_copy_file}, {"list_dir", l_list_dir}, {NULL, NULL},
    };
    luaL_setfuncs(L, f, 0);
}
