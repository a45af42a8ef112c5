/* ops_check.h — argument checks shared by the matmul, nn and index ops
 * (host/ops_matmul.c, host/ops_nn.c, host/ops_index.c): float dtypes the
 * device can compute in, operands on one device with one dtype, and the
 * error for a device whose kernel does not exist yet. */
#ifndef ML_OPS_CHECK_H
#define ML_OPS_CHECK_H

#include "tensor.h"

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

#endif
