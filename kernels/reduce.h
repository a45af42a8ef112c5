/* reduce.h — reductions: kernels/cpu/reduce.c and kernels/cuda/reduce.cu.
 *
 * Reduced dims are given by shapes, not lists: `out` has x's number of dims
 * with size 1 on every reduced dim (the keepdim layout) and is contiguous;
 * x may have any strides.  The caller makes the result's final view.  The
 * host op has checked: that layout, one device, float inputs for var and
 * norm with out of x's dtype, int64 out and scale 1 for integer sums, p
 * finite and > 0, dim in range with x->shape[dim] >= 1.
 *
 * Floats accumulate in double, integers in int64.  The GPU also takes
 * float16 / bfloat16 (out of the same dtype), so results agree with the
 * CPU to rounding; it is deterministic: the summation order depends only on
 * the shapes and the GPU model.  Return 0 / -1. */
#ifndef ML_KERNELS_REDUCE_H
#define ML_KERNELS_REDUCE_H

#include "kernel.h"

/* out = scale * sum(x).  x float: out has x's dtype; x int32/int64/uint8/
 * bool: out is int64 and scale is 1. */
ML_KERNEL(ml_sum, (ml_ktensor *out, const ml_ktensor *x, double scale));
/* out = sum((x - mean)^2) / max(0, N - correction), N elements per output
 * (two passes: mean first).  Floats. */
ML_KERNEL(ml_var, (ml_ktensor *out, const ml_ktensor *x, double correction));
/* out = (sum |x|^p)^(1/p) for finite p > 0.  Floats. */
ML_KERNEL(ml_norm, (ml_ktensor *out, const ml_ktensor *x, double p));
/* Along one dim: values = max, indices = position of its first occurrence
 * counted from index_base (0 for C, 1 for Lua; the host checked that
 * index_base + x->shape[dim] fits in int64), NaN counting as the maximum.
 * values (x's dtype, may be NULL) and indices (int64) have x's shape with
 * size 1 at dim and are contiguous.  Floats and integers. */
ML_KERNEL(ml_max_dim, (ml_ktensor *values, ml_ktensor *indices, const ml_ktensor *x, int dim, int64_t index_base));

#endif
