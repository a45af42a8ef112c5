/* pickle.c — a restricted, non-executing unpickler for torch checkpoints
 * (see pickle.h).
 *
 * The pickle is run on a small stack machine whose values are plain data
 * (none, bool, int, float, string, tuple/list, dict) plus three kinds that
 * stand for what torch would build: a storage (from the persistent id
 * ('storage', <StorageType>, key, location, numel)), a tensor (from
 * torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)) and
 * an opaque object (an allowed inert class, never instantiated).  REDUCE
 * only "calls" the allowed globals, by interpreting their arguments here.
 * Every value lives in one arena freed when the file is closed or the
 * parse fails, so error paths need no bookkeeping. */
#include "pickle.h"
#include "checked_math.h"
#include "error.h"
#include "zip.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { PV_NONE, PV_BOOL, PV_INT, PV_FLOAT, PV_STR, PV_TUPLE, PV_DICT, PV_GLOBAL, PV_STORAGE, PV_TENSOR,
               PV_OPAQUE, PV_MARK } pv_kind;

/* The globals a checkpoint may name. */
typedef enum { G_REBUILD_V2, G_REBUILD_V1, G_REBUILD_PARAM, G_STORAGE_TYPE, G_ORDERED_DICT, G_INERT } g_kind;

typedef struct pv {
    pv_kind kind;
    int64_t i;          /* int, bool; storage: numel; tensor: storage offset */
    double f;
    char *s;            /* str (NUL-terminated, length slen); storage: key */
    size_t slen;
    struct pv **items;  /* tuple/list items; dict: key, value, key, value ... */
    size_t n, cap;
    g_kind g;           /* global */
    int dtype;          /* global of a storage type, storage, tensor */
    struct pv *storage; /* tensor */
    int ndim;
    int64_t shape[ML_MAX_DIMS], stride[ML_MAX_DIMS];
    struct pv *next_alloc;
} pv;

typedef struct {
    char *name;
    pv *t;
} ckpt_tensor;

struct ml_ckpt {
    ml_zip *zip;
    char *root;        /* "<root>/" prefix of the archive's entries */
    pv *arena;
    pv *top;
    ckpt_tensor *tensors;
    int count;
};

static const struct { const char *module, *name; g_kind g; int dtype; } allowed[] = {
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_V2, -1},
    {"torch._utils", "_rebuild_tensor", G_REBUILD_V1, -1},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAM, -1},
    {"torch", "FloatStorage", G_STORAGE_TYPE, ML_F32},
    {"torch", "HalfStorage", G_STORAGE_TYPE, ML_F16},
    {"torch", "BFloat16Storage", G_STORAGE_TYPE, ML_BF16},
    {"torch", "DoubleStorage", G_STORAGE_TYPE, ML_F64},
    {"torch", "LongStorage", G_STORAGE_TYPE, ML_I64},
    {"torch", "IntStorage", G_STORAGE_TYPE, ML_I32},
    {"torch", "ByteStorage", G_STORAGE_TYPE, ML_U8},
    {"torch", "BoolStorage", G_STORAGE_TYPE, ML_BOOL},
    {"collections", "OrderedDict", G_ORDERED_DICT, -1},
    /* Named by the Lightning training state many SD checkpoints carry
     * (callbacks, numpy scalars in it); kept opaque, never built. */
    {"pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", G_INERT, -1},
    {"numpy.core.multiarray", "scalar", G_INERT, -1},
    {"numpy", "dtype", G_INERT, -1},
    {"_codecs", "encode", G_INERT, -1},
    {"builtins", "set", G_INERT, -1},
    {"__builtin__", "set", G_INERT, -1},
};

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    const char *what; /* "<file>: data.pkl" for messages */
    ml_ckpt *c;
    pv **stack;
    size_t sp, scap;
    pv **memo;
    size_t memo_cap;
} unpickler;

static pv *new_value(unpickler *u, pv_kind kind) {
    pv *v = calloc(1, sizeof *v);
    if (!v) return ml_error_null("%s: out of memory", u->what);
    v->kind = kind;
    v->next_alloc = u->c->arena;
    u->c->arena = v;
    return v;
}

