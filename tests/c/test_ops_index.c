/* test_ops_index.c — embedding, cat, stack, gather, index_select and
 * upsample_nearest2d: values against hand-written loops, finite-difference
 * gradients in f64 (repeated indices, non-contiguous inputs, more inputs
 * than one autograd node holds), and argument errors.  Also gather,
 * index_select and argmax counted from another index_base: the same values
 * and gradients as from 0, errors in the caller's base, one kernel call. */
#include "check.h"
#include "tensor_check.h"
#include "gradcheck.h"
#include "dispatch.h"
#include "index.h"
#include "profile.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SH(...) (int64_t[]){__VA_ARGS__}, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))

static ml_tensor *rn(ml_dtype dt, const int64_t *s, int nd) { return ml_randn(nd, s, dt, ml_cpu(), NULL); }

static ml_tensor *ints(ml_dtype dt, const double *v, const int64_t *s, int nd) { return ml_from_doubles(v, nd, s, dt); }

static double max_diff(ml_tensor *t, const double *ref) {
    double *v = ml_to_doubles(t), m = 0;
    for (int64_t i = 0; i < ml_numel(t); i++) if (!(fabs(v[i] - ref[i]) <= m)) m = fabs(v[i] - ref[i]);
    free(v);
    return m;
}


/* ---- embedding ---------------------------------------------------------- */

static ml_tensor *g_ids;

static ml_tensor *f_embedding(ml_tensor **x, void *ctx) {
    ml_tensor *w = ctx ? ml_transpose(x[0], 0, 1) : ml_retain(x[0]);
    ml_tensor *y = ml_embedding(w, g_ids);
    ml_release(w);
    return y;
}

static void test_embedding(void) {
    for (int it = 0; it < 2; it++) {
        ml_dtype idt = it ? ML_I64 : ML_I32;
        ml_tensor *w = rn(ML_F32, SH(7, 3));
        ml_tensor *ids = ints(idt, (double[]){6, 0, 2, 2, 5, 1}, SH(2, 3));
        ml_tensor *y = ml_embedding(w, ids);
        CHECK(y && y->ndim == 3 && y->shape[0] == 2 && y->shape[1] == 3 && y->shape[2] == 3, "embedding shape");
        double *vw = ml_to_doubles(w), ref[18];
        int id[6] = {6, 0, 2, 2, 5, 1};
        for (int i = 0; i < 6; i++) for (int d = 0; d < 3; d++) ref[i * 3 + d] = vw[id[i] * 3 + d];
        CHECK(y && max_diff(y, ref) == 0, "embedding rows (%s ids)", ml_dtype_name(idt));
        free(vw); ml_release(y); ml_release(w); ml_release(ids);
    }
    /* Repeated ids accumulate; ids given as a transposed view. */
    ml_tensor *w = rn(ML_F64, SH(6, 4));
    ml_tensor *raw = ints(ML_I64, (double[]){1, 3, 1, 5, 0, 1}, SH(3, 2));
    g_ids = ml_transpose(raw, 0, 1);
    gradcheck("grad embedding (repeated ids, strided ids)", f_embedding, 1, &w, 1, NULL);
    ml_tensor *wt = rn(ML_F64, SH(4, 6));
    gradcheck("grad embedding of a transposed weight", f_embedding, 1, &wt, 1, wt);
    ml_release(g_ids); ml_release(raw); ml_release(wt);

    ml_tensor *bad = ints(ML_I32, (double[]){1, 6}, SH(2));
    expect_error("embedding id out of range", ml_embedding(w, bad), "index 6", "of 6");
    ml_tensor *neg = ints(ML_I64, (double[]){-1}, SH(1));
    expect_error("embedding negative id", ml_embedding(w, neg), "index -1", NULL);
    ml_tensor *fid = rn(ML_F32, SH(2));
    expect_error("embedding float ids", ml_embedding(w, fid), "int32 or int64", "float32");
    ml_tensor *w1 = rn(ML_F64, SH(6));
    expect_error("embedding 1-D weight", ml_embedding(w1, neg), "[6]", NULL);
    ml_release(bad); ml_release(neg); ml_release(fid); ml_release(w1); ml_release(w);
}

