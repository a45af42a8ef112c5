/* test_adamw_multi.c — the multi-tensor optimizer ops (host/ops_optim.c,
 * kernels/cpu/optim.c): AdamW over a list gives the bits of the
 * one-tensor-at-a-time loop, which still gives the bits of the kernel it
 * replaced; a grad_scale gives the bits of scaling the gradients first;
 * the total norm follows the documented reduction order exactly; and bad
 * lists are refused before anything is written. */
#include "check.h"
#include "ops.h"
#include "tensor.h"
#include "optim.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static ml_tensor *vals(int64_t n, ml_dtype dt, int kind, int k) {
    ml_tensor *t = ml_empty(1, (int64_t[]){n}, dt, ml_cpu());
    for (int64_t i = 0; i < n; i++) {
        double x;
        switch (kind) {
        case 0: x = sin(0.37 * (double)i + 0.1 * k) * 2; break;
        case 1: x = cos(0.11 * (double)i + k) * 1e-2; break;
        case 2: x = sin(0.05 * (double)i) * 1e-3; break;
        default: x = fabs(cos(0.07 * (double)i)) * 1e-5; break;
        }
        ml_store_from_double(ml_data(t), dt, i, x);
    }
    return t;
}

static uint64_t fnv(uint64_t h, const ml_tensor *t) {
    const unsigned char *b = ml_data(t);
    size_t n = (size_t)ml_numel(t) * ml_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

static bool same_bits(const ml_tensor *a, const ml_tensor *b) {
    return a->dtype == b->dtype && ml_numel(a) == ml_numel(b) &&
           memcmp(ml_data(a), ml_data(b), (size_t)ml_numel(a) * ml_dtype_size(a->dtype)) == 0;
}

/* Three steps of each dtype case through ml_adamw_step_, hashed.  The
 * hashes were taken from the one-tensor kernel before the multi-tensor
 * kernels replaced it: the arithmetic and the random bits did not move.
 * The four bf16-sr cases were pinned again when the draws moved to one
 * Philox block per two elements (kernels/bf16_sr.h; test_adamw_sr.c checks
 * that assignment element by element); the f32 and f64 cases are the
 * original hashes. */
static void test_pinned_bits(void) {
    static const struct { ml_dtype p, g, s; uint64_t want; } cases[] = {
        {ML_BF16, ML_BF16, ML_BF16, 0x40f816ee6ea1858full}, {ML_BF16, ML_F32, ML_F32, 0xa4fc030f7ba70cedull},
        {ML_F32, ML_F32, ML_BF16, 0x15590e3f10b39decull},   {ML_BF16, ML_BF16, ML_F32, 0xef4fe17fcceef0e4ull},
        {ML_F32, ML_F32, ML_F32, 0xffa5d74860ec408dull},    {ML_F64, ML_F64, ML_F64, 0xa65905bc8d4747eeull},
    };
    for (int c = 0; c < 6; c++) {
        int64_t n = 1000 + c;
        ml_tensor *p = vals(n, cases[c].p, 0, c), *m = vals(n, cases[c].s, 2, c), *v = vals(n, cases[c].s, 3, c);
        uint64_t off = 77;
        int rc = 0;
        for (int k = 1; k <= 3; k++) {
            ml_tensor *g = vals(n, cases[c].g, 1, k);
            rc |= ml_adamw_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, k + 3, 0x1234, off);
            off += ml_adamw_random_blocks(p, m, v);
            ml_release(g);
        }
        uint64_t h = fnv(fnv(fnv(1469598103934665603ull, p), m), v);
        CHECK(rc == 0 && h == cases[c].want, "case %d (param %s, grad %s, moments %s): bits 0x%016llx, want 0x%016llx%s%s",
              c, ml_dtype_short(cases[c].p), ml_dtype_short(cases[c].g), ml_dtype_short(cases[c].s),
              (unsigned long long)h, (unsigned long long)cases[c].want, rc ? ": " : "", rc ? ml_last_error() : "");
        ml_release(p); ml_release(m); ml_release(v);
    }
}

/* ---- a mixed list -------------------------------------------------------- */

