/* test_ops_matmul.c — matmul and linear: values against naive loops
 * (batch broadcasting, 1-D operands, transposed and sliced views, f32 and
 * f64), finite-difference gradients in f64, and argument errors. */
#include "check.h"
#include "tensor_check.h"
#include "gradcheck.h"
#include <stdlib.h>
#include <string.h>

static ml_tensor *randn(int nd, const int64_t *s, ml_dtype dt) { return ml_randn(nd, s, dt, ml_cpu(), NULL); }
#define SHAPE(...) (int64_t[]){__VA_ARGS__}, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))

static ml_tensor *rn(ml_dtype dt, const int64_t *s, int nd) { return randn(nd, s, dt); }

/* Naive torch.matmul on doubles: both operands at least 2-D here. */
static double *naive_matmul(ml_tensor *a, ml_tensor *b, int *ond, int64_t *oshape) {
    int na = a->ndim, nb = b->ndim, nbo;
    int64_t bo[ML_MAX_DIMS];
    ml_broadcast_shape(na - 2, a->shape, nb - 2, b->shape, &nbo, bo);
    int64_t M = a->shape[na - 2], K = a->shape[na - 1], N = b->shape[nb - 1], B = 1;
    for (int i = 0; i < nbo; i++) B *= bo[i];
    int64_t sa[ML_MAX_DIMS], sb[ML_MAX_DIMS];
    memcpy(sa, bo, sizeof(int64_t) * nbo); sa[nbo] = M; sa[nbo + 1] = K;
    memcpy(sb, bo, sizeof(int64_t) * nbo); sb[nbo] = K; sb[nbo + 1] = N;
    ml_tensor *ad = ml_detach(a), *bd = ml_detach(b);
    ml_tensor *ae = ml_expand(ad, nbo + 2, sa), *be = ml_expand(bd, nbo + 2, sb);
    double *va = ml_to_doubles(ae), *vb = ml_to_doubles(be);
    double *o = calloc((size_t)(B * M * N + 1), sizeof *o);
    for (int64_t p = 0; p < B; p++)
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) {
                double s = 0;
                for (int64_t k = 0; k < K; k++) s += va[(p * M + i) * K + k] * vb[(p * K + k) * N + j];
                o[(p * M + i) * N + j] = s;
            }
    *ond = nbo + 2;
    memcpy(oshape, bo, sizeof(int64_t) * nbo); oshape[nbo] = M; oshape[nbo + 1] = N;
    free(va); free(vb);
    ml_release(ad); ml_release(bd); ml_release(ae); ml_release(be);
    return o;
}

static double max_diff(ml_tensor *t, const double *ref) {
    double *v = ml_to_doubles(t), m = 0;
    for (int64_t i = 0; i < ml_numel(t); i++) if (fabs(v[i] - ref[i]) > m) m = fabs(v[i] - ref[i]);
    free(v);
    return m;
}

static void check_matmul_value(const char *what, ml_tensor *a, ml_tensor *b, ml_tensor *a2, ml_tensor *b2,
                               int drop_row, int drop_col) {
    /* a2/b2: the >=2-D operands the reference uses (a, b promoted by hand). */
    ml_tensor *r = ml_matmul(a, b);
    CHECK(r != NULL, "%s: matmul failed: %s", what, ml_last_error());
    if (!r) return;
    int ond; int64_t os[ML_MAX_DIMS];
    double *ref = naive_matmul(a2, b2, &ond, os);
    int64_t want[ML_MAX_DIMS]; int wn = 0;
    for (int i = 0; i < ond; i++) {
        if ((drop_row && i == ond - 2) || (drop_col && i == ond - 1)) continue;
        want[wn++] = os[i];
    }
    bool shape_ok = r->ndim == wn && memcmp(r->shape, want, sizeof(int64_t) * wn) == 0;
    char b1[128];
    CHECK(shape_ok, "%s: result shape %s", what, ml_shape_str(r, b1, sizeof b1));
    double tol = r->dtype == ML_F32 ? 1e-4 : 1e-12;
    if (shape_ok) CHECK(max_diff(r, ref) < tol, "%s: values differ by %g", what, max_diff(r, ref));
    free(ref);
    ml_release(r);
}

