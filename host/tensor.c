/* tensor.c — tensor headers, storage lifetime, creation, views and copies.
 * The view functions record autograd nodes so gradients flow through them;
 * their backward functions sit next to them. */
#include "tensor.h"
#include "autograd.h"
#include "checked_math.h"
#include "device.h"
#include "ops.h"
#include "profile.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- devices ------------------------------------------------------------ */

int ml_device_parse(const char *s, ml_device *out) {
    if (!s) return ml_error("device: expected a string like \"cpu\" or \"cuda:0\"");
    if (strcmp(s, "cpu") == 0) { *out = ml_cpu(); return 0; }
    if (strncmp(s, "cuda", 4) == 0) {
        int idx = 0;
        if (s[4] == ':') {
            char *end;
            long v = strtol(s + 5, &end, 10);
            if (*end || end == s + 5 || v < 0 || v > 127)
                return ml_error("device: bad cuda index in '%s'", s);
            idx = (int)v;
        } else if (s[4]) return ml_error("device: unknown device '%s' (expected cpu, cuda or cuda:N)", s);
        out->type = ML_CUDA; out->index = (int8_t)idx;
        return 0;
    }
    return ml_error("device: unknown device '%s' (expected cpu, cuda or cuda:N)", s);
}

void ml_device_str(ml_device d, char *buf, size_t n) {
    if (d.type == ML_CPU) snprintf(buf, n, "cpu");
    else snprintf(buf, n, "cuda:%d", d.index);
}

bool ml_device_available(ml_device dev) {
    if (dev.type == ML_CPU) return true;
#ifdef ML_WITH_CUDA
    return dev.index < ml_cuda_device_count();
#else
    return false;
#endif
}

#define CPU_ALLOC_MAX ((size_t)1 << 48)

void *ml_device_alloc(ml_device dev, size_t nbytes) {
    if (dev.type == ML_CPU) {
        void *p = NULL;
        size_t n;
        if (!ml_round_up_size(nbytes, 64, &n))
            return ml_error_null("cannot allocate %zu bytes on the CPU: the size overflows", nbytes);
        /* More than a 48-bit address space can never succeed; refusing it
         * here also keeps such requests away from allocators that abort on
         * them (AddressSanitizer's does) instead of returning NULL. */
        if (n > CPU_ALLOC_MAX)
            return ml_error_null("out of CPU memory: could not allocate %zu bytes (more than the %llu-byte "
                                 "address space)", nbytes, (unsigned long long)CPU_ALLOC_MAX);
        if (posix_memalign(&p, 64, n ? n : 64) != 0)
            return ml_error_null("out of CPU memory: could not allocate %zu bytes", nbytes);
        return p;
    }
#ifdef ML_WITH_CUDA
    return ml_cuda_malloc(dev.index, nbytes);
#else
    return ml_error_null("cuda:%d requested but this moonlit was built without CUDA", dev.index);
#endif
}

void ml_device_free(ml_device dev, void *p, size_t nbytes) {
    if (!p) return;
    if (dev.type == ML_CPU) { free(p); return; }
#ifdef ML_WITH_CUDA
    ml_cuda_free(dev.index, p, nbytes);
#endif
}

int ml_device_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n) {
    if (n == 0) return 0;
    if (ddev.type == ML_CPU && sdev.type == ML_CPU) { memcpy(dst, src, n); return 0; }
#ifdef ML_WITH_CUDA
    return ml_cuda_memcpy(dst, ddev, src, sdev, n);
#else
    return ml_error("copy involving a cuda device, but this moonlit was built without CUDA");
#endif
}

/* ---- storage ------------------------------------------------------------ */

/* Live storages and the bytes they own, per device type: tests use them to
 * prove that training loops release everything they allocate. */
static _Atomic long long g_live_storages, g_live_bytes[2];

void ml_storage_stats(long long *count, long long *cpu_bytes, long long *cuda_bytes) {
    if (count) *count = g_live_storages;
    if (cpu_bytes) *cpu_bytes = g_live_bytes[ML_CPU];
    if (cuda_bytes) *cuda_bytes = g_live_bytes[ML_CUDA];
}

ml_storage *ml_storage_new(size_t nbytes, ml_device dev) {
    ml_storage *s = calloc(1, sizeof *s);
    if (!s) return ml_error_null("out of CPU memory (storage header)");
    s->data = ml_device_alloc(dev, nbytes);
    if (!s->data) { free(s); return NULL; }
    s->nbytes = nbytes;
    s->refcount = 1;
    s->device = dev;
    g_live_storages++;
    g_live_bytes[dev.type] += (long long)nbytes;
    return s;
}

ml_storage *ml_storage_wrap(void *data, size_t nbytes, ml_device dev,
                            void (*release)(void *, void *, size_t), void *ctx) {
    ml_storage *s = calloc(1, sizeof *s);
    if (!s) return ml_error_null("out of CPU memory (storage header)");
    s->data = data; s->nbytes = nbytes; s->refcount = 1; s->device = dev;
    s->release = release; s->release_ctx = ctx;
    g_live_storages++;
    return s;
}

