/* safetensors.c — the safetensors reader (mmap'd, header validated on open)
 * and atomic writer (see safetensors.h). */
#include "safetensors.h"
#include "atomic_file.h"
#include "json_config.h"
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Every dtype name the format defines (sub-byte F4/F6 excepted), in the
 * order of the Python library's dtype enum: writers place wider dtypes
 * first by walking this order backwards. */
static const struct { const char *name; int size; int dtype; } k_st_dtypes[] = {
    {"BOOL", 1, ML_BOOL}, {"U8", 1, ML_U8}, {"I8", 1, -1}, {"F8_E5M2", 1, -1},
    {"F8_E4M3", 1, -1}, {"F8_E8M0", 1, -1}, {"I16", 2, -1}, {"U16", 2, -1},
    {"F16", 2, ML_F16}, {"BF16", 2, ML_BF16}, {"I32", 4, ML_I32}, {"U32", 4, -1},
    {"F32", 4, ML_F32}, {"C64", 8, -1}, {"F64", 8, ML_F64}, {"I64", 8, ML_I64},
    {"U64", 8, -1},
};
#define ST_NUM_DTYPES ((int)(sizeof k_st_dtypes / sizeof k_st_dtypes[0]))

static int st_dtype_lookup(const char *name) {
    for (int i = 0; i < ST_NUM_DTYPES; i++)
        if (strcmp(k_st_dtypes[i].name, name) == 0) return i;
    return -1;
}

static int st_dtype_of(ml_dtype dt) {
    for (int i = 0; i < ST_NUM_DTYPES; i++)
        if (k_st_dtypes[i].dtype == (int)dt) return i;
    return -1;
}

/* ---- the shared mapping ------------------------------------------------- */

/* One mmap of one file, shared by the handle and every zero-copy tensor; the
 * count is atomic because tensors may be released on loader threads. */
typedef struct {
    void *addr;
    size_t len;
    atomic_int refs;
} st_map;

static void map_unref(st_map *m) {
    if (m && atomic_fetch_sub(&m->refs, 1) == 1) {
        munmap(m->addr, m->len);
        free(m);
    }
}

static void map_release_cb(void *ctx, void *data, size_t nbytes) {
    (void)data;
    (void)nbytes;
    map_unref(ctx);
}

/* ---- the handle --------------------------------------------------------- */

typedef struct {
    char *path;
    int fd;                /* kept open: copies are read with pread, not through the map */
    uint64_t size;         /* the file's size when it was opened and checked */
    st_map *map;
    uint64_t data_start;   /* 8 + header length */
    uint64_t data_len;
} st_shard;

typedef struct {
    ml_st_info info;       /* first member: ml_st_info_at hands out &entry->info */
    int shard;
    uint64_t begin, end;   /* within the shard's data section */
} st_entry;

typedef struct {
    char *key, *value;
    int seq;               /* arrival order: among equal keys the first shard's wins */
} st_meta;

struct ml_st_file {
    char *path;
    st_shard *shards;
    int nshards;
    st_entry *entries;     /* sorted by name once open succeeds */
    int n, cap;
    st_meta *meta;         /* sorted by key once open succeeds */
    int nmeta, meta_cap;
};

void ml_st_close(ml_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free((char *)f->entries[i].info.name);
    free(f->entries);
    for (int i = 0; i < f->nshards; i++) {
        free(f->shards[i].path);
        if (f->shards[i].fd >= 0) close(f->shards[i].fd);
        map_unref(f->shards[i].map);
    }
    free(f->shards);
    for (int i = 0; i < f->nmeta; i++) {
        free(f->meta[i].key);
        free(f->meta[i].value);
    }
    free(f->meta);
    free(f->path);
    free(f);
}

const char *ml_st_path(const ml_st_file *f) { return f->path; }
int ml_st_count(const ml_st_file *f) { return f->n; }
const ml_st_info *ml_st_info_at(const ml_st_file *f, int i) {
    return (i >= 0 && i < f->n) ? &f->entries[i].info : NULL;
}
int ml_st_metadata_count(const ml_st_file *f) { return f->nmeta; }
const char *ml_st_metadata_key(const ml_st_file *f, int i) { return f->meta[i].key; }
const char *ml_st_metadata_value(const ml_st_file *f, int i) { return f->meta[i].value; }

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp(((const st_entry *)a)->info.name, ((const st_entry *)b)->info.name);
}
static int cmp_meta_key(const void *a, const void *b) {
    const st_meta *x = a, *y = b;
    int c = strcmp(x->key, y->key);
    return c ? c : (x->seq > y->seq) - (x->seq < y->seq);
}

/* Index of the first entry whose name is >= name. */
static int lower_bound(const ml_st_file *f, const char *name) {
    int lo = 0, hi = f->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(f->entries[mid].info.name, name) < 0) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

const ml_st_info *ml_st_find(const ml_st_file *f, const char *name) {
    int i = lower_bound(f, name);
    return (i < f->n && strcmp(f->entries[i].info.name, name) == 0) ? &f->entries[i].info : NULL;
}

const char *ml_st_metadata_get(const ml_st_file *f, const char *key) {
    int lo = 0, hi = f->nmeta;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->meta[mid].key, key);
        if (c == 0) return f->meta[mid].value;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Appended unsorted (a per-key lookup here made parsing quadratic in the
 * key count); finish() sorts and drops the later duplicates across shards. */
