/* test_ops_nn.c — conv2d, group norm, layer norm, softmax, log_softmax and
 * attention: values against naive loops (f32 and f64), finite-difference
 * gradients in f64 at the shapes Stable Diffusion uses (toy sizes),
 * non-contiguous inputs, and argument errors. */
#include "check.h"
#include "tensor_check.h"
#include "gradcheck.h"
#include <stdlib.h>
#include <string.h>

#define SH(...) (int64_t[]){__VA_ARGS__}, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))

static ml_tensor *rn(ml_dtype dt, const int64_t *s, int nd) { return ml_randn(nd, s, dt, ml_cpu(), NULL); }

static double max_diff(ml_tensor *t, const double *ref) {
    double *v = ml_to_doubles(t), m = 0;
    for (int64_t i = 0; i < ml_numel(t); i++) {
        double d = fabs(v[i] - ref[i]);
        if (!(d <= m)) m = d;   /* NaN propagates */
    }
    free(v);
    return m;
}

static double tol_for(ml_dtype dt) { return dt == ML_F32 ? 2e-5 : 1e-11; }


/* ---- conv2d ------------------------------------------------------------- */

typedef struct { int sh, sw, pt, pb, pl, pr; } conv_cfg;

static double *naive_conv(ml_tensor *x, ml_tensor *w, ml_tensor *b, conv_cfg c, int64_t *Ho, int64_t *Wo) {
    int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
    int64_t O = w->shape[0], kh = w->shape[1], kw = w->shape[2];
    *Ho = (H + c.pt + c.pb - kh) / c.sh + 1;
    *Wo = (W + c.pl + c.pr - kw) / c.sw + 1;
    double *vx = ml_to_doubles(x), *vw = ml_to_doubles(w), *vb = b ? ml_to_doubles(b) : NULL;
    double *o = calloc((size_t)(N * *Ho * *Wo * O), sizeof *o);
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < *Ho; oh++)
            for (int64_t ow = 0; ow < *Wo; ow++)
                for (int64_t oc = 0; oc < O; oc++) {
                    double s = vb ? vb[oc] : 0;
                    for (int64_t i = 0; i < kh; i++)
                        for (int64_t j = 0; j < kw; j++) {
                            int64_t ih = oh * c.sh - c.pt + i, iw = ow * c.sw - c.pl + j;
                            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                            for (int64_t ci = 0; ci < C; ci++)
                                s += vx[((n * H + ih) * W + iw) * C + ci] * vw[((oc * kh + i) * kw + j) * C + ci];
                        }
                    o[((n * *Ho + oh) * *Wo + ow) * O + oc] = s;
                }
    free(vx); free(vw); free(vb);
    return o;
}

static void check_conv(const char *what, ml_tensor *x, ml_tensor *w, ml_tensor *b, conv_cfg c) {
    ml_tensor *y = ml_conv2d_ex(x, w, b, c.sh, c.sw, c.pt, c.pb, c.pl, c.pr);
    CHECK(y != NULL, "%s: %s", what, ml_last_error());
    if (!y) return;
    int64_t Ho, Wo;
    double *ref = naive_conv(x, w, b, c, &Ho, &Wo);
    CHECK(y->shape[1] == Ho && y->shape[2] == Wo && y->shape[3] == w->shape[0], "%s: output shape", what);
    double d = max_diff(y, ref);
    CHECK(d < tol_for(x->dtype) * 10, "%s: values differ by %g", what, d);
    free(ref);
    ml_release(y);
}

