/* norm.c — CPU group norm (NHWC, optional fused SiLU) and layer norm.
 * Layer norm is group norm with one group and one position per row, so
 * both share one typed implementation (norm_t.h, instantiated for float
 * and double below). */
#include "norm.h"
#include <stdlib.h>
#include <tgmath.h>

/* The gradient through SiLU at pre-activation v: g * s(v) (1 + v (1 - s(v))). */
static inline double silu_grad(double g, double v) {
    double s = 1.0 / (1.0 + exp(-v));
    return g * s * (1.0 + v * (1.0 - s));
}

#define ML_TYPED_BODY "norm_t.h"
#include "typed.h"

#define DATA(t) ((t) ? t->data : NULL)

static int forward(ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x, const ml_ktensor *w,
                   const ml_ktensor *b, int64_t N, int64_t L, int64_t C, int64_t G, double eps, bool silu) {
    if (x->dtype == ML_F32)
        return gn_forward_f32(out->data, mean->data, rstd->data, x->data, DATA(w), DATA(b),
                              N, L, C, G, eps, silu);
    if (x->dtype == ML_F64)
        return gn_forward_f64(out->data, mean->data, rstd->data, x->data, DATA(w), DATA(b),
                              N, L, C, G, eps, silu);
    return ml_error("norm: the CPU computes in float32 or float64, not %s", ml_dtype_name(x->dtype));
}

static int backward(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout, const ml_ktensor *x,
                    const ml_ktensor *w, const ml_ktensor *b, const ml_ktensor *mean, const ml_ktensor *rstd,
                    int64_t N, int64_t L, int64_t C, int64_t G, bool silu) {
    if (x->dtype == ML_F32)
        return gn_backward_f32(DATA(dx), DATA(dw), DATA(db), dout->data, x->data, DATA(w), DATA(b),
                               mean->data, rstd->data, N, L, C, G, silu);
    if (x->dtype == ML_F64)
        return gn_backward_f64(DATA(dx), DATA(dw), DATA(db), dout->data, x->data, DATA(w), DATA(b),
                               mean->data, rstd->data, N, L, C, G, silu);
    return ml_error("norm backward: the CPU computes in float32 or float64, not %s", ml_dtype_name(x->dtype));
}

int ml_group_norm_forward_cpu(ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                              const ml_ktensor *w, const ml_ktensor *b, int groups, double eps, bool fuse_silu) {
    return forward(out, mean, rstd, x, w, b, x->shape[0], x->shape[1], x->shape[2], groups, eps, fuse_silu);
}

int ml_group_norm_backward_cpu(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                               const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                               const ml_ktensor *mean, const ml_ktensor *rstd, int groups, bool fuse_silu) {
    return backward(dx, dw, db, dout, x, w, b, mean, rstd, x->shape[0], x->shape[1], x->shape[2], groups,
                    fuse_silu);
}

int ml_layer_norm_forward_cpu(ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                              const ml_ktensor *w, const ml_ktensor *b, double eps) {
    return forward(out, mean, rstd, x, w, b, x->shape[0], 1, x->shape[1], 1, eps, false);
}

int ml_layer_norm_backward_cpu(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                               const ml_ktensor *x, const ml_ktensor *w,
                               const ml_ktensor *mean, const ml_ktensor *rstd) {
    return backward(dx, dw, db, dout, x, w, NULL, mean, rstd, x->shape[0], 1, x->shape[1], 1, false);
}
