/* tokenizer.c — CLIP's byte-level BPE tokenizer (see tokenizer.h for the
 * pipeline and the behaviour it reproduces).
 *
 * Tables: token strings live in one arena indexed by id; token -> id and
 * (left id, right id) -> (rank, merged id) are open-addressing hash tables;
 * a word's BPE result is cached by its UTF-8 bytes, as prompts repeat the
 * same few hundred words. */
#include "tokenizer.h"
#include "error.h"
#include "json_config.h"

#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#define MAX_TOKEN_ID (1 << 24)
#define DEFAULT_MAX_LENGTH 77          /* CLIP's context length */
#define EOW "</w>"
#define EOW_LEN 4
/* Cache bounds: at most CACHE_MAX words (it is emptied when full, so memory
 * stays bounded however many distinct words go by); longer words are not
 * worth keeping. */
#define CACHE_SLOTS (1u << 15)
#define CACHE_MAX (CACHE_SLOTS / 2)
#define CACHE_WORD_MAX 256
/* GPT-2's byte alphabet maps bytes onto code points below this. */
#define BYTE_CHAR_LIMIT 324

enum { SP_BOS, SP_EOS, SP_PAD, SP_UNK, SP_COUNT };
static const char *const SP_KEY[SP_COUNT] = {"bos_token", "eos_token", "pad_token", "unk_token"};
static const char *const SP_DEFAULT[SP_COUNT] = {"<|startoftext|>", "<|endoftext|>",
                                                 "<|endoftext|>", "<|endoftext|>"};

typedef struct { uint64_t key; int32_t rank, id; } merge_slot;

typedef struct {
    uint64_t hash;
    uint32_t klen;
    int32_t n;
    int32_t *ids;          /* n ids followed by the klen key bytes (one allocation) */
} cache_slot;

struct ml_tokenizer {
    /* id -> token: tok_off[id] into arena (-1 where no token has that id) */
    char *arena;
    size_t arena_len, arena_cap;
    int64_t *tok_off;
    uint32_t *tok_len;
    int32_t n_ids;                 /* highest id + 1 */
    int32_t ids_cap;
    int32_t n_tokens;
    /* token -> id */
    int32_t *vslot;                /* id or -1 */
    uint32_t vmask;
    /* (left, right) -> merge */
    merge_slot *mslot;
    uint32_t mmask;
    int32_t n_merges;
    /* byte b as the first/middle symbol of a word, and as its last ("</w>") */
    int32_t byte_id[256], byte_eow_id[256];
    int16_t char_byte[BYTE_CHAR_LIMIT];
    /* added tokens, cut out of the raw text before anything else */
    int32_t *added;
    int n_added, added_cap;
    bool added_first[256];         /* first bytes of added tokens, for a fast scan */
    bool *special;                 /* [ids_cap] */
    ml_tokenizer_info info;
    /* word -> ids */
    pthread_mutex_t lock;
    cache_slot *cache;
    uint32_t cache_count;
};

/* Special-token names while loading, where each came from (for errors) and
 * that source's precedence: tokenizer_config.json > special_tokens_map.json >
 * tokenizer.json > the defaults. */
enum { PRIO_JSON = 1, PRIO_MAP, PRIO_CONFIG };
typedef struct {
    char *name[SP_COUNT];
    const char *from[SP_COUNT];
    int prio[SP_COUNT];
    int max_length;
} tok_config;

static int config_set(tok_config *cfg, int k, const char *name, const char *from, int prio) {
    if (prio <= cfg->prio[k]) return 0;
    char *copy = strdup(name);
    if (!copy) return ml_error("tokenizer: out of memory");
    free(cfg->name[k]);
    cfg->name[k] = copy;
    cfg->from[k] = from;
    cfg->prio[k] = prio;
    return 0;
}

/* ---- small helpers ------------------------------------------------------- */

