/* lua_launcher.c — host/launcher.h for ml.train's worker launcher:
 *   spawn(path, argv, env) -> pid, out_fd, err_fd   env: {KEY = "value"} added to ours
 *   poll_readable({fd...}, timeout_ms) -> {fd...} ready to read (or closed)
 *   read_fd(fd) -> bytes, or nil at end of file      close_fd(fd)
 *   try_wait(pid) -> nil while running | "exit", code | "signal", "SIGKILL"
 *   kill_pid(pid, "SIGTERM") -> true, or false when the process is gone
 *   free_tcp_port() -> port     self_exe() -> path or nil
 *   trap_stop_signals(on)       stop_signal_caught() -> "SIGINT"/"SIGTERM" or nil */
#include "mlua.h"
#include "launcher.h"
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Frees the C arrays spawn builds even when a Lua error unwinds. */
typedef struct { char **argv; char **env; size_t nenv; } spawn_args;

static void spawn_args_free(spawn_args *a) {
    free(a->argv);
    if (a->env) for (size_t i = 0; i < a->nenv; i++) free(a->env[i]);
    free(a->env);
    a->argv = NULL; a->env = NULL; a->nenv = 0;
}

static int spawn_args_gc(lua_State *L) {
    spawn_args_free(lua_touserdata(L, 1));
    return 0;
}

static int l_spawn(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "spawn: program");
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer argc = luaL_len(L, 2);
    luaL_argcheck(L, argc >= 1 && argc < 100000, 2, "argv must hold 1 to 99999 strings");
    size_t nenv = 0;
    lua_pushnil(L);
    while (lua_next(L, 3)) { nenv++; lua_pop(L, 1); }
    luaL_argcheck(L, nenv < 100000, 3, "too many environment entries");
    spawn_args *a = lua_newuserdatauv(L, sizeof *a, 0);
    memset(a, 0, sizeof *a);
    lua_newtable(L);
    lua_pushcfunction(L, spawn_args_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    int keep = lua_gettop(L);
    a->argv = calloc((size_t)argc + 1, sizeof(char *));
    a->env = calloc(nenv + 1, sizeof(char *));
    if (!a->argv || !a->env) return luaL_error(L, "spawn: out of memory");
    /* argv strings stay alive in the argv table (an argument) until spawn returns */
    for (lua_Integer i = 1; i <= argc; i++) {
        lua_geti(L, 2, i);
        if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "spawn: argv[%d] is not a string", (int)i);
        /* exec ends each argument at its first NUL, as open ends a path */
        size_t al;
        const char *arg = lua_tolstring(L, -1, &al);
        if (memchr(arg, 0, al))
            return luaL_error(L, "spawn: argv[%d] '%s' holds a NUL byte (at byte %d): a program argument cannot "
                              "contain one", (int)i, mlua_push_shown(L, arg, al), (int)strlen(arg));
        a->argv[i - 1] = (char *)arg;
        lua_pop(L, 1);
    }
    lua_pushnil(L);
    while (lua_next(L, 3)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1))
            return luaL_error(L, "spawn: environment entries must be string = string");
        size_t kl, vl;
        const char *k = lua_tolstring(L, -2, &kl);
        const char *v = lua_tolstring(L, -1, &vl);
        if (kl == 0 || memchr(k, '=', kl) || memchr(k, 0, kl))
            return luaL_error(L, "spawn: bad environment variable name '%s'", mlua_push_shown(L, k, kl));
        if (memchr(v, 0, vl))
            return luaL_error(L, "spawn: environment variable %s holds a NUL byte (at byte %d)", k, (int)strlen(v));
        char *kv = malloc(kl + vl + 2);
        if (!kv) return luaL_error(L, "spawn: out of memory");
        memcpy(kv, k, kl); kv[kl] = '='; memcpy(kv + kl + 1, v, vl); kv[kl + 1 + vl] = 0;
        a->env[a->nenv++] = kv;
        lua_pop(L, 1);
    }
    ml_child c;
    int rc = ml_spawn(path, a->argv, (const char *const *)a->env, a->nenv, &c);
    lua_settop(L, keep);
    spawn_args_free(a);
    if (rc < 0) return mlua_error(L, NULL);
    lua_pushinteger(L, c.pid);
    lua_pushinteger(L, c.out_fd);
    lua_pushinteger(L, c.err_fd);
    return 3;
}

