/* lua_data.c — Lua glue of host/data_loader.h, for lua/moonlit/data.lua:
 *
 *   data_loader(spec) -> loader    spec = {columns = {names}, batch_rows = {B, ...},
 *       paths = {...}, tf = {0 | transform number, ...}, keys = {...},
 *       max_pixels = {...} (one entry per sample, batch by batch, column by
 *       column, row by row), transforms = {{resize =, crop = "center"|"random",
 *       size =, hflip =, normalize =, seed =}, ...}, epoch =, threads =,
 *       prefetch =, device = "cpu"|"cuda:N"}
 *   loader:next() -> {column = [B, H, W, 3] f32 tensor, ...}, batch number | nil at the end
 *   loader:stats() -> {batches, wait_ms, last_wait_ms, decode_ms, threads}
 *   loader:close()  (also __gc and __close)
 *   data_load(path, transform | nil, epoch, key, max_pixels) -> [H, W, 3] f32 tensor
 *   data_hash_below(seed, epoch, index, stream, n) -> integer in [0, n)
 *   data_live_threads() -> loader threads alive in the process
 *
 * Tensors are made here, on the Lua thread, around the buffers the workers
 * filled (CPU: wrapped without a copy; CUDA: uploaded from pinned memory). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "data_loader.h"
#include "mlua.h"
#include "tensor.h"

#define MLUA_DATA_LOADER "moonlit.DataLoader"

typedef struct {
    ml_data_loader *loader;
    ml_device device;
    int ncols;
    int names_ref;        /* registry ref of the column-name list */
} loader_box;

/* Integer field k of the table at idx (or def when absent), in [lo, hi]:
 * checked before the caller narrows it, so resize = 2^32 + 8 is an error,
 * not a resize to 8. */
static lua_Integer int_field(lua_State *L, int idx, const char *k, lua_Integer def, lua_Integer lo,
                             lua_Integer hi) {
    lua_getfield(L, idx, k);
    lua_Integer v = def;
    if (!lua_isnil(L, -1)) {
        char what[64];
        snprintf(what, sizeof what, "data loader: %s", k);
        v = mlua_check_integer(L, -1, what, lo, hi);
    }
    lua_pop(L, 1);
    return v;
}

static void check_transform(lua_State *L, int idx, ml_data_transform *t) {
    luaL_checktype(L, idx, LUA_TTABLE);
    memset(t, 0, sizeof *t);
    t->resize = (int)int_field(L, idx, "resize", 0, INT_MIN, INT_MAX);
    t->size = (int)int_field(L, idx, "size", 0, INT_MIN, INT_MAX);
    t->seed = (uint64_t)int_field(L, idx, "seed", 0, LUA_MININTEGER, LUA_MAXINTEGER);
    lua_getfield(L, idx, "crop");
    const char *crop = lua_tostring(L, -1);
    if (!crop) t->crop = ML_CROP_NONE;
    else if (strcmp(crop, "center") == 0) t->crop = ML_CROP_CENTER;
    else if (strcmp(crop, "random") == 0) t->crop = ML_CROP_RANDOM;
    else luaL_error(L, "ImageTransform: crop must be \"center\", \"random\" or nil, got \"%s\"", crop);
    lua_pop(L, 1);
    lua_getfield(L, idx, "hflip");
    t->hflip = lua_isnil(L, -1) ? 0 : lua_tonumber(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, idx, "normalize");
    t->normalize = lua_toboolean(L, -1);
    lua_pop(L, 1);
}

/* Length of list field k, which must be a table. */
static lua_Integer list_field(lua_State *L, int idx, const char *k) {
    if (lua_getfield(L, idx, k) != LUA_TTABLE) luaL_error(L, "data loader: spec.%s must be a list", k);
    return (lua_Integer)lua_rawlen(L, -1);   /* left on the stack */
}