static int add_meta(ml_st_file *f, const char *key, const char *value) {
    if (f->nmeta == f->meta_cap) {
        int cap = f->meta_cap ? f->meta_cap * 2 : 16;
        if (cap < f->meta_cap) return ml_error("%s: too many metadata entries", f->path);
        st_meta *m = realloc(f->meta, (size_t)cap * sizeof *m);
        if (!m) return ml_error("%s: out of memory reading metadata", f->path);
        f->meta = m;
        f->meta_cap = cap;
    }
    st_meta *m = &f->meta[f->nmeta];
    m->key = strdup(key);
    m->value = strdup(value);
    m->seq = f->nmeta;
    if (!m->key || !m->value) {
        free(m->key);
        free(m->value);
        return ml_error("%s: out of memory reading metadata", f->path);
    }
    f->nmeta++;
    return 0;
}

static st_entry *new_entry(ml_st_file *f) {
    if (f->n == f->cap) {
        int cap = f->cap ? f->cap * 2 : 64;
        st_entry *e = realloc(f->entries, (size_t)cap * sizeof *e);
        if (!e) return ml_error_null("%s: out of memory reading the header", f->path);
        f->entries = e;
        f->cap = cap;
    }
    st_entry *e = &f->entries[f->n];
    memset(e, 0, sizeof *e);
    return e;
}

/* ---- header validation -------------------------------------------------- */

/* Read the entry `name` -> obj of shard `shard` into a new entry. */
static int parse_entry(ml_st_file *f, int shard, const char *path, const char *name, json_t *obj) {
    const st_shard *sh = &f->shards[shard];
    if (!json_is_object(obj))
        return ml_error("%s: header entry for tensor '%s' must be an object "
                        "with dtype, shape and data_offsets", path, name);
    json_t *jdt = json_object_get(obj, "dtype");
    json_t *jshape = json_object_get(obj, "shape");
    json_t *joff = json_object_get(obj, "data_offsets");
    if (!json_is_string(jdt))
        return ml_error("%s: tensor '%s' has no \"dtype\" string", path, name);
    if (!json_is_array(jshape))
        return ml_error("%s: tensor '%s' has no \"shape\" array", path, name);
    if (!json_is_array(joff))
        return ml_error("%s: tensor '%s' has no \"data_offsets\" array", path, name);

    int dti = st_dtype_lookup(json_string_value(jdt));
    if (dti < 0)
        return ml_error("%s: tensor '%s' has unknown dtype '%s'", path, name,
                        json_string_value(jdt));

    size_t ndim = json_array_size(jshape);
    if (ndim > ML_MAX_DIMS)
        return ml_error("%s: tensor '%s' has %zu dimensions; moonlit supports at most %d",
                        path, name, ndim, ML_MAX_DIMS);
    int64_t shape[ML_MAX_DIMS];
    uint64_t numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        json_t *v = json_array_get(jshape, d);
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return ml_error("%s: tensor '%s': shape entries must be non-negative integers",
                            path, name);
        shape[d] = json_integer_value(v);
        if (__builtin_mul_overflow(numel, (uint64_t)shape[d], &numel) || numel > (uint64_t)INT64_MAX)
            return ml_error("%s: tensor '%s': shape has too many elements", path, name);
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, (uint64_t)k_st_dtypes[dti].size, &nbytes))
        return ml_error("%s: tensor '%s': shape has too many elements", path, name);

    if (json_array_size(joff) != 2 || !json_is_integer(json_array_get(joff, 0)) ||
        !json_is_integer(json_array_get(joff, 1)))
        return ml_error("%s: tensor '%s': data_offsets must be two integers [begin, end]",
                        path, name);
    json_int_t b = json_integer_value(json_array_get(joff, 0));
    json_int_t e = json_integer_value(json_array_get(joff, 1));
    if (b < 0 || e < 0)
        return ml_error("%s: tensor '%s': negative data_offsets [%lld, %lld]", path, name,
                        (long long)b, (long long)e);
    if (e < b)
        return ml_error("%s: tensor '%s': data_offsets [%lld, %lld] end before they begin",
                        path, name, (long long)b, (long long)e);
    if ((uint64_t)e > sh->data_len)
        return ml_error("%s: tensor '%s': data_offsets [%lld, %lld] run past the end of the "
                        "data section (%llu bytes): the file is truncated or the header lies",
                        path, name, (long long)b, (long long)e, (unsigned long long)sh->data_len);
    if ((uint64_t)(e - b) != nbytes) {
        char shp[160];
        int k = snprintf(shp, sizeof shp, "[");
        for (size_t d = 0; d < ndim && k < (int)sizeof shp; d++)
            k += snprintf(shp + k, sizeof shp - (size_t)k, "%s%lld", d ? ", " : "", (long long)shape[d]);
        if (k < (int)sizeof shp) snprintf(shp + k, sizeof shp - (size_t)k, "]");
        return ml_error("%s: tensor '%s': shape %s of %s needs %llu bytes but data_offsets "
                        "[%lld, %lld] hold %lld", path, name, shp, k_st_dtypes[dti].name,
                        (unsigned long long)nbytes, (long long)b, (long long)e, (long long)(e - b));
    }

    st_entry *en = new_entry(f);
    if (!en) return -1;
    en->info.name = strdup(name);
    if (!en->info.name) return ml_error("%s: out of memory reading the header", path);
    f->n++;
    en->info.st_dtype = k_st_dtypes[dti].name;
    en->info.dtype = k_st_dtypes[dti].dtype;
    en->info.ndim = (int)ndim;
    memcpy(en->info.shape, shape, ndim * sizeof shape[0]);
    en->info.nbytes = nbytes;
    en->info.file = sh->path;
    en->shard = shard;
    en->begin = (uint64_t)b;
    en->end = (uint64_t)e;
    return 0;
}

