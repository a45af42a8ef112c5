/* reduce.h — CUDA reductions: the twins of kernels/cpu/reduce.h, same
 * signatures and contract (out in the keepdim layout and contiguous, x any
 * strides).  Float inputs may also be f16/bf16 (out of the same dtype);
 * every float reduction accumulates in double, integer sums in int64, so
 * results agree with the CPU to rounding.  Deterministic: the summation
 * order depends only on the shapes and the GPU model.
 * Implemented in kernels/cuda/reduce.cu. */
#ifndef ML_KERNELS_CUDA_REDUCE_H
#define ML_KERNELS_CUDA_REDUCE_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_sum_cuda(ml_tensor *out, const ml_tensor *x, double scale);
int ml_var_cuda(ml_tensor *out, const ml_tensor *x, double correction);
int ml_norm_cuda(ml_tensor *out, const ml_tensor *x, double p);
int ml_max_dim_cuda(ml_tensor *values, ml_tensor *indices, const ml_tensor *x, int dim);

#ifdef __cplusplus
}
#endif
#endif