void ml_storage_release(ml_storage *s) {
    if (!s || --s->refcount > 0) return;
    g_live_storages--;
    if (s->release) s->release(s->release_ctx, s->data, s->nbytes);
    else {
        g_live_bytes[s->device.type] -= (long long)s->nbytes;
        ml_device_free(s->device, s->data, s->nbytes);
    }
    free(s);
}

/* ---- tensor lifetime ---------------------------------------------------- */

ml_tensor *ml_retain(ml_tensor *t) { if (t) t->refcount++; return t; }

void ml_release(ml_tensor *t) {
    if (!t || --t->refcount > 0) return;
    ml_storage_release(t->storage);
    ml_release(t->grad);
    if (t->grad_fn) ml_node_release(t->grad_fn);
    for (ml_hook *h = t->hooks; h;) {
        ml_hook *nx = h->next;
        if (h->ctx_free) h->ctx_free(h->ctx);
        free(h);
        h = nx;
    }
    free(t);
}

/* ---- shapes ------------------------------------------------------------- */

int64_t ml_numel(const ml_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

void ml_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) { strides[i] = s; s *= shape[i] > 0 ? shape[i] : 1; }
}

bool ml_is_contiguous(const ml_tensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != s) return false;
        s *= t->shape[i];
    }
    return true;
}

bool ml_same_shape(const ml_tensor *a, const ml_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++) if (a->shape[i] != b->shape[i]) return false;
    return true;
}

