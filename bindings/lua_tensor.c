/* lua_tensor.c — the Tensor userdata: lifetime, fields, views, conversions,
 * construction from Lua tables, and the helpers every binding file shares
 * (declared in mlua.h).  Lua-facing dims and indices are 1-based. */
#include "mlua.h"
#include "autograd.h"
#include "ops.h"
#include "op_registry.h"
#ifdef ML_WITH_CUDA
#include "cuda/allocator.h"
#endif
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- shared helpers ----------------------------------------------------- */

int mlua_error(lua_State *L, const char *op) {
    const char *msg = ml_last_error();
    if (!msg[0]) msg = "unknown error";
    /* host ops name themselves; "normal_: normal_: ..." says nothing more */
    size_t n = op ? strlen(op) : 0;
    if (op && !(strncmp(msg, op, n) == 0 && msg[n] == ':')) return luaL_error(L, "%s: %s", op, msg);
    return luaL_error(L, "%s", msg);
}

/* Lua's collector and tensor memory.  A box is a few bytes of Lua heap
 * holding perhaps megabytes of tensor memory, so Lua's collector, paced by
 * its own heap, would let dead temporaries pile up.  Two things run it for
 * tensors instead:
 *
 * - Pacing by bytes (mlua_push_tensor): the fresh tensor bytes handed to Lua
 *   since the last collection (the debt, per device type) are compared with
 *   the live tensor bytes of that type, as counted by ml_storage_stats --
 *   which include the dead temporaries not collected yet.  CPU memory: a
 *   full collection once the debt reaches a quarter of the live CPU bytes,
 *   so dead temporaries never exceed about a third of what really lives,
 *   and a training step (which allocates a few times its live memory) runs
 *   a few collections whatever the tensor sizes.  CUDA memory: half of the
 *   live CUDA bytes, i.e. fresh bytes as many as all the others (a debt of
 *   all the live bytes could never be reached while the fresh bytes are the
 *   uncollected garbage they are counted in).  This is a safety net only,
 *   for memory the caching allocator could otherwise hand out forever
 *   without running dry.
 * - Memory pressure (CUDA): a freed tensor's device memory stays in the
 *   caching allocator (kernels/cuda/allocator.h), so collecting only
 *   matters when the cache cannot serve a request.  The allocator then
 *   calls gc_pressure_hook (registered in mlua_open_tensor) before it
 *   cudaMallocs, rate-limited to one call per max(64 MiB, reserved / 8)
 *   bytes handed out on the device.
 *
 * Measured on an H200 when CUDA memory was paced like CPU memory (a
 * quarter): 11-13 ms of every SD 1.4 training step (2.3-4 full collections)
 * and 184 ms of a 1.375 s 50-step generation at batch 1 (136 collections),
 * 421 ms of 2.10 s at batch 4 (494); a full collection of moonlit's heap
 * with nothing dead takes ~0.85 ms, more with finalizers.
 *
 * Earlier attempts: asking the incremental collector for work in
 * proportion to the bytes cost 11% of a small training step, in thousands
 * of steps; Lua's generational mode left boxes promoted to the old
 * generation until a major collection (a 10,000-step loop's RSS grew 6 MB).
 *
 * gc_pacing{} changes the two shares and turns the pressure hook off or on
 * (tests/gpu/check_gc_pressure.lua measures the old rule beside the new). */
#if LUA_VERSION_RELEASE_NUM < 50404
/* Older 5.4 releases run a full collection when lua_gc is called from a
 * finalizer; 5.4.4 made it a no-op that returns -1, which collect() needs. */
#error "moonlit needs Lua 5.4.4 or later"
#endif
static _Thread_local size_t gc_debt[2];              /* [ML_CPU], [ML_CUDA] */
static _Thread_local double gc_share[2] = {0.25, 0.5};
/* Young collections between the full ones (gc_pacing{minor_share = s}, 0 =
 * off, the default): with s > 0 Lua's collector runs in generational mode
 * and a young collection -- which visits only the objects made since the
 * last one, so it costs a fraction of a full one -- runs once the fresh
 * bytes since the last collection of either kind reach s of the live bytes.
 * The full collections keep their pacing above and collect what the young
 * ones promoted.  Off by default until measured worth it (docs/gpu.md). */
static _Thread_local size_t gc_minor_debt[2];
static _Thread_local double gc_minor_share;
static _Thread_local long gc_minor_steps;
static _Thread_local double gc_minor_seconds;
#define GC_DEBT_MIN (64 * 1024)
/* How often each trigger ran the collector and how long it took (seconds),
 * and the CUDA storage bytes the pressure hook's collections released:
 * what gc_pacing_stats() reports, so the cost can be measured. */
static _Thread_local long gc_steps, gc_pressure_steps;
static _Thread_local double gc_seconds, gc_pressure_seconds;
static _Thread_local long long gc_pressure_freed;
/* True while collect() runs: a finalizer that pushes a tensor must not
 * start another collection. */
static _Thread_local bool gc_collecting;

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A full collection, counted; false when none ran.  Lua 5.4 ignores lua_gc
 * (returns -1) while its collector runs finalizers, so a push or an
 * allocation inside a finalizer only falls through. */
static bool collect(lua_State *L, bool by_pressure) {
    if (gc_collecting) return false;
    gc_collecting = true;
    double t0 = mono_now();
    int rc = lua_gc(L, LUA_GCCOLLECT);
    double dt = mono_now() - t0;
    gc_collecting = false;
    if (rc < 0) return false;
    gc_debt[ML_CPU] = gc_debt[ML_CUDA] = 0;
    gc_minor_debt[ML_CPU] = gc_minor_debt[ML_CUDA] = 0;
    gc_steps++;
    gc_seconds += dt;
    if (by_pressure) { gc_pressure_steps++; gc_pressure_seconds += dt; }
    return true;
}

/* A young collection (generational mode only), counted apart from the full
 * ones; false when none ran (inside a finalizer). */
static bool collect_young(lua_State *L) {
    if (gc_collecting) return false;
    gc_collecting = true;
    double t0 = mono_now();
    int rc = lua_gc(L, LUA_GCSTEP, 0);
    double dt = mono_now() - t0;
    gc_collecting = false;
    if (rc < 0) return false;
    gc_minor_debt[ML_CPU] = gc_minor_debt[ML_CUDA] = 0;
    gc_minor_steps++;
    gc_minor_seconds += dt;
    return true;
}