static uint64_t hash_bytes(const void *p, size_t n) {
    const uint8_t *s = p;
    uint64_t h = 1469598103934665603ull;             /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33;
    return x;
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static bool is_white_space(int32_t c) {       /* Unicode White_Space (what \s matches) */
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static bool is_py_space(int32_t c) {          /* Python's str.isspace (what strip() drops) */
    return is_white_space(c) || (c >= 0x1C && c <= 0x1F);
}

/* The byte-level alphabet: printable Latin-1 bytes stand for themselves, the
 * 68 others (controls, space, DEL, NBSP, soft hyphen) take 256, 257, ... in
 * byte order, so a word's bytes never contain whitespace or controls. */
static bool byte_is_printable(int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

static int32_t byte_char(int b) {
    if (byte_is_printable(b)) return b;
    int k = 0;
    for (int i = 0; i < b; i++) k += !byte_is_printable(i);
    return 256 + k;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not
 * one; *bad_len gets the length of its maximal ill-formed prefix (at least
 * 1), the unit that one U+FFFD replaces (Unicode's "maximal subpart"). */
static int utf8_seq(const uint8_t *s, size_t n, int *bad_len) {
    uint8_t b = s[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    *bad_len = 1;
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) { need = 2; lo = 0xA0; }
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) need = 2;
    else if (b == 0xED) { need = 2; hi = 0x9F; }
    else if (b == 0xF0) { need = 3; lo = 0x90; }
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else if (b == 0xF4) { need = 3; hi = 0x8F; }
    else return 0;
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n || s[k] < lo || s[k] > hi) { *bad_len = k; return 0; }
        lo = 0x80; hi = 0xBF;
    }
    return need + 1;
}

/* Growable buffers of the encoder's scratch. */
typedef struct { void *p; size_t cap; } buf;

static void *buf_need(buf *b, size_t bytes) {
    if (bytes <= b->cap) return b->p;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < bytes) cap *= 2;
    void *p = realloc(b->p, cap);
    if (!p) return ml_error_null("tokenizer: out of memory (%zu bytes)", cap);
    b->p = p;
    b->cap = cap;
    return p;
}

/* ---- token table ----------------------------------------------------------- */

static int32_t vocab_find(const ml_tokenizer *tok, const char *s, size_t len) {
    if (!tok->vslot) return -1;
    for (uint32_t i = (uint32_t)hash_bytes(s, len) & tok->vmask;; i = (i + 1) & tok->vmask) {
        int32_t id = tok->vslot[i];
        if (id < 0) return -1;
        if (tok->tok_len[id] == len && memcmp(tok->arena + tok->tok_off[id], s, len) == 0) return id;
    }
}

static void vocab_insert(ml_tokenizer *tok, int32_t id) {
    const char *s = tok->arena + tok->tok_off[id];
    uint32_t i = (uint32_t)hash_bytes(s, tok->tok_len[id]) & tok->vmask;
    while (tok->vslot[i] >= 0) i = (i + 1) & tok->vmask;
    tok->vslot[i] = id;
}

static int vocab_grow(ml_tokenizer *tok) {
    uint32_t size = tok->vslot ? (tok->vmask + 1) * 2 : 1024;
    int32_t *slots = malloc(size * sizeof *slots);
    if (!slots) return ml_error("tokenizer: out of memory");
    memset(slots, 0xff, size * sizeof *slots);
    free(tok->vslot);
    tok->vslot = slots;
    tok->vmask = size - 1;
    for (int32_t id = 0; id < tok->n_ids; id++)
        if (tok->tok_off[id] >= 0) vocab_insert(tok, id);
    return 0;
}

/* Give token s the id `id`.  `what` names the source in errors. */
static int add_token(ml_tokenizer *tok, const char *s, size_t len, int64_t id, const char *what) {
    if (id < 0 || id >= MAX_TOKEN_ID)
        return ml_error("%s: token \"%.*s\" has id %lld (expected 0..%d)", what, (int)len, s,
                        (long long)id, MAX_TOKEN_ID - 1);
    int32_t have = vocab_find(tok, s, len);
    if (have == id) return 0;
    if (have >= 0)
        return ml_error("%s: token \"%.*s\" has two ids, %d and %lld", what, (int)len, s, have,
                        (long long)id);
    if (id < tok->n_ids && tok->tok_off[id] >= 0)
        return ml_error("%s: id %lld is given to both \"%s\" and \"%.*s\"", what, (long long)id,
                        tok->arena + tok->tok_off[id], (int)len, s);
    if (id >= tok->ids_cap) {
        int32_t cap = tok->ids_cap ? tok->ids_cap : 1024;
        while (cap <= id) cap *= 2;
        int64_t *off = realloc(tok->tok_off, cap * sizeof *off);
        if (off) tok->tok_off = off;
        uint32_t *lens = realloc(tok->tok_len, cap * sizeof *lens);
        if (lens) tok->tok_len = lens;
        bool *sp = realloc(tok->special, cap * sizeof *sp);
        if (sp) tok->special = sp;
        if (!off || !lens || !sp) return ml_error("tokenizer: out of memory");
        for (int32_t i = tok->ids_cap; i < cap; i++) { off[i] = -1; lens[i] = 0; sp[i] = false; }
        tok->ids_cap = cap;
    }
    if (tok->arena_len + len + 1 > tok->arena_cap) {
        size_t cap = tok->arena_cap ? tok->arena_cap : 1 << 16;
        while (cap < tok->arena_len + len + 1) cap *= 2;
        char *a = realloc(tok->arena, cap);
        if (!a) return ml_error("tokenizer: out of memory");
        tok->arena = a;
        tok->arena_cap = cap;
    }
    memcpy(tok->arena + tok->arena_len, s, len);
    tok->arena[tok->arena_len + len] = 0;
    tok->tok_off[id] = (int64_t)tok->arena_len;
    tok->tok_len[id] = (uint32_t)len;
    tok->arena_len += len + 1;
    if (id >= tok->n_ids) tok->n_ids = (int32_t)id + 1;
    tok->n_tokens++;
    if (!tok->vslot || (uint32_t)tok->n_tokens * 2 > tok->vmask + 1) return vocab_grow(tok);
    vocab_insert(tok, (int32_t)id);
    return 0;
}

/* ---- merges ------------------------------------------------------------------ */

static const merge_slot *merge_find(const ml_tokenizer *tok, int32_t left, int32_t right) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t i = (uint32_t)hash_u64(key) & tok->mmask;; i = (i + 1) & tok->mmask) {
        const merge_slot *m = &tok->mslot[i];
        if (m->rank < 0) return NULL;
        if (m->key == key) return m;
    }
}

/* Size the merge table for n merges (before adding them). */
static int merges_reserve(ml_tokenizer *tok, size_t n) {
    uint32_t size = 16;
    while (size < n * 2) size *= 2;
    tok->mslot = malloc(size * sizeof *tok->mslot);
    if (!tok->mslot) return ml_error("tokenizer: out of memory");
    for (uint32_t i = 0; i < size; i++) tok->mslot[i].rank = -1;
    tok->mmask = size - 1;
    return 0;
}

/* Merge number `n_merges` (its rank): "a b" -> "ab".  `where` names the
 * line/entry for errors.  A repeated pair keeps its first (best) rank. */
