/* test_random.c — Philox4x32-10 known answers, the stream definition of
 * kernels/philox.h, distribution statistics, reproducibility, randint,
 * in-place fills of strided tensors, and dropout. */
#include "check.h"
#include "ops.h"
#include "philox.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void test_known_answers(void) {
    /* Random123's published known-answer vectors for Philox4x32-10. */
    static const struct { uint32_t ctr[4], key[2], out[4]; } kat[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (int k = 0; k < 3; k++) {
        uint32_t out[4];
        ml_philox4x32_10(kat[k].ctr, kat[k].key, out);
        CHECK(memcmp(out, kat[k].out, sizeof out) == 0, "philox KAT %d: %08x %08x %08x %08x", k,
              out[0], out[1], out[2], out[3]);
    }
}

static void test_stream_definition(void) {
    /* rand: value i = (lane i%4 of block offset + i/4) >> 8, * 2^-24 */
    ml_generator g = {0x123456789abcdefull, 7};
    int64_t n = 10;
    ml_tensor *u = ml_rand(1, &n, ML_F32, ml_cpu(), &g);
    CHECK(g.offset == 7 + 3, "rand of 10 values consumes 3 blocks (offset %llu)", (unsigned long long)g.offset);
    const float *uv = ml_data(u);
    int bad = 0;
    for (int i = 0; i < 10; i++) {
        uint32_t x[4];
        ml_philox_block(0x123456789abcdefull, 7, (uint64_t)(i / 4), x);
        float want = (float)((x[i % 4] >> 8) * (1.0 / 16777216.0));
        if (uv[i] != want) bad++;
    }
    CHECK(!bad, "rand follows the documented stream");
    ml_release(u);
    /* randn: Box-Muller on lane pairs (0,1), (2,3) */
    ml_generator h = {42, 0};
    int64_t m = 6;
    ml_tensor *z = ml_randn(1, &m, ML_F64, ml_cpu(), &h);
    const double *zv = ml_data(z);
    bad = 0;
    for (int b = 0; b < 2; b++) {
        uint32_t x[4];
        ml_philox_block(42, 0, (uint64_t)b, x);
        for (int p = 0; p < 2; p++) {
            double u1 = ((double)x[2 * p] + 1) / 4294967296.0, u2 = x[2 * p + 1] / 4294967296.0;
            double r = sqrt(-2 * log(u1));
            int i = b * 4 + p * 2;
            if (i < 6 && fabs(zv[i] - r * cos(2 * M_PI * u2)) > 1e-15) bad++;
            if (i + 1 < 6 && fabs(zv[i + 1] - r * sin(2 * M_PI * u2)) > 1e-15) bad++;
        }
    }
    CHECK(!bad, "randn follows the documented stream");
    CHECK(h.offset == 2, "randn of 6 values consumes 2 blocks");
    ml_release(z);
    /* one formula for every dtype: f32 values are the f64 values rounded */
    ml_generator a = {5, 0}, b = {5, 0};
    int64_t k = 1001;
    ml_tensor *z32 = ml_randn(1, &k, ML_F32, ml_cpu(), &a), *z64 = ml_randn(1, &k, ML_F64, ml_cpu(), &b);
    bad = 0;
    for (int64_t i = 0; i < k; i++)
        if (((float *)ml_data(z32))[i] != (float)((double *)ml_data(z64))[i]) bad++;
    CHECK(!bad, "randn f32 == (float) randn f64");
    ml_release(z32); ml_release(z64);
    ml_tensor *hb = ml_rand(1, &k, ML_BF16, ml_cpu(), &a), *hf = ml_rand(1, &k, ML_F32, ml_cpu(), &b);
    bad = 0;
    for (int64_t i = 0; i < k; i++)
        if (((uint16_t *)ml_data(hb))[i] != ml_f32_to_bf16(((float *)ml_data(hf))[i])) bad++;
    CHECK(!bad, "rand bf16 == bf16(rand f32)");
    ml_release(hb); ml_release(hf);
}

static void moments(ml_tensor *t, double *mean, double *var) {
    double *v = ml_to_doubles(t);
    int64_t n = ml_numel(t);
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (int64_t i = 0; i < n; i++) s2 += (v[i] - *mean) * (v[i] - *mean);
    *var = s2 / (n - 1);
    free(v);
}

