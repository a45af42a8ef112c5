/* tensor.h — the tensor core: storage, views, creation, copies.
 *
 * A tensor is a refcounted header (dtype, device, shape, strides, offset)
 * over a refcounted storage.  Views (reshape of contiguous data, permute,
 * transpose, narrow, select, expand, squeeze, unsqueeze) make a new header
 * over the same storage.  Dimensions here are 0-based; the Lua bindings
 * translate the 1-based Lua API.
 *
 * Ownership: every function returning ml_tensor* returns a NEW reference the
 * caller must ml_release().  Functions taking ml_tensor* borrow it.  On error
 * they return NULL with a message in ml_last_error(). */
#ifndef ML_TENSOR_H
#define ML_TENSOR_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include "dtype.h"
#include "error.h"
#include "kernel.h"   /* ML_MAX_DIMS, ml_device, ml_cpu(), and the kernels' descriptor */

/* Parse "cpu", "cuda", "cuda:1"; returns 0 or -1 with error set. */
int ml_device_parse(const char *s, ml_device *out);
void ml_device_str(ml_device d, char *buf, size_t n);

typedef struct ml_storage {
    void *data;
    size_t nbytes;
    int refcount;
    ml_device device;
    /* How to free `data`: NULL means the allocator of `device` owns it.
     * Non-NULL for memory we do not own (mmap'd files): called with ctx. */
    void (*release)(void *ctx, void *data, size_t nbytes);
    void *release_ctx;
    /* Bumped by every in-place write through any tensor on this storage,
     * so views share it; autograd compares it with the value a saved
     * tensor had when it was saved. */
    int64_t version;
} ml_storage;

struct ml_node;

typedef struct ml_tensor {
    ml_storage *storage;
    int64_t offset;                 /* in elements */
    int ndim;
    int64_t shape[ML_MAX_DIMS];
    int64_t strides[ML_MAX_DIMS];   /* in elements */
    ml_dtype dtype;
    ml_device device;
    int refcount;
    /* autograd */
    bool requires_grad;
    struct ml_tensor *grad;         /* accumulated gradient (owned) */
    struct ml_node *grad_fn;        /* producer node; NULL for leaves (owned ref) */
    struct ml_hook *hooks;          /* gradient hooks (leaf tensors) */
} ml_tensor;

/* ---- lifetime ---------------------------------------------------------- */
ml_tensor *ml_retain(ml_tensor *t);
void ml_release(ml_tensor *t);     /* NULL-safe */

/* ---- storage ----------------------------------------------------------- */
ml_storage *ml_storage_new(size_t nbytes, ml_device dev);   /* uninitialised */
ml_storage *ml_storage_wrap(void *data, size_t nbytes, ml_device dev,
                            void (*release)(void *, void *, size_t), void *ctx);
void ml_storage_release(ml_storage *s);
/* Live storages (all devices) and bytes owned on CPU and CUDA. */
void ml_storage_stats(long long *count, long long *cpu_bytes, long long *cuda_bytes);
static inline void *ml_data(const ml_tensor *t) {
    return (char *)t->storage->data + t->offset * (int64_t)ml_dtype_size(t->dtype);
}

/* ---- creation ---------------------------------------------------------- */
ml_tensor *ml_empty(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev);
ml_tensor *ml_zeros(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev);
ml_tensor *ml_full(int ndim, const int64_t *shape, double v, ml_dtype dt, ml_device dev);
ml_tensor *ml_empty_like(const ml_tensor *t);
ml_tensor *ml_zeros_like(const ml_tensor *t);
ml_tensor *ml_arange(double start, double end, double step, ml_dtype dt, ml_device dev);
/* Wrap a storage as a tensor header (takes a new ref on the storage). */
ml_tensor *ml_from_storage(ml_storage *s, int64_t offset, int ndim, const int64_t *shape,
                           const int64_t *strides, ml_dtype dt);