static void test_conv_values(ml_dtype dt) {
    ml_tensor *x = rn(dt, SH(2, 7, 6, 5)), *w3 = rn(dt, SH(4, 3, 3, 5)), *w1 = rn(dt, SH(4, 1, 1, 5)), *b = rn(dt, SH(4));
    check_conv("conv 3x3 pad 1", x, w3, b, (conv_cfg){1, 1, 1, 1, 1, 1});
    check_conv("conv 3x3 stride 2 pad 1", x, w3, b, (conv_cfg){2, 2, 1, 1, 1, 1});
    check_conv("conv 3x3 stride 2 pad (0,1,0,1)", x, w3, b, (conv_cfg){2, 2, 0, 1, 0, 1});
    check_conv("conv 1x1", x, w1, b, (conv_cfg){1, 1, 0, 0, 0, 0});
    check_conv("conv 1x1 stride 2", x, w1, NULL, (conv_cfg){2, 2, 0, 0, 0, 0});
    check_conv("conv 3x3 no bias, no padding", x, w3, NULL, (conv_cfg){1, 1, 0, 0, 0, 0});
    /* NCHW data seen as NHWC through a permute: a non-contiguous input. */
    ml_tensor *nchw = rn(dt, SH(2, 5, 7, 6)), *xp = ml_permute(nchw, (int[]){0, 2, 3, 1});
    check_conv("conv of a permuted input", xp, w3, b, (conv_cfg){1, 1, 1, 1, 1, 1});
    ml_tensor *y = ml_conv2d(x, w3, b, 1, 1, 1, 1);
    CHECK(y && y->shape[1] == 7 && y->shape[2] == 6, "ml_conv2d keeps the size with pad 1");
    ml_release(y);
    ml_release(x); ml_release(w3); ml_release(w1); ml_release(b); ml_release(nchw); ml_release(xp);
}

/* Large enough that im2col runs in two chunks (16384 rows of 1152 floats); the backward is compared
 * with naive loops for dw and db and a finite difference for dx. */
static void test_conv_chunked(void) {
    ml_tensor *x = rn(ML_F32, SH(1, 128, 128, 128)), *w = rn(ML_F32, SH(4, 3, 3, 128)), *b = rn(ML_F32, SH(4));
    check_conv("conv in im2col chunks", x, w, b, (conv_cfg){1, 1, 1, 1, 1, 1});
    x->requires_grad = w->requires_grad = b->requires_grad = true;
    ml_tensor *y = ml_conv2d(x, w, b, 1, 1, 1, 1);
    ml_tensor *g = rn(ML_F32, y->shape, 4);
    CHECK(ml_backward(y, g, false) == 0, "chunked conv backward: %s", ml_last_error());
    double *vx = ml_to_doubles(x), *vg = ml_to_doubles(g), *dw = ml_to_doubles(w->grad), *db = ml_to_doubles(b->grad);
    double e = 0, eb = 0;
    int64_t H = 128, W = 128, C = 128;
    for (int o = 0; o < 4; o++) {
        double s = 0;
        for (int64_t p = 0; p < H * W; p++) s += vg[p * 4 + o];
        eb = fmax(eb, fabs(s - db[o]) / (1 + fabs(s)));
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                for (int c = 0; c < C; c += 7) {
                    double t = 0;
                    for (int64_t oh = 0; oh < H; oh++)
                        for (int64_t ow = 0; ow < W; ow++) {
                            int64_t ih = oh - 1 + i, iw = ow - 1 + j;
                            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                            t += vg[(oh * W + ow) * 4 + o] * vx[(ih * W + iw) * C + c];
                        }
                    e = fmax(e, fabs(t - dw[((o * 3 + i) * 3 + j) * C + c]) / (1 + fabs(t)));
                }
    }
    CHECK(e < 1e-4 && eb < 1e-4, "chunked conv dw/db relative error %g / %g", e, eb);
    /* dx at one interior pixel: sum over the 3x3 outputs that read it. */
    double *dx = ml_to_doubles(x->grad), *vw = ml_to_doubles(w), ex = 0;
    int64_t ph = 80, pw = 33;   /* in the second chunk */
    for (int c = 0; c < C; c++) {
        double t = 0;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                for (int o = 0; o < 4; o++)
                    t += vg[((ph + 1 - i) * W + (pw + 1 - j)) * 4 + o] * vw[((o * 3 + i) * 3 + j) * C + c];
        ex = fmax(ex, fabs(t - dx[(ph * W + pw) * C + c]));
    }
    CHECK(ex < 1e-4, "chunked conv dx differs by %g", ex);
    free(vx); free(vg); free(dw); free(db); free(dx); free(vw);
    ml_release(y); ml_release(g); ml_release(x); ml_release(w); ml_release(b);
}

