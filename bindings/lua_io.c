/* lua_io.c — Lua bindings of safetensors IO (host/safetensors.h) and JSON
 * (jansson both ways: Lua tables are turned into a jansson tree to write).
 *
 * Safetensors:
 *   st_open(path_or_dir [, {variant=, basename=}]) -> SafeTensors handle
 *   st_open_model(dir, basename_or_nil [, {variant=}]) -> handle
 *   st_load(path_or_dir [, {dtype=, device=, variant=, basename=, copy=}]) -> {name = tensor}
 *   st_save(path, {name = tensor}, [{dtype=, metadata={k = "v"}}]) (names,
 *     keys and values with NUL bytes, or a header past ML_ST_MAX_HEADER, are
 *     refused with nothing written)
 *   handle:keys() sorted names, handle:has(name), handle:info(name) ->
 *     {dtype="f32" (or the file's spelling, e.g. "I8", when moonlit lacks
 *     it), st_dtype="F32", shape={2,4,8,8}, nbytes=, file=} (an unknown
 *     name is an error naming the nearest names; has() tests quietly),
 *     handle:get(name, {dtype=, device=, copy=}), handle:metadata(),
 *     handle:path(), handle:close() (also __close and __gc; tensors already
 *     loaded stay valid), #handle.
 *   get and st_load read into memory the tensor owns (ml_st_read), so a
 *   file truncated or rewritten later changes nothing and never faults.
 *   copy = false asks for ml_st_get's zero-copy view of the file's mapping
 *   instead: the file must then not change while the tensor lives (a
 *   truncation makes touching it raise SIGBUS).
 *
 * JSON:
 *   json_decode(text [, {null=v}]), json_load(path [, {null=v}]) -> value.
 *     Objects -> tables, arrays -> sequences, integers -> Lua integers,
 *     reals -> floats; Python's bare NaN, Infinity and -Infinity (which
 *     json.dump writes) -> 0/0, math.huge, -math.huge.  JSON null becomes nil (an object key with null is
 *     absent, an array gets a hole) unless opts.null gives a stand-in such
 *     as json_null.  Every decoded array/object carries the json_array /
 *     json_object marker metatable, so an empty one is written back as it
 *     was read.
 *   json_encode(value [, {indent=2}]), json_save(path, value [, {indent=}])
 *     (json_save: indent 2 by default, trailing newline, atomic write).
 *     Output follows Python's json.dumps(sort_keys=True): keys always sorted
 *     (Lua tables have no order), ", "/": " separators, floats written in
 *     the fewest digits that read back exactly and always as floats ("1.0"),
 *     non-ASCII text as UTF-8.  Tables: a __jsontype="array"/"object" field
 *     in the metatable decides; otherwise keys 1..n make an array, string
 *     keys an object, and an empty table is an object {}.  json_array(t) /
 *     json_object(t) mark t (or a new table).  json_null encodes as null.
 *     A config.json written by diffusers, loaded with {null=json_null} and
 *     saved again, comes back byte for byte. */
#include "mlua.h"
#include "safetensors.h"
#include "json_config.h"
#include "atomic_file.h"
#include "error.h"
#include "fs.h"
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ST_META "moonlit.SafeTensors"
#define JSON_ARRAY_MT "moonlit.json_array"
#define JSON_OBJECT_MT "moonlit.json_object"
#define JSON_BOX_MT "moonlit.json_box"
#define JBUF_MT "moonlit.json_buffer"

/* The address is the identity of json_null. */
static const char g_json_null = 0;
#define NULL_SENTINEL ((void *)&g_json_null)

/* ======================================================================== */
/* safetensors                                                              */
/* ======================================================================== */

typedef struct { ml_st_file *f; } st_box;

static ml_st_file *check_st(lua_State *L, int idx) {
    st_box *b = luaL_checkudata(L, idx, ST_META);
    if (!b->f) luaL_argerror(L, idx, "attempt to use a closed safetensors file");
    return b->f;
}

static int st_close(lua_State *L) {
    st_box *b = luaL_checkudata(L, 1, ST_META);
    ml_st_close(b->f);
    b->f = NULL;
    return 0;
}

/* Open per the options at opts_idx (may be 0): a basename or variant means
 * `path` is a model directory. */
