/* test_ops_reduce.c — reductions and losses: values against hand-computed
 * results (all dims, some dims, keepdim, strided and broadcast inputs,
 * integer inputs, NaN and ties), accuracy of long f32 sums, gradient checks
 * and a throughput figure. */
#include "check.h"
#include "tensor_check.h"
#include "gradcheck.h"
#include "ops.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static ml_generator gen = {99, 0};

static ml_tensor *T(ml_dtype dt, int ndim, const int64_t *shape, const double *v) {
    return ml_from_doubles(v, ndim, shape, dt);
}

static ml_tensor *randt(int ndim, const int64_t *shape) {
    return ml_randn(ndim, shape, ML_F64, ml_cpu(), &gen);
}


static bool has_shape(const ml_tensor *t, int nd, const int64_t *s) {
    if (!t || t->ndim != nd) return false;
    for (int i = 0; i < nd; i++) if (t->shape[i] != s[i]) return false;
    return true;
}

/* x[i,j,k] = 100 i + 10 j + k over [2,3,4] */
static ml_tensor *grid234(ml_dtype dt) {
    double v[24];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 3; j++) for (int k = 0; k < 4; k++)
        v[i * 12 + j * 4 + k] = 100 * i + 10 * j + k;
    return T(dt, 3, (int64_t[]){2, 3, 4}, v);
}

