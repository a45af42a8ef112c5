/* reduce.h — CPU reduction kernels.  CUDA twins in kernels/cuda/reduce.h
 * have the same signatures with _cuda.
 *
 * Reduced dims are given by shapes, not lists: `out` has x's number of dims
 * with size 1 on every reduced dim (the keepdim layout) and is contiguous;
 * x may have any strides.  The caller makes the result's final view.
 * Floats accumulate in double, integers in int64.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_REDUCE_H
#define ML_KERNELS_CPU_REDUCE_H

#include "tensor.h"

/* out = scale * sum(x).  x f32/f64: out has x's dtype; x i32/i64/u8/bool:
 * out is int64 and scale must be 1. */
int ml_sum_cpu(ml_tensor *out, const ml_tensor *x, double scale);
/* out = sum((x - mean)^2) / max(0, N - correction), N elements per output
 * (two passes: mean first).  f32/f64; out has x's dtype. */
int ml_var_cpu(ml_tensor *out, const ml_tensor *x, double correction);
/* out = (sum |x|^p)^(1/p) for finite p > 0.  f32/f64. */
int ml_norm_cpu(ml_tensor *out, const ml_tensor *x, double p);
/* Along one dim (x->shape[dim] >= 1): values = max, indices = position of
 * its first occurrence (NaN counts as the maximum).  values (x's dtype, may
 * be NULL) and indices (int64) have x's shape with size 1 at dim and are
 * contiguous.  Floats and integers. */
int ml_max_dim_cpu(ml_tensor *values, ml_tensor *indices, const ml_tensor *x, int dim);

#endif
