/* lua_autograd.c — backward, grad mode and gradient hooks for Lua. */
#include "mlua.h"
#include "autograd.h"
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The Lua state whose t:backward is running in this thread: backward
 * functions written in Lua (checkpointed blocks) are called on it, since it
 * is the thread running (a coroutine, perhaps), not merely the main one. */
static _Thread_local lua_State *tl_backward_L;

/* t:backward([grad], [{retain_graph = true}]) */
static int t_backward(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_tensor *g = NULL;
    int opts = 0;
    /* (grad), (grad, opts), (nil, opts), (opts): anything else is refused,
     * never dropped (a number for the gradient, options in the wrong place) */
    if (luaL_testudata(L, 2, MLUA_TENSOR)) {
        g = mlua_check_tensor(L, 2);
        opts = 3;
    } else if (lua_istable(L, 2)) {
        opts = 2;
        if (!lua_isnone(L, 3)) return luaL_error(L, "backward: options come last (got a %s after them)",
                                                  luaL_typename(L, 3));
    } else if (lua_isnoneornil(L, 2)) {
        opts = 3;
    } else {
        return luaL_error(L, "backward: the gradient must be a tensor (got %s); a number as gradient: "
                             "ml.full(t:size(), v)", luaL_typename(L, 2));
    }
    if (opts == 3 && !lua_isnoneornil(L, 3) && !lua_istable(L, 3))
        return luaL_error(L, "backward: options must be a table like {retain_graph = true} (got %s)",
                          luaL_typename(L, 3));
    if (opts == 3 && !lua_istable(L, 3)) opts = 0;
    if (opts) {
        lua_pushnil(L);
        while (lua_next(L, opts)) {
            lua_pop(L, 1);
            if (lua_type(L, -1) != LUA_TSTRING || strcmp(lua_tostring(L, -1), "retain_graph") != 0) {
                const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1);
                return luaL_error(L, "backward: unknown option '%s' (the option is retain_graph)", k);
            }
        }
    }
    bool retain = mlua_opt_field_bool(L, opts, "retain_graph", 0);
    lua_State *outer = tl_backward_L;
    tl_backward_L = L;
    int rc = ml_backward(t, g, retain);
    tl_backward_L = outer;
    if (rc < 0) return mlua_error(L, NULL);
    return 0;
}

/* ---- nodes whose backward is a Lua function (nn.checkpoint) ------------ */

typedef struct { lua_State *L; int ref; } lua_node_ctx;

static void lua_node_free(void *vctx) {
    lua_node_ctx *c = vctx;
    luaL_unref(c->L, LUA_REGISTRYINDEX, c->ref);
    free(c);
}

/* Calls the node's Lua function with the output's gradient; it returns one
 * value per input: a gradient tensor, or nil where none is wanted. */
static int lua_node_backward(ml_node *n, ml_tensor *gout, ml_tensor **gin) {
    lua_node_ctx *c = n->ctx;
    lua_State *L = tl_backward_L ? tl_backward_L : c->L;
    int top = lua_gettop(L);
    if (!lua_checkstack(L, n->n_inputs + 4)) return ml_error("%s: Lua stack overflow", n->name);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
    mlua_push_tensor(L, ml_retain(gout));
    if (lua_pcall(L, 1, n->n_inputs, 0) != LUA_OK) {
        ml_error("%s", lua_tostring(L, -1));
        lua_settop(L, top);
        return -1;
    }
    for (int i = 0; i < n->n_inputs; i++) {
        int idx = top + 1 + i;
        if (lua_isnil(L, idx)) continue;
        mlua_tensor_box *b = luaL_testudata(L, idx, MLUA_TENSOR);
        if (!b || !b->t) {
            for (int k = 0; k < i; k++) { ml_release(gin[k]); gin[k] = NULL; }
            lua_settop(L, top);
            return ml_error("%s: its backward must return a tensor or nil for input %d (got %s)", n->name, i + 1,
                            luaL_typename(L, idx));
        }
        if (ml_node_needs_grad(n, i)) gin[i] = ml_retain(b->t);
    }
    lua_settop(L, top);
    return 0;
}

/* checkpoint_node(out, inputs, backward) -> out recorded as the result of a
 * node named "checkpoint" over inputs (a table with field n: tensors, or
 * other values, which get no edge), whose backward is the Lua function
 * backward(grad_out) -> one gradient (or nil) per input.  The inputs are
 * saved, so writing one in place before backward makes backward fail, as
 * for any op.  out itself is returned when nothing needs a gradient. */