/* Whether t's box is its storage's only owner (no view, no retained
 * tensor, not memory lent by someone else): the bytes pacing counts. */
static bool owns_storage_alone(const ml_tensor *t) {
    return t->refcount == 1 && t->storage && t->storage->refcount == 1 && !t->storage->release;
}
/* The pacing debt a storage counts in: CUDA's, or the CPU's for the rest. */
static int debt_type(const ml_storage *s) { return s->device.type == ML_CUDA ? ML_CUDA : ML_CPU; }

int mlua_push_tensor(lua_State *L, ml_tensor *t) {
    if (!t) return mlua_error(L, NULL);
    mlua_tensor_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->t = t;
    luaL_setmetatable(L, MLUA_TENSOR);
    /* only storage this box alone owns: views and retained tensors were counted when created */
    if (owns_storage_alone(t)) {
        int type = debt_type(t->storage);
        gc_debt[type] += t->storage->nbytes;
        gc_minor_debt[type] += t->storage->nbytes;
        if (gc_debt[type] >= GC_DEBT_MIN) {
            long long n, live[2];
            ml_storage_stats(&n, &live[ML_CPU], &live[ML_CUDA]);
            if ((double)gc_debt[type] >= (double)live[type] * gc_share[type]) collect(L, false);
            else if (gc_minor_share > 0 && (double)gc_minor_debt[type] >= (double)live[type] * gc_minor_share)
                collect_young(L);
        }
    }
    return 1;
}

#ifdef ML_WITH_CUDA
/* The caching allocator found no cached block for a request on `device`
 * (allocator.h says when it asks): collect, so dead tensors' memory goes
 * back to the cache before it cudaMallocs more.  It runs on the thread that
 * registered it, the Lua state's, from inside whatever C function is
 * allocating: as an allocation by Lua itself may, it runs finalizers there.
 * ctx is the state's main thread (moonlit runs no coroutines). */
static void gc_pressure_hook(void *ctx, int device) {
    (void)device;
    long long before, after;
    ml_storage_stats(NULL, NULL, &before);
    if (!collect((lua_State *)ctx, true)) return;
    ml_storage_stats(NULL, NULL, &after);
    if (before > after) gc_pressure_freed += before - after;
}

/* __gc of the registry's sentinel: the state is closing, so its hook must
 * go (unless another state has registered its own since). */
static int gc_pressure_unhook(lua_State *L) {
    lua_State *main = lua_touserdata(L, lua_upvalueindex(1));
    if (ml_cuda_pressure_hook_ctx() == main) ml_cuda_set_pressure_hook(NULL, NULL);
    return 0;
}

static void gc_pressure_register(lua_State *L, bool on) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    if (on) ml_cuda_set_pressure_hook(gc_pressure_hook, main);
    else if (ml_cuda_pressure_hook_ctx() == main) ml_cuda_set_pressure_hook(NULL, NULL);
}

static bool gc_pressure_registered(lua_State *L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    bool mine = ml_cuda_pressure_hook_ctx() == lua_tothread(L, -1);
    lua_pop(L, 1);
    return mine;
}
#endif

ml_tensor *mlua_check_tensor(lua_State *L, int idx) {
    mlua_tensor_box *b = luaL_testudata(L, idx, MLUA_TENSOR);
    if (!b) {
        const char *got = luaL_typename(L, idx);
        luaL_argerror(L, idx, lua_pushfstring(L, "tensor expected, got %s", got));
    }
    if (!b->t) luaL_argerror(L, idx, "attempt to use a freed tensor");
    return b->t;
}

ml_tensor *mlua_opt_tensor(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx)) return NULL;
    return mlua_check_tensor(L, idx);
}

ml_tensor *mlua_tensor_or_scalar(lua_State *L, int idx, const ml_tensor *like) {
    if (lua_type(L, idx) == LUA_TNUMBER) {
        ml_dtype dt = like ? like->dtype : ML_F32;
        if (lua_isinteger(L, idx) && like && !ml_dtype_is_float(like->dtype)) dt = like->dtype;
        else if (like && !ml_dtype_is_float(like->dtype)) dt = ML_F32;
        ml_tensor *s = ml_scalar(lua_tonumber(L, idx), dt, like ? like->device : ml_cpu());
        if (!s) mlua_error(L, NULL);
        return s;
    }
    return ml_retain(mlua_check_tensor(L, idx));
}

/* The integer at idx, or an error naming `what`; idx may be a stack slot
 * that is not an argument (a table entry pushed for reading). */
static lua_Integer integer_at(lua_State *L, int idx, const char *what, lua_Integer lo, lua_Integer hi) {
    int isint = 0;
    /* numbers only: Lua would also convert the string "4" */
    lua_Integer v = lua_type(L, idx) == LUA_TNUMBER ? lua_tointegerx(L, idx, &isint) : 0;
    if (!isint) {
        if (lua_type(L, idx) == LUA_TNUMBER)
            luaL_error(L, "%s must be an integer (got %s)", what, luaL_tolstring(L, idx, NULL));
        luaL_error(L, "%s must be an integer (got %s)", what, luaL_typename(L, idx));
    }
    if (v < lo || v > hi)
        luaL_error(L, "%s = %I is out of range (expected %I to %I)", what, (LUAI_UACINT)v, (LUAI_UACINT)lo,
                   (LUAI_UACINT)hi);
    return v;
}

lua_Integer mlua_check_integer(lua_State *L, int idx, const char *what, lua_Integer lo, lua_Integer hi) {
    return integer_at(L, idx, what, lo, hi);
}

lua_Integer mlua_opt_integer(lua_State *L, int idx, const char *what, lua_Integer def, lua_Integer lo,
                             lua_Integer hi) {
    if (lua_isnoneornil(L, idx)) return def;
    return integer_at(L, idx, what, lo, hi);
}

int mlua_check_dim(lua_State *L, int idx, int ndim) {
    lua_Integer d = integer_at(L, idx, "dimension", LUA_MININTEGER, LUA_MAXINTEGER);
    int n = ndim > 0 ? ndim : 1;
    if (d == 0 || d > n || d < -n)
        luaL_argerror(L, idx, lua_pushfstring(L, "dimension %I out of range (tensor has %d dims; dims are 1-based, -1 is the last)",
                                              (LUAI_UACINT)d, ndim));
    return d > 0 ? (int)d - 1 : (int)(d + n);
}

