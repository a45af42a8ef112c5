/* ops_common.h — helpers shared by the matmul, nn and index ops
 * (host/ops_matmul.c, host/ops_nn.c, host/ops_index.c): argument checks
 * (float dtypes the device computes in, one device and dtype for all
 * operands, index dtypes), kernel dispatch by device, and contiguous
 * headers with another shape for the [N, L, C]-style views kernels take. */
#ifndef ML_OPS_COMMON_H
#define ML_OPS_COMMON_H

#include "tensor.h"
#include "autograd.h"

/* t must be a float tensor the device has kernels for: the CPU computes in
 * float32 and float64 (float64 for gradient checks) only. */
static inline int ml_check_float(const char *op, const char *arg, const ml_tensor *t) {
    if (!ml_dtype_is_float(t->dtype))
        return ml_error("%s: %s must be a floating point tensor (got %s)", op, arg, ml_dtype_name(t->dtype));
    if (t->device.type == ML_CPU && t->dtype != ML_F32 && t->dtype != ML_F64)
        return ml_error("%s: %s is %s, which the CPU does not compute in (use float32 or float64)",
                        op, arg, ml_dtype_name(t->dtype));
    return 0;
}

/* b (named arg_b) must share a's dtype and device; NULL b is accepted. */
static inline int ml_check_like(const char *op, const char *arg_a, const ml_tensor *a,
                                const char *arg_b, const ml_tensor *b) {
    if (!b) return 0;
    if (!ml_device_eq(a->device, b->device)) {
        char da[32], db[32];
        ml_device_str(a->device, da, sizeof da);
        ml_device_str(b->device, db, sizeof db);
        return ml_error("%s: %s is on %s but %s is on %s", op, arg_a, da, arg_b, db);
    }
    if (a->dtype != b->dtype)
        return ml_error("%s: %s is %s but %s is %s (convert one of them first)", op, arg_a,
                        ml_dtype_name(a->dtype), arg_b, ml_dtype_name(b->dtype));
    return 0;
}

/* Integer index tensors (ids, gather/index_select indices). */
static inline int ml_check_index(const char *op, const char *arg, const ml_tensor *t) {
    if (t->dtype != ML_I32 && t->dtype != ML_I64)
        return ml_error("%s: %s must be an int32 or int64 tensor (got %s)", op, arg, ml_dtype_name(t->dtype));
    return 0;
}

/* The answer for a device without a kernel for this op. */
static inline int ml_no_device_kernel(const char *op, ml_device dev) {
    if (dev.type == ML_CPU) return ml_error("%s: no CPU kernel", op);
#ifdef ML_WITH_CUDA
    return ml_error("%s: not implemented on cuda yet", op);
#else
    return ml_error("%s: tensor on cuda but moonlit was built without CUDA", op);
#endif
}

/* Run the CPU kernel call for CPU tensors; other devices get the error above
 * until their kernels exist. */
#define ML_KERNEL(op, dev, cpu_call) ((dev).type == ML_CPU ? (cpu_call) : ml_no_device_kernel((op), (dev)))

/* A header over contiguous t's storage with another shape of the same
 * numel (no autograd: for the kernels' views and for gradients). */
static inline ml_tensor *ml_header_as(const ml_tensor *t, int ndim, const int64_t *shape) {
    return ml_from_storage(t->storage, t->offset, ndim, shape, NULL, t->dtype);
}

/* A detached contiguous copy-or-alias of t (NULL stays NULL; *rc = -1 on
 * failure): the kernels' input, never recorded by autograd. */
static inline ml_tensor *ml_kernel_input(ml_tensor *t, int *rc) {
    if (!t || *rc < 0) return NULL;
    ml_tensor *d = ml_detach(t);
    ml_tensor *c = d ? ml_contiguous(d) : NULL;
    ml_release(d);
    if (!c) *rc = -1;
    return c;
}

/* A new uninitialised gradient like `like` when node input i needs one
 * (NULL otherwise; *rc = -1 if the allocation fails). */
static inline ml_tensor *ml_grad_buffer(ml_node *n, int i, int ndim, const int64_t *shape,
                                        const ml_tensor *like, int *rc) {
    if (*rc < 0 || !ml_node_needs_grad(n, i)) return NULL;
    ml_tensor *g = ml_empty(ndim, shape, like->dtype, like->device);
    if (!g) *rc = -1;
    return g;
}

#endif
