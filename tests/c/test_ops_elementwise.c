/* test_ops_elementwise.c — elementwise ops: values against hand-computed
 * results, dtype promotion, broadcasting, non-contiguous operands, in-place
 * ops, AdamW against PyTorch, gradient checks, and a bandwidth figure. */
#include "check.h"
#include "tensor_check.h"
#include "gradcheck.h"
#include "ops.h"
#include "ew_common.h"
#include "elementwise.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static ml_generator gen = {1234, 0};

static ml_tensor *T(ml_dtype dt, int ndim, const int64_t *shape, const double *v) {
    return ml_from_doubles(v, ndim, shape, dt);
}

static ml_tensor *randt(int ndim, const int64_t *shape) {
    return ml_randn(ndim, shape, ML_F64, ml_cpu(), &gen);
}


static void expect_dtype(const char *what, ml_tensor *t, ml_dtype dt) {
    CHECK(t && t->dtype == dt, "%s: dtype %s, want %s", what, t ? ml_dtype_name(t->dtype) : "NULL", ml_dtype_name(dt));
}

/* ---- forward values ----------------------------------------------------- */

static void test_binary_values(void) {
    int64_t s23[2] = {2, 3}, s3[1] = {3};
    double av[6] = {1, 2, 3, 4, 5, 6}, bv[3] = {2, -1, 0.5};
    ml_tensor *a = T(ML_F32, 2, s23, av), *b = T(ML_F32, 1, s3, bv);
    ml_tensor *r;
    r = ml_add(a, b); expect("add broadcast", r, (double[]){3, 1, 3.5, 6, 4, 6.5}, 6, 1e-7); ml_release(r);
    r = ml_sub(a, b); expect("sub broadcast", r, (double[]){-1, 3, 2.5, 2, 6, 5.5}, 6, 1e-7); ml_release(r);
    r = ml_mul(a, b); expect("mul broadcast", r, (double[]){2, -2, 1.5, 8, -5, 3}, 6, 1e-7); ml_release(r);
    r = ml_div(a, b); expect("div broadcast", r, (double[]){0.5, -2, 6, 2, -5, 12}, 6, 1e-7); ml_release(r);
    r = ml_pow(a, b); expect("pow broadcast", r, (double[]){1, 0.5, sqrt(3), 16, 0.2, sqrt(6)}, 6, 1e-6); ml_release(r);
    r = ml_binary(ML_MAXIMUM, a, b); expect("maximum", r, (double[]){2, 2, 3, 4, 5, 6}, 6, 0); ml_release(r);
    r = ml_binary(ML_MINIMUM, a, b); expect("minimum", r, (double[]){1, -1, 0.5, 2, -1, 0.5}, 6, 0); ml_release(r);
    r = ml_binary(ML_GT, a, b); expect_dtype("gt dtype", r, ML_BOOL);
    expect("gt", r, (double[]){0, 1, 1, 1, 1, 1}, 6, 0); ml_release(r);
    r = ml_binary(ML_EQ, a, b); expect("eq", r, (double[]){0, 0, 0, 0, 0, 0}, 6, 0); ml_release(r);
    r = ml_binary(ML_LE, b, a); expect("le", r, (double[]){0, 1, 1, 1, 1, 1}, 6, 0); ml_release(r);
    r = ml_binary(ML_NE, a, a); expect("ne self", r, (double[]){0, 0, 0, 0, 0, 0}, 6, 0); ml_release(r);
    r = ml_binary(ML_LT, a, b); expect("lt", r, (double[]){1, 0, 0, 0, 0, 0}, 6, 0); ml_release(r);
    r = ml_binary(ML_GE, a, b); expect("ge", r, (double[]){0, 1, 1, 1, 1, 1}, 6, 0); ml_release(r);

    /* [2,1] op [3] -> [2,3] (both operands broadcast) */
    int64_t s21[2] = {2, 1};
    ml_tensor *c = T(ML_F32, 2, s21, (double[]){10, 20});
    r = ml_add(c, b);
    CHECK(r && r->ndim == 2 && r->shape[0] == 2 && r->shape[1] == 3, "outer broadcast shape");
    expect("outer broadcast", r, (double[]){12, 9, 10.5, 22, 19, 20.5}, 6, 0); ml_release(r);

    /* transposed (non-contiguous) operand */
    ml_tensor *at = ml_transpose(a, 0, 1);                 /* [3,2]: 1 4 / 2 5 / 3 6 */
    ml_tensor *c2 = T(ML_F32, 1, (int64_t[]){2}, (double[]){100, 200});
    r = ml_add(at, c2); expect("transposed + row", r, (double[]){101, 204, 102, 205, 103, 206}, 6, 0); ml_release(r);
    r = ml_unary(ML_NEG, at); expect("neg transposed", r, (double[]){-1, -4, -2, -5, -3, -6}, 6, 0); ml_release(r);
    ml_release(at); ml_release(c2);

    /* NaN propagation of maximum/minimum */
    ml_tensor *n1 = T(ML_F64, 1, (int64_t[]){2}, (double[]){NAN, 1});
    ml_tensor *n2 = T(ML_F64, 1, (int64_t[]){2}, (double[]){0, NAN});
    r = ml_binary(ML_MAXIMUM, n1, n2); expect("maximum NaN", r, (double[]){NAN, NAN}, 2, 0); ml_release(r);
    r = ml_binary(ML_MINIMUM, n1, n2); expect("minimum NaN", r, (double[]){NAN, NAN}, 2, 0); ml_release(r);
    ml_release(n1); ml_release(n2);

    /* bad broadcast names both shapes */
    ml_tensor *bad = T(ML_F32, 1, (int64_t[]){2}, (double[]){1, 2});
    r = ml_add(a, bad);
    CHECK(!r && strstr(ml_last_error(), "add") && strstr(ml_last_error(), "[2, 3]") && strstr(ml_last_error(), "[2]"),
          "broadcast error message: %s", ml_last_error());
    ml_release(bad);
    ml_release(a); ml_release(b); ml_release(c);
}

