/* tensor.c — tensor headers, storage lifetime, creation, views and copies.
 * The view functions record autograd nodes so gradients flow through them;
 * their backward functions sit next to them.  Devices and their memory are
 * in device.c, the copy and fill kernels in kernels/cpu/copy.c and
 * kernels/cuda/copy.cu, printing in tensor_print.c. */
#include "tensor.h"
#include "autograd.h"
#include "checked_math.h"
#include "device.h"
#include "dispatch.h"
#include "copy.h"
#include "ops.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* ---- copies ------------------------------------------------------------- */

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
    /* One device: the copy kernel (kernels/copy.h) converts and restrides. */
    if (ml_device_eq(dst->device, src->device)) return ML_RUN(dst->device, ml_copy, ML_KT(dst), ML_KT(&sv));
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
}

int ml_fill_(ml_tensor *t, double v) { return ML_RUN(t->device, ml_fill, ML_KT(t), v); }

/* ---- autograd-aware conversions ----------------------------------------- */

static ml_tensor *raw_convert(ml_tensor *t, ml_dtype dt, ml_device dev) {
    ml_tensor *o = ml_empty(t->ndim, t->shape, dt, dev);
    if (!o) return NULL;
    if (ml_copy_(o, t) < 0) { ml_release(o); return NULL; }
    return o;
}

/* A gradient already in the input's dtype and on its device is passed on
 * as is: the consumer wrote it so (ml_grad_dtype_hint). */
static int to_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    if (g->dtype == n->next[0].dtype && ml_device_eq(g->device, n->next[0].device)) {
        gin[0] = ml_retain(g);
        return 0;
    }
    gin[0] = raw_convert(g, n->next[0].dtype, n->next[0].device);
    return gin[0] ? 0 : -1;
}

static ml_tensor *convert_recorded(ml_tensor *t, ml_dtype dt, ml_device dev, ml_op op) {
    ml_tensor *o = raw_convert(t, dt, dev);
    if (!o) return NULL;
    if (ml_dtype_is_float(dt)) {
        ml_node *n = ml_node_begin(op, to_backward, 1, &t);
        if (n) {
            /* What ml_node_save needs to recognise this conversion's output
             * and remake it in backward (autograd.c, saved casts): the
             * leaf's storage version converted from, and the output's
             * storage (identity only, never dereferenced from here) with
             * its version.  f[0] = 1 says they are set. */
            if (op == ML_OP_to_dtype && n->next[0].leaf) {
                n->f[0] = 1;
                n->i[0] = t->storage->version;
                n->i[1] = (int64_t)(intptr_t)o->storage;
                n->i[2] = o->storage->version;
            }
            ml_node_finish(n, o);
        }
    }
    return o;
}

ml_tensor *ml_to_dtype(ml_tensor *t, ml_dtype dt) {
    if (t->dtype == dt) return ml_retain(t);
    return convert_recorded(t, dt, t->device, ML_OP_to_dtype);
}

/* ml_cast_as (host/ops.h): the autocast shadow of t handed out as if
 * ml_to_dtype(t, shadow's dtype) had just made it.  The result is a new
 * header over the shadow's storage, so nothing is copied; its node is
 * to_dtype's backward (the gradient converted to t's dtype), so t.grad gets
 * what a fresh conversion would give it.  Sharing the storage is what keeps
 * the saved-tensor rule whole: linear and conv save this result, an
 * in-place write into the shadow (the optimizer's refresh, or the user's)
 * bumps that storage's version, and a backward that saved it before the
 * write refuses instead of using the new values. */
ml_tensor *ml_cast_as(ml_tensor *t, ml_tensor *shadow) {
    if (!t || !shadow) return ml_error_null("cast_as: missing %s", t ? "shadow" : "tensor");
    if (!ml_dtype_is_float(t->dtype) || !ml_dtype_is_float(shadow->dtype))
        return ml_error_null("cast_as: both tensors must be floating (got %s and a %s shadow)",
                             ml_dtype_name(t->dtype), ml_dtype_name(shadow->dtype));
    if (t->dtype == shadow->dtype)
        return ml_error_null("cast_as: the shadow has the tensor's own dtype %s (a shadow is a copy in another dtype)",
                             ml_dtype_name(t->dtype));
    if (!ml_same_shape(t, shadow)) {
        char b1[128], b2[128];
        return ml_error_null("cast_as: shadow of shape %s does not match the tensor's shape %s",
                             ml_shape_str(shadow, b1, sizeof b1), ml_shape_str(t, b2, sizeof b2));
    }
    if (!ml_device_eq(t->device, shadow->device)) {
        char a[16], b[16];
        ml_device_str(shadow->device, a, sizeof a);
        ml_device_str(t->device, b, sizeof b);
        return ml_error_null("cast_as: the shadow is on %s but the tensor is on %s", a, b);
    }
    /* The shadow's own history would be dropped by the alias below; one
     * that autograd tracks is not a cache entry but a mistake. */
    if (shadow->requires_grad)
        return ml_error_null("cast_as: the shadow requires grad (a shadow is a plain copy: detach it)");
    ml_tensor *o = ml_from_storage(shadow->storage, shadow->offset, shadow->ndim, shadow->shape, shadow->strides,
                                   shadow->dtype);
    if (!o) return NULL;
    ml_node *n = ml_node_begin(ML_OP_cast_as, to_backward, 1, &t);
    if (n) ml_node_finish(n, o);
    return o;
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
    /* The CPU copy kernel converts into a contiguous float64 view of out. */
    ml_ktensor dst = {.data = out, .dtype = ML_F64, .device = ml_cpu(), .ndim = c->ndim};
    memcpy(dst.shape, c->shape, (size_t)c->ndim * sizeof dst.shape[0]);
    ml_kt_contiguous_strides(dst.ndim, dst.shape, dst.strides);
    int rc = ML_RUN(c->device, ml_copy, &dst, ML_KT(c));
    ml_release(cpu);
    if (rc < 0) { free(out); return NULL; }
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