static const char *shape_str_raw(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = 0;
    k += snprintf(buf + k, n - k, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += snprintf(buf + k, n - k, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

const char *ml_shape_str(const ml_tensor *t, char *buf, size_t n) {
    return shape_str_raw(t->ndim, t->shape, buf, n);
}

int ml_wrap_dim(int dim, int ndim) {
    int n = ndim > 0 ? ndim : 1;
    if (dim < -n || dim >= n)
        return ml_error("dimension %d out of range for a tensor with %d dims", dim, ndim);
    return dim < 0 ? dim + n : dim;
}

int ml_broadcast_shape(int na, const int64_t *sa, int nb, const int64_t *sb, int *nout, int64_t *sout) {
    int n = na > nb ? na : nb;
    for (int i = 0; i < n; i++) {
        int64_t a = i < n - na ? 1 : sa[i - (n - na)];
        int64_t b = i < n - nb ? 1 : sb[i - (n - nb)];
        if (a != b && a != 1 && b != 1) {
            char b1[128], b2[128];
            return ml_error("shapes %s and %s cannot be broadcast together",
                            shape_str_raw(na, sa, b1, sizeof b1), shape_str_raw(nb, sb, b2, sizeof b2));
        }
        sout[i] = a == 1 ? b : a;
    }
    *nout = n;
    return 0;
}

/* ---- creation ----------------------------------------------------------- */

int ml_shape_check(const char *op, int ndim, const int64_t *shape, ml_dtype dt, int64_t *numel) {
    char b[160];
    const char *sep = op ? ": " : "";
    if (!op) op = "";
    if (ndim < 0 || ndim > ML_MAX_DIMS)
        return ml_error("%s%stensors have at most %d dims (asked for %d)", op, sep, ML_MAX_DIMS, ndim);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0)
            return ml_error("%s%snegative size %lld in dim %d of shape %s", op, sep, (long long)shape[i], i + 1,
                            shape_str_raw(ndim, shape, b, sizeof b));
    /* Sizes of 0 count as 1 here: the contiguous strides of [0, 2^40, 2^40]
     * are products of the other sizes and must not overflow either. */
    int64_t span = (int64_t)ml_dtype_size(dt), n = 1;
    for (int i = 0; i < ndim; i++) {
        if (!ml_mul_i64(span, shape[i] ? shape[i] : 1, &span))
            return ml_error("%s%sshape %s of %s is too large (more than 2^63 bytes)", op, sep,
                            shape_str_raw(ndim, shape, b, sizeof b), ml_dtype_name(dt));
        n *= shape[i];
    }
    if (numel) *numel = n;
    return 0;
}

static ml_tensor *tensor_header(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev) {
    if ((unsigned)dt >= ML_NUM_DTYPES) return ml_error_null("unknown dtype %d", (int)dt);
    if (ml_shape_check(NULL, ndim, shape, dt, NULL) < 0) return NULL;
    ml_tensor *t = calloc(1, sizeof *t);
    if (!t) return ml_error_null("out of CPU memory (tensor header)");
    t->ndim = ndim;
    if (ndim) memcpy(t->shape, shape, ndim * sizeof(int64_t));
    ml_contiguous_strides(ndim, t->shape, t->strides);
    t->dtype = dt;
    t->device = dev;
    t->refcount = 1;
    return t;
}

ml_tensor *ml_empty(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev) {
    if (!ml_device_available(dev)) {
        char b[32]; ml_device_str(dev, b, sizeof b);
        return ml_error_null("device %s is not available%s", b,
#ifdef ML_WITH_CUDA
                             ""
#else
                             " (moonlit was built without CUDA)"
#endif
        );
    }
    ml_tensor *t = tensor_header(ndim, shape, dt, dev);
    if (!t) return NULL;
    /* tensor_header checked that this product fits */
    size_t n = (size_t)ml_numel(t) * ml_dtype_size(dt);
    t->storage = ml_storage_new(n, dev);
    if (!t->storage) { free(t); return NULL; }
    return t;
}

/* 0 when every element of the header lies inside the storage.  Every view
 * is made here or from a header that passed here, so a slice arithmetic
 * mistake anywhere becomes this error instead of a read past the end. */
static int check_in_storage(const ml_tensor *t, const ml_storage *s) {
    if (ml_numel(t) == 0) return 0;
    int64_t lo = t->offset, hi = t->offset;
    bool ok = t->offset >= 0;
    for (int i = 0; ok && i < t->ndim; i++) {
        int64_t step;
        ok = ml_mul_i64(t->strides[i], t->shape[i] - 1, &step);
        if (ok && step < 0) ok = ml_add_i64(lo, step, &lo);
        else if (ok) ok = ml_add_i64(hi, step, &hi);
    }
    int64_t end;
    ok = ok && lo >= 0 && ml_add_i64(hi, 1, &end) && ml_mul_i64(end, (int64_t)ml_dtype_size(t->dtype), &end) &&
         (uint64_t)end <= (uint64_t)s->nbytes;
    if (!ok) {
        char b[160];
        return ml_error("tensor of shape %s (offset %lld) does not fit in its storage of %zu bytes",
                        ml_shape_str(t, b, sizeof b), (long long)t->offset, s->nbytes);
    }
    return 0;
}

ml_tensor *ml_from_storage(ml_storage *s, int64_t offset, int ndim, const int64_t *shape,
                           const int64_t *strides, ml_dtype dt) {
    ml_tensor *t = tensor_header(ndim, shape, dt, s->device);
    if (!t) return NULL;
    if (strides) memcpy(t->strides, strides, ndim * sizeof(int64_t));
    t->offset = offset;
    if (check_in_storage(t, s) < 0) { free(t); return NULL; }
    t->storage = s;
    s->refcount++;
    return t;
}

ml_tensor *ml_full(int ndim, const int64_t *shape, double v, ml_dtype dt, ml_device dev) {
    ml_tensor *t = ml_empty(ndim, shape, dt, dev);
    if (t && ml_fill_(t, v) < 0) { ml_release(t); return NULL; }
    return t;
}

ml_tensor *ml_zeros(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev) {
    return ml_full(ndim, shape, 0.0, dt, dev);
}

ml_tensor *ml_empty_like(const ml_tensor *t) { return ml_empty(t->ndim, t->shape, t->dtype, t->device); }
ml_tensor *ml_zeros_like(const ml_tensor *t) { return ml_zeros(t->ndim, t->shape, t->dtype, t->device); }

ml_tensor *ml_scalar(double v, ml_dtype dt, ml_device dev) { return ml_full(0, NULL, v, dt, dev); }

ml_tensor *ml_from_doubles(const double *v, int ndim, const int64_t *shape, ml_dtype dt) {
    ml_tensor *t = ml_empty(ndim, shape, dt, ml_cpu());
    if (!t) return NULL;
    int64_t n = ml_numel(t);
    void *p = ml_data(t);
    for (int64_t i = 0; i < n; i++) ml_store_from_double(p, dt, i, v[i]);
    return t;
}

ml_tensor *ml_arange(double start, double end, double step, ml_dtype dt, ml_device dev) {
    if (step == 0 || !isfinite(start) || !isfinite(end) || !isfinite(step))
        return ml_error_null("arange: step must be non-zero and bounds finite");
    double cnt = ceil((end - start) / step);
    /* 2^62 elements is beyond any storage; the bound keeps the cast defined */
    if (!(cnt < 0x1p62))
        return ml_error_null("arange: %g elements from %g to %g by %g is too many", cnt, start, end, step);
    int64_t n = cnt > 0 ? (int64_t)cnt : 0;
    ml_tensor *t = ml_empty(1, &n, dt, ml_cpu());
    if (!t) return NULL;
    for (int64_t i = 0; i < n; i++) ml_store_from_double(ml_data(t), dt, i, start + (double)i * step);
    if (dev.type == ML_CPU) return t;
    ml_tensor *g = ml_to_device(t, dev);
    ml_release(t);
    return g;
}

/* ---- strided element iteration (CPU) ------------------------------------ */

/* Calls body for every logical index; offsets of up to two strided operands
 * advance together. */
typedef struct { int ndim; int64_t shape[ML_MAX_DIMS]; int64_t idx[ML_MAX_DIMS]; } iter_state;

static inline void iter_next(iter_state *it, const int64_t *sa, int64_t *oa, const int64_t *sb, int64_t *ob) {
    for (int d = it->ndim - 1; d >= 0; d--) {
        if (++it->idx[d] < it->shape[d]) { *oa += sa[d]; if (ob) *ob += sb[d]; return; }
        *oa -= sa[d] * (it->shape[d] - 1);
        if (ob) *ob -= sb[d] * (it->shape[d] - 1);
        it->idx[d] = 0;
    }
}

/* dst <- src, both CPU, same logical shape (src already expanded). */
static void cpu_copy_strided(ml_tensor *dst, const ml_tensor *src) {
    int64_t n = ml_numel(dst);
    if (n == 0) return;
    size_t es = ml_dtype_size(dst->dtype);
    if (dst->dtype == src->dtype && ml_is_contiguous(dst) && ml_is_contiguous(src)) {
        memmove(ml_data(dst), ml_data(src), (size_t)n * es);
        return;
    }
    iter_state it = {.ndim = dst->ndim};
    memcpy(it.shape, dst->shape, sizeof it.shape);
    int64_t od = 0, os = 0;
    char *pd = (char *)dst->storage->data + dst->offset * es;
    const char *ps = (const char *)src->storage->data + src->offset * ml_dtype_size(src->dtype);
    if (dst->dtype == src->dtype) {
        for (int64_t i = 0; i < n; i++) {
            memcpy(pd + od * es, ps + os * es, es);
            iter_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else if (dst->dtype == ML_F32 && src->dtype == ML_F64) {
        for (int64_t i = 0; i < n; i++) {
            ((float *)pd)[od] = (float)((const double *)ps)[os];
            iter_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else if (dst->dtype == ML_F64 && src->dtype == ML_F32) {
        for (int64_t i = 0; i < n; i++) {
            ((double *)pd)[od] = ((const float *)ps)[os];
            iter_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            ml_store_from_double(pd, dst->dtype, od, ml_load_as_double(ps, src->dtype, os));
            iter_next(&it, dst->strides, &od, src->strides, &os);
        }
    }
}

/* A view of src expanded to dst's shape (stride 0 on broadcast dims). */
static int broadcast_view_to(const ml_tensor *src, const ml_tensor *dst, ml_tensor *out) {
    *out = *src;
    int n = dst->ndim, off = n - src->ndim;
    if (off < 0) goto bad;
    out->ndim = n;
    for (int i = 0; i < n; i++) {
        int64_t s = i < off ? 1 : src->shape[i - off];
        int64_t st = i < off ? 0 : src->strides[i - off];
        if (s == dst->shape[i]) { out->shape[i] = s; out->strides[i] = st; }
        else if (s == 1) { out->shape[i] = dst->shape[i]; out->strides[i] = 0; }
        else goto bad;
    }
    return 0;
bad:;
    char b1[128], b2[128];
    return ml_error("copy: source shape %s cannot be broadcast to destination shape %s",
                    ml_shape_str(src, b1, sizeof b1), ml_shape_str(dst, b2, sizeof b2));
}

int ml_copy_(ml_tensor *dst, const ml_tensor *src) {
    ml_tensor sv;
    if (broadcast_view_to(src, dst, &sv) < 0) return -1;
    if (dst->device.type == ML_CPU && src->device.type == ML_CPU) {
        int tok = ml_profile_on ? ml_profile_begin("ml_copy_cpu", false) : -1;
        cpu_copy_strided(dst, &sv);
        if (tok >= 0) ml_profile_end(tok);
        return 0;
    }
#ifdef ML_WITH_CUDA
    if (ml_device_eq(dst->device, src->device)) {
        int tok = ml_profile_on ? ml_profile_begin("ml_cuda_copy_strided", true) : -1;
        int rc = ml_cuda_copy_strided(dst, &sv);
        if (tok >= 0) ml_profile_end(tok);
        return rc;
    }
    /* Across devices: make the source contiguous where it lives, move the
     * bytes, then let the destination device convert dtype and strides. */
    ml_tensor *sc = ml_contiguous((ml_tensor *)src);
    if (!sc) return -1;
    ml_tensor *stage = ml_empty(sc->ndim, sc->shape, sc->dtype, dst->device);
    if (!stage) { ml_release(sc); return -1; }
    int rc = ml_device_memcpy(ml_data(stage), dst->device, ml_data(sc), sc->device,
                              (size_t)ml_numel(sc) * ml_dtype_size(sc->dtype));
    if (rc == 0) rc = ml_copy_(dst, stage);
    ml_release(stage);
    ml_release(sc);
    return rc;
#else
    return ml_error("copy involving a cuda device, but this moonlit was built without CUDA");
#endif
}

int ml_fill_(ml_tensor *t, double v) {
    int64_t n = ml_numel(t);
    if (t->device.type != ML_CPU) {
#ifdef ML_WITH_CUDA
        return ml_cuda_fill(t, v);
#else
        return ml_error("fill on a cuda tensor, but this moonlit was built without CUDA");
#endif
    }
    if (n == 0) return 0;
    size_t es = ml_dtype_size(t->dtype);
    char elem[8];
    ml_store_from_double(elem, t->dtype, 0, v);
    if (ml_is_contiguous(t)) {
        char *p = ml_data(t);
        if (v == 0.0) memset(p, 0, (size_t)n * es);
        else if (t->dtype == ML_F32) { float f = (float)v; for (int64_t i = 0; i < n; i++) ((float *)p)[i] = f; }
        else for (int64_t i = 0; i < n; i++) memcpy(p + i * es, elem, es);
        return 0;
    }
    iter_state it = {.ndim = t->ndim};
    memcpy(it.shape, t->shape, sizeof it.shape);
    int64_t o = 0;
    char *p = (char *)t->storage->data + t->offset * es;
    for (int64_t i = 0; i < n; i++) { memcpy(p + o * es, elem, es); iter_next(&it, t->strides, &o, NULL, NULL); }
    return 0;
}

/* ---- autograd-aware conversions ----------------------------------------- */

static ml_tensor *raw_convert(ml_tensor *t, ml_dtype dt, ml_device dev) {
    ml_tensor *o = ml_empty(t->ndim, t->shape, dt, dev);
    if (!o) return NULL;
    if (ml_copy_(o, t) < 0) { ml_release(o); return NULL; }
    return o;
}

static int to_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    gin[0] = raw_convert(g, n->next[0].dtype, n->next[0].device);
    return gin[0] ? 0 : -1;
}

static ml_tensor *convert_recorded(ml_tensor *t, ml_dtype dt, ml_device dev, ml_op op) {
    ml_tensor *o = raw_convert(t, dt, dev);
    if (!o) return NULL;
    if (ml_dtype_is_float(dt)) {
        ml_node *n = ml_node_begin(op, to_backward, 1, &t);
        if (n) ml_node_finish(n, o);
    }
    return o;
}

ml_tensor *ml_to_dtype(ml_tensor *t, ml_dtype dt) {
    if (t->dtype == dt) return ml_retain(t);
    return convert_recorded(t, dt, t->device, ML_OP_to_dtype);
}

ml_tensor *ml_to_device(ml_tensor *t, ml_device dev) {
    if (ml_device_eq(t->device, dev)) return ml_retain(t);
    return convert_recorded(t, t->dtype, dev, ML_OP_to_device);
}

static int identity_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    gin[0] = ml_retain(g);
    return 0;
}

ml_tensor *ml_clone(ml_tensor *t) {
    ml_tensor *o = raw_convert(t, t->dtype, t->device);
    if (!o) return NULL;
    ml_node *n = ml_node_begin(ML_OP_clone, identity_backward, 1, &t);
    if (n) ml_node_finish(n, o);
    return o;
}

ml_tensor *ml_contiguous(ml_tensor *t) {
    if (ml_is_contiguous(t)) return ml_retain(t);
    ml_tensor *o = raw_convert(t, t->dtype, t->device);
    if (!o) return NULL;
    ml_node *n = ml_node_begin(ML_OP_contiguous, identity_backward, 1, &t);
    if (n) ml_node_finish(n, o);
    return o;
}

ml_tensor *ml_detach(ml_tensor *t) {
    return ml_from_storage(t->storage, t->offset, t->ndim, t->shape, t->strides, t->dtype);
}

/* ---- views -------------------------------------------------------------- */

static ml_tensor *alias(ml_tensor *t) { return ml_detach(t); }

static int view_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *gc = ml_contiguous(g);
    if (!gc) return -1;
    gin[0] = ml_view(gc, n->next[0].ndim, n->next[0].shape);
    ml_release(gc);
    return gin[0] ? 0 : -1;
}

ml_tensor *ml_view(ml_tensor *t, int ndim, const int64_t *shape_in) {
    if (ndim < 0 || ndim > ML_MAX_DIMS) return ml_error_null("view: at most %d dims", ML_MAX_DIMS);
    int64_t shape[ML_MAX_DIMS], known = 1, n = ml_numel(t);
    int infer = -1;
    for (int i = 0; i < ndim; i++) {
        shape[i] = shape_in[i];
        if (shape[i] == -1) {
            if (infer >= 0) return ml_error_null("view: only one dimension can be -1");
            infer = i;
        } else if (shape[i] < 0) return ml_error_null("view: invalid size %lld", (long long)shape[i]);
        else if (!ml_mul_i64(known, shape[i], &known)) goto bad;
    }
    if (infer >= 0) {
        if (known == 0 || n % known) goto bad;
        shape[infer] = n / known;
        known *= shape[infer];
    }
    if (known != n) goto bad;
    ml_tensor *src = ml_contiguous(t);
    if (!src) return NULL;
    ml_tensor *o = ml_from_storage(src->storage, src->offset, ndim, shape, NULL, src->dtype);
    ml_release(src);
    if (!o) return NULL;
    ml_node *nd = ml_node_begin(ML_OP_view, view_backward, 1, &t);
    if (nd) ml_node_finish(nd, o);
    return o;
bad:;
    char b1[128], b2[128];
    return ml_error_null("view: shape %s is invalid for input of shape %s (%lld elements)",
                         shape_str_raw(ndim, shape_in, b2, sizeof b2), ml_shape_str(t, b1, sizeof b1),
                         (long long)n);
}

ml_tensor *ml_reshape(ml_tensor *t, int ndim, const int64_t *shape) { return ml_view(t, ndim, shape); }

static int permute_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    int inv[ML_MAX_DIMS];
    for (int i = 0; i < g->ndim; i++) inv[n->i[i]] = i;
    gin[0] = ml_permute(g, inv);
    return gin[0] ? 0 : -1;
}

ml_tensor *ml_permute(ml_tensor *t, const int *perm) {
    int seen[ML_MAX_DIMS] = {0};
    for (int i = 0; i < t->ndim; i++) {
        if (perm[i] < 0 || perm[i] >= t->ndim || seen[perm[i]]++)
            return ml_error_null("permute: not a permutation of %d dims", t->ndim);
    }
    ml_tensor *o = alias(t);
    if (!o) return NULL;
    for (int i = 0; i < t->ndim; i++) { o->shape[i] = t->shape[perm[i]]; o->strides[i] = t->strides[perm[i]]; }
    ml_node *n = ml_node_begin(ML_OP_permute, permute_backward, 1, &t);
    if (n) { for (int i = 0; i < t->ndim; i++) n->i[i] = perm[i]; ml_node_finish(n, o); }
    return o;
}

ml_tensor *ml_transpose(ml_tensor *t, int d0, int d1) {
    if ((d0 = ml_wrap_dim(d0, t->ndim)) < 0 || (d1 = ml_wrap_dim(d1, t->ndim)) < 0) return NULL;
    if (t->ndim == 0) return ml_retain(t);
    int perm[ML_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) perm[i] = i;
    perm[d0] = d1; perm[d1] = d0;
    return ml_permute(t, perm);
}

/* Gradient of a slice: zeros of the input's shape with g written into the
 * same slice. */
static int narrow_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *z = ml_zeros(n->next[0].ndim, n->next[0].shape, g->dtype, g->device);
    if (!z) return -1;
    ml_tensor *slice = ml_narrow(z, (int)n->i[0], n->i[1], n->i[2]);
    int rc = slice ? ml_copy_(slice, g) : -1;
    ml_release(slice);
    if (rc < 0) { ml_release(z); return -1; }
    gin[0] = z;
    return 0;
}

ml_tensor *ml_narrow(ml_tensor *t, int dim, int64_t start, int64_t len) {
    if ((dim = ml_wrap_dim(dim, t->ndim)) < 0) return NULL;
    if (t->ndim == 0) return ml_error_null("narrow: cannot narrow a 0-dim tensor");
    if (start < 0) start += t->shape[dim];
    /* len > size - start, not start + len > size: the sum may overflow */
    if (start < 0 || start > t->shape[dim] || len < 0 || len > t->shape[dim] - start)
        return ml_error_null("narrow: range start %lld length %lld out of bounds for dim %d of size %lld",
                             (long long)start, (long long)len, dim + 1, (long long)t->shape[dim]);
    ml_tensor *o = alias(t);
    if (!o) return NULL;
    o->offset += start * t->strides[dim];
    o->shape[dim] = len;
    ml_node *n = ml_node_begin(ML_OP_narrow, narrow_backward, 1, &t);
    if (n) { n->i[0] = dim; n->i[1] = start; n->i[2] = len; ml_node_finish(n, o); }
    return o;
}

static int select_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *z = ml_zeros(n->next[0].ndim, n->next[0].shape, g->dtype, g->device);
    if (!z) return -1;
    ml_tensor *slice = ml_select(z, (int)n->i[0], n->i[1]);
    int rc = slice ? ml_copy_(slice, g) : -1;
    ml_release(slice);
    if (rc < 0) { ml_release(z); return -1; }
    gin[0] = z;
    return 0;
}

