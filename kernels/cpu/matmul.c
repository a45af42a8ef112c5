/* matmul.c — CPU batched matmul and linear over OpenBLAS, forward and
 * backward.  Batches are folded into one GEMM wherever the memory layout
 * allows (a shared right operand, or a batch-summed weight gradient), so a
 * [B, S, K] @ [K, N] product is a single sgemm, as in PyTorch. */
#include "matmul.h"
#include <cblas.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

int ml_gemm_cpu(ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                double beta, void *c, int64_t ldc) {
    if (m == 0 || n == 0) return 0;
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
        return ml_error("gemm: sizes m=%lld n=%lld k=%lld exceed the BLAS limit of %d",
                        (long long)m, (long long)n, (long long)k, INT_MAX);
    size_t es = ml_dtype_size(dt);
    if (k == 0) {
        /* BLAS rejects lda = 0; the product is empty, so c = beta c. */
        for (int64_t i = 0; i < m; i++) {
            char *row = (char *)c + (size_t)(i * ldc) * es;
            if (beta == 0) memset(row, 0, (size_t)n * es);
            else if (dt == ML_F32) for (int64_t j = 0; j < n; j++) ((float *)row)[j] *= (float)beta;
            else for (int64_t j = 0; j < n; j++) ((double *)row)[j] *= beta;
        }
        return 0;
    }
    enum CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
    if (dt == ML_F32)
        cblas_sgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, (float)alpha, a, (int)lda, b, (int)ldb,
                    (float)beta, c, (int)ldc);
    else if (dt == ML_F64)
        cblas_dgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb,
                    beta, c, (int)ldc);
    else
        return ml_error("gemm: the CPU computes in float32 or float64, not %s", ml_dtype_name(dt));
    return 0;
}

void ml_fill_rows_cpu(ml_dtype dt, void *c, const void *v, int64_t m, int64_t n) {
    size_t row = (size_t)n * ml_dtype_size(dt);
    for (int64_t i = 0; i < m; i++) memcpy((char *)c + (size_t)i * row, v, row);
}

int ml_colsum_cpu(ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate) {
    double *acc = calloc((size_t)(n ? n : 1), sizeof *acc);
    if (!acc) return ml_error("out of CPU memory (column sums of %lld values)", (long long)n);
    if (dt == ML_F32) {
        const float *p = a;
        for (int64_t i = 0; i < m; i++, p += n) for (int64_t j = 0; j < n; j++) acc[j] += p[j];
        float *o = s;
        for (int64_t j = 0; j < n; j++) o[j] = (float)(accumulate ? o[j] + acc[j] : acc[j]);
    } else {
        const double *p = a;
        for (int64_t i = 0; i < m; i++, p += n) for (int64_t j = 0; j < n; j++) acc[j] += p[j];
        double *o = s;
        for (int64_t j = 0; j < n; j++) o[j] = accumulate ? o[j] + acc[j] : acc[j];
    }
    free(acc);
    return 0;
}

/* c[p] = op(a[p]) op(b[p]) for p < nb, element strides sa/sb/sc between
 * batches.  Stride 0 on a or b: one operand shared by every batch; stride 0
 * on c: the nb products are summed into one c. */
static int bgemm(ml_dtype dt, int64_t nb, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                 const void *a, int64_t sa, const void *b, int64_t sb, void *c, int64_t sc) {
    int64_t lda = ta ? M : K, ldb = tb ? K : N;
    size_t es = ml_dtype_size(dt);
    if (nb == 0) {
        if (sc == 0) memset(c, 0, (size_t)(M * N) * es);
        return 0;
    }
    /* Shared b, batched a stored [nb, M, K]: the batches are just more rows. */
    if (nb > 1 && sb == 0 && sc == M * N && !ta && sa == M * K)
        return ml_gemm_cpu(dt, false, tb, nb * M, N, K, 1, a, lda, b, ldb, 0, c, N);
    /* Summed over the batch with a^T: the batches are just more of K
     * (the weight gradient of a shared operand: one GEMM over [nb*K, ...]). */
    if (nb > 1 && sc == 0 && ta && !tb && sa == K * M && sb == K * N)
        return ml_gemm_cpu(dt, true, false, M, N, nb * K, 1, a, lda, b, ldb, 0, c, N);
    for (int64_t p = 0; p < nb; p++) {
        double beta = (sc == 0 && p > 0) ? 1 : 0;
        if (ml_gemm_cpu(dt, ta, tb, M, N, K, 1, (const char *)a + (size_t)(p * sa) * es, lda,
                        (const char *)b + (size_t)(p * sb) * es, ldb, beta,
                        (char *)c + (size_t)(p * sc) * es, N) < 0)
            return -1;
    }
    return 0;
}