static void test_promotion(void) {
    int64_t s2[1] = {2};
    ml_tensor *i32 = T(ML_I32, 1, s2, (double[]){7, -3});
    ml_tensor *i64 = T(ML_I64, 1, s2, (double[]){2, 2});
    ml_tensor *f32 = T(ML_F32, 1, s2, (double[]){0.5, 0.25});
    ml_tensor *f64 = T(ML_F64, 1, s2, (double[]){1, 1});
    ml_tensor *f16 = T(ML_F16, 1, s2, (double[]){1.5, 2});
    ml_tensor *bf16 = T(ML_BF16, 1, s2, (double[]){0.5, 4});
    ml_tensor *z64 = ml_scalar(2, ML_F64, ml_cpu());
    ml_tensor *bl = T(ML_BOOL, 1, s2, (double[]){1, 0});
    ml_tensor *r;
    r = ml_add(i32, f32); expect_dtype("i32+f32", r, ML_F32); expect("i32+f32 val", r, (double[]){7.5, -2.75}, 2, 0); ml_release(r);
    r = ml_add(i32, i64); expect_dtype("i32+i64", r, ML_I64); expect("i32+i64 val", r, (double[]){9, -1}, 2, 0); ml_release(r);
    r = ml_add(f32, f64); expect_dtype("f32+f64", r, ML_F64); ml_release(r);
    r = ml_mul(f32, z64); expect_dtype("f32 * 0-dim f64 keeps f32", r, ML_F32); expect("f32*0dim", r, (double[]){1, 0.5}, 2, 0); ml_release(r);
    r = ml_mul(i32, z64); expect_dtype("i32 * 0-dim f64 -> f64", r, ML_F64); ml_release(r);
    r = ml_add(f16, bf16); expect_dtype("f16+bf16", r, ML_F32); expect("f16+bf16 val", r, (double[]){2, 6}, 2, 0); ml_release(r);
    r = ml_mul(f16, f16); expect_dtype("f16*f16 (CPU via f32)", r, ML_F16); expect("f16*f16 val", r, (double[]){2.25, 4}, 2, 0); ml_release(r);
    r = ml_div(i32, i64); expect_dtype("int/int true division", r, ML_F32); expect("int/int val", r, (double[]){3.5, -1.5}, 2, 0); ml_release(r);
    r = ml_add(bl, bl); expect_dtype("bool+bool", r, ML_BOOL); expect("bool or", r, (double[]){1, 0}, 2, 0); ml_release(r);
    r = ml_mul(bl, f32); expect_dtype("bool*f32", r, ML_F32); expect("mask", r, (double[]){0.5, 0}, 2, 0); ml_release(r);
    r = ml_sub(bl, bl); CHECK(!r && strstr(ml_last_error(), "bool"), "bool - bool is an error: %s", ml_last_error());
    r = ml_pow(i32, i64); expect_dtype("int pow", r, ML_I64); expect("int pow val", r, (double[]){49, 9}, 2, 0); ml_release(r);
    /* integer wrap-around, not undefined behaviour */
    ml_tensor *big = T(ML_I32, 1, (int64_t[]){1}, (double[]){2147483647});
    ml_tensor *one = T(ML_I32, 1, (int64_t[]){1}, (double[]){1});
    r = ml_add(big, one); expect("i32 wraps", r, (double[]){-2147483648.0}, 1, 0); ml_release(r);
    ml_release(big); ml_release(one);
    /* scalars */
    r = ml_add_scalar(i32, 2); expect_dtype("i32 + 2", r, ML_I32); expect("i32+2", r, (double[]){9, -1}, 2, 0); ml_release(r);
    r = ml_add_scalar(i32, 0.5); expect_dtype("i32 + 0.5", r, ML_F32); expect("i32+0.5", r, (double[]){7.5, -2.5}, 2, 0); ml_release(r);
    r = ml_mul_scalar(f16, 3); expect_dtype("f16 * 3", r, ML_F16); expect("f16*3", r, (double[]){4.5, 6}, 2, 0); ml_release(r);
    r = ml_scalar_op(ML_GT, i32, 0, false); expect_dtype("i32 > 0", r, ML_BOOL); expect("i32>0", r, (double[]){1, 0}, 2, 0); ml_release(r);
    r = ml_unary(ML_EXP, i64); expect_dtype("exp(int) is f32", r, ML_F32); expect("exp(int)", r, (double[]){exp(2), exp(2)}, 2, 1e-6); ml_release(r);
    r = ml_unary(ML_ABS, i32); expect_dtype("abs(int) stays int", r, ML_I32); expect("abs int", r, (double[]){7, 3}, 2, 0); ml_release(r);
    r = ml_unary(ML_NEG, i64); expect("neg int", r, (double[]){-2, -2}, 2, 0); ml_release(r);
    ml_release(i32); ml_release(i64); ml_release(f32); ml_release(f64); ml_release(f16); ml_release(bf16);
    ml_release(z64); ml_release(bl);
}