static void test_values(ml_dtype dt) {
    struct { int na; int64_t a[4]; int nb; int64_t b[4]; const char *what; } cases[] = {
        {2, {3, 4}, 2, {4, 5}, "2-D"},
        {3, {2, 3, 4}, 3, {2, 4, 5}, "batched"},
        {3, {2, 3, 4}, 2, {4, 5}, "shared right operand (one folded GEMM)"},
        {2, {3, 4}, 3, {2, 4, 5}, "shared left operand"},
        {4, {2, 1, 3, 4}, 3, {5, 4, 2}, "partial broadcast"},
        {4, {1, 1, 3, 4}, 2, {4, 2}, "batch of ones"},
        {3, {1, 3, 4}, 4, {2, 3, 4, 2}, "leading ones"},
        {3, {2, 3, 0}, 3, {2, 0, 5}, "empty reduction"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ml_tensor *a = rn(dt, cases[c].a, cases[c].na), *b = rn(dt, cases[c].b, cases[c].nb);
        check_matmul_value(cases[c].what, a, b, a, b, 0, 0);
        ml_release(a); ml_release(b);
    }
    /* transposed and sliced views */
    ml_tensor *a = rn(dt, SHAPE(2, 4, 3)), *b = rn(dt, SHAPE(5, 4));
    ml_tensor *at = ml_transpose(a, 1, 2), *bt = ml_transpose(b, 0, 1);
    ml_tensor *bb = rn(dt, SHAPE(2, 4, 5)), *bn = ml_narrow(bb, 2, 1, 3);
    check_matmul_value("transposed left (no copy)", at, bb, at, bb, 0, 0);
    check_matmul_value("transposed right [B,M,K] @ [N,K]^T", at, bt, at, bt, 0, 0);
    check_matmul_value("sliced right", at, bn, at, bn, 0, 0);
    ml_tensor *base = rn(dt, SHAPE(3, 2, 4)), *ap = ml_permute(base, (int[]){1, 0, 2});   /* batch not outermost */
    check_matmul_value("permuted batch", ap, bb, ap, bb, 0, 0);
    ml_release(base); ml_release(ap);
    ml_release(a); ml_release(b); ml_release(at); ml_release(bt); ml_release(bb); ml_release(bn);

    /* 1-D operands */
    ml_tensor *v = rn(dt, SHAPE(4)), *w = rn(dt, SHAPE(4)), *m = rn(dt, SHAPE(4, 3)), *mb = rn(dt, SHAPE(2, 3, 4));
    ml_tensor *vr = ml_unsqueeze(v, 0), *wc = ml_unsqueeze(w, 1);
    check_matmul_value("vector . vector", v, w, vr, wc, 1, 1);
    check_matmul_value("vector @ matrix", v, m, vr, m, 1, 0);
    check_matmul_value("batched matrix @ vector", mb, w, mb, wc, 0, 1);
    ml_tensor *s = ml_matmul(v, w);
    CHECK(s && s->ndim == 0, "vector . vector is 0-dim");
    ml_release(s);
    ml_release(v); ml_release(w); ml_release(m); ml_release(mb); ml_release(vr); ml_release(wc);
}

static void test_linear_values(ml_dtype dt) {
    ml_tensor *x = rn(dt, SHAPE(2, 3, 5)), *w = rn(dt, SHAPE(4, 5)), *b = rn(dt, SHAPE(4));
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        ml_tensor *y = ml_linear(x, w, with_bias ? b : NULL);
        CHECK(y && y->ndim == 3 && y->shape[2] == 4, "linear shape (%s)", ml_last_error());
        if (!y) continue;
        double *vx = ml_to_doubles(x), *vw = ml_to_doubles(w), *vb = ml_to_doubles(b), *vy = ml_to_doubles(y), m = 0;
        for (int r = 0; r < 6; r++)
            for (int o = 0; o < 4; o++) {
                double s = with_bias ? vb[o] : 0;
                for (int k = 0; k < 5; k++) s += vx[r * 5 + k] * vw[o * 5 + k];
                if (fabs(s - vy[r * 4 + o]) > m) m = fabs(s - vy[r * 4 + o]);
            }
        CHECK(m < (dt == ML_F32 ? 1e-5 : 1e-12), "linear values (bias %d) differ by %g", with_bias, m);
        free(vx); free(vw); free(vb); free(vy);
        ml_release(y);
    }
    ml_tensor *x1 = rn(dt, SHAPE(5)), *y1 = ml_linear(x1, w, b);
    CHECK(y1 && y1->ndim == 1 && y1->shape[0] == 4, "linear of a vector gives [out]");
    ml_release(x1); ml_release(y1);
    ml_release(x); ml_release(w); ml_release(b);
}

/* ---- gradients ---------------------------------------------------------- */

typedef struct { int ta, tb; } mm_ctx;

static ml_tensor *f_matmul(ml_tensor **x, void *vctx) {
    mm_ctx *c = vctx;
    ml_tensor *a = c->ta ? ml_transpose(x[0], -1, -2) : ml_retain(x[0]);
    ml_tensor *b = c->tb ? ml_transpose(x[1], -1, -2) : ml_retain(x[1]);
    ml_tensor *r = ml_matmul(a, b);
    ml_release(a); ml_release(b);
    return r;
}

static void gc_matmul(const char *name, const int64_t *sa, int na, const int64_t *sb, int nb, int ta, int tb) {
    ml_tensor *x[2] = {randn(na, sa, ML_F64), randn(nb, sb, ML_F64)};
    mm_ctx c = {ta, tb};
    gradcheck(name, f_matmul, 2, x, 3, &c);
    ml_release(x[0]); ml_release(x[1]);
}