static ml_st_file *open_with_opts(lua_State *L, const char *op, const char *path, int opts_idx) {
    const char *variant = mlua_opt_field_path(L, opts_idx, op, "variant", NULL);
    const char *basename = mlua_opt_field_path(L, opts_idx, op, "basename", NULL);
    if (variant || basename) return ml_st_open_model(path, basename, variant);
    return ml_st_open(path);
}

static int push_st(lua_State *L, ml_st_file *f) {
    if (!f) return mlua_error(L, NULL);
    st_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->f = f;
    luaL_setmetatable(L, ST_META);
    return 1;
}

static int l_st_open(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "st_open: path");
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    ml_st_file *f = open_with_opts(L, "st_open", path, lua_isnoneornil(L, 2) ? 0 : 2);
    return push_st(L, f);
}

static int l_st_open_model(lua_State *L) {
    const char *dir = mlua_check_path(L, 1, "st_open_model: dir");
    const char *basename = mlua_opt_path(L, 2, "st_open_model: basename", NULL);
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    const char *variant = mlua_opt_field_path(L, lua_isnoneornil(L, 3) ? 0 : 3, "st_open_model", "variant", NULL);
    return push_st(L, ml_st_open_model(dir, basename, variant));
}

static int st_keys(lua_State *L) {
    ml_st_file *f = check_st(L, 1);
    int n = ml_st_count(f);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushstring(L, ml_st_info_at(f, i)->name);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int st_has(lua_State *L) {
    ml_st_file *f = check_st(L, 1);
    lua_pushboolean(L, ml_st_find(f, luaL_checkstring(L, 2)) != NULL);
    return 1;
}

static int st_info(lua_State *L) {
    ml_st_file *f = check_st(L, 1);
    const char *name = luaL_checkstring(L, 2);
    const ml_st_info *in = ml_st_find(f, name);
    if (!in) {
        /* ml_st_get words the error (with the nearest names). */
        ml_st_get(f, name, -1);
        return mlua_error(L, NULL);
    }
    lua_createtable(L, 0, 5);
    lua_pushstring(L, in->dtype >= 0 ? ml_dtype_short((ml_dtype)in->dtype) : in->st_dtype);
    lua_setfield(L, -2, "dtype");
    lua_pushstring(L, in->st_dtype);
    lua_setfield(L, -2, "st_dtype");
    lua_createtable(L, in->ndim, 0);
    for (int d = 0; d < in->ndim; d++) {
        lua_pushinteger(L, in->shape[d]);
        lua_rawseti(L, -2, d + 1);
    }
    lua_setfield(L, -2, "shape");
    lua_pushinteger(L, (lua_Integer)in->nbytes);
    lua_setfield(L, -2, "nbytes");
    lua_pushstring(L, in->file);
    lua_setfield(L, -2, "file");
    return 1;
}

/* dtype option -> ml_dtype or -1 when absent. */
static int opt_dtype_or_none(lua_State *L, int idx) {
    const char *s = mlua_opt_field_string(L, idx, "dtype", NULL);
    if (!s) return -1;
    int d = ml_dtype_parse(s);
    if (d < 0) luaL_error(L, "unknown dtype '%s' (expected f32, f64, f16, bf16, i32, i64, u8 or bool)", s);
    return d;
}

/* Load one tensor and move it to `dev`; NULL with the host error set.
 * copy: a tensor that owns its memory, never a view of the file's map. */
static ml_tensor *get_on(ml_st_file *f, const char *name, int dt, ml_device dev, int copy) {
    ml_tensor *t = copy ? ml_st_read(f, name, dt) : ml_st_get(f, name, dt);
    if (!t || ml_device_eq(dev, ml_cpu())) return t;
    ml_tensor *d = ml_to_device(t, dev);
    ml_release(t);
    return d;
}

static int st_get(lua_State *L) {
    ml_st_file *f = check_st(L, 1);
    const char *name = luaL_checkstring(L, 2);
    int opts = lua_isnoneornil(L, 3) ? 0 : 3;
    if (opts) luaL_checktype(L, 3, LUA_TTABLE);
    int dt = opt_dtype_or_none(L, opts);
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    /* owned by default: a view of the mapping faults when the file shrinks */
    int copy = mlua_opt_field_bool(L, opts, "copy", 1);
    return mlua_push_tensor(L, get_on(f, name, dt, dev, copy));
}

static int st_metadata(lua_State *L) {
    ml_st_file *f = check_st(L, 1);
    int n = ml_st_metadata_count(f);
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        lua_pushstring(L, ml_st_metadata_value(f, i));
        lua_setfield(L, -2, ml_st_metadata_key(f, i));
    }
    return 1;
}

