/* lua_cuda.c — moonlit.core's CUDA functions: device count and selection,
 * synchronisation, and the caching allocator's statistics.
 *
 *   cuda_available()          true, or false and the reason
 *   cuda_device_count()       visible GPUs (0 without driver or GPU)
 *   cuda_peek_device_count()  the same without initialising CUDA (safe in a
 *                             parent that forks workers); nil if no driver
 *   cuda_current_device()     index of this thread's device
 *   cuda_set_device(dev)      select a device for this thread
 *   cuda_synchronize([dev])   wait for queued work (nil: every device)
 *   cuda_memory_stats(dev)    {allocated, peak, reserved, active_blocks,
 *                             num_allocs, num_cudamalloc, num_cudafree,
 *                             num_pressure_hooks, pressure_freed, pressure_reused}
 *   cuda_reset_peak(dev)      peak <- allocated
 *   cuda_empty_cache(dev)     give wholly free cached segments back
 *   cuda_device_info(dev)     {name, total_mem, free_mem, sm_count,
 *                             compute_capability = "9.0"}
 *   cuda_time(fn, ...)        seconds fn(...) takes, devices synchronised
 *                             before and after (for benchmarks)
 *
 * A device argument is the index N of "cuda:N" (0-based, like the device
 * strings), or such a string, or nil for the current device.  In a build
 * without CUDA every function exists: cuda_available() returns false plus
 * the reason, the counts are 0, and the others raise a clear error. */
#include "mlua.h"
#include <time.h>

#ifdef ML_WITH_CUDA
#include "cuda/runtime.h"
#include "cuda/allocator.h"

static int check_device(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx)) return ml_cuda_current_device();
    if (lua_type(L, idx) == LUA_TSTRING) {
        ml_device d;
        if (ml_device_parse(lua_tostring(L, idx), &d) < 0) return mlua_error(L, NULL);
        if (d.type != ML_CUDA) return luaL_argerror(L, idx, "expected a cuda device");
        return d.index;
    }
    lua_Integer i = luaL_checkinteger(L, idx);
    luaL_argcheck(L, i >= 0 && i < 128, idx, "device index out of range");
    return (int)i;
}

static int l_cuda_available(lua_State *L) {
    int n = ml_cuda_device_count();
    lua_pushboolean(L, n > 0);
    if (n > 0) return 1;
    lua_pushstring(L, ml_cuda_unavailable_reason());
    return 2;
}

static int l_cuda_device_count(lua_State *L) {
    lua_pushinteger(L, ml_cuda_device_count());
    return 1;
}

static int l_cuda_peek_device_count(lua_State *L) {
    int n = ml_cuda_peek_device_count();
    if (n < 0) lua_pushnil(L);
    else lua_pushinteger(L, n);
    return 1;
}

static int l_cuda_set_device(lua_State *L) {
    MLUA_CHECK(L, ml_cuda_set_device(check_device(L, 1)));
    return 0;
}

static int l_cuda_current_device(lua_State *L) {
    lua_pushinteger(L, ml_cuda_current_device());
    return 1;
}

static int l_cuda_synchronize(lua_State *L) {
    MLUA_CHECK(L, ml_cuda_synchronize(lua_isnoneornil(L, 1) ? -1 : check_device(L, 1)));
    return 0;
}