static void test_sum_mean(void) {
    ml_tensor *x = grid234(ML_F32), *r;
    r = ml_sum(x, 0, NULL, false);
    CHECK(r && r->ndim == 0, "sum all is 0-dim");
    expect("sum all", r, (double[]){1200 + 240 + 36}, 1, 0); ml_release(r);
    r = ml_sum(x, 1, (int[]){2}, false);
    CHECK(has_shape(r, 2, (int64_t[]){2, 3}), "sum last dim shape");
    expect("sum last dim", r, (double[]){6, 46, 86, 406, 446, 486}, 6, 0); ml_release(r);
    r = ml_sum(x, 1, (int[]){0}, true);
    CHECK(has_shape(r, 3, (int64_t[]){1, 3, 4}), "sum dim0 keepdim shape");
    expect("sum dim 0", r, (double[]){100, 102, 104, 106, 120, 122, 124, 126, 140, 142, 144, 146}, 12, 0); ml_release(r);
    r = ml_sum(x, 1, (int[]){-2}, false);
    expect("sum middle dim (negative index)", r, (double[]){30, 33, 36, 39, 330, 333, 336, 339}, 8, 0); ml_release(r);
    r = ml_sum(x, 2, (int[]){0, 2}, false);
    expect("sum dims 0,2", r, (double[]){412, 492, 572}, 3, 0); ml_release(r);
    r = ml_sum(x, 2, (int[]){0, 0}, false);
    CHECK(!r && strstr(ml_last_error(), "more than once"), "duplicate dim rejected: %s", ml_last_error());
    r = ml_sum(x, 1, (int[]){3}, false);
    CHECK(!r && strstr(ml_last_error(), "out of range"), "bad dim rejected: %s", ml_last_error());
    r = ml_mean(x, 1, (int[]){2}, false);
    expect("mean last dim", r, (double[]){1.5, 11.5, 21.5, 101.5, 111.5, 121.5}, 6, 0); ml_release(r);
    r = ml_mean(x, 0, NULL, true);
    CHECK(has_shape(r, 3, (int64_t[]){1, 1, 1}), "mean all keepdim shape");
    expect("mean all", r, (double[]){1476.0 / 24}, 1, 1e-7); ml_release(r);

    /* transposed input: sum over what is now the last dim */
    ml_tensor *xt = ml_transpose(x, 1, 2);                   /* [2,4,3] */
    r = ml_sum(xt, 1, (int[]){2}, false);
    expect("sum transposed", r, (double[]){30, 33, 36, 39, 330, 333, 336, 339}, 8, 0); ml_release(r);
    ml_release(xt);
    /* expanded (stride 0) input */
    ml_tensor *row = T(ML_F64, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    ml_tensor *ex = ml_expand(row, 2, (int64_t[]){5, 3});
    r = ml_sum(ex, 1, (int[]){0}, false); expect("sum expanded", r, (double[]){5, 10, 15}, 3, 0); ml_release(r);
    ml_release(ex); ml_release(row);
    /* integers sum to int64; mean of integers is an error as in PyTorch */
    ml_tensor *xi = grid234(ML_I32);
    r = ml_sum(xi, 1, (int[]){1}, false);
    CHECK(r && r->dtype == ML_I64, "int sum is int64");
    expect("int sum", r, (double[]){30, 33, 36, 39, 330, 333, 336, 339}, 8, 0); ml_release(r);
    r = ml_mean(xi, 0, NULL, false);
    CHECK(!r && strstr(ml_last_error(), "float"), "mean of int rejected: %s", ml_last_error());
    ml_release(xi);
    ml_tensor *b = T(ML_BOOL, 1, (int64_t[]){4}, (double[]){1, 0, 1, 1});
    r = ml_sum(b, 0, NULL, false); expect("bool sum counts", r, (double[]){3}, 1, 0); ml_release(r);
    ml_release(b);
    /* f16 on the CPU goes through f32 */
    ml_tensor *h = T(ML_F16, 1, (int64_t[]){3}, (double[]){0.5, 1.5, 2});
    r = ml_sum(h, 0, NULL, false);
    CHECK(r && r->dtype == ML_F16, "f16 sum keeps f16");
    expect("f16 sum", r, (double[]){4}, 1, 0); ml_release(r);
    ml_release(h);
    /* empty */
    ml_tensor *e = ml_zeros(2, (int64_t[]){0, 3}, ML_F32, ml_cpu());
    r = ml_sum(e, 1, (int[]){0}, false); expect("sum of empty", r, (double[]){0, 0, 0}, 3, 0); ml_release(r);
    r = ml_mean(e, 0, NULL, false); expect("mean of empty is NaN", r, (double[]){NAN}, 1, 0); ml_release(r);
    ml_release(e);
    ml_release(x);
}

static void test_accuracy(void) {
    /* 1e6 copies of 0.1f: a naive f32 running sum drifts by ~1%. */
    int64_t n = 1000000;
    ml_tensor *x = ml_full(1, &n, 0.1, ML_F32, ml_cpu());
    ml_tensor *r = ml_sum(x, 0, NULL, false);
    double want = (double)n * (double)0.1f;
    double got = 0;
    ml_item(r, &got);
    CHECK(fabs(got - want) <= 1e-7 * want, "long f32 sum: %.9g vs %.9g", got, want);
    ml_release(r);
    /* var of values with a large mean (catastrophic cancellation in a one-pass formula) */
    double v[4] = {1e4 + 1, 1e4 + 2, 1e4 + 3, 1e4 + 4};
    ml_tensor *y = T(ML_F32, 1, (int64_t[]){4}, v);
    r = ml_var(y, 0, NULL, 1, false); expect("var with large mean", r, (double[]){5.0 / 3}, 1, 1e-6); ml_release(r);
    ml_release(y);
    ml_release(x);
}

static void test_var_norm(void) {
    ml_tensor *x = T(ML_F64, 2, (int64_t[]){2, 4}, (double[]){1, 2, 3, 4, 2, 2, 2, 10}), *r;
    r = ml_var(x, 1, (int[]){1}, 1, false); expect("var unbiased", r, (double[]){5.0 / 3, 16}, 2, 1e-12); ml_release(r);
    r = ml_var(x, 1, (int[]){1}, 0, true);
    CHECK(has_shape(r, 2, (int64_t[]){2, 1}), "var keepdim shape");
    expect("var biased", r, (double[]){1.25, 12}, 2, 1e-12); ml_release(r);
    r = ml_var(x, 1, (int[]){0}, 1, false); expect("var dim 0", r, (double[]){0.5, 0, 0.5, 18}, 4, 1e-12); ml_release(r);
    r = ml_var(x, 0, NULL, 1, false); expect("var all", r, (double[]){57.5 / 7}, 1, 1e-12); ml_release(r);
    r = ml_norm(x, 2, 1, (int[]){1}, false); expect("norm p=2", r, (double[]){sqrt(30), sqrt(112)}, 2, 1e-12); ml_release(r);
    r = ml_norm(x, 1, 0, NULL, false); expect("norm p=1 all", r, (double[]){26}, 1, 1e-12); ml_release(r);
    r = ml_norm(x, 3, 1, (int[]){0}, true);
    CHECK(has_shape(r, 2, (int64_t[]){1, 4}), "norm keepdim shape");
    expect("norm p=3", r, (double[]){cbrt(9), cbrt(16), cbrt(35), cbrt(1064)}, 4, 1e-12); ml_release(r);
    r = ml_norm(x, INFINITY, 0, NULL, false); CHECK(!r, "norm p=inf rejected");
    ml_release(x);
}

static void test_max(void) {
    ml_tensor *x = T(ML_F32, 2, (int64_t[]){2, 4}, (double[]){3, 7, 7, 1, -2, -5, -1, -9}), *r;
    r = ml_max(x, 1, false); expect("max dim 1", r, (double[]){7, -1}, 2, 0); ml_release(r);
    r = ml_argmax(x, 1, false);
    CHECK(r && r->dtype == ML_I64, "argmax is int64");
    expect("argmax first of ties", r, (double[]){1, 2}, 2, 0); ml_release(r);
    r = ml_max(x, 0, true);
    CHECK(has_shape(r, 2, (int64_t[]){1, 4}), "max keepdim shape");
    expect("max dim 0", r, (double[]){3, 7, 7, 1}, 4, 0); ml_release(r);
    r = ml_argmax(x, -2, false); expect("argmax dim 0", r, (double[]){0, 0, 0, 0}, 4, 0); ml_release(r);
    r = ml_max(x, ML_ALL_DIMS, false);
    CHECK(r && r->ndim == 0, "max over all is 0-dim");
    expect("max all", r, (double[]){7}, 1, 0); ml_release(r);
    r = ml_argmax(x, ML_ALL_DIMS, false); expect("argmax all (flat)", r, (double[]){1}, 1, 0); ml_release(r);
    ml_tensor *xt = ml_transpose(x, 0, 1);
    r = ml_argmax(xt, 1, false); expect("argmax transposed", r, (double[]){0, 0, 0, 0}, 4, 0); ml_release(r);
    ml_release(xt);
    ml_tensor *nanx = T(ML_F64, 1, (int64_t[]){4}, (double[]){1, NAN, 5, NAN});
    r = ml_max(nanx, 0, false); expect("max propagates NaN", r, (double[]){NAN}, 1, 0); ml_release(r);
    r = ml_argmax(nanx, 0, false); expect("argmax picks the first NaN", r, (double[]){1}, 1, 0); ml_release(r);
    ml_release(nanx);
    ml_tensor *ids = T(ML_I64, 2, (int64_t[]){2, 3}, (double[]){5, 49407, 2, 7, 1, 49407});
    r = ml_argmax(ids, -1, false); expect("argmax int (eos position)", r, (double[]){1, 2}, 2, 0); ml_release(r);
    ml_release(ids);
    ml_tensor *e = ml_zeros(2, (int64_t[]){2, 0}, ML_F32, ml_cpu());
    r = ml_max(e, 1, false); CHECK(!r && strstr(ml_last_error(), "size 0"), "max over empty dim: %s", ml_last_error());
    ml_release(e);
    ml_release(x);
}

static void test_mse(void) {
    ml_tensor *a = T(ML_F32, 2, (int64_t[]){2, 2}, (double[]){1, 2, 3, 4});
    ml_tensor *b = T(ML_F32, 2, (int64_t[]){2, 2}, (double[]){0, 2, 5, 1}), *r;
    r = ml_mse_loss(a, b, ML_REDUCE_NONE); expect("mse none", r, (double[]){1, 0, 4, 9}, 4, 0); ml_release(r);
    r = ml_mse_loss(a, b, ML_REDUCE_MEAN); CHECK(r && r->ndim == 0, "mse mean is 0-dim");
    expect("mse mean", r, (double[]){3.5}, 1, 0); ml_release(r);
    r = ml_mse_loss(a, b, ML_REDUCE_SUM); expect("mse sum", r, (double[]){14}, 1, 0); ml_release(r);
    ml_tensor *c = T(ML_F32, 1, (int64_t[]){2}, (double[]){1, 2});
    r = ml_mse_loss(a, c, ML_REDUCE_MEAN);
    CHECK(!r && strstr(ml_last_error(), "[2, 2]") && strstr(ml_last_error(), "[2]"), "mse shape mismatch: %s", ml_last_error());
    ml_release(a); ml_release(b); ml_release(c);
}

/* ---- gradient checks ---------------------------------------------------- */

typedef struct { int kind; int nd; int dims[3]; bool keepdim; double p; bool transpose; } rctx;

static ml_tensor *f_reduce(ml_tensor **x, void *c) {
    rctx *r = c;
    ml_tensor *in = r->transpose ? ml_transpose(x[0], 0, 1) : ml_retain(x[0]), *y = NULL;
    switch (r->kind) {
    case 0: y = ml_sum(in, r->nd, r->dims, r->keepdim); break;
    case 1: y = ml_mean(in, r->nd, r->dims, r->keepdim); break;
    case 2: y = ml_var(in, r->nd, r->dims, (int)r->p, r->keepdim); break;
    case 3: y = ml_norm(in, r->p, r->nd, r->dims, r->keepdim); break;
    case 4: y = ml_max(in, r->nd ? r->dims[0] : ML_ALL_DIMS, r->keepdim); break;
    case 5: y = ml_mse_loss(in, x[1], (ml_reduction)(int)r->p); break;
    }
    ml_release(in);
    return y;
}

static void test_gradchecks(void) {
    static const char *kinds[] = {"sum", "mean", "var", "norm", "max", "mse_loss"};
    struct { rctx c; } cases[] = {
        {{0, 0, {0}, false, 0, false}}, {{0, 1, {1}, false, 0, false}}, {{0, 1, {0}, true, 0, true}},
        {{0, 2, {0, 2}, false, 0, false}},
        {{1, 0, {0}, false, 0, false}}, {{1, 1, {-1}, true, 0, false}}, {{1, 1, {1}, false, 0, true}},
        {{2, 1, {1}, false, 1, false}}, {{2, 1, {0}, true, 0, false}}, {{2, 0, {0}, false, 1, true}},
        {{3, 0, {0}, false, 2, false}}, {{3, 1, {1}, true, 2, true}}, {{3, 1, {2}, false, 1, false}},
        {{3, 1, {0}, false, 3, false}},
        {{4, 1, {1}, false, 0, false}}, {{4, 1, {0}, true, 0, true}}, {{4, 0, {0}, false, 0, false}},
        {{5, 0, {0}, false, ML_REDUCE_MEAN, false}}, {{5, 0, {0}, false, ML_REDUCE_SUM, true}},
        {{5, 0, {0}, false, ML_REDUCE_NONE, false}},
    };
    int64_t s[3] = {3, 4, 2};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        rctx *c = &cases[k].c;
        ml_tensor *x[2] = {randt(3, s), NULL};
        if (c->kind == 5) {
            /* mse: compare [3,4] (maybe transposed [4,3]) with a target */
            ml_release(x[0]);
            x[0] = randt(2, c->transpose ? (int64_t[]){4, 3} : (int64_t[]){3, 4});
            x[1] = randt(2, (int64_t[]){3, 4});
        }
        char name[96];
        snprintf(name, sizeof name, "grad %s #%zu%s", kinds[c->kind], k, c->transpose ? " transposed" : "");
        gradcheck(name, f_reduce, c->kind == 5 ? 2 : 1, x, c->kind == 5 ? 3 : 1, c);
        ml_release(x[0]); ml_release(x[1]);
    }
    /* max: the gradient goes to the first maximal element only */
    ml_tensor *x = T(ML_F64, 1, (int64_t[]){4}, (double[]){1, 5, 5, 2});
    x->requires_grad = true;
    ml_tensor *m = ml_max(x, 0, false);
    CHECK(ml_backward(m, NULL, false) == 0, "max backward");
    expect("max grad to first argmax", x->grad, (double[]){0, 1, 0, 0}, 4, 0);
    ml_release(m);
    /* norm of zeros: gradient 0, not NaN */
    ml_tensor *z = ml_zeros(1, (int64_t[]){3}, ML_F64, ml_cpu());
    z->requires_grad = true;
    ml_tensor *nz = ml_norm(z, 2, 0, NULL, false);
    CHECK(ml_backward(nz, NULL, false) == 0, "norm of zeros backward");
    expect("norm of zeros grad", z->grad, (double[]){0, 0, 0}, 3, 0);
    ml_release(nz); ml_release(z); ml_release(x);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bench(void) {
    int64_t s[2] = {10000, 1000};
    ml_tensor *x = ml_full(2, s, 1.0, ML_F32, ml_cpu());
    double best[3] = {1e9, 1e9, 1e9};
    for (int r = 0; r < 3; r++) {
        for (int k = 0; k < 3; k++) {
            double t0 = now();
            ml_tensor *y = k == 0 ? ml_sum(x, 0, NULL, false) : ml_sum(x, 1, (int[]){k == 1 ? 1 : 0}, false);
            double t = now() - t0;
            ml_release(y);
            if (t < best[k]) best[k] = t;
        }
    }
    printf("bench: sum of 1e7 f32: all %.2f ms (%.1f GB/s), last dim %.2f ms (%.1f GB/s), leading dim %.2f ms (%.1f GB/s)\n",
           best[0] * 1e3, 4e7 / best[0] / 1e9, best[1] * 1e3, 4e7 / best[1] / 1e9, best[2] * 1e3, 4e7 / best[2] / 1e9);
    ml_release(x);
}

int main(void) {
    test_sum_mean();
    test_accuracy();
    test_var_norm();
    test_max();
    test_mse();
    test_gradchecks();
    bench();
    return check_summary();
}