static ml_tensor *f_conv(ml_tensor **x, void *ctx) {
    conv_cfg *c = ctx;
    return ml_conv2d_ex(x[0], x[1], x[2], c->sh, c->sw, c->pt, c->pb, c->pl, c->pr);
}

static ml_tensor *f_conv_permuted(ml_tensor **x, void *ctx) {
    conv_cfg *c = ctx;
    ml_tensor *xp = ml_permute(x[0], (int[]){0, 2, 3, 1});
    ml_tensor *y = ml_conv2d_ex(xp, x[1], x[2], c->sh, c->sw, c->pt, c->pb, c->pl, c->pr);
    ml_release(xp);
    return y;
}

static void test_conv_grads(void) {
    ml_tensor *x[3] = {rn(ML_F64, SH(2, 5, 4, 3)), rn(ML_F64, SH(4, 3, 3, 3)), rn(ML_F64, SH(4))};
    conv_cfg c1 = {1, 1, 1, 1, 1, 1}, c2 = {2, 2, 1, 1, 1, 1}, c3 = {2, 2, 0, 1, 0, 1}, c4 = {1, 2, 0, 0, 1, 1};
    gradcheck("grad conv 3x3 pad 1", f_conv, 3, x, 7, &c1);
    gradcheck("grad conv 3x3 stride 2 pad 1", f_conv, 3, x, 7, &c2);
    gradcheck("grad conv 3x3 stride 2 pad (0,1,0,1)", f_conv, 3, x, 7, &c3);
    gradcheck("grad conv 3x3 stride (1,2) pad (0,1)", f_conv, 3, x, 7, &c4);
    ml_tensor *y[3] = {x[0], rn(ML_F64, SH(4, 1, 1, 3)), NULL};
    conv_cfg p = {1, 1, 0, 0, 0, 0};
    gradcheck("grad conv 1x1 without bias", f_conv, 2, y, 3, &p);   /* y[2] NULL: no bias */
    ml_tensor *z[3] = {rn(ML_F64, SH(2, 3, 5, 4)), x[1], x[2]};
    gradcheck("grad conv of a permuted (NCHW) input", f_conv_permuted, 3, z, 7, &c1);
    ml_release(x[0]); ml_release(x[1]); ml_release(x[2]); ml_release(y[1]); ml_release(z[0]);
}

/* ---- group norm / layer norm -------------------------------------------- */

static double *naive_group_norm(ml_tensor *x, int G, ml_tensor *w, ml_tensor *b, double eps, bool silu) {
    int64_t N = x->shape[0], C = x->shape[x->ndim - 1], L = ml_numel(x) / (N * C), cg = C / G;
    double *v = ml_to_doubles(x), *vw = w ? ml_to_doubles(w) : NULL, *vb = b ? ml_to_doubles(b) : NULL;
    double *o = malloc((size_t)ml_numel(x) * sizeof *o);
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            double m = 0, var = 0;
            for (int64_t l = 0; l < L; l++) for (int64_t j = 0; j < cg; j++) m += v[(n * L + l) * C + g * cg + j];
            m /= (double)(L * cg);
            for (int64_t l = 0; l < L; l++)
                for (int64_t j = 0; j < cg; j++) { double d = v[(n * L + l) * C + g * cg + j] - m; var += d * d; }
            var /= (double)(L * cg);
            for (int64_t l = 0; l < L; l++)
                for (int64_t j = 0; j < cg; j++) {
                    int64_t c = g * cg + j, k = (n * L + l) * C + c;
                    double y = (v[k] - m) / sqrt(var + eps) * (vw ? vw[c] : 1) + (vb ? vb[c] : 0);
                    o[k] = silu ? y / (1 + exp(-y)) : y;
                }
        }
    free(v); free(vw); free(vb);
    return o;
}

