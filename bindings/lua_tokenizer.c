/* lua_tokenizer.c — the CLIP tokenizer in Lua: core.tokenizer_load(dir)
 * returns a Tokenizer (metatable "moonlit.Tokenizer").
 *
 *   tok:encode(text [, opts])          -> {49406, ..., 49407}
 *   tok:encode_batch(texts [, opts])   -> int64 tensor [B, L] when padded,
 *                                         else a list of id lists
 *   tok:decode(ids [, opts])           -> text (ids: list or 1-D tensor; a
 *                                         2-D tensor gives a list of texts)
 *   tok:vocab_size(), tok:token_to_id(s) (nil if unknown), tok:id_to_token(i)
 *   tok.bos, tok.eos, tok.pad, tok.unk, tok.max_length
 *   tok:close() (also __close / __gc)
 *
 * Options follow HF's tokenizer call: padding = "max_length" | "longest" |
 * true (= "longest") | false (default); max_length (default the model's,
 * 77); truncation (default: on when max_length is given, as HF does).
 * decode takes skip_special_tokens (default false).  Token ids are the
 * vocabulary's 0-based ids, not Lua indices. */
#include "mlua.h"
#include "tokenizer.h"
#include <stdlib.h>
#include <string.h>

#define MLUA_TOKENIZER "moonlit.Tokenizer"

typedef struct { ml_tokenizer *tok; } tok_box;

enum { PAD_NONE, PAD_LONGEST, PAD_MAX };

typedef struct {
    int padding;
    int max_length;
    bool truncate;
} encode_opts;

static ml_tokenizer *check_tok(lua_State *L, int idx) {
    tok_box *b = luaL_checkudata(L, idx, MLUA_TOKENIZER);
    if (!b->tok) luaL_error(L, "attempt to use a closed tokenizer");
    return b->tok;
}

static int tok_close(lua_State *L) {
    tok_box *b = luaL_checkudata(L, 1, MLUA_TOKENIZER);
    ml_tokenizer_free(b->tok);
    b->tok = NULL;
    return 0;
}

static int tok_tostring(lua_State *L) {
    tok_box *b = luaL_checkudata(L, 1, MLUA_TOKENIZER);
    if (!b->tok) {
        lua_pushliteral(L, "Tokenizer(closed)");
        return 1;
    }
    ml_tokenizer_info in = ml_tokenizer_get_info(b->tok);
    lua_pushfstring(L, "Tokenizer(vocab_size=%d, bos=%d, eos=%d, pad=%d, max_length=%d)",
                    in.vocab_size, (int)in.bos_id, (int)in.eos_id, (int)in.pad_id, in.max_length);
    return 1;
}

static encode_opts check_encode_opts(lua_State *L, int idx, const ml_tokenizer *tok) {
    encode_opts o = {PAD_NONE, ml_tokenizer_get_info(tok).max_length, false};
    if (lua_isnoneornil(L, idx)) return o;
    luaL_checktype(L, idx, LUA_TTABLE);

    lua_getfield(L, idx, "padding");
    if (lua_type(L, -1) == LUA_TBOOLEAN) {
        o.padding = lua_toboolean(L, -1) ? PAD_LONGEST : PAD_NONE;
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        const char *p = lua_tostring(L, -1);
        if (strcmp(p, "max_length") == 0) o.padding = PAD_MAX;
        else if (strcmp(p, "longest") == 0) o.padding = PAD_LONGEST;
        else if (strcmp(p, "do_not_pad") == 0) o.padding = PAD_NONE;
        else luaL_error(L, "option 'padding' must be \"max_length\", \"longest\", true or false (got \"%s\")", p);
    } else if (!lua_isnil(L, -1)) {
        luaL_error(L, "option 'padding' must be \"max_length\", \"longest\", true or false (got a %s)",
                   luaL_typename(L, -1));
    }
    lua_pop(L, 1);

    lua_getfield(L, idx, "max_length");
    bool has_max = !lua_isnil(L, -1);
    if (has_max) {
        int ok;
        lua_Integer m = lua_tointegerx(L, -1, &ok);
        if (!ok || m < 2 || m > (1 << 20))
            luaL_error(L, "option 'max_length' must be an integer >= 2 (BOS and EOS need two places)");
        o.max_length = (int)m;
    }
    lua_pop(L, 1);

    lua_getfield(L, idx, "truncation");
    if (lua_isnil(L, -1)) o.truncate = has_max;
    else if (lua_type(L, -1) == LUA_TBOOLEAN) o.truncate = lua_toboolean(L, -1);
    else luaL_error(L, "option 'truncation' must be a boolean (got a %s)", luaL_typename(L, -1));
    lua_pop(L, 1);
    return o;
}

