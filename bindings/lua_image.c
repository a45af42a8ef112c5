/* lua_image.c — Lua glue of host/image.h: image_load, image_save,
 * image_resize, image_png_text (added to the moonlit.core table).
 *
 *   image_load(path [, {dtype = "f32"|"u8"|..., device = "cpu"|"cuda:N",
 *                       max_pixels = 64e6}])
 *       -> [H, W, 3] tensor; float dtypes hold value/255 in [0, 1]; images
 *       whose header declares more than max_pixels pixels are refused
 *       before decoding
 *   image_save(path, t [, {meta = {prompt = ..., seed = ...}, quality = 95}])
 *       t: [H, W, C] or [1, H, W, C], C = 1..4, uint8 or floating (clamped
 *       to [0, 1], then (x*255) rounded half-to-even, as torch's round)
 *   image_resize(t, h, w [, {mode = "bilinear"|"bicubic"|"nearest"|"area"}])
 *       t: [H, W, C] or [N, H, W, C], floating or uint8; same dtype/device out
 *   image_png_text(path) -> {key = value, ...}
 *
 * Pixel work happens on the CPU: tensors on other devices, or not
 * contiguous, are copied first.  None of these record autograd history. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "image.h"
#include "mlua.h"
#include "tensor.h"

/* Keys that come first, in this order, so files from different runs list
 * their metadata alike; any other keys follow in sorted order. */
static const char *const STANDARD_KEYS[] = {
    "prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", NULL
};

static void check_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TTABLE);
}

/* A CPU, contiguous, history-free version of t (new reference), in f32 if
 * t is floating and `to_f32` is set.  NULL with the host error set. */
static ml_tensor *cpu_contiguous(ml_tensor *t, bool to_f32) {
    ml_tensor *a = ml_detach(t), *b;
    if (!a) return NULL;
    b = ml_to_device(a, ml_cpu());
    ml_release(a);
    if (!b) return NULL;
    if (to_f32 && b->dtype != ML_F32) {
        a = ml_to_dtype(b, ML_F32);
        ml_release(b);
        if (!a) return NULL;
        b = a;
    }
    a = ml_contiguous(b);
    ml_release(b);
    return a;
}

/* Convert a CPU tensor to dtype dt and device dev, consuming the reference. */
static ml_tensor *finish(ml_tensor *t, ml_dtype dt, ml_device dev) {
    ml_tensor *r;
    if (t->dtype != dt) {
        r = ml_to_dtype(t, dt);
        ml_release(t);
        if (!r) return NULL;
        t = r;
    }
    r = ml_to_device(t, dev);
    ml_release(t);
    return r;
}

static int l_image_load(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "image_load: path");
    check_opts(L, 2);
    ml_dtype dt = mlua_opt_dtype(L, 2, ML_F32);
    ml_device dev = mlua_opt_device(L, 2, ml_cpu());
    if (dt != ML_U8 && !ml_dtype_is_float(dt))
        return luaL_argerror(L, 2, lua_pushfstring(L, "dtype must be u8 or a floating type, got %s",
                                                   ml_dtype_short(dt)));
    int64_t max_pixels = mlua_opt_field_integer(L, 2, "max_pixels", ML_IMAGE_DEFAULT_MAX_PIXELS, 1, LUA_MAXINTEGER);
    uint8_t *px;
    int h, w;
    if (ml_image_load_max(path, max_pixels, &px, &h, &w) < 0) return mlua_error(L, NULL);
    int64_t shape[3] = {h, w, 3};
    ml_tensor *t = ml_empty(3, shape, dt == ML_U8 ? ML_U8 : ML_F32, ml_cpu());
    if (!t) { free(px); return mlua_error(L, NULL); }
    size_t n = (size_t)h * w * 3;
    if (dt == ML_U8) {
        memcpy(ml_data(t), px, n);
    } else {
        float *f = ml_data(t);
        for (size_t i = 0; i < n; i++) f[i] = px[i] / 255.0f;   /* as torchvision's to_tensor */
    }
    free(px);
    return mlua_push_tensor(L, finish(t, dt, dev));
}

/* The [H, W, C] view of an image argument: shape[0..2] of t or of its
 * single batch entry; raises an argument error otherwise. */