static void test_norm_values(ml_dtype dt) {
    ml_tensor *x = rn(dt, SH(2, 4, 3, 16)), *w = rn(dt, SH(16)), *b = rn(dt, SH(16));
    for (int silu = 0; silu < 2; silu++) {
        ml_tensor *y = ml_group_norm(x, 8, w, b, 1e-5, silu);
        double *ref = naive_group_norm(x, 8, w, b, 1e-5, silu);
        CHECK(y && max_diff(y, ref) < tol_for(dt) * 10, "group norm 8 groups (silu %d)", silu);
        free(ref); ml_release(y);
    }
    ml_tensor *x3 = rn(dt, SH(3, 10, 8)), *w8 = rn(dt, SH(8));
    ml_tensor *y = ml_group_norm(x3, 2, w8, NULL, 1e-6, false);
    double *ref = naive_group_norm(x3, 2, w8, NULL, 1e-6, false);
    CHECK(y && max_diff(y, ref) < tol_for(dt) * 10, "group norm of [N, L, C], no bias");
    free(ref); ml_release(y);
    /* Activations with a large mean: the two-pass variance keeps them exact. */
    ml_tensor *big = ml_add_scalar(x, 1000.0);
    y = ml_group_norm(big, 4, NULL, NULL, 1e-5, false);
    ref = naive_group_norm(big, 4, NULL, NULL, 1e-5, false);
    CHECK(y && max_diff(y, ref) < (dt == ML_F32 ? 5e-3 : 1e-8), "group norm with mean 1000: %g", y ? max_diff(y, ref) : -1);
    free(ref); ml_release(y); ml_release(big);
    /* layer norm = group norm of [M, 1, C] with one group */
    ml_tensor *xl = rn(dt, SH(2, 3, 16));
    y = ml_layer_norm(xl, w, b, 1e-5);
    ml_tensor *xr = ml_reshape(xl, 3, (int64_t[]){6, 1, 16});
    ref = naive_group_norm(xr, 1, w, b, 1e-5, false);
    CHECK(y && y->ndim == 3 && max_diff(y, ref) < tol_for(dt) * 10, "layer norm values");
    free(ref); ml_release(y); ml_release(xr); ml_release(xl);
    ml_release(x); ml_release(w); ml_release(b); ml_release(x3); ml_release(w8);
}

typedef struct { int groups; bool silu; bool permute; } gn_cfg;

static ml_tensor *f_group_norm(ml_tensor **x, void *ctx) {
    gn_cfg *c = ctx;
    ml_tensor *in = c->permute ? ml_permute(x[0], (int[]){0, 2, 3, 1}) : ml_retain(x[0]);
    ml_tensor *y = ml_group_norm(in, c->groups, x[1], x[2], 1e-5, c->silu);
    ml_release(in);
    return y;
}

static ml_tensor *f_layer_norm(ml_tensor **x, void *ctx) {
    ml_tensor *in = ctx ? ml_transpose(x[0], 0, 1) : ml_retain(x[0]);
    ml_tensor *y = ml_layer_norm(in, x[1], x[2], 1e-5);
    ml_release(in);
    return y;
}

static void test_norm_grads(void) {
    ml_tensor *x[3] = {rn(ML_F64, SH(2, 3, 2, 16)), rn(ML_F64, SH(16)), rn(ML_F64, SH(16))};
    gn_cfg a = {8, false, false}, s = {8, true, false}, one = {1, true, false};
    gradcheck("grad group norm 8 groups", f_group_norm, 3, x, 7, &a);
    gradcheck("grad group norm 8 groups + SiLU", f_group_norm, 3, x, 7, &s);
    gradcheck("grad group norm 1 group + SiLU", f_group_norm, 3, x, 7, &one);
    ml_tensor *y[3] = {x[0], NULL, NULL};
    gradcheck("grad group norm without affine", f_group_norm, 1, y, 1, &a);
    ml_tensor *z[3] = {rn(ML_F64, SH(2, 16, 3, 2)), x[1], x[2]};
    gn_cfg p = {4, true, true};
    gradcheck("grad group norm of a permuted input", f_group_norm, 3, z, 7, &p);
    ml_tensor *l[3] = {rn(ML_F64, SH(5, 12)), rn(ML_F64, SH(12)), rn(ML_F64, SH(12))};
    gradcheck("grad layer norm", f_layer_norm, 3, l, 7, NULL);
    ml_tensor *lt[3] = {rn(ML_F64, SH(12, 5)), l[1], l[2]};
    gradcheck("grad layer norm of a transposed input", f_layer_norm, 3, lt, 7, lt);
    ml_release(x[0]); ml_release(x[1]); ml_release(x[2]); ml_release(z[0]);
    ml_release(l[0]); ml_release(l[1]); ml_release(l[2]); ml_release(lt[0]);
}