static int st_path(lua_State *L) {
    lua_pushstring(L, ml_st_path(check_st(L, 1)));
    return 1;
}

static int st_len(lua_State *L) {
    lua_pushinteger(L, ml_st_count(check_st(L, 1)));
    return 1;
}

static int st_tostring(lua_State *L) {
    st_box *b = luaL_checkudata(L, 1, ST_META);
    if (!b->f) lua_pushliteral(L, "SafeTensors (closed)");
    else lua_pushfstring(L, "SafeTensors('%s', %d tensors)", ml_st_path(b->f), ml_st_count(b->f));
    return 1;
}

static int l_st_load(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "st_load: path");
    int opts = lua_isnoneornil(L, 2) ? 0 : 2;
    if (opts) luaL_checktype(L, 2, LUA_TTABLE);
    int dt = opt_dtype_or_none(L, opts);
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    int copy = mlua_opt_field_bool(L, opts, "copy", 1);   /* as get: owned unless copy = false */
    /* The handle sits on the stack so an error half-way still closes it. */
    push_st(L, open_with_opts(L, "st_load", path, opts));
    int hidx = lua_gettop(L);
    ml_st_file *f = check_st(L, hidx);
    int n = ml_st_count(f);
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        const char *name = ml_st_info_at(f, i)->name;
        mlua_push_tensor(L, get_on(f, name, dt, dev, copy));
        lua_setfield(L, -2, name);
    }
    st_box *b = lua_touserdata(L, hidx);
    ml_st_close(b->f);
    b->f = NULL;
    return 1;
}

/* ml_st_save takes C strings: a name, key or value holding a NUL byte would
 * be cut short there and saved under another name.  Refused here instead,
 * naming it, before anything is written. */
static void check_no_nul(lua_State *L, const char *path, int idx, const char *what, int key_idx) {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (strlen(s) == n) return;
    if (key_idx) {
        size_t kn;
        const char *k = lua_tolstring(L, key_idx, &kn);
        luaL_error(L, "st_save '%s': %s of '%s' holds a NUL byte (at byte %d): safetensors "
                   "headers hold NUL-free text", path, what, mlua_push_shown(L, k, kn), (int)strlen(s));
    }
    luaL_error(L, "st_save '%s': %s '%s' holds a NUL byte (at byte %d): safetensors headers "
               "hold NUL-free text", path, what, mlua_push_shown(L, s, n), (int)strlen(s));
}

static int l_st_save(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "st_save: path");
    luaL_checktype(L, 2, LUA_TTABLE);
    int opts = lua_isnoneornil(L, 3) ? 0 : 3;
    if (opts) luaL_checktype(L, 3, LUA_TTABLE);
    int dt = opt_dtype_or_none(L, opts);

    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "st_save '%s': tensor names must be strings (got a %s key)", path,
                       luaL_typename(L, -2));
        check_no_nul(L, path, -2, "tensor name", 0);
        mlua_tensor_box *tb = luaL_testudata(L, -1, MLUA_TENSOR);
        if (!tb || !tb->t)
            luaL_error(L, "st_save '%s': value for '%s' is %s, not a live tensor", path,
                       lua_tostring(L, -2), tb ? "a freed tensor" : luaL_typename(L, -1));
        n++;
        lua_pop(L, 1);
    }
    int nmeta = 0;
    int midx = 0;
    if (opts) {
        lua_getfield(L, opts, "metadata");
        if (!lua_isnil(L, -1)) {
            if (!lua_istable(L, -1)) luaL_error(L, "st_save: option 'metadata' must be a table of strings");
            midx = lua_gettop(L);
            lua_pushnil(L);
            while (lua_next(L, midx)) {
                if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                    luaL_error(L, "st_save '%s': metadata keys and values must be strings", path);
                check_no_nul(L, path, -2, "metadata key", 0);
                check_no_nul(L, path, -1, "metadata value", lua_gettop(L) - 1);
                nmeta++;
                lua_pop(L, 1);
            }
        }
    }
    /* Arrays live in a userdata so a Lua error cannot leak them; the strings
     * stay anchored by the tables they came from. */
    size_t slots = (size_t)(2 * n + 2 * nmeta + 1);
    void **mem = lua_newuserdatauv(L, slots * sizeof(void *), 0);
    const char **names = (const char **)mem;
    ml_tensor **tensors = (ml_tensor **)(mem + n);
    const char **mk = (const char **)(mem + 2 * n);
    const char **mv = (const char **)(mem + 2 * n + nmeta);
    int i = 0;
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        names[i] = lua_tostring(L, -2);
        tensors[i] = ((mlua_tensor_box *)lua_touserdata(L, -1))->t;
        i++;
        lua_pop(L, 1);
    }
    if (midx) {
        i = 0;
        lua_pushnil(L);
        while (lua_next(L, midx)) {
            mk[i] = lua_tostring(L, -2);
            mv[i] = lua_tostring(L, -1);
            i++;
            lua_pop(L, 1);
        }
    }
    if (ml_st_save(path, n, names, tensors, nmeta, mk, mv, dt) < 0) return mlua_error(L, NULL);
    return 0;
}

