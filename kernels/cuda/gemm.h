/* gemm.h — GPU-only matrix services other CUDA kernels build on (conv2d's
 * bias gradient, attention), beside the CPU/CUDA pairs of kernels/matmul.h.
 * Implemented in kernels/cuda/matmul.cu.  Plain C. */
#ifndef ML_KERNELS_CUDA_GEMM_H
#define ML_KERNELS_CUDA_GEMM_H

#include "kernel.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Row-major strided-batched GEMM on device dev's compute stream:
 *     c[p] = alpha op(a[p]) op(b[p]) + beta c[p] (+ bias)     for p < batch
 * op(a[p]) [m, k] (a stored [k, m] when trans_a), op(b[p]) [k, n], c[p]
 * [m, n]; ld* are row strides, stride_* batch strides in elements.
 * stride_a / stride_b may be 0 (one operand shared by every batch);
 * stride_c must keep the products apart (>= m * ldc when batch > 1).
 * bias: NULL or [n] of dtype dt, added to every row of every product (a
 * cuBLASLt epilogue where one fits).  Any size may be 0.  0 / -1. */
int ml_cuda_gemm(int dev, ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                 double alpha, const void *a, int64_t lda, int64_t stride_a,
                 const void *b, int64_t ldb, int64_t stride_b,
                 double beta, void *c, int64_t ldc, int64_t stride_c, int64_t batch, const void *bias);
/* s [n] (=, or += when accumulate) column sums of the row-major a [m, n]
 * on device dev, accumulated in double (deterministic order). */
int ml_cuda_colsum(int dev, ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate);

#ifdef __cplusplus
}
#endif
#endif
