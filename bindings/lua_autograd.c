/* lua_autograd.c — backward, grad mode and gradient hooks for Lua. */
#include "mlua.h"
#include "autograd.h"
#include <stdio.h>
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

/* The grad-ready callback (DistributedDataParallel's bucket trigger): one
 * Lua function, called as fn(key) with tensor_key(leaf) when a leaf's
 * gradient is complete for this backward.  The C callback cannot fail, so
 * an error in fn is kept and returned by grad_ready_error(), which ddp
 * checks when it finishes the step. */
static struct { lua_State *L; int ref; char err[512]; } g_ready = {NULL, LUA_NOREF, ""};

static void lua_grad_ready(void *ctx, ml_tensor *leaf) {
    (void)ctx;
    lua_State *L = g_ready.L;
    if (!L || g_ready.ref == LUA_NOREF) return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, g_ready.ref);
    lua_pushlightuserdata(L, leaf);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        if (!g_ready.err[0]) snprintf(g_ready.err, sizeof g_ready.err, "%s", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

/* set_grad_ready_callback(fn | nil) */
static int l_set_grad_ready_callback(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
    ml_set_grad_ready_callback(NULL, NULL);
    if (g_ready.L && g_ready.ref != LUA_NOREF) luaL_unref(g_ready.L, LUA_REGISTRYINDEX, g_ready.ref);
    g_ready.ref = LUA_NOREF;
    g_ready.err[0] = 0;
    if (lua_isnoneornil(L, 1)) return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    g_ready.L = lua_tothread(L, -1);
    lua_pop(L, 1);
    lua_pushvalue(L, 1);
    g_ready.ref = luaL_ref(L, LUA_REGISTRYINDEX);
    ml_set_grad_ready_callback(lua_grad_ready, NULL);
    return 0;
}

/* grad_ready_error() -> message of the first failed callback since the last call, or nil */
static int l_grad_ready_error(lua_State *L) {
    if (!g_ready.err[0]) { lua_pushnil(L); return 1; }
    lua_pushstring(L, g_ready.err);
    g_ready.err[0] = 0;
    return 1;
}

/* tensor_key(t) -> a value equal for every Lua handle of the same tensor
 * (the key the grad-ready callback passes) */
static int l_tensor_key(lua_State *L) {
    lua_pushlightuserdata(L, mlua_check_tensor(L, 1));
    return 1;
}

void mlua_open_autograd(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"is_grad_enabled", l_is_grad_enabled}, {"set_grad_enabled", l_set_grad_enabled},
        {"no_grad", l_no_grad}, {"enable_grad", l_enable_grad},
        {"set_grad_ready_callback", l_set_grad_ready_callback}, {"grad_ready_error", l_grad_ready_error},
        {"tensor_key", l_tensor_key}, {NULL, NULL},
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