static void free_arena(pv *v) {
    while (v) {
        pv *next = v->next_alloc;
        free(v->items);
        free(v->s);
        free(v);
        v = next;
    }
}

static int push(unpickler *u, pv *v) {
    if (!v) return -1;
    if (u->sp == u->scap) {
        size_t cap = u->scap ? u->scap * 2 : 64;
        pv **s = realloc(u->stack, cap * sizeof *s);
        if (!s) return ml_error("%s: out of memory", u->what);
        u->stack = s;
        u->scap = cap;
    }
    u->stack[u->sp++] = v;
    return 0;
}

static pv *pop(unpickler *u) {
    if (u->sp == 0 || u->stack[u->sp - 1]->kind == PV_MARK)
        return ml_error_null("%s: corrupt pickle (stack underflow at byte %zu)", u->what, u->pos);
    return u->stack[--u->sp];
}

static pv *top(unpickler *u) {
    if (u->sp == 0 || u->stack[u->sp - 1]->kind == PV_MARK)
        return ml_error_null("%s: corrupt pickle (empty stack at byte %zu)", u->what, u->pos);
    return u->stack[u->sp - 1];
}

static int append_item(unpickler *u, pv *seq, pv *item) {
    if (seq->n == seq->cap) {
        size_t cap = seq->cap ? seq->cap * 2 : 8;
        pv **it = realloc(seq->items, cap * sizeof *it);
        if (!it) return ml_error("%s: out of memory", u->what);
        seq->items = it;
        seq->cap = cap;
    }
    seq->items[seq->n++] = item;
    return 0;
}

/* Index of the topmost MARK, or -1 (error recorded). */
static long find_mark(unpickler *u) {
    for (size_t i = u->sp; i-- > 0;)
        if (u->stack[i]->kind == PV_MARK) return (long)i;
    return ml_error("%s: corrupt pickle (no MARK at byte %zu)", u->what, u->pos);
}

static int need(unpickler *u, size_t k) {
    if (u->n - u->pos < k) return ml_error("%s: truncated pickle (needs %zu more bytes at byte %zu)", u->what, k, u->pos);
    return 0;
}