static void test_scalar_and_where(void) {
    int64_t s4[1] = {4};
    ml_tensor *x = T(ML_F32, 1, s4, (double[]){1, 2, 4, -8});
    ml_tensor *r;
    r = ml_add_scalar(x, 1.5); expect("add_scalar", r, (double[]){2.5, 3.5, 5.5, -6.5}, 4, 0); ml_release(r);
    r = ml_mul_scalar(x, -2); expect("mul_scalar", r, (double[]){-2, -4, -8, 16}, 4, 0); ml_release(r);
    r = ml_pow_scalar(x, 2); expect("pow_scalar", r, (double[]){1, 4, 16, 64}, 4, 0); ml_release(r);
    r = ml_rsub_scalar(x, 10); expect("rsub_scalar", r, (double[]){9, 8, 6, 18}, 4, 0); ml_release(r);
    r = ml_rdiv_scalar(x, 8); expect("rdiv_scalar", r, (double[]){8, 4, 2, -1}, 4, 0); ml_release(r);

    int64_t s23[2] = {2, 3}, s3[1] = {3};
    ml_tensor *cond = T(ML_BOOL, 1, s3, (double[]){1, 0, 1});
    ml_tensor *a = T(ML_F32, 2, s23, (double[]){1, 2, 3, 4, 5, 6});
    ml_tensor *b = ml_scalar(-1, ML_F32, ml_cpu());
    r = ml_where(cond, a, b); expect("where broadcast", r, (double[]){1, -1, 3, 4, -1, 6}, 6, 0); ml_release(r);
    ml_tensor *bad = T(ML_F32, 1, s3, (double[]){1, 0, 1});
    r = ml_where(bad, a, b); CHECK(!r && strstr(ml_last_error(), "bool"), "where needs bool cond: %s", ml_last_error());
    ml_release(bad); ml_release(cond); ml_release(a); ml_release(b); ml_release(x);
}

