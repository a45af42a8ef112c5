/* lua_profile.c — profile(fn, ...): run fn with kernel timing on and return
 * its per-kernel totals (host/profile.h), then fn's results. */
#include "mlua.h"
#include "profile.h"
#include <stdlib.h>

static int l_profile(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (ml_profile_on) return luaL_error(L, "profile: already profiling (calls do not nest)");
    int nargs = lua_gettop(L) - 1;
    ml_profile_start();
    int rc = lua_pcall(L, nargs, LUA_MULTRET, 0);
    ml_profile_entry *e = NULL;
    int n = 0;
    int prc = ml_profile_stop(&e, &n);
    if (rc != LUA_OK) { free(e); return lua_error(L); }
    if (prc < 0) return mlua_error(L, "profile");
    int nres = lua_gettop(L);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, e[i].name); lua_setfield(L, -2, "name");
        lua_pushnumber(L, e[i].ms); lua_setfield(L, -2, "ms");
        lua_pushinteger(L, e[i].calls); lua_setfield(L, -2, "calls");
        lua_rawseti(L, -2, i + 1);
    }
    free(e);
    lua_insert(L, 1);       /* the table first, then fn's results */
    return nres + 1;
}

void mlua_open_profile(lua_State *L) {
    lua_pushcfunction(L, l_profile);
    lua_setfield(L, -2, "profile");
}
