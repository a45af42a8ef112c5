/* test_adamw_sr.c — the bf16-sr AdamW step: the f32 step keeps its bits,
 * the bf16 step with stochastic rounding is unbiased where round-to-nearest
 * loses tiny updates, and its random bits depend only on (seed, offset). */
#include "check.h"
#include "ops.h"
#include "tensor.h"
#include "bf16_sr.h"
#include <stdlib.h>
#include <string.h>

static ml_tensor *filled(int64_t n, ml_dtype dt, double x) {
    return ml_full(1, (int64_t[]){n}, x, dt, ml_cpu());
}

static void test_rounding_rule(void) {
    float one_q = 1.0f + 0.25f * 0.0078125f;   /* a quarter of bf16's ulp above 1.0 */
    CHECK(ml_f32_to_bf16_sr(one_q, 0) == 0x3f80, "sr: lane 0 truncates");
    CHECK(ml_f32_to_bf16_sr(one_q, 0xbfffffffu) == 0x3f80, "sr: just under 3/4 of the lanes keep the floor");
    CHECK(ml_f32_to_bf16_sr(one_q, 0xc0000000u) == 0x3f81, "sr: the top quarter of the lanes rounds up");
    CHECK(ml_f32_to_bf16_sr(-one_q, 0xc0000000u) == 0xbf81, "sr: negative values round their magnitude");
    CHECK(ml_f32_to_bf16_sr(1.0f, 0xffffffffu) == 0x3f80, "sr: a bf16 value is kept whatever the lane");
    CHECK(ml_f32_to_bf16_sr(INFINITY, 0xffffffffu) == 0x7f80, "sr: +inf stays +inf");
    CHECK(ml_f32_to_bf16_sr(-INFINITY, 0xffffffffu) == 0xff80, "sr: -inf stays -inf");
    uint32_t snan = 0x7f800001u;
    float f;
    memcpy(&f, &snan, 4);
    uint16_t r = ml_f32_to_bf16_sr(f, 0xffffffffu);
    CHECK((r & 0x7f80) == 0x7f80 && (r & 0x7f) != 0, "sr: a NaN stays NaN (got 0x%04x)", r);
}

/* The f32 step is today's, bit for bit, whatever seed/offset say (these
 * bits come from the kernel before the bf16-sr step existed). */
static void test_f32_unchanged(void) {
    static const uint32_t want[3][6] = {
        {0x3f7fff50u, 0xbf400087u, 0x404fffdcu, 0x3a8220f4u, 0xc0200019u, 0xb6e5bf55u},
        {0x3ba1e23du, 0x3b8bf062u, 0x3b6bfd10u, 0x3b40195cu, 0x3b1435a8u, 0x3ad0a400u},
        {0x36b4c39eu, 0x37aa609bu, 0x3841a626u, 0x38adfcfeu, 0x39090af4u, 0x39468ee9u}};
    static const float init[6] = {1.0f, -0.75f, 3.25f, 1e-3f, -2.5f, 0.0f};
    for (uint64_t seed = 0; seed < 2; seed++) {
        ml_tensor *p = filled(6, ML_F32, 0), *m = filled(6, ML_F32, 0), *v = filled(6, ML_F32, 0);
        memcpy(ml_data(p), init, sizeof init);
        int rc = 0;
        for (int k = 0; k < 4; k++) {
            ml_tensor *g = filled(6, ML_F32, 0);
            float *gg = ml_data(g);
            for (int i = 0; i < 6; i++) gg[i] = (float)((i + 1) * 0.037 * (k % 2 ? -1 : 1) + 0.01 * k);
            rc |= ml_adamw_step_(p, g, m, v, 5e-6, 0.9, 0.999, 1e-8, 1e-2, k + 1, seed * 1234567, seed * 99);
            ml_release(g);
        }
        CHECK(rc == 0, "f32 steps: %s", ml_last_error());
        CHECK(ml_adamw_random_blocks(p, m, v) == 0, "an f32 step draws no random bits");
        ml_tensor *all[3] = {p, m, v};
        for (int t = 0; t < 3; t++)
            CHECK(memcmp(ml_data(all[t]), want[t], sizeof want[t]) == 0, "f32 step bits changed (tensor %d, seed %d)",
                  t, (int)seed);
        ml_release(p); ml_release(m); ml_release(v);
    }
}

/* Weights at 1.0, a constant gradient, lr 5e-6, no decay: the f32 step
 * moves each weight by about -5e-6 a step, 0.0013 of bf16's spacing just
 * below 1.0 (2^-8).  Round to nearest returns 1.0 every time; stochastic
 * rounding must give the f32 drift on average. */