/* ======================================================================== */
/* JSON reading                                                             */
/* ======================================================================== */

typedef struct { json_t *j; } json_box;

static int json_box_gc(lua_State *L) {
    json_box *b = luaL_checkudata(L, 1, JSON_BOX_MT);
    json_decref(b->j);
    b->j = NULL;
    return 0;
}

/* Push j as a Lua value; null_idx is the stack index of the stand-in for
 * null, or 0 for nil.  marker is ml_json_parse's: strings holding it are
 * the NaN/Infinity/-Infinity of the text, pushed as numbers. */
static void push_json(lua_State *L, json_t *j, int null_idx, int marker, const char *what) {
    if (!lua_checkstack(L, 4)) luaL_error(L, "JSON nested too deeply");
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        lua_createtable(L, 0, (int)json_object_size(j));
        const char *k;
        size_t klen;
        json_t *v;
        /* with the key's length: a key may hold NUL bytes (\u0000) */
        json_object_keylen_foreach(j, k, klen, v) {
            /* a bare NaN as a key is rewritten like a value; it is not JSON */
            if (marker && memchr(k, marker, klen))
                luaL_error(L, "%s: NaN/Infinity cannot be an object key (keys are strings)", what);
            lua_pushlstring(L, k, klen);
            push_json(L, v, null_idx, marker, what);
            lua_rawset(L, -3);
        }
        luaL_setmetatable(L, JSON_OBJECT_MT);
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            push_json(L, json_array_get(j, i), null_idx, marker, what);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        luaL_setmetatable(L, JSON_ARRAY_MT);
        break;
    }
    case JSON_STRING: {
        double d;
        if (ml_json_nonfinite(json_string_value(j), json_string_length(j), marker, &d)) lua_pushnumber(L, d);
        else lua_pushlstring(L, json_string_value(j), json_string_length(j));
        break;
    }
    case JSON_INTEGER: lua_pushinteger(L, (lua_Integer)json_integer_value(j)); break;
    case JSON_REAL: lua_pushnumber(L, json_real_value(j)); break;
    case JSON_TRUE: lua_pushboolean(L, 1); break;
    case JSON_FALSE: lua_pushboolean(L, 0); break;
    case JSON_NULL:
        if (null_idx) lua_pushvalue(L, null_idx);
        else lua_pushnil(L);
        break;
    }
}

/* Stack index of opts.null (pushed), or 0. */
static int null_standin(lua_State *L, int opts) {
    if (lua_isnoneornil(L, opts)) return 0;
    luaL_checktype(L, opts, LUA_TTABLE);
    lua_getfield(L, opts, "null");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    return lua_gettop(L);
}

static int push_decoded(lua_State *L, json_t *j, int null_idx, int marker, const char *what) {
    if (!j) return mlua_error(L, NULL);
    json_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->j = j;
    luaL_setmetatable(L, JSON_BOX_MT);
    push_json(L, j, null_idx, marker, what);
    return 1;
}

/* Decoding for Lua accepts \u0000 (valid JSON): Lua strings carry NUL bytes,
 * and push_json passes every string and key with its length.  The C readers
 * of json_config.h keep refusing it, since they use NUL-terminated strings. */
#define LUA_JSON_FLAGS (JSON_DECODE_ANY | JSON_ALLOW_NUL)

static int l_json_decode(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    int null_idx = null_standin(L, 2);
    int marker;
    json_t *j = ml_json_parse(s, len, LUA_JSON_FLAGS, "json_decode", &marker, NULL, NULL);
    return push_decoded(L, j, null_idx, marker, "json_decode");
}