ml_tensor *ml_select(ml_tensor *t, int dim, int64_t index) {
    if (t->ndim == 0) return ml_error_null("select: cannot index a 0-dim tensor");
    if ((dim = ml_wrap_dim(dim, t->ndim)) < 0) return NULL;
    if (index < 0) index += t->shape[dim];
    if (index < 0 || index >= t->shape[dim])
        return ml_error_null("select: index %lld out of range for dim %d of size %lld",
                             (long long)index, dim + 1, (long long)t->shape[dim]);
    ml_tensor *o = alias(t);
    if (!o) return NULL;
    o->offset += index * t->strides[dim];
    for (int i = dim; i < t->ndim - 1; i++) { o->shape[i] = t->shape[i + 1]; o->strides[i] = t->strides[i + 1]; }
    o->ndim--;
    ml_node *n = ml_node_begin(ML_OP_select, select_backward, 1, &t);
    if (n) { n->i[0] = dim; n->i[1] = index; ml_node_finish(n, o); }
    return o;
}

static int expand_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    gin[0] = ml_sum_to_shape(g, n->next[0].ndim, n->next[0].shape);
    return gin[0] ? 0 : -1;
}

ml_tensor *ml_expand(ml_tensor *t, int ndim, const int64_t *shape) {
    if (ndim < t->ndim || ndim > ML_MAX_DIMS) {
        char b[128];
        return ml_error_null("expand: cannot expand shape %s to %d dims", ml_shape_str(t, b, sizeof b), ndim);
    }
    ml_tensor *o = alias(t);
    if (!o) return NULL;
    int off = ndim - t->ndim;
    o->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        int64_t s = i < off ? 1 : t->shape[i - off];
        int64_t st = i < off ? 0 : t->strides[i - off];
        int64_t want = shape[i] == -1 ? s : shape[i];
        if (want < 0) {
            char b1[128], b2[128];
            ml_release(o);
            return ml_error_null("expand: shape %s cannot be expanded to %s (negative size %lld in dim %d)",
                                 ml_shape_str(t, b1, sizeof b1), shape_str_raw(ndim, shape, b2, sizeof b2),
                                 (long long)want, i + 1);
        }
        if (want == s) { o->shape[i] = s; o->strides[i] = st; }
        else if (s == 1) { o->shape[i] = want; o->strides[i] = 0; }
        else {
            char b1[128], b2[128];
            ml_release(o);
            return ml_error_null("expand: shape %s cannot be expanded to %s (dim %d: %lld vs %lld)",
                                 ml_shape_str(t, b1, sizeof b1), shape_str_raw(ndim, shape, b2, sizeof b2),
                                 i + 1, (long long)s, (long long)want);
        }
    }
    /* A stride-0 view holds no memory, but the ops that read it allocate and
     * iterate over its element count: that count must fit like any other. */
    if (ml_shape_check("expand", ndim, o->shape, o->dtype, NULL) < 0) { ml_release(o); return NULL; }
    ml_node *n = ml_node_begin(ML_OP_expand, expand_backward, 1, &t);
    if (n) ml_node_finish(n, o);
    return o;
}