static void drift_case(ml_dtype state_dt, ml_dtype grad_dt) {
    enum { N = 16384, K = 200 };
    const double lr = 5e-6, gval = 0x1p-10;
    ml_tensor *p = filled(N, ML_BF16, 1.0), *m = filled(N, state_dt, 0), *v = filled(N, state_dt, 0);
    ml_tensor *g = filled(N, grad_dt, gval);
    ml_tensor *pr = filled(1, ML_F32, 1.0), *mr = filled(1, ML_F32, 0), *vr = filled(1, ML_F32, 0);
    ml_tensor *gr = filled(1, ML_F32, gval);
    uint64_t offset = 7;
    float rn = 1.0f;    /* what round-to-nearest bf16 weights would hold */
    int rc = 0;
    for (int k = 1; k <= K; k++) {
        rc |= ml_adamw_step_(p, g, m, v, lr, 0.9, 0.999, 1e-8, 0, k, 42, offset);
        offset += ml_adamw_random_blocks(p, m, v);
        float before = *(float *)ml_data(pr);
        rc |= ml_adamw_step_(pr, gr, mr, vr, lr, 0.9, 0.999, 1e-8, 0, k, 0, 0);
        float delta = *(float *)ml_data(pr) - before;
        rn = ml_bf16_to_f32(ml_f32_to_bf16(rn + delta));
    }
    CHECK(rc == 0, "drift steps: %s", ml_last_error());
    double mean = 0;
    const uint16_t *pb = ml_data(p);
    for (int i = 0; i < N; i++) mean += ml_bf16_to_f32(pb[i]);
    mean /= N;
    double ref = *(float *)ml_data(pr) - 1.0, got = mean - 1.0;
    /* Each weight ends on one of the two bf16 values around 1 - 1e-3, with
     * standard deviation under half their spacing: the mean of N has sd
     * under 2^-9 / sqrt(N) = 1.5e-5; allow 5 of them. */
    double tol = 5 * 0x1p-9 / sqrt((double)N);
    printf("drift after %d steps (moments %s, grad %s): f32 %.4g, bf16-sr mean %.4g, bf16 round-to-nearest %.4g\n",
           K, ml_dtype_name(state_dt), ml_dtype_name(grad_dt), ref, got, (double)rn - 1.0);
    CHECK(ref < -9e-4 && ref > -1.1e-3, "f32 reference drift %g is about -lr*K", ref);
    CHECK_NEAR(got, ref, tol, "bf16-sr mean drift vs f32");
    CHECK(rn == 1.0f, "round to nearest loses every update (got %.9g)", (double)rn);
    ml_release(p); ml_release(m); ml_release(v); ml_release(g);
    ml_release(pr); ml_release(mr); ml_release(vr); ml_release(gr);
}

/* One step of a varied case, from fixed inputs. */
static void sr_step(uint64_t seed, uint64_t offset, ml_tensor **out) {
    enum { N = 1024 };
    ml_tensor *p = filled(N, ML_F32, 0), *g = filled(N, ML_F32, 0);
    float *pp = ml_data(p), *gg = ml_data(g);
    for (int i = 0; i < N; i++) {
        pp[i] = (float)sin(i * 0.37) * 2;
        gg[i] = (float)cos(i * 0.11) * 1e-2f;
    }
    ml_tensor *pb = ml_to_dtype(p, ML_BF16), *gb = ml_to_dtype(g, ML_BF16);
    ml_tensor *m = filled(N, ML_BF16, 1e-3), *v = filled(N, ML_BF16, 1e-5);
    CHECK(ml_adamw_step_(pb, gb, m, v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3, seed, offset) == 0, "sr step: %s",
          ml_last_error());
    out[0] = pb; out[1] = m; out[2] = v;
    ml_release(p); ml_release(g); ml_release(gb);
}

static bool same_bits(ml_tensor *a, ml_tensor *b) {
    return memcmp(ml_data(a), ml_data(b), (size_t)ml_numel(a) * 2) == 0;
}

