/* optim.c — fused AdamW on the CPU.
 *
 * Element arithmetic follows torch.optim.AdamW (foreach=False) step by step,
 * in the element type, so a step here matches PyTorch to rounding:
 *     p = p * (1 - lr*wd)
 *     m = lerp(m, g, 1 - b1)        (m + w*(g - m) for w < 0.5, else g - (g - m)*(1 - w))
 *     v = v * b2 + (1 - b2) * g * g
 *     denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *     p = p + (-lr / (1 - b1^t)) * (m / denom)
 * with the scalars computed in double, then rounded to the element type.
 *
 * bf16 parameters or moments (the bf16-sr recipe) run the f32 arithmetic
 * on widened values and store each bf16 result with stochastic rounding
 * (kernels/bf16_sr.h says which random bits); f32 and f64 steps consume no
 * randomness and round to nearest as before. */
#pragma GCC optimize("O3")

#include "cpu/optim.h"
#include "bf16_sr.h"
#include "dtype.h"
/* tgmath: sqrt of a float stays a float, as in PyTorch's f32 kernels. */
#include <tgmath.h>

#define DEF_ADAMW(T, tn)                                                                    \
    static void adamw_##tn(int64_t n, T *p, const T *g, T *m, T *v, double lr, double b1,  \
                           double b2, double eps, double wd, int64_t step) {                \
        T decay = (T)(1.0 - lr * wd), w1 = (T)(1.0 - b1), w1c = (T)1 - w1;                  \
        T beta2 = (T)b2, w2 = (T)(1.0 - b2), epsv = (T)eps;                                 \
        double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);        \
        T neg_step = (T)(-(lr / bc1)), bc2_sqrt = (T)sqrt(bc2);                             \
        bool small_w = w1 < (T)0.5;                                                         \
        for (int64_t i = 0; i < n; i++) {                                                   \
            T pi = p[i], gi = g[i], mi = m[i], vi = v[i];                                   \
            if (wd != 0) pi = pi * decay;                                                   \
            mi = small_w ? mi + w1 * (gi - mi) : gi - (gi - mi) * w1c;                      \
            vi = vi * beta2 + w2 * gi * gi;                                                 \
            T denom = sqrt(vi) / bc2_sqrt + epsv;                                           \
            p[i] = pi + neg_step * (mi / denom);                                            \
            m[i] = mi;                                                                      \
            v[i] = vi;                                                                      \
        }                                                                                   \
    }

DEF_ADAMW(float, f32)
DEF_ADAMW(double, f64)

/* An operand of the mixed step: f32, or bf16 widened exactly. */
static inline float ld(const void *b, ml_dtype t, int64_t i) {
    return t == ML_BF16 ? ml_bf16_to_f32(((const uint16_t *)b)[i]) : ((const float *)b)[i];
}

static inline void st_sr(void *b, ml_dtype t, int64_t i, float x, uint32_t lane) {
    if (t == ML_BF16) ((uint16_t *)b)[i] = ml_f32_to_bf16_sr(x, lane);
    else ((float *)b)[i] = x;
}

/* DEF_ADAMW's f32 arithmetic, operation for operation, on operands that
 * are each f32 or bf16 (the CUDA twin does the same). */
static void adamw_sr(int64_t n, ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr,
                     double b1, double b2, double eps, double wd, int64_t step, uint64_t seed, uint64_t offset) {
    float decay = (float)(1.0 - lr * wd), w1 = (float)(1.0 - b1), w1c = 1.0f - w1;
    float beta2 = (float)b2, w2 = (float)(1.0 - b2), epsv = (float)eps;
    double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
    float neg_step = (float)(-(lr / bc1)), bc2_sqrt = (float)sqrt(bc2);
    bool small_w = w1 < 0.5f;
    ml_dtype tp = p->dtype, tg = g->dtype, ts = m->dtype;
    void *pp = ml_data(p), *pm = ml_data(m), *pv = ml_data(v);
    const void *pg = ml_data(g);
    for (int64_t i = 0; i < n; i++) {
        uint32_t x[4];
        ml_philox_block(seed, offset, (uint64_t)i, x);
        float pi = ld(pp, tp, i), gi = ld(pg, tg, i), mi = ld(pm, ts, i), vi = ld(pv, ts, i);
        if (wd != 0) pi = pi * decay;
        mi = small_w ? mi + w1 * (gi - mi) : gi - (gi - mi) * w1c;
        vi = vi * beta2 + w2 * gi * gi;
        float denom = sqrt(vi) / bc2_sqrt + epsv;
        st_sr(pp, tp, i, pi + neg_step * (mi / denom), x[0]);
        st_sr(pm, ts, i, mi, x[1]);
        st_sr(pv, ts, i, vi, x[2]);
    }
}

int ml_adamw_cpu(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr,
                 double b1, double b2, double eps, double wd, int64_t step, uint64_t seed, uint64_t offset) {
    const ml_tensor *all[4] = {p, g, m, v};
    for (int k = 0; k < 4; k++) {
        if (!ml_is_contiguous(all[k]) || ml_numel(all[k]) != ml_numel(p))
            return ml_error("adamw (cpu): param, grad and moments must be contiguous with one shape");
    }
    int64_t n = ml_numel(p);
    ml_dtype tp = p->dtype, tg = g->dtype, tm = m->dtype, tv = v->dtype;
    if (tp == tg && tp == tm && tp == tv && (tp == ML_F32 || tp == ML_F64)) {
        if (tp == ML_F32)
            adamw_f32(n, ml_data(p), ml_data(g), ml_data(m), ml_data(v), lr, b1, b2, eps, wd, step);
        else
            adamw_f64(n, ml_data(p), ml_data(g), ml_data(m), ml_data(v), lr, b1, b2, eps, wd, step);
        return 0;
    }
    bool p_ok = tp == ML_F32 || tp == ML_BF16, g_ok = tg == tp || tg == ML_F32;
    bool s_ok = tm == tv && (tm == ML_F32 || tm == ML_BF16);
    if (!p_ok || !g_ok || !s_ok)
        return ml_error("adamw (cpu): unsupported dtypes (param %s, grad %s, exp_avg %s, exp_avg_sq %s): use f32 "
                        "or f64 throughout, or an f32/bf16 param with a grad of its dtype or f32 and f32 or bf16 "
                        "moments of one dtype",
                        ml_dtype_name(tp), ml_dtype_name(tg), ml_dtype_name(tm), ml_dtype_name(tv));
    adamw_sr(n, p, g, m, v, lr, b1, b2, eps, wd, step, seed, offset);
    return 0;
}
