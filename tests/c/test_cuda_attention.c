/* test_cuda_attention.c — the cuDNN fused attention of
 * kernels/cuda/attention_cudnn.h, called directly (the pointer interface,
 * not through the op), against moonlit's CPU kernel in float32 on the same
 * rounded inputs:
 * - forward: out, and the lse statistic itself, which must be what moonlit's
 *   kernels write (natural-log log-sum-exp of the scaled scores);
 * - the lse contract across paths: cuDNN's backward fed moonlit's forward
 *   (out, lse), and moonlit's backward fed cuDNN's forward, give the
 *   reference gradients;
 * - NULL gradients (scratch), q/k/v as views of one packed projection,
 *   causal with Sq != Sk, key and value widths that differ;
 * - the deterministic backward repeats bit for bit, and so does the forward;
 * - the default backward's workspace is far from a score matrix;
 * - what cuDNN must refuse (f32, head width 36, a misaligned pointer, empty
 *   sizes) answers 0 and writes nothing.
 * Without CUDA, without a GPU, or built without the cuDNN frontend headers
 * (every call answers 0), it says so and checks only what still applies. */
#include "check.h"
#include "tensor.h"
#include "device.h"
#include "ops.h"
#include <stdlib.h>
#include <string.h>

#ifdef ML_WITH_CUDA
#include "cuda/runtime.h"
#include "cuda/allocator.h"
#include "cuda/attention_cudnn.h"
#include "attention.h"
#include "dispatch.h"

static const ml_device GPU0 = {ML_CUDA, 0};

/* One attention problem: the same rounded values as f32 on the CPU (the
 * reference) and in the half type on the GPU. */
typedef struct {
    const char *name;
    ml_dtype dt;
    int64_t B, Sq, Sk, H, D, Dv;
    bool causal;
    double scale;
    ml_tensor *q, *k, *v, *g;            /* CPU f32, values representable in dt */
    ml_tensor *qh, *kh, *vh, *gh;        /* the same on the GPU in dt */
    ml_tensor *out, *lse;                /* CPU reference forward */
    ml_tensor *dq, *dk, *dv;             /* CPU reference backward */
} problem;

static ml_tensor *rounded(int64_t B, int64_t S, int64_t H, int64_t W, ml_dtype dt) {
    int64_t shape[4] = {B, S, H, W};
    ml_tensor *x = ml_randn(4, shape, ML_F32, ml_cpu(), NULL);
    ml_tensor *h = x ? ml_to_dtype(x, dt) : NULL;
    ml_tensor *r = h ? ml_to_dtype(h, ML_F32) : NULL;
    ml_release(x);
    ml_release(h);
    return r;
}

static ml_tensor *on_gpu(ml_tensor *t, ml_dtype dt) {
    ml_tensor *h = ml_to_dtype(t, dt);
    ml_tensor *g = h ? ml_to_device(h, GPU0) : NULL;
    ml_release(h);
    return g;
}

static ml_tensor *empty4(int64_t a, int64_t b, int64_t c, int64_t d, ml_dtype dt, ml_device dev) {
    int64_t shape[4] = {a, b, c, d};
    return ml_empty(4, shape, dt, dev);
}

static ml_tensor *empty3(int64_t a, int64_t b, int64_t c, ml_dtype dt, ml_device dev) {
    int64_t shape[3] = {a, b, c};
    return ml_empty(3, shape, dt, dev);
}

