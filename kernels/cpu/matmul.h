/* matmul.h — CPU matrix products over OpenBLAS (sgemm/dgemm): batched
 * matmul, linear, and the raw GEMM the conv and attention kernels share.
 *
 * Dimension letters: B batch, M rows of a product, N its columns, K the
 * reduced dim; for linear: M rows of x (all leading dims flattened), K in
 * features (the reduced dim), O out features.
 *
 * Contract of the tensor kernels: every tensor is contiguous, float32 or
 * float64, all of one dtype (the host ops check this).  Gradients are
 * written (=), never accumulated; a NULL gradient means "not wanted".
 * Return 0, or -1 with ml_error. */
#ifndef ML_KERNELS_CPU_MATMUL_H
#define ML_KERNELS_CPU_MATMUL_H

#include <stdbool.h>
#include "tensor.h"

/* out [B, M, N] = op(a) @ op(b) for every batch.
 *   a [Ba, M, K], or [Ba, K, M] when trans_a (op(a) = a^T)
 *   b [Bb, K, N], or [Bb, N, K] when trans_b
 * Ba and Bb are B, or 1 for an operand shared by every batch. */
int ml_matmul_forward_cpu(ml_tensor *out, const ml_tensor *a, const ml_tensor *b,
                          bool trans_a, bool trans_b);
/* da / db have a's / b's stored layout; a shared operand (batch 1) gets the
 * sum over the batch. */
int ml_matmul_backward_cpu(ml_tensor *da, ml_tensor *db, const ml_tensor *dout,
                           const ml_tensor *a, const ml_tensor *b, bool trans_a, bool trans_b);

/* out [M, O] = x [M, K] @ w [O, K]^T + b [O] (b may be NULL): one GEMM with
 * the bias pre-filled. */
int ml_linear_forward_cpu(ml_tensor *out, const ml_tensor *x, const ml_tensor *w, const ml_tensor *b);
/* dx [M, K] = dout w;  dw [O, K] = dout^T x;  db [O] = column sums of dout. */
int ml_linear_backward_cpu(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                           const ml_tensor *x, const ml_tensor *w);

/* ---- raw helpers on row-major buffers of dtype dt (F32 or F64) ---------- */
/* c = alpha op(a) op(b) + beta c, op(a) [m, k], op(b) [k, n], c [m, n] with
 * leading dims lda/ldb/ldc.  Any size may be 0. */
int ml_gemm_cpu(ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                double beta, void *c, int64_t ldc);
/* Every row of c [m, n] <- v [n]. */
void ml_fill_rows_cpu(ml_dtype dt, void *c, const void *v, int64_t m, int64_t n);
/* s [n] (=, or += when accumulate) column sums of a [m, n], summed in double. */
int ml_colsum_cpu(ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate);

#endif