/* ---- softmax ------------------------------------------------------------ */

static void test_softmax_values(ml_dtype dt) {
    ml_tensor *x = rn(dt, SH(3, 4, 5));
    double *v = ml_to_doubles(x);
    for (int dim = 0; dim < 3; dim++)
        for (int lg = 0; lg < 2; lg++) {
            ml_tensor *y = lg ? ml_log_softmax(x, dim - 3 * (dim == 2)) : ml_softmax(x, dim);
            int64_t st[3] = {20, 5, 1}, n = x->shape[dim];
            double *ref = malloc(60 * sizeof *ref);
            for (int64_t i = 0; i < 60; i++) {
                int64_t base = i - ((i / st[dim]) % n) * st[dim];
                double s = 0;
                for (int64_t k = 0; k < n; k++) s += exp(v[base + k * st[dim]]);
                ref[i] = lg ? v[i] - log(s) : exp(v[i]) / s;
            }
            CHECK(y && max_diff(y, ref) < tol_for(dt), "%s over dim %d", lg ? "log_softmax" : "softmax", dim);
            free(ref); ml_release(y);
        }
    free(v);
    /* Large logits: the max is subtracted first, nothing overflows. */
    ml_tensor *big = ml_from_doubles((double[]){1000, 1001, 1002, -1000}, 1, (int64_t[]){4}, dt);
    ml_tensor *y = ml_softmax(big, 0), *ly = ml_log_softmax(big, 0);
    double e = exp(-2) + exp(-1) + 1;
    CHECK(y && max_diff(y, (double[]){exp(-2) / e, exp(-1) / e, 1 / e, 0}) < tol_for(dt), "softmax of large logits");
    CHECK(ly && max_diff(ly, (double[]){-2 - log(e), -1 - log(e), -log(e), -2002 - log(e)}) < 1e-3,
          "log_softmax of large logits");
    ml_release(big); ml_release(y); ml_release(ly); ml_release(x);
}

static ml_tensor *f_softmax(ml_tensor **x, void *ctx) {
    int mode = *(int *)ctx;   /* dim in the low bits, 4: log, 8: transposed input */
    ml_tensor *in = mode & 8 ? ml_transpose(x[0], 0, 2) : ml_retain(x[0]);
    ml_tensor *y = mode & 4 ? ml_log_softmax(in, mode & 3) : ml_softmax(in, mode & 3);
    ml_release(in);
    return y;
}

static void test_softmax_grads(void) {
    ml_tensor *x = rn(ML_F64, SH(3, 4, 5));
    int modes[] = {2, 1, 0, 4 | 2, 4 | 1, 8 | 2, 8 | 4 | 1};
    const char *names[] = {"grad softmax last dim", "grad softmax middle dim", "grad softmax first dim",
                           "grad log_softmax last dim", "grad log_softmax middle dim",
                           "grad softmax of a transposed input", "grad log_softmax of a transposed input"};
    for (int i = 0; i < 7; i++) gradcheck(names[i], f_softmax, 1, &x, 1, &modes[i]);
    ml_release(x);
}

/* ---- attention ---------------------------------------------------------- */

static double *naive_sdpa(ml_tensor *q, ml_tensor *k, ml_tensor *v, bool causal, double scale) {
    int64_t B = q->shape[0], Sq = q->shape[1], H = q->shape[2], D = q->shape[3], Sk = k->shape[1], Dv = v->shape[3];
    double *vq = ml_to_doubles(q), *vk = ml_to_doubles(k), *vv = ml_to_doubles(v);
    double *o = calloc((size_t)(B * Sq * H * Dv), sizeof *o), *p = malloc((size_t)Sk * sizeof *p);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < Sq; i++) {
                double mx = -INFINITY, s = 0;
                for (int64_t j = 0; j < Sk; j++) {
                    double t = 0;
                    for (int64_t d = 0; d < D; d++) t += vq[((b * Sq + i) * H + h) * D + d] * vk[((b * Sk + j) * H + h) * D + d];
                    p[j] = causal && j > i ? -INFINITY : t * scale;
                    if (p[j] > mx) mx = p[j];
                }
                for (int64_t j = 0; j < Sk; j++) { p[j] = exp(p[j] - mx); s += p[j]; }
                for (int64_t j = 0; j < Sk; j++)
                    for (int64_t d = 0; d < Dv; d++)
                        o[((b * Sq + i) * H + h) * Dv + d] += p[j] / s * vv[((b * Sk + j) * H + h) * Dv + d];
            }
    free(vq); free(vk); free(vv); free(p);
    return o;
}