typedef struct { uint64_t begin, end; int idx; } st_span;
static int cmp_span(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* No two tensors of a shard (entries first..n-1) may share bytes. */
static int check_overlaps(ml_st_file *f, int first, const char *path) {
    int cnt = f->n - first;
    if (cnt < 2) return 0;
    st_span *sp = malloc((size_t)cnt * sizeof *sp);
    if (!sp) return ml_error("%s: out of memory checking the header", path);
    int k = 0;
    for (int i = first; i < f->n; i++)
        if (f->entries[i].end > f->entries[i].begin)   /* empty tensors hold no bytes */
            sp[k++] = (st_span){f->entries[i].begin, f->entries[i].end, i};
    qsort(sp, (size_t)k, sizeof *sp, cmp_span);
    int rc = 0;
    for (int i = 1; i < k; i++) {
        if (sp[i].begin < sp[i - 1].end) {
            rc = ml_error("%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap in the "
                          "data section", path, f->entries[sp[i - 1].idx].info.name,
                          (unsigned long long)sp[i - 1].begin, (unsigned long long)sp[i - 1].end,
                          f->entries[sp[i].idx].info.name, (unsigned long long)sp[i].begin,
                          (unsigned long long)sp[i].end);
            break;
        }
    }
    free(sp);
    return rc;
}

/* Read exactly n bytes at off.  A short read means the file shrank since it
 * was opened: reported, where touching a truncated mapping would raise SIGBUS. */
static int read_full(int fd, void *buf, uint64_t n, uint64_t off, const char *path) {
    char *p = buf;
    while (n > 0) {
        size_t chunk = n > ((uint64_t)1 << 30) ? ((size_t)1 << 30) : (size_t)n;
        ssize_t r = pread(fd, p, chunk, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return ml_error("reading '%s' failed: %s", path, strerror(errno));
        if (r == 0)
            return ml_error("%s: the file ends at byte %llu, before the data its header "
                            "promises: it was truncated or rewritten while open", path,
                            (unsigned long long)off);
        p += r;
        n -= (uint64_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* Open one file (never blocking on a FIFO or device), map it, validate its
 * header, append its entries and metadata. */
static int add_shard(ml_st_file *f, const char *path) {
    st_shard *shards = realloc(f->shards, (size_t)(f->nshards + 1) * sizeof *shards);
    if (!shards) return ml_error("%s: out of memory", path);
    f->shards = shards;
    int si = f->nshards;
    st_shard *sh = &shards[si];
    memset(sh, 0, sizeof *sh);
    sh->fd = -1;
    sh->path = strdup(path);
    if (!sh->path) return ml_error("%s: out of memory", path);
    f->nshards++;

    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer forever; the type check below then refuses it. */
    sh->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (sh->fd < 0) return ml_error("cannot open safetensors file '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(sh->fd, &st) != 0) return ml_error("cannot stat '%s': %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return ml_error("'%s' is not a regular file (a %s): cannot read weights from it", path,
                        S_ISDIR(st.st_mode) ? "directory" : S_ISFIFO(st.st_mode) ? "FIFO"
                        : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "device" : "special file");
    int fl = fcntl(sh->fd, F_GETFL);
    if (fl >= 0) fcntl(sh->fd, F_SETFL, fl & ~O_NONBLOCK);
    uint64_t size = (uint64_t)st.st_size;
    sh->size = size;
    if (size < 8)
        return ml_error("%s: not a safetensors file: %llu bytes, fewer than the 8-byte header "
                        "length", path, (unsigned long long)size);
    /* Private and writable: in-place ops on zero-copy tensors get their own
     * pages (copy-on-write) instead of faulting or changing the file.
     * NORESERVE: pages never written cost no commit charge, so mapping a
     * checkpoint larger than RAM + swap still works.  Only zero-copy tensors
     * read through the map; the header and every copy use pread. */
    void *addr = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_NORESERVE, sh->fd, 0);
    if (addr == MAP_FAILED) return ml_error("cannot map '%s': %s", path, strerror(errno));
    sh->map = malloc(sizeof *sh->map);
    if (!sh->map) {
        munmap(addr, (size_t)size);
        return ml_error("%s: out of memory", path);
    }
    sh->map->addr = addr;
    sh->map->len = (size_t)size;
    atomic_init(&sh->map->refs, 1);

    unsigned char lenbuf[8];
    if (read_full(sh->fd, lenbuf, 8, 0, path) < 0) return -1;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
    if (hlen > size - 8)
        return ml_error("%s: header length %llu runs past the end of the file (%llu bytes): "
                        "truncated or not a safetensors file", path, (unsigned long long)hlen,
                        (unsigned long long)size);
    /* The Python library refuses larger headers (ML_ST_MAX_HEADER); a bigger
     * length field means a corrupt or foreign file, and parsing it would
     * only waste memory. */
    if (hlen > ML_ST_MAX_HEADER)
        return ml_error("%s: header length %llu is over the %llu-byte limit: not a safetensors "
                        "file", path, (unsigned long long)hlen, (unsigned long long)ML_ST_MAX_HEADER);
    if (hlen < 2) return ml_error("%s: header of %llu bytes is too short to be JSON", path,
                                  (unsigned long long)hlen);
    sh->data_start = 8 + hlen;
    sh->data_len = size - 8 - hlen;
    char *htext = malloc((size_t)hlen);
    if (!htext) return ml_error("%s: out of memory reading the %llu-byte header", path,
                                (unsigned long long)hlen);
    if (read_full(sh->fd, htext, hlen, 8, path) < 0) {
        free(htext);
        return -1;
    }

    json_error_t jerr;
    json_t *root = json_loadb(htext, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    free(htext);
    if (!root)
        return ml_error("%s: header is not valid JSON (line %d, column %d: %s)", path,
                        jerr.line, jerr.column, jerr.text);
    int rc = 0, first = f->n;
    if (!json_is_object(root)) {
        rc = ml_error("%s: header must be a JSON object of tensors", path);
        goto done;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(val)) {
                rc = ml_error("%s: __metadata__ must be an object of strings", path);
                goto done;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) {
                    rc = ml_error("%s: __metadata__ value of '%s' is not a string", path, mk);
                    goto done;
                }
                if ((rc = add_meta(f, mk, json_string_value(mv))) < 0) goto done;
            }
            continue;
        }
        if ((rc = parse_entry(f, si, path, key, val)) < 0) goto done;
    }
    rc = check_overlaps(f, first, path);
done:
    json_decref(root);
    return rc;
}

/* Sort names and metadata; a name in two shards is an error. */
static int finish(ml_st_file *f) {
    if (f->n > 1) qsort(f->entries, (size_t)f->n, sizeof *f->entries, cmp_entry_name);
    for (int i = 1; i < f->n; i++)
        if (strcmp(f->entries[i - 1].info.name, f->entries[i].info.name) == 0)
            return ml_error("%s: tensor '%s' appears in both '%s' and '%s'", f->path,
                            f->entries[i].info.name, f->entries[i - 1].info.file,
                            f->entries[i].info.file);
    if (f->nmeta > 1) qsort(f->meta, (size_t)f->nmeta, sizeof *f->meta, cmp_meta_key);
    int k = 0;
    for (int i = 0; i < f->nmeta; i++) {
        if (k > 0 && strcmp(f->meta[k - 1].key, f->meta[i].key) == 0) {
            free(f->meta[i].key);
            free(f->meta[i].value);
            continue;
        }
        f->meta[k++] = f->meta[i];
    }
    f->nmeta = k;
    return 0;
}

static ml_st_file *new_file(const char *path) {
    ml_st_file *f = calloc(1, sizeof *f);
    if (!f) return ml_error_null("%s: out of memory", path);
    f->path = strdup(path);
    if (!f->path) {
        free(f);
        return ml_error_null("%s: out of memory", path);
    }
    return f;
}

static ml_st_file *open_single(const char *path) {
    ml_st_file *f = new_file(path);
    if (!f) return NULL;
    if (add_shard(f, path) < 0 || finish(f) < 0) {
        ml_st_close(f);
        return NULL;
    }
    return f;
}

/* A shard name from a weight_map must stay inside the index's directory. */
static int shard_name_ok(const char *s) {
    if (!*s || s[0] == '/') return 0;
    for (const char *c = s; *c;) {
        const char *slash = strchr(c, '/');
        size_t len = slash ? (size_t)(slash - c) : strlen(c);
        if (len == 2 && c[0] == '.' && c[1] == '.') return 0;
        if (!slash) break;
        c = slash + 1;
    }
    return 1;
}

static char *join_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static ml_st_file *open_index(const char *index_path) {
    /* Reading a FIFO or device would block or never end. */
    struct stat st;
    if (stat(index_path, &st) == 0 && !S_ISREG(st.st_mode))
        return ml_error_null("'%s' is not a regular file: cannot read a safetensors index "
                             "from it", index_path);
    json_t *root = ml_json_load_file(index_path);
    if (!root) return NULL;
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        json_decref(root);
        return ml_error_null("%s: not a safetensors index: expected an object with a "
                             "\"weight_map\" object", index_path);
    }
    ml_st_file *f = new_file(index_path);
    const char *slash = strrchr(index_path, '/');
    char *dir = slash ? strndup(index_path, (size_t)(slash - index_path + (slash == index_path)))
                      : strdup(".");
    if (!f || !dir) goto fail;

    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        const char *file = json_string_value(v);
        if (!file) {
            ml_error("%s: weight_map entry '%s' must be a file name", index_path, name);
            goto fail;
        }
        if (!shard_name_ok(file)) {
            ml_error("%s: weight_map entry '%s' names '%s', which is not a file in the "
                     "index's directory", index_path, name, file);
            goto fail;
        }
        char *p = join_path(dir, file);
        if (!p) {
            ml_error("%s: out of memory", index_path);
            goto fail;
        }
        int seen = 0;
        for (int i = 0; i < f->nshards && !seen; i++) seen = strcmp(f->shards[i].path, p) == 0;
        int rc = seen ? 0 : add_shard(f, p);
        free(p);
        if (rc < 0) goto fail;
    }
    if (finish(f) < 0) goto fail;
    /* Every weight_map claim must hold: the tensor exists, in that shard. */
    json_object_foreach(wm, name, v) {
        const ml_st_info *in = ml_st_find(f, name);
        const char *file = json_string_value(v);
        if (!in) {
            ml_error("%s: weight_map puts tensor '%s' in '%s', but that file has no such tensor",
                     index_path, name, file);
            goto fail;
        }
        char *p = join_path(dir, file);
        int same = p && strcmp(p, in->file) == 0;
        free(p);
        if (!same) {
            ml_error("%s: weight_map puts tensor '%s' in '%s', but it is in '%s'", index_path,
                     name, file, in->file);
            goto fail;
        }
    }
    free(dir);
    json_decref(root);
    return f;
fail:
    free(dir);
    json_decref(root);
    ml_st_close(f);
    return NULL;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

ml_st_file *ml_st_open(const char *path) {
    if (!path || !*path) return ml_error_null("safetensors: empty path");
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return ml_st_open_model(path, NULL, NULL);
    if (ends_with(path, ".json")) return open_index(path);
    return open_single(path);
}

ml_st_file *ml_st_open_model(const char *dir, const char *basename, const char *variant) {
    if (!dir || !*dir) return ml_error_null("safetensors: empty model directory");
    if (variant && !*variant) variant = NULL;
    static const char *k_default_stems[] = {"diffusion_pytorch_model", "model"};
    char stem_buf[512];
    const char *stems[2];
    int nstems;
    if (basename) {
        size_t len = strlen(basename);
        if (ends_with(basename, ".safetensors")) len -= strlen(".safetensors");
        if (len == 0 || len >= sizeof stem_buf)
            return ml_error_null("safetensors: bad weights file name '%s'", basename);
        memcpy(stem_buf, basename, len);
        stem_buf[len] = 0;
        stems[0] = stem_buf;
        nstems = 1;
    } else {
        stems[0] = k_default_stems[0];
        stems[1] = k_default_stems[1];
        nstems = 2;
    }
    char tried[1536] = "";
    size_t tl = 0;
    for (int s = 0; s < nstems; s++) {
        char names[3][600];
        int nn = 0;
        if (variant) {
            snprintf(names[nn++], sizeof names[0], "%s.%s.safetensors", stems[s], variant);
            snprintf(names[nn++], sizeof names[0], "%s.safetensors.index.%s.json", stems[s], variant);
            snprintf(names[nn++], sizeof names[0], "%s.%s.safetensors.index.json", stems[s], variant);
        } else {
            snprintf(names[nn++], sizeof names[0], "%s.safetensors", stems[s]);
            snprintf(names[nn++], sizeof names[0], "%s.safetensors.index.json", stems[s]);
        }
        for (int i = 0; i < nn; i++) {
            char *p = join_path(dir, names[i]);
            if (!p) return ml_error_null("%s: out of memory", dir);
            if (access(p, F_OK) == 0) {
                ml_st_file *f = ends_with(p, ".json") ? open_index(p) : open_single(p);
                free(p);
                return f;
            }
            free(p);
            if (tl < sizeof tried)
                tl += (size_t)snprintf(tried + tl, sizeof tried - tl, "%s%s", tl ? ", " : "", names[i]);
        }
    }
    return ml_error_null("no safetensors weights in '%s'%s%s (looked for %s)", dir,
                         variant ? " for variant " : "", variant ? variant : "", tried);
}

/* ---- conversion --------------------------------------------------------- */

/* Bulk half-precision conversions without branches or tables, about twice
 * as fast as the scalar ml_f16_to_f32 / ml_f32_to_f16 of dtype.c, whose
 * results they reproduce bit for bit (checked over every input). */
static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t u = (uint32_t)(h & 0x7fff) << 13;          /* exponent+mantissa in f32 place */
    uint32_t e = u & 0x0f800000u;
    uint32_t normal = u + (112u << 23);                  /* rebias 15 -> 127 */
    uint32_t infnan = u + (224u << 23);
    /* Zero/subnormal: read the mantissa as 1.m * 2^-14, then subtract the
     * implicit 2^-14 (exact in f32). */
    uint32_t sub = f_bits(bits_f(u + (113u << 23)) - bits_f(113u << 23));
    uint32_t r = e == 0x0f800000u ? infnan : (e == 0 ? sub : normal);
    return bits_f(r | sign);
}

static inline uint16_t float_to_half(float f) {
    uint32_t u = f_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    /* Normal results: round to nearest even at bit 13, then rebias. */
    uint32_t norm = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
    /* Subnormal results: adding 0.5 puts the 10 result bits at the bottom
     * of the mantissa and the FPU rounds them to nearest even. */
    uint32_t sub = f_bits(bits_f(a) + 0.5f) - 0x3f000000u;
    uint32_t r = a < 0x38800000u ? sub : norm;
    r = a >= 0x477ff000u ? 0x7c00u : r;                  /* overflow -> inf */
    r = a > 0x7f800000u ? 0x7e00u : r;                   /* NaN */
    return (uint16_t)(r | sign);
}

void ml_st_convert(void *dst, ml_dtype dd, const void *src, ml_dtype sd, int64_t n) {
    const unsigned char *s = src;
    if (n <= 0) return;
    if (dd == sd) {
        memcpy(dst, src, (size_t)n * ml_dtype_size(sd));
        return;
    }
    /* Elements are read with memcpy: file data need not be aligned. */
    if (dd == ML_F32 && sd == ML_F16) {
        float *d = dst;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            d[i] = half_to_float(h);
        }
        return;
    }
    if (dd == ML_F32 && sd == ML_BF16) {
        float *d = dst;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            d[i] = ml_bf16_to_f32(h);
        }
        return;
    }
    if (sd == ML_F32 && dd == ML_F16) {
        uint16_t *d = dst;
        for (int64_t i = 0; i < n; i++) {
            float x;
            memcpy(&x, s + 4 * i, 4);
            d[i] = float_to_half(x);
        }
        return;
    }
    if (sd == ML_F32 && dd == ML_BF16) {
        uint16_t *d = dst;
        for (int64_t i = 0; i < n; i++) {
            float x;
            memcpy(&x, s + 4 * i, 4);
            d[i] = ml_f32_to_bf16(x);
        }
        return;
    }
    /* Everything else (rare: integer casts, f64) through double, staged in
     * an aligned buffer because ml_load_as_double indexes typed pointers. */
    size_t es = ml_dtype_size(sd);
    double stage[512];
    for (int64_t off = 0; off < n; off += 512) {
        int64_t k = n - off < 512 ? n - off : 512;
        memcpy(stage, s + off * (int64_t)es, (size_t)k * es);
        for (int64_t j = 0; j < k; j++)
            ml_store_from_double(dst, dd, off + j, ml_load_as_double(stage, sd, j));
    }
}

