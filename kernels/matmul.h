/* matmul.h — matrix products: batched matmul and linear, forward and
 * backward, and the raw GEMM and column sums the conv and attention kernels
 * share: kernels/cpu/matmul.c (OpenBLAS) and kernels/cuda/matmul.cu
 * (cuBLASLt).  kernels/cuda/gemm.h has the GPU-only services.
 *
 * Dimension letters: B batch, M rows of a product, N its columns, K the
 * reduced dim; for linear: M rows of x (all leading dims flattened), K in
 * features (the reduced dim), O out features.
 *
 * The host op has checked: every tensor contiguous, of one float dtype, on
 * one device, with the shapes below.  Gradients are written (=), never
 * accumulated; a NULL gradient means "not wanted".  The CPU computes
 * float32 and float64.  The GPU also takes float16 and bfloat16, multiplied
 * with float32 accumulation and rounded once; float32 is computed in true
 * float32 (CUBLAS_COMPUTE_32F, never TF32), so results agree with the CPU
 * to summation order.  Column sums accumulate in double.  Return 0, or -1
 * with ml_error. */
#ifndef ML_KERNELS_MATMUL_H
#define ML_KERNELS_MATMUL_H

#include "kernel.h"

/* out [B, M, N] = op(a) @ op(b) for every batch.
 *   a [Ba, M, K], or [Ba, K, M] when trans_a (op(a) = a^T)
 *   b [Bb, K, N], or [Bb, N, K] when trans_b
 * Ba and Bb are B, or 1 for an operand shared by every batch. */
ML_KERNEL(ml_matmul_forward, (ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b, bool trans_a,
                              bool trans_b));
/* da / db have a's / b's stored layout; a shared operand (batch 1) gets the
 * sum over the batch. */
ML_KERNEL(ml_matmul_backward, (ml_ktensor *da, ml_ktensor *db, const ml_ktensor *dout, const ml_ktensor *a,
                               const ml_ktensor *b, bool trans_a, bool trans_b));

/* out [M, O] = x [M, K] @ w [O, K]^T + b [O] (b may be NULL). */
ML_KERNEL(ml_linear_forward, (ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b));
/* dx [M, K] = dout w;  dw [O, K] = dout^T x;  db [O] = column sums of dout.
 * Each gradient has dout's dtype, except that on the GPU any of them may
 * be float32 when dout is float16/bfloat16: written from the f32
 * accumulator, never rounded to the half type (the host asks for this
 * where the gradient is bound for an f32 parameter).  The CPU refuses a
 * gradient whose dtype differs from dout's. */
ML_KERNEL(ml_linear_backward, (ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                               const ml_ktensor *x, const ml_ktensor *w));

/* ---- raw helpers on row-major buffers of dtype dt ----------------------- */
/* For other kernels: the CUDA twins work on the current device (the caller
 * selected it with ml_cuda_enter), on its compute stream.
 * c = alpha op(a) op(b) + beta c, op(a) [m, k], op(b) [k, n], c [m, n] with
 * leading dims lda/ldb/ldc.  Any size may be 0. */
ML_KERNEL(ml_gemm, (ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                    const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c, int64_t ldc));
/* s [n] (=, or += when accumulate) column sums of a [m, n], summed in double. */
ML_KERNEL(ml_colsum, (ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate));

/* Every row of c [m, n] <- v [n] (CPU only: the bias epilogue of
 * ml_cuda_gemm does this on the GPU). */
#ifdef __cplusplus
extern "C"
#endif
void ml_fill_rows_cpu(ml_dtype dt, void *c, const void *v, int64_t m, int64_t n);

#endif