ml_tensor *ml_squeeze(ml_tensor *t, int dim) {
    int64_t shape[ML_MAX_DIMS];
    int n = 0;
    if (dim != ML_ALL_DIMS && (dim = ml_wrap_dim(dim, t->ndim)) < 0) return NULL;
    for (int i = 0; i < t->ndim; i++) {
        bool drop = t->shape[i] == 1 && (dim == ML_ALL_DIMS || dim == i);
        if (!drop) shape[n++] = t->shape[i];
    }
    return ml_view(t, n, shape);
}

ml_tensor *ml_unsqueeze(ml_tensor *t, int dim) {
    if (t->ndim >= ML_MAX_DIMS) return ml_error_null("unsqueeze: tensor already has %d dims", ML_MAX_DIMS);
    if (dim < 0) dim += t->ndim + 1;
    if (dim < 0 || dim > t->ndim)
        return ml_error_null("unsqueeze: dim %d out of range for %d dims", dim, t->ndim);
    int64_t shape[ML_MAX_DIMS];
    for (int i = 0, j = 0; i <= t->ndim; i++) shape[i] = i == dim ? 1 : t->shape[j++];
    /* Unsqueeze keeps strides: avoid a copy for non-contiguous inputs. */
    ml_tensor *o = alias(t);
    if (!o) return NULL;
    o->ndim = t->ndim + 1;
    for (int i = 0, j = 0; i < o->ndim; i++) {
        if (i == dim) { o->shape[i] = 1; o->strides[i] = j < t->ndim ? t->shape[j] * t->strides[j] : 1; }
        else { o->shape[i] = t->shape[j]; o->strides[i] = t->strides[j]; j++; }
    }
    ml_node *n = ml_node_begin(ML_OP_unsqueeze, view_backward, 1, &t);
    if (n) ml_node_finish(n, o);
    (void)shape;
    return o;
}

