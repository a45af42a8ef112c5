/* optim.c — fused AdamW on the CPU.
 *
 * Element arithmetic follows torch.optim.AdamW (foreach=False) step by step,
 * in the element type, so a step here matches PyTorch to rounding:
 *     p = p * (1 - lr*wd)
 *     m = lerp(m, g, 1 - b1)        (m + w*(g - m) for w < 0.5, else g - (g - m)*(1 - w))
 *     v = v * b2 + (1 - b2) * g * g
 *     denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *     p = p + (-lr / (1 - b1^t)) * (m / denom)
 * with the scalars computed in double, then rounded to the element type. */
#pragma GCC optimize("O3")

#include "cpu/optim.h"
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

int ml_adamw_cpu(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr,
                 double b1, double b2, double eps, double wd, int64_t step) {
    const ml_tensor *all[4] = {p, g, m, v};
    for (int k = 0; k < 4; k++) {
        if (all[k]->dtype != p->dtype || !ml_is_contiguous(all[k]) || ml_numel(all[k]) != ml_numel(p))
            return ml_error("adamw (cpu): param, grad and moments must be contiguous with one shape and dtype");
    }
    int64_t n = ml_numel(p);
    if (p->dtype == ML_F32)
        adamw_f32(n, ml_data(p), ml_data(g), ml_data(m), ml_data(v), lr, b1, b2, eps, wd, step);
    else if (p->dtype == ML_F64)
        adamw_f64(n, ml_data(p), ml_data(g), ml_data(m), ml_data(v), lr, b1, b2, eps, wd, step);
    else
        return ml_error("adamw (cpu): dtype %s is not supported (f32 or f64)", ml_dtype_name(p->dtype));
    return 0;
}