static int add_merge(ml_tokenizer *tok, const char *a, size_t alen, const char *b, size_t blen,
                     const char *where) {
    int32_t l = vocab_find(tok, a, alen), r = vocab_find(tok, b, blen);
    if (l < 0 || r < 0)
        return ml_error("%s: \"%.*s\" is not in the vocabulary", where,
                        (int)(l < 0 ? alen : blen), l < 0 ? a : b);
    char small[256];
    char *ab = alen + blen <= sizeof small ? small : malloc(alen + blen);
    if (!ab) return ml_error("tokenizer: out of memory");
    memcpy(ab, a, alen);
    memcpy(ab + alen, b, blen);
    int32_t id = vocab_find(tok, ab, alen + blen);
    if (id < 0) ml_error("%s: merged token \"%.*s\" is not in the vocabulary", where,
                         (int)(alen + blen), ab);
    if (ab != small) free(ab);
    if (id < 0) return -1;
    if ((uint32_t)tok->n_merges * 2 >= tok->mmask + 1)
        return ml_error("%s: more merges than announced", where);
    uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
    uint32_t i = (uint32_t)hash_u64(key) & tok->mmask;
    for (; tok->mslot[i].rank >= 0; i = (i + 1) & tok->mmask)
        if (tok->mslot[i].key == key) { tok->n_merges++; return 0; }
    tok->mslot[i] = (merge_slot){key, tok->n_merges++, id};
    return 0;
}

/* ---- loading --------------------------------------------------------------- */

static ml_tokenizer *tok_new(void) {
    ml_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) return ml_error_null("tokenizer: out of memory");
    pthread_mutex_init(&tok->lock, NULL);
    return tok;
}

static int load_vocab_obj(ml_tokenizer *tok, json_t *vocab, const char *what) {
    if (!json_is_object(vocab)) return ml_error("%s: expected an object of token -> id", what);
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        if (!json_is_integer(val))
            return ml_error("%s: id of token \"%s\" is not an integer", what, key);
        if (add_token(tok, key, strlen(key), json_integer_value(val), what) < 0) return -1;
    }
    if (tok->n_tokens == 0) return ml_error("%s: empty vocabulary", what);
    return 0;
}

static int load_vocab_file(ml_tokenizer *tok, const char *path) {
    json_t *root = ml_json_load_file(path);
    if (!root) return -1;
    int rc = load_vocab_obj(tok, root, path);
    json_decref(root);
    return rc;
}

static int load_merges_file(ml_tokenizer *tok, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return ml_error("%s: cannot open", path);
    char *text = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (text = malloc((size_t)size + 1)) && fread(text, 1, (size_t)size, f) != (size_t)size) {
        free(text);
        text = NULL;
    }
    fclose(f);
    if (!text) return ml_error("%s: cannot read", path);
    text[size] = 0;

    size_t lines = 1;
    for (long i = 0; i < size; i++) lines += text[i] == '\n';
    int rc = merges_reserve(tok, lines);
    char where[1100];
    char *p = text, *end = text + size;
    for (int lineno = 1; rc == 0 && p < end; lineno++) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *eol = nl ? nl : end;
        char *line = p;
        p = nl ? nl + 1 : end;
        if (eol > line && eol[-1] == '\r') eol--;
        if (eol == line) continue;
        if (lineno == 1 && eol - line >= 8 && memcmp(line, "#version", 8) == 0) continue;
        snprintf(where, sizeof where, "%s line %d", path, lineno);
        char *sp = memchr(line, ' ', (size_t)(eol - line));
        if (!sp || sp == line || sp + 1 == eol || memchr(sp + 1, ' ', (size_t)(eol - sp - 1))) {
            rc = ml_error("%s: expected two tokens separated by one space, got \"%.*s\"", where,
                          (int)(eol - line), line);
            break;
        }
        rc = add_merge(tok, line, (size_t)(sp - line), sp + 1, (size_t)(eol - sp - 1), where);
    }
    free(text);
    /* Without merges every word falls apart into single characters: ids
     * that load fine and mean nothing to the text encoder.  An empty file
     * is a broken download or a stub, not a tokenizer. */
    if (rc == 0 && tok->n_merges == 0)
        rc = ml_error("%s holds no merges (empty, or only its #version line)", path);
    return rc;
}

/* A special-token entry of a config: "text" or {"content": "text", ...}. */
static int config_token(json_t *v, const char *file, const char *key, const char **out) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v))
        return ml_error("%s: %s must be a string or {\"content\": string}", file, key);
    *out = json_string_value(v);
    return 0;
}

/* Added tokens are kept by id; their text is the token's. */
static int add_added(ml_tokenizer *tok, const char *s, size_t len, int64_t id, bool special,
                     const char *what) {
    if (add_token(tok, s, len, id, what) < 0) return -1;
    if (special) tok->special[id] = true;
    for (int i = 0; i < tok->n_added; i++)
        if (tok->added[i] == id) return 0;
    if (tok->n_added == tok->added_cap) {
        int cap = tok->added_cap ? tok->added_cap * 2 : 8;
        int32_t *a = realloc(tok->added, cap * sizeof *a);
        if (!a) return ml_error("tokenizer: out of memory");
        tok->added = a;
        tok->added_cap = cap;
    }
    tok->added[tok->n_added++] = (int32_t)id;
    tok->added_first[(uint8_t)s[0]] = true;
    return 0;
}