static void test_statistics(void) {
    ml_generator g = {2024, 0};
    int64_t n = 1000000;
    double mean, var;
    ml_tensor *u = ml_rand(1, &n, ML_F32, ml_cpu(), &g);
    moments(u, &mean, &var);
    /* standard errors: mean 2.9e-4, var ~1e-4 */
    CHECK(fabs(mean - 0.5) < 2e-3, "uniform mean %.5f", mean);
    CHECK(fabs(var - 1.0 / 12) < 1e-3, "uniform var %.5f", var);
    double *v = ml_to_doubles(u), lo = 1, hi = 0;
    for (int64_t i = 0; i < n; i++) { if (v[i] < lo) lo = v[i]; if (v[i] > hi) hi = v[i]; }
    CHECK(lo >= 0 && hi < 1 && lo < 1e-4 && hi > 1 - 1e-4, "uniform range [%g, %g]", lo, hi);
    free(v);
    ml_release(u);
    ml_tensor *z = ml_randn(1, &n, ML_F32, ml_cpu(), &g);
    moments(z, &mean, &var);
    CHECK(fabs(mean) < 5e-3, "normal mean %.5f", mean);
    CHECK(fabs(var - 1) < 1e-2, "normal var %.5f", var);
    ml_release(z);
    ml_tensor *t = ml_empty(1, &n, ML_F64, ml_cpu());
    CHECK(ml_normal_(t, 3, 0.5, &g) == 0, "normal_");
    moments(t, &mean, &var);
    CHECK(fabs(mean - 3) < 3e-3 && fabs(var - 0.25) < 3e-3, "normal_(3, 0.5): mean %.5f var %.5f", mean, var);
    CHECK(ml_uniform_(t, -2, 6, &g) == 0, "uniform_");
    moments(t, &mean, &var);
    CHECK(fabs(mean - 2) < 2e-2 && fabs(var - 64.0 / 12) < 3e-2, "uniform_(-2, 6): mean %.5f var %.5f", mean, var);
    CHECK(ml_normal_(t, 0, -1, &g) < 0, "normal_ with std < 0 rejected");
    ml_release(t);
}

static bool same_values(ml_tensor *a, ml_tensor *b) {
    double *x = ml_to_doubles(a), *y = ml_to_doubles(b);
    bool same = ml_numel(a) == ml_numel(b) && memcmp(x, y, (size_t)ml_numel(a) * sizeof *x) == 0;
    free(x); free(y);
    return same;
}

static void test_reproducibility(void) {
    int64_t s[2] = {3, 5};
    ml_generator a = {77, 0}, b = {77, 0}, c = {78, 0};
    ml_tensor *x1 = ml_randn(2, s, ML_F32, ml_cpu(), &a), *y1 = ml_randn(2, s, ML_F32, ml_cpu(), &b);
    CHECK(same_values(x1, y1), "same seed, same numbers");
    ml_tensor *x2 = ml_randn(2, s, ML_F32, ml_cpu(), &a);
    CHECK(!same_values(x1, x2), "the next call continues the stream");
    ml_tensor *z = ml_randn(2, s, ML_F32, ml_cpu(), &c);
    CHECK(!same_values(x1, z), "another seed, other numbers");
    ml_generator d = {77, 1000};
    ml_tensor *w = ml_randn(2, s, ML_F32, ml_cpu(), &d);
    CHECK(!same_values(x1, w), "another offset, another stream");
    ml_manual_seed(9);
    ml_tensor *m1 = ml_rand(2, s, ML_F32, ml_cpu(), NULL);
    ml_manual_seed(9);
    ml_tensor *m2 = ml_rand(2, s, ML_F32, ml_cpu(), NULL);
    CHECK(same_values(m1, m2) && ml_default_generator()->seed == 9, "manual_seed resets the default generator");
    ml_release(x1); ml_release(y1); ml_release(x2); ml_release(z); ml_release(w); ml_release(m1); ml_release(m2);

    /* a strided destination receives the values in logical order */
    ml_generator e = {11, 0}, f = {11, 0};
    ml_tensor *base = ml_zeros(2, (int64_t[]){5, 3}, ML_F32, ml_cpu());
    ml_tensor *tv = ml_transpose(base, 0, 1);                 /* [3,5] view */
    CHECK(ml_normal_(tv, 0, 1, &e) == 0, "normal_ on a transposed view");
    ml_tensor *ref = ml_randn(2, s, ML_F32, ml_cpu(), &f);
    CHECK(same_values(tv, ref), "strided fill matches a contiguous one");
    ml_release(tv); ml_release(base); ml_release(ref);
    /* in-place fills refuse leaves that require grad (grad mode on) */
    ml_tensor *leaf = ml_zeros(1, (int64_t[]){3}, ML_F32, ml_cpu());
    leaf->requires_grad = true;
    CHECK(ml_normal_(leaf, 0, 1, NULL) < 0, "normal_ on a leaf requiring grad rejected");
    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_normal_(leaf, 0, 1, NULL) == 0, "normal_ on a leaf under no_grad");
    ml_set_grad_enabled(prev);
    ml_release(leaf);
}

