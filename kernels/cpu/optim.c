/* optim.c — the optimizer kernels on the CPU (declared in kernels/optim.h).
 *
 * AdamW.  Element arithmetic follows torch.optim.AdamW (foreach=False)
 * step by step, in the element type, so a step here matches PyTorch to
 * rounding:
 *     p = p * (1 - lr*wd)
 *     m = lerp(m, g, 1 - b1)        (m + w*(g - m) for w < 0.5, else g - (g - m)*(1 - w))
 *     v = v * b2 + (1 - b2) * g * g
 *     denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *     p = p + (-lr / (1 - b1^t)) * (m / denom)
 * with the scalars computed in double, then rounded to the element type
 * (ml_adamw_consts_of, ml_adamw_bias).  bf16 parameters or moments (the
 * bf16-sr recipe) run the f32 arithmetic on widened values and store each
 * bf16 result with stochastic rounding (kernels/bf16_sr.h says which random
 * bits); f32 and f64 steps consume no randomness and round to nearest.  A
 * grad_scale multiplies the gradient first, rounded to the gradient's dtype,
 * so the step sees what it would after an in-place scale.  The CUDA twin
 * does the same operations in the same order with IEEE rounding, so both
 * give the same bits.
 *
 * The norm and the scale follow the chunk layout of kernels/optim.h, so the
 * norm's bits are the GPU's too. */
#pragma GCC optimize("O3")

#include "optim.h"
#include "bf16_sr.h"
#include "dtype.h"
#include <stdlib.h>
/* tgmath: sqrt of a float stays a float, as in PyTorch's f32 kernels. */
#include <tgmath.h>

/* ---- AdamW ---------------------------------------------------------------- */

/* The gradient as the step reads it (LOAD), and rescaled by s (RESCALE):
 * the product rounded to the gradient's own dtype. */
#define LOAD_SAME(x) (x)
#define LOAD_BF16(x) ml_bf16_to_f32(x)
#define LOAD_F16(x) ml_f16_to_f32(x)
#define RESCALE_F32(x, s) ((x) * (s))
#define RESCALE_F64(x, s) ((x) * (double)(s))
#define RESCALE_BF16(x, s) ml_bf16_to_f32(ml_f32_to_bf16((x) * (s)))
#define RESCALE_F16(x, s) ml_f16_to_f32(ml_f32_to_f16((x) * (s)))

/* Round-to-nearest step: param and moments of type T, gradient of type G. */
#define DEF_ADAMW(name, T, G, LOAD, RESCALE)                                                    \
    static void name(const ml_adamw_tensor *t, const ml_adamw_consts *cp, double neg_step_d,    \
                     double bc2_sqrt_d, const float *scale) {                                   \
        ml_adamw_consts c = *cp;                                                                \
        T decay = (T)c.decay, w1 = (T)c.w1, w1c = (T)c.w1c, beta2 = (T)c.beta2, w2 = (T)c.w2;   \
        T epsv = (T)c.eps, neg_step = (T)neg_step_d, bc2_sqrt = (T)bc2_sqrt_d;                  \
        bool small_w = c.small_w, do_decay = c.do_decay;                                        \
        float s = scale ? *scale : 1.0f;                                                        \
        T *p = t->param, *m = t->exp_avg, *v = t->exp_avg_sq;                                   \
        const G *g = t->grad;                                                                   \
        for (int64_t i = 0; i < t->numel; i++) {                                                \
            T pi = p[i], gi = LOAD(g[i]), mi = m[i], vi = v[i];                                 \
            if (scale) gi = RESCALE(gi, s);                                                     \
            if (do_decay) pi = pi * decay;                                                      \
            mi = small_w ? mi + w1 * (gi - mi) : gi - (gi - mi) * w1c;                          \
            vi = vi * beta2 + w2 * gi * gi;                                                     \
            T denom = sqrt(vi) / bc2_sqrt + epsv;                                               \
            p[i] = pi + neg_step * (mi / denom);                                                \
            m[i] = mi;                                                                          \
            v[i] = vi;                                                                          \
        }                                                                                       \
    }

DEF_ADAMW(adamw_f32, float, float, LOAD_SAME, RESCALE_F32)
DEF_ADAMW(adamw_f32_bf16g, float, uint16_t, LOAD_BF16, RESCALE_BF16)
DEF_ADAMW(adamw_f32_f16g, float, uint16_t, LOAD_F16, RESCALE_F16)
DEF_ADAMW(adamw_f64, double, double, LOAD_SAME, RESCALE_F64)

/* An operand of the bf16-sr step: f32, or bf16/f16 widened exactly. */
static inline float ld(const void *b, ml_dtype t, int64_t i) {
    if (t == ML_BF16) return ml_bf16_to_f32(((const uint16_t *)b)[i]);
    if (t == ML_F16) return ml_f16_to_f32(((const uint16_t *)b)[i]);
    return ((const float *)b)[i];
}

static inline float rescale(float x, ml_dtype t, float s) {
    if (t == ML_BF16) return RESCALE_BF16(x, s);
    if (t == ML_F16) return RESCALE_F16(x, s);
    return x * s;
}