/* ---- element access ----------------------------------------------------- */

double *ml_to_doubles(const ml_tensor *t) {
    ml_tensor *c = (ml_tensor *)t;
    ml_tensor *cpu = NULL;
    if (t->device.type != ML_CPU) {
        cpu = ml_empty(t->ndim, t->shape, t->dtype, ml_cpu());
        if (!cpu || ml_copy_(cpu, t) < 0) { ml_release(cpu); return NULL; }
        c = cpu;
    }
    int64_t n = ml_numel(c);
    /* a stride-0 view of 2^62 bytes has 2^62 elements: 2^65 bytes as doubles */
    size_t bytes;
    if (!ml_mul_size((size_t)(n ? n : 1), sizeof(double), &bytes)) {
        char b[160];
        ml_release(cpu);
        return ml_error_null("tensor of shape %s has too many elements (%lld) to read as numbers",
                             ml_shape_str(t, b, sizeof b), (long long)n);
    }
    double *out = malloc(bytes);
    if (!out) { ml_release(cpu); return ml_error_null("out of CPU memory"); }
    iter_state it = {.ndim = c->ndim};
    memcpy(it.shape, c->shape, sizeof it.shape);
    int64_t o = 0;
    const char *base = (const char *)c->storage->data + c->offset * ml_dtype_size(c->dtype);
    for (int64_t i = 0; i < n; i++) {
        out[i] = ml_load_as_double(base, c->dtype, o);
        iter_next(&it, c->strides, &o, NULL, NULL);
    }
    ml_release(cpu);
    return out;
}