/* tokenizer.json: model.vocab, model.merges, added_tokens, model.unk_token. */
static int load_tokenizer_json(ml_tokenizer *tok, const char *path, tok_config *cfg) {
    json_t *root = ml_json_load_file(path);
    if (!root) return -1;
    int rc = -1;
    char what[1100];
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) { ml_error("%s: no \"model\" object", path); goto done; }
    const char *type = json_string_value(json_object_get(model, "type"));
    if (type && strcmp(type, "BPE") != 0) {
        ml_error("%s: model type is \"%s\", only BPE is supported", path, type);
        goto done;
    }
    const char *suffix = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if (!suffix || strcmp(suffix, EOW) != 0) {
        ml_error("%s: model.end_of_word_suffix is not \"" EOW "\" (not a CLIP tokenizer)", path);
        goto done;
    }
    snprintf(what, sizeof what, "%s model.vocab", path);
    if (load_vocab_obj(tok, json_object_get(model, "vocab"), what) < 0) goto done;

    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) { ml_error("%s: model.merges is not an array", path); goto done; }
    /* as in load_merges_file: no merges, no BPE */
    if (json_array_size(merges) == 0) {
        ml_error("%s: model.merges holds no merges (an empty array)", path);
        goto done;
    }
    if (merges_reserve(tok, json_array_size(merges)) < 0) goto done;
    size_t i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        snprintf(what, sizeof what, "%s model.merges[%zu]", path, i);
        const char *a, *b;
        size_t alen, blen;
        if (json_is_string(m)) {
            a = json_string_value(m);
            const char *sp = strchr(a, ' ');
            if (!sp || sp == a || !sp[1] || strchr(sp + 1, ' ')) {
                ml_error("%s: expected \"left right\", got \"%s\"", what, a);
                goto done;
            }
            alen = (size_t)(sp - a);
            b = sp + 1;
            blen = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            alen = strlen(a);
            blen = strlen(b);
        } else {
            ml_error("%s: expected \"left right\" or [left, right]", what);
            goto done;
        }
        if (add_merge(tok, a, alen, b, blen, what) < 0) goto done;
    }

    json_t *added = json_object_get(root, "added_tokens");
    json_array_foreach(added, i, m) {
        snprintf(what, sizeof what, "%s added_tokens[%zu]", path, i);
        const char *content = json_string_value(json_object_get(m, "content"));
        json_t *id = json_object_get(m, "id");
        if (!content || !content[0] || !json_is_integer(id)) {
            ml_error("%s: expected {\"id\": integer, \"content\": non-empty string}", what);
            goto done;
        }
        if (add_added(tok, content, strlen(content), json_integer_value(id),
                      json_is_true(json_object_get(m, "special")), what) < 0)
            goto done;
    }
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk && config_set(cfg, SP_UNK, unk, path, PRIO_JSON) < 0) goto done;
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* tokenizer_config.json / special_tokens_map.json: special-token names
 * (with precedence prio), model_max_length, added_tokens_decoder. */
