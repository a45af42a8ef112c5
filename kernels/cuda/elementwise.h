/* elementwise.h — CUDA elementwise kernels: the twins of
 * kernels/cpu/elementwise.h, same signatures and contract (operands already
 * broadcast to out's shape with stride-0 views, any strides, an input may
 * alias out element for element).  Unlike the CPU kernels these also take
 * f16 and bf16 directly, computing in f32 and rounding once.
 * Implemented in kernels/cuda/elementwise.cu. */
#ifndef ML_KERNELS_CUDA_ELEMENTWISE_H
#define ML_KERNELS_CUDA_ELEMENTWISE_H

#include "tensor.h"
#include "ops.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_binary_cuda(ml_binop op, ml_tensor *out, const ml_tensor *a, const ml_tensor *b);
int ml_binary_scalar_cuda(ml_binop op, ml_tensor *out, const ml_tensor *a, double s, bool scalar_first);
int ml_unary_cuda(ml_unop op, ml_tensor *out, const ml_tensor *x);
int ml_unary_backward_cuda(ml_unop op, ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x);
int ml_clamp_cuda(ml_tensor *out, const ml_tensor *x, double lo, double hi);
int ml_clamp_backward_cuda(ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x, double lo, double hi);
int ml_where_cuda(ml_tensor *out, const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b);

#ifdef __cplusplus
}
#endif
#endif