static void check_image_shape(lua_State *L, int arg, const ml_tensor *t, int64_t hwc[3], const char *what) {
    char buf[128];
    bool ok = (t->ndim == 3 || (t->ndim == 4 && t->shape[0] == 1));
    const int64_t *s = t->shape + (t->ndim - 3);
    ok = ok && s[0] > 0 && s[1] > 0 && s[0] <= INT_MAX && s[1] <= INT_MAX && s[2] >= 1 && s[2] <= 4;
    if (!ok)
        luaL_argerror(L, arg, lua_pushfstring(L, "expected %s tensor with C = 1..4, got %s",
                                              what, ml_shape_str(t, buf, sizeof buf)));
    if (t->dtype != ML_U8 && !ml_dtype_is_float(t->dtype))
        luaL_argerror(L, arg, lua_pushfstring(L, "expected a uint8 or floating image, got %s",
                                              ml_dtype_name(t->dtype)));
    memcpy(hwc, s, 3 * sizeof(int64_t));
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Push the string form of meta value at the top of the stack (replacing
 * it); key names the entry in errors. */
static void meta_value_string(lua_State *L, const char *key) {
    int ty = lua_type(L, -1);
    if (ty != LUA_TSTRING && ty != LUA_TNUMBER && ty != LUA_TBOOLEAN)
        luaL_error(L, "image_save: meta.%s must be a string, number or boolean (got %s)", key,
                   luaL_typename(L, -1));
    size_t len;
    const char *v = luaL_tolstring(L, -1, &len);
    if (strlen(v) != len) luaL_error(L, "image_save: meta.%s contains a NUL byte", key);
    lua_replace(L, -2);
}

static int l_image_save(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "image_save: path");
    ml_tensor *t = mlua_check_tensor(L, 2);
    check_opts(L, 3);
    int64_t hwc[3];
    check_image_shape(L, 2, t, hwc, "an [H, W, C] or [1, H, W, C]");
    lua_Integer quality = 95;
    if (!lua_isnoneornil(L, 3)) {
        lua_getfield(L, 3, "quality");
        if (!lua_isnil(L, -1)) {
            int isint;
            quality = lua_tointegerx(L, -1, &isint);
            if (!isint || quality < 1 || quality > 100)
                return luaL_error(L, "image_save: quality must be an integer in 1..100");
        }
        lua_pop(L, 1);
    }

    /* Metadata: the strings are anchored in a Lua table (slot `anchor`) so
     * the C pointers stay valid, and the pointer arrays are userdata, so a
     * Lua error anywhere below leaks nothing. */
    int nkv = 0;
    const char **keys = NULL, **vals = NULL;
    lua_newtable(L);
    int anchor = lua_gettop(L);
    if (!lua_isnoneornil(L, 3)) {
        lua_getfield(L, 3, "meta");
        int meta = lua_gettop(L);
        if (!lua_isnil(L, meta)) {
            luaL_argcheck(L, lua_istable(L, meta), 3, "meta must be a table of strings");
            int n = 0;
            for (lua_pushnil(L); lua_next(L, meta); lua_pop(L, 1)) {
                if (lua_type(L, -2) != LUA_TSTRING)
                    return luaL_error(L, "image_save: meta keys must be strings (got %s)", luaL_typename(L, -2));
                if (strlen(lua_tostring(L, -2)) != lua_rawlen(L, -2))
                    return luaL_error(L, "image_save: a meta key contains a NUL byte");
                n++;
            }
            keys = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
            vals = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
            lua_rawseti(L, anchor, 2 * n + 2);
            lua_rawseti(L, anchor, 2 * n + 1);
            for (int s = 0; STANDARD_KEYS[s]; s++) {
                if (lua_getfield(L, meta, STANDARD_KEYS[s]) == LUA_TNIL) { lua_pop(L, 1); continue; }
                meta_value_string(L, STANDARD_KEYS[s]);
                keys[nkv] = STANDARD_KEYS[s];
                vals[nkv] = lua_tostring(L, -1);
                lua_rawseti(L, anchor, ++nkv);
            }
            int first_other = nkv;
            for (lua_pushnil(L); lua_next(L, meta); lua_pop(L, 1)) {
                const char *k = lua_tostring(L, -2);
                bool standard = false;
                for (int s = 0; STANDARD_KEYS[s]; s++) standard = standard || strcmp(k, STANDARD_KEYS[s]) == 0;
                if (standard) continue;
                keys[nkv++] = k;   /* anchored by the meta table itself */
            }
            qsort(keys + first_other, (size_t)(nkv - first_other), sizeof *keys, cmp_str);
            for (int i = first_other; i < nkv; i++) {
                lua_getfield(L, meta, keys[i]);
                meta_value_string(L, keys[i]);
                vals[i] = lua_tostring(L, -1);
                lua_rawseti(L, anchor, i + 1);
            }
        }
    }

    ml_tensor *c = cpu_contiguous(t, t->dtype != ML_U8);
    if (!c) return mlua_error(L, NULL);
    size_t n = (size_t)(hwc[0] * hwc[1] * hwc[2]);
    const uint8_t *px = ml_data(c);
    uint8_t *conv = NULL;
    if (c->dtype == ML_F32) {
        conv = malloc(n);
        if (!conv) { ml_release(c); return luaL_error(L, "image_save: out of memory"); }
        const float *f = ml_data(c);
        for (size_t i = 0; i < n; i++) {
            float x = f[i];
            x = x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f;   /* NaN goes to 0 */
            conv[i] = (uint8_t)nearbyintf(x * 255.0f);
        }
        px = conv;
    }
    int rc = ml_image_save(path, px, (int)hwc[0], (int)hwc[1], (int)hwc[2], keys, vals, nkv, (int)quality);
    free(conv);
    ml_release(c);
    if (rc < 0) return mlua_error(L, NULL);
    return 0;
}

