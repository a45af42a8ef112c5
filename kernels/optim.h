/* optim.h — the optimizer kernels, declared once for the CPU
 * (kernels/cpu/optim.c) and the GPU (kernels/cuda/optim.cu): AdamW over a
 * list of tensors, and the total gradient norm and in-place scaling over a
 * list, which clip_grad_norm is made of.
 *
 * Why lists.  A training step updates hundreds of tensors (882 for SD 1.4's
 * UNet and text encoder).  One call per tensor costs a launch each, and a
 * norm read back per tensor costs a host sync each.  A list is one launch
 * (AdamW: one per dtype combination present), and the norm and the clip
 * coefficient stay on the device, where the next AdamW call reads the
 * coefficient as its grad_scale.
 *
 * Descriptors.  Every tensor these kernels see is contiguous (the host op,
 * host/ops_optim.c, checked that, and shapes, devices and dtypes), so a data
 * pointer, an element count and a dtype describe it; a list of ~900 full
 * ml_ktensor descriptors would be 500 KB to build per step.  Pointers are on
 * the call's device; grad_scale, norm, coef and scale point to one float
 * there too.
 *
 * Chunks, the layout both devices follow.  The list is cut into chunks of
 * ML_OPTIM_CHUNK elements, tensor after tensor in list order (a tensor of n
 * elements gives ceil(n / ML_OPTIM_CHUNK) chunks, an empty one none).  On
 * the GPU each chunk is one thread block of ML_OPTIM_LANES threads.
 *
 * The norm's reduction order, fixed so that both devices give the same bits
 * (no float atomics anywhere).  Every term is a double: x*x for norm_type
 * 2 (exact for f32, bf16 and f16 elements), |x| for infinity, |x|^p (pow)
 * otherwise.  Terms combine by + (by a NaN-keeping max for infinity):
 *   - in chunk c, lane j (0 <= j < LANES) combines the terms of the chunk's
 *     elements j, j + LANES, j + 2*LANES, ... in that order, starting from 0;
 *   - then the lanes fold as a tree: for s = LANES/2, LANES/4, ..., 1, lane
 *     j < s becomes lane j (+) lane j + s; the chunk's partial is lane 0;
 *   - the partials of all chunks, in chunk order, reduce the same way
 *     (lane j takes partials j, j + LANES, ..., then the tree).
 * ml_clip_finish below turns the total into the norm and the coefficient.
 * Norm types 2 and infinity therefore give the same bits on both devices;
 * other types go through pow, whose last bit libm and CUDA may round apart. */
#ifndef ML_KERNELS_OPTIM_H
#define ML_KERNELS_OPTIM_H

#include "kernel.h"
#include <math.h>

#define ML_OPTIM_CHUNK 65536
#define ML_OPTIM_LANES 256

#ifdef __CUDACC__
#define ML_OPTIM_HD static inline __host__ __device__
#else
#define ML_OPTIM_HD static inline
#endif

/* One tensor of a norm or scale list. */
typedef struct {
    void *data;
    int64_t numel;
    ml_dtype dtype;      /* f32, f64, f16 or bf16 */
} ml_optim_tensor;

/* One parameter of an AdamW list with its gradient and moments, all of
 * numel elements.  dtypes: all f64; or param, exp_avg, exp_avg_sq f32 with
 * an f32, bf16 or f16 gradient (round to nearest); or the bf16-sr step:
 * param f32 or bf16, moments both f32 or both bf16 (not all f32), gradient
 * f32, bf16 or f16, each bf16 result stochastically rounded with Philox
 * blocks offset, offset + 1, ... (element i uses block offset + i, as
 * kernels/bf16_sr.h lays out).  The host op restricts the CPU to a grad of
 * the param's dtype or f32 in the bf16-sr step. */
typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    int64_t numel;
    int64_t step;        /* this parameter's step count (>= 1): its bias corrections */
    uint64_t offset;     /* Philox block of element 0 (bf16-sr steps) */
    ml_dtype param_dtype, grad_dtype, state_dtype;
    /* NULL, or numel elements of shadow_dtype (a floating dtype other than
     * the param's) that get the new param converted as a copy converts it
     * (ml_store_from_double on the CPU, ml_cvt on the GPU: round to nearest
     * even), element for element what casting the stepped param gives: the
     * autocast shadow, refreshed without a pass of its own. */
    void *shadow;
    ml_dtype shadow_dtype;
} ml_adamw_tensor;