static ml_tensor *f_linear(ml_tensor **x, void *ctx) {
    int mode = *(int *)ctx;   /* 0: plain, 1: no bias, 2: transposed input */
    ml_tensor *in = mode == 2 ? ml_transpose(x[0], 0, 1) : ml_retain(x[0]);
    ml_tensor *r = ml_linear(in, x[1], mode == 1 ? NULL : x[2]);
    ml_release(in);
    return r;
}

static void test_grads(void) {
    gc_matmul("grad matmul 2-D", SHAPE(3, 4), SHAPE(4, 2), 0, 0);
    gc_matmul("grad matmul batched", SHAPE(2, 3, 4), SHAPE(2, 4, 2), 0, 0);
    gc_matmul("grad matmul shared right", SHAPE(2, 3, 4), SHAPE(4, 2), 0, 0);
    gc_matmul("grad matmul shared left", SHAPE(3, 4), SHAPE(2, 4, 2), 0, 0);
    gc_matmul("grad matmul partial broadcast", SHAPE(2, 1, 3, 4), SHAPE(3, 4, 2), 0, 0);
    gc_matmul("grad matmul transposed a", SHAPE(2, 4, 3), SHAPE(2, 4, 2), 1, 0);
    gc_matmul("grad matmul transposed b", SHAPE(2, 3, 4), SHAPE(2, 2, 4), 0, 1);
    gc_matmul("grad matmul transposed both, shared b", SHAPE(2, 4, 3), SHAPE(2, 4), 1, 1);
    gc_matmul("grad matmul transposed shared a", SHAPE(4, 3), SHAPE(2, 4, 2), 1, 0);
    gc_matmul("grad matmul vector . vector", SHAPE(4), SHAPE(4), 0, 0);
    gc_matmul("grad matmul vector @ batched", SHAPE(4), SHAPE(2, 4, 3), 0, 0);
    gc_matmul("grad matmul batched @ vector", SHAPE(2, 3, 4), SHAPE(4), 0, 0);

    int modes[3] = {0, 1, 2};
    ml_tensor *x[3] = {randn(3, (int64_t[]){2, 3, 5}, ML_F64), randn(2, (int64_t[]){4, 5}, ML_F64),
                       randn(1, (int64_t[]){4}, ML_F64)};
    gradcheck("grad linear", f_linear, 3, x, 7, &modes[0]);
    gradcheck("grad linear without bias", f_linear, 3, x, 3, &modes[1]);
    ml_tensor *xt = randn(2, (int64_t[]){5, 3}, ML_F64);
    ml_tensor *y[3] = {xt, x[1], x[2]};
    gradcheck("grad linear of a transposed input", f_linear, 3, y, 7, &modes[2]);
    ml_release(xt);
    for (int i = 0; i < 3; i++) ml_release(x[i]);
}

/* ---- errors ------------------------------------------------------------- */


static void test_errors(void) {
    ml_tensor *a = randn(2, (int64_t[]){3, 4}, ML_F32), *b = randn(2, (int64_t[]){5, 2}, ML_F32);
    expect_error("matmul shape mismatch", ml_matmul(a, b), "[3, 4]", "[5, 2]");
    ml_tensor *a3 = randn(3, (int64_t[]){2, 3, 4}, ML_F32), *b3 = randn(3, (int64_t[]){3, 4, 2}, ML_F32);
    expect_error("matmul batch mismatch", ml_matmul(a3, b3), "[2, 3, 4]", "[3, 4, 2]");
    ml_tensor *bd = randn(2, (int64_t[]){4, 2}, ML_F64);
    expect_error("matmul dtype mismatch", ml_matmul(a, bd), "float32", "float64");
    ml_tensor *h = ml_zeros(2, (int64_t[]){3, 4}, ML_F16, ml_cpu()), *h2 = ml_zeros(2, (int64_t[]){4, 2}, ML_F16, ml_cpu());
    expect_error("matmul f16 on cpu", ml_matmul(h, h2), "float16", NULL);
    ml_tensor *i = ml_zeros(2, (int64_t[]){3, 4}, ML_I64, ml_cpu());
    expect_error("matmul of integers", ml_matmul(i, bd), "int64", NULL);
    ml_tensor *w = randn(2, (int64_t[]){6, 5}, ML_F32);
    expect_error("linear shape mismatch", ml_linear(a, w, NULL), "[3, 4]", "[6, 5]");
    ml_tensor *w4 = randn(2, (int64_t[]){6, 4}, ML_F32), *bb = randn(1, (int64_t[]){5}, ML_F32);
    expect_error("linear bias mismatch", ml_linear(a, w4, bb), "[5]", "[6, 4]");
    ml_release(a); ml_release(b); ml_release(a3); ml_release(b3); ml_release(bd); ml_release(h); ml_release(h2);
    ml_release(i); ml_release(w); ml_release(w4); ml_release(bb);
}

int main(void) {
    test_values(ML_F32);
    test_values(ML_F64);
    test_linear_values(ML_F32);
    test_linear_values(ML_F64);
    test_grads();
    test_errors();
    return check_summary();
}