static void test_randint(void) {
    ml_generator g = {3, 0};
    int64_t n = 100000;
    ml_tensor *t = ml_randint(-3, 7, 1, &n, ML_I64, ml_cpu(), &g);
    CHECK(t && t->dtype == ML_I64 && g.offset == 25000, "randint dtype and blocks");
    int64_t count[10] = {0};
    const int64_t *v = ml_data(t);
    int out_of_range = 0;
    for (int64_t i = 0; i < n; i++) {
        if (v[i] < -3 || v[i] >= 7) out_of_range++;
        else count[v[i] + 3]++;
    }
    CHECK(!out_of_range, "randint in [low, high)");
    int uneven = 0;
    for (int k = 0; k < 10; k++) if (count[k] < 9500 || count[k] > 10500) uneven++;
    CHECK(!uneven, "randint roughly uniform");
    ml_release(t);
    /* a range wider than 2^32 takes two lanes per value */
    ml_generator w = {3, 0};
    int64_t m = 9;
    ml_tensor *big = ml_randint(0, (int64_t)1 << 40, 1, &m, ML_I64, ml_cpu(), &w);
    CHECK(w.offset == 5, "wide randint consumes a block per two values");
    uint32_t x[4];
    ml_philox_block(3, 0, 1, x);
    uint64_t want = ((uint64_t)x[2] | (uint64_t)x[3] << 32) % ((uint64_t)1 << 40);
    CHECK(((int64_t *)ml_data(big))[3] == (int64_t)want, "wide randint value 3 from block 1 lanes 2,3");
    ml_release(big);
    ml_tensor *f = ml_randint(0, 1000, 1, &m, ML_F32, ml_cpu(), &w);
    CHECK(f && f->dtype == ML_F32, "randint into a float tensor");
    ml_release(f);
    CHECK(!ml_randint(5, 5, 1, &m, ML_I64, ml_cpu(), &w), "empty randint range rejected");
    ml_tensor *r32 = ml_randint(0, 1000, 1, &m, ML_I32, ml_cpu(), &w);
    CHECK(r32 && r32->dtype == ML_I32, "randint int32");
    ml_release(r32);
}

static void test_dropout(void) {
    int64_t n = 100000;
    ml_tensor *x = ml_full(1, &n, 1.0, ML_F32, ml_cpu());
    x->requires_grad = true;
    ml_tensor *e = ml_dropout(x, 0.3, false, NULL);
    CHECK(e == x, "dropout in eval returns the input itself");
    ml_release(e);
    ml_generator g = {8, 0};
    ml_tensor *y = ml_dropout(x, 0.3, true, &g);
    double *v = ml_to_doubles(y);
    int64_t zeros = 0, other = 0;
    for (int64_t i = 0; i < n; i++) {
        if (v[i] == 0) zeros++;
        else if (fabs(v[i] - 1 / 0.7) > 1e-6) other++;
    }
    CHECK(fabs(zeros / (double)n - 0.3) < 0.01, "dropout drops a fraction %.4f", zeros / (double)n);
    CHECK(!other, "kept values scaled by 1/(1-p)");
    ml_tensor *s = ml_sum(y, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) == 0, "dropout backward");
    double *gv = ml_to_doubles(x->grad);
    int mismatch = 0;
    for (int64_t i = 0; i < n; i++) if (gv[i] != v[i]) mismatch++;
    CHECK(!mismatch, "dropout gradient is the scaled mask");
    free(v); free(gv);
    ml_release(s); ml_release(y);
    ml_generator g2 = {8, 0};
    ml_tensor *y2 = ml_dropout(x, 0.3, true, &g2);
    ml_generator g3 = {8, 0};
    ml_tensor *u = ml_rand(1, &n, ML_F32, ml_cpu(), &g3);
    double *a = ml_to_doubles(y2), *b = ml_to_doubles(u);
    mismatch = 0;
    for (int64_t i = 0; i < n; i++) if ((a[i] == 0) != (b[i] < 0.3)) mismatch++;
    CHECK(!mismatch, "dropout keeps exactly where the f32 uniform is >= p");
    free(a); free(b);
    ml_release(y2); ml_release(u);
    ml_tensor *z = ml_dropout(x, 1.0, true, &g);
    double zs = 1;
    ml_tensor *zsum = ml_sum(z, 0, NULL, false);
    ml_item(zsum, &zs);
    CHECK(zs == 0, "dropout p=1 gives zeros");
    ml_release(zsum); ml_release(z);
    CHECK(!ml_dropout(x, 1.5, true, &g), "dropout p out of range rejected");
    ml_release(x);
}

int main(void) {
    test_known_answers();
    test_stream_definition();
    test_statistics();
    test_reproducibility();
    test_randint();
    test_dropout();
    return check_summary();
}