/* What every parameter of a call shares. */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    uint64_t seed;              /* Philox key of the bf16-sr rounding */
    /* NULL, or one float every gradient is multiplied by as it is read, the
     * product rounded to the gradient's dtype: exactly what an in-place
     * g *= scale (ml_scale_multi) and then the step would compute. */
    const float *grad_scale;
} ml_adamw_hparams;

/* Updates the n parameters of list in place (PyTorch's AdamW, the
 * arithmetic of kernels/cpu/optim.c's header). */
ML_KERNEL(ml_adamw_multi, (ml_device dev, const ml_adamw_hparams *h, int64_t n, const ml_adamw_tensor *list));

/* The total norm_type-norm of the n tensors of list, as one float in *norm,
 * and the clip coefficient min(1, max_norm / (norm + 1e-6)) in *coef
 * (ml_clip_finish).  norm_type > 0, possibly infinite; n >= 1. */
ML_KERNEL(ml_grad_norm_multi, (ml_device dev, int64_t n, const ml_optim_tensor *list, double norm_type,
                               double max_norm, float *norm, float *coef));

/* x *= *scale for every tensor of list, in x's dtype (f16 and bf16: the f32
 * product rounded to nearest; f64: times the float widened).  Nothing is
 * written when *scale is 1. */
ML_KERNEL(ml_scale_multi, (ml_device dev, int64_t n, const ml_optim_tensor *list, const float *scale));

/* ---- arithmetic both devices share ------------------------------------- */

/* The scalars of a step, computed in double and rounded to the compute type
 * (f32, or f64 for f64 steps) as PyTorch's single-tensor AdamW rounds
 * them; each held exactly in a double. */
typedef struct {
    double decay, w1, w1c, beta2, w2, eps;
    bool small_w;       /* lerp's branch: m + w1*(g - m) when w1 < 0.5 */
    bool do_decay;
} ml_adamw_consts;

static inline double ml_adamw_round(double x, bool f32) { return f32 ? (double)(float)x : x; }

static inline ml_adamw_consts ml_adamw_consts_of(const ml_adamw_hparams *h, bool f32) {
    ml_adamw_consts c;
    c.decay = ml_adamw_round(1.0 - h->lr * h->weight_decay, f32);
    c.w1 = ml_adamw_round(1.0 - h->beta1, f32);
    c.w1c = f32 ? (double)(1.0f - (float)c.w1) : 1.0 - c.w1;   /* (T)1 - w1, in T */
    c.beta2 = ml_adamw_round(h->beta2, f32);
    c.w2 = ml_adamw_round(1.0 - h->beta2, f32);
    c.eps = ml_adamw_round(h->eps, f32);
    c.small_w = c.w1 < 0.5;
    c.do_decay = h->weight_decay != 0;
    return c;
}

/* Step `step`'s bias corrections: -lr / (1 - beta1^t) and sqrt(1 - beta2^t). */
static inline void ml_adamw_bias(const ml_adamw_hparams *h, int64_t step, bool f32, double *neg_step,
                                 double *bc2_sqrt) {
    double bc1 = 1.0 - pow(h->beta1, (double)step), bc2 = 1.0 - pow(h->beta2, (double)step);
    *neg_step = ml_adamw_round(-(h->lr / bc1), f32);
    *bc2_sqrt = ml_adamw_round(sqrt(bc2), f32);
}

/* Philox blocks a parameter's step consumes: one per two elements for a
 * bf16-sr step (a bf16 param or bf16 moments; kernels/bf16_sr.h), none
 * otherwise. */
static inline uint64_t ml_adamw_blocks(ml_dtype param, ml_dtype state, int64_t numel) {
    return param == ML_BF16 || state == ML_BF16 ? (uint64_t)numel / 2 + (uint64_t)(numel & 1) : 0;
}

/* Lanes combine: + for finite norm types, a max that keeps NaN for inf. */
ML_OPTIM_HD double ml_norm_combine(double a, double b, bool is_max) {
    if (!is_max) return a + b;
    return (a != a || a > b) ? a : b;
}

/* The total (sum of terms, or the max) to the norm, rounded to float, and
 * the clip coefficient computed in float as PyTorch does,
 * min(1, max_norm / (norm + 1e-6)).  A NaN norm gives coefficient 1 (the
 * gradients are left as they are); an infinite norm gives 0. */
ML_OPTIM_HD void ml_clip_finish(double total, double norm_type, double max_norm, float *norm, float *coef) {
    double n = isinf(norm_type) ? total : norm_type == 2 ? sqrt(total) : pow(total, 1.0 / norm_type);
    float nf = (float)n;
    float q = (float)max_norm / (nf + 1e-6f);
    *norm = nf;
    *coef = q < 1.0f ? q : 1.0f;
}

#endif