int ml_item(const ml_tensor *t, double *out) {
    if (ml_numel(t) != 1) {
        char b[128];
        return ml_error("item: tensor of shape %s has %lld elements, expected exactly one",
                        ml_shape_str(t, b, sizeof b), (long long)ml_numel(t));
    }
    double *v = ml_to_doubles(t);
    if (!v) return -1;
    *out = v[0];
    free(v);
    return 0;
}

/* ---- printing ----------------------------------------------------------- */

typedef struct { char *buf; size_t len, cap; } sbuf;

static void sb_put(sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_put(sbuf *s, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (s->len + (size_t)k < s->cap) { s->len += k; return; }
        size_t nc = s->cap * 2 + (size_t)k + 64;
        char *nb = realloc(s->buf, nc);
        if (!nb) return;
        s->buf = nb; s->cap = nc;
    }
}

typedef struct {
    const double *v;
    const ml_tensor *t;
    int64_t cstride[ML_MAX_DIMS];
    bool summarize, is_float, sci, intlike;
    int width;
} print_ctx;

static int fmt_value(const print_ctx *p, double x, char *b, size_t n) {
    if (!p->is_float) {
        if (p->t->dtype == ML_BOOL) return snprintf(b, n, "%s", x != 0 ? "true" : "false");
        return snprintf(b, n, "%.0f", x);
    }
    if (isnan(x)) return snprintf(b, n, "nan");
    if (isinf(x)) return snprintf(b, n, x > 0 ? "inf" : "-inf");
    if (p->sci) return snprintf(b, n, "%.4e", x);
    if (p->intlike) return snprintf(b, n, "%.0f.", x);
    return snprintf(b, n, "%.4f", x);
}