enum { NT = 14 };
/* Sizes around the chunk boundary (65536) and the lane width (256), empty
 * and one-element tensors, and one over a million elements. */
static const int64_t sizes[NT] = {1, 3, 1000, 0, 65536, 65537, 257, (1 << 20) + 7, 5, 255, 131072, 2, 40000, 7};
/* Every dtype combination the CPU takes. */
static const struct { ml_dtype p, g, s; } combos[] = {
    {ML_BF16, ML_BF16, ML_BF16}, {ML_F32, ML_F32, ML_F32}, {ML_BF16, ML_F32, ML_F32}, {ML_F32, ML_F32, ML_BF16},
    {ML_F32, ML_BF16, ML_F32},   {ML_F64, ML_F64, ML_F64}, {ML_BF16, ML_BF16, ML_F32}, {ML_F32, ML_F16, ML_F32},
};
enum { NC = sizeof combos / sizeof combos[0] };

typedef struct { ml_tensor *p[NT], *g[NT], *m[NT], *v[NT]; int64_t step[NT]; } list;

static void make_list(list *l, int shift, int k) {
    for (int t = 0; t < NT; t++) {
        int c = (t + shift) % NC;
        l->p[t] = vals(sizes[t], combos[c].p, 0, t);
        l->g[t] = vals(sizes[t], combos[c].g, 1, t + k);
        l->m[t] = vals(sizes[t], combos[c].s, 2, t);
        l->v[t] = vals(sizes[t], combos[c].s, 3, t);
        l->step[t] = 1 + (t % 3);   /* per-tensor steps: a parameter that skipped a step */
    }
}

static void free_list(list *l) {
    for (int t = 0; t < NT; t++) {
        ml_release(l->p[t]); ml_release(l->g[t]); ml_release(l->m[t]); ml_release(l->v[t]);
    }
}

static bool list_equal(const list *a, const list *b, int *bad) {
    for (int t = 0; t < NT; t++) {
        if (!same_bits(a->p[t], b->p[t]) || !same_bits(a->m[t], b->m[t]) || !same_bits(a->v[t], b->v[t])) {
            *bad = t;
            return false;
        }
    }
    return true;
}

static const ml_adamw_args hp = {1e-3, 0.9, 0.999, 1e-8, 1e-2, 0x5eed, 1000, NULL};

/* Two steps over the list in one call each == the per-tensor loop, for
 * every rotation of the dtype combinations; the blocks used add up. */
static void test_multi_equals_loop(void) {
    for (int shift = 0; shift < NC; shift++) {
        list a, b;
        make_list(&a, shift, 0);
        make_list(&b, shift, 0);
        int rc = 0;
        uint64_t off_loop = hp.offset, off_multi = hp.offset;
        for (int k = 0; k < 2; k++) {
            for (int t = 0; t < NT; t++) {
                rc |= ml_adamw_step_(a.p[t], a.g[t], a.m[t], a.v[t], hp.lr, hp.beta1, hp.beta2, hp.eps,
                                     hp.weight_decay, a.step[t] + k, hp.seed, off_loop);
                off_loop += ml_adamw_random_blocks(a.p[t], a.m[t], a.v[t]);
            }
            ml_adamw_args h = hp;
            h.offset = off_multi;
            int64_t steps[NT];
            for (int t = 0; t < NT; t++) steps[t] = b.step[t] + k;
            uint64_t used = 0;
            rc |= ml_adamw_multi_(NT, b.p, b.g, b.m, b.v, steps, &h, &used);
            off_multi += used;
        }
        int bad = -1;
        CHECK(rc == 0, "steps ran: %s", ml_last_error());
        CHECK(list_equal(&a, &b, &bad), "rotation %d: multi-tensor step differs from the loop at tensor %d", shift, bad);
        CHECK(off_loop == off_multi, "rotation %d: blocks used %llu, the loop's %llu", shift,
              (unsigned long long)(off_multi - hp.offset), (unsigned long long)(off_loop - hp.offset));
        free_list(&a);
        free_list(&b);
    }
}

/* A grad_scale gives the bits of scaling the gradients in place first
 * (bf16 and f16 gradients rounded to their dtype), and with scale 1 the
 * bits of no scale at all. */