/* ---- cat / stack -------------------------------------------------------- */

typedef struct { int n, dim; bool stack; bool transpose_first; } cat_cfg;

static ml_tensor *f_cat(ml_tensor **x, void *ctx) {
    cat_cfg *c = ctx;
    ml_tensor *ts[16];
    for (int i = 0; i < c->n; i++) ts[i] = i == 0 && c->transpose_first ? ml_transpose(x[0], 0, 1) : ml_retain(x[i]);
    ml_tensor *y = c->stack ? ml_stack(c->n, ts, c->dim) : ml_cat(c->n, ts, c->dim);
    for (int i = 0; i < c->n; i++) ml_release(ts[i]);
    return y;
}

static void test_cat_stack(void) {
    ml_tensor *a = rn(ML_F32, SH(2, 3)), *b = rn(ML_F32, SH(2, 1)), *bt = rn(ML_F32, SH(4, 2));
    ml_tensor *c = ml_transpose(bt, 0, 1);   /* [2, 4], non-contiguous */
    ml_tensor *ts[3] = {a, b, c};
    ml_tensor *y = ml_cat(3, ts, -1);
    CHECK(y && y->shape[0] == 2 && y->shape[1] == 8, "cat shape");
    double *va = ml_to_doubles(a), *vb = ml_to_doubles(b), *vc = ml_to_doubles(c), ref[16];
    for (int r = 0; r < 2; r++) {
        for (int j = 0; j < 3; j++) ref[r * 8 + j] = va[r * 3 + j];
        ref[r * 8 + 3] = vb[r];
        for (int j = 0; j < 4; j++) ref[r * 8 + 4 + j] = vc[r * 4 + j];
    }
    CHECK(y && max_diff(y, ref) == 0, "cat values along the last dim, mixed contiguity");
    ml_release(y);
    ml_tensor *pair[2] = {a, a};
    y = ml_stack(2, pair, 1);
    CHECK(y && y->ndim == 3 && y->shape[0] == 2 && y->shape[1] == 2 && y->shape[2] == 3, "stack shape");
    double ref2[12];
    for (int r = 0; r < 2; r++) for (int k = 0; k < 2; k++) for (int j = 0; j < 3; j++) ref2[(r * 2 + k) * 3 + j] = va[r * 3 + j];
    CHECK(y && max_diff(y, ref2) == 0, "stack values");
    ml_release(y);
    ml_tensor *ii = ints(ML_I64, (double[]){1, 2}, SH(2)), *ij = ints(ML_I64, (double[]){3}, SH(1));
    ml_tensor *iv[2] = {ii, ij};
    y = ml_cat(2, iv, 0);
    CHECK(y && y->dtype == ML_I64 && max_diff(y, (double[]){1, 2, 3}) == 0, "cat of int64 tensors");
    ml_release(y);
    free(va); free(vb); free(vc);

    ml_tensor *x[12];
    for (int i = 0; i < 12; i++) x[i] = rn(ML_F64, SH(2, 3));
    cat_cfg c0 = {3, 0, false, false}, c1 = {3, 1, false, true}, s0 = {3, 0, true, false}, s2 = {3, -1, true, false};
    cat_cfg many = {11, 1, false, false}, many_stack = {10, 0, true, false};
    gradcheck("grad cat dim 0", f_cat, 3, x, 7, &c0);
    ml_tensor *xt[3] = {rn(ML_F64, SH(3, 2)), x[1], x[2]};
    gradcheck("grad cat dim 1 with a transposed input", f_cat, 3, xt, 7, &c1);
    gradcheck("grad stack dim 0", f_cat, 3, x, 7, &s0);
    gradcheck("grad stack new last dim", f_cat, 3, x, 5, &s2);
    gradcheck("grad cat of 11 tensors (grouped nodes)", f_cat, 11, x, 0x7ff, &many);
    gradcheck("grad stack of 10 tensors", f_cat, 10, x, 0x3ff, &many_stack);

    ml_tensor *bad[2] = {a, bt};
    expect_error("cat shape mismatch", ml_cat(2, bad, 1), "[4, 2]", "[2, 3]");
    expect_error("stack shape mismatch", ml_stack(2, bad, 0), "[4, 2]", "[2, 3]");
    ml_tensor *ad = rn(ML_F64, SH(2, 3)), *mixed[2] = {a, ad};
    expect_error("cat dtype mismatch", ml_cat(2, mixed, 0), "float64", "float32");
    expect_error("cat dim out of range", ml_cat(2, pair, 2), "dimension 2", NULL);
    expect_error("cat of nothing", ml_cat(0, pair, 0), "at least one", NULL);
    for (int i = 0; i < 12; i++) ml_release(x[i]);
    ml_release(xt[0]); ml_release(a); ml_release(b); ml_release(bt); ml_release(c); ml_release(ad);
    ml_release(ii); ml_release(ij);
}

