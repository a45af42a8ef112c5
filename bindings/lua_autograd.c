/* lua_autograd.c — backward, grad mode and gradient hooks for Lua. */
#include "mlua.h"
#include "autograd.h"
#include <stdlib.h>

/* t:backward([grad], [{retain_graph = true}]) */
static int t_backward(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_tensor *g = NULL;
    int opts = 0;
    if (luaL_testudata(L, 2, MLUA_TENSOR)) { g = mlua_check_tensor(L, 2); opts = lua_istable(L, 3) ? 3 : 0; }
    else if (lua_istable(L, 2)) opts = 2;
    bool retain = mlua_opt_field_bool(L, opts, "retain_graph", 0);
    if (ml_backward(t, g, retain) < 0) return mlua_error(L, NULL);
    return 0;
}

static int l_is_grad_enabled(lua_State *L) { lua_pushboolean(L, ml_grad_enabled()); return 1; }

static int l_set_grad_enabled(lua_State *L) {
    lua_pushboolean(L, ml_set_grad_enabled(lua_toboolean(L, 1)));
    return 1;
}

/* Run fn(...) with grad mode set to `on`, restoring it even on error. */
static int with_grad_mode(lua_State *L, bool on) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    bool prev = ml_set_grad_enabled(on);
    int nargs = lua_gettop(L) - 1;
    int rc = lua_pcall(L, nargs, LUA_MULTRET, 0);
    ml_set_grad_enabled(prev);
    if (rc != LUA_OK) return lua_error(L);
    return lua_gettop(L);
}
static int l_no_grad(lua_State *L) { return with_grad_mode(L, false); }
static int l_enable_grad(lua_State *L) { return with_grad_mode(L, true); }

/* Hooks call back into Lua: ctx holds the registry ref of the function and
 * the state.  A hook runs inside backward, which never runs concurrently
 * with other Lua code in this thread, so using L is safe. */
typedef struct { lua_State *L; int ref; } lua_hook_ctx;

static ml_tensor *lua_hook_call(void *vctx, ml_tensor *grad, int *err) {
    lua_hook_ctx *c = vctx;
    lua_State *L = c->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
    mlua_push_tensor(L, ml_retain(grad));
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        ml_error("gradient hook failed: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        *err = 1;
        return NULL;
    }
    ml_tensor *out = NULL;
    mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
    if (b && b->t) out = ml_retain(b->t);
    else if (!lua_isnil(L, -1)) { ml_error("gradient hook must return a tensor or nil"); *err = 1; }
    lua_pop(L, 1);
    return out;
}

static void lua_hook_free(void *vctx) {
    lua_hook_ctx *c = vctx;
    luaL_unref(c->L, LUA_REGISTRYINDEX, c->ref);
    free(c);
}

static int t_register_hook(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_hook_ctx *c = malloc(sizeof *c);
    if (!c) return luaL_error(L, "out of memory");
    lua_State *main = L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    main = lua_tothread(L, -1);
    lua_pop(L, 1);
    c->L = main;
    lua_pushvalue(L, 2);
    c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    int id = ml_add_hook(t, lua_hook_call, c, lua_hook_free);
    if (id < 0) { lua_hook_free(c); return mlua_error(L, NULL); }
    lua_pushinteger(L, id);
    return 1;
}

static int t_remove_hook(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_remove_hook(t, (int)luaL_checkinteger(L, 2));
    return 0;
}

void mlua_open_autograd(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"is_grad_enabled", l_is_grad_enabled}, {"set_grad_enabled", l_set_grad_enabled},
        {"no_grad", l_no_grad}, {"enable_grad", l_enable_grad}, {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"backward", t_backward}, {"register_hook", t_register_hook}, {"remove_hook", t_remove_hook},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
    luaL_getmetatable(L, MLUA_TENSOR);
    lua_getfield(L, -1, "__methods");
    luaL_setfuncs(L, methods, 0);
    lua_pop(L, 2);
}
