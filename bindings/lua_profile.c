/* lua_profile.c — profile([opts,] fn, ...): run fn with kernel timing on and
 * return its per-kernel totals (host/profile.h), then fn's results.
 * opts.by_scope keeps the totals apart per scope (who called the kernel);
 * profile_scope(name) sets the current scope (nn.Module calls do it while
 * profiling) and returns the previous one; profiling() says whether a
 * profile is running. */
#include "mlua.h"
#include "profile.h"
#include <stdlib.h>

static int l_profile(lua_State *L) {
    bool by_scope = false;
    if (lua_type(L, 1) == LUA_TTABLE) {
        lua_getfield(L, 1, "by_scope");
        by_scope = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_remove(L, 1);
    }
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (ml_profile_on) return luaL_error(L, "profile: already profiling (calls do not nest)");
    int nargs = lua_gettop(L) - 1;
    ml_profile_start();
    int rc = lua_pcall(L, nargs, LUA_MULTRET, 0);
    ml_profile_entry *e = NULL;
    int n = 0;
    int prc = ml_profile_stop_ex(&e, &n, by_scope);
    if (rc != LUA_OK) { free(e); return lua_error(L); }
    if (prc < 0) return mlua_error(L, "profile");
    int nres = lua_gettop(L);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 4);
        lua_pushstring(L, e[i].name); lua_setfield(L, -2, "name");
        if (e[i].scope) { lua_pushstring(L, e[i].scope); lua_setfield(L, -2, "scope"); }
        lua_pushnumber(L, e[i].ms); lua_setfield(L, -2, "ms");
        lua_pushinteger(L, e[i].calls); lua_setfield(L, -2, "calls");
        lua_rawseti(L, -2, i + 1);
    }
    free(e);
    lua_insert(L, 1);       /* the table first, then fn's results */
    return nres + 1;
}

/* profile_scope(name or nil) -> the previous scope (or nil). */
static int l_profile_scope(lua_State *L) {
    const char *s = NULL;
    if (!lua_isnoneornil(L, 1)) {
        s = ml_profile_intern(luaL_checkstring(L, 1));
        if (!s) return luaL_error(L, "profile_scope: out of memory");
    }
    const char *prev = ml_profile_set_scope(s);
    if (prev) lua_pushstring(L, prev); else lua_pushnil(L);
    return 1;
}

static int l_profiling(lua_State *L) {
    lua_pushboolean(L, ml_profile_on);
    return 1;
}

void mlua_open_profile(lua_State *L) {
    lua_pushcfunction(L, l_profile);
    lua_setfield(L, -2, "profile");
    lua_pushcfunction(L, l_profile_scope);
    lua_setfield(L, -2, "profile_scope");
    lua_pushcfunction(L, l_profiling);
    lua_setfield(L, -2, "profiling");
}