/* ---- gather / index_select ---------------------------------------------- */

static ml_tensor *g_index;

static ml_tensor *f_gather(ml_tensor **x, void *ctx) { return ml_gather(x[0], *(int *)ctx, g_index); }
static ml_tensor *f_index_select(ml_tensor **x, void *ctx) {
    ml_tensor *in = ml_transpose(x[0], 0, 1);   /* a strided input */
    ml_tensor *y = ml_index_select(in, *(int *)ctx, g_index);
    ml_release(in);
    return y;
}

static void test_gather_index_select(void) {
    ml_tensor *x = rn(ML_F32, SH(3, 4));
    double *v = ml_to_doubles(x);
    ml_tensor *i0 = ints(ML_I64, (double[]){2, 0, 1, 1, 0, 0}, SH(2, 3));
    ml_tensor *y = ml_gather(x, 0, i0);
    int idx0[2][3] = {{2, 0, 1}, {1, 0, 0}};
    double ref[6];
    for (int r = 0; r < 2; r++) for (int j = 0; j < 3; j++) ref[r * 3 + j] = v[idx0[r][j] * 4 + j];
    CHECK(y && y->shape[0] == 2 && y->shape[1] == 3 && max_diff(y, ref) == 0, "gather dim 0 (smaller index)");
    ml_release(y);
    ml_tensor *i1 = ints(ML_I32, (double[]){3, 3, 0, 1, 2, 0}, SH(3, 2));
    y = ml_gather(x, 1, i1);
    double ref1[6] = {v[3], v[3], v[4], v[5], v[10], v[8]};
    CHECK(y && max_diff(y, ref1) == 0, "gather dim 1 (int32 index)");
    ml_release(y);
    ml_tensor *sel = ints(ML_I64, (double[]){2, 2, 0}, SH(3));
    y = ml_index_select(x, 0, sel);
    double ref2[12];
    for (int j = 0; j < 4; j++) { ref2[j] = v[8 + j]; ref2[4 + j] = v[8 + j]; ref2[8 + j] = v[j]; }
    CHECK(y && y->shape[0] == 3 && max_diff(y, ref2) == 0, "index_select dim 0");
    ml_release(y);
    y = ml_index_select(x, -1, sel);
    double ref3[9];
    for (int r = 0; r < 3; r++) { ref3[r * 3] = v[r * 4 + 2]; ref3[r * 3 + 1] = v[r * 4 + 2]; ref3[r * 3 + 2] = v[r * 4]; }
    CHECK(y && y->shape[1] == 3 && max_diff(y, ref3) == 0, "index_select last dim");
    ml_release(y);
    ml_tensor *xi = ints(ML_I64, (double[]){10, 20, 30}, SH(3));
    y = ml_index_select(xi, 0, sel);
    CHECK(y && y->dtype == ML_I64 && max_diff(y, (double[]){30, 30, 10}) == 0, "index_select of int64 values");
    ml_release(y);
    free(v);

    ml_tensor *xd = rn(ML_F64, SH(3, 4));
    int d0 = 0, d1 = 1;
    g_index = i0;
    gradcheck("grad gather dim 0 (repeated indices)", f_gather, 1, &xd, 1, &d0);
    g_index = i1;
    gradcheck("grad gather dim 1", f_gather, 1, &xd, 1, &d1);
    g_index = sel;
    ml_tensor *xt = rn(ML_F64, SH(4, 3));
    gradcheck("grad index_select dim 0 of a strided input (repeats)", f_index_select, 1, &xt, 1, &d0);
    gradcheck("grad index_select dim 1 of a strided input", f_index_select, 1, &xt, 1, &d1);

    ml_tensor *oob = ints(ML_I64, (double[]){0, 4}, SH(1, 2));
    expect_error("gather index out of range", ml_gather(x, 0, oob), "index 4", "size 3");
    ml_tensor *big = ints(ML_I64, (double[]){0, 0, 0, 0, 0, 0, 0, 0}, SH(4, 2));
    expect_error("gather index larger than the input", ml_gather(x, 1, big), "[4, 2]", "[3, 4]");
    ml_tensor *oob1 = ints(ML_I32, (double[]){5}, SH(1));
    expect_error("index_select out of range", ml_index_select(x, 0, oob1), "index 5", "size 3");
    expect_error("index_select 2-D index", ml_index_select(x, 0, i0), "1-D", "[2, 3]");
    ml_tensor *fi = rn(ML_F32, SH(2));
    expect_error("index_select float index", ml_index_select(x, 0, fi), "int32 or int64", NULL);
    ml_release(x); ml_release(i0); ml_release(i1); ml_release(sel); ml_release(xi); ml_release(xd); ml_release(xt);
    ml_release(oob); ml_release(big); ml_release(oob1); ml_release(fi);
}

