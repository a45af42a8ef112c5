/* matmul.h — CUDA matrix products over cuBLASLt: the twins of
 * kernels/cpu/matmul.h (same signatures and contract), plus the GEMM and
 * column-sum services other CUDA kernels build on (conv2d's bias gradient,
 * attention).  Implemented in kernels/cuda/matmul.cu.
 *
 * Unlike the CPU kernels these take f16 and bf16 as well as f32 and f64:
 * half types are multiplied with f32 accumulation and rounded once; f32 is
 * computed in true f32 (CUBLAS_COMPUTE_32F, never TF32), so results agree
 * with the CPU to summation order.  Column sums accumulate in double. */
#ifndef ML_KERNELS_CUDA_MATMUL_H
#define ML_KERNELS_CUDA_MATMUL_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stdbool.h>
#include <stddef.h>
#include "tensor.h"

/* ---- twins of kernels/cpu/matmul.h ------------------------------------- */
int ml_matmul_forward_cuda(ml_tensor *out, const ml_tensor *a, const ml_tensor *b, bool trans_a, bool trans_b);
int ml_matmul_backward_cuda(ml_tensor *da, ml_tensor *db, const ml_tensor *dout, const ml_tensor *a,
                            const ml_tensor *b, bool trans_a, bool trans_b);
int ml_linear_forward_cuda(ml_tensor *out, const ml_tensor *x, const ml_tensor *w, const ml_tensor *b);
int ml_linear_backward_cuda(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                            const ml_tensor *x, const ml_tensor *w);
/* The raw helpers work on the CURRENT device (the caller has selected it
 * with ml_cuda_enter), on its compute stream; dt may also be F16/BF16.
 * (ml_fill_rows has no twin: it cannot report a failure, and the bias
 * epilogue of ml_cuda_gemm does its work.) */
int ml_gemm_cuda(ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                 double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                 double beta, void *c, int64_t ldc);
int ml_colsum_cuda(ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate);

/* ---- services for CUDA kernels ------------------------------------------ */
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