static void test_grad_scale(void) {
    const float scales[3] = {0.3712f, 1.0f, 1e-3f};
    for (int si = 0; si < 3; si++) {
        for (int shift = 0; shift < NC; shift += 3) {
            list a, b;
            make_list(&a, shift, 1);
            make_list(&b, shift, 1);
            ml_tensor *s = ml_full(0, NULL, scales[si], ML_F32, ml_cpu());
            int rc = ml_scale_multi_(NT, a.g, s);
            rc |= ml_adamw_multi_(NT, a.p, a.g, a.m, a.v, a.step, &hp, NULL);
            ml_adamw_args h = hp;
            h.grad_scale = s;
            rc |= ml_adamw_multi_(NT, b.p, b.g, b.m, b.v, b.step, &h, NULL);
            int bad = -1;
            CHECK(rc == 0, "scaled steps ran: %s", ml_last_error());
            CHECK(list_equal(&a, &b, &bad), "scale %g rotation %d: grad_scale differs from scaling first at tensor %d",
                  (double)scales[si], shift, bad);
            ml_release(s);
            free_list(&a);
            free_list(&b);
        }
    }
}

/* scale_multi_ on each dtype: the product in the tensor's arithmetic. */
static void test_scale_values(void) {
    const float s = 0.3712f;
    ml_tensor *x[4] = {vals(300, ML_F32, 0, 0), vals(300, ML_F64, 0, 0), vals(300, ML_BF16, 0, 0), vals(300, ML_F16, 0, 0)};
    ml_tensor *ref[4] = {vals(300, ML_F32, 0, 0), vals(300, ML_F64, 0, 0), vals(300, ML_BF16, 0, 0), vals(300, ML_F16, 0, 0)};
    ml_tensor *st = ml_full(0, NULL, s, ML_F32, ml_cpu());
    CHECK(ml_scale_multi_(4, x, st) == 0, "scale ran: %s", ml_last_error());
    bool ok = true;
    for (int i = 0; i < 300; i++) {
        ok &= ((float *)ml_data(x[0]))[i] == ((float *)ml_data(ref[0]))[i] * s;
        ok &= ((double *)ml_data(x[1]))[i] == ((double *)ml_data(ref[1]))[i] * (double)s;
        ok &= ((uint16_t *)ml_data(x[2]))[i] == ml_f32_to_bf16(ml_bf16_to_f32(((uint16_t *)ml_data(ref[2]))[i]) * s);
        ok &= ((uint16_t *)ml_data(x[3]))[i] == ml_f32_to_f16(ml_f16_to_f32(((uint16_t *)ml_data(ref[3]))[i]) * s);
    }
    CHECK(ok, "scale_multi_: each dtype multiplied in its own arithmetic");
    for (int k = 0; k < 4; k++) { ml_release(x[k]); ml_release(ref[k]); }
    ml_release(st);
}

/* ---- the norm -------------------------------------------------------------- */

/* kernels/optim.h's reduction order, written out independently. */
static double layout_total(int n, ml_tensor **xs, int kind) {
    double final_lanes[ML_OPTIM_LANES] = {0};
    int64_t c = 0;
    for (int t = 0; t < n; t++) {
        int64_t numel = ml_numel(xs[t]);
        for (int64_t start = 0; start < numel; start += ML_OPTIM_CHUNK, c++) {
            double lanes[ML_OPTIM_LANES] = {0};
            for (int64_t i = start; i < numel && i < start + ML_OPTIM_CHUNK; i++) {
                double x = ml_load_as_double(ml_data(xs[t]), xs[t]->dtype, i);
                double term = kind == 2 ? x * x : kind == 1 ? fabs(x) : pow(fabs(x), 3.0);
                int j = (int)((i - start) % ML_OPTIM_LANES);
                lanes[j] = kind == 1 ? (lanes[j] != lanes[j] || lanes[j] > term ? lanes[j] : term) : lanes[j] + term;
            }
            for (int s = ML_OPTIM_LANES / 2; s; s /= 2)
                for (int j = 0; j < s; j++)
                    lanes[j] = kind == 1 ? fmax(lanes[j], lanes[j + s]) : lanes[j] + lanes[j + s];
            int j = (int)(c % ML_OPTIM_LANES);
            final_lanes[j] = kind == 1 ? fmax(final_lanes[j], lanes[0]) : final_lanes[j] + lanes[0];
        }
    }
    for (int s = ML_OPTIM_LANES / 2; s; s /= 2)
        for (int j = 0; j < s; j++)
            final_lanes[j] = kind == 1 ? fmax(final_lanes[j], final_lanes[j + s]) : final_lanes[j] + final_lanes[j + s];
    return final_lanes[0];
}