/* ---- index_base ----------------------------------------------------------- */

typedef ml_tensor *(*based_op)(ml_tensor *x, int dim, ml_tensor *index, int64_t index_base);

/* The gradient of sum(op(x, dim, index, base) * w) with respect to x, as
 * doubles (NULL on failure); x's .grad is cleared afterwards. */
static double *grad_of(based_op op, ml_tensor *x, int dim, ml_tensor *index, int64_t base, ml_tensor *w) {
    ml_tensor *y = op(x, dim, index, base);
    ml_tensor *p = y ? ml_mul(y, w) : NULL;
    ml_tensor *s = p ? ml_sum(p, 0, NULL, false) : NULL;
    double *g = s && ml_backward(s, NULL, false) == 0 && x->grad ? ml_to_doubles(x->grad) : NULL;
    ml_release(y); ml_release(p); ml_release(s);
    ml_release(x->grad);
    x->grad = NULL;
    return g;
}

/* The index values of i0 plus `shift`, in dtype dt and i0's shape. */
static ml_tensor *shifted(ml_tensor *i0, double shift, ml_dtype dt) {
    double *v = ml_to_doubles(i0);
    for (int64_t k = 0; v && k < ml_numel(i0); k++) v[k] += shift;
    ml_tensor *t = v ? ml_from_doubles(v, i0->ndim, i0->shape, dt) : NULL;
    free(v);
    return t;
}

/* One based op against its base-0 form: values equal, gradients equal bit
 * for bit (the kernels sum in one order whatever the base). */
static void same_as_base0(const char *what, based_op op, ml_tensor *x, int dim, ml_tensor *i0, int64_t base,
                          ml_dtype dt) {
    ml_tensor *ib = shifted(i0, (double)base, dt);
    ml_tensor *y0 = op(x, dim, i0, 0), *yb = ib ? op(x, dim, ib, base) : NULL;
    double *v0 = y0 ? ml_to_doubles(y0) : NULL;
    CHECK(v0 && yb && ml_same_shape(y0, yb) && max_diff(yb, v0) == 0, "%s: base %lld (%s) selects what base 0 does: %s",
          what, (long long)base, ml_dtype_name(dt), ml_last_error());
    ml_tensor *w = y0 ? ml_randn(y0->ndim, y0->shape, ML_F64, ml_cpu(), NULL) : NULL;
    double *g0 = w ? grad_of(op, x, dim, i0, 0, w) : NULL, *gb = w ? grad_of(op, x, dim, ib, base, w) : NULL;
    bool same = g0 && gb;
    for (int64_t k = 0; same && k < ml_numel(x); k++) same = g0[k] == gb[k];
    CHECK(same, "%s: the gradient through base %lld equals base 0's: %s", what, (long long)base, ml_last_error());
    free(v0); free(g0); free(gb);
    ml_release(ib); ml_release(y0); ml_release(yb); ml_release(w);
}