static int l_image_resize(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    lua_Integer oh = mlua_check_integer(L, 2, "image_resize: height", 1, INT_MAX);
    lua_Integer ow = mlua_check_integer(L, 3, "image_resize: width", 1, INT_MAX);
    check_opts(L, 4);
    const char *mode_name = mlua_opt_field_string(L, 4, "mode", "bilinear");
    int mode = ml_resize_mode_parse(mode_name);
    if (mode < 0) return luaL_argerror(L, 4, ml_last_error());
    char buf[128];
    bool ok = (t->ndim == 3 || t->ndim == 4) && ml_numel(t) > 0;
    for (int d = 0; ok && d < t->ndim; d++) ok = t->shape[d] <= INT_MAX;
    if (!ok)
        return luaL_argerror(L, 1, lua_pushfstring(L, "expected an [H, W, C] or [N, H, W, C] tensor, got %s",
                                                   ml_shape_str(t, buf, sizeof buf)));
    if (t->dtype != ML_U8 && !ml_dtype_is_float(t->dtype))
        return luaL_argerror(L, 1, lua_pushfstring(L, "expected a floating or uint8 image, got %s",
                                                   ml_dtype_name(t->dtype)));
    int64_t nimg = t->ndim == 4 ? t->shape[0] : 1;
    const int64_t *s = t->shape + (t->ndim - 3);
    int h = (int)s[0], w = (int)s[1], ch = (int)s[2];

    ml_tensor *src = cpu_contiguous(t, t->dtype != ML_U8);
    if (!src) return mlua_error(L, NULL);
    int64_t shape[4] = {nimg, oh, ow, ch};
    ml_tensor *dst = ml_empty(t->ndim, shape + (4 - t->ndim), src->dtype, ml_cpu());
    if (!dst) { ml_release(src); return mlua_error(L, NULL); }
    size_t in_img = (size_t)h * w * ch, out_img = (size_t)oh * ow * ch;
    int rc = 0;
    for (int64_t i = 0; i < nimg && rc == 0; i++) {
        if (src->dtype == ML_U8)
            rc = ml_image_resize_u8((uint8_t *)ml_data(dst) + i * out_img, (int)oh, (int)ow,
                                    (const uint8_t *)ml_data(src) + i * in_img, h, w, ch, mode);
        else
            rc = ml_image_resize_f32((float *)ml_data(dst) + i * out_img, (int)oh, (int)ow,
                                     (const float *)ml_data(src) + i * in_img, h, w, ch, mode);
    }
    ml_release(src);
    if (rc < 0) { ml_release(dst); return mlua_error(L, NULL); }
    return mlua_push_tensor(L, finish(dst, t->dtype, t->device));
}

static int l_image_png_text(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "image_png_text: path");
    ml_image_text *kv;
    int n = ml_image_png_text(path, &kv);
    if (n < 0) return mlua_error(L, NULL);
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {       /* a repeated key keeps its last value, as PIL's .text */
        lua_pushstring(L, kv[i].value);
        lua_setfield(L, -2, kv[i].key);
    }
    ml_image_text_free(kv, n);
    return 1;
}

void mlua_open_image(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"image_load", l_image_load},
        {"image_save", l_image_save},
        {"image_resize", l_image_resize},
        {"image_png_text", l_image_png_text},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
}