/* Encode text into a buffer owned by Lua (pushed on the stack, so an error
 * frees it), truncated as opts say; room is left for max_length ids.
 * Returns the buffer, *n the id count. */
static int32_t *encode_one(lua_State *L, ml_tokenizer *tok, const char *text, size_t len,
                           const encode_opts *o, int *n) {
    int cap = o->max_length > 256 ? o->max_length : 256;
    for (;;) {
        int32_t *ids = lua_newuserdatauv(L, (size_t)cap * sizeof *ids, 0);
        if (ml_tokenizer_encode(tok, text, len, ids, cap, n) < 0) mlua_error(L, NULL);
        if (*n <= cap) {
            if (o->truncate && *n > o->max_length) {
                ml_tokenizer_fit(tok, ids, *n, o->max_length, true);
                *n = o->max_length;
            }
            return ids;
        }
        lua_pop(L, 1);
        cap = *n;
    }
}

static void pad_to(const ml_tokenizer *tok, int32_t *ids, int n, int length) {
    int32_t pad = ml_tokenizer_get_info(tok).pad_id;
    for (int i = n; i < length; i++) ids[i] = pad;
}

static void push_ids(lua_State *L, const int32_t *ids, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static int tok_encode(lua_State *L) {
    ml_tokenizer *tok = check_tok(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    encode_opts o = check_encode_opts(L, 3, tok);
    int n;
    int32_t *ids = encode_one(L, tok, text, len, &o, &n);
    if (o.padding == PAD_MAX && n < o.max_length) {
        pad_to(tok, ids, n, o.max_length);
        n = o.max_length;
    }
    push_ids(L, ids, n);
    return 1;
}

static int tok_encode_batch(lua_State *L) {
    ml_tokenizer *tok = check_tok(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    encode_opts o = check_encode_opts(L, 3, tok);
    int B = (int)luaL_len(L, 2);
    for (int b = 1; b <= B; b++) {
        if (lua_geti(L, 2, b) != LUA_TSTRING)
            luaL_error(L, "encode_batch: texts[%d] is a %s, expected a string", b, luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    /* Encode every row first (buffers stay on the stack), then build the
     * result, so that an error leaves no half-made tensor behind. */
    int base = lua_gettop(L);
    int *lens = lua_newuserdatauv(L, (size_t)(B ? B : 1) * sizeof *lens, 0);
    int longest = 0;
    luaL_checkstack(L, B + 8, "encode_batch: too many texts");
    for (int b = 0; b < B; b++) {
        size_t len;
        lua_geti(L, 2, b + 1);
        const char *text = lua_tolstring(L, -1, &len);
        encode_one(L, tok, text, len, &o, &lens[b]);
        lua_remove(L, -2);
        if (lens[b] > longest) longest = lens[b];
    }
    if (o.padding == PAD_NONE) {
        lua_createtable(L, B, 0);
        for (int b = 0; b < B; b++) {
            push_ids(L, lua_touserdata(L, base + 2 + b), lens[b]);
            lua_rawseti(L, -2, b + 1);
        }
        return 1;
    }
    int width = o.padding == PAD_MAX ? o.max_length : longest;
    if (o.padding == PAD_MAX && longest > width)
        luaL_error(L, "encode_batch: a text has %d tokens, more than max_length %d: pass truncation = true "
                   "or a larger max_length", longest, width);
    int64_t shape[2] = {B, width};
    ml_tensor *t = ml_empty(2, shape, ML_I64, ml_cpu());
    if (!t) return mlua_error(L, NULL);
    int64_t *out = ml_data(t);
    int32_t pad = ml_tokenizer_get_info(tok).pad_id;
    for (int b = 0; b < B; b++) {
        const int32_t *ids = lua_touserdata(L, base + 2 + b);
        for (int i = 0; i < width; i++) out[(int64_t)b * width + i] = i < lens[b] ? ids[i] : pad;
    }
    return mlua_push_tensor(L, t);
}

/* ids at idx (a list of integers) into a Lua-owned buffer. */
static int32_t *check_id_list(lua_State *L, int idx, int *n) {
    *n = (int)luaL_len(L, idx);
    int32_t *ids = lua_newuserdatauv(L, (size_t)(*n ? *n : 1) * sizeof *ids, 0);
    for (int i = 0; i < *n; i++) {
        lua_geti(L, idx, i + 1);
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < INT32_MIN || v > INT32_MAX)
            luaL_error(L, "decode: ids[%d] is not an integer token id", i + 1);
        ids[i] = (int32_t)v;
        lua_pop(L, 1);
    }
    return ids;
}

static void push_decoded(lua_State *L, const ml_tokenizer *tok, const int32_t *ids, int n, bool skip) {
    size_t len;
    char *s = ml_tokenizer_decode(tok, ids, n, skip, &len);
    if (!s) mlua_error(L, NULL);
    lua_pushlstring(L, s, len);
    free(s);
}

static int tok_decode(lua_State *L) {
    ml_tokenizer *tok = check_tok(L, 1);
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    bool skip = mlua_opt_field_bool(L, lua_istable(L, 3) ? 3 : 0, "skip_special_tokens", 0);
    if (lua_istable(L, 2)) {
        int n;
        int32_t *ids = check_id_list(L, 2, &n);
        push_decoded(L, tok, ids, n, skip);
        return 1;
    }
    ml_tensor *t = mlua_check_tensor(L, 2);
    if (t->ndim != 1 && t->ndim != 2)
        luaL_argerror(L, 2, "expected a list of ids or a 1-D/2-D tensor of ids");
    int rows = t->ndim == 2 ? (int)t->shape[0] : 1;
    int cols = (int)t->shape[t->ndim - 1];
    double *v = ml_to_doubles(t);
    if (!v) return mlua_error(L, NULL);
    int32_t *ids = lua_newuserdatauv(L, (size_t)(cols ? cols : 1) * sizeof *ids, 0);
    if (t->ndim == 2) lua_createtable(L, rows, 0);
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            double x = v[(int64_t)r * cols + c];
            ids[c] = x >= INT32_MIN && x <= INT32_MAX && x == (int32_t)x ? (int32_t)x : -1;
        }
        size_t len;
        char *s = ml_tokenizer_decode(tok, ids, cols, skip, &len);
        if (!s) {
            free(v);
            return mlua_error(L, NULL);
        }
        lua_pushlstring(L, s, len);
        free(s);
        if (t->ndim == 2) lua_rawseti(L, -2, r + 1);
    }
    free(v);
    return 1;
}

static int tok_vocab_size(lua_State *L) {
    lua_pushinteger(L, ml_tokenizer_get_info(check_tok(L, 1)).vocab_size);
    return 1;
}

static int tok_token_to_id(lua_State *L) {
    ml_tokenizer *tok = check_tok(L, 1);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    int32_t id = ml_tokenizer_token_to_id(tok, s, len);
    if (id < 0) lua_pushnil(L);
    else lua_pushinteger(L, id);
    return 1;
}

static int tok_id_to_token(lua_State *L) {
    ml_tokenizer *tok = check_tok(L, 1);
    lua_Integer id = luaL_checkinteger(L, 2);
    const char *s = id >= INT32_MIN && id <= INT32_MAX ? ml_tokenizer_id_to_token(tok, (int32_t)id) : NULL;
    if (!s) luaL_argerror(L, 2, lua_pushfstring(L, "id %I is not in the vocabulary of %d", id,
                                                ml_tokenizer_get_info(tok).vocab_size));
    lua_pushstring(L, s);
    return 1;
}

static const luaL_Reg TOK_METHODS[] = {
    {"encode", tok_encode},
    {"encode_batch", tok_encode_batch},
    {"decode", tok_decode},
    {"vocab_size", tok_vocab_size},
    {"token_to_id", tok_token_to_id},
    {"id_to_token", tok_id_to_token},
    {"close", tok_close},
    {NULL, NULL},
};

/* __index: methods (upvalue 1), then the fields bos/eos/pad/unk/max_length. */
static int tok_index(lua_State *L) {
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
    const char *k = lua_tostring(L, 2);
    if (!k) return 0;
    static const char *const FIELDS[] = {"bos", "eos", "pad", "unk", "max_length", NULL};
    int f = 0;
    while (FIELDS[f] && strcmp(FIELDS[f], k) != 0) f++;
    if (!FIELDS[f]) return 0;
    ml_tokenizer_info in = ml_tokenizer_get_info(check_tok(L, 1));
    int32_t v[] = {in.bos_id, in.eos_id, in.pad_id, in.unk_id, in.max_length};
    lua_pushinteger(L, v[f]);
    return 1;
}

static int l_tokenizer_load(lua_State *L) {
    const char *dir = mlua_check_path(L, 1, "tokenizer_load: dir");
    tok_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->tok = NULL;
    luaL_setmetatable(L, MLUA_TOKENIZER);
    b->tok = ml_tokenizer_load(dir);
    if (!b->tok) return mlua_error(L, NULL);
    return 1;
}

void mlua_open_tokenizer(lua_State *L) {
    if (luaL_newmetatable(L, MLUA_TOKENIZER)) {
        luaL_newlib(L, TOK_METHODS);
        lua_pushcclosure(L, tok_index, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, tok_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, tok_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, tok_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_tokenizer_load);
    lua_setfield(L, -2, "tokenizer_load");
}
