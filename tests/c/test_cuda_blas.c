/* test_cuda_blas.c — the GEMM and column-sum services under the CUDA
 * matmul, linear and conv2d twins (kernels/cuda/gemm.h), against a
 * float64 CPU reference: every transpose combination with alpha and beta,
 * strided batches with a shared operand, the bias epilogue (and the fill +
 * beta = 1 path where cuBLASLt has none), empty products, unaligned
 * pointers, f64, f16 and bf16; column sums with and without accumulation;
 * linear in bf16 over f32 parameters (autocast), whose weight and bias
 * gradients come out of the GEMM and column sum in f32, unrounded.
 * Without CUDA or a GPU only the error paths run. */
#include "check.h"
#include "tensor.h"
#include "device.h"
#include "matmul.h"
#include "ops.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef ML_WITH_CUDA
#include "cuda/runtime.h"
#include "cuda/gemm.h"
#include "cuda/blas.h"
#include "cuda/cudnn_handle.h"

static const ml_device GPU0 = {ML_CUDA, 0};

/* n values in [-1, 1) from a small LCG, rounded to dt (so the GPU and the
 * float64 reference see the same numbers).  NaN everywhere when nan. */
static double *values(int64_t n, unsigned seed, ml_dtype dt, bool nan) {
    double *v = calloc((size_t)(n ? n : 1), sizeof *v);
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        v[i] = nan ? NAN : (double)(seed >> 8) / (double)(1u << 24) * 2 - 1;
    }
    if (n == 0 || nan) return v;
    ml_tensor *t = ml_from_doubles(v, 1, &n, dt);
    double *r = ml_to_doubles(t);
    ml_release(t);
    free(v);
    return r;
}

/* A GPU buffer of dt holding v[0..n). */
static ml_tensor *upload(const double *v, int64_t n, ml_dtype dt) {
    int64_t len = n ? n : 1;
    ml_tensor *c = ml_from_doubles(v, 1, &len, dt);
    ml_tensor *g = ml_empty(1, &len, dt, GPU0);
    CHECK(c && g && ml_copy_(g, c) == 0, "upload: %s", ml_last_error());
    ml_release(c);
    return g;
}

static double *download(ml_tensor *g) {
    ml_tensor *c = ml_empty(g->ndim, g->shape, ML_F64, ml_cpu());
    CHECK(c && ml_copy_(c, g) == 0, "download: %s", ml_last_error());
    double *v = ml_to_doubles(c);
    ml_release(c);
    return v;
}

typedef struct {
    const char *name;
    ml_dtype dt;
    bool ta, tb;
    int64_t m, n, k, batch;
    double alpha, beta;
    bool share_a, share_b, bias;
    int offset;   /* elements every operand starts past an aligned buffer */
} gemm_case;

static double tol_of(ml_dtype dt) {
    return dt == ML_F64 ? 1e-12 : dt == ML_F32 ? 1e-5 : dt == ML_BF16 ? 1.6e-2 : 2e-3;
}