static uint64_t le(const uint8_t *p, int k) {
    uint64_t v = 0;
    for (int i = k - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static pv *make_str(unpickler *u, const uint8_t *s, size_t len) {
    pv *v = new_value(u, PV_STR);
    if (!v) return NULL;
    v->s = malloc(len + 1);
    if (!v->s) return ml_error_null("%s: out of memory", u->what);
    memcpy(v->s, s, len);
    v->s[len] = 0;
    v->slen = len;
    return v;
}

static int memo_put(unpickler *u, uint64_t idx, pv *v) {
    if (!v) return -1;
    if (idx > u->n) return ml_error("%s: corrupt pickle (memo index %llu)", u->what, (unsigned long long)idx);
    if (idx >= u->memo_cap) {
        size_t cap = (size_t)idx * 2 + 16;
        pv **m = realloc(u->memo, cap * sizeof *m);
        if (!m) return ml_error("%s: out of memory", u->what);
        memset(m + u->memo_cap, 0, (cap - u->memo_cap) * sizeof *m);
        u->memo = m;
        u->memo_cap = cap;
    }
    u->memo[idx] = v;
    return 0;
}

static int memo_get(unpickler *u, uint64_t idx) {
    if (idx >= u->memo_cap || !u->memo[idx])
        return ml_error("%s: corrupt pickle (memo entry %llu unset)", u->what, (unsigned long long)idx);
    return push(u, u->memo[idx]);
}

static int make_global(unpickler *u, const char *module, const char *name) {
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++) {
        if (strcmp(allowed[i].module, module) == 0 && strcmp(allowed[i].name, name) == 0) {
            pv *g = new_value(u, PV_GLOBAL);
            if (!g) return -1;
            g->g = allowed[i].g;
            g->dtype = allowed[i].dtype;
            return push(u, g);
        }
    }
    return ml_error("%s: refused global '%s.%s': only torch tensor-rebuild records are read "
                    "(nothing in the file is executed); this file is not a plain weights checkpoint "
                    "and may be malicious", u->what, module, name);
}

/* A tuple of ints as a shape or stride. */
static int int_tuple(unpickler *u, const pv *t, int64_t *out, int *ndim, const char *what) {
    if (t->kind != PV_TUPLE || t->n > ML_MAX_DIMS)
        return ml_error("%s: tensor %s is not a tuple of at most %d ints", u->what, what, ML_MAX_DIMS);
    for (size_t i = 0; i < t->n; i++) {
        if (t->items[i]->kind != PV_INT) return ml_error("%s: tensor %s holds a non-integer", u->what, what);
        out[i] = t->items[i]->i;
    }
    *ndim = (int)t->n;
    return 0;
}

static pv *rebuild_tensor(unpickler *u, const pv *args) {
    if (args->kind != PV_TUPLE || args->n < 4 || args->items[0]->kind != PV_STORAGE || args->items[1]->kind != PV_INT)
        return ml_error_null("%s: malformed _rebuild_tensor arguments", u->what);
    pv *t = new_value(u, PV_TENSOR);
    if (!t) return NULL;
    t->storage = args->items[0];
    t->dtype = t->storage->dtype;
    t->i = args->items[1]->i;
    int nd_stride;
    if (int_tuple(u, args->items[2], t->shape, &t->ndim, "size") < 0 ||
        int_tuple(u, args->items[3], t->stride, &nd_stride, "stride") < 0)
        return NULL;
    if (nd_stride != t->ndim) return ml_error_null("%s: tensor size and stride differ in length", u->what);
    return t;
}

/* REDUCE: the "call" of an allowed global, interpreted. */
static pv *reduce(unpickler *u, const pv *fn, pv *args) {
    if (fn->kind != PV_GLOBAL || args->kind != PV_TUPLE)
        return ml_error_null("%s: corrupt pickle (REDUCE of a non-global at byte %zu)", u->what, u->pos);
    switch (fn->g) {
    case G_REBUILD_V2:
    case G_REBUILD_V1: return rebuild_tensor(u, args);
    case G_REBUILD_PARAM:
        if (args->n < 1 || args->items[0]->kind != PV_TENSOR)
            return ml_error_null("%s: malformed _rebuild_parameter arguments", u->what);
        return args->items[0];
    case G_ORDERED_DICT: return new_value(u, PV_DICT);
    case G_INERT: return new_value(u, PV_OPAQUE);
    case G_STORAGE_TYPE: break;
    }
    return ml_error_null("%s: corrupt pickle (a storage type called at byte %zu)", u->what, u->pos);
}

/* BINPERSID: ('storage', StorageType, key, location, numel). */
static pv *persistent_load(unpickler *u, const pv *pid) {
    if (pid->kind != PV_TUPLE || pid->n < 5 || pid->items[0]->kind != PV_STR || strcmp(pid->items[0]->s, "storage") != 0 ||
        pid->items[1]->kind != PV_GLOBAL || pid->items[1]->g != G_STORAGE_TYPE || pid->items[2]->kind != PV_STR ||
        pid->items[4]->kind != PV_INT || pid->items[4]->i < 0)
        return ml_error_null("%s: unsupported persistent id (expected ('storage', <torch storage type>, key, location, numel))",
                             u->what);
    pv *s = new_value(u, PV_STORAGE);
    if (!s) return NULL;
    s->dtype = pid->items[1]->dtype;
    s->s = strdup(pid->items[2]->s);
    if (!s->s) return ml_error_null("%s: out of memory", u->what);
    s->i = pid->items[4]->i;
    return s;
}

static int set_items(unpickler *u, pv *dict, size_t from) {
    if (dict->kind == PV_OPAQUE) {
        u->sp = from;
        return 0;
    }
    if (dict->kind != PV_DICT) return ml_error("%s: corrupt pickle (SETITEMS on a non-dict)", u->what);
    if ((u->sp - from) % 2) return ml_error("%s: corrupt pickle (odd SETITEMS)", u->what);
    for (size_t i = from; i < u->sp; i++)
        if (append_item(u, dict, u->stack[i]) < 0) return -1;
    u->sp = from;
    return 0;
}

/* Runs the pickle to STOP; the result is c->top. */
static int unpickle(unpickler *u) {
    for (;;) {
        if (need(u, 1) < 0) return -1;
        uint8_t op = u->p[u->pos++];
        const uint8_t *a = u->p + u->pos;
        long mark;
        pv *v, *w;
        switch (op) {
        case 0x80: if (need(u, 1) < 0) return -1; u->pos += 1; break;         /* PROTO */
        case 0x95: if (need(u, 8) < 0) return -1; u->pos += 8; break;         /* FRAME */
        case '.':                                                           /* STOP */
            if (!(u->c->top = pop(u))) return -1;
            return 0;
        case '(': if (push(u, new_value(u, PV_MARK)) < 0) return -1; break;   /* MARK */
        case 'N': if (push(u, new_value(u, PV_NONE)) < 0) return -1; break;
        case 0x88: case 0x89:                                               /* NEWTRUE, NEWFALSE */
            if (!(v = new_value(u, PV_BOOL))) return -1;
            v->i = op == 0x88;
            if (push(u, v) < 0) return -1;
            break;
        case 'K': case 'M': case 'J': {                                     /* BININT1, BININT2, BININT */
            int k = op == 'K' ? 1 : op == 'M' ? 2 : 4;
            if (need(u, (size_t)k) < 0 || !(v = new_value(u, PV_INT))) return -1;
            v->i = op == 'J' ? (int64_t)(int32_t)(uint32_t)le(a, 4) : (int64_t)le(a, k);
            u->pos += (size_t)k;
            if (push(u, v) < 0) return -1;
            break;
        }
        case 0x8a: {                                                        /* LONG1 */
            if (need(u, 1) < 0) return -1;
            int k = a[0];
            if (k > 8 || need(u, 1 + (size_t)k) < 0) return ml_error("%s: integer too large at byte %zu", u->what, u->pos);
            if (!(v = new_value(u, PV_INT))) return -1;
            uint64_t x = le(a + 1, k);
            if (k > 0 && k < 8 && (a[k] & 0x80)) x |= ~(uint64_t)0 << (8 * k);
            v->i = (int64_t)x;
            u->pos += 1 + (size_t)k;
            if (push(u, v) < 0) return -1;
            break;
        }
        case 'G': {                                                         /* BINFLOAT, big-endian */
            if (need(u, 8) < 0 || !(v = new_value(u, PV_FLOAT))) return -1;
            uint64_t x = 0;
            for (int i = 0; i < 8; i++) x = x << 8 | a[i];
            memcpy(&v->f, &x, 8);
            u->pos += 8;
            if (push(u, v) < 0) return -1;
            break;
        }
        case 'X': case 0x8c: case 0x8d: case 'U': case 'T': case 'C': case 'B': { /* strings and bytes */
            int k = (op == 0x8c || op == 'U' || op == 'C') ? 1 : op == 0x8d ? 8 : 4;
            if (need(u, (size_t)k) < 0) return -1;
            uint64_t len = le(a, k);
            if (len > u->n || need(u, (size_t)k + (size_t)len) < 0) return -1;
            if (push(u, make_str(u, a + k, (size_t)len)) < 0) return -1;
            u->pos += (size_t)k + (size_t)len;
            break;
        }
        case ')': if (push(u, new_value(u, PV_TUPLE)) < 0) return -1; break; /* EMPTY_TUPLE */
        case ']': case '}':                                                 /* EMPTY_LIST, EMPTY_DICT */
            if (push(u, new_value(u, op == '}' ? PV_DICT : PV_TUPLE)) < 0) return -1;
            break;
        case 0x85: case 0x86: case 0x87: {                                  /* TUPLE1..3 */
            size_t k = (size_t)(op - 0x84);
            if (u->sp < k) return ml_error("%s: corrupt pickle (stack underflow at byte %zu)", u->what, u->pos);
            if (!(v = new_value(u, PV_TUPLE))) return -1;
            for (size_t i = u->sp - k; i < u->sp; i++) {
                if (u->stack[i]->kind == PV_MARK) return ml_error("%s: corrupt pickle (MARK in tuple)", u->what);
                if (append_item(u, v, u->stack[i]) < 0) return -1;
            }
            u->sp -= k;
            if (push(u, v) < 0) return -1;
            break;
        }
        case 't': case 'l': case 'd':                                       /* TUPLE, LIST, DICT */
            if ((mark = find_mark(u)) < 0 || !(v = new_value(u, op == 'd' ? PV_DICT : PV_TUPLE))) return -1;
            if (op == 'd' && (u->sp - (size_t)mark - 1) % 2) return ml_error("%s: corrupt pickle (odd DICT)", u->what);
            for (size_t i = (size_t)mark + 1; i < u->sp; i++)
                if (append_item(u, v, u->stack[i]) < 0) return -1;
            u->sp = (size_t)mark;
            if (push(u, v) < 0) return -1;
            break;
        case 'a':                                                           /* APPEND */
            if (!(w = pop(u)) || !(v = top(u))) return -1;
            if (v->kind != PV_TUPLE) return ml_error("%s: corrupt pickle (APPEND to a non-list)", u->what);
            if (append_item(u, v, w) < 0) return -1;
            break;
        case 'e':                                                           /* APPENDS */
            if ((mark = find_mark(u)) < 0) return -1;
            if (mark == 0 || u->stack[mark - 1]->kind != PV_TUPLE) return ml_error("%s: corrupt pickle (APPENDS to a non-list)", u->what);
            for (size_t i = (size_t)mark + 1; i < u->sp; i++)
                if (append_item(u, u->stack[mark - 1], u->stack[i]) < 0) return -1;
            u->sp = (size_t)mark;
            break;
        case 's':                                                           /* SETITEM */
            if (u->sp < 3) return ml_error("%s: corrupt pickle (stack underflow at byte %zu)", u->what, u->pos);
            if (set_items(u, u->stack[u->sp - 3], u->sp - 2) < 0) return -1;
            break;
        case 'u':                                                           /* SETITEMS */
            if ((mark = find_mark(u)) < 0) return -1;
            if (mark == 0) return ml_error("%s: corrupt pickle (SETITEMS without a dict)", u->what);
            if (set_items(u, u->stack[mark - 1], (size_t)mark + 1) < 0) return -1;
            u->sp = (size_t)mark;
            break;
        case 'c': {                                                         /* GLOBAL "module\nname\n" */
            const uint8_t *nl1 = memchr(a, '\n', u->n - u->pos);
            const uint8_t *nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(u->p + u->n - nl1 - 1)) : NULL;
            if (!nl2 || nl2 - a > 1024) return ml_error("%s: corrupt pickle (GLOBAL at byte %zu)", u->what, u->pos);
            char module[1025], name[1025];
            memcpy(module, a, (size_t)(nl1 - a));
            module[nl1 - a] = 0;
            memcpy(name, nl1 + 1, (size_t)(nl2 - nl1 - 1));
            name[nl2 - nl1 - 1] = 0;
            u->pos = (size_t)(nl2 + 1 - u->p);
            if (make_global(u, module, name) < 0) return -1;
            break;
        }
        case 0x93:                                                          /* STACK_GLOBAL */
            if (!(w = pop(u)) || !(v = pop(u))) return -1;
            if (v->kind != PV_STR || w->kind != PV_STR) return ml_error("%s: corrupt pickle (STACK_GLOBAL)", u->what);
            if (make_global(u, v->s, w->s) < 0) return -1;
            break;
        case 'R':                                                           /* REDUCE */
            if (!(w = pop(u)) || !(v = pop(u))) return -1;
            if (push(u, reduce(u, v, w)) < 0) return -1;
            break;
        case 'Q':                                                           /* BINPERSID */
            if (!(v = pop(u))) return -1;
            if (push(u, persistent_load(u, v)) < 0) return -1;
            break;
        case 'b':                                                           /* BUILD: state of an opaque object or OrderedDict */
            if (!(w = pop(u)) || !top(u)) return -1;
            break;
        case 'q': case 'r':                                                 /* BINPUT, LONG_BINPUT */
            if (need(u, op == 'q' ? 1 : 4) < 0) return -1;
            if (memo_put(u, le(a, op == 'q' ? 1 : 4), top(u)) < 0) return -1;
            u->pos += op == 'q' ? 1 : 4;
            break;
        case 0x94:                                                          /* MEMOIZE */
            {
                size_t next = 0;
                while (next < u->memo_cap && u->memo[next]) next++;
                if (memo_put(u, next, top(u)) < 0) return -1;
            }
            break;
        case 'h': case 'j':                                                 /* BINGET, LONG_BINGET */
            if (need(u, op == 'h' ? 1 : 4) < 0) return -1;
            if (memo_get(u, le(a, op == 'h' ? 1 : 4)) < 0) return -1;
            u->pos += op == 'h' ? 1 : 4;
            break;
        case '0':                                                           /* POP */
            if (!pop(u)) return -1;
            break;
        default:
            return ml_error("%s: unsupported pickle opcode 0x%02x at byte %zu (only what torch.save writes for "
                            "tensors is read)", u->what, op, u->pos - 1);
        }
    }
}