/* Calls of kernel `name` and of all kernels in a profile. */
static long calls_of(const ml_profile_entry *e, int n, const char *name, long *total) {
    long c = 0;
    *total = 0;
    for (int k = 0; k < n; k++) {
        *total += e[k].calls;
        if (!strcmp(e[k].name, name)) c += e[k].calls;
    }
    return c;
}

static void test_index_base(void) {
    ml_tensor *x = rn(ML_F64, SH(3, 4));
    x->requires_grad = true;
    ml_tensor *g0 = ints(ML_I64, (double[]){2, 0, 1, 1, 0, 0, 2, 2}, SH(2, 4));    /* dim 0, repeats */
    ml_tensor *g1 = ints(ML_I64, (double[]){3, 3, 0, 1, 2, 0}, SH(3, 2));          /* dim 1, narrower */
    ml_tensor *s0 = ints(ML_I64, (double[]){2, 2, 0}, SH(3));
    ml_tensor *s1 = ints(ML_I64, (double[]){3, 1, 1, 0, 3}, SH(5));
    int64_t bases[3] = {1, -1, 1000};
    for (int b = 0; b < 3; b++)
        for (int it = 0; it < 2; it++) {
            ml_dtype dt = it ? ML_I32 : ML_I64;
            same_as_base0("gather_ex dim 0", ml_gather_ex, x, 0, g0, bases[b], dt);
            same_as_base0("gather_ex dim 1", ml_gather_ex, x, 1, g1, bases[b], dt);
            same_as_base0("index_select_ex dim 0", ml_index_select_ex, x, 0, s0, bases[b], dt);
            same_as_base0("index_select_ex dim 1", ml_index_select_ex, x, 1, s1, bases[b], dt);
        }

    /* argmax: the kernel writes the base in. */
    ml_tensor *am0 = ml_argmax(x, 1, false), *am1 = ml_argmax_ex(x, 1, false, 1);
    ml_tensor *amk = ml_argmax_ex(x, 0, true, 1), *amk0 = ml_argmax_ex(x, 0, true, 0);
    ml_tensor *amall = ml_argmax_ex(x, ML_ALL_DIMS, false, 1), *amall0 = ml_argmax(x, ML_ALL_DIMS, false);
    double *v0 = am0 ? ml_to_doubles(am0) : NULL, *vk = amk0 ? ml_to_doubles(amk0) : NULL;
    double *va = amall0 ? ml_to_doubles(amall0) : NULL;
    for (int k = 0; v0 && k < 3; k++) v0[k] += 1;
    for (int k = 0; vk && k < 4; k++) vk[k] += 1;
    CHECK(v0 && am1 && am1->dtype == ML_I64 && max_diff(am1, v0) == 0, "argmax_ex base 1 = argmax + 1 along dim 2");
    CHECK(vk && amk && amk->ndim == 2 && amk->shape[0] == 1 && max_diff(amk, vk) == 0, "argmax_ex base 1, keepdim");
    CHECK(va && amall && amall->ndim == 0 && max_diff(amall, (double[]){va[0] + 1}) == 0,
          "argmax_ex base 1 over all elements");
    free(v0); free(vk); free(va);
    ml_release(am0); ml_release(am1); ml_release(amk); ml_release(amk0); ml_release(amall); ml_release(amall0);

    /* Errors speak in the caller's base: index 0 counted from 1 is before
     * the first element, and the message names position 1 and 1..3. */
    ml_tensor *zero = ints(ML_I64, (double[]){1, 0, 2, 3}, SH(1, 4));
    expect_error("gather_ex base 1, index 0", ml_gather_ex(x, 0, zero, 1), "index 0 (element 2 of the indices)",
                 "for a dim of size 3 (valid: 1..3)");
    expect_error("gather_ex base 0, the same index past the end", ml_gather_ex(x, 0, zero, 0),
                 "index 3 (element 3 of the indices)", "(valid: 0..2)");
    ml_tensor *past = ints(ML_I32, (double[]){4, 5}, SH(2));
    expect_error("index_select_ex base 1, index 5 of 4", ml_index_select_ex(x, 1, past, 1),
                 "index_select: index 5 (element 2 of the indices)", "size 4 (valid: 1..4)");
    ml_tensor *low = ints(ML_I64, (double[]){-1}, SH(1));
    expect_error("index_select_ex base 0, index -1", ml_index_select_ex(x, 1, low, 0), "index -1 (element 0",
                 "(valid: 0..3)");
    expect_error("index_select_ex base -1 accepts -1 but not 3", ml_index_select_ex(x, 1, past, -1), "index 4",
                 "(valid: -1..2)");
    /* Values far from the base must not wrap into the range. */
    int64_t far_v[2] = {INT64_MIN, INT64_MAX};
    ml_tensor *far = ml_empty(1, (int64_t[]){2}, ML_I64, ml_cpu());
    if (far) memcpy(ml_data(far), far_v, sizeof far_v);
    expect_error("index_select_ex base 1, INT64_MIN", ml_index_select_ex(x, 1, far, 1), "element 1 of", "1..4");
    ml_tensor *far1 = far ? ml_narrow(far, 0, 1, 1) : NULL;
    expect_error("index_select_ex base -1, INT64_MAX", ml_index_select_ex(x, 1, far1, -1), "element -1 of",
                 "-1..2");
    expect_error("gather_ex base too large", ml_gather_ex(x, 0, zero, INT64_MAX - 1), "index_base", "too large");
    expect_error("index_select_ex base too large", ml_index_select_ex(x, 0, s0, INT64_MAX - 2), "index_base",
                 "too large");
    expect_error("argmax_ex base too large", ml_argmax_ex(x, 1, false, INT64_MAX - 2), "index_base", "too large");
    ml_tensor *ok_edge = ml_argmax_ex(x, 1, false, INT64_MAX - 4);
    CHECK(ok_edge != NULL, "argmax_ex base INT64_MAX - 4 over 4 positions fits: %s", ml_last_error());
    ml_release(ok_edge);

    /* The backward kernels check their index in the caller's base too. */
    ml_tensor *dx = ml_empty(2, (int64_t[]){3, 4}, ML_F64, ml_cpu());
    ml_tensor *dy = ml_zeros(2, (int64_t[]){1, 4}, ML_F64, ml_cpu());
    int rc = dx && dy ? ML_RUN(ml_cpu(), ml_gather_backward, ML_KT(dx), ML_KT(dy), 0, ML_KT(zero), 1) : 0;
    CHECK(rc < 0 && strstr(ml_last_error(), "index 0 (element 2 of the indices)") &&
              strstr(ml_last_error(), "(valid: 1..3)"),
          "gather backward kernel, base 1: %s", ml_last_error());
    rc = dx && dy ? ML_RUN(ml_cpu(), ml_index_select_backward, ML_KT(dx), ML_KT(dy), 1, ML_KT(past), 1) : 0;
    CHECK(rc < 0 && strstr(ml_last_error(), "index 5 (element 2") && strstr(ml_last_error(), "(valid: 1..4)"),
          "index_select backward kernel, base 1: %s", ml_last_error());

    /* No extra pass: each _ex call from 1 runs exactly its one kernel, and
     * the caller's index is left as it was. */
    ml_tensor *g1b = shifted(g1, 1, ML_I64), *s1b = shifted(s1, 1, ML_I32);
    struct { const char *kernel; int which; } runs[3] = {
        {"ml_gather_forward_cpu", 0}, {"ml_index_select_forward_cpu", 1}, {"ml_max_dim_cpu", 2}};
    for (int r = 0; r < 3; r++) {
        int64_t v_before = g1b ? g1b->storage->version : 0;
        ml_profile_start();
        ml_tensor *y = runs[r].which == 0 ? ml_gather_ex(x, 1, g1b, 1)
                     : runs[r].which == 1 ? ml_index_select_ex(x, 1, s1b, 1)
                                          : ml_argmax_ex(x, 1, false, 1);
        ml_profile_entry *e = NULL;
        int n = 0;
        long total = 0;
        CHECK(ml_profile_stop(&e, &n) == 0 && y, "%s: %s", runs[r].kernel, ml_last_error());
        long c = calls_of(e, n, runs[r].kernel, &total);
        CHECK(c == 1 && total == 1, "base 1 runs %s once and nothing else (%ld of %ld kernel calls)", runs[r].kernel,
              c, total);
        CHECK(!g1b || g1b->storage->version == v_before, "the caller's index is not written");
        free(e);
        ml_release(y);
    }
    CHECK(g1b && max_diff(g1b, (double[]){4, 4, 1, 2, 3, 1}) == 0, "the caller's index values are unchanged");

    ml_release(g1b); ml_release(s1b); ml_release(dx); ml_release(dy); ml_release(far); ml_release(far1);
    ml_release(zero); ml_release(past); ml_release(low);
    ml_release(g0); ml_release(g1); ml_release(s0); ml_release(s1); ml_release(x);
}