static void run_gemm(const gemm_case *g) {
    int64_t m = g->m, n = g->n, k = g->k, B = g->batch, off = g->offset;
    int64_t lda = g->ta ? m : k, ldb = g->tb ? k : n;
    int64_t sa = g->share_a ? 0 : m * k, sb = g->share_b ? 0 : k * n, sc = m * n;
    int64_t na = (g->share_a ? 1 : B) * m * k, nb = (g->share_b ? 1 : B) * k * n, nc = B * m * n;
    double *a = values(na + off, 1, g->dt, false), *b = values(nb + off, 2, g->dt, false);
    double *c = values(nc + off, 3, g->dt, g->beta == 0), *bias = values(n + off, 4, g->dt, false);
    ml_tensor *ga = upload(a, na + off, g->dt), *gb = upload(b, nb + off, g->dt);
    ml_tensor *gc = upload(c, nc + off, g->dt), *gbias = upload(bias, n + off, g->dt);
    size_t es = ml_dtype_size(g->dt);
    int rc = ml_cuda_gemm(0, g->dt, g->ta, g->tb, m, n, k, g->alpha, (char *)ml_data(ga) + off * es, lda, sa,
                          (char *)ml_data(gb) + off * es, ldb, sb, g->beta, (char *)ml_data(gc) + off * es, n, sc, B,
                          g->bias ? (char *)ml_data(gbias) + off * es : NULL);
    CHECK(rc == 0, "%s: %s", g->name, ml_last_error());
    double *got = download(gc);

    /* Reference in float64: beta 0 never reads c (it holds NaN). */
    double *ref = calloc((size_t)(nc ? nc : 1), sizeof *ref);
    for (int64_t p = 0; p < B; p++) {
        double *r = ref + p * sc;
        if (g->beta != 0) memcpy(r, c + off + p * sc, (size_t)sc * sizeof *r);
        ml_gemm_cpu(ML_F64, g->ta, g->tb, m, n, k, g->alpha, a + off + p * sa, lda, b + off + p * sb, ldb,
                    g->beta != 0 ? g->beta : 0, r, n);
        for (int64_t i = 0; g->bias && i < m; i++)
            for (int64_t j = 0; j < n; j++) r[i * n + j] += bias[off + j];
    }
    double worst = 0, tol = tol_of(g->dt);
    for (int64_t i = 0; i < nc; i++) {
        double e = fabs(got[off + i] - ref[i]) / (fabs(ref[i]) + 1);
        if (!(e <= worst)) worst = e;   /* NaN counts as worst */
    }
    CHECK(worst <= tol, "%s: max relative error %.3g (tol %.3g)", g->name, worst, tol);
    free(a); free(b); free(c); free(bias); free(got); free(ref);
    ml_release(ga); ml_release(gb); ml_release(gc); ml_release(gbias);
}

