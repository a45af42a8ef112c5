/* lua_dist.c — Lua glue of host/dist.h, for lua/moonlit/dist.lua:
 *
 *   dist_init{rank =, world_size =, local_rank =, backend = "cpu"|"nccl",
 *             master_addr =, master_port =, timeout_s =}
 *   dist_is_initialized(), dist_rank(), dist_world_size(), dist_local_rank(), dist_backend()
 *   dist_all_reduce(t, op, async) -> t | work     (op "sum"|"avg"|"max")
 *   dist_broadcast(t, root) -> t                  (root 0-based)
 *   dist_all_gather(t) -> tensor
 *   dist_reduce_scatter(t, op) -> tensor
 *   dist_barrier()
 *   dist_all_reduce_number(x, op) -> number
 *   dist_broadcast_string(s | nil, root) -> string
 *   dist_destroy()
 *   dist_free_port() -> a TCP port free right now (for tests and launchers)
 *   work:wait() -> t, work:done() -> bool          (also __gc)
 *
 * Failures raise Lua errors carrying the host's message, which names the
 * collective, this rank and the cause. */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "dist.h"
#include "mlua.h"

#define MLUA_DIST_WORK "moonlit.DistWork"

typedef struct {
    ml_dist_work *w;
    int tensor_ref;   /* registry ref keeping the tensor alive while in flight */
} work_box;

static int l_init(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    ml_dist_config c = {0};
    c.rank = (int)mlua_opt_field_integer(L, 1, "rank", -1, -1, 65535);
    c.world_size = (int)mlua_opt_field_integer(L, 1, "world_size", -1, -1, 65536);
    if (c.rank < 0) return luaL_error(L, "dist.init: option 'rank' is required");
    if (c.world_size < 1) return luaL_error(L, "dist.init: option 'world_size' is required (at least 1)");
    c.local_rank = (int)mlua_opt_field_integer(L, 1, "local_rank", 0, 0, 65535);
    const char *backend = mlua_opt_field_string(L, 1, "backend", "cpu");
    if (ml_dist_backend_parse(backend, &c.backend) < 0) return mlua_error(L, "dist.init");
    c.master_addr = mlua_opt_field_string(L, 1, "master_addr", "127.0.0.1");
    c.master_port = (int)mlua_opt_field_integer(L, 1, "master_port", 29500, 1, 65535);
    c.timeout_s = mlua_opt_field_number(L, 1, "timeout_s", ML_DIST_DEFAULT_TIMEOUT_S);
    if (ml_dist_init(&c) < 0) return mlua_error(L, NULL);
    return 0;
}

static int l_is_initialized(lua_State *L) { lua_pushboolean(L, ml_dist_is_initialized()); return 1; }

static int need_init(lua_State *L, const char *what) {
    if (!ml_dist_is_initialized())
        return luaL_error(L, "dist.%s: the process group is not initialised (call dist.init first)", what);
    return 0;
}

static int l_rank(lua_State *L) { need_init(L, "rank"); lua_pushinteger(L, ml_dist_rank()); return 1; }
static int l_world_size(lua_State *L) { need_init(L, "world_size"); lua_pushinteger(L, ml_dist_world_size()); return 1; }
static int l_local_rank(lua_State *L) { need_init(L, "local_rank"); lua_pushinteger(L, ml_dist_local_rank()); return 1; }
static int l_backend(lua_State *L) {
    need_init(L, "backend");
    lua_pushstring(L, ml_dist_backend_name(ml_dist_get_backend()));
    return 1;
}

static ml_dist_op check_op(lua_State *L, int idx, const char *what) {
    const char *s = luaL_optstring(L, idx, "sum");
    ml_dist_op op;
    if (ml_dist_op_parse(s, &op) < 0) luaL_error(L, "dist.%s: %s", what, ml_last_error());
    return op;
}

