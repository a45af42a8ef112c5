/* lua_pickle.c — core.ckpt_load(path): the tensors of a torch .ckpt/.pt
 * file, read by the non-executing unpickler of host/pickle.h. */
#include "mlua.h"
#include "pickle.h"

#define CKPT_HANDLE "moonlit.CkptFile"

typedef struct { ml_ckpt *c; } ckpt_box;

static int ckpt_gc(lua_State *L) {
    ckpt_box *b = luaL_checkudata(L, 1, CKPT_HANDLE);
    ml_ckpt_close(b->c);
    b->c = NULL;
    return 0;
}

/* ckpt_load(path) -> {name = tensor}, {names in file order}, {global_step = n|nil}.
 * Tensors come in their stored dtype, on the CPU, owning their memory. */
static int l_ckpt_load(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "ckpt_load: path");
    /* The handle sits on the stack so an error half-way still closes it. */
    ckpt_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->c = NULL;
    luaL_setmetatable(L, CKPT_HANDLE);
    int hidx = lua_gettop(L);
    b->c = ml_ckpt_open(path);
    if (!b->c) return mlua_error(L, NULL);
    int n = ml_ckpt_count(b->c);
    lua_createtable(L, 0, n);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        const char *name = ml_ckpt_name(b->c, i);
        mlua_push_tensor(L, ml_ckpt_read(b->c, i));
        lua_setfield(L, hidx + 1, name);
        lua_pushstring(L, name);
        lua_rawseti(L, hidx + 2, i + 1);
    }
    lua_createtable(L, 0, 1);
    int64_t step = ml_ckpt_int(b->c, "global_step", -1);
    if (step >= 0) {
        lua_pushinteger(L, (lua_Integer)step);
        lua_setfield(L, -2, "global_step");
    }
    ml_ckpt_close(b->c);
    b->c = NULL;
    return 3;
}

void mlua_open_pickle(lua_State *L) {
    if (luaL_newmetatable(L, CKPT_HANDLE)) {
        lua_pushcfunction(L, ckpt_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, ckpt_gc);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_ckpt_load);
    lua_setfield(L, -2, "ckpt_load");
}