static int l_json_load(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "json_load: path");
    int null_idx = null_standin(L, 2);
    int marker;
    json_t *j = ml_json_parse_file(path, LUA_JSON_FLAGS, &marker, NULL, NULL);
    return push_decoded(L, j, null_idx, marker, path);
}

/* ======================================================================== */
/* JSON writing                                                             */
/* ======================================================================== */

/* The Lua value becomes a jansson tree (checked as it is built, errors naming
 * where in the value they are), jansson writes the text, and restyle() turns
 * the two spellings where jansson and Python's json.dumps differ into
 * Python's. */

typedef struct { char *p; size_t n, cap; } jbuf;

static int jbuf_gc(lua_State *L) {
    jbuf *b = luaL_checkudata(L, 1, JBUF_MT);
    free(b->p);
    b->p = NULL;
    return 0;
}

/* No Lua error here: it runs under json_dump_callback, and a longjmp out of
 * jansson would leak what the dump holds. */
static int jbuf_add(jbuf *b, const char *s, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static int jbuf_dump_cb(const char *s, size_t n, void *data) { return jbuf_add(data, s, n); }

static jbuf *push_jbuf(lua_State *L) {
    jbuf *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, JBUF_MT);
    return b;
}

#define ENC_MAX_DEPTH 128

typedef struct {
    lua_State *L;
    json_box *root;        /* holds the tree: a Lua error half-way frees it */
    int depth;
    const char *what;      /* "json_encode" or "json_save 'path'" for messages */
    struct { const char *key; size_t klen; lua_Integer index; } seg[ENC_MAX_DEPTH];
} encoder;

/* Raise an error naming where in the value it happened ("$.unet.layers[2]"). */
static void enc_error(encoder *e, const char *msg) {
    luaL_Buffer lb;
    lua_State *L = e->L;
    luaL_buffinit(L, &lb);
    luaL_addchar(&lb, '$');
    for (int i = 0; i < e->depth; i++) {
        if (e->seg[i].key) {
            luaL_addchar(&lb, '.');
            luaL_addlstring(&lb, e->seg[i].key, e->seg[i].klen);
        } else {
            char ib[32];
            snprintf(ib, sizeof ib, "[%lld]", (long long)e->seg[i].index);
            luaL_addstring(&lb, ib);
        }
    }
    luaL_pushresult(&lb);
    luaL_error(L, "%s: %s at %s", e->what, msg, lua_tostring(L, -1));
}

/* Where a value goes: under key in an object, appended to an array (key
 * NULL), or the root (parent NULL).  A table's container is placed before it
 * is filled, so everything made hangs from the root at every moment. */
typedef struct { json_t *parent; const char *key; size_t klen; } slot;

/* Store v (a new reference, or NULL when jansson could not allocate it) in
 * s; the set_new calls take the reference even when they fail. */
static void place(encoder *e, slot s, json_t *v) {
    int rc = -1;
    if (v && !s.parent) {
        e->root->j = v;
        rc = 0;
    } else if (v) {
        rc = s.key ? json_object_setn_new(s.parent, s.key, s.klen, v)
                   : json_array_append_new(s.parent, v);
    }
    if (rc < 0) enc_error(e, "out of memory");
}

static void encode_value(encoder *e, int idx, slot s);

typedef struct { const char *s; size_t n; lua_Integer ikey; int is_int; } okey;

static int cmp_okey(const void *a, const void *b) {
    const okey *x = a, *y = b;
    size_t m = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->s, y->s, m);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