static void test_sdpa_values(ml_dtype dt) {
    ml_tensor *q = rn(dt, SH(2, 5, 4, 8)), *k = rn(dt, SH(2, 5, 4, 8)), *v = rn(dt, SH(2, 5, 4, 8));
    for (int causal = 0; causal < 2; causal++) {
        ml_tensor *y = ml_sdpa(q, k, v, causal, 0);
        double *ref = naive_sdpa(q, k, v, causal, 1 / sqrt(8.0));
        CHECK(y && max_diff(y, ref) < tol_for(dt) * 5, "sdpa values (causal %d)", causal);
        free(ref); ml_release(y);
    }
    ml_tensor *k7 = rn(dt, SH(2, 7, 4, 8)), *v7 = rn(dt, SH(2, 7, 4, 3));
    ml_tensor *y = ml_sdpa(q, k7, v7, false, 0.3);
    double *ref = naive_sdpa(q, k7, v7, false, 0.3);
    CHECK(y && y->shape[3] == 3 && max_diff(y, ref) < tol_for(dt) * 5, "sdpa with Sk != Sq, Dv != D, explicit scale");
    free(ref); ml_release(y);
    /* More query rows than one block of the kernel, causal. */
    ml_tensor *ql = rn(dt, SH(1, 300, 2, 4)), *kl = rn(dt, SH(1, 300, 2, 4)), *vl = rn(dt, SH(1, 300, 2, 4));
    y = ml_sdpa(ql, kl, vl, true, 0);
    ref = naive_sdpa(ql, kl, vl, true, 0.5);
    CHECK(y && max_diff(y, ref) < tol_for(dt) * 5, "sdpa over several query blocks (causal)");
    free(ref); ml_release(y);
    ml_release(q); ml_release(k); ml_release(v); ml_release(k7); ml_release(v7);
    ml_release(ql); ml_release(kl); ml_release(vl);
}

typedef struct { bool causal; bool fused; } sdpa_cfg;

/* fused: x[0] is one [B, S, 3*H*D] projection sliced into q, k, v
 * (strided views, as a fused qkv linear would give). */
static ml_tensor *f_sdpa(ml_tensor **x, void *ctx) {
    sdpa_cfg *c = ctx;
    if (!c->fused) return ml_sdpa(x[0], x[1], x[2], c->causal, 0);
    int64_t B = x[0]->shape[0], S = x[0]->shape[1];
    ml_tensor *v5 = ml_view(x[0], 5, (int64_t[]){B, S, 3, 4, 8});
    ml_tensor *q = ml_select(v5, 2, 0), *k = ml_select(v5, 2, 1), *v = ml_select(v5, 2, 2);
    ml_tensor *y = ml_sdpa(q, k, v, c->causal, 0);
    ml_release(v5); ml_release(q); ml_release(k); ml_release(v);
    return y;
}

/* Attention spelled out with matmul/softmax, for a second opinion on the
 * gradients at a size where finite differences would be slow. */