static inline void st_sr(void *b, ml_dtype t, int64_t i, float x, uint32_t lane) {
    if (t == ML_BF16) ((uint16_t *)b)[i] = ml_f32_to_bf16_sr(x, lane);
    else ((float *)b)[i] = x;
}

/* DEF_ADAMW's f32 arithmetic, operation for operation, on operands that
 * are each f32 or bf16 (the gradient also f16). */
static void adamw_sr(const ml_adamw_tensor *t, const ml_adamw_hparams *h, const ml_adamw_consts *cp,
                     double neg_step_d, double bc2_sqrt_d, const float *scale) {
    ml_adamw_consts c = *cp;
    float decay = (float)c.decay, w1 = (float)c.w1, w1c = (float)c.w1c, beta2 = (float)c.beta2;
    float w2 = (float)c.w2, epsv = (float)c.eps, neg_step = (float)neg_step_d, bc2_sqrt = (float)bc2_sqrt_d;
    bool small_w = c.small_w, do_decay = c.do_decay;
    float s = scale ? *scale : 1.0f;
    ml_dtype tp = t->param_dtype, tg = t->grad_dtype, ts = t->state_dtype;
    void *pp = t->param, *pm = t->exp_avg, *pv = t->exp_avg_sq;
    const void *pg = t->grad;
    uint32_t x[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < t->numel; i++) {
        if (!(i & 1)) ml_philox_block(h->seed, t->offset, (uint64_t)i >> 1, x);   /* a block per two elements */
        float pi = ld(pp, tp, i), gi = ld(pg, tg, i), mi = ld(pm, ts, i), vi = ld(pv, ts, i);
        if (scale) gi = rescale(gi, tg, s);
        if (do_decay) pi = pi * decay;
        mi = small_w ? mi + w1 * (gi - mi) : gi - (gi - mi) * w1c;
        vi = vi * beta2 + w2 * gi * gi;
        float denom = sqrt(vi) / bc2_sqrt + epsv;
        st_sr(pp, tp, i, pi + neg_step * (mi / denom), ml_adamw_sr_lane(x[0], (uint64_t)i));
        st_sr(pm, ts, i, mi, ml_adamw_sr_lane(x[1], (uint64_t)i));
        st_sr(pv, ts, i, vi, ml_adamw_sr_lane(x[2], (uint64_t)i));
    }
}

/* The shadow of a stepped parameter: each new param element as the copy
 * kernel converts it (through double, narrowing floats via f32), read back
 * from the param so the shadow is exactly the cast of what was stored,
 * whatever rounding (nearest, or stochastic for bf16 params) stored it.  A
 * pass after the step keeps the step's loops as they were; on the CPU the
 * second read of a just-written tensor is cheap. */
static void write_shadow(const ml_adamw_tensor *t) {
    for (int64_t i = 0; i < t->numel; i++)
        ml_store_from_double(t->shadow, t->shadow_dtype, i, ml_load_as_double(t->param, t->param_dtype, i));
}

int ml_adamw_multi_cpu(ml_device dev, const ml_adamw_hparams *h, int64_t n, const ml_adamw_tensor *list) {
    (void)dev;
    const ml_adamw_consts c32 = ml_adamw_consts_of(h, true), c64 = ml_adamw_consts_of(h, false);
    /* The bias corrections of the last step seen, per compute type: the
     * tensors of a list almost always share their step, and pow is the
     * dearest part of a small tensor's update. */
    int64_t last_step[2] = {0, 0};
    double neg_step[2], bc2_sqrt[2];
    for (int64_t k = 0; k < n; k++) {
        const ml_adamw_tensor *t = &list[k];
        ml_dtype tp = t->param_dtype, tg = t->grad_dtype, ts = t->state_dtype;
        bool f64 = tp == ML_F64 && tg == ML_F64 && ts == ML_F64;
        if (t->step != last_step[f64]) {
            ml_adamw_bias(h, t->step, !f64, &neg_step[f64], &bc2_sqrt[f64]);
            last_step[f64] = t->step;
        }
        double ns = neg_step[f64], bs = bc2_sqrt[f64];
        if (f64) {
            adamw_f64(t, &c64, ns, bs, h->grad_scale);
        } else if (tp == ML_F32 && ts == ML_F32) {
            if (tg == ML_F32) adamw_f32(t, &c32, ns, bs, h->grad_scale);
            else if (tg == ML_BF16) adamw_f32_bf16g(t, &c32, ns, bs, h->grad_scale);
            else if (tg == ML_F16) adamw_f32_f16g(t, &c32, ns, bs, h->grad_scale);
            else goto unsupported;
        } else if ((tp == ML_F32 || tp == ML_BF16) && (ts == ML_F32 || ts == ML_BF16) &&
                   (tg == ML_F32 || tg == ML_BF16 || tg == ML_F16)) {
            adamw_sr(t, h, &c32, ns, bs, h->grad_scale);
        } else {
            goto unsupported;
        }
        if (t->shadow) write_shadow(t);
        continue;
    unsupported:
        return ml_error("adamw (cpu): unsupported dtypes (param %s, grad %s, moments %s)", ml_dtype_name(tp),
                        ml_dtype_name(tg), ml_dtype_name(ts));
    }
    return 0;
}