static void test_reproducible(void) {
    ml_tensor *a[3], *b[3], *c[3], *d[3];
    sr_step(5, 100, a);
    sr_step(5, 100, b);
    sr_step(5, 101, c);
    sr_step(6, 100, d);
    for (int t = 0; t < 3; t++) {
        CHECK(same_bits(a[t], b[t]), "same seed and offset give the same bits (tensor %d)", t);
        CHECK(!same_bits(a[t], c[t]), "another offset gives other bits (tensor %d)", t);
        CHECK(!same_bits(a[t], d[t]), "another seed gives other bits (tensor %d)", t);
        ml_release(a[t]); ml_release(b[t]); ml_release(c[t]); ml_release(d[t]);
    }
}

static void test_errors(void) {
    ml_tensor *p16 = filled(4, ML_F16, 1), *g16 = filled(4, ML_F16, 1);
    ml_tensor *pb = filled(4, ML_BF16, 1), *m32 = filled(4, ML_F32, 0), *vb = filled(4, ML_BF16, 0);
    ml_tensor *m16 = filled(4, ML_F16, 0), *gb = filled(4, ML_BF16, 0);
    CHECK(ml_adamw_step_(p16, g16, m16, m16, 1e-3, 0.9, 0.999, 1e-8, 0, 1, 0, 0) < 0 &&
          strstr(ml_last_error(), "f16 parameters"), "f16 params refused: %s", ml_last_error());
    CHECK(ml_adamw_step_(pb, gb, m32, vb, 1e-3, 0.9, 0.999, 1e-8, 0, 1, 0, 0) < 0 &&
          strstr(ml_last_error(), "unsupported dtypes"),
          "moments of two dtypes refused: %s", ml_last_error());
    CHECK(ml_adamw_step_(pb, g16, m32, m32, 1e-3, 0.9, 0.999, 1e-8, 0, 1, 0, 0) < 0,
          "an f16 grad for a bf16 param refused on the CPU");
    ml_release(p16); ml_release(g16); ml_release(pb); ml_release(m32); ml_release(vb); ml_release(m16);
    ml_release(gb);
}

/* Which draw rounds which element: the f32 step's result, rounded with the
 * lane half kernels/bf16_sr.h assigns (block i/2 of (seed, offset); upper
 * half for even i, lower for odd), must be the bf16-sr step's bits, for an
 * odd count (the last block's second half unused) and a nonzero offset. */
static void test_draw_assignment(void) {
    enum { N = 7 };
    const uint64_t seed = 0xabcdef, offset = 5;
    ml_tensor *pf = filled(N, ML_F32, 0), *g = filled(N, ML_F32, 0);
    float *pp = ml_data(pf), *gg = ml_data(g);
    for (int i = 0; i < N; i++) {
        pp[i] = 1.0f + 0.001f * (float)i;
        gg[i] = 0.01f * (float)(i + 1);
    }
    ml_tensor *pb = ml_to_dtype(pf, ML_BF16), *pb_f32 = ml_to_dtype(pb, ML_F32);   /* the bf16 start, in f32 */
    ml_tensor *mf = filled(N, ML_F32, 0), *vf = filled(N, ML_F32, 0), *mb = filled(N, ML_F32, 0),
              *vb = filled(N, ML_F32, 0);
    int rc = ml_adamw_step_(pb_f32, g, mf, vf, 1e-3, 0.9, 0.999, 1e-8, 0, 1, 0, 0);
    rc |= ml_adamw_step_(pb, g, mb, vb, 1e-3, 0.9, 0.999, 1e-8, 0, 1, seed, offset);
    CHECK(rc == 0, "steps: %s", ml_last_error());
    CHECK(ml_adamw_random_blocks(pb, mb, vb) == (N + 1) / 2, "a block per two elements");
    const float *want_f32 = ml_data(pb_f32);
    const uint16_t *got = ml_data(pb);
    for (int i = 0; i < N; i++) {
        uint32_t x[4];
        ml_philox_block(seed, offset, (uint64_t)i / 2, x);
        uint32_t lane = i % 2 ? x[0] << 16 : x[0];
        uint16_t want = ml_f32_to_bf16_sr(want_f32[i], lane);
        CHECK(got[i] == want, "element %d: bits 0x%04x, want 0x%04x (block %d, %s half of lane 0)", i, got[i], want,
              i / 2, i % 2 ? "lower" : "upper");
    }
    ml_release(pf); ml_release(g); ml_release(pb); ml_release(pb_f32);
    ml_release(mf); ml_release(vf); ml_release(mb); ml_release(vb);
}

int main(void) {
    test_rounding_rule();
    test_draw_assignment();
    test_f32_unchanged();
    drift_case(ML_F32, ML_F32);
    drift_case(ML_BF16, ML_BF16);
    test_reproducible();
    test_errors();
    return check_summary();
}