/* CPU tensor copied from a host buffer of doubles. */
ml_tensor *ml_from_doubles(const double *v, int ndim, const int64_t *shape, ml_dtype dt);
/* Scalar (0-dim) tensor. */
ml_tensor *ml_scalar(double v, ml_dtype dt, ml_device dev);

/* ---- shape queries ----------------------------------------------------- */
int64_t ml_numel(const ml_tensor *t);
bool ml_is_contiguous(const ml_tensor *t);
bool ml_same_shape(const ml_tensor *a, const ml_tensor *b);
/* "[2, 3, 4]" into buf. */
const char *ml_shape_str(const ml_tensor *t, char *buf, size_t n);
void ml_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides);
/* 0 if a tensor of `shape` and dtype dt can exist: no negative size, and its
 * element count (zero sizes counted as 1) times the element size fits in
 * 2^63 bytes, so numel, contiguous strides and byte sizes never overflow.
 * Else -1 with an error naming op (may be NULL) and the shape.  Every
 * header is checked this way when made; *numel (may be NULL) gets the count. */
int ml_shape_check(const char *op, int ndim, const int64_t *shape, ml_dtype dt, int64_t *numel);
/* Normalise a possibly negative 0-based dim; -1 + error if out of range. */
int ml_wrap_dim(int dim, int ndim);

/* ---- views (no copy; the result shares storage, autograd recorded) ----- */
ml_tensor *ml_view(ml_tensor *t, int ndim, const int64_t *shape);      /* one dim may be -1; copies if not viewable */
ml_tensor *ml_reshape(ml_tensor *t, int ndim, const int64_t *shape);   /* alias of ml_view */
ml_tensor *ml_permute(ml_tensor *t, const int *perm);
ml_tensor *ml_transpose(ml_tensor *t, int d0, int d1);
ml_tensor *ml_narrow(ml_tensor *t, int dim, int64_t start, int64_t len);
ml_tensor *ml_select(ml_tensor *t, int dim, int64_t index);
ml_tensor *ml_expand(ml_tensor *t, int ndim, const int64_t *shape);   /* -1 keeps a size */
ml_tensor *ml_squeeze(ml_tensor *t, int dim);                         /* dim < -ndim..: squeeze all if dim == ML_ALL_DIMS */
ml_tensor *ml_unsqueeze(ml_tensor *t, int dim);
ml_tensor *ml_contiguous(ml_tensor *t);      /* retains t if already contiguous */
ml_tensor *ml_detach(ml_tensor *t);          /* same storage, no grad history */
#define ML_ALL_DIMS (-1000)

/* ---- copies and conversion -------------------------------------------- */
/* dst <- src (same numel/shape after broadcasting src to dst; any dtypes,
 * any devices).  Not recorded by autograd. */
int ml_copy_(ml_tensor *dst, const ml_tensor *src);
ml_tensor *ml_to_dtype(ml_tensor *t, ml_dtype dt);       /* retains t if same; autograd recorded */
ml_tensor *ml_to_device(ml_tensor *t, ml_device dev);    /* retains t if same; autograd recorded */
ml_tensor *ml_clone(ml_tensor *t);                       /* autograd recorded */
int ml_fill_(ml_tensor *t, double v);
/* Element at flat (logical, row-major) index i, as double. */
int ml_item(const ml_tensor *t, double *out);
/* Copy all elements (logical order) to a new malloc'd array of doubles. */
double *ml_to_doubles(const ml_tensor *t);

/* ---- printing ---------------------------------------------------------- */
/* PyTorch-like text: values abbreviated beyond 1000 elements, then shape,
 * dtype, device.  Returns malloc'd string. */
char *ml_tensor_repr(const ml_tensor *t);

/* ---- broadcasting helper ----------------------------------------------- */
int ml_broadcast_shape(int na, const int64_t *sa, int nb, const int64_t *sb,
                       int *nout, int64_t *sout);

#endif