/* ---- loading ------------------------------------------------------------ */

static void missing_tensor_error(const ml_st_file *f, const char *name) {
    if (f->n == 0) {
        ml_error("%s: no tensor '%s' (the file holds no tensors)", f->path, name);
        return;
    }
    /* The names sorting next to it are the likeliest typos. */
    int i = lower_bound(f, name);
    const char *a = f->entries[i > 0 ? i - 1 : 0].info.name;
    const char *b = f->entries[i < f->n ? i : f->n - 1].info.name;
    if (a == b) ml_error("%s: no tensor '%s' among its %d tensors (nearest name: '%s')",
                         f->path, name, f->n, a);
    else ml_error("%s: no tensor '%s' among its %d tensors (nearest names: '%s', '%s')",
                  f->path, name, f->n, a, b);
}

/* The entry for name with its dtypes resolved, or NULL with the error set. */
static const st_entry *lookup_for_read(ml_st_file *f, const char *name, int *dt) {
    if (!f) return ml_error_null("safetensors: the file is closed");
    if (!name) return ml_error_null("%s: tensor name is NULL", f->path);
    const st_entry *e = (const st_entry *)ml_st_find(f, name);
    if (!e) {
        missing_tensor_error(f, name);
        return NULL;
    }
    if (e->info.dtype < 0)
        return ml_error_null("%s: tensor '%s' has dtype %s, which moonlit does not support "
                             "(it reads F32, F16, BF16, F64, I32, I64, U8, BOOL)",
                             e->info.file, name, e->info.st_dtype);
    if (*dt < 0) *dt = e->info.dtype;
    if (*dt >= ML_NUM_DTYPES) return ml_error_null("%s: tensor '%s': bad dtype %d", f->path, name, *dt);
    return e;
}