int mlua_check_shape(lua_State *L, int idx, int64_t *shape) {
    int n = 0;
    if (lua_istable(L, idx)) {
        n = (int)luaL_len(L, idx);
        if (n > ML_MAX_DIMS) luaL_argerror(L, idx, "too many dimensions (at most 8)");
        for (int i = 0; i < n; i++) {
            lua_geti(L, idx, i + 1);
            /* a float too large for an integer (2^63) is refused, not cast */
            shape[i] = integer_at(L, -1, "shape entry", LUA_MININTEGER, LUA_MAXINTEGER);
            lua_pop(L, 1);
        }
        return n;
    }
    int top = lua_gettop(L);
    for (int i = idx; i <= top && lua_type(L, i) == LUA_TNUMBER; i++) {
        if (n >= ML_MAX_DIMS) luaL_argerror(L, i, "too many dimensions (at most 8)");
        shape[n++] = integer_at(L, i, "size", LUA_MININTEGER, LUA_MAXINTEGER);
    }
    return n;
}

static int opt_field(lua_State *L, int idx, const char *key) {
    if (idx == 0 || !lua_istable(L, idx)) return 0;
    lua_getfield(L, idx, key);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    return 1;
}

const char *mlua_opt_field_string(lua_State *L, int idx, const char *key, const char *def) {
    if (!opt_field(L, idx, key)) return def;
    if (!lua_isstring(L, -1)) luaL_error(L, "option '%s' must be a string", key);
    const char *s = lua_tostring(L, -1);
    lua_pop(L, 1);   /* the options table keeps the string alive */
    return s;
}