static ml_tensor *f_sdpa_composite(ml_tensor **x, void *ctx) {
    sdpa_cfg *c = ctx;
    int64_t S = x[0]->shape[1], D = x[0]->shape[3];
    ml_tensor *q = ml_permute(x[0], (int[]){0, 2, 1, 3}), *k = ml_permute(x[1], (int[]){0, 2, 3, 1});
    ml_tensor *v = ml_permute(x[2], (int[]){0, 2, 1, 3});
    ml_tensor *s = ml_matmul(q, k), *ss = ml_mul_scalar(s, 1 / sqrt((double)D));
    if (c->causal) {
        double *m = calloc((size_t)(S * S), sizeof *m);
        for (int64_t i = 0; i < S; i++) for (int64_t j = i + 1; j < S; j++) m[i * S + j] = -INFINITY;
        ml_tensor *mask = ml_from_doubles(m, 2, (int64_t[]){S, S}, x[0]->dtype), *t = ml_add(ss, mask);
        free(m); ml_release(mask); ml_release(ss);
        ss = t;
    }
    ml_tensor *p = ml_softmax(ss, -1), *o = ml_matmul(p, v), *out = ml_permute(o, (int[]){0, 2, 1, 3});
    ml_release(q); ml_release(k); ml_release(v); ml_release(s); ml_release(ss); ml_release(p); ml_release(o);
    return out;
}

static void test_sdpa_grads(void) {
    ml_tensor *x[3] = {rn(ML_F64, SH(1, 5, 4, 8)), rn(ML_F64, SH(1, 5, 4, 8)), rn(ML_F64, SH(1, 5, 4, 8))};
    sdpa_cfg plain = {false, false}, causal = {true, false}, fused = {true, true};
    gradcheck("grad sdpa heads 4 D 8", f_sdpa, 3, x, 7, &plain);
    gradcheck("grad sdpa heads 4 D 8 causal", f_sdpa, 3, x, 7, &causal);
    ml_tensor *qkv = rn(ML_F64, SH(2, 3, 96));
    gradcheck("grad sdpa on strided q/k/v slices", f_sdpa, 1, &qkv, 1, &fused);
    ml_tensor *k6 = rn(ML_F64, SH(1, 6, 4, 8)), *v6 = rn(ML_F64, SH(1, 6, 4, 8));
    ml_tensor *y[3] = {x[0], k6, v6};
    gradcheck("grad sdpa Sk != Sq", f_sdpa, 3, y, 7, &plain);

    /* Several query blocks: gradients against the composite version. */
    for (int cz = 0; cz < 2; cz++) {
        sdpa_cfg c = {cz, false};
        ml_tensor *a[3] = {rn(ML_F64, SH(1, 260, 2, 4)), rn(ML_F64, SH(1, 260, 2, 4)), rn(ML_F64, SH(1, 260, 2, 4))};
        ml_tensor *g = rn(ML_F64, SH(1, 260, 2, 4));
        double *ga[3], *gb[3];
        for (int pass = 0; pass < 2; pass++) {
            for (int i = 0; i < 3; i++) { a[i]->requires_grad = true; ml_release(a[i]->grad); a[i]->grad = NULL; }
            ml_tensor *o = pass ? f_sdpa_composite(a, &c) : f_sdpa(a, &c);
            CHECK(o && ml_backward(o, g, false) == 0, "sdpa vs composite backward: %s", ml_last_error());
            for (int i = 0; i < 3; i++) (pass ? gb : ga)[i] = ml_to_doubles(a[i]->grad);
            ml_release(o);
        }
        double e = 0;
        for (int i = 0; i < 3; i++) {
            for (int64_t j = 0; j < 260 * 8; j++) e = fmax(e, fabs(ga[i][j] - gb[i][j]));
            free(ga[i]); free(gb[i]);
            ml_release(a[i]);
        }
        CHECK(e < 1e-10, "sdpa gradients over several blocks (causal %d) match the composite: %g", cz, e);
        ml_release(g);
    }
    ml_release(x[0]); ml_release(x[1]); ml_release(x[2]); ml_release(qkv); ml_release(k6); ml_release(v6);
}

/* ---- errors ------------------------------------------------------------- */