static int l_checkpoint_node(lua_State *L) {
    ml_tensor *out = mlua_check_tensor(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_getfield(L, 2, "n");
    lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, 2);
    lua_pop(L, 1);
    if (n < 0 || n > ML_NODE_MAX_INPUTS)
        return luaL_error(L, "checkpoint: %d inputs, at most %d", (int)n, ML_NODE_MAX_INPUTS);
    ml_tensor *ins[ML_NODE_MAX_INPUTS] = {0};
    for (int i = 0; i < (int)n; i++) {
        lua_rawgeti(L, 2, i + 1);
        mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
        if (b && b->t) ins[i] = b->t;
        lua_pop(L, 1);
    }
    ml_node *node = ml_node_begin_custom("checkpoint", lua_node_backward, (int)n, ins);
    if (!node) { lua_pushvalue(L, 1); return 1; }
    ml_tensor *res = ml_detach(out);
    if (res && node->op == ML_NODE_UNRECORDED) {
        /* The node could not be allocated: the shared placeholder, which
         * backward refuses naming the op; it holds no state of ours. */
        ml_node_finish(node, res);
        return mlua_push_tensor(L, res);
    }
    lua_node_ctx *c = res ? malloc(sizeof *c) : NULL;
    if (!c) {
        ml_release(res);
        ml_node_release(node);
        return luaL_error(L, "checkpoint: out of memory");
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    c->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    lua_pushvalue(L, 3);
    c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    node->ctx = c;
    node->ctx_free = lua_node_free;
    for (int i = 0; i < (int)n; i++)
        if (ins[i]) ml_node_save(node, ins[i]);
    ml_node_finish(node, res);
    return mlua_push_tensor(L, res);
}

static int l_is_grad_enabled(lua_State *L) { lua_pushboolean(L, ml_grad_enabled()); return 1; }

static int l_set_grad_enabled(lua_State *L) {
    lua_pushboolean(L, ml_set_grad_enabled(lua_toboolean(L, 1)));
    return 1;
}

/* recompute_casts([on]) -> the previous setting.  On (the default), a node
 * that saves an autocast conversion of a parameter keeps the parameter and
 * converts it again in backward (host/autograd.h, ml_node_save). */
static int l_recompute_casts(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_pushboolean(L, ml_recompute_casts());
        return 1;
    }
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    lua_pushboolean(L, ml_set_recompute_casts(lua_toboolean(L, 1)));
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
    /* ids are ints from 1: checked before narrowing, or (1 << 32) + 1
     * would remove hook 1 */
    ml_remove_hook(t, mlua_check_int(L, 2, "remove_hook: id", 1, INT_MAX));
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

/* saved_census(t) -> {{op =, nodes =, tensors =, bytes =}, ...}: what the
 * graph behind t holds for backward, by the op of the node that saved it
 * (ml_saved_census: each storage counted once), largest first; {} for a
 * tensor without history.  What holds the activations of a training step
 * between its forward and backward. */
typedef struct { lua_State *L; int tab; } census_ctx;

static void census_add(void *vctx, const char *node, int n_saved, int fresh, size_t bytes) {
    census_ctx *c = vctx;
    lua_State *L = c->L;
    if (lua_getfield(L, c->tab, node) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 4);
        lua_pushstring(L, node); lua_setfield(L, -2, "op");
        lua_pushinteger(L, 0); lua_setfield(L, -2, "nodes");
        lua_pushinteger(L, 0); lua_setfield(L, -2, "tensors");
        lua_pushinteger(L, 0); lua_setfield(L, -2, "bytes");
        lua_pushvalue(L, -1);
        lua_setfield(L, c->tab, node);
    }
    const char *keys[3] = {"nodes", "tensors", "bytes"};
    lua_Integer add[3] = {1, fresh, (lua_Integer)bytes};
    (void)n_saved;
    for (int k = 0; k < 3; k++) {
        lua_getfield(L, -1, keys[k]);
        lua_Integer v = lua_tointeger(L, -1) + add[k];
        lua_pop(L, 1);
        lua_pushinteger(L, v);
        lua_setfield(L, -2, keys[k]);
    }
    lua_pop(L, 1);
}

static int census_cmp(lua_State *L) {
    lua_getfield(L, 1, "bytes");
    lua_getfield(L, 2, "bytes");
    lua_pushboolean(L, lua_tointeger(L, -2) > lua_tointeger(L, -1));
    return 1;
}

static int l_saved_census(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    lua_settop(L, 1);
    lua_newtable(L);                          /* 2: by op */
    census_ctx c = {L, 2};
    if (ml_saved_census(t, census_add, &c) < 0) return mlua_error(L, NULL);
    lua_newtable(L);                          /* 3: the list */
    lua_Integer n = 0;
    lua_pushnil(L);
    while (lua_next(L, 2)) { lua_rawseti(L, 3, ++n); }
    /* table.sort(list, by bytes descending) */
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_pushvalue(L, 3);
    lua_pushcfunction(L, census_cmp);
    lua_call(L, 2, 0);
    lua_pop(L, 1);
    return 1;
}

void mlua_open_autograd(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"is_grad_enabled", l_is_grad_enabled}, {"set_grad_enabled", l_set_grad_enabled},
        {"no_grad", l_no_grad}, {"enable_grad", l_enable_grad}, {"checkpoint_node", l_checkpoint_node},
        {"set_grad_ready_callback", l_set_grad_ready_callback}, {"grad_ready_error", l_grad_ready_error},
        {"tensor_key", l_tensor_key}, {"saved_census", l_saved_census},
        {"recompute_casts", l_recompute_casts}, {NULL, NULL},
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