/* The shard must still be as long as when it was checked: data past a
 * truncation would read as SIGBUS through the map. */
static int check_still_whole(const st_shard *sh) {
    struct stat st;
    if (fstat(sh->fd, &st) != 0) return ml_error("cannot stat '%s': %s", sh->path, strerror(errno));
    if ((uint64_t)st.st_size < sh->size)
        return ml_error("%s: the file is now %llu bytes, %llu when it was opened: it was "
                        "truncated or rewritten while open", sh->path,
                        (unsigned long long)st.st_size, (unsigned long long)sh->size);
    return 0;
}

ml_tensor *ml_st_read(ml_st_file *f, const char *name, int dt) {
    const st_entry *e = lookup_for_read(f, name, &dt);
    if (!e) return NULL;
    const st_shard *sh = &f->shards[e->shard];
    ml_dtype src_dt = (ml_dtype)e->info.dtype;
    int64_t numel = (int64_t)(e->info.nbytes / ml_dtype_size(src_dt));
    uint64_t off = sh->data_start + e->begin;
    ml_tensor *t = ml_empty(e->info.ndim, e->info.shape, (ml_dtype)dt, ml_cpu());
    if (!t) return NULL;
    if (dt == (int)src_dt) {
        if (read_full(sh->fd, ml_data(t), e->info.nbytes, off, sh->path) < 0) goto fail;
        return t;
    }
    /* Converting: read in slices through a small buffer, not a second
     * full-size copy. */
    size_t es = ml_dtype_size(src_dt), des = ml_dtype_size((ml_dtype)dt);
    int64_t per = (int64_t)(((size_t)256 << 10) / es);   /* stays in L2 */
    void *stage = malloc((size_t)(numel < per ? numel : per) * es + 1);
    if (!stage) {
        ml_error("%s: out of memory reading tensor '%s'", sh->path, name);
        goto fail;
    }
    for (int64_t i = 0; i < numel; i += per) {
        int64_t k = numel - i < per ? numel - i : per;
        if (read_full(sh->fd, stage, (uint64_t)k * es, off + (uint64_t)i * es, sh->path) < 0) {
            free(stage);
            goto fail;
        }
        ml_st_convert((char *)ml_data(t) + i * (int64_t)des, (ml_dtype)dt, stage, src_dt, k);
    }
    free(stage);
    return t;
fail:
    ml_release(t);
    return NULL;
}