/* ---- norm and scale ---------------------------------------------------------- */

typedef enum { TERM_SQUARE, TERM_ABS_MAX, TERM_POW } term_kind;

static inline double term(double x, term_kind k, double p) {
    switch (k) {
    case TERM_SQUARE: return x * x;
    case TERM_ABS_MAX: return fabs(x);
    default: return pow(fabs(x), p);
    }
}

static inline double elem(const void *data, ml_dtype t, int64_t i) {
    switch (t) {
    case ML_F64: return ((const double *)data)[i];
    case ML_BF16: return ml_bf16_to_f32(((const uint16_t *)data)[i]);
    case ML_F16: return ml_f16_to_f32(((const uint16_t *)data)[i]);
    default: return ((const float *)data)[i];
    }
}

/* lanes[0] <- the tree fold of kernels/optim.h. */
static double fold(double *lanes, bool is_max) {
    for (int s = ML_OPTIM_LANES / 2; s > 0; s >>= 1)
        for (int j = 0; j < s; j++) lanes[j] = ml_norm_combine(lanes[j], lanes[j + s], is_max);
    return lanes[0];
}

/* The partial of elements [start, end) of x. */
static double chunk_partial(const ml_optim_tensor *x, int64_t start, int64_t end, term_kind k, double p) {
    double lanes[ML_OPTIM_LANES] = {0};
    bool is_max = k == TERM_ABS_MAX;
    for (int64_t base = start; base < end; base += ML_OPTIM_LANES) {
        int64_t left = end - base;
        int w = left < ML_OPTIM_LANES ? (int)left : ML_OPTIM_LANES;
        for (int j = 0; j < w; j++) lanes[j] = ml_norm_combine(lanes[j], term(elem(x->data, x->dtype, base + j), k, p), is_max);
    }
    return fold(lanes, is_max);
}

int ml_grad_norm_multi_cpu(ml_device dev, int64_t n, const ml_optim_tensor *list, double norm_type, double max_norm,
                           float *norm, float *coef) {
    (void)dev;
    term_kind k = isinf(norm_type) ? TERM_ABS_MAX : norm_type == 2 ? TERM_SQUARE : TERM_POW;
    bool is_max = k == TERM_ABS_MAX;
    /* The partials are folded as they come: lane (c mod LANES) of the final
     * reduction takes chunk c's partial, which is the order the layout
     * prescribes, without storing every partial. */
    double lanes[ML_OPTIM_LANES] = {0};
    int64_t c = 0;
    for (int64_t t = 0; t < n; t++) {
        for (int64_t start = 0; start < list[t].numel; start += ML_OPTIM_CHUNK, c++) {
            int64_t end = list[t].numel - start < ML_OPTIM_CHUNK ? list[t].numel : start + ML_OPTIM_CHUNK;
            int j = (int)(c % ML_OPTIM_LANES);
            lanes[j] = ml_norm_combine(lanes[j], chunk_partial(&list[t], start, end, k, norm_type), is_max);
        }
    }
    ml_clip_finish(fold(lanes, is_max), norm_type, max_norm, norm, coef);
    return 0;
}

#define DEF_SCALE(name, T, MUL)                                          \
    static void name(void *data, int64_t n, float s) {                   \
        T *x = data;                                                     \
        for (int64_t i = 0; i < n; i++) x[i] = MUL(x[i], s);             \
    }
#define MUL_F32(x, s) ((x) * (s))
#define MUL_F64(x, s) ((x) * (double)(s))
#define MUL_BF16(x, s) ml_f32_to_bf16(ml_bf16_to_f32(x) * (s))
#define MUL_F16(x, s) ml_f32_to_f16(ml_f16_to_f32(x) * (s))
DEF_SCALE(scale_f32, float, MUL_F32)
DEF_SCALE(scale_f64, double, MUL_F64)
DEF_SCALE(scale_bf16, uint16_t, MUL_BF16)
DEF_SCALE(scale_f16, uint16_t, MUL_F16)

int ml_scale_multi_cpu(ml_device dev, int64_t n, const ml_optim_tensor *list, const float *scale) {
    (void)dev;
    float s = *scale;
    if (s == 1.0f) return 0;
    for (int64_t t = 0; t < n; t++) {
        switch (list[t].dtype) {
        case ML_F32: scale_f32(list[t].data, list[t].numel, s); break;
        case ML_F64: scale_f64(list[t].data, list[t].numel, s); break;
        case ML_BF16: scale_bf16(list[t].data, list[t].numel, s); break;
        case ML_F16: scale_f16(list[t].data, list[t].numel, s); break;
        default: return ml_error("scale (cpu): unsupported dtype %s", ml_dtype_name(list[t].dtype));
        }
    }
    return 0;
}
