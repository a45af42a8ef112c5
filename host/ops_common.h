/* ops_common.h — helpers shared by the matmul/nn/index ops (host/ops_matmul.c,
 * host/ops_nn.c, host/ops_index.c): argument checks, reshaped headers over
 * contiguous data, the kernels' contiguous inputs and gradient buffers, and
 * CPU/CUDA dispatch (ML_RUN and ML_KT, host/dispatch.h). */
#ifndef ML_OPS_COMMON_H
#define ML_OPS_COMMON_H

#include "ops.h"
#include "checked_math.h"
#include "dispatch.h"

/* A new header over t's storage at t's offset with contiguous strides for
 * `shape` (t's data must be laid out that way).  New reference. */
static inline ml_tensor *ml_header_as(const ml_tensor *t, int ndim, const int64_t *shape) {
    return ml_from_storage(t->storage, t->offset, ndim, shape, NULL, t->dtype);
}

/* -1 with "<op>: <what> must be a float tensor (got int64)" unless t is a
 * float tensor its device computes in: the CPU kernels take float32 and
 * float64 (float64 for gradient checks) only. */
static inline int ml_check_float(const char *op, const char *what, const ml_tensor *t) {
    if (!t) return ml_error("%s: %s is missing", op, what);
    if (!ml_dtype_is_float(t->dtype))
        return ml_error("%s: %s must be a float tensor (got %s)", op, what, ml_dtype_name(t->dtype));
    if (t->device.type == ML_CPU && t->dtype != ML_F32 && t->dtype != ML_F64)
        return ml_error("%s: %s is %s, which the CPU does not compute in (use float32 or float64)", op, what,
                        ml_dtype_name(t->dtype));
    return 0;
}

/* -1 unless b (may be NULL: nothing to check) has a's dtype and device. */
static inline int ml_check_like(const char *op, const char *wa, const ml_tensor *a, const char *wb,
                                const ml_tensor *b) {
    if (!b) return 0;
    if (b->dtype != a->dtype)
        return ml_error("%s: %s has dtype %s but %s has dtype %s", op, wb, ml_dtype_name(b->dtype), wa,
                        ml_dtype_name(a->dtype));
    if (!ml_device_eq(a->device, b->device)) {
        char da[32], db[32];
        ml_device_str(a->device, da, sizeof da);
        ml_device_str(b->device, db, sizeof db);
        return ml_error("%s: %s is on %s but %s is on %s", op, wb, db, wa, da);
    }
    return 0;
}

/* -1 unless t is an int32/int64 index tensor on x's device. */
static inline int ml_check_index(const char *op, const char *what, const ml_tensor *t, const ml_tensor *x) {
    if (!t) return ml_error("%s: %s is missing", op, what);
    if (t->dtype != ML_I32 && t->dtype != ML_I64)
        return ml_error("%s: %s must be an int32 or int64 tensor (got %s)", op, what, ml_dtype_name(t->dtype));
    if (!ml_device_eq(t->device, x->device)) {
        char dt[32], dx[32];
        ml_device_str(t->device, dt, sizeof dt);
        ml_device_str(x->device, dx, sizeof dx);
        return ml_error("%s: %s is on %s but the input is on %s", op, what, dt, dx);
    }
    return 0;
}

/* A detached contiguous alias-or-copy of t, the kernels' input (never
 * recorded by autograd).  NULL stays NULL; sets *rc = -1 on failure and
 * does nothing once *rc < 0, so several calls can share one check. */
static inline ml_tensor *ml_kernel_input(ml_tensor *t, int *rc) {
    if (!t || *rc < 0) return NULL;
    ml_tensor *d = ml_detach(t);
    ml_tensor *c = d ? ml_contiguous(d) : NULL;
    ml_release(d);
    if (!c) *rc = -1;
    return c;
}

/* A new uninitialised gradient of `shape` (of dtype on device, or with
 * like's dtype and device) when node input i needs one, else NULL (*rc as
 * for ml_kernel_input). */
static inline ml_tensor *ml_grad_buffer_as(ml_node *n, int i, int ndim, const int64_t *shape, ml_dtype dtype,
                                           ml_device device, int *rc) {
    if (*rc < 0 || !ml_node_needs_grad(n, i)) return NULL;
    ml_tensor *g = ml_empty(ndim, shape, dtype, device);
    if (!g) *rc = -1;
    return g;
}
static inline ml_tensor *ml_grad_buffer(ml_node *n, int i, int ndim, const int64_t *shape,
                                        const ml_tensor *like, int *rc) {
    return ml_grad_buffer_as(n, i, ndim, shape, like->dtype, like->device, rc);
}

#endif