void ml_ckpt_close(ml_ckpt *c) {
    if (!c) return;
    for (int i = 0; i < c->count; i++) free(c->tensors[i].name);
    free(c->tensors);
    free_arena(c->arena);
    free(c->root);
    ml_zip_close(c->zip);
    free(c);
}

static const pv *dict_get(const pv *d, const char *key) {
    if (!d || d->kind != PV_DICT) return NULL;
    for (size_t i = 0; i + 1 < d->n; i += 2)
        if (d->items[i]->kind == PV_STR && strcmp(d->items[i]->s, key) == 0) return d->items[i + 1];
    return NULL;
}

ml_ckpt *ml_ckpt_open(const char *path) {
    ml_ckpt *c = calloc(1, sizeof *c);
    if (!c) return ml_error_null("%s: out of memory", path);
    unpickler u = {0};
    uint8_t *pkl = NULL;
    char what[1200];
    if (!(c->zip = ml_zip_open(path))) goto fail;
    const ml_zip_entry *e = NULL;
    for (int i = 0; i < ml_zip_count(c->zip); i++) {
        const ml_zip_entry *x = ml_zip_entry_at(c->zip, i);
        size_t len = strlen(x->name);
        if ((len >= 9 && strcmp(x->name + len - 9, "/data.pkl") == 0) || strcmp(x->name, "data.pkl") == 0) {
            e = x;
            break;
        }
    }
    if (!e) {
        ml_error("%s: no data.pkl in the zip (not a torch.save checkpoint)", path);
        goto fail;
    }
    size_t root_len = strlen(e->name) - 8;
    /* Storages are read as this machine's (little-endian) bytes. */
    char bo_name[1100];
    snprintf(bo_name, sizeof bo_name, "%.*sbyteorder", (int)root_len, e->name);
    const ml_zip_entry *bo = ml_zip_find(c->zip, bo_name);
    char order[8] = {0};
    if (bo && bo->size < sizeof order && ml_zip_read(c->zip, bo, 0, order, (size_t)bo->size) == 0 &&
        strcmp(order, "big") == 0) {
        ml_error("%s: big-endian storages are not supported", path);
        goto fail;
    }
    if (!(c->root = malloc(root_len + 1))) { ml_error("%s: out of memory", path); goto fail; }
    memcpy(c->root, e->name, root_len);
    c->root[root_len] = 0;
    snprintf(what, sizeof what, "%s: %s", path, e->name);
    if (e->size > ((uint64_t)1 << 32)) { ml_error("%s: implausibly large (%llu bytes)", what, (unsigned long long)e->size); goto fail; }
    if (!(pkl = malloc(e->size ? (size_t)e->size : 1))) { ml_error("%s: out of memory", what); goto fail; }
    if (ml_zip_read(c->zip, e, 0, pkl, (size_t)e->size) < 0) goto fail;
    u.p = pkl;
    u.n = (size_t)e->size;
    u.what = what;
    u.c = c;
    if (unpickle(&u) < 0) goto fail;
    const pv *d = c->top;
    const pv *sd = dict_get(d, "state_dict");
    if (sd && sd->kind == PV_DICT) d = sd;
    if (!d || d->kind != PV_DICT) { ml_error("%s: the pickled object is not a dict of tensors", what); goto fail; }
    if (!(c->tensors = calloc(d->n / 2 + 1, sizeof *c->tensors))) { ml_error("%s: out of memory", what); goto fail; }
    for (size_t i = 0; i + 1 < d->n; i += 2) {
        if (d->items[i]->kind != PV_STR || d->items[i + 1]->kind != PV_TENSOR) continue;
        ckpt_tensor *t = &c->tensors[c->count];
        if (!(t->name = strdup(d->items[i]->s))) { ml_error("%s: out of memory", what); goto fail; }
        t->t = d->items[i + 1];
        c->count++;
    }
    free(pkl);
    free(u.stack);
    free(u.memo);
    return c;
fail:
    free(pkl);
    free(u.stack);
    free(u.memo);
    ml_ckpt_close(c);
    return NULL;
}