static bool make_problem(problem *p) {
    ml_manual_seed(7);
    p->q = rounded(p->B, p->Sq, p->H, p->D, p->dt);
    p->k = rounded(p->B, p->Sk, p->H, p->D, p->dt);
    p->v = rounded(p->B, p->Sk, p->H, p->Dv, p->dt);
    p->g = rounded(p->B, p->Sq, p->H, p->Dv, p->dt);
    if (!p->q || !p->k || !p->v || !p->g) return false;
    p->qh = on_gpu(p->q, p->dt), p->kh = on_gpu(p->k, p->dt), p->vh = on_gpu(p->v, p->dt), p->gh = on_gpu(p->g, p->dt);
    p->out = empty4(p->B, p->Sq, p->H, p->Dv, ML_F32, ml_cpu());
    p->lse = empty3(p->B, p->H, p->Sq, ML_F32, ml_cpu());
    p->dq = empty4(p->B, p->Sq, p->H, p->D, ML_F32, ml_cpu());
    p->dk = empty4(p->B, p->Sk, p->H, p->D, ML_F32, ml_cpu());
    p->dv = empty4(p->B, p->Sk, p->H, p->Dv, ML_F32, ml_cpu());
    if (!p->qh || !p->kh || !p->vh || !p->gh || !p->out || !p->lse || !p->dq || !p->dk || !p->dv) return false;
    if (ml_sdpa_forward_cpu(ML_KT(p->out), ML_KT(p->lse), ML_KT(p->q), ML_KT(p->k), ML_KT(p->v), p->causal,
                            p->scale) < 0)
        return false;
    /* Every half-precision path stores out in the half type, and the
     * backward's rowsum(dout * out) sees the rounded values: the reference
     * gradients are taken from the rounded out too, so that what is left
     * is the GPU's own error (otherwise a peaked softmax at D 160 moves dq
     * by several percent through that rounding alone). */
    ml_tensor *oh = ml_to_dtype(p->out, p->dt);
    int rc = oh ? ml_copy_(p->out, oh) : -1;
    ml_release(oh);
    return rc == 0 &&
           ml_sdpa_backward_cpu(ML_KT(p->dq), ML_KT(p->dk), ML_KT(p->dv), ML_KT(p->g), ML_KT(p->q), ML_KT(p->k),
                                ML_KT(p->v), ML_KT(p->out), ML_KT(p->lse), p->causal, p->scale) == 0;
}