static void set_int(lua_State *L, const char *k, uint64_t v) {
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static int l_cuda_memory_stats(lua_State *L) {
    ml_cuda_mem_stats st;
    MLUA_CHECK(L, ml_cuda_memory_stats(check_device(L, 1), &st));
    lua_createtable(L, 0, 7);
    set_int(L, "allocated", st.allocated);
    set_int(L, "peak", st.peak);
    set_int(L, "reserved", st.reserved);
    set_int(L, "active_blocks", st.active_blocks);
    set_int(L, "num_allocs", st.num_allocs);
    set_int(L, "num_cudamalloc", st.num_cudamalloc);
    set_int(L, "num_cudafree", st.num_cudafree);
    set_int(L, "num_pressure_hooks", st.num_pressure_hooks);
    set_int(L, "pressure_freed", st.pressure_freed);
    set_int(L, "pressure_reused", st.pressure_reused);
    return 1;
}

static int l_cuda_reset_peak(lua_State *L) {
    MLUA_CHECK(L, ml_cuda_reset_peak(check_device(L, 1)));
    return 0;
}

static int l_cuda_empty_cache(lua_State *L) {
    MLUA_CHECK(L, ml_cuda_empty_cache(check_device(L, 1)));
    return 0;
}

/* cuda_time(fn, ...): seconds fn(...) takes, with every device synchronised
 * before and after, so queued GPU work is counted (for benchmarks). */
static int l_cuda_time(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    struct timespec t0, t1;
    MLUA_CHECK(L, ml_cuda_synchronize(-1));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    lua_call(L, lua_gettop(L) - 1, 0);
    MLUA_CHECK(L, ml_cuda_synchronize(-1));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    lua_pushnumber(L, (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    return 1;
}

static int l_cuda_device_info(lua_State *L) {
    ml_cuda_device_info info;
    MLUA_CHECK(L, ml_cuda_get_device_info(check_device(L, 1), &info));
    lua_createtable(L, 0, 5);
    lua_pushstring(L, info.name);
    lua_setfield(L, -2, "name");
    set_int(L, "total_mem", info.total_mem);
    set_int(L, "free_mem", info.free_mem);
    set_int(L, "sm_count", (uint64_t)info.sm_count);
    lua_pushfstring(L, "%d.%d", info.cc_major, info.cc_minor);
    lua_setfield(L, -2, "compute_capability");
    return 1;
}

#else /* built without CUDA */

static const char k_no_cuda[] = "moonlit was built without CUDA";

static int l_cuda_available(lua_State *L) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, k_no_cuda);
    return 2;
}

static int l_cuda_device_count(lua_State *L) {
    lua_pushinteger(L, 0);
    return 1;
}

static int l_cuda_peek_device_count(lua_State *L) {
    lua_pushinteger(L, 0);
    return 1;
}

static int l_cuda_current_device(lua_State *L) {
    lua_pushinteger(L, 0);
    return 1;
}

/* The functions that need a GPU: one error naming the function. */
static int no_cuda(lua_State *L) {
    return luaL_error(L, "%s: %s", lua_tostring(L, lua_upvalueindex(1)), k_no_cuda);
}

#endif

void mlua_open_cuda(lua_State *L) {
    static const luaL_Reg always[] = {
        {"cuda_available", l_cuda_available},
        {"cuda_device_count", l_cuda_device_count},
        {"cuda_peek_device_count", l_cuda_peek_device_count},
        {"cuda_current_device", l_cuda_current_device},
        {NULL, NULL},
    };
    luaL_setfuncs(L, always, 0);
#ifdef ML_WITH_CUDA
    static const luaL_Reg gpu[] = {
        {"cuda_set_device", l_cuda_set_device},
        {"cuda_synchronize", l_cuda_synchronize},
        {"cuda_memory_stats", l_cuda_memory_stats},
        {"cuda_reset_peak", l_cuda_reset_peak},
        {"cuda_empty_cache", l_cuda_empty_cache},
        {"cuda_device_info", l_cuda_device_info},
        {"cuda_time", l_cuda_time},
        {NULL, NULL},
    };
    luaL_setfuncs(L, gpu, 0);
#else
    static const char *const gpu[] = {"cuda_set_device", "cuda_synchronize", "cuda_memory_stats",
                                      "cuda_reset_peak", "cuda_empty_cache", "cuda_device_info",
                                      "cuda_time"};
    for (size_t i = 0; i < sizeof gpu / sizeof gpu[0]; i++) {
        lua_pushstring(L, gpu[i]);
        lua_pushcclosure(L, no_cuda, 1);
        lua_setfield(L, -2, gpu[i]);
    }
#endif
}