ml_tensor *ml_st_get(ml_st_file *f, const char *name, int dt) {
    const st_entry *e = lookup_for_read(f, name, &dt);
    if (!e) return NULL;
    ml_dtype src_dt = (ml_dtype)e->info.dtype;
    const st_shard *sh = &f->shards[e->shard];
    const char *src = (const char *)sh->map->addr + sh->data_start + e->begin;
    if (dt != (int)src_dt || e->info.nbytes == 0 || (uintptr_t)src % ml_dtype_size(src_dt) != 0)
        return ml_st_read(f, name, dt);
    if (check_still_whole(sh) < 0) return NULL;
    st_map *m = sh->map;
    atomic_fetch_add(&m->refs, 1);
    ml_storage *s = ml_storage_wrap((void *)src, (size_t)e->info.nbytes, ml_cpu(),
                                    map_release_cb, m);
    if (!s) {
        map_unref(m);
        return NULL;
    }
    int64_t strides[ML_MAX_DIMS];
    ml_contiguous_strides(e->info.ndim, e->info.shape, strides);
    ml_tensor *t = ml_from_storage(s, 0, e->info.ndim, e->info.shape, strides, src_dt);
    ml_storage_release(s);
    return t;
}

/* ---- saving ------------------------------------------------------------- */

typedef struct {
    const char *name;
    ml_tensor *t;
    ml_dtype out;
    int rank;              /* index into k_st_dtypes */
    uint64_t nbytes;
} save_item;