int ml_matmul_forward_cpu(ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b,
                          bool trans_a, bool trans_b) {
    int64_t B = out->shape[0], M = out->shape[1], N = out->shape[2];
    int64_t K = trans_a ? a->shape[1] : a->shape[2];
    return bgemm(out->dtype, B, trans_a, trans_b, M, N, K,
                 a->data, a->shape[0] == 1 ? 0 : M * K,
                 b->data, b->shape[0] == 1 ? 0 : K * N,
                 out->data, M * N);
}

/* With C = op(A) op(B):
 *   d op(A) = dC op(B)^T,  so dA = dC op(B)^T, or op(B) dC^T when A is stored transposed;
 *   d op(B) = op(A)^T dC,  so dB = op(A)^T dC, or dC^T op(A) when B is stored transposed. */
int ml_matmul_backward_cpu(ml_ktensor *da, ml_ktensor *db, const ml_ktensor *dout,
                           const ml_ktensor *a, const ml_ktensor *b, bool trans_a, bool trans_b) {
    ml_dtype dt = dout->dtype;
    int64_t B = dout->shape[0], M = dout->shape[1], N = dout->shape[2];
    int64_t K = trans_a ? a->shape[1] : a->shape[2];
    int64_t sa = a->shape[0] == 1 ? 0 : M * K, sb = b->shape[0] == 1 ? 0 : K * N, sc = M * N;
    if (da) {
        int rc = trans_a
            ? bgemm(dt, B, trans_b, true, K, M, N, b->data, sb, dout->data, sc, da->data, sa)
            : bgemm(dt, B, false, !trans_b, M, K, N, dout->data, sc, b->data, sb, da->data, sa);
        if (rc < 0) return -1;
    }
    if (db) {
        int rc = trans_b
            ? bgemm(dt, B, true, trans_a, N, K, M, dout->data, sc, a->data, sa, db->data, sb)
            : bgemm(dt, B, !trans_a, false, K, N, M, a->data, sa, dout->data, sc, db->data, sb);
        if (rc < 0) return -1;
    }
    return 0;
}

int ml_linear_forward_cpu(ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b) {
    int64_t M = out->shape[0], O = out->shape[1], K = x->shape[1];
    if (b) ml_fill_rows_cpu(out->dtype, out->data, b->data, M, O);
    return ml_gemm_cpu(out->dtype, false, true, M, O, K, 1, x->data, K, w->data, K,
                       b ? 1 : 0, out->data, O);
}

int ml_linear_backward_cpu(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                           const ml_ktensor *x, const ml_ktensor *w) {
    ml_dtype dt = dout->dtype;
    int64_t M = dout->shape[0], O = dout->shape[1], K = x->shape[1];
    const ml_ktensor *gs[3] = {dx, dw, db};
    for (int i = 0; i < 3; i++)
        if (gs[i] && gs[i]->dtype != dt)
            return ml_error("linear backward: the CPU writes gradients in the output gradient's dtype %s, not %s",
                            ml_dtype_short(dt), ml_dtype_short(gs[i]->dtype));
    if (dx && ml_gemm_cpu(dt, false, false, M, K, O, 1, dout->data, O, w->data, K, 0, dx->data, K) < 0)
        return -1;
    if (dw && ml_gemm_cpu(dt, true, false, O, K, M, 1, dout->data, O, x->data, K, 0, dw->data, K) < 0)
        return -1;
    return db ? ml_colsum_cpu(dt, db->data, dout->data, M, O, false) : 0;
}