/* ---- upsample ----------------------------------------------------------- */

static ml_tensor *f_upsample(ml_tensor **x, void *ctx) {
    int s = *(int *)ctx;
    if (s > 0) return ml_upsample_nearest2d(x[0], s);
    ml_tensor *p = ml_permute(x[0], (int[]){0, 2, 3, 1});   /* NCHW leaf seen as NHWC */
    ml_tensor *y = ml_upsample_nearest2d(p, -s);
    ml_release(p);
    return y;
}

static void test_upsample(void) {
    for (int s = 2; s <= 3; s++) {
        ml_tensor *x = rn(ML_F32, SH(2, 3, 4, 5));
        ml_tensor *y = ml_upsample_nearest2d(x, s);
        CHECK(y && y->shape[1] == 3 * s && y->shape[2] == 4 * s && y->shape[3] == 5, "upsample shape (scale %d)", s);
        double *v = ml_to_doubles(x), *ref = malloc((size_t)(2 * 3 * s * 4 * s * 5) * sizeof *ref);
        for (int n = 0; n < 2; n++)
            for (int h = 0; h < 3 * s; h++)
                for (int w = 0; w < 4 * s; w++)
                    for (int c = 0; c < 5; c++)
                        ref[((n * 3 * s + h) * 4 * s + w) * 5 + c] = v[((n * 3 + h / s) * 4 + w / s) * 5 + c];
        CHECK(y && max_diff(y, ref) == 0, "upsample values (scale %d)", s);
        free(v); free(ref); ml_release(y); ml_release(x);
    }
    ml_tensor *x = rn(ML_F64, SH(2, 3, 2, 4)), *xn = rn(ML_F64, SH(1, 4, 3, 2));
    int s2 = 2, s3 = 3, sp = -2;
    gradcheck("grad upsample x2", f_upsample, 1, &x, 1, &s2);
    gradcheck("grad upsample x3", f_upsample, 1, &x, 1, &s3);
    gradcheck("grad upsample of a permuted input", f_upsample, 1, &xn, 1, &sp);
    ml_tensor *x3 = rn(ML_F32, SH(3, 4, 5));
    expect_error("upsample 3-D input", ml_upsample_nearest2d(x3, 2), "[3, 4, 5]", "NHWC");
    expect_error("upsample scale 0", ml_upsample_nearest2d(x, 0), "scale", NULL);
    ml_release(x); ml_release(xn); ml_release(x3);
}

int main(void) {
    test_embedding();
    test_cat_stack();
    test_gather_index_select();
    test_index_base();
    test_upsample();
    return check_summary();
}