static void encode_table(encoder *e, int idx, slot s) {
    lua_State *L = e->L;
    if (e->depth >= ENC_MAX_DEPTH) enc_error(e, "tables nested too deeply (does a table contain itself?)");
    if (!lua_checkstack(L, 8)) enc_error(e, "out of Lua stack");
    int kind = 0;   /* 1 array, 2 object, 0 decide from the keys */
    if (luaL_getmetafield(L, idx, "__jsontype") != LUA_TNIL) {
        const char *k = lua_tostring(L, -1);
        if (k && strcmp(k, "array") == 0) kind = 1;
        else if (k && strcmp(k, "object") == 0) kind = 2;
        else enc_error(e, "__jsontype must be \"array\" or \"object\"");
        lua_pop(L, 1);
    }
    lua_Integer nint = 0, nstr = 0, maxk = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING) nstr++;
        else if (lua_isinteger(L, -1)) {
            lua_Integer k = lua_tointeger(L, -1);
            nint++;
            if (k > maxk) maxk = k;
            if (k < 1 && kind != 2) enc_error(e, "array index below 1 (arrays are sequences 1..n)");
        } else {
            enc_error(e, lua_pushfstring(L, "table key of type %s cannot be a JSON key",
                                          luaL_typename(L, -1)));
        }
    }
    if (!kind) {
        if (nint && nstr) enc_error(e, "table mixes integer and string keys (mark it with json_object to write an object)");
        kind = nint ? 1 : 2;
    }
    int d = e->depth;   /* children sit at depth d + 1 */
    if (kind == 1) {
        if (nstr) enc_error(e, "array-marked table has string keys");
        /* Holes (from decoded nulls) become null; a mostly empty "array"
         * is more likely a mistake than data. */
        if (maxk > 2 * nint + 16) enc_error(e, "sparse array (use json_object for integer-keyed maps)");
        json_t *arr = json_array();
        place(e, s, arr);
        for (lua_Integer i = 1; i <= maxk; i++) {
            e->seg[d].key = NULL;
            e->seg[d].index = i;
            e->depth = d + 1;
            lua_rawgeti(L, idx, i);
            encode_value(e, lua_gettop(L), (slot){arr, NULL, 0});
            lua_pop(L, 1);
            e->depth = d;
        }
        return;
    }
    json_t *obj = json_object();
    place(e, s, obj);
    lua_Integer n = nint + nstr;
    if (n == 0) return;
    /* Keys in the order jansson writes them (bytewise, like Python's
     * sort_keys), so the first bad value found is the first one written;
     * integer keys become their decimal strings, anchored in a helper table. */
    okey *keys = lua_newuserdatauv(L, (size_t)n * sizeof *keys, 0);
    lua_createtable(L, (int)nint, 0);
    int anchor = lua_gettop(L), kidx = anchor - 1;
    lua_Integer k = 0, na = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING) {
            keys[k].s = lua_tolstring(L, -1, &keys[k].n);
            keys[k].is_int = 0;
        } else {
            keys[k].ikey = lua_tointeger(L, -1);
            keys[k].is_int = 1;
            lua_pushfstring(L, "%I", keys[k].ikey);
            keys[k].s = lua_tolstring(L, -1, &keys[k].n);
            lua_rawseti(L, anchor, ++na);
        }
        k++;
    }
    qsort(keys, (size_t)n, sizeof *keys, cmp_okey);
    for (lua_Integer i = 1; i < n; i++)
        if (cmp_okey(&keys[i - 1], &keys[i]) == 0)
            enc_error(e, lua_pushfstring(L, "integer key %s and string key \"%s\" spell the "
                                            "same JSON key", keys[i].s, keys[i].s));
    for (lua_Integer i = 0; i < n; i++) {
        /* A null holds the key's place first: jansson refuses a key that is
         * not UTF-8, and that is reported at the object, before its value. */
        json_t *hold = json_null();
        if (json_object_setn_new(obj, keys[i].s, keys[i].n, hold) < 0)
            enc_error(e, "string is not valid UTF-8");
        e->seg[d].key = keys[i].s;
        e->seg[d].klen = keys[i].n;
        e->depth = d + 1;
        if (keys[i].is_int) lua_rawgeti(L, idx, keys[i].ikey);
        else {
            lua_pushlstring(L, keys[i].s, keys[i].n);
            lua_rawget(L, idx);
        }
        encode_value(e, lua_gettop(L), (slot){obj, keys[i].s, keys[i].n});
        lua_pop(L, 1);
        e->depth = d;
    }
    lua_settop(L, kidx - 1);
}

static void encode_value(encoder *e, int idx, slot s) {
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: place(e, s, json_null()); break;
    case LUA_TBOOLEAN: place(e, s, json_boolean(lua_toboolean(L, idx))); break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            place(e, s, json_integer((json_int_t)lua_tointeger(L, idx)));
        } else {
            double v = lua_tonumber(L, idx);
            if (!isfinite(v)) enc_error(e, "NaN or infinity has no JSON spelling");
            place(e, s, json_real(v));
        }
        break;
    case LUA_TSTRING: {
        size_t n;
        const char *str = lua_tolstring(L, idx, &n);
        /* NULL for text that is not UTF-8 (no overlongs, surrogates or code
         * points past U+10FFFF); NUL bytes are kept, written as \u0000. */
        json_t *j = json_stringn(str, n);
        if (!j) enc_error(e, "string is not valid UTF-8");
        place(e, s, j);
        break;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL_SENTINEL) {
            place(e, s, json_null());
            break;
        }
        /* fallthrough */
    default:
        enc_error(e, lua_pushfstring(L, "cannot encode a %s", luaL_typename(L, idx)));
        break;
    case LUA_TTABLE: encode_table(e, idx, s); break;
    }
}