static void test_unary_values(void) {
    enum { N = 7 };
    double xv[N] = {-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5};
    /* PyTorch float64 references */
    static const double gelu[N] = {-0.00404969409489, -0.158655253931, -0.154268769363, 0,
                                   0.345731230637, 0.841344746069, 2.48447583669};
    static const double gelu_tanh[N] = {-0.00363739208177, -0.158808009392, -0.154285990175, 0,
                                        0.345714009825, 0.841191990608, 2.48491573391};
    static const double silu[N] = {-0.142277619533, -0.26894142137, -0.188770334399, 0,
                                   0.311229665601, 0.73105857863, 2.31035454995};
    static const double quick[N] = {-0.0180713097078, -0.154204234067, -0.149611563394, 0,
                                    0.350388436606, 0.845795765933, 2.46501383495};
    int64_t sh[1] = {N};
    for (int dt = 0; dt < 2; dt++) {
        ml_dtype t = dt ? ML_F64 : ML_F32;
        double tol = dt ? 1e-11 : 1e-6;
        ml_tensor *x = T(t, 1, sh, xv), *r;
        double want[N];
        char what[64];
#define UN(op, expr) do { \
            for (int i = 0; i < N; i++) { double v = xv[i]; (void)v; want[i] = (expr); } \
            r = ml_unary(op, x); snprintf(what, sizeof what, "%s %s", #op, ml_dtype_short(t)); \
            expect(what, r, want, N, tol); ml_release(r); } while (0)
        UN(ML_NEG, -v);
        UN(ML_ABS, fabs(v));
        UN(ML_EXP, exp(v));
        UN(ML_SIN, sin(v));
        UN(ML_COS, cos(v));
        UN(ML_SIGMOID, 1 / (1 + exp(-v)));
        UN(ML_TANH, tanh(v));
        UN(ML_RELU, v > 0 ? v : 0);
        UN(ML_SQUARE, v * v);
        UN(ML_FLOOR, floor(v));
        UN(ML_SIGN, (double)((v > 0) - (v < 0)));
        UN(ML_GELU, gelu[i]);
        UN(ML_GELU_TANH, gelu_tanh[i]);
        UN(ML_SILU, silu[i]);
        UN(ML_QUICK_GELU, quick[i]);
#undef UN
        ml_release(x);
        double pv[4] = {0.25, 1, 4, 9};
        ml_tensor *p = T(t, 1, (int64_t[]){4}, pv);
        r = ml_unary(ML_SQRT, p); expect("sqrt", r, (double[]){0.5, 1, 2, 3}, 4, tol); ml_release(r);
        r = ml_unary(ML_RSQRT, p); expect("rsqrt", r, (double[]){2, 1, 0.5, 1.0 / 3}, 4, tol); ml_release(r);
        r = ml_unary(ML_LOG, p); expect("log", r, (double[]){log(0.25), 0, log(4), log(9)}, 4, tol); ml_release(r);
        ml_release(p);
        /* round: half to even, like torch.round */
        ml_tensor *h = T(t, 1, (int64_t[]){5}, (double[]){0.5, 1.5, 2.5, -0.5, -1.7});
        r = ml_unary(ML_ROUND, h); expect("round half-even", r, (double[]){0, 2, 2, -0.0, -2}, 5, 0); ml_release(r);
        ml_release(h);
    }
}

static void test_clamp(void) {
    ml_tensor *x = T(ML_F32, 1, (int64_t[]){5}, (double[]){-2, -0.5, 0.5, 3, NAN}), *r;
    r = ml_clamp(x, -1, 1); expect("clamp", r, (double[]){-1, -0.5, 0.5, 1, NAN}, 5, 0); ml_release(r);
    r = ml_clamp(x, 0, INFINITY); expect("clamp min only", r, (double[]){0, 0, 0.5, 3, NAN}, 5, 0); ml_release(r);
    r = ml_clamp(x, 2, 1); expect("clamp lo > hi gives hi", r, (double[]){1, 1, 1, 1, NAN}, 5, 0); ml_release(r);
    ml_tensor *xi = T(ML_I64, 1, (int64_t[]){3}, (double[]){-5, 2, 9});
    r = ml_clamp(xi, 0, 4); expect_dtype("clamp int dtype", r, ML_I64); expect("clamp int", r, (double[]){0, 2, 4}, 3, 0); ml_release(r);
    ml_release(xi); ml_release(x);
}

static void test_sum_to_shape(void) {
    int64_t s[3] = {2, 3, 4};
    ml_tensor *g = ml_full(3, s, 1.0, ML_F32, ml_cpu()), *r;
    r = ml_sum_to_shape(g, 1, (int64_t[]){4}); expect("sum_to_shape [4]", r, (double[]){6, 6, 6, 6}, 4, 0);
    CHECK(r && r->ndim == 1, "sum_to_shape ndim"); ml_release(r);
    r = ml_sum_to_shape(g, 3, (int64_t[]){2, 1, 1}); expect("sum_to_shape [2,1,1]", r, (double[]){12, 12}, 2, 0);
    CHECK(r && r->ndim == 3 && r->shape[0] == 2 && r->shape[2] == 1, "sum_to_shape keeps dims"); ml_release(r);
    r = ml_sum_to_shape(g, 2, (int64_t[]){3, 1}); expect("sum_to_shape [3,1]", r, (double[]){8, 8, 8}, 3, 0); ml_release(r);
    r = ml_sum_to_shape(g, 3, s); CHECK(r == g, "sum_to_shape same shape returns the tensor"); ml_release(r);
    r = ml_sum_to_shape(g, 1, (int64_t[]){5}); CHECK(!r, "sum_to_shape to an incompatible shape fails");
    ml_release(g);
}