static int l_all_reduce(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_dist_op op = check_op(L, 2, "all_reduce");
    int async = lua_toboolean(L, 3);
    if (!async) {
        if (ml_dist_all_reduce(t, op, NULL) < 0) return mlua_error(L, NULL);
        lua_settop(L, 1);
        return 1;
    }
    work_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->w = NULL;
    b->tensor_ref = LUA_NOREF;
    luaL_setmetatable(L, MLUA_DIST_WORK);
    if (ml_dist_all_reduce(t, op, &b->w) < 0) return mlua_error(L, NULL);
    lua_pushvalue(L, 1);
    b->tensor_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

static work_box *check_work(lua_State *L) { return luaL_checkudata(L, 1, MLUA_DIST_WORK); }

static void work_release(lua_State *L, work_box *b) {
    if (b->w) { ml_dist_work_free(b->w); b->w = NULL; }
    if (b->tensor_ref != LUA_NOREF) { luaL_unref(L, LUA_REGISTRYINDEX, b->tensor_ref); b->tensor_ref = LUA_NOREF; }
}

static int l_work_wait(lua_State *L) {
    work_box *b = check_work(L);
    int rc = b->w ? ml_dist_work_wait(b->w) : 0;
    if (b->tensor_ref != LUA_NOREF) lua_rawgeti(L, LUA_REGISTRYINDEX, b->tensor_ref);
    else lua_pushnil(L);
    if (rc < 0) return mlua_error(L, NULL);
    /* Keep the tensor reference: w:wait() may be called again, and returns it. */
    if (b->w) { ml_dist_work_free(b->w); b->w = NULL; }
    return 1;
}

static int l_work_done(lua_State *L) {
    work_box *b = check_work(L);
    int rc = b->w ? ml_dist_work_done(b->w) : 1;
    if (rc < 0) return mlua_error(L, NULL);
    lua_pushboolean(L, rc);
    return 1;
}

static int l_work_gc(lua_State *L) {
    work_release(L, check_work(L));
    return 0;
}

static int l_broadcast(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int root = mlua_opt_int(L, 2, "root", 0, 0, 65535);
    if (ml_dist_broadcast(t, root) < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_all_gather(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    return mlua_push_tensor(L, ml_dist_all_gather(t));
}

static int l_reduce_scatter(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_dist_op op = check_op(L, 2, "reduce_scatter");
    return mlua_push_tensor(L, ml_dist_reduce_scatter(t, op));
}

static int l_barrier(lua_State *L) {
    if (ml_dist_barrier() < 0) return mlua_error(L, NULL);
    return 0;
}

static int l_all_reduce_number(lua_State *L) {
    double x = luaL_checknumber(L, 1);
    ml_dist_op op = check_op(L, 2, "all_reduce_number");
    if (ml_dist_all_reduce_double(&x, op) < 0) return mlua_error(L, NULL);
    lua_pushnumber(L, x);
    return 1;
}

static int l_broadcast_string(lua_State *L) {
    size_t len = 0;
    const char *s = luaL_optlstring(L, 1, "", &len);
    int root = mlua_opt_int(L, 2, "root", 0, 0, 65535);
    char *buf = malloc(len + 1);
    if (!buf) return luaL_error(L, "dist.broadcast_string: out of memory");
    memcpy(buf, s, len);
    buf[len] = 0;
    if (ml_dist_broadcast_bytes(&buf, &len, root) < 0) {
        free(buf);
        return mlua_error(L, NULL);
    }
    lua_pushlstring(L, buf, len);
    free(buf);
    return 1;
}

static int l_destroy(lua_State *L) {
    ml_dist_destroy();
    return 0;
}

static int l_free_port(lua_State *L) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return luaL_error(L, "dist.free_port: socket failed");
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = 0;
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return luaL_error(L, "dist.free_port: cannot bind a port");
    }
    close(fd);
    lua_pushinteger(L, ntohs(a.sin_port));
    return 1;
}

void mlua_open_dist(lua_State *L) {
    if (luaL_newmetatable(L, MLUA_DIST_WORK)) {
        static const luaL_Reg methods[] = {{"wait", l_work_wait}, {"done", l_work_done}, {NULL, NULL}};
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_work_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {
        {"dist_init", l_init},
        {"dist_is_initialized", l_is_initialized},
        {"dist_rank", l_rank},
        {"dist_world_size", l_world_size},
        {"dist_local_rank", l_local_rank},
        {"dist_backend", l_backend},
        {"dist_all_reduce", l_all_reduce},
        {"dist_broadcast", l_broadcast},
        {"dist_all_gather", l_all_gather},
        {"dist_reduce_scatter", l_reduce_scatter},
        {"dist_barrier", l_barrier},
        {"dist_all_reduce_number", l_all_reduce_number},
        {"dist_broadcast_string", l_broadcast_string},
        {"dist_destroy", l_destroy},
        {"dist_free_port", l_free_port},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
}