/* jansson writes a real as %.17g less its exponent's zeros
 * ("1.0000000000000001e-5") and escapes control characters in uppercase
 * hex ("\u001F"); Python's json.dumps, whose files must come back byte for
 * byte, writes "1e-05" and "\u001f".  Copy jansson's text to out with those
 * two respelled: a number with '.' or an exponent is a real, and the %.17g
 * text reads back as exactly the double, which ml_json_format_double
 * writes as before. */
static int restyle(char *s, size_t n, jbuf *out) {
    size_t i = 0, run = 0;   /* s[run..i) is still to be copied */
    while (i < n) {
        char c = s[i];
        if (c == '"') {
            /* jansson's only \u escapes are control characters ("\u00XX"). */
            for (i++; i < n && s[i] != '"'; i++) {
                if (s[i] != '\\') continue;
                i++;
                if (i + 4 < n && s[i] == 'u')
                    for (int k = 1; k <= 4; k++)
                        if (s[i + k] >= 'A' && s[i + k] <= 'F') s[i + k] += 'a' - 'A';
            }
            i++;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t j = i;
            int real = 0;
            for (; j < n; j++) {
                char d = s[j];
                if (d == '.' || d == 'e' || d == 'E') real = 1;
                else if (!(d == '-' || d == '+' || (d >= '0' && d <= '9'))) break;
            }
            if (real) {
                /* copied out: the text need not end in NUL after a number */
                char num[48], nb[48];
                if (j - i >= sizeof num) return -1;
                memcpy(num, s + i, j - i);
                num[j - i] = 0;
                if (jbuf_add(out, s + run, i - run) < 0 ||
                    ml_json_format_double(strtod(num, NULL), nb, sizeof nb) < 0 ||
                    jbuf_add(out, nb, strlen(nb)) < 0)
                    return -1;
                run = j;
            }
            i = j;
        } else {
            i++;
        }
    }
    return jbuf_add(out, s + run, n - run);
}

/* Encode the value at idx into a jbuf userdata pushed on the stack. */
static jbuf *encode_to_buffer(lua_State *L, int idx, int indent, const char *what) {
    json_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    box->j = NULL;
    luaL_setmetatable(L, JSON_BOX_MT);
    encoder *e = lua_newuserdatauv(L, sizeof *e, 0);
    e->L = L;
    e->root = box;
    e->depth = 0;
    e->what = what;
    encode_value(e, idx, (slot){NULL, NULL, 0});
    lua_pop(L, 1);
    jbuf *raw = push_jbuf(L);
    /* The tree holds no loop (the depth limit saw to that) and only UTF-8
     * text, so a failed dump is a failed allocation. */
    size_t flags = JSON_ENCODE_ANY | JSON_SORT_KEYS | JSON_INDENT(indent);
    if (json_dump_callback(box->j, jbuf_dump_cb, raw, flags) < 0)
        luaL_error(L, "%s: out of memory", what);
    json_decref(box->j);
    box->j = NULL;
    jbuf *out = push_jbuf(L);
    int rc = restyle(raw->p, raw->n, out);
    free(raw->p);   /* now, not when collected: it may be large */
    raw->p = NULL;
    if (rc < 0) luaL_error(L, "%s: out of memory", what);
    lua_replace(L, -3);   /* out where the box was */
    lua_pop(L, 1);
    return out;
}

static int opt_indent(lua_State *L, int opts, int def) {
    double v = mlua_opt_field_number(L, opts, "indent", def);
    if (v < 0 || v > 16 || v != floor(v)) luaL_error(L, "option 'indent' must be an integer 0..16");
    return (int)v;
}

static int l_json_encode(lua_State *L) {
    luaL_checkany(L, 1);
    int opts = lua_isnoneornil(L, 2) ? 0 : 2;
    if (opts) luaL_checktype(L, 2, LUA_TTABLE);
    int indent = opt_indent(L, opts, 0);
    jbuf *b = encode_to_buffer(L, 1, indent, "json_encode");
    lua_pushlstring(L, b->p ? b->p : "", b->n);
    return 1;
}

