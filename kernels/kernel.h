/* kernel.h — what a kernel sees: the plain tensor descriptor, the devices,
 * the elementwise op codes, and the one macro that declares a CPU/CUDA
 * kernel pair.  Plain C, usable from C and CUDA C++; it includes no host
 * header other than dtype.h and error.h, so kernels never see refcounts,
 * gradients, autograd nodes or storage.
 *
 * The descriptor.  A kernel takes ml_ktensor, never ml_tensor: the data
 * pointer (already offset to the first element), dtype, device, and shape
 * and strides in elements.  The host builds one per tensor argument
 * (ML_KT in host/dispatch.h) just before the call; it owns nothing and
 * lives only for that call.  A NULL descriptor means "not wanted" (an
 * optional bias, a gradient nobody asked for), as NULL tensors did.
 *
 * The declaration.  Each family header (kernels/norm.h, kernels/conv2d.h,
 * ...) writes each signature once:
 *
 *     ML_KERNEL(ml_layer_norm_forward, (ml_ktensor *out, ..., double eps));
 *
 * which declares ml_layer_norm_forward_cpu (kernels/cpu/<family>.c) and its
 * CUDA twin ml_layer_norm_forward_cuda (kernels/cuda/<family>.cu), both with
 * C linkage.  Both implementation files include the family header, so a
 * definition that drifts from the declaration is a compile error (define
 * the CUDA twin with `extern "C"` so that C++ cannot take it for an
 * overload).  Host files see the CUDA twin as a weak reference in CUDA
 * builds: a build whose kernels/cuda lacks a twin still links, and calling
 * it reports the missing kernel (CUDA_CALL in host/dispatch.h).
 *
 * Contract of every kernel: arguments were checked by the host op (shapes,
 * dtypes, devices, contiguity the family header asks for); the kernel does
 * the arithmetic and reports only what the host cannot know before running
 * it (an unsupported dtype on this device, an out-of-range index value, a
 * CUDA or library failure), with ml_error, returning -1.  Kernels never
 * create tensors; scratch memory comes from the device's allocator
 * (ml_cuda_workspace in kernels/cuda/allocator.h on the GPU). */
#ifndef ML_KERNEL_H
#define ML_KERNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "dtype.h"
#include "error.h"

/* ---- devices ------------------------------------------------------------ */

#define ML_MAX_DIMS 8

typedef enum { ML_CPU = 0, ML_CUDA = 1 } ml_device_type;
typedef struct { int8_t type; int8_t index; } ml_device;

static inline ml_device ml_cpu(void) { ml_device d = {ML_CPU, 0}; return d; }
static inline bool ml_device_eq(ml_device a, ml_device b) { return a.type == b.type && a.index == b.index; }

/* ---- the descriptor ----------------------------------------------------- */

typedef struct ml_ktensor {
    void *data;                      /* the first element (the view's offset applied) */
    ml_dtype dtype;
    ml_device device;
    int ndim;
    int64_t shape[ML_MAX_DIMS];
    int64_t strides[ML_MAX_DIMS];    /* in elements; 0 on broadcast dims */
} ml_ktensor;

/* Element count.  The host checked when the tensor was made that it (and
 * its byte size) fits in int64, so the product cannot wrap. */
static inline int64_t ml_kt_numel(const ml_ktensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Row-major contiguous strides for `shape` (sizes of 0 count as 1, so the
 * strides of an empty tensor stay products of the other sizes). */
static inline void ml_kt_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) { strides[i] = s; s *= shape[i] > 0 ? shape[i] : 1; }
}

/* True when the elements are laid out row-major without gaps (size-1 dims
 * may have any stride). */
static inline bool ml_kt_is_contiguous(const ml_ktensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != s) return false;
        s *= t->shape[i];
    }
    return true;
}

/* "[2, 3, 4]" into buf (truncated to n bytes), for messages. */
static inline const char *ml_kt_shape_str(const ml_ktensor *t, char *buf, size_t n) {
    if (n == 0) return buf;
    int w = snprintf(buf, n, "[");
    size_t k = w > 0 ? (size_t)w : 0;
    for (int i = 0; i < t->ndim && k < n; i++) {
        w = snprintf(buf + k, n - k, i ? ", %lld" : "%lld", (long long)t->shape[i]);
        if (w > 0) k += (size_t)w;
    }
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

/* ---- elementwise op codes (kernels/elementwise.h) ----------------------- */

typedef enum { ML_ADD, ML_SUB, ML_MUL, ML_DIV, ML_POW, ML_MAXIMUM, ML_MINIMUM,
               ML_EQ, ML_NE, ML_LT, ML_LE, ML_GT, ML_GE } ml_binop;

typedef enum { ML_NEG, ML_SQRT, ML_RSQRT, ML_EXP, ML_LOG, ML_ABS, ML_SIN, ML_COS,
               ML_SILU, ML_GELU, ML_GELU_TANH, ML_QUICK_GELU, ML_SIGMOID, ML_TANH,
               ML_RELU, ML_SQUARE, ML_ROUND, ML_FLOOR, ML_SIGN, ML_NUM_UNOPS } ml_unop;

/* "add", "gelu_tanh", ... for messages (kernels/cpu/elementwise.c). */
const char *ml_binop_name(ml_binop op);
const char *ml_unop_name(ml_unop op);

#ifdef __cplusplus
}
#endif

/* ---- one declaration per kernel pair ------------------------------------ */

#ifdef __cplusplus
#define ML_KERNEL_LINKAGE extern "C"
#else
#define ML_KERNEL_LINKAGE
#endif

/* Weak only where the twin is used, not where it is defined. */
#if defined(ML_WITH_CUDA) && !defined(__CUDACC__)
#define ML_CUDA_WEAK __attribute__((weak))
#else
#define ML_CUDA_WEAK
#endif

#define ML_KERNEL(name, params)                 \
    ML_KERNEL_LINKAGE int name##_cpu params;    \
    ML_KERNEL_LINKAGE ML_CUDA_WEAK int name##_cuda params

#endif