int ml_ckpt_count(const ml_ckpt *c) { return c->count; }
const char *ml_ckpt_name(const ml_ckpt *c, int i) { return i >= 0 && i < c->count ? c->tensors[i].name : NULL; }

int64_t ml_ckpt_int(const ml_ckpt *c, const char *key, int64_t fallback) {
    const pv *v = dict_get(c->top, key);
    return v && v->kind == PV_INT ? v->i : fallback;
}

ml_tensor *ml_ckpt_read(const ml_ckpt *c, int i) {
    if (i < 0 || i >= c->count) return ml_error_null("%s: no tensor %d", ml_zip_path(c->zip), i);
    const ckpt_tensor *ct = &c->tensors[i];
    const pv *t = ct->t, *s = t->storage;
    const char *path = ml_zip_path(c->zip);
    int64_t numel, expect[ML_MAX_DIMS], end;
    if (!ml_shape_numel_ok(t->ndim, t->shape, &numel))
        return ml_error_null("%s: tensor '%s' has an invalid or overflowing shape", path, ct->name);
    ml_contiguous_strides(t->ndim, t->shape, expect);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] > 1 && t->stride[d] != expect[d])
            return ml_error_null("%s: tensor '%s' is not contiguous in its storage (a view); re-save it with "
                                 "tensor.contiguous()", path, ct->name);
    if (t->i < 0 || !ml_add_i64(t->i, numel, &end) || end > s->i)
        return ml_error_null("%s: tensor '%s' (offset %lld, %lld elements) lies outside its storage of %lld elements",
                             path, ct->name, (long long)t->i, (long long)numel, (long long)s->i);
    char entry[1100];
    snprintf(entry, sizeof entry, "%sdata/%s", c->root, s->s);
    const ml_zip_entry *e = ml_zip_find(c->zip, entry);
    if (!e) return ml_error_null("%s: tensor '%s': storage entry '%s' missing from the zip", path, ct->name, entry);
    size_t es = ml_dtype_size((ml_dtype)t->dtype), nbytes, off, sbytes;
    if (!ml_mul_size((size_t)s->i, es, &sbytes) || sbytes != e->size)
        return ml_error_null("%s: storage '%s' holds %llu bytes, its record says %lld elements of %zu bytes", path,
                             entry, (unsigned long long)e->size, (long long)s->i, es);
    if (!ml_mul_size((size_t)numel, es, &nbytes) || !ml_mul_size((size_t)t->i, es, &off))
        return ml_error_null("%s: tensor '%s' is too large", path, ct->name);
    ml_tensor *out = ml_empty(t->ndim, t->shape, (ml_dtype)t->dtype, ml_cpu());
    if (!out) return NULL;
    if (nbytes && ml_zip_read(c->zip, e, off, ml_data(out), nbytes) < 0) {
        ml_release(out);
        return NULL;
    }
    return out;
}