static int l_json_save(lua_State *L) {
    const char *path = mlua_check_path(L, 1, "json_save: path");
    luaL_checkany(L, 2);
    int opts = lua_isnoneornil(L, 3) ? 0 : 3;
    if (opts) luaL_checktype(L, 3, LUA_TTABLE);
    int indent = opt_indent(L, opts, 2);
    const char *what = lua_pushfstring(L, "json_save '%s'", path);
    jbuf *b = encode_to_buffer(L, 2, indent, what);
    if (jbuf_add(b, "\n", 1) < 0) return luaL_error(L, "%s: out of memory", what);
    if (ml_write_file_atomic(path, b->p, b->n) < 0) return mlua_error(L, NULL);
    return 0;
}

/* json_array([t]) / json_object([t]): mark (and return) a table. */
static int mark_table(lua_State *L, const char *mt) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
    }
    luaL_setmetatable(L, mt);
    return 1;
}
static int l_json_array(lua_State *L) { return mark_table(L, JSON_ARRAY_MT); }
static int l_json_object(lua_State *L) { return mark_table(L, JSON_OBJECT_MT); }

/* ---- folder saves (see atomic_file.h) ---------------------------------- */

/* folder_save_begin(dir) -> staging folder to write the new files under */
static int l_folder_save_begin(lua_State *L) {
    char *staging = ml_atomic_dir_begin(mlua_check_path(L, 1, "folder_save_begin: dir"));
    if (!staging) return mlua_error(L, NULL);
    lua_pushstring(L, staging);
    free(staging);
    return 1;
}

/* folder_save_commit(dir, staging): all the new files in, or an error */
static int l_folder_save_commit(lua_State *L) {
    if (ml_atomic_dir_commit(mlua_check_path(L, 1, "folder_save_commit: dir"),
                             mlua_check_path(L, 2, "folder_save_commit: staging")) < 0)
        return mlua_error(L, NULL);
    return 0;
}

static int l_folder_save_abort(lua_State *L) {
    ml_atomic_dir_abort(mlua_check_path(L, 1, "folder_save_abort: dir"));
    return 0;
}

/* folder_save_recover(dir) -> true when it finished an interrupted save */
static int l_folder_save_recover(lua_State *L) {
    int rc = ml_atomic_dir_recover(mlua_check_path(L, 1, "folder_save_recover: dir"));
    if (rc < 0) return mlua_error(L, NULL);
    lua_pushboolean(L, rc == 1);
    return 1;
}

/* ======================================================================== */

void mlua_open_io(lua_State *L) {
    static const luaL_Reg st_methods[] = {
        {"keys", st_keys}, {"has", st_has}, {"info", st_info}, {"get", st_get},
        {"metadata", st_metadata}, {"path", st_path}, {"close", st_close}, {NULL, NULL},
    };
    if (luaL_newmetatable(L, ST_META)) {
        luaL_newlib(L, st_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, st_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, st_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, st_len);
        lua_setfield(L, -2, "__len");
        lua_pushcfunction(L, st_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, JSON_ARRAY_MT)) {
        lua_pushliteral(L, "array");
        lua_setfield(L, -2, "__jsontype");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, JSON_OBJECT_MT)) {
        lua_pushliteral(L, "object");
        lua_setfield(L, -2, "__jsontype");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, JSON_BOX_MT)) {
        lua_pushcfunction(L, json_box_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, JBUF_MT)) {
        lua_pushcfunction(L, jbuf_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);

    static const luaL_Reg fns[] = {
        {"st_open", l_st_open}, {"st_open_model", l_st_open_model}, {"st_load", l_st_load},
        {"st_save", l_st_save}, {"json_decode", l_json_decode}, {"json_load", l_json_load},
        {"json_encode", l_json_encode}, {"json_save", l_json_save},
        {"json_array", l_json_array}, {"json_object", l_json_object},
        {"folder_save_begin", l_folder_save_begin}, {"folder_save_commit", l_folder_save_commit},
        {"folder_save_abort", l_folder_save_abort}, {"folder_save_recover", l_folder_save_recover},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
    lua_pushlightuserdata(L, NULL_SENTINEL);
    lua_setfield(L, -2, "json_null");
}