static int l_data_loader(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    ml_data_loader_config cfg = {0};
    lua_Integer ncols = list_field(L, 1, "columns");          /* stack 2 */
    if (ncols < 1 || ncols > ML_DATA_MAX_COLS)
        return luaL_error(L, "data loader: %d image columns (expected 1..%d)", (int)ncols, ML_DATA_MAX_COLS);
    const char *names[ML_DATA_MAX_COLS];
    for (int c = 0; c < ncols; c++) {
        lua_rawgeti(L, 2, c + 1);
        names[c] = luaL_checkstring(L, -1);   /* anchored in spec.columns */
        lua_pop(L, 1);
    }
    lua_Integer nb = list_field(L, 1, "batch_rows");          /* 3 */
    lua_Integer np = list_field(L, 1, "paths");               /* 4 */
    lua_Integer ntf_idx = list_field(L, 1, "tf");             /* 5 */
    lua_Integer nkeys = list_field(L, 1, "keys");             /* 6 */
    lua_Integer nmax = list_field(L, 1, "max_pixels");        /* 7 */
    lua_Integer ntf = list_field(L, 1, "transforms");         /* 8 */
    if (ntf_idx != np || nkeys != np || nmax != np)
        return luaL_error(L, "data loader: paths, tf, keys and max_pixels differ in length");
    if (ntf > INT32_MAX || nb > INT32_MAX) return luaL_error(L, "data loader: plan too large");

    /* Arrays as userdata: a Lua error below frees them with the rest. */
    int *rows = lua_newuserdatauv(L, sizeof(int) * (size_t)(nb + 1), 0);
    ml_data_sample *samples = lua_newuserdatauv(L, sizeof(ml_data_sample) * (size_t)(np + 1), 0);
    ml_data_transform *tfs = lua_newuserdatauv(L, sizeof(ml_data_transform) * (size_t)(ntf + 1), 0);
    lua_Integer total = 0;
    for (lua_Integer b = 0; b < nb; b++) {
        lua_rawgeti(L, 3, b + 1);
        lua_Integer r = lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (r < 1 || r > INT32_MAX) return luaL_error(L, "data loader: batch %d has %d rows", (int)b + 1, (int)r);
        rows[b] = (int)r;
        total += r * ncols;
        if (total > np) break;
    }
    if (total != np) return luaL_error(L, "data loader: the batches hold %d samples but %d paths were given",
                                       (int)total, (int)np);
    for (lua_Integer i = 0; i < np; i++) {
        lua_rawgeti(L, 4, i + 1);
        samples[i].path = mlua_check_path(L, -1, "data loader: spec.paths entry");   /* anchored in spec.paths */
        lua_pop(L, 1);
        lua_rawgeti(L, 5, i + 1);
        /* 0 is no transform; checked before narrowing (and a non-number is
         * an error, not 0) */
        samples[i].transform = (int)mlua_check_integer(L, -1, "data loader: spec.tf entry", 0, INT_MAX) - 1;
        lua_pop(L, 1);
        lua_rawgeti(L, 6, i + 1);
        samples[i].key = (int64_t)mlua_check_integer(L, -1, "data loader: spec.keys entry", LUA_MININTEGER,
                                                     LUA_MAXINTEGER);
        lua_pop(L, 1);
        lua_rawgeti(L, 7, i + 1);
        samples[i].max_pixels = (int64_t)mlua_check_integer(L, -1, "data loader: spec.max_pixels entry",
                                                            LUA_MININTEGER, LUA_MAXINTEGER);
        lua_pop(L, 1);
    }
    for (lua_Integer i = 0; i < ntf; i++) {
        lua_rawgeti(L, 8, i + 1);
        check_transform(L, lua_gettop(L), &tfs[i]);
        lua_pop(L, 1);
    }
    cfg.ncols = (int)ncols;
    cfg.col_names = names;
    cfg.nbatches = nb;
    cfg.batch_rows = rows;
    cfg.samples = samples;
    cfg.transforms = tfs;
    cfg.ntransforms = (int)ntf;
    cfg.epoch = (uint64_t)int_field(L, 1, "epoch", 1, LUA_MININTEGER, LUA_MAXINTEGER);
    cfg.threads = (int)int_field(L, 1, "threads", 0, INT_MIN, INT_MAX);
    cfg.prefetch = (int)int_field(L, 1, "prefetch", 2, INT_MIN, INT_MAX);
    if (cfg.prefetch < 1 || cfg.prefetch > 1024)
        return luaL_error(L, "iter_batches: prefetch must be 1..1024, got %d", cfg.prefetch);
    if (cfg.threads < 0 || cfg.threads > 256)
        return luaL_error(L, "iter_batches: num_threads must be 1..256, got %d", cfg.threads);
    cfg.device = mlua_opt_device(L, 1, ml_cpu());

    loader_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    memset(box, 0, sizeof *box);
    box->names_ref = LUA_NOREF;
    luaL_setmetatable(L, MLUA_DATA_LOADER);
    box->loader = ml_data_loader_new(&cfg);
    if (!box->loader) return mlua_error(L, NULL);
    box->device = cfg.device;
    box->ncols = cfg.ncols;
    lua_pushvalue(L, 2);
    box->names_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

static loader_box *check_loader(lua_State *L) {
    loader_box *b = luaL_checkudata(L, 1, MLUA_DATA_LOADER);
    if (!b->loader) luaL_error(L, "data loader: used after close()");
    return b;
}

static int l_next(lua_State *L) {
    loader_box *box = check_loader(L);
    ml_data_batch b;
    int rc = ml_data_loader_next(box->loader, &b);
    if (rc < 0) return mlua_error(L, NULL);
    if (rc == 0) { lua_pushnil(L); return 1; }
    lua_createtable(L, 0, b.ncols);
    lua_rawgeti(L, LUA_REGISTRYINDEX, box->names_ref);
    for (int c = 0; c < b.ncols; c++) {
        int64_t shape[4] = {b.rows, b.col[c].h, b.col[c].w, 3};
        ml_tensor *t = NULL;
        if (box->device.type == ML_CPU) {
            ml_storage *s = ml_storage_wrap(b.col[c].data, b.col[c].nbytes, ml_cpu(), ml_data_buffer_free, NULL);
            if (s) {
                b.col[c].data = NULL;   /* the storage owns it now */
                t = ml_from_storage(s, 0, 4, shape, NULL, ML_F32);
                ml_storage_release(s);
            }
        } else {
            t = ml_empty(4, shape, ML_F32, box->device);
            if (t && ml_data_loader_upload(box->loader, &b, c, ml_data(t)) < 0) { ml_release(t); t = NULL; }
        }
        if (!t) {
            ml_data_loader_release(box->loader, &b);
            return mlua_error(L, "data loader");
        }
        lua_rawgeti(L, -1, c + 1);
        mlua_push_tensor(L, t);
        lua_settable(L, -4);
    }
    lua_pop(L, 1);
    ml_data_loader_release(box->loader, &b);
    lua_pushinteger(L, b.index + 1);
    return 2;
}

static int l_stats(lua_State *L) {
    loader_box *box = check_loader(L);
    ml_data_stats s;
    ml_data_loader_stats(box->loader, &s);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, s.batches); lua_setfield(L, -2, "batches");
    lua_pushnumber(L, s.wait_ms); lua_setfield(L, -2, "wait_ms");
    lua_pushnumber(L, s.last_wait_ms); lua_setfield(L, -2, "last_wait_ms");
    lua_pushnumber(L, s.decode_ms); lua_setfield(L, -2, "decode_ms");
    lua_pushinteger(L, s.threads); lua_setfield(L, -2, "threads");
    return 1;
}