static float item_f(const ml_tensor *t) { return *(const float *)ml_data(t); }

static void test_norm(void) {
    static const ml_dtype dts[4] = {ML_F32, ML_BF16, ML_F16, ML_F64};
    ml_tensor *xs[NT];
    long double exact = 0;
    for (int t = 0; t < NT; t++) {
        xs[t] = vals(sizes[t], dts[t % 4], 1, t);
        for (int64_t i = 0; i < sizes[t]; i++) {
            long double x = ml_load_as_double(ml_data(xs[t]), xs[t]->dtype, i);
            exact += x * x;
        }
    }
    ml_tensor *norm, *coef;
    CHECK(ml_grad_norm_multi(NT, xs, 2, 1.0, &norm, &coef) == 0, "norm ran: %s", ml_last_error());
    double total = layout_total(NT, xs, 2);
    CHECK(item_f(norm) == (float)sqrt(total), "2-norm follows the documented order bit for bit: %.9g vs %.9g",
          (double)item_f(norm), (double)(float)sqrt(total));
    CHECK_NEAR(item_f(norm), sqrtl(exact), 1e-6 * sqrtl(exact), "2-norm against the exact sum");
    float want_coef = 1.0f / (item_f(norm) + 1e-6f);
    CHECK(item_f(coef) == (want_coef < 1 ? want_coef : 1.0f), "coefficient max_norm / (norm + 1e-6) in f32: %.9g",
          (double)item_f(coef));
    CHECK(norm->ndim == 0 && norm->dtype == ML_F32, "a 0-dim f32 norm");
    ml_release(norm); ml_release(coef);

    CHECK(ml_grad_norm_multi(NT, xs, INFINITY, 1e9, &norm, &coef) == 0, "inf norm ran: %s", ml_last_error());
    CHECK(item_f(norm) == (float)layout_total(NT, xs, 1), "inf-norm is the largest |x|");
    CHECK(item_f(coef) == 1.0f, "a large max_norm clips nothing");
    ml_release(norm); ml_release(coef);

    CHECK(ml_grad_norm_multi(NT, xs, 3, 1.0, &norm, &coef) == 0, "3-norm ran: %s", ml_last_error());
    CHECK(item_f(norm) == (float)pow(layout_total(NT, xs, 3), 1.0 / 3), "3-norm follows the documented order");
    ml_release(norm); ml_release(coef);

    /* non-finite gradients: NaN clips nothing, inf zeroes the step */
    ml_tensor *bad = vals(10, ML_F32, 1, 0);
    ((float *)ml_data(bad))[3] = NAN;
    ml_tensor *l2[2] = {xs[2], bad};
    CHECK(ml_grad_norm_multi(2, l2, 2, 1.0, &norm, &coef) == 0 && isnan(item_f(norm)) && item_f(coef) == 1.0f,
          "a NaN gradient: NaN norm, coefficient 1");
    ml_release(norm); ml_release(coef);
    CHECK(ml_grad_norm_multi(2, l2, INFINITY, 1.0, &norm, &coef) == 0 && isnan(item_f(norm)),
          "the inf-norm keeps the NaN (got %g)", (double)item_f(norm));
    ml_release(norm); ml_release(coef);
    ((float *)ml_data(bad))[3] = INFINITY;
    CHECK(ml_grad_norm_multi(2, l2, 2, 1.0, &norm, &coef) == 0 && isinf(item_f(norm)) && item_f(coef) == 0.0f,
          "an infinite gradient: infinite norm, coefficient 0");
    ml_release(norm); ml_release(coef);
    ml_release(bad);

    ml_tensor *empty[2] = {xs[3], xs[3]};
    CHECK(ml_grad_norm_multi(2, empty, 2, 1.0, &norm, &coef) == 0 && item_f(norm) == 0 && item_f(coef) == 1,
          "empty tensors: norm 0, coefficient 1");
    ml_release(norm); ml_release(coef);
    for (int t = 0; t < NT; t++) ml_release(xs[t]);
}