static void print_rec(const print_ctx *p, sbuf *s, int d, int64_t base, int indent) {
    const ml_tensor *t = p->t;
    int64_t n = t->shape[d];
    const int edge = 3;
    sb_put(s, "[");
    for (int64_t i = 0; i < n; i++) {
        if (p->summarize && n > 2 * edge && i == edge) {
            if (d == t->ndim - 1) sb_put(s, " ..., ");
            else {
                sb_put(s, "...,");
                for (int k = 0; k < t->ndim - d - 1; k++) sb_put(s, "\n");
                sb_put(s, "%*s", indent + 1, "");
            }
            i = n - edge - 1;
            continue;
        }
        int64_t off = base + i * p->cstride[d];
        if (d == t->ndim - 1) {
            char b[64];
            fmt_value(p, p->v[off], b, sizeof b);
            sb_put(s, "%*s", p->width, b);
            if (i < n - 1) sb_put(s, ", ");
        } else {
            print_rec(p, s, d + 1, off, indent + 1);
            if (i < n - 1) {
                sb_put(s, ",");
                for (int k = 0; k < t->ndim - d - 1; k++) sb_put(s, "\n");
                sb_put(s, "%*s", indent + 1, "");
            }
        }
    }
    sb_put(s, "]");
}

char *ml_tensor_repr(const ml_tensor *t) {
    sbuf s = {malloc(256), 0, 256};
    if (!s.buf) return NULL;
    s.buf[0] = 0;
    double *v = ml_to_doubles(t);
    if (!v) { free(s.buf); return NULL; }
    int64_t n = ml_numel(t);
    print_ctx p = {.v = v, .t = t, .summarize = n > 1000, .is_float = ml_dtype_is_float(t->dtype)};
    ml_contiguous_strides(t->ndim, t->shape, p.cstride);
    if (p.is_float) {
        double mx = 0, mn = INFINITY;
        bool all_int = true;
        for (int64_t i = 0; i < n; i++) {
            double a = fabs(v[i]);
            if (!isfinite(a)) continue;
            if (a > mx) mx = a;
            if (a > 0 && a < mn) mn = a;
            if (v[i] != floor(v[i])) all_int = false;
        }
        p.intlike = all_int && mx < 1e8;
        p.sci = !p.intlike && (mx >= 1e8 || (mn < 1e-4 && mn > 0) || (mx / (mn > 0 ? mn : 1)) > 1e6);
    }
    for (int64_t i = 0; i < n; i++) {
        char b[64];
        int w = fmt_value(&p, v[i], b, sizeof b);
        if (w > p.width) p.width = w;
    }
    sb_put(&s, "tensor(");
    if (t->ndim == 0) {
        char b[64];
        fmt_value(&p, v[0], b, sizeof b);
        sb_put(&s, "%s", b);
    } else if (n == 0) sb_put(&s, "[]");
    else print_rec(&p, &s, 0, 0, 7);
    char shp[160], dev[32];
    ml_device_str(t->device, dev, sizeof dev);
    sb_put(&s, ", shape=%s, dtype=%s, device=%s", ml_shape_str(t, shp, sizeof shp), ml_dtype_name(t->dtype), dev);
    if (t->grad_fn) sb_put(&s, ", grad_fn=%s", t->grad_fn->name);
    else if (t->requires_grad) sb_put(&s, ", requires_grad=true");
    sb_put(&s, ")");
    free(v);
    return s.buf;
}