static int cmp_save_order(const void *a, const void *b) {
    const save_item *x = a, *y = b;
    if (x->rank != y->rank) return y->rank - x->rank;
    return strcmp(x->name, y->name);
}
static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Build the header text (unpadded) for items in file order. */
static char *build_header(const char *path, const save_item *items, int n, int nmeta,
                          const char *const *mk, const char *const *mv) {
    json_t *root = json_object();
    if (!root) return ml_error_null("%s: out of memory", path);
    char *text = NULL;
    if (nmeta > 0) {
        st_meta *order = malloc((size_t)nmeta * sizeof *order);
        json_t *md = json_object();
        if (!order || !md || json_object_set_new(root, "__metadata__", md) < 0) {
            free(order);
            ml_error("%s: out of memory", path);
            goto done;
        }
        /* Sorted keys keep the file identical from run to run. */
        for (int i = 0; i < nmeta; i++) order[i] = (st_meta){(char *)mk[i], (char *)mv[i], i};
        qsort(order, (size_t)nmeta, sizeof *order, cmp_meta_key);
        for (int i = 0; i < nmeta; i++) {
            json_t *s = json_string(order[i].value);
            if (!s || json_object_set_new(md, order[i].key, s) < 0) {
                ml_error("%s: metadata '%s' is not valid UTF-8 text", path, order[i].key);
                free(order);
                goto done;
            }
        }
        free(order);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const ml_tensor *t = items[i].t;
        json_t *e = json_object(), *shape = json_array(), *offs = json_array();
        int bad = !e || !shape || !offs;
        for (int d = 0; !bad && d < t->ndim; d++)
            bad = json_array_append_new(shape, json_integer(t->shape[d])) < 0;
        if (!bad)
            bad = json_array_append_new(offs, json_integer((json_int_t)off)) < 0 ||
                  json_array_append_new(offs, json_integer((json_int_t)(off + items[i].nbytes))) < 0 ||
                  json_object_set_new(e, "dtype", json_string(k_st_dtypes[items[i].rank].name)) < 0;
        /* set_new takes the reference even when it fails. */
        if (!bad) {
            bad = json_object_set_new(e, "shape", shape) < 0;
            shape = NULL;
            bad = json_object_set_new(e, "data_offsets", offs) < 0 || bad;
            offs = NULL;
        }
        json_decref(shape);
        json_decref(offs);
        if (bad) {
            json_decref(e);
            ml_error("%s: out of memory building the header", path);
            goto done;
        }
        if (json_object_set_new(root, items[i].name, e) < 0) {
            ml_error("%s: tensor name '%s' is not valid UTF-8", path, items[i].name);
            goto done;
        }
        off += items[i].nbytes;
    }
    text = json_dumps(root, JSON_COMPACT);
    if (!text) ml_error("%s: out of memory writing the header", path);
done:
    json_decref(root);
    return text;
}

/* Append one tensor's bytes, converted to items->out. */
static int write_tensor(ml_atomic_file *af, const save_item *it, void *stage, size_t stage_bytes) {
    if (it->nbytes == 0) return 0;
    /* Detach first: the copies below must not join an autograd graph. */
    ml_tensor *d = ml_detach(it->t);
    ml_tensor *c = d ? ml_contiguous(d) : NULL;
    ml_release(d);
    ml_tensor *h = c ? ml_to_device(c, ml_cpu()) : NULL;
    ml_release(c);
    if (h && !ml_is_contiguous(h)) {
        ml_tensor *hc = ml_contiguous(h);
        ml_release(h);
        h = hc;
    }
    if (!h) {
        char why[1024];
        snprintf(why, sizeof why, "%s", ml_last_error());
        return ml_error("%s: cannot read tensor '%s': %s", af->path, it->name, why);
    }
    int rc = 0;
    if (h->dtype == it->out) {
        rc = ml_atomic_write(af, ml_data(h), (size_t)it->nbytes);
    } else {
        size_t in_es = ml_dtype_size(h->dtype), out_es = ml_dtype_size(it->out);
        int64_t chunk = (int64_t)(stage_bytes / out_es), numel = ml_numel(h);
        const char *src = ml_data(h);
        for (int64_t off = 0; off < numel && rc == 0; off += chunk) {
            int64_t k = numel - off < chunk ? numel - off : chunk;
            ml_st_convert(stage, it->out, src + off * (int64_t)in_es, h->dtype, k);
            rc = ml_atomic_write(af, stage, (size_t)k * out_es);
        }
    }
    ml_release(h);
    return rc;
}