/* ---- errors ---------------------------------------------------------------- */

static bool has(const char *s) { return strstr(ml_last_error(), s) != NULL; }

static ml_tensor *z(int64_t n, ml_dtype dt) { return ml_zeros(1, (int64_t[]){n}, dt, ml_cpu()); }

static void test_errors(void) {
    list l;
    make_list(&l, 1, 0);   /* tensor 1 is f32 throughout; tensor 2 has 3 elements */
    uint64_t hash0 = fnv(fnv(1469598103934665603ull, l.p[0]), l.m[0]);
    int64_t ver0 = l.p[0]->storage->version;

    CHECK(ml_adamw_multi_(0, l.p, l.g, l.m, l.v, l.step, &hp, NULL) < 0 && has("empty"), "empty list: %s",
          ml_last_error());
    ml_tensor *wrong = z(4, ML_F32), *g1 = l.g[1];
    l.g[1] = wrong;
    CHECK(ml_adamw_multi_(NT, l.p, l.g, l.m, l.v, l.step, &hp, NULL) < 0 && has("parameter 2: gradient") &&
          has("[4]") && has("[3]"), "shape mismatch names the parameter and both shapes: %s", ml_last_error());
    l.g[1] = g1;
    ml_release(wrong);

    /* memory written twice: the same parameter listed twice, shared
     * moments, a gradient that is another parameter */
    ml_tensor *pa = z(8, ML_F32), *pb = z(8, ML_F32), *ga = z(8, ML_F32), *gb = z(8, ML_F32);
    ml_tensor *ma = z(8, ML_F32), *mb = z(8, ML_F32), *va = z(8, ML_F32), *vb = z(8, ML_F32);
    int64_t st2[2] = {1, 1};
    ml_tensor *dp[2] = {pa, pa}, *dg[2] = {ga, gb}, *dm[2] = {ma, mb}, *dv[2] = {va, vb};
    CHECK(ml_adamw_multi_(2, dp, dg, dm, dv, st2, &hp, NULL) < 0 && has("parameter 2's param shares memory with "
          "parameter 1's param"), "a parameter listed twice: %s", ml_last_error());
    dp[1] = pb;
    dm[1] = ma;
    CHECK(ml_adamw_multi_(2, dp, dg, dm, dv, st2, &hp, NULL) < 0 && has("exp_avg shares memory"),
          "moments shared between parameters: %s", ml_last_error());
    dm[1] = mb;
    dg[0] = pb;
    CHECK(ml_adamw_multi_(2, dp, dg, dm, dv, st2, &hp, NULL) < 0 && has("shares memory") && has("gradient"),
          "a gradient that is another parameter: %s", ml_last_error());
    dg[0] = ga;
    dg[1] = ga;
    CHECK(ml_adamw_multi_(2, dp, dg, dm, dv, st2, &hp, NULL) == 0, "two parameters may read one gradient: %s",
          ml_last_error());

    int64_t steps[NT];
    memcpy(steps, l.step, sizeof steps);
    steps[4] = 0;
    CHECK(ml_adamw_multi_(NT, l.p, l.g, l.m, l.v, steps, &hp, NULL) < 0 && has("parameter 5: step must be >= 1"),
          "step 0: %s", ml_last_error());

    ml_adamw_args h = hp;
    ml_tensor *s64 = ml_full(0, NULL, 0.5, ML_F64, ml_cpu()), *s2 = ml_full(1, (int64_t[]){2}, 0.5, ML_F32, ml_cpu());
    h.grad_scale = s64;
    CHECK(ml_adamw_multi_(NT, l.p, l.g, l.m, l.v, l.step, &h, NULL) < 0 &&
          has("grad_scale must be a one-element float32"), "an f64 grad_scale: %s", ml_last_error());
    h.grad_scale = s2;
    CHECK(ml_adamw_multi_(NT, l.p, l.g, l.m, l.v, l.step, &h, NULL) < 0 && has("2 elements"),
          "a two-element grad_scale: %s", ml_last_error());

    ml_tensor *base = ml_zeros(2, (int64_t[]){3, 4}, ML_F32, ml_cpu());
    ml_tensor *nc = ml_transpose(base, 0, 1);
    ml_tensor *nm = ml_zeros(2, (int64_t[]){4, 3}, ML_F32, ml_cpu()), *nv = ml_zeros(2, (int64_t[]){4, 3}, ML_F32, ml_cpu());
    ml_tensor *ng = ml_zeros(2, (int64_t[]){4, 3}, ML_F32, ml_cpu());
    int64_t one = 1;
    CHECK(ml_adamw_multi_(1, &nc, &ng, &nm, &nv, &one, &hp, NULL) < 0 && has("param must be contiguous"),
          "a non-contiguous parameter: %s", ml_last_error());

    ml_tensor *p16 = z(4, ML_F16), *pbf = z(4, ML_BF16), *g16 = z(4, ML_F16), *mbf = z(4, ML_BF16), *vbf = z(4, ML_BF16);
    CHECK(ml_adamw_multi_(1, &p16, &g16, &mbf, &vbf, &one, &hp, NULL) < 0 && has("f16 parameters"), "f16 params: %s",
          ml_last_error());
    CHECK(ml_adamw_multi_(1, &pbf, &g16, &mbf, &vbf, &one, &hp, NULL) < 0 && has("unsupported dtypes"),
          "an f16 grad for a bf16-sr step on the CPU: %s", ml_last_error());

    CHECK(fnv(fnv(1469598103934665603ull, l.p[0]), l.m[0]) == hash0 && l.p[0]->storage->version == ver0,
          "the failed calls wrote nothing and bumped no version");

    ml_tensor *norm = NULL, *coef = NULL;
    CHECK(ml_grad_norm_multi(0, l.g, 2, 1, &norm, &coef) < 0 && has("empty") && !norm && !coef, "empty norm list");
    CHECK(ml_grad_norm_multi(NT, l.g, 0, 1, &norm, &coef) < 0 && has("norm_type must be > 0"), "norm_type 0: %s",
          ml_last_error());
    CHECK(ml_grad_norm_multi(NT, l.g, NAN, 1, &norm, &coef) < 0 && has("norm_type"), "norm_type NaN");
    CHECK(ml_grad_norm_multi(NT, l.g, 2, -1, &norm, &coef) < 0 && has("max_norm must be >= 0"), "max_norm < 0: %s",
          ml_last_error());
    ml_tensor *ints = z(4, ML_I64);
    ml_tensor *mixed[2] = {l.g[0], ints};
    CHECK(ml_grad_norm_multi(2, mixed, 2, 1, &norm, &coef) < 0 && has("tensor 2: dtype int64 is not a floating type"),
          "an integer tensor: %s", ml_last_error());
    ml_tensor *twice[2] = {l.g[0], l.g[0]};
    ml_tensor *half = ml_full(0, NULL, 0.5, ML_F32, ml_cpu());
    CHECK(ml_scale_multi_(2, twice, half) < 0 && has("tensor 2 shares memory with tensor 1"),
          "scaling a tensor twice: %s", ml_last_error());
    CHECK(ml_scale_multi_(1, &nc, half) < 0 && has("contiguous"), "scaling a non-contiguous tensor: %s", ml_last_error());
    CHECK(ml_scale_multi_(1, &l.g[0], s64) < 0 && has("scale must be a one-element float32"), "an f64 scale: %s",
          ml_last_error());

    ml_tensor *all[] = {pa, pb, ga, gb, ma, mb, va, vb, s64, s2, base, nc, nm, nv, ng, p16, pbf, g16, mbf, vbf, ints, half};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) ml_release(all[k]);
    free_list(&l);
}

int main(void) {
    test_pinned_bits();
    test_multi_equals_loop();
    test_grad_scale();
    test_scale_values();
    test_norm();
    test_errors();
    return check_summary();
}