static void test_gemm(void) {
    static const gemm_case cases[] = {
        {"f32 NN", ML_F32, false, false, 33, 17, 29, 1, 0.5, 0, false, false, false, 0},
        {"f32 TN", ML_F32, true, false, 33, 17, 29, 1, 0.5, 0, false, false, false, 0},
        {"f32 NT", ML_F32, false, true, 33, 17, 29, 1, 0.5, 0, false, false, false, 0},
        {"f32 TT", ML_F32, true, true, 33, 17, 29, 1, 0.5, 0, false, false, false, 0},
        {"f32 beta 1 accumulates", ML_F32, false, true, 20, 30, 40, 1, 1, 1, false, false, false, 0},
        {"f32 beta 0.25, alpha -2", ML_F32, true, false, 20, 30, 40, 1, -2, 0.25, false, false, false, 0},
        {"f32 batched", ML_F32, false, false, 12, 9, 14, 5, 1, 0, false, false, false, 0},
        {"f32 batched, shared a", ML_F32, true, false, 12, 9, 14, 5, 1, 0, true, false, false, 0},
        {"f32 batched, shared b", ML_F32, false, true, 12, 9, 14, 5, 1, 0, false, true, false, 0},
        {"f32 bias", ML_F32, false, true, 40, 24, 16, 1, 1, 0, false, false, true, 0},
        {"f32 bias, batched", ML_F32, false, true, 10, 24, 16, 3, 1, 0, false, true, true, 0},
        {"f32 unaligned, batched", ML_F32, false, false, 13, 11, 7, 3, 1, 0, false, false, false, 1},
        {"f32 unaligned bias", ML_F32, false, true, 13, 11, 7, 1, 1, 0, false, false, true, 1},
        {"f32 empty product k = 0", ML_F32, false, false, 6, 5, 0, 2, 1, 0, false, false, false, 0},
        {"f32 k = 0, beta 0.5", ML_F32, false, false, 6, 5, 0, 1, 1, 0.5, false, false, false, 0},
        {"f32 k = 0 with bias", ML_F32, false, true, 6, 5, 0, 1, 1, 0, false, false, true, 0},
        {"f32 m = 1 row", ML_F32, false, true, 1, 300, 64, 1, 1, 0, false, false, true, 0},
        {"f64 TN batched", ML_F64, true, false, 21, 13, 17, 3, 1, 0, false, false, false, 0},
        {"f64 bias", ML_F64, false, true, 21, 13, 17, 1, 1, 0, false, false, true, 0},
        {"bf16 NT bias", ML_BF16, false, true, 64, 48, 80, 1, 1, 0, false, false, true, 0},
        {"bf16 TT batched shared b", ML_BF16, true, true, 24, 40, 32, 4, 1, 0, false, true, false, 0},
        {"bf16 odd sizes, unaligned", ML_BF16, false, false, 7, 5, 3, 2, 1, 0, false, false, true, 1},
        {"f16 NN bias", ML_F16, false, false, 33, 40, 48, 1, 1, 0, false, false, true, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_gemm(&cases[i]);
}

static void run_colsum(const char *name, ml_dtype dt, int64_t m, int64_t n, bool accumulate) {
    double *a = values(m * n, 5, dt, false), *s0 = values(n, 6, dt, false);
    ml_tensor *ga = upload(a, m * n, dt), *gs = upload(s0, n, dt);
    CHECK(ml_cuda_colsum(0, dt, ml_data(gs), ml_data(ga), m, n, accumulate) == 0, "%s: %s", name, ml_last_error());
    double *got = download(gs), worst = 0;
    for (int64_t j = 0; j < n; j++) {
        double r = accumulate ? s0[j] : 0;
        for (int64_t i = 0; i < m; i++) r += a[i * n + j];
        double e = fabs(got[j] - r) / (fabs(r) + 1);
        if (!(e <= worst)) worst = e;
    }
    double tol = dt == ML_F32 ? 1e-7 : dt == ML_F64 ? 1e-14 : 8e-3;   /* one rounding of an exact sum */
    CHECK(worst <= tol, "%s: max relative error %.3g (tol %.3g)", name, worst, tol);
    free(a); free(s0); free(got);
    ml_release(ga); ml_release(gs);
}

static void test_colsum(void) {
    run_colsum("colsum f32 [5000, 70]", ML_F32, 5000, 70, false);
    run_colsum("colsum f32 accumulate", ML_F32, 300, 33, true);
    run_colsum("colsum f64 [1000, 3]", ML_F64, 1000, 3, false);
    run_colsum("colsum bf16 [4096, 40]", ML_BF16, 4096, 40, false);
    run_colsum("colsum of 0 rows is 0", ML_F32, 0, 10, false);
}

static void test_errors_gpu(void) {
    float x = 0;
    CHECK(ml_cuda_gemm(0, ML_F32, false, false, -1, 2, 2, 1, &x, 2, 0, &x, 2, 0, 0, &x, 2, 0, 1, NULL) < 0 &&
          strstr(ml_last_error(), "negative size") != NULL, "negative size: %s", ml_last_error());
    CHECK(ml_cublas_handle(0) != NULL && ml_cublaslt_handle(0) != NULL, "cuBLAS handles: %s", ml_last_error());
    CHECK(ml_cudnn_handle(0) != NULL, "cuDNN handle: %s", ml_last_error());
    size_t nb = 0;
    CHECK(ml_cublas_workspace(0, &nb) != NULL && nb >= (1u << 20), "workspace: %s", ml_last_error());
    CHECK(ml_cublas_handle(ml_cuda_device_count()) == NULL && strstr(ml_last_error(), "does not exist"),
          "handle of a missing device: %s", ml_last_error());
}
#endif

/* Errors that need no GPU: a bad dtype, and handles without a device. */
static void test_errors(void) {
#ifdef ML_WITH_CUDA
    int x = 0;
    CHECK(ml_cuda_gemm(0, ML_I32, false, false, 1, 1, 1, 1, &x, 1, 0, &x, 1, 0, 0, &x, 1, 0, 1, NULL) < 0 &&
          strstr(ml_last_error(), "not supported") != NULL, "integer gemm: %s", ml_last_error());
    CHECK(ml_cuda_colsum(0, ML_U8, &x, &x, 1, 1, false) < 0 && strstr(ml_last_error(), "not supported") != NULL,
          "integer colsum: %s", ml_last_error());
    if (ml_cuda_device_count() == 0) {
        CHECK(ml_cublas_handle(0) == NULL && strstr(ml_last_error(), "cuda:0") != NULL, "cuBLAS without a GPU: %s",
              ml_last_error());
        CHECK(ml_cudnn_handle(0) == NULL && strstr(ml_last_error(), "cuda:0") != NULL, "cuDNN without a GPU: %s",
              ml_last_error());
    }
#else
    printf("moonlit built without CUDA: nothing to check\n");
    CHECK(1, "no CUDA");
#endif
}

/* bf16-mixed linear: f32 leaf weight and bias converted to bf16 (autocast)
 * and used once.  Their gradients must be the f32 accumulator's values
 * (ml_grad_dtype_hint): within 1e-5 of the float64 products of the same
 * bf16 values, where a gradient rounded to bf16 and widened would be off
 * by up to 2^-9 of its value. */
static void test_linear_grads_in_f32(void) {
    enum { M = 96, K = 48, O = 40 };
    int64_t xs[2] = {M, K}, ws[2] = {O, K}, gs[2] = {M, O}, bs = O;
    double *xv = values(M * K, 11, ML_BF16, false), *gv = values(M * O, 12, ML_BF16, false);
    double *wv = values(O * K, 13, ML_F32, false), *bv = values(O, 14, ML_F32, false);
    ml_tensor *x = upload(xv, M * K, ML_BF16), *g = upload(gv, M * O, ML_BF16);
    ml_tensor *w = upload(wv, O * K, ML_F32), *b = upload(bv, O, ML_F32);
    ml_tensor *x2 = ml_view(x, 2, xs), *g2 = ml_view(g, 2, gs), *w2 = ml_view(w, 2, ws), *b1 = ml_view(b, 1, &bs);
    w2->requires_grad = b1->requires_grad = true;
    ml_tensor *wc = ml_to_dtype(w2, ML_BF16), *bc = ml_to_dtype(b1, ML_BF16);
    ml_tensor *y = wc && bc ? ml_linear(x2, wc, bc) : NULL;
    CHECK(y && ml_backward(y, g2, false) == 0, "bf16 linear over f32 parameters: %s", ml_last_error());
    CHECK(w2->grad && w2->grad->dtype == ML_F32 && b1->grad && b1->grad->dtype == ML_F32,
          "bf16 linear: the f32 parameters' gradients are f32");
    if (w2->grad && b1->grad) {
        double *dw = download(w2->grad), *db = download(b1->grad), worst_w = 0, worst_b = 0;
        /* Errors relative to the sum of the terms' magnitudes (what f32
         * summation error scales with): ~1e-7 here; a bf16 rounding of the
         * result is ~1e-4 of it. */
        for (int o = 0; o < O; o++) {
            double sb = 0, ab = 0;
            for (int i = 0; i < M; i++) { sb += gv[i * O + o]; ab += fabs(gv[i * O + o]); }
            worst_b = fmax(worst_b, fabs(db[o] - sb) / ab);
            for (int k = 0; k < K; k++) {
                double s = 0, a = 0;
                for (int i = 0; i < M; i++) { s += gv[i * O + o] * xv[i * K + k]; a += fabs(gv[i * O + o] * xv[i * K + k]); }
                worst_w = fmax(worst_w, fabs(dw[o * K + k] - s) / a);
            }
        }
        CHECK(worst_w <= 1e-5, "bf16 linear: dweight unrounded (max relative error %.3g, tol 1e-5)", worst_w);
        CHECK(worst_b <= 1e-5, "bf16 linear: dbias unrounded (max relative error %.3g, tol 1e-5)", worst_b);
        free(dw); free(db);
    }
    free(xv); free(gv); free(wv); free(bv);
    ml_release(y); ml_release(wc); ml_release(bc);
    ml_release(x2); ml_release(g2); ml_release(w2); ml_release(b1);
    ml_release(x); ml_release(g); ml_release(w); ml_release(b);
}

int main(void) {
    test_errors();
#ifdef ML_WITH_CUDA
    if (ml_cuda_device_count() == 0) {
        printf("no CUDA device (%s): checked the errors only\n", ml_cuda_unavailable_reason());
        return check_summary();
    }
    test_errors_gpu();
    test_gemm();
    test_colsum();
    test_linear_grads_in_f32();
    CHECK(ml_cuda_synchronize(-1) == 0, "final synchronize: %s", ml_last_error());
#endif
    return check_summary();
}