/* Written, such a file would fail every open (the reader's limit), so it is
 * refused up front. */
static void header_too_large(const char *path, const char *more, uint64_t bytes) {
    ml_error("%s: the header would take %s%llu bytes, over the %llu-byte limit of safetensors "
             "readers (st_open would refuse the file); nothing written: split the tensors over "
             "several files, or store less metadata", path, more, (unsigned long long)bytes,
             (unsigned long long)ML_ST_MAX_HEADER);
}

int ml_st_save(const char *path, int n, const char *const *names, ml_tensor *const *tensors,
               int nmeta, const char *const *meta_keys, const char *const *meta_values,
               int dt) {
    if (!path || !*path) return ml_error("safetensors save: empty path");
    if (n < 0 || (n > 0 && (!names || !tensors)))
        return ml_error("%s: bad tensor list (n=%d)", path, n);
    if (nmeta < 0 || (nmeta > 0 && (!meta_keys || !meta_values)))
        return ml_error("%s: bad metadata list (n=%d)", path, nmeta);
    if (dt >= 0 && (dt >= ML_NUM_DTYPES || !ml_dtype_is_float((ml_dtype)dt)))
        return ml_error("%s: can only convert to a float dtype on save (f32, f16, bf16, f64), "
                        "not %s", path, ml_dtype_short((ml_dtype)dt));
    for (int i = 0; i < nmeta; i++)
        if (!meta_keys[i] || !meta_values[i])
            return ml_error("%s: metadata entry %d is NULL", path, i);

    save_item *items = calloc((size_t)(n > 0 ? n : 1), sizeof *items);
    const char **sorted = calloc((size_t)(n + nmeta > 0 ? n + nmeta : 1), sizeof *sorted);
    void *stage = NULL;
    char *header = NULL;
    ml_atomic_file af = {.fd = -1};
    int rc = -1;
    if (!items || !sorted) {
        ml_error("%s: out of memory", path);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        ml_tensor *t = tensors[i];
        if (!names[i] || !t) {
            ml_error("%s: tensor %d has no %s", path, i, names[i] ? "tensor" : "name");
            goto done;
        }
        if (strcmp(names[i], "__metadata__") == 0) {
            ml_error("%s: '__metadata__' is reserved and cannot name a tensor", path);
            goto done;
        }
        ml_dtype out = (dt >= 0 && ml_dtype_is_float(t->dtype)) ? (ml_dtype)dt : t->dtype;
        int rank = st_dtype_of(out);
        if (rank < 0) {
            ml_error("%s: tensor '%s' has an unknown dtype", path, names[i]);
            goto done;
        }
        items[i] = (save_item){names[i], t, out, rank, (uint64_t)ml_numel(t) * ml_dtype_size(out)};
        sorted[i] = names[i];
    }
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_str_ptr);
    for (int i = 1; i < n; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            ml_error("%s: tensor name '%s' given twice", path, sorted[i]);
            goto done;
        }
    for (int i = 0; i < nmeta; i++) sorted[i] = meta_keys[i];
    qsort(sorted, (size_t)nmeta, sizeof *sorted, cmp_str_ptr);
    for (int i = 1; i < nmeta; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            ml_error("%s: metadata key '%s' given twice", path, sorted[i]);
            goto done;
        }
    qsort(items, (size_t)n, sizeof *items, cmp_save_order);

    /* The names and metadata alone already past the limit: refused before a
     * header that size is built (the exact check follows it). */
    uint64_t text_bytes = 0;
    for (int i = 0; i < n; i++) text_bytes += strlen(names[i]);
    for (int i = 0; i < nmeta; i++) text_bytes += strlen(meta_keys[i]) + strlen(meta_values[i]);
    if (text_bytes > ML_ST_MAX_HEADER) {
        header_too_large(path, "more than ", text_bytes);
        goto done;
    }
    header = build_header(path, items, n, nmeta, meta_keys, meta_values);
    if (!header) goto done;
    size_t hlen = strlen(header), padded = (hlen + 7) / 8 * 8;
    if (padded > ML_ST_MAX_HEADER) {
        header_too_large(path, "", padded);
        goto done;
    }
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++) prefix[i] = (unsigned char)(((uint64_t)padded >> (8 * i)) & 0xff);
    static const char spaces[8] = "        ";

    const size_t stage_bytes = (size_t)8 << 20;
    stage = malloc(stage_bytes);
    if (!stage) {
        ml_error("%s: out of memory", path);
        goto done;
    }
    if (ml_atomic_open(&af, path) < 0) goto done;
    if (ml_atomic_write(&af, prefix, 8) < 0 || ml_atomic_write(&af, header, hlen) < 0 ||
        ml_atomic_write(&af, spaces, padded - hlen) < 0)
        goto done;
    for (int i = 0; i < n; i++)
        if (write_tensor(&af, &items[i], stage, stage_bytes) < 0) goto done;
    rc = ml_atomic_commit(&af);
done:
    if (rc < 0) ml_atomic_abort(&af);
    free(header);
    free(stage);
    free(sorted);
    free(items);
    return rc;
}