static void free_problem(problem *p) {
    ml_tensor *all[] = {p->q, p->k, p->v, p->g, p->qh, p->kh, p->vh, p->gh, p->out, p->lse, p->dq, p->dk, p->dv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
}

static ml_cudnn_sdpa_shape shape_of(const problem *p) {
    ml_cudnn_sdpa_shape s;
    ml_cudnn_sdpa_shape_contiguous(&s, 0, p->dt, p->B, p->H, p->Sq, p->Sk, p->D, p->Dv, p->causal, p->scale);
    return s;
}

/* Checks got (any device, any float dtype) against the reference want:
 * every element within atol + rtol |want|, where atol is atol_frac times the
 * largest |want| (the magnitudes of out, dq, dk and dv differ by orders
 * with the shape, and sums that cancel carry the error of their terms). */
static void near(const char *what, const problem *p, const ml_tensor *got, const ml_tensor *want, double rtol,
                 double atol_frac) {
    double *a = ml_to_doubles(got), *b = ml_to_doubles(want);
    CHECK(a && b, "%s %s: reading back: %s", p->name, what, ml_last_error());
    if (a && b) {
        int64_t n = ml_numel(want), bad = 0, worst = 0;
        double max_abs = 0, max_excess = -1, max_ref = 0;
        for (int64_t i = 0; i < n; i++) max_ref = fmax(max_ref, fabs(b[i]));
        const double atol = atol_frac * max_ref;
        for (int64_t i = 0; i < n; i++) {
            double d = fabs(a[i] - b[i]), e = d - (atol + rtol * fabs(b[i]));
            if (d > max_abs || d != d) max_abs = d;
            if (e > max_excess || d != d) max_excess = e, worst = i;
            if (e > 0 || d != d) bad++;
        }
        printf("  %-40s %-10s max |err| %.2e of max |ref| %.2e%s\n", p->name, what, max_abs, max_ref,
               bad ? "  <-- over tolerance" : "");
        CHECK(bad == 0, "%s %s: %lld of %lld elements off (worst at %lld: %g vs %g; tolerance %g + %g |ref|)", p->name,
              what, (long long)bad, (long long)n, (long long)worst, a[worst], b[worst], atol, rtol);
    }
    free(a);
    free(b);
}

static bool same_bits(const ml_tensor *a, const ml_tensor *b) {
    double *x = ml_to_doubles(a), *y = ml_to_doubles(b);
    bool same = x && y && memcmp(x, y, (size_t)ml_numel(a) * sizeof(double)) == 0;
    free(x);
    free(y);
    return same;
}

typedef struct {
    double rtol, atol_frac, lse_frac;
} tolerance;

static tolerance tol_for(ml_dtype dt) {
    /* half-type outputs and probabilities (rounded before P V, as in every
     * flash kernel) against f32; lse is computed in f32 either way */
    if (dt == ML_BF16) return (tolerance){2e-2, 1e-2, 2e-5};
    return (tolerance){5e-3, 2e-3, 2e-5};
}

/* Returns false when cuDNN takes nothing here (no frontend, old library). */
static bool check_problem(problem *p) {
    if (!make_problem(p)) {
        CHECK(0, "%s: setting up: %s", p->name, ml_last_error());
        free_problem(p);
        return true;
    }
    tolerance t = tol_for(p->dt);
    ml_cudnn_sdpa_shape s = shape_of(p);
    ml_tensor *out = empty4(p->B, p->Sq, p->H, p->Dv, p->dt, GPU0);
    ml_tensor *lse = empty3(p->B, p->H, p->Sq, ML_F32, GPU0);
    int rc = ml_cudnn_sdpa_forward(ml_data(out), ml_data(lse), ml_data(p->qh), ml_data(p->kh), ml_data(p->vh), &s);
    if (rc == 0) {
        printf("  %s: cuDNN does not take it here (see the notice above)\n", p->name);
        ml_release(out);
        ml_release(lse);
        free_problem(p);
        return false;
    }
    CHECK(rc == 1, "%s forward: rc %d: %s", p->name, rc, ml_last_error());
    near("out", p, out, p->out, t.rtol, t.atol_frac);
    near("lse", p, lse, p->lse, 0, t.lse_frac);

    /* the forward repeats bit for bit */
    ml_tensor *out2 = empty4(p->B, p->Sq, p->H, p->Dv, p->dt, GPU0);
    rc = ml_cudnn_sdpa_forward(ml_data(out2), NULL, ml_data(p->qh), ml_data(p->kh), ml_data(p->vh), &s);
    CHECK(rc == 1 && same_bits(out, out2), "%s: a second forward (no lse wanted) differs (rc %d)", p->name, rc);

    /* cuDNN's backward from moonlit's statistics (CPU forward's out, lse) */
    ml_tensor *ref_out = on_gpu(p->out, p->dt), *ref_lse = ml_to_device(p->lse, GPU0);
    ml_tensor *dq = empty4(p->B, p->Sq, p->H, p->D, p->dt, GPU0), *dk = empty4(p->B, p->Sk, p->H, p->D, p->dt, GPU0),
              *dv = empty4(p->B, p->Sk, p->H, p->Dv, p->dt, GPU0);
    rc = ml_cudnn_sdpa_backward(ml_data(dq), ml_data(dk), ml_data(dv), ml_data(p->gh), ml_data(p->qh), ml_data(p->kh),
                                ml_data(p->vh), ml_data(ref_out), ml_data(ref_lse), &s);
    CHECK(rc == 1, "%s backward: rc %d: %s", p->name, rc, ml_last_error());
    near("dq", p, dq, p->dq, t.rtol, t.atol_frac);
    near("dk", p, dk, p->dk, t.rtol, t.atol_frac);
    near("dv", p, dv, p->dv, t.rtol, t.atol_frac);

    /* moonlit's backward (CPU, f32) from cuDNN's statistics */
    ml_tensor *c_out = ml_to_device(out, ml_cpu()), *c_lse = ml_to_device(lse, ml_cpu());
    ml_tensor *c_out32 = c_out ? ml_to_dtype(c_out, ML_F32) : NULL;
    ml_tensor *cdq = empty4(p->B, p->Sq, p->H, p->D, ML_F32, ml_cpu());
    ml_tensor *cdk = empty4(p->B, p->Sk, p->H, p->D, ML_F32, ml_cpu());
    ml_tensor *cdv = empty4(p->B, p->Sk, p->H, p->Dv, ML_F32, ml_cpu());
    CHECK(c_out32 && c_lse && cdq && cdk && cdv &&
              ml_sdpa_backward_cpu(ML_KT(cdq), ML_KT(cdk), ML_KT(cdv), ML_KT(p->g), ML_KT(p->q), ML_KT(p->k),
                                   ML_KT(p->v), ML_KT(c_out32), ML_KT(c_lse), p->causal, p->scale) == 0,
          "%s: CPU backward from cuDNN's forward: %s", p->name, ml_last_error());
    near("dq (cpu)", p, cdq, p->dq, t.rtol, t.atol_frac);
    near("dk (cpu)", p, cdk, p->dk, t.rtol, t.atol_frac);
    near("dv (cpu)", p, cdv, p->dv, t.rtol, t.atol_frac);

    /* dq alone (dk, dv to scratch) */
    ml_tensor *dq1 = empty4(p->B, p->Sq, p->H, p->D, p->dt, GPU0);
    rc = ml_cudnn_sdpa_backward(ml_data(dq1), NULL, NULL, ml_data(p->gh), ml_data(p->qh), ml_data(p->kh),
                                ml_data(p->vh), ml_data(ref_out), ml_data(ref_lse), &s);
    CHECK(rc == 1, "%s backward, dq only: rc %d: %s", p->name, rc, ml_last_error());
    near("dq alone", p, dq1, p->dq, t.rtol, t.atol_frac);

    /* the deterministic algorithm: the same bits twice */
    ml_cudnn_sdpa_shape sd = s;
    sd.deterministic = true;
    ml_tensor *dq2 = empty4(p->B, p->Sq, p->H, p->D, p->dt, GPU0);
    int rc1 = ml_cudnn_sdpa_backward(ml_data(dq1), ml_data(dk), ml_data(dv), ml_data(p->gh), ml_data(p->qh),
                                     ml_data(p->kh), ml_data(p->vh), ml_data(ref_out), ml_data(ref_lse), &sd);
    int rc2 = ml_cudnn_sdpa_backward(ml_data(dq2), ml_data(dk), ml_data(dv), ml_data(p->gh), ml_data(p->qh),
                                     ml_data(p->kh), ml_data(p->vh), ml_data(ref_out), ml_data(ref_lse), &sd);
    if (rc1 == 0 && rc2 == 0)
        printf("  %s: no deterministic backward here (see the notice above)\n", p->name);
    else {
        CHECK(rc1 == 1 && rc2 == 1, "%s deterministic backward: rc %d %d: %s", p->name, rc1, rc2, ml_last_error());
        near("dq (det.)", p, dq1, p->dq, t.rtol, t.atol_frac);
        CHECK(same_bits(dq1, dq2), "%s: the deterministic backward gave two different dq", p->name);
    }

    ml_tensor *all[] = {out, lse, out2, ref_out, ref_lse, dq, dk, dv, c_out, c_lse, c_out32, cdq, cdk, cdv, dq1, dq2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
    free_problem(p);
    return true;
}

/* q, k, v as narrow views of one [B, S, H, 3D] projection, passed in place
 * through their strides. */
static void test_packed(ml_dtype dt) {
    problem p = {.name = "packed qkv [2,100,4,3x40]", .dt = dt, .B = 2, .Sq = 100, .Sk = 100, .H = 4, .D = 40,
                 .Dv = 40, .causal = true, .scale = 1 / sqrt(40.0)};
    if (!make_problem(&p)) {
        CHECK(0, "packed: setting up: %s", ml_last_error());
        free_problem(&p);
        return;
    }
    const int64_t B = p.B, S = p.Sq, H = p.H, D = p.D;
    ml_tensor *packed = empty4(B, S, H, 3 * D, dt, GPU0);
    ml_tensor *parts[3] = {p.qh, p.kh, p.vh};
    for (int i = 0; i < 3 && packed; i++) {
        ml_tensor *view = ml_narrow(packed, 3, i * D, D);
        CHECK(view && ml_copy_(view, parts[i]) == 0, "packed: copying part %d: %s", i, ml_last_error());
        ml_release(view);
    }
    ml_cudnn_sdpa_shape s = shape_of(&p);
    const ml_sdpa_layout l = {S * H * 3 * D, H * 3 * D, 3 * D};
    s.q = s.k = s.v = l;
    ml_tensor *out = empty4(B, S, H, D, dt, GPU0);
    ml_tensor *lse = empty3(B, H, S, ML_F32, GPU0);
    const size_t es = ml_dtype_size(dt);
    char *base = packed ? (char *)ml_data(packed) : NULL;
    int rc = base ? ml_cudnn_sdpa_forward(ml_data(out), ml_data(lse), base, base + D * es, base + 2 * D * es, &s) : -1;
    if (rc == 0) printf("  %s: cuDNN does not take these strides (see the notice above)\n", p.name);
    if (rc != 0) {
        CHECK(rc == 1, "packed forward: rc %d: %s", rc, ml_last_error());
        tolerance t = tol_for(dt);
        near("out", &p, out, p.out, t.rtol, t.atol_frac);
        near("lse", &p, lse, p.lse, 0, t.lse_frac);
    }
    ml_release(out);
    ml_release(lse);
    ml_release(packed);
    free_problem(&p);
}

/* No score matrix in memory: the default backward's workspace at SD's 64x64
 * self attention stays far below one [B, H, Sq, Sk] half matrix (256 MiB
 * here); the deterministic one's is printed, since before cuDNN 9.25 it is
 * that matrix. */
static void test_workspace(void) {
    const int64_t B = 1, S = 4096, H = 8, D = 40;
    ml_tensor *t[6];
    for (int i = 0; i < 6; i++) t[i] = empty4(B, S, H, D, ML_BF16, GPU0);   /* q k v out dout, and the grads' */
    ml_tensor *lse = empty3(B, H, S, ML_F32, GPU0);
    ml_tensor *dk = empty4(B, S, H, D, ML_BF16, GPU0), *dv = empty4(B, S, H, D, ML_BF16, GPU0);
    bool made = lse && dk && dv;
    for (int i = 0; i < 6; i++) made = made && t[i] && ml_fill_(t[i], 0.01 * (i + 1)) == 0;
    CHECK(made, "workspace: setting up: %s", ml_last_error());
    ml_cudnn_sdpa_shape s;
    ml_cudnn_sdpa_shape_contiguous(&s, 0, ML_BF16, B, H, S, S, D, D, false, 1 / sqrt((double)D));
    if (!made || ml_cudnn_sdpa_forward(ml_data(t[3]), ml_data(lse), ml_data(t[0]), ml_data(t[1]), ml_data(t[2]), &s) != 1) {
        printf("  workspace: the cuDNN forward did not run (%s)\n", ml_last_error());
    } else {
        for (int det = 0; det < 2; det++) {
            s.deterministic = det;
            ml_cuda_mem_stats before, after;
            CHECK(ml_cuda_synchronize(0) == 0 && ml_cuda_reset_peak(0) == 0 && ml_cuda_memory_stats(0, &before) == 0,
                  "workspace: stats: %s", ml_last_error());
            int rc = ml_cudnn_sdpa_backward(ml_data(t[5]), ml_data(dk), ml_data(dv), ml_data(t[4]), ml_data(t[0]),
                                            ml_data(t[1]), ml_data(t[2]), ml_data(t[3]), ml_data(lse), &s);
            CHECK(ml_cuda_synchronize(0) == 0 && ml_cuda_memory_stats(0, &after) == 0, "workspace: stats: %s",
                  ml_last_error());
            const double mib = (double)(after.peak - before.allocated) / (1 << 20);
            printf("  backward [1,4096,8,40]%s: rc %d, %.1f MiB of workspace (one score matrix: 256 MiB)\n",
                   det ? ", deterministic" : "", rc, mib);
            if (!det) CHECK(rc == 1 && mib < 32, "workspace: the default backward took %.1f MiB (rc %d)", mib, rc);
        }
    }
    for (int i = 0; i < 6; i++) ml_release(t[i]);
    ml_release(lse);
    ml_release(dk);
    ml_release(dv);
}

/* Calls cuDNN must refuse answer 0 and leave the output alone. */
static void test_refused(void) {
    struct {
        const char *why;
        ml_dtype dt;
        int64_t D;
        size_t misalign;   /* bytes added to q's pointer */
        int64_t B;
    } cases[] = {
        {"f32", ML_F32, 64, 0, 1},
        {"head width 36", ML_BF16, 36, 0, 1},
        {"q not 16-byte aligned", ML_BF16, 64, 2, 1},
        {"empty batch", ML_BF16, 64, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int64_t S = 64, H = 2, D = cases[i].D, B = cases[i].B ? cases[i].B : 1;
        ml_tensor *q = empty4(B, S, H, D + 8, cases[i].dt, GPU0), *k = empty4(B, S, H, D, cases[i].dt, GPU0),
                  *v = empty4(B, S, H, D, cases[i].dt, GPU0), *out = empty4(B, S, H, D, cases[i].dt, GPU0);
        ml_tensor *lse = empty3(B, H, S, ML_F32, GPU0);
        CHECK(q && k && v && out && lse && ml_fill_(q, 0.5) == 0 && ml_fill_(k, 0.25) == 0 && ml_fill_(v, 1) == 0 &&
                  ml_fill_(out, 7) == 0,
              "refused %s: setting up: %s", cases[i].why, ml_last_error());
        ml_cudnn_sdpa_shape s;
        ml_cudnn_sdpa_shape_contiguous(&s, 0, cases[i].dt, cases[i].B, H, S, S, D, D, false, 0.125);
        /* q is allocated wider so that a misaligned view of it stays inside */
        const char *qp = (const char *)ml_data(q) + cases[i].misalign;
        int rc = ml_cudnn_sdpa_forward(ml_data(out), ml_data(lse), qp, ml_data(k), ml_data(v), &s);
        CHECK(rc == 0, "refused %s: forward answered %d, expected 0 (%s)", cases[i].why, rc, ml_last_error());
        rc = ml_cudnn_sdpa_backward(ml_data(q), ml_data(k), ml_data(v), ml_data(out), qp, ml_data(k), ml_data(v),
                                    ml_data(out), ml_data(lse), &s);
        CHECK(rc == 0, "refused %s: backward answered %d, expected 0 (%s)", cases[i].why, rc, ml_last_error());
        double *o = out ? ml_to_doubles(out) : NULL;
        int64_t changed = o ? 0 : -1;
        for (int64_t j = 0; o && j < ml_numel(out); j++) changed += o[j] != 7;
        CHECK(changed == 0, "refused %s: %lld elements of out were written", cases[i].why, (long long)changed);
        free(o);
        ml_tensor *all[] = {q, k, v, out, lse};
        for (size_t j = 0; j < 5; j++) ml_release(all[j]);
    }
}
#endif

int main(void) {
#ifndef ML_WITH_CUDA
    printf("moonlit built without CUDA: nothing to check\n");
    CHECK(1, "no CUDA");
#else
    if (ml_cuda_device_count() == 0) {
        printf("no CUDA device (%s): nothing to check\n", ml_cuda_unavailable_reason());
        CHECK(1, "no GPU");
        return check_summary();
    }
    ml_dtype dts[2] = {ML_BF16, ML_F16};
    bool taken = false;
    for (int i = 0; i < 2; i++) {
        ml_dtype dt = dts[i];
        problem ps[] = {
            {.name = "self [2,256,4,40]", .B = 2, .Sq = 256, .Sk = 256, .H = 4, .D = 40, .Dv = 40},
            {.name = "cross [2,200,4,80] over 77", .B = 2, .Sq = 200, .Sk = 77, .H = 4, .D = 80, .Dv = 80},
            {.name = "causal [2,77,4,64]", .B = 2, .Sq = 77, .Sk = 77, .H = 4, .D = 64, .Dv = 64, .causal = true},
            {.name = "causal [1,90,2,64] over 50", .B = 1, .Sq = 90, .Sk = 50, .H = 2, .D = 64, .Dv = 64,
             .causal = true},
            {.name = "widths 64 / 32 [1,64,2]", .B = 1, .Sq = 64, .Sk = 64, .H = 2, .D = 64, .Dv = 32},
            {.name = "width 160, scale 0.3 [1,129,2,160]", .B = 1, .Sq = 129, .Sk = 129, .H = 2, .D = 160,
             .Dv = 160, .scale = 0.3},
        };
        printf("%s:\n", ml_dtype_name(dt));
        for (size_t j = 0; j < sizeof ps / sizeof ps[0]; j++) {
            ps[j].dt = dt;
            if (ps[j].scale == 0) ps[j].scale = 1 / sqrt((double)ps[j].D);
            taken |= check_problem(&ps[j]);
        }
        if (taken) test_packed(dt);
    }
    if (taken) test_workspace();
    if (!taken) printf("cuDNN's fused attention is not available here: only the refusals are checked\n");
    test_refused();
    CHECK(ml_cuda_synchronize(-1) == 0, "final synchronize: %s", ml_last_error());
#endif
    return check_summary();
}