static int l_poll_readable(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    /* range-checked before narrowing, so 2^32 + 5 is not a 5 ms timeout */
    int timeout = mlua_check_int(L, 2, "poll_readable: timeout_ms", -1, INT_MAX);
    lua_Integer n = luaL_len(L, 1);
    luaL_argcheck(L, n >= 0 && n <= 4096, 1, "at most 4096 descriptors");
    int *fds = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof(int), 0);
    unsigned char *ready = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1), 0);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, 1, i);
        fds[i - 1] = mlua_check_int(L, -1, "poll_readable: descriptor", 0, INT_MAX);
        lua_pop(L, 1);
    }
    if (ml_poll_readable(fds, (int)n, timeout, ready) < 0) return mlua_error(L, NULL);
    lua_newtable(L);
    int k = 0;
    for (lua_Integer i = 0; i < n; i++)
        if (ready[i]) { lua_pushinteger(L, fds[i]); lua_rawseti(L, -2, ++k); }
    return 1;
}

static int l_read_fd(lua_State *L) {
    int fd = mlua_check_int(L, 1, "read_fd: descriptor", 0, INT_MAX);
    char buf[65536];
    ssize_t k;
    do k = read(fd, buf, sizeof buf); while (k < 0 && errno == EINTR);
    if (k < 0) return luaL_error(L, "read_fd: %s", strerror(errno));
    if (k == 0) { lua_pushnil(L); return 1; }
    lua_pushlstring(L, buf, (size_t)k);
    return 1;
}

static int l_close_fd(lua_State *L) {
    close(mlua_check_int(L, 1, "close_fd: descriptor", 0, INT_MAX));
    return 0;
}

static int l_try_wait(lua_State *L) {
    /* one child: -1 or 0 would wait for any child or group */
    pid_t pid = (pid_t)mlua_check_int(L, 1, "try_wait: pid", 1, INT_MAX);
    int code = 0, signo = 0;
    int rc = ml_try_wait(pid, &code, &signo);
    if (rc < 0) return mlua_error(L, NULL);
    if (rc == 0) { lua_pushnil(L); return 1; }
    if (signo) {
        const char *name = ml_signal_name(signo);
        lua_pushliteral(L, "signal");
        if (name) lua_pushstring(L, name); else lua_pushfstring(L, "signal %d", signo);
        return 2;
    }
    lua_pushliteral(L, "exit");
    lua_pushinteger(L, code);
    return 2;
}

static int l_kill_pid(lua_State *L) {
    /* from 1 (no process groups), checked before narrowing: (1 << 32) + 1
     * wrapped to pid 1 */
    pid_t pid = (pid_t)mlua_check_int(L, 1, "kill_pid: pid", 1, INT_MAX);
    const char *name = luaL_checkstring(L, 2);
    int signo = ml_signal_number(name);
    if (signo < 0) return luaL_error(L, "kill_pid: unknown signal '%s'", name);
    if (kill(pid, signo) < 0) {
        if (errno == ESRCH) { lua_pushboolean(L, 0); return 1; }
        return luaL_error(L, "kill_pid %d %s: %s", (int)pid, name, strerror(errno));
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_free_tcp_port(lua_State *L) {
    int p = ml_free_tcp_port();
    if (p < 0) return mlua_error(L, NULL);
    lua_pushinteger(L, p);
    return 1;
}

static int l_trap_stop_signals(lua_State *L) {
    ml_trap_stop_signals(lua_toboolean(L, 1));
    return 0;
}

static int l_stop_signal_caught(lua_State *L) {
    int s = ml_stop_signal_caught();
    if (!s) { lua_pushnil(L); return 1; }
    lua_pushstring(L, ml_signal_name(s));
    return 1;
}

static int l_self_exe(lua_State *L) {
    char buf[4096];
    if (ml_self_exe(buf, sizeof buf) < 0) { lua_pushnil(L); return 1; }
    lua_pushstring(L, buf);
    return 1;
}

void mlua_open_launcher(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"spawn", l_spawn}, {"poll_readable", l_poll_readable}, {"read_fd", l_read_fd}, {"close_fd", l_close_fd},
        {"try_wait", l_try_wait}, {"kill_pid", l_kill_pid}, {"free_tcp_port", l_free_tcp_port},
        {"trap_stop_signals", l_trap_stop_signals}, {"stop_signal_caught", l_stop_signal_caught},
        {"self_exe", l_self_exe}, {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
}