/* ---- in-place ----------------------------------------------------------- */

static void test_inplace(void) {
    int64_t s23[2] = {2, 3};
    ml_tensor *d = T(ML_F32, 2, s23, (double[]){1, 2, 3, 4, 5, 6});
    ml_tensor *row = T(ML_F32, 1, (int64_t[]){3}, (double[]){10, 20, 30});
    int64_t v0 = d->storage->version;
    CHECK(ml_add_(d, row, 1.0) == 0, "add_ broadcast");
    expect("add_ broadcast values", d, (double[]){11, 22, 33, 14, 25, 36}, 6, 0);
    CHECK(d->storage->version == v0 + 1, "add_ bumps version");
    CHECK(ml_add_(d, row, -0.5) == 0, "add_ alpha");
    expect("add_ alpha values", d, (double[]){6, 12, 18, 9, 15, 21}, 6, 0);
    CHECK(ml_mul_scalar_(d, 2) == 0 && ml_add_scalar_(d, -1) == 0, "mul_scalar_/add_scalar_");
    expect("scalar in-place", d, (double[]){11, 23, 35, 17, 29, 41}, 6, 0);
    CHECK(ml_clamp_(d, 12, 30) == 0, "clamp_");
    expect("clamp_ values", d, (double[]){12, 23, 30, 17, 29, 30}, 6, 0);
    CHECK(ml_mul_(d, row) == 0, "mul_");
    expect("mul_ values", d, (double[]){120, 460, 900, 170, 580, 900}, 6, 0);
    int64_t v1 = d->storage->version;
    CHECK(ml_div_(d, row) == 0, "div_ by a broadcast tensor");
    expect("div_ values", d, (double[]){12, 23, 30, 17, 29, 30}, 6, 0);
    CHECK(d->storage->version == v1 + 1, "div_ bumps version (through the in-place gate)");

    /* non-contiguous destination: the transpose of a [3,2] buffer */
    ml_tensor *base = ml_zeros(2, (int64_t[]){3, 2}, ML_F32, ml_cpu());
    ml_tensor *tv = ml_transpose(base, 0, 1);               /* [2,3] view */
    ml_tensor *src = T(ML_F32, 2, s23, (double[]){1, 2, 3, 4, 5, 6});
    CHECK(ml_add_(tv, src, 1.0) == 0, "add_ into a transposed view");
    expect("transposed dst -> base", base, (double[]){1, 4, 2, 5, 3, 6}, 6, 0);
    ml_release(tv); ml_release(base); ml_release(src);

    /* half destination on the CPU */
    ml_tensor *h = T(ML_BF16, 1, (int64_t[]){2}, (double[]){1, 2});
    CHECK(ml_add_(h, row, 1.0) < 0, "add_ shape mismatch rejected");
    ml_tensor *h2 = T(ML_F32, 1, (int64_t[]){2}, (double[]){0.5, 0.5});
    CHECK(ml_add_(h, h2, 1.0) == 0 && h->dtype == ML_BF16, "add_ into bf16");
    expect("bf16 add_", h, (double[]){1.5, 2.5}, 2, 0);
    ml_release(h); ml_release(h2);

    /* int destination cannot take a float source */
    ml_tensor *di = T(ML_I32, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    CHECK(ml_add_(di, row, 1.0) < 0 && strstr(ml_last_error(), "int32"), "float into int rejected: %s", ml_last_error());
    CHECK(ml_mul_scalar_(di, 0.5) < 0, "int *= 0.5 rejected");
    /* div_ is true division: refused on an integer destination whatever
     * the divisor (1/0.5 = 2 was a whole factor and doubled it) */
    ml_tensor *ione = T(ML_I32, 1, (int64_t[]){3}, (double[]){1, 1, 1});
    CHECK(ml_div_scalar_(di, 0.5) < 0 && strstr(ml_last_error(), "div_") && strstr(ml_last_error(), "int32"),
          "int div_(0.5) rejected: %s", ml_last_error());
    CHECK(ml_div_scalar_(di, 1) < 0, "int div_(1) rejected");
    CHECK(ml_div_(di, ione) < 0 && strstr(ml_last_error(), "dtype int32"), "int div_(int tensor) rejected: %s",
          ml_last_error());
    expect("int destination unchanged", di, (double[]){1, 2, 3}, 3, 0);
    ml_release(ione);
    ml_release(di);

    /* leaf requiring grad */
    ml_tensor *leaf = T(ML_F32, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    leaf->requires_grad = true;
    CHECK(ml_add_(leaf, row, 1.0) < 0 && strstr(ml_last_error(), "leaf tensor that requires grad"),
          "in-place on a leaf requiring grad: %s", ml_last_error());
    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_add_(leaf, row, 1.0) == 0, "in-place on a leaf under no_grad");
    ml_set_grad_enabled(prev);
    ml_tensor *y = ml_mul_scalar(leaf, 2);
    CHECK(ml_mul_scalar_(y, 2) < 0 && strstr(ml_last_error(), "autograd graph"), "in-place on a graph tensor: %s", ml_last_error());
    ml_release(y); ml_release(leaf);
    ml_release(d); ml_release(row);
}

static void test_adamw(void) {
    /* torch.optim.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
     * foreach=False), float32, three steps with these gradients. */
    int64_t s5[1] = {5};
    ml_tensor *p = T(ML_F32, 1, s5, (double[]){0.5, -1.25, 2.0, 0.0, 3.5});
    ml_tensor *m = ml_zeros(1, s5, ML_F32, ml_cpu()), *v = ml_zeros(1, s5, ML_F32, ml_cpu());
    static const double grads[3][5] = {{0.1, -0.2, 0.3, 1e-3, -4.0},
                                       {0.05, 0.5, -0.25, 0.0, 2.0},
                                       {-0.3, 0.1, 0.2, -1e-4, 1.0}};
    p->requires_grad = true;   /* an optimizer step updates parameters whatever the grad mode */
    int rc = 0;
    for (int s = 0; s < 3; s++) {
        ml_tensor *g = T(ML_F32, 1, s5, grads[s]);
        rc |= ml_adamw_step_(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, s + 1, 0, 0);
        ml_release(g);
    }
    CHECK(rc == 0, "adamw steps: %s", ml_last_error());
    expect("adamw param", p, (double[]){0.482681274, -1.24521935, 1.98046923, -0.0211911611, 3.50276518}, 5, 2e-7);
    expect("adamw exp_avg", m, (double[]){-0.0174000002, 0.0387999974, 0.0218000002, 7.10000022e-05, -0.0439999998}, 5, 2e-7);
    expect("adamw exp_avg_sq", v, (double[]){0.000102477519, 0.000299670035, 0.000192257605, 1.00800124e-09, 0.0209640171}, 5, 2e-7);
    ml_tensor *bad = ml_zeros(1, (int64_t[]){4}, ML_F32, ml_cpu());
    CHECK(ml_adamw_step_(p, bad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 4, 0, 0) < 0 && strstr(ml_last_error(), "[4]"),
          "adamw shape mismatch: %s", ml_last_error());
    ml_release(bad); ml_release(p); ml_release(m); ml_release(v);
}

/* ---- gradient checks ---------------------------------------------------- */

typedef struct { int op; int variant; double s; } gctx;

static ml_tensor *f_binary(ml_tensor **x, void *c) {
    gctx *g = c;
    ml_tensor *a = x[0], *b = x[1], *at = NULL, *r;
    if (g->variant == 1) a = at = ml_transpose(x[0], 0, 1);
    r = ml_binary((ml_binop)g->op, a, b);
    ml_release(at);
    return r;
}

static ml_tensor *f_scalar(ml_tensor **x, void *c) {
    gctx *g = c;
    switch (g->op) {
    case 0: return ml_add_scalar(x[0], g->s);
    case 1: return ml_mul_scalar(x[0], g->s);
    case 2: return ml_pow_scalar(x[0], g->s);
    case 3: return ml_rsub_scalar(x[0], g->s);
    case 4: return ml_rdiv_scalar(x[0], g->s);
    default: return ml_scalar_op(ML_POW, x[0], g->s, true);   /* s^x */
    }
}

static ml_tensor *f_unary(ml_tensor **x, void *c) {
    gctx *g = c;
    if (g->variant == 1) {
        ml_tensor *t = ml_transpose(x[0], 0, 1), *r = ml_unary((ml_unop)g->op, t);
        ml_release(t);
        return r;
    }
    return ml_unary((ml_unop)g->op, x[0]);
}

static ml_tensor *f_clamp(ml_tensor **x, void *c) { (void)c; return ml_clamp(x[0], -0.5, 0.7); }
static ml_tensor *f_where(ml_tensor **x, void *c) { (void)c; return ml_where(x[2], x[0], x[1]); }

/* Keep values away from |x| < 0.05 and from each other's ties (kinks). */
static ml_tensor *away_from_zero(ml_tensor *t) {
    double *p = ml_data(t);
    for (int64_t i = 0; i < ml_numel(t); i++) if (fabs(p[i]) < 0.05) p[i] += p[i] < 0 ? -0.1 : 0.1;
    return t;
}

static ml_tensor *positive(ml_tensor *t) {
    double *p = ml_data(t);
    for (int64_t i = 0; i < ml_numel(t); i++) p[i] = 0.3 + fabs(p[i]);
    return t;
}

static void test_gradchecks(void) {
    char name[96];
    int64_t s23[2] = {2, 3}, s3[1] = {3}, s32[2] = {3, 2}, s413[3] = {4, 1, 3}, s21[2] = {2, 1};
    for (int op = ML_ADD; op <= ML_MINIMUM; op++) {
        /* same shape, broadcast [2,3] x [3], [4,1,3] x [2,1], transposed [3,2]^T x [3] */
        struct { int na; int64_t *sa; int nb; int64_t *sb; int variant; const char *what; } cases[] = {
            {2, s23, 2, s23, 0, "same"}, {2, s23, 1, s3, 0, "bcast"}, {3, s413, 2, s21, 0, "bcast2"},
            {2, s32, 1, s3, 1, "transposed"},
        };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            ml_tensor *x[2] = {randt(cases[k].na, cases[k].sa), randt(cases[k].nb, cases[k].sb)};
            if (op == ML_POW) positive(x[0]);
            if (op == ML_DIV) away_from_zero(x[1]);
            gctx c = {op, cases[k].variant, 0};
            snprintf(name, sizeof name, "grad %s %s", ml_binop_name((ml_binop)op), cases[k].what);
            gradcheck(name, f_binary, 2, x, 3, &c);
            ml_release(x[0]); ml_release(x[1]);
        }
    }
    /* maximum with ties: each input gets half */
    {
        ml_tensor *a = ml_full(1, s3, 1.0, ML_F64, ml_cpu()), *b = ml_full(1, s3, 1.0, ML_F64, ml_cpu());
        a->requires_grad = b->requires_grad = true;
        ml_tensor *m = ml_binary(ML_MAXIMUM, a, b), *s = ml_sum(m, 0, NULL, false);
        CHECK(ml_backward(s, NULL, false) == 0, "maximum tie backward");
        expect("maximum tie grad a", a->grad, (double[]){0.5, 0.5, 0.5}, 3, 0);
        expect("maximum tie grad b", b->grad, (double[]){0.5, 0.5, 0.5}, 3, 0);
        ml_release(m); ml_release(s); ml_release(a); ml_release(b);
    }
    /* pow at base 0: finite gradients (PyTorch's masks) */
    {
        ml_tensor *a = T(ML_F64, 1, (int64_t[]){2}, (double[]){0, 2}), *b = T(ML_F64, 1, (int64_t[]){2}, (double[]){2, 0});
        a->requires_grad = b->requires_grad = true;
        ml_tensor *p = ml_pow(a, b), *s = ml_sum(p, 0, NULL, false);
        CHECK(ml_backward(s, NULL, false) == 0, "pow at 0 backward");
        expect("pow grad base", a->grad, (double[]){0, 0}, 2, 0);
        expect("pow grad exponent", b->grad, (double[]){0, log(2)}, 2, 1e-12);
        ml_release(p); ml_release(s); ml_release(a); ml_release(b);
    }
    /* scalar forms */
    static const double svals[6] = {1.5, -2.5, 3, 2, 0.7, 1.8};
    static const char *snames[6] = {"add_scalar", "mul_scalar", "pow_scalar", "rsub_scalar", "rdiv_scalar", "scalar^x"};
    for (int op = 0; op < 6; op++) {
        ml_tensor *x[1] = {randt(2, s23)};
        if (op == 2) positive(x[0]);
        if (op == 4) away_from_zero(x[0]);
        gctx c = {op, 0, svals[op]};
        snprintf(name, sizeof name, "grad %s", snames[op]);
        gradcheck(name, f_scalar, 1, x, 1, &c);
        gctx c2 = {2, 0, 0.5};
        if (op == 2) { positive(x[0]); gradcheck("grad pow_scalar 0.5", f_scalar, 1, x, 1, &c2); }
        ml_release(x[0]);
    }
    /* unary ops, contiguous and transposed */
    for (int op = 0; op < ML_NUM_UNOPS; op++) {
        for (int variant = 0; variant < 2; variant++) {
            ml_tensor *x[1] = {randt(2, variant ? s32 : s23)};
            if (op == ML_SQRT || op == ML_RSQRT || op == ML_LOG) positive(x[0]);
            if (op == ML_ABS || op == ML_RELU || op == ML_SIGN) away_from_zero(x[0]);
            if (op == ML_ROUND || op == ML_FLOOR) {       /* keep away from the jumps */
                double *p = ml_data(x[0]);
                for (int i = 0; i < 6; i++) p[i] = floor(p[i] * 3) / 3 + 0.25;
            }
            gctx c = {op, variant, 0};
            snprintf(name, sizeof name, "grad %s%s", ml_unop_name((ml_unop)op), variant ? " transposed" : "");
            gradcheck(name, f_unary, 1, x, 1, &c);
            ml_release(x[0]);
        }
    }
    {
        ml_tensor *x[1] = {randt(2, s23)};
        double *p = ml_data(x[0]);
        double v[6] = {-1.2, -0.4, 0.1, 0.6, 0.9, -0.6};
        memcpy(p, v, sizeof v);
        gradcheck("grad clamp", f_clamp, 1, x, 1, NULL);
        ml_release(x[0]);
    }
    {
        ml_tensor *x[3] = {randt(2, s23), randt(1, s3), T(ML_BOOL, 2, s21, (double[]){1, 0})};
        gradcheck("grad where (broadcast)", f_where, 3, x, 3, NULL);
        ml_release(x[0]); ml_release(x[1]); ml_release(x[2]);
    }
    /* a leaf reached through a broadcast in both operands: [2,1] * [1,3] */
    {
        ml_tensor *x[2] = {randt(2, s21), randt(2, (int64_t[]){1, 3})};
        gctx c = {ML_MUL, 0, 0};
        gradcheck("grad mul outer", f_binary, 2, x, 3, &c);
        ml_release(x[0]); ml_release(x[1]);
    }
    /* f32 inputs get f32 gradients */
    {
        ml_tensor *a = ml_randn(1, s3, ML_F32, ml_cpu(), &gen), *b = ml_randn(1, s3, ML_F64, ml_cpu(), &gen);
        a->requires_grad = true;
        ml_tensor *y = ml_mul(a, b), *s = ml_sum(y, 0, NULL, false);
        CHECK(y && y->dtype == ML_F64 && ml_backward(s, NULL, false) == 0 && a->grad && a->grad->dtype == ML_F32,
              "mixed-dtype gradient comes back in the input's dtype");
        ml_release(y); ml_release(s); ml_release(a); ml_release(b);
    }
}