static int load_config_file(ml_tokenizer *tok, const char *path, tok_config *cfg, int prio) {
    json_t *root = ml_json_load_file(path);
    if (!root) return -1;
    int rc = -1;
    if (!json_is_object(root)) { ml_error("%s: expected a JSON object", path); goto done; }
    for (int k = 0; k < SP_COUNT; k++) {
        json_t *v = json_object_get(root, SP_KEY[k]);
        if (!v || json_is_null(v)) continue;
        const char *name = NULL;
        if (config_token(v, path, SP_KEY[k], &name) < 0 ||
            config_set(cfg, k, name, path, prio) < 0)
            goto done;
    }
    json_t *ml = json_object_get(root, "model_max_length");
    if (ml && !json_is_number(ml)) {
        ml_error("%s: model_max_length is not a number", path);
        goto done;
    }
    /* HF writes 1e30 for "no limit": keep CLIP's 77 then. */
    if (ml && json_number_value(ml) >= 2 && json_number_value(ml) <= (1 << 20))
        cfg->max_length = (int)json_number_value(ml);

    json_t *dec = json_object_get(root, "added_tokens_decoder");
    const char *key;
    json_t *v;
    char what[1100];
    json_object_foreach(dec, key, v) {
        snprintf(what, sizeof what, "%s added_tokens_decoder[\"%s\"]", path, key);
        char *endp;
        long long id = strtoll(key, &endp, 10);
        const char *content = json_string_value(json_object_get(v, "content"));
        if (*endp || endp == key || !content || !content[0]) {
            ml_error("%s: expected an integer key and {\"content\": non-empty string}", what);
            goto done;
        }
        if (add_added(tok, content, strlen(content), id,
                      json_is_true(json_object_get(v, "special")), what) < 0)
            goto done;
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* Resolve the special tokens, register them as added tokens and fill the
 * byte tables. */
static int tok_finish(ml_tokenizer *tok, tok_config *cfg) {
    int32_t sid[SP_COUNT];
    for (int k = 0; k < SP_COUNT; k++) {
        const char *name = cfg->name[k] ? cfg->name[k] : SP_DEFAULT[k];
        sid[k] = vocab_find(tok, name, strlen(name));
        if (sid[k] < 0)
            return ml_error("%s: %s \"%s\" is not in the vocabulary",
                            cfg->from[k] ? cfg->from[k] : "tokenizer (default)", SP_KEY[k], name);
        if (add_added(tok, name, strlen(name), sid[k], true, "tokenizer") < 0) return -1;
    }
    tok->info = (ml_tokenizer_info){sid[SP_BOS], sid[SP_EOS], sid[SP_PAD], sid[SP_UNK],
                                    cfg->max_length ? cfg->max_length : DEFAULT_MAX_LENGTH,
                                    tok->n_ids};

    for (int c = 0; c < BYTE_CHAR_LIMIT; c++) tok->char_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        char s[8];
        int32_t c = byte_char(b);
        tok->char_byte[c] = (int16_t)b;
        utf8proc_ssize_t n = utf8proc_encode_char(c, (utf8proc_uint8_t *)s);
        memcpy(s + n, EOW, EOW_LEN);
        /* As HF: a byte missing from the vocabulary becomes the unk token. */
        tok->byte_id[b] = vocab_find(tok, s, (size_t)n);
        tok->byte_eow_id[b] = vocab_find(tok, s, (size_t)n + EOW_LEN);
        if (tok->byte_id[b] < 0) tok->byte_id[b] = sid[SP_UNK];
        if (tok->byte_eow_id[b] < 0) tok->byte_eow_id[b] = sid[SP_UNK];
    }
    tok->cache = calloc(CACHE_SLOTS, sizeof *tok->cache);
    if (!tok->cache) return ml_error("tokenizer: out of memory");
    return 0;
}

static void config_free(tok_config *cfg) {
    for (int k = 0; k < SP_COUNT; k++) free(cfg->name[k]);
}

/* Free tok and return NULL, keeping the error message already recorded. */
static ml_tokenizer *fail(ml_tokenizer *tok, tok_config *cfg) {
    config_free(cfg);
    ml_tokenizer_free(tok);
    return NULL;
}

ml_tokenizer *ml_tokenizer_load_files(const char *vocab_path, const char *merges_path) {
    tok_config cfg = {0};
    ml_tokenizer *tok = tok_new();
    if (!tok) return NULL;
    if (load_vocab_file(tok, vocab_path) < 0 || load_merges_file(tok, merges_path) < 0 ||
        tok_finish(tok, &cfg) < 0)
        return fail(tok, &cfg);
    config_free(&cfg);
    return tok;
}

ml_tokenizer *ml_tokenizer_load_json(const char *path) {
    tok_config cfg = {0};
    ml_tokenizer *tok = tok_new();
    if (!tok) return NULL;
    if (load_tokenizer_json(tok, path, &cfg) < 0 || tok_finish(tok, &cfg) < 0)
        return fail(tok, &cfg);
    config_free(&cfg);
    return tok;
}

ml_tokenizer *ml_tokenizer_load(const char *dir) {
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ml_error_null("tokenizer: %s is not a directory", dir);
    size_t n = strlen(dir) + 32;
    char *vocab = malloc(n), *merges = malloc(n), *json = malloc(n), *conf = malloc(n),
         *map = malloc(n);
    tok_config cfg = {0};
    ml_tokenizer *tok = vocab && merges && json && conf && map ? tok_new() : NULL;
    if (!tok) goto fail;
    snprintf(vocab, n, "%s/vocab.json", dir);
    snprintf(merges, n, "%s/merges.txt", dir);
    snprintf(json, n, "%s/tokenizer.json", dir);
    snprintf(conf, n, "%s/tokenizer_config.json", dir);
    snprintf(map, n, "%s/special_tokens_map.json", dir);

    if (file_exists(vocab) && file_exists(merges)) {
        if (load_vocab_file(tok, vocab) < 0 || load_merges_file(tok, merges) < 0) goto fail;
    } else if (file_exists(json)) {
        if (load_tokenizer_json(tok, json, &cfg) < 0) goto fail;
    } else {
        ml_error("tokenizer: %s has neither vocab.json + merges.txt nor tokenizer.json", dir);
        goto fail;
    }
    if (file_exists(conf) && load_config_file(tok, conf, &cfg, PRIO_CONFIG) < 0) goto fail;
    if (file_exists(map) && load_config_file(tok, map, &cfg, PRIO_MAP) < 0) goto fail;
    if (tok_finish(tok, &cfg) < 0) goto fail;
    config_free(&cfg);
    free(vocab); free(merges); free(json); free(conf); free(map);
    return tok;
fail:
    if (!tok && (!vocab || !merges || !json || !conf || !map)) ml_error("tokenizer: out of memory");
    free(vocab); free(merges); free(json); free(conf); free(map);
    return fail(tok, &cfg);
}

/* Empty the word cache; the caller holds tok->lock. */
static void cache_drop_all(ml_tokenizer *tok) {
    for (uint32_t i = 0; i < CACHE_SLOTS; i++) {
        free(tok->cache[i].ids);
        tok->cache[i] = (cache_slot){0};
    }
    tok->cache_count = 0;
}

void ml_tokenizer_clear_cache(ml_tokenizer *tok) {
    if (!tok || !tok->cache) return;
    pthread_mutex_lock(&tok->lock);
    cache_drop_all(tok);
    pthread_mutex_unlock(&tok->lock);
}

void ml_tokenizer_free(ml_tokenizer *tok) {
    if (!tok) return;
    ml_tokenizer_clear_cache(tok);
    free(tok->cache);
    pthread_mutex_destroy(&tok->lock);
    free(tok->arena);
    free(tok->tok_off);
    free(tok->tok_len);
    free(tok->vslot);
    free(tok->mslot);
    free(tok->added);
    free(tok->special);
    free(tok);
}

/* ---- BPE ------------------------------------------------------------------- */

typedef struct { int32_t rank, pos, left, right, id; } heap_item;

static bool heap_less(const heap_item *a, const heap_item *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(heap_item *h, int *n, heap_item x) {
    int i = (*n)++;
    while (i > 0 && heap_less(&x, &h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = x;
}

static heap_item heap_pop(heap_item *h, int *n) {
    heap_item top = h[0], x = h[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
        if (!heap_less(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
    return top;
}

static void push_pair(const ml_tokenizer *tok, heap_item *h, int *nh, const int32_t *sym,
                      int pos, int next) {
    const merge_slot *m = merge_find(tok, sym[pos], sym[next]);
    if (m) heap_push(h, nh, (heap_item){m->rank, pos, sym[pos], sym[next], m->id});
}

/* BPE of one word (n >= 1 bytes) into out[]; returns the number of ids.
 * Merges go lowest rank first, leftmost first among equal ranks, as HF's
 * BPE does.  scratch holds the symbol list and the heap. */
static int bpe_word(const ml_tokenizer *tok, const uint8_t *w, int n, int32_t *out, buf *scratch) {
    size_t need = (size_t)n * 3 * sizeof(int32_t) + (size_t)n * 3 * sizeof(heap_item);
    int32_t *sym = buf_need(scratch, need);
    if (!sym) return -1;
    int32_t *next = sym + n, *prev = next + n;
    heap_item *heap = (heap_item *)(prev + n);
    int nh = 0;
    for (int i = 0; i < n; i++) {
        sym[i] = i == n - 1 ? tok->byte_eow_id[w[i]] : tok->byte_id[w[i]];
        next[i] = i + 1 < n ? i + 1 : -1;
        prev[i] = i - 1;
    }
    for (int i = 0; i + 1 < n; i++) push_pair(tok, heap, &nh, sym, i, i + 1);
    while (nh > 0) {
        heap_item it = heap_pop(heap, &nh);
        int p = it.pos, r = next[p];
        /* Entries go stale when a neighbour merged first. */
        if (sym[p] != it.left || r < 0 || sym[r] != it.right) continue;
        sym[p] = it.id;
        sym[r] = -1;
        next[p] = next[r];
        if (next[r] >= 0) prev[next[r]] = p;
        if (prev[p] >= 0) push_pair(tok, heap, &nh, sym, prev[p], p);
        if (next[p] >= 0) push_pair(tok, heap, &nh, sym, p, next[p]);
    }
    int k = 0;
    for (int i = 0; i >= 0; i = next[i]) out[k++] = sym[i];
    return k;
}

/* ---- encoding ---------------------------------------------------------------- */

typedef struct { int32_t *ids; int cap, n; } sink;

static void sink_push(sink *s, int32_t id) {
    if (s->n < s->cap) s->ids[s->n] = id;
    s->n++;
}

typedef struct {
    buf nfc, cps, cls, word, bpe, ids;
} scratch;

/* Look the word up in the cache, else run BPE and remember it. */
static int encode_word(ml_tokenizer *tok, const uint8_t *w, int n, sink *out, scratch *sc) {
    uint64_t h = hash_bytes(w, (size_t)n);
    bool cacheable = n <= CACHE_WORD_MAX;
    if (cacheable) {
        pthread_mutex_lock(&tok->lock);
        for (uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1); tok->cache[i].ids;
             i = (i + 1) & (CACHE_SLOTS - 1)) {
            cache_slot *c = &tok->cache[i];
            if (c->hash == h && c->klen == (uint32_t)n &&
                memcmp(c->ids + c->n, w, (size_t)n) == 0) {
                for (int k = 0; k < c->n; k++) sink_push(out, c->ids[k]);
                pthread_mutex_unlock(&tok->lock);
                return 0;
            }
        }
        pthread_mutex_unlock(&tok->lock);
    }
    int32_t *ids = buf_need(&sc->ids, (size_t)n * sizeof *ids);
    if (!ids) return -1;
    int k = bpe_word(tok, w, n, ids, &sc->bpe);
    if (k < 0) return -1;
    for (int i = 0; i < k; i++) sink_push(out, ids[i]);
    if (!cacheable) return 0;

    int32_t *entry = malloc((size_t)k * sizeof *entry + (size_t)n);
    if (!entry) return 0;          /* the cache is an optimisation: skip it */
    memcpy(entry, ids, (size_t)k * sizeof *entry);
    memcpy(entry + k, w, (size_t)n);
    pthread_mutex_lock(&tok->lock);
    if (tok->cache_count >= CACHE_MAX) cache_drop_all(tok);
    uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);
    while (tok->cache[i].ids) {
        cache_slot *c = &tok->cache[i];
        if (c->hash == h && c->klen == (uint32_t)n && memcmp(c->ids + c->n, w, (size_t)n) == 0)
            break;                 /* another thread got there first */
        i = (i + 1) & (CACHE_SLOTS - 1);
    }
    if (tok->cache[i].ids) {
        free(entry);
    } else {
        tok->cache[i] = (cache_slot){h, (uint32_t)n, k, entry};
        tok->cache_count++;
    }
    pthread_mutex_unlock(&tok->lock);
    return 0;
}

/* Encode code points cps[a..b) as one word. */
static int emit_word(ml_tokenizer *tok, const int32_t *cps, int a, int b, sink *out, scratch *sc) {
    uint8_t *w = buf_need(&sc->word, (size_t)(b - a) * 4);
    if (!w) return -1;
    int n = 0;
    for (int i = a; i < b; i++) n += (int)utf8proc_encode_char(cps[i], w + n);
    return encode_word(tok, w, n, out, sc);
}

enum { CL_SPACE, CL_LETTER, CL_NUMBER, CL_OTHER };

static uint8_t cp_class(int32_t c) {
    if (is_white_space(c)) return CL_SPACE;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
        return CL_LETTER;
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
        return CL_NUMBER;
    default:
        return CL_OTHER;
    }
}

static bool cps_match(const int32_t *cps, int i, int m, const char *lit) {
    for (; *lit; lit++, i++)
        if (i >= m || cps[i] != (uint8_t)*lit) return false;
    return true;
}

/* NFC of s[0..len) into out; returns its length or -1.
 * utf8proc (2.8) wrongly composes a Hangul LV syllable with U+11A7, which is
 * no trailing consonant, and drops it.  U+11A7 is a starter that composes
 * with nothing, so normalising the text between its occurrences separately
 * gives the true NFC. */
static int64_t nfc(const char *s, size_t len, buf *out) {
    static const char T_BASE[] = "\xE1\x86\xA7";
    size_t n = 0;
    for (;;) {
        const char *t = memmem(s, len, T_BASE, 3);
        size_t piece = t ? (size_t)(t - s) : len;
        if (piece) {
            utf8proc_uint8_t *m;
            utf8proc_ssize_t k = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)piece,
                                              &m, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (k < 0) return ml_error("tokenizer: NFC failed: %s", utf8proc_errmsg(k));
            char *o = buf_need(out, n + (size_t)k + 3);
            if (o) memcpy(o + n, m, (size_t)k);
            free(m);
            if (!o) return -1;
            n += (size_t)k;
        }
        if (!t) return (int64_t)n;
        char *o = buf_need(out, n + 3);
        if (!o) return -1;
        memcpy(o + n, T_BASE, 3);
        n += 3;
        s = t + 3;
        len -= piece + 3;
    }
}

/* One stretch of text between added tokens: normalise, split, BPE. */
static int encode_segment(ml_tokenizer *tok, const char *text, size_t len, sink *out, scratch *sc) {
    bool ascii = true;
    for (size_t i = 0; i < len && ascii; i++) ascii = (uint8_t)text[i] < 0x80;
    const uint8_t *s = (const uint8_t *)text;
    if (!ascii) {
        int64_t n = nfc(text, len, &sc->nfc);
        if (n < 0) return -1;
        s = sc->nfc.p;
        len = (size_t)n;
    }
    /* Lowercasing can add a code point (U+0130), at most one per byte. */
    int32_t *cps = buf_need(&sc->cps, (len + 1) * sizeof *cps);
    uint8_t *cls = cps ? buf_need(&sc->cls, len + 1) : NULL;
    if (!cls) return -1;
    int m = 0;
    for (size_t i = 0; i < len;) {
        int32_t c;
        if (s[i] < 0x80) {
            c = s[i++];
            if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
        } else {
            i += (size_t)utf8proc_iterate(s + i, (utf8proc_ssize_t)(len - i), &c);
            /* Full lowercase mapping (SpecialCasing.txt): the one unconditional
             * mapping to two code points. */
            if (c == 0x130) { cps[m++] = 'i'; c = 0x307; }
            else c = utf8proc_tolower(c);
        }
        cps[m++] = c;
    }
    for (int i = 0; i < m; i++) cls[i] = cps[i] < 0x80 && cps[i] > 0x20 ?
        ((cps[i] >= 'a' && cps[i] <= 'z') || (cps[i] >= 'A' && cps[i] <= 'Z') ? CL_LETTER :
         cps[i] >= '0' && cps[i] <= '9' ? CL_NUMBER : CL_OTHER) : cp_class(cps[i]);

    for (int i = 0; i < m;) {
        int j = i + 1, rc = 0;
        if (cls[i] == CL_SPACE) { i++; continue; }
        if (cps[i] == '<' && (cps_match(cps, i, m, "<|startoftext|>") ||
                              cps_match(cps, i, m, "<|endoftext|>"))) {
            /* The pre-tokenizer keeps these whole, then its byte-level stage
             * re-splits them like any text: "<|", the name, "|>". */
            int name_end = i + 2;
            while (cps[name_end] != '|') name_end++;
            if (emit_word(tok, cps, i, i + 2, out, sc) < 0 ||
                emit_word(tok, cps, i + 2, name_end, out, sc) < 0 ||
                emit_word(tok, cps, name_end, name_end + 2, out, sc) < 0)
                return -1;
            i = name_end + 2;
            continue;
        }
        if (cps[i] == '\'' && i + 1 < m) {
            int32_t a = cps[i + 1], b = i + 2 < m ? cps[i + 2] : 0;
            if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
            else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                j = i + 3;
        }
        if (j == i + 1) {
            if (cls[i] == CL_LETTER || cls[i] == CL_OTHER)
                while (j < m && cls[j] == cls[i]) j++;
        }
        rc = emit_word(tok, cps, i, j, out, sc);
        if (rc < 0) return -1;
        i = j;
    }
    return 0;
}

/* The leftmost added token at or after text[from], the longest one there. */
static size_t find_added(const ml_tokenizer *tok, const char *text, size_t len, size_t from,
                         int32_t *id, size_t *mlen) {
    for (size_t i = from; i < len; i++) {
        if (!tok->added_first[(uint8_t)text[i]]) continue;
        size_t best = 0;
        for (int k = 0; k < tok->n_added; k++) {
            int32_t a = tok->added[k];
            size_t l = tok->tok_len[a];
            if (l > best && l <= len - i && memcmp(text + i, tok->arena + tok->tok_off[a], l) == 0) {
                best = l;
                *id = a;
            }
        }
        if (best) { *mlen = best; return i; }
    }
    return len;
}

int ml_tokenizer_encode(ml_tokenizer *tok, const char *text, size_t len, int32_t *ids, int cap,
                        int *n_out) {
    const uint8_t *u = (const uint8_t *)text;
    /* Code point counts are ints (lowercasing may double them). */
    if (len > (size_t)1 << 28) return ml_error("tokenizer: text of %zu bytes is too long", len);
    for (size_t i = 0; i < len;) {
        int bad, k = utf8_seq(u + i, len - i, &bad);
        if (!k) return ml_error("tokenizer: text is not valid UTF-8 (byte %zu: 0x%02x)", i, u[i]);
        i += (size_t)k;
    }
    sink out = {ids, cap < 0 ? 0 : cap, 0};
    scratch sc = {{0}};
    int rc = 0;
    sink_push(&out, tok->info.bos_id);
    for (size_t pos = 0; pos < len && rc == 0;) {
        int32_t id = -1;
        size_t mlen = 0, at = find_added(tok, text, len, pos, &id, &mlen);
        if (at > pos) rc = encode_segment(tok, text + pos, at - pos, &out, &sc);
        if (at < len) sink_push(&out, id);
        pos = at + mlen;
    }
    sink_push(&out, tok->info.eos_id);
    free(sc.nfc.p); free(sc.cps.p); free(sc.cls.p); free(sc.word.p); free(sc.bpe.p); free(sc.ids.p);
    if (rc < 0) return -1;
    *n_out = out.n;
    return 0;
}

int ml_tokenizer_fit(const ml_tokenizer *tok, int32_t *ids, int n, int length, bool truncate) {
    if (length < 2) return ml_error("tokenizer: max_length %d is too small (BOS + EOS need 2)", length);
    if (n > length) {
        if (!truncate)
            return ml_error("tokenizer: %d tokens exceed max_length %d (truncation is off)", n, length);
        ids[length - 1] = tok->info.eos_id;
        return 0;
    }
    for (int i = n; i < length; i++) ids[i] = tok->info.pad_id;
    return 0;
}

int ml_tokenizer_encode_padded(ml_tokenizer *tok, const char *text, size_t len, int32_t *ids,
                               int length) {
    int n;
    if (length < 2) return ml_error("tokenizer: max_length %d is too small (BOS + EOS need 2)", length);
    if (ml_tokenizer_encode(tok, text, len, ids, length, &n) < 0) return -1;
    return ml_tokenizer_fit(tok, ids, n, length, true);
}

int ml_tokenizer_encode_batch(ml_tokenizer *tok, const char *const *texts, const size_t *lens,
                              int n, int32_t *ids, int length, bool truncate) {
    if (length < 2) return ml_error("tokenizer: max_length %d is too small (BOS + EOS need 2)", length);
    for (int b = 0; b < n; b++) {
        int32_t *row = ids + (size_t)b * (size_t)length;
        int k;
        if (ml_tokenizer_encode(tok, texts[b], lens ? lens[b] : strlen(texts[b]), row, length, &k) < 0 ||
            ml_tokenizer_fit(tok, row, k, length, truncate) < 0)
            return ml_error("text %d of the batch: %s", b, ml_last_error());
    }
    return 0;
}

/* ---- decoding ---------------------------------------------------------------- */

char *ml_tokenizer_decode(const ml_tokenizer *tok, const int32_t *ids, int n, bool skip_special,
                          size_t *len_out) {
    size_t cap = 16;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n_ids || tok->tok_off[ids[i]] < 0)
            return ml_error_null("tokenizer: decode: id %d (position %d) is not in the vocabulary "
                                 "of %d", ids[i], i, tok->n_ids);
        cap += tok->tok_len[ids[i]];
    }
    /* Bytes: each token's characters turned back into bytes, or its UTF-8
     * as is when a character is outside the byte alphabet (as HF does). */
    uint8_t *bytes = malloc(cap);
    if (!bytes) return ml_error_null("tokenizer: out of memory");
    size_t nb = 0;
    for (int i = 0; i < n; i++) {
        if (skip_special && tok->special[ids[i]]) continue;
        const uint8_t *t = (const uint8_t *)tok->arena + tok->tok_off[ids[i]];
        size_t tl = tok->tok_len[ids[i]], start = nb;
        for (size_t j = 0; j < tl;) {
            int32_t c;
            j += (size_t)utf8proc_iterate(t + j, (utf8proc_ssize_t)(tl - j), &c);
            if (c < 0 || c >= BYTE_CHAR_LIMIT || tok->char_byte[c] < 0) {
                memcpy(bytes + start, t, tl);
                nb = start + tl;
                break;
            }
            bytes[nb++] = (uint8_t)tok->char_byte[c];
        }
    }
    /* Invalid UTF-8 -> U+FFFD (3 bytes for at least 1), "</w>" -> " ". */
    char *txt = malloc(nb * 3 + 1);
    if (!txt) { free(bytes); return ml_error_null("tokenizer: out of memory"); }
    size_t nt = 0;
    for (size_t i = 0; i < nb;) {
        int bad, k = utf8_seq(bytes + i, nb - i, &bad);
        if (k) {
            if (bytes[i] == '<' && nb - i >= EOW_LEN && memcmp(bytes + i, EOW, EOW_LEN) == 0) {
                txt[nt++] = ' ';
                i += EOW_LEN;
                continue;
            }
            memcpy(txt + nt, bytes + i, (size_t)k);
            nt += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(txt + nt, "\xEF\xBF\xBD", 3);
            nt += 3;
            i += (size_t)bad;
        }
    }
    free(bytes);
    /* strip() both ends */
    size_t a = 0, b = nt;
    while (a < b) {
        int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate((uint8_t *)txt + a, (utf8proc_ssize_t)(b - a), &c);
        if (!is_py_space(c)) break;
        a += (size_t)k;
    }
    while (b > a) {
        size_t k = b - 1;
        while (k > a && ((uint8_t)txt[k] & 0xC0) == 0x80) k--;
        int32_t c;
        utf8proc_iterate((uint8_t *)txt + k, (utf8proc_ssize_t)(b - k), &c);
        if (!is_py_space(c)) break;
        b = k;
    }
    memmove(txt, txt + a, b - a);
    txt[b - a] = 0;
    if (len_out) *len_out = b - a;
    return txt;
}

/* ---- lookups ------------------------------------------------------------------ */

ml_tokenizer_info ml_tokenizer_get_info(const ml_tokenizer *tok) { return tok->info; }

int32_t ml_tokenizer_token_to_id(const ml_tokenizer *tok, const char *token, size_t len) {
    return vocab_find(tok, token, len);
}

const char *ml_tokenizer_id_to_token(const ml_tokenizer *tok, int32_t id) {
    if (id < 0 || id >= tok->n_ids || tok->tok_off[id] < 0)
        return ml_error_null("tokenizer: id %d is not in the vocabulary of %d", id, tok->n_ids);
    return tok->arena + tok->tok_off[id];
}

bool ml_tokenizer_is_special(const ml_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_ids && tok->special[id];
}