static void test_errors(void) {
    ml_tensor *x = rn(ML_F32, SH(1, 6, 6, 4)), *w = rn(ML_F32, SH(8, 3, 3, 5)), *w4 = rn(ML_F32, SH(8, 3, 3, 4));
    expect_error("conv channel mismatch", ml_conv2d(x, w, NULL, 1, 1, 1, 1), "[1, 6, 6, 4]", "[8, 3, 3, 5]");
    ml_tensor *b = rn(ML_F32, SH(7));
    expect_error("conv bias mismatch", ml_conv2d(x, w4, b, 1, 1, 1, 1), "[7]", "[8, 3, 3, 4]");
    ml_tensor *w9 = rn(ML_F32, SH(8, 9, 9, 4));
    expect_error("conv kernel larger than the input", ml_conv2d(x, w9, NULL, 1, 1, 1, 1), "larger", "[1, 6, 6, 4]");
    expect_error("conv bad stride", ml_conv2d(x, w4, NULL, 0, 1, 1, 1), "stride", NULL);
    ml_tensor *xd = rn(ML_F64, SH(1, 6, 6, 4));
    expect_error("conv dtype mismatch", ml_conv2d(xd, w4, NULL, 1, 1, 1, 1), "float32", "float64");
    ml_tensor *xh = ml_zeros(4, (int64_t[]){1, 6, 6, 4}, ML_BF16, ml_cpu()), *wh = ml_zeros(4, (int64_t[]){8, 3, 3, 4}, ML_BF16, ml_cpu());
    expect_error("conv bf16 on the CPU", ml_conv2d(xh, wh, NULL, 1, 1, 1, 1), "bfloat16", "CPU");
    ml_tensor *xi = ml_zeros(4, (int64_t[]){1, 6, 6, 4}, ML_I32, ml_cpu());
    expect_error("group norm of integers", ml_group_norm(xi, 2, NULL, NULL, 1e-5, false), "int32", NULL);
    expect_error("group norm groups", ml_group_norm(x, 3, NULL, NULL, 1e-5, false), "3 groups", "4 channels");
    ml_tensor *w5 = rn(ML_F32, SH(5));
    expect_error("group norm weight", ml_group_norm(x, 2, w5, NULL, 1e-5, false), "[5]", "[1, 6, 6, 4]");
    expect_error("layer norm bias", ml_layer_norm(x, NULL, w5, 1e-5), "[5]", "[1, 6, 6, 4]");
    expect_error("softmax dim", ml_softmax(x, 4), "dimension 4", NULL);
    ml_tensor *q = rn(ML_F32, SH(1, 5, 2, 8)), *k = rn(ML_F32, SH(1, 5, 2, 4));
    expect_error("sdpa q/k width", ml_sdpa(q, k, q, false, 0), "[1, 5, 2, 8]", "[1, 5, 2, 4]");
    ml_tensor *k3 = rn(ML_F32, SH(5, 2, 8));
    expect_error("sdpa 3-D key", ml_sdpa(q, k3, q, false, 0), "[5, 2, 8]", NULL);
    ml_release(x); ml_release(w); ml_release(w4); ml_release(b); ml_release(w9); ml_release(xd); ml_release(xh);
    ml_release(wh); ml_release(xi); ml_release(w5); ml_release(q); ml_release(k); ml_release(k3);
}

/* The saved tensors go when backward ends: the input's storage is shared
 * only by the caller again. */
static void test_saved_released(void) {
    ml_tensor *x = rn(ML_F32, SH(1, 4, 4, 8)), *w = rn(ML_F32, SH(8, 3, 3, 8));
    x->requires_grad = true;
    ml_tensor *y = ml_conv2d(x, w, NULL, 1, 1, 1, 1), *z = ml_group_norm(y, 4, NULL, NULL, 1e-5, true);
    ml_tensor *s = ml_sum(z, 0, NULL, false);
    int before = x->storage->refcount;
    CHECK(ml_backward(s, NULL, false) == 0, "backward through conv + group norm: %s", ml_last_error());
    CHECK(x->storage->refcount < before, "conv's saved input released after backward (%d -> %d)",
          before, x->storage->refcount);
    ml_release(s); ml_release(z); ml_release(y); ml_release(x); ml_release(w);
}

int main(void) {
    for (int i = 0; i < 2; i++) {
        ml_dtype dt = i ? ML_F64 : ML_F32;
        test_conv_values(dt);
        test_norm_values(dt);
        test_softmax_values(dt);
        test_sdpa_values(dt);
    }
    test_conv_chunked();
    test_conv_grads();
    test_norm_grads();
    test_softmax_grads();
    test_sdpa_grads();
    test_errors();
    test_saved_released();
    return check_summary();
}