/* ---- bandwidth ---------------------------------------------------------- */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bench(void) {
    int64_t n = 10000000;
    ml_tensor *a = ml_full(1, &n, 1.0, ML_F32, ml_cpu()), *b = ml_full(1, &n, 2.0, ML_F32, ml_cpu());
    ml_tensor *out = ml_empty(1, &n, ML_F32, ml_cpu());
    ml_add_(out, a, 0);                       /* touch the pages */
    double best = 1e9, best_alloc = 1e9;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        ml_tensor *c = ml_add(a, b);
        double t1 = now();
        ml_release(c);
        if (t1 - t0 < best_alloc) best_alloc = t1 - t0;
        ml_fill_(out, 0);
        t0 = now();
        ml_add_(out, a, 1.0);
        t1 = now();
        if (t1 - t0 < best) best = t1 - t0;
    }
    printf("bench: add of 1e7 f32: %.2f ms (%.1f GB/s incl. allocation); add_ in place: %.2f ms (%.1f GB/s)\n",
           best_alloc * 1e3, 12e7 / best_alloc / 1e9, best * 1e3, 12e7 / best / 1e9);
    static const ml_unop ops[3] = {ML_SILU, ML_GELU, ML_GELU_TANH};
    for (int k = 0; k < 3; k++) {
        double t0 = now();
        ml_tensor *y = ml_unary(ops[k], a);
        double t = now() - t0;
        ml_release(y);
        printf("bench: %s of 1e7 f32: %.2f ms\n", ml_unop_name(ops[k]), t * 1e3);
    }
    ml_release(a); ml_release(b); ml_release(out);
}

int main(void) {
    test_binary_values();
    test_promotion();
    test_scalar_and_where();
    test_unary_values();
    test_clamp();
    test_sum_to_shape();
    test_inplace();
    test_adamw();
    test_gradchecks();
    bench();
    return check_summary();
}