static int l_close(lua_State *L) {
    loader_box *b = luaL_checkudata(L, 1, MLUA_DATA_LOADER);
    ml_data_loader_free(b->loader);
    b->loader = NULL;
    if (b->names_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, b->names_ref);
        b->names_ref = LUA_NOREF;
    }
    return 0;
}

static int l_data_load(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "data_load: path");
    ml_data_transform tf, *tp = NULL;
    if (!lua_isnoneornil(L, 2)) { check_transform(L, 2, &tf); tp = &tf; }
    uint64_t epoch = (uint64_t)luaL_optinteger(L, 3, 1);
    int64_t key = (int64_t)luaL_optinteger(L, 4, 0);
    int64_t maxp = (int64_t)luaL_optinteger(L, 5, 0);
    float *px;
    int h, w;
    if (ml_data_process(path, tp, epoch, key, maxp, &px, &h, &w) < 0) return mlua_error(L, NULL);
    int64_t shape[3] = {h, w, 3};
    ml_storage *s = ml_storage_wrap(px, (size_t)h * w * 3 * sizeof(float), ml_cpu(), ml_data_buffer_free, NULL);
    if (!s) { free(px); return mlua_error(L, NULL); }
    ml_tensor *t = ml_from_storage(s, 0, 3, shape, NULL, ML_F32);
    ml_storage_release(s);
    return mlua_push_tensor(L, t);
}

static int l_hash_below(lua_State *L) {
    uint64_t seed = (uint64_t)luaL_checkinteger(L, 1), epoch = (uint64_t)luaL_checkinteger(L, 2);
    uint64_t index = (uint64_t)luaL_checkinteger(L, 3), stream = (uint64_t)luaL_checkinteger(L, 4);
    lua_Integer n = luaL_checkinteger(L, 5);
    if (n < 1) return luaL_argerror(L, 5, "n must be >= 1");
    lua_pushinteger(L, (lua_Integer)ml_data_hash_below(seed, epoch, index, stream, (uint64_t)n));
    return 1;
}

/* data_flip_drawn(seed, epoch, key, hflip) -> whether the loader flips that image */
static int l_flip_drawn(lua_State *L) {
    uint64_t seed = (uint64_t)luaL_checkinteger(L, 1), epoch = (uint64_t)luaL_checkinteger(L, 2);
    int64_t key = (int64_t)luaL_checkinteger(L, 3);
    double p = luaL_checknumber(L, 4);
    if (!(p >= 0 && p <= 1)) return luaL_argerror(L, 4, "hflip is a probability in [0, 1]");
    lua_pushboolean(L, ml_data_flip_drawn(seed, epoch, key, p));
    return 1;
}

static int l_live_threads(lua_State *L) {
    lua_pushinteger(L, ml_data_live_threads());
    return 1;
}

void mlua_open_data(lua_State *L) {
    if (luaL_newmetatable(L, MLUA_DATA_LOADER)) {
        static const luaL_Reg m[] = {
            {"next", l_next}, {"stats", l_stats}, {"close", l_close}, {NULL, NULL},
        };
        luaL_newlib(L, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
    static const luaL_Reg f[] = {
        {"data_loader", l_data_loader}, {"data_load", l_data_load},
        {"data_hash_below", l_hash_below}, {"data_flip_drawn", l_flip_drawn},
        {"data_live_threads", l_live_threads}, {NULL, NULL},
    };
    luaL_setfuncs(L, f, 0);
}