const char *mlua_push_shown(lua_State *L, const char *s, size_t n) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n; i++) {
        if (s[i]) luaL_addchar(&b, s[i]);
        else luaL_addstring(&b, "\\0");
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

const char *mlua_check_path(lua_State *L, int idx, const char *what) {
    size_t n;
    const char *s;
    /* an argument keeps Lua's usual "bad argument #1 ... (string expected)" */
    if (idx > 0) s = luaL_checklstring(L, idx, &n);
    else if (lua_type(L, idx) == LUA_TSTRING) s = lua_tolstring(L, idx, &n);
    else return luaL_error(L, "%s must be a string (got %s)", what, luaL_typename(L, idx)), NULL;
    if (memchr(s, 0, n))
        luaL_error(L, "%s '%s' holds a NUL byte (at byte %d): a file name cannot contain one (it would be cut "
                   "short there and name another file)", what, mlua_push_shown(L, s, n), (int)strlen(s));
    return s;
}

const char *mlua_opt_path(lua_State *L, int idx, const char *what, const char *def) {
    if (lua_isnoneornil(L, idx)) return def;
    return mlua_check_path(L, idx, what);
}

const char *mlua_opt_field_path(lua_State *L, int idx, const char *op, const char *key, const char *def) {
    if (!opt_field(L, idx, key)) return def;
    char what[96];
    snprintf(what, sizeof what, "%s: option '%s'", op, key);
    const char *s = mlua_check_path(L, -1, what);
    lua_pop(L, 1);   /* the options table keeps the string alive */
    return s;
}

double mlua_opt_field_number(lua_State *L, int idx, const char *key, double def) {
    if (!opt_field(L, idx, key)) return def;
    if (!lua_isnumber(L, -1)) luaL_error(L, "option '%s' must be a number", key);
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

lua_Integer mlua_opt_field_integer(lua_State *L, int idx, const char *key, lua_Integer def, lua_Integer lo,
                                   lua_Integer hi) {
    if (!opt_field(L, idx, key)) return def;
    char what[80];
    snprintf(what, sizeof what, "option '%s'", key);
    lua_Integer v = integer_at(L, -1, what, lo, hi);
    lua_pop(L, 1);
    return v;
}

int mlua_opt_field_bool(lua_State *L, int idx, const char *key, int def) {
    if (!opt_field(L, idx, key)) return def;
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

int mlua_opt_field_boolean(lua_State *L, int idx, const char *fn, const char *key, int def) {
    if (!opt_field(L, idx, key)) return def;
    int type = lua_type(L, -1), v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (type != LUA_TBOOLEAN) return luaL_error(L, "%s: %s must be a boolean (got %s)", fn, key, lua_typename(L, type));
    return v;
}

ml_dtype mlua_opt_dtype(lua_State *L, int idx, ml_dtype def) {
    const char *s = mlua_opt_field_string(L, idx, "dtype", NULL);
    if (!s) return def;
    int d = ml_dtype_parse(s);
    if (d < 0) luaL_error(L, "unknown dtype '%s' (expected f32, f64, f16, bf16, i32, i64, u8 or bool)", s);
    return (ml_dtype)d;
}

ml_device mlua_opt_device(lua_State *L, int idx, ml_device def) {
    const char *s = mlua_opt_field_string(L, idx, "device", NULL);
    if (!s) return def;
    ml_device d;
    if (ml_device_parse(s, &d) < 0) mlua_error(L, NULL);
    return d;
}

/* ---- lifetime ----------------------------------------------------------- */

/* gc_pacing{credit_freed = true}: t:free() of a box that was its storage's
 * only owner takes the bytes off the pacing debt too, since the debt stands
 * for garbage the collector has yet to find and memory freed by hand is
 * none.  Without it, a generation loop whose model forwards free their
 * intermediates ran about 7 full collections per denoising step (363,
 * 180 ms of a 1.09 s 50-step generation at batch 4 on an H100).  On by
 * default since measured on an H100 (2026-12-07): generation's collector
 * time went from 77 to 22 ms at batch 1 (91 collections to 12; 0.561 to
 * 0.428 s) and from 218 to 45 ms at batch 4; the bf16-mixed training
 * step's from 4.7 to 2.8 ms, its peak from 17.72 to 17.76 GiB (fewer debt
 * collections leave more garbage to the pressure hook). */
static _Thread_local bool gc_credit_freed = true;
static void debt_credit(size_t *debt, size_t n) { *debt = *debt > n ? *debt - n : 0; }

static int t_free(lua_State *L) {
    mlua_tensor_box *b = luaL_checkudata(L, 1, MLUA_TENSOR);
    ml_tensor *t = b->t;
    if (!t) return 0;
    if (gc_credit_freed && owns_storage_alone(t)) {
        int type = debt_type(t->storage);
        debt_credit(&gc_debt[type], t->storage->nbytes);
        debt_credit(&gc_minor_debt[type], t->storage->nbytes);
    }
    ml_release(t);
    b->t = NULL;
    return 0;
}

static int t_is_freed(lua_State *L) {
    mlua_tensor_box *b = luaL_checkudata(L, 1, MLUA_TENSOR);
    lua_pushboolean(L, b->t == NULL);
    return 1;
}

static int t_tostring(lua_State *L) {
    mlua_tensor_box *b = luaL_checkudata(L, 1, MLUA_TENSOR);
    if (!b->t) { lua_pushliteral(L, "tensor(<freed>)"); return 1; }
    char *s = ml_tensor_repr(b->t);
    if (!s) return mlua_error(L, "tostring");
    lua_pushstring(L, s);
    free(s);
    return 1;
}

/* ---- queries ------------------------------------------------------------ */

static int t_size(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (lua_isnoneornil(L, 2)) {
        lua_createtable(L, t->ndim, 0);
        for (int i = 0; i < t->ndim; i++) { lua_pushinteger(L, t->shape[i]); lua_rawseti(L, -2, i + 1); }
        return 1;
    }
    int d = mlua_check_dim(L, 2, t->ndim);
    lua_pushinteger(L, t->ndim ? t->shape[d] : 1);
    return 1;
}

static int t_stride(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (lua_isnoneornil(L, 2)) {
        lua_createtable(L, t->ndim, 0);
        for (int i = 0; i < t->ndim; i++) { lua_pushinteger(L, t->strides[i]); lua_rawseti(L, -2, i + 1); }
        return 1;
    }
    int d = mlua_check_dim(L, 2, t->ndim);
    lua_pushinteger(L, t->strides[d]);
    return 1;
}

static int t_dim(lua_State *L) { lua_pushinteger(L, mlua_check_tensor(L, 1)->ndim); return 1; }
static int t_numel(lua_State *L) { lua_pushinteger(L, ml_numel(mlua_check_tensor(L, 1))); return 1; }
static int t_is_contiguous(lua_State *L) { lua_pushboolean(L, ml_is_contiguous(mlua_check_tensor(L, 1))); return 1; }

static int t_item(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    double v;
    if (ml_item(t, &v) < 0) return mlua_error(L, NULL);
    if (!ml_dtype_is_float(t->dtype) && t->dtype != ML_BOOL) lua_pushinteger(L, (lua_Integer)v);
    else if (t->dtype == ML_BOOL) lua_pushboolean(L, v != 0);
    else lua_pushnumber(L, v);
    return 1;
}

static void push_elem(lua_State *L, const ml_tensor *t, double v) {
    if (t->dtype == ML_BOOL) lua_pushboolean(L, v != 0);
    else if (!ml_dtype_is_float(t->dtype)) lua_pushinteger(L, (lua_Integer)v);
    else lua_pushnumber(L, v);
}

static void totable_rec(lua_State *L, const ml_tensor *t, const double *v, int d, int64_t *pos) {
    lua_createtable(L, (int)t->shape[d], 0);
    for (int64_t i = 0; i < t->shape[d]; i++) {
        if (d == t->ndim - 1) push_elem(L, t, v[(*pos)++]);
        else totable_rec(L, t, v, d + 1, pos);
        lua_rawseti(L, -2, i + 1);
    }
}

static int t_totable(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    double *v = ml_to_doubles(t);
    if (!v) return mlua_error(L, "totable");
    if (t->ndim == 0) push_elem(L, t, v[0]);
    else { int64_t pos = 0; totable_rec(L, t, v, 0, &pos); }
    free(v);
    return 1;
}

/* ---- fields: t.grad, t.requires_grad, t.dtype, t.device, t.ndim ------- */

static int t_index(lua_State *L) {
    mlua_tensor_box *b = luaL_checkudata(L, 1, MLUA_TENSOR);
    if (lua_type(L, 2) == LUA_TSTRING) {
        const char *k = lua_tostring(L, 2);
        /* methods first */
        lua_getmetatable(L, 1);
        lua_getfield(L, -1, "__methods");
        lua_pushvalue(L, 2);
        lua_rawget(L, -2);
        if (!lua_isnil(L, -1)) return 1;
        lua_pop(L, 3);
        if (!b->t) return luaL_error(L, "attempt to use a freed tensor (field '%s')", k);
        ml_tensor *t = b->t;
        if (strcmp(k, "grad") == 0) {
            if (!t->grad) { lua_pushnil(L); return 1; }
            return mlua_push_tensor(L, ml_retain(t->grad));
        }
        if (strcmp(k, "requires_grad") == 0) { lua_pushboolean(L, t->requires_grad); return 1; }
        if (strcmp(k, "is_leaf") == 0) { lua_pushboolean(L, t->grad_fn == NULL); return 1; }
        if (strcmp(k, "grad_fn") == 0) {
            if (t->grad_fn) lua_pushstring(L, t->grad_fn->name); else lua_pushnil(L);
            return 1;
        }
        if (strcmp(k, "dtype") == 0) { lua_pushstring(L, ml_dtype_short(t->dtype)); return 1; }
        if (strcmp(k, "device") == 0) {
            char buf[32]; ml_device_str(t->device, buf, sizeof buf);
            lua_pushstring(L, buf); return 1;
        }
        if (strcmp(k, "ndim") == 0) { lua_pushinteger(L, t->ndim); return 1; }
        if (strcmp(k, "is_cuda") == 0) { lua_pushboolean(L, t->device.type == ML_CUDA); return 1; }
        /* nil here would let a misspelt method surface later as "attempt to
         * call a nil value" far from the typo; code that probes for a method
         * asks rawget(ml.Tensor.__methods, k) */
        return luaL_error(L, "tensor has no field or method '%s'", k);
    }
    if (lua_type(L, 2) == LUA_TNUMBER) {   /* t[i] selects along the first dim (Torch7 style) */
        ml_tensor *t = mlua_check_tensor(L, 1);
        lua_Integer i = integer_at(L, 2, "tensor index", LUA_MININTEGER, LUA_MAXINTEGER);
        if (t->ndim == 0) return luaL_error(L, "cannot index a 0-dim tensor");
        if (i == 0 || i > t->shape[0] || i < -t->shape[0])
            return luaL_error(L, "index %I out of range for dim 1 of size %I", (LUAI_UACINT)i,
                              (LUAI_UACINT)t->shape[0]);
        return mlua_push_tensor(L, ml_select(t, 0, i > 0 ? i - 1 : i + t->shape[0]));
    }
    return luaL_error(L, "a tensor is indexed by an integer (t[i]) or a field or method name, not a %s",
                      luaL_typename(L, 2));
}

static int t_newindex(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "requires_grad") == 0) {
        bool want = lua_toboolean(L, 3);
        if (want && !ml_dtype_is_float(t->dtype))
            return luaL_error(L, "only floating point tensors can require gradients (dtype %s)", ml_dtype_short(t->dtype));
        if (!want && t->grad_fn)
            return luaL_error(L, "requires_grad can only be cleared on leaf tensors (use detach())");
        t->requires_grad = want;
        return 0;
    }
    if (strcmp(k, "grad") == 0) {
        ml_tensor *g = mlua_opt_tensor(L, 3);
        if (g && !ml_same_shape(g, t)) {
            char b1[128], b2[128];
            return luaL_error(L, "assigned grad has shape %s but the tensor has shape %s",
                              ml_shape_str(g, b1, sizeof b1), ml_shape_str(t, b2, sizeof b2));
        }
        ml_release(t->grad);
        t->grad = g ? ml_retain(g) : NULL;
        return 0;
    }
    return luaL_error(L, "cannot set field '%s' of a tensor", k);
}

/* ---- views -------------------------------------------------------------- */

static int t_view(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int64_t shape[ML_MAX_DIMS];
    int n = mlua_check_shape(L, 2, shape);
    return mlua_push_tensor(L, ml_view(t, n, shape));
}

static int t_permute(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int perm[ML_MAX_DIMS];
    int n = 0;
    if (lua_istable(L, 2)) {
        n = (int)luaL_len(L, 2);
        for (int i = 0; i < n && i < ML_MAX_DIMS; i++) {
            lua_geti(L, 2, i + 1);
            perm[i] = mlua_check_dim(L, lua_gettop(L), t->ndim);
            lua_pop(L, 1);
        }
    } else {
        for (int i = 2; i <= lua_gettop(L) && n < ML_MAX_DIMS; i++) perm[n++] = mlua_check_dim(L, i, t->ndim);
    }
    if (n != t->ndim) return luaL_error(L, "permute: expected %d dims, got %d", t->ndim, n);
    return mlua_push_tensor(L, ml_permute(t, perm));
}

static int t_transpose(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (lua_isnoneornil(L, 2)) {
        if (t->ndim != 2) return luaL_error(L, "t(): expects a 2-D tensor (got %d dims); use transpose(d0, d1)", t->ndim);
        return mlua_push_tensor(L, ml_transpose(t, 0, 1));
    }
    int a = mlua_check_dim(L, 2, t->ndim), b = mlua_check_dim(L, 3, t->ndim);
    return mlua_push_tensor(L, ml_transpose(t, a, b));
}

static int t_narrow(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (t->ndim == 0) return luaL_error(L, "narrow: cannot narrow a 0-dim tensor");
    int d = mlua_check_dim(L, 2, t->ndim);
    lua_Integer start = mlua_check_integer(L, 3, "narrow: start", LUA_MININTEGER, LUA_MAXINTEGER);
    lua_Integer len = mlua_check_integer(L, 4, "narrow: length", LUA_MININTEGER, LUA_MAXINTEGER);
    if (start == 0) return luaL_argerror(L, 3, "start is 1-based (got 0)");
    /* checked here so the message speaks of the caller's 1-based start;
     * len > size - s0 rather than s0 + len > size, which may overflow */
    int64_t size = t->shape[d], s0 = start > 0 ? start - 1 : start + size;
    if (s0 < 0 || s0 > size || len < 0 || len > size - s0)
        return luaL_error(L, "narrow: start %I length %I out of range for dim %d of size %I",
                          (LUAI_UACINT)start, (LUAI_UACINT)len, d + 1, (LUAI_UACINT)size);
    return mlua_push_tensor(L, ml_narrow(t, d, s0, len));
}

static int t_select(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (t->ndim == 0) return luaL_error(L, "select: cannot index a 0-dim tensor");
    int d = mlua_check_dim(L, 2, t->ndim);
    lua_Integer i = mlua_check_integer(L, 3, "select: index", LUA_MININTEGER, LUA_MAXINTEGER);
    if (i == 0) return luaL_argerror(L, 3, "index is 1-based (got 0)");
    if (i > t->shape[d] || i < -t->shape[d])
        return luaL_error(L, "select: index %I out of range for dim %d of size %I", (LUAI_UACINT)i, d + 1,
                          (LUAI_UACINT)t->shape[d]);
    return mlua_push_tensor(L, ml_select(t, d, i > 0 ? i - 1 : i + t->shape[d]));
}

static int t_expand(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int64_t shape[ML_MAX_DIMS];
    int n = mlua_check_shape(L, 2, shape);
    return mlua_push_tensor(L, ml_expand(t, n, shape));
}

static int t_squeeze(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int d = lua_isnoneornil(L, 2) ? ML_ALL_DIMS : mlua_check_dim(L, 2, t->ndim);
    return mlua_push_tensor(L, ml_squeeze(t, d));
}

static int t_unsqueeze(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    lua_Integer d = mlua_check_integer(L, 2, "unsqueeze: dimension", LUA_MININTEGER, LUA_MAXINTEGER);
    int n = t->ndim + 1;
    if (d == 0 || d > n || d < -n) return luaL_argerror(L, 2, "dimension out of range (1-based)");
    return mlua_push_tensor(L, ml_unsqueeze(t, d > 0 ? (int)d - 1 : (int)(d + n)));
}

static int t_contiguous(lua_State *L) { return mlua_push_tensor(L, ml_contiguous(mlua_check_tensor(L, 1))); }
static int t_clone(lua_State *L) { return mlua_push_tensor(L, ml_clone(mlua_check_tensor(L, 1))); }
static int t_detach(lua_State *L) { return mlua_push_tensor(L, ml_detach(mlua_check_tensor(L, 1))); }

/* t:to("cuda"), t:to("bf16"), t:to{device=, dtype=}, t:to(other_tensor) */
static int t_to(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_dtype dt = t->dtype;
    ml_device dev = t->device;
    if (lua_istable(L, 2)) {
        dt = mlua_opt_dtype(L, 2, dt);
        dev = mlua_opt_device(L, 2, dev);
    } else if (luaL_testudata(L, 2, MLUA_TENSOR)) {
        ml_tensor *o = mlua_check_tensor(L, 2);
        dt = o->dtype; dev = o->device;
    } else {
        for (int i = 2; i <= lua_gettop(L); i++) {
            const char *s = luaL_checkstring(L, i);
            int d = ml_dtype_parse(s);
            if (d >= 0) dt = (ml_dtype)d;
            else if (ml_device_parse(s, &dev) < 0)
                return luaL_error(L, "to: '%s' is neither a dtype (f32, bf16, ...) nor a device (cpu, cuda:N)", s);
        }
    }
    ml_tensor *a = ml_to_device(t, dev);
    if (!a) return mlua_error(L, "to");
    ml_tensor *b = ml_to_dtype(a, dt);
    ml_release(a);
    return mlua_push_tensor(L, b);
}

static int t_to_dtype_up(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    return mlua_push_tensor(L, ml_to_dtype(t, (ml_dtype)lua_tointeger(L, lua_upvalueindex(1))));
}

static int t_cpu(lua_State *L) { return mlua_push_tensor(L, ml_to_device(mlua_check_tensor(L, 1), ml_cpu())); }

static int t_cuda(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    ml_device d = {ML_CUDA, (int8_t)mlua_opt_integer(L, 2, "cuda: device index", 0, 0, 127)};
    return mlua_push_tensor(L, ml_to_device(t, d));
}

/* ---- in-place basics ---------------------------------------------------- */

static int t_copy_(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1), *s = mlua_check_tensor(L, 2);
    if (ml_inplace_copy_(t, s) < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int t_fill_(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (ml_inplace_fill_(t, luaL_checknumber(L, 2)) < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int t_zero_(lua_State *L) {
    if (ml_inplace_zero_(mlua_check_tensor(L, 1)) < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int t_requires_grad_(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    bool on = lua_isnone(L, 2) ? true : lua_toboolean(L, 2);
    if (on && !ml_dtype_is_float(t->dtype))
        return luaL_error(L, "only floating point tensors can require gradients (dtype %s)", ml_dtype_short(t->dtype));
    t->requires_grad = on;
    lua_settop(L, 1);
    return 1;
}

/* ---- construction ------------------------------------------------------- */

/* Walk a nested Lua table to find its shape (first pass) and values. */
static int table_shape(lua_State *L, int idx, int d, int *ndim, int64_t *shape) {
    int n = (int)luaL_len(L, idx);
    if (d >= ML_MAX_DIMS) return luaL_error(L, "tensor: table nested too deeply (max 8 dims)");
    if (d >= *ndim) { *ndim = d + 1; shape[d] = n; }
    else if (shape[d] != n) return luaL_error(L, "tensor: ragged nested table (dim %d has sizes %d and %d)",
                                              d + 1, (int)shape[d], n);
    if (n == 0) return 0;
    lua_geti(L, idx, 1);
    int sub = lua_istable(L, -1);
    lua_pop(L, 1);
    for (int i = 1; i <= n; i++) {
        lua_geti(L, idx, i);
        if (lua_istable(L, -1) != sub) return luaL_error(L, "tensor: ragged nested table (mixed numbers and tables)");
        if (sub) table_shape(L, lua_gettop(L), d + 1, ndim, shape);
        else if (d + 1 < *ndim) return luaL_error(L, "tensor: ragged nested table");
        lua_pop(L, 1);
    }
    return 0;
}

static void table_fill(lua_State *L, int idx, double *out, int64_t *pos, bool *any_float) {
    int n = (int)luaL_len(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_geti(L, idx, i);
        if (lua_istable(L, -1)) table_fill(L, lua_gettop(L), out, pos, any_float);
        else if (lua_isboolean(L, -1)) out[(*pos)++] = lua_toboolean(L, -1);
        else {
            if (!lua_isnumber(L, -1)) luaL_error(L, "tensor: expected numbers, got %s", luaL_typename(L, -1));
            if (!lua_isinteger(L, -1)) *any_float = true;
            out[(*pos)++] = lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
    }
}

/* ml.tensor(table_or_number, {dtype=, device=, requires_grad=}) */
/* The requires_grad option of a constructor, refused for non-float dtypes. */
static int opt_requires_grad(lua_State *L, int opts, ml_dtype dt) {
    int on = mlua_opt_field_bool(L, opts, "requires_grad", 0);
    if (on && !ml_dtype_is_float(dt))
        luaL_error(L, "only floating point tensors can require gradients (dtype %s)", ml_dtype_short(dt));
    return on;
}

static int l_tensor(lua_State *L) {
    int opts = lua_istable(L, 2) ? 2 : 0;
    ml_dtype dt = mlua_opt_dtype(L, opts, ML_F32);
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    int rg = opt_requires_grad(L, opts, dt);
    ml_tensor *t;
    if (lua_type(L, 1) == LUA_TNUMBER || lua_isboolean(L, 1)) {
        double v = lua_isboolean(L, 1) ? lua_toboolean(L, 1) : lua_tonumber(L, 1);
        t = ml_from_doubles(&v, 0, NULL, dt);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        int ndim = 0;
        int64_t shape[ML_MAX_DIMS];
        table_shape(L, 1, 0, &ndim, shape);
        int64_t n = 1;
        for (int i = 0; i < ndim; i++) n *= shape[i];
        /* Lua owns the scratch buffer: table_fill may raise an error */
        double *v = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *v, 0);
        int64_t pos = 0;
        bool any_float = false;
        table_fill(L, 1, v, &pos, &any_float);
        t = ml_from_doubles(v, ndim, shape, dt);
        lua_pop(L, 1);
    }
    if (t && dev.type != ML_CPU) {
        ml_tensor *g = ml_to_device(t, dev);
        ml_release(t);
        t = g;
    }
    if (t && rg) t->requires_grad = true;
    return mlua_push_tensor(L, t);
}

/* zeros/ones/empty/full(shape..., [value], opts) share one reader. */
static int make_filled(lua_State *L, int mode) {
    int64_t shape[ML_MAX_DIMS];
    int n = mlua_check_shape(L, 1, shape);
    int next = lua_istable(L, 1) ? 2 : 1 + n;
    double v = mode == 1 ? 1.0 : 0.0;
    if (mode == 3) v = luaL_checknumber(L, next++);
    int opts = lua_istable(L, next) ? next : 0;
    ml_dtype dt = mlua_opt_dtype(L, opts, ML_F32);
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    int rg = opt_requires_grad(L, opts, dt);
    ml_tensor *t = mode == 2 ? ml_empty(n, shape, dt, dev) : ml_full(n, shape, v, dt, dev);
    if (t && rg) t->requires_grad = true;
    return mlua_push_tensor(L, t);
}
static int l_zeros(lua_State *L) { return make_filled(L, 0); }
static int l_ones(lua_State *L) { return make_filled(L, 1); }
static int l_empty(lua_State *L) { return make_filled(L, 2); }
static int l_full(lua_State *L) { return make_filled(L, 3); }

/* zeros_like(t, opts) etc.: same shape, dtype and device unless overridden. */
static int make_like(lua_State *L, int mode) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    int next = 2;
    double v = mode == 1 ? 1.0 : 0.0;
    if (mode == 3) v = luaL_checknumber(L, next++);
    int opts = lua_istable(L, next) ? next : 0;
    ml_dtype dt = mlua_opt_dtype(L, opts, t->dtype);
    ml_device dev = mlua_opt_device(L, opts, t->device);
    ml_tensor *o = mode == 2 ? ml_empty(t->ndim, t->shape, dt, dev) : ml_full(t->ndim, t->shape, v, dt, dev);
    return mlua_push_tensor(L, o);
}
static int l_zeros_like(lua_State *L) { return make_like(L, 0); }
static int l_ones_like(lua_State *L) { return make_like(L, 1); }
static int l_empty_like(lua_State *L) { return make_like(L, 2); }
static int l_full_like(lua_State *L) { return make_like(L, 3); }

/* arange(end) / arange(start, end[, step], opts): end exclusive as in PyTorch. */
static int l_arange(lua_State *L) {
    int nnum = 0;
    double a[3];
    while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) { a[nnum] = lua_tonumber(L, nnum + 1); nnum++; }
    if (nnum == 0) return luaL_error(L, "arange: expected (end) or (start, end[, step])");
    bool all_int = true;
    for (int i = 1; i <= nnum; i++) if (!lua_isinteger(L, i)) all_int = false;
    double start = nnum == 1 ? 0 : a[0], end = nnum == 1 ? a[0] : a[1], step = nnum == 3 ? a[2] : 1;
    int opts = lua_istable(L, nnum + 1) ? nnum + 1 : 0;
    ml_dtype dt = mlua_opt_dtype(L, opts, all_int ? ML_I64 : ML_F32);
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    return mlua_push_tensor(L, ml_arange(start, end, step, dt, dev));
}

/* gc_pacing_stats() -> {steps =, ms =, pressure_steps =, pressure_ms =,
 * pressure_freed_bytes =}: full collections run for tensor memory (see
 * mlua_push_tensor), cumulative.  steps and ms count them all; the
 * pressure_ fields those the CUDA allocator asked for, and the CUDA tensor
 * bytes they released. */
static int l_gc_pacing_stats(lua_State *L) {
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, gc_minor_steps); lua_setfield(L, -2, "minor_steps");
    lua_pushnumber(L, gc_minor_seconds * 1e3); lua_setfield(L, -2, "minor_ms");
    lua_pushinteger(L, gc_steps); lua_setfield(L, -2, "steps");
    lua_pushnumber(L, gc_seconds * 1e3); lua_setfield(L, -2, "ms");
    lua_pushinteger(L, gc_pressure_steps); lua_setfield(L, -2, "pressure_steps");
    lua_pushnumber(L, gc_pressure_seconds * 1e3); lua_setfield(L, -2, "pressure_ms");
    lua_pushinteger(L, gc_pressure_freed); lua_setfield(L, -2, "pressure_freed_bytes");
    return 1;
}

static double opt_share(lua_State *L, const char *key, double def) {
    double v = mlua_opt_field_number(L, 1, key, def);
    if (!(v > 0 && v <= 64))
        luaL_error(L, "gc_pacing: %s must be a number above 0 and at most 64 (got %f)", key, v);
    return v;
}

/* gc_pacing([{cpu_share =, cuda_share =, minor_share =, credit_freed =, pressure =, pressure_share =}])
 * -> the settings as they were: a full collection once the fresh tensor
 * bytes of a device type reach that share of its live bytes (0.25 and 0.5
 * by default); whether the CUDA allocator's pressure hook collects for this
 * state (true by default where moonlit has CUDA, always false without);
 * and the share of the allocator's reserve handed out between two calls of
 * the hook (1/8; nil without CUDA); credit_freed (true): whether t:free()
 * takes its bytes off the fresh count (see t_free). */
static int l_gc_pacing(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
    bool pressure = false;
#ifdef ML_WITH_CUDA
    pressure = gc_pressure_registered(L);
#endif
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, gc_share[ML_CPU]); lua_setfield(L, -2, "cpu_share");
    lua_pushnumber(L, gc_share[ML_CUDA]); lua_setfield(L, -2, "cuda_share");
    lua_pushboolean(L, pressure); lua_setfield(L, -2, "pressure");
    lua_pushnumber(L, gc_minor_share); lua_setfield(L, -2, "minor_share");
    lua_pushboolean(L, gc_credit_freed); lua_setfield(L, -2, "credit_freed");
#ifdef ML_WITH_CUDA
    double pressure_share = ml_cuda_set_pressure_share(-1);   /* reads it */
    lua_pushnumber(L, pressure_share); lua_setfield(L, -2, "pressure_share");
#endif
    if (lua_isnoneornil(L, 1)) return 1;
    /* every option checked before any is applied */
    double cpu = opt_share(L, "cpu_share", gc_share[ML_CPU]);
    double cuda = opt_share(L, "cuda_share", gc_share[ML_CUDA]);
    double minor = mlua_opt_field_number(L, 1, "minor_share", gc_minor_share);
    if (!(minor >= 0 && minor <= 64))
        return luaL_error(L, "gc_pacing: minor_share must be a number from 0 (off) to 64 (got %f)", minor);
    int want = mlua_opt_field_boolean(L, 1, "gc_pacing", "pressure", -1);   /* -1: leave the hook as it is */
    bool credit = mlua_opt_field_boolean(L, 1, "gc_pacing", "credit_freed", gc_credit_freed);
#ifdef ML_WITH_CUDA
    double ps = mlua_opt_field_number(L, 1, "pressure_share", pressure_share);
    if (!(ps >= 0 && ps <= 1))
        return luaL_error(L, "gc_pacing: pressure_share must be a number from 0 to 1 (got %f)", ps);
#endif
    gc_share[ML_CPU] = cpu;
    gc_share[ML_CUDA] = cuda;
    if ((minor > 0) != (gc_minor_share > 0)) lua_gc(L, minor > 0 ? LUA_GCGEN : LUA_GCINC, 0, 0);
    gc_minor_share = minor;
    gc_minor_debt[ML_CPU] = gc_minor_debt[ML_CUDA] = 0;
    gc_credit_freed = credit;
#ifdef ML_WITH_CUDA
    if (want >= 0) gc_pressure_register(L, want);
    ml_cuda_set_pressure_share(ps);
#else
    (void)want;
#endif
    return 1;
}

/* memory_stats() -> {storages =, cpu_bytes =, cuda_bytes =} (live, owned by tensors) */
static int l_memory_stats(lua_State *L) {
    long long n, cpu, cuda;
    ml_storage_stats(&n, &cpu, &cuda);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, n); lua_setfield(L, -2, "storages");
    lua_pushinteger(L, cpu); lua_setfield(L, -2, "cpu_bytes");
    lua_pushinteger(L, cuda); lua_setfield(L, -2, "cuda_bytes");
    return 1;
}

static int l_is_tensor(lua_State *L) {
    mlua_tensor_box *b = luaL_testudata(L, 1, MLUA_TENSOR);
    lua_pushboolean(L, b != NULL);
    return 1;
}

static const luaL_Reg tensor_methods[] = {
    /* the registry's view and copy ops (host/op_registry.h, where METHOD): t_<lua> */
#define TENSOR_METHOD_OF_OP(name, grad, cuda, lua, where) ML_OP_IF_TENSOR_METHOD(where, {#lua, t_##lua},)
    ML_OP_LIST(TENSOR_METHOD_OF_OP)
#undef TENSOR_METHOD_OF_OP
    /* their other names, the conversions (the registry's to_dtype and
     * to_device), and what is no op */
    {"reshape", t_view}, {"transpose", t_transpose}, {"t", t_transpose}, {"squeeze", t_squeeze},
    {"to", t_to}, {"cpu", t_cpu}, {"cuda", t_cuda},
    {"free", t_free}, {"is_freed", t_is_freed},
    {"size", t_size}, {"shape", t_size}, {"stride", t_stride}, {"dim", t_dim}, {"numel", t_numel},
    {"is_contiguous", t_is_contiguous}, {"item", t_item}, {"totable", t_totable}, {"detach", t_detach},
    {"copy_", t_copy_}, {"fill_", t_fill_}, {"zero_", t_zero_}, {"requires_grad_", t_requires_grad_},
    {NULL, NULL},
};

static const struct { const char *name; ml_dtype dt; } dtype_methods[] = {
    {"float", ML_F32}, {"double", ML_F64}, {"half", ML_F16}, {"bf16", ML_BF16}, {"f32", ML_F32},
    {"f64", ML_F64}, {"f16", ML_F16}, {"int", ML_I32}, {"long", ML_I64}, {"byte", ML_U8}, {"bool", ML_BOOL},
};

static const luaL_Reg tensor_funcs[] = {
    {"tensor", l_tensor}, {"zeros", l_zeros}, {"ones", l_ones}, {"empty", l_empty}, {"full", l_full},
    {"zeros_like", l_zeros_like}, {"ones_like", l_ones_like}, {"empty_like", l_empty_like},
    {"full_like", l_full_like}, {"arange", l_arange}, {"is_tensor", l_is_tensor},
    {"memory_stats", l_memory_stats}, {"gc_pacing_stats", l_gc_pacing_stats}, {"gc_pacing", l_gc_pacing},
    {NULL, NULL},
};

void mlua_open_tensor(lua_State *L) {
    /* metatable with a __methods table the other binding files (and the Lua
     * library) extend; __index consults it before fields. */
    luaL_newmetatable(L, MLUA_TENSOR);
    lua_newtable(L);
    luaL_setfuncs(L, tensor_methods, 0);
    for (size_t i = 0; i < sizeof dtype_methods / sizeof dtype_methods[0]; i++) {
        lua_pushinteger(L, dtype_methods[i].dt);
        lua_pushcclosure(L, t_to_dtype_up, 1);
        lua_setfield(L, -2, dtype_methods[i].name);
    }
    lua_setfield(L, -2, "__methods");
    lua_pushcfunction(L, t_index); lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, t_newindex); lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, t_free); lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, t_free); lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, t_tostring); lua_setfield(L, -2, "__tostring");
    lua_setfield(L, -2, "Tensor");   /* core.Tensor = the metatable */
    luaL_setfuncs(L, tensor_funcs, 0);
#ifdef ML_WITH_CUDA
    /* The pressure hook collects this state's garbage (see gc_debt); a
     * sentinel in the registry removes it when the state closes (one per
     * state: a second one, collected, would remove the hook early). */
    gc_pressure_register(L, true);
    if (lua_getfield(L, LUA_REGISTRYINDEX, "moonlit.gc_pressure_sentinel") != LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    lua_pop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    lua_newuserdatauv(L, 0, 0);
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, main);
    lua_pushcclosure(L, gc_pressure_unhook, 1);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "moonlit.gc_pressure_sentinel");
#endif
}
