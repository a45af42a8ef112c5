/* ops.h — every differentiable (and a few non-differentiable) tensor op.
 *
 * Each op: checks its arguments (clear error naming the op and the shapes),
 * allocates the output on the inputs' device, dispatches to the CPU or CUDA
 * kernel (kernels/cpu, kernels/cuda), and records an autograd node.
 * All dims are 0-based here and may be negative.  All return NEW references
 * (NULL + ml_error on failure).  The op list with backends lives in
 * host/op_registry.h. */
#ifndef ML_OPS_H
#define ML_OPS_H

#include "tensor.h"
#include "autograd.h"

/* ---- elementwise, broadcasting (host/ops_elementwise.c) ------------------ */
/* ml_binop and ml_unop (the op codes the kernels take) are in kernels/kernel.h. */
ml_tensor *ml_binary(ml_binop op, ml_tensor *a, ml_tensor *b);
ml_tensor *ml_add(ml_tensor *a, ml_tensor *b);
ml_tensor *ml_sub(ml_tensor *a, ml_tensor *b);
ml_tensor *ml_mul(ml_tensor *a, ml_tensor *b);
ml_tensor *ml_div(ml_tensor *a, ml_tensor *b);
ml_tensor *ml_pow(ml_tensor *a, ml_tensor *b);
ml_tensor *ml_add_scalar(ml_tensor *a, double s);
ml_tensor *ml_mul_scalar(ml_tensor *a, double s);
ml_tensor *ml_pow_scalar(ml_tensor *a, double p);
ml_tensor *ml_rsub_scalar(ml_tensor *a, double s);   /* s - a */
ml_tensor *ml_rdiv_scalar(ml_tensor *a, double s);   /* s / a */
ml_tensor *ml_sub_scalar(ml_tensor *a, double s);    /* a + (-s): one kernel and node with add */
ml_tensor *ml_div_scalar(ml_tensor *a, double s);    /* a * (1/s): one kernel and node with mul */
/* a op s, or s op a when scalar_first, for op add, sub, mul, div or pow: a
 * tensor with a number as the Lua operators compute it (`t - 2`, `2 / t`),
 * through the ops above (a - s and a / s as ml_sub_scalar and
 * ml_div_scalar). */
ml_tensor *ml_binary_scalar(ml_binop op, ml_tensor *a, double s, bool scalar_first);
ml_tensor *ml_where(ml_tensor *cond, ml_tensor *a, ml_tensor *b);

ml_tensor *ml_unary(ml_unop op, ml_tensor *x);
ml_tensor *ml_clamp(ml_tensor *x, double lo, double hi);   /* use +-INFINITY for none */
/* h [..., 2n] -> h[..., :n] * gelu(h[..., n:]) [..., n], the exact erf GELU:
 * Stable Diffusion's GEGLU in one kernel forward and one backward. */
ml_tensor *ml_geglu(ml_tensor *h);

/* Sum a gradient down to `shape` (the reverse of broadcasting). */
ml_tensor *ml_sum_to_shape(ml_tensor *g, int ndim, const int64_t *shape);

/* ---- in-place (never recorded; error if a leaf requiring grad while grad mode is on) */
int ml_add_(ml_tensor *dst, ml_tensor *src, double alpha);   /* dst += alpha*src (broadcast src) */
int ml_mul_(ml_tensor *dst, ml_tensor *src);                 /* dst *= src */
int ml_mul_scalar_(ml_tensor *dst, double s);
int ml_add_scalar_(ml_tensor *dst, double s);
int ml_clamp_(ml_tensor *dst, double lo, double hi);
int ml_sub_(ml_tensor *dst, ml_tensor *src, double alpha);   /* ml_add_ with -alpha */
int ml_sub_scalar_(ml_tensor *dst, double s);                /* ml_add_scalar_ with -s */
/* div_ of either kind needs a float destination: it is true division. */
int ml_div_scalar_(ml_tensor *dst, double s);                /* ml_mul_scalar_ with 1/s */
int ml_div_(ml_tensor *dst, ml_tensor *src);                 /* dst /= src (broadcast src) */
/* copy_, fill_ and zero_ as the in-place ops users call: the gate every
 * in-place op passes (ml_inplace_begin: refused on tracked tensors in grad
 * mode, bumps the version), then the plain writes of tensor.h (ml_copy_,
 * ml_fill_), which ops use on their own fresh outputs without the gate. */
int ml_inplace_copy_(ml_tensor *dst, const ml_tensor *src);
int ml_inplace_fill_(ml_tensor *dst, double v);
int ml_inplace_zero_(ml_tensor *dst);

/* ---- optimizers (host/ops_optim.c) ---------------------------------------- */
/* Fused AdamW update (PyTorch semantics, decoupled decay, bias correction):
 * p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
 * f32/f64 tensors round to nearest and ignore seed/offset; f32 params may
 * take a bf16 or f16 grad.  bf16 params and/or bf16 moments (grad: the
 * param's dtype or f32; on the GPU also bf16 or f16) compute in f32 and
 * store bf16 results with stochastic rounding drawn from the Philox stream
 * (seed, offset) — the same bits on CPU and GPU (kernels/bf16_sr.h); such a
 * step consumes ml_adamw_random_blocks(p, m, v) blocks, by which a caller
 * advances its generator's offset so the next step draws fresh bits. */
int ml_adamw_step_(ml_tensor *p, ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr, double b1, double b2,
                   double eps, double wd, int64_t step, uint64_t seed, uint64_t offset);
uint64_t ml_adamw_random_blocks(const ml_tensor *p, const ml_tensor *m, const ml_tensor *v);

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    uint64_t seed, offset;          /* the Philox stream of the bf16-sr rounding */
    /* NULL, or a one-element f32 tensor on the parameters' device that
     * multiplies every gradient as the step reads it (the product rounded
     * to the gradient's dtype): the bits of ml_scale_multi_ on the
     * gradients followed by the step, without the extra pass or a sync. */
    const ml_tensor *grad_scale;
    /* NULL, or one entry per parameter, each NULL or the parameter's
     * autocast shadow (ml_cast_as): a contiguous tensor of its shape and
     * device in another floating dtype, into which the step also writes
     * the new weight converted as ml_to_dtype would (round to nearest even
     * for bf16/f16), so the next forward needs no cast.  The parameter's
     * and the moments' bits are the same with or without it; a written
     * shadow's storage version is bumped like the parameter's. */
    ml_tensor *const *shadows;
} ml_adamw_args;
/* ml_adamw_step_ over n parameters in one call (on the GPU one launch per
 * dtype combination): params[k] with grads[k], exp_avgs[k] and
 * exp_avg_sqs[k] at step steps[k].  The bits are those of n ml_adamw_step_
 * calls in list order, the k-th with offset a->offset plus the blocks the
 * earlier ones drew; *blocks_used (may be NULL) gets the total, by which
 * the caller advances its generator.  Every argument is checked before
 * anything is written: all four tensors of a parameter contiguous, of one
 * shape and device, and no parameter or moment sharing memory with any
 * other tensor of the call. */
/* t in shadow's dtype, with no copy: a new tensor over shadow's storage
 * (which the caller guarantees holds t's values converted to that dtype,
 * as ml_to_dtype would make them: the autocast cache of lua/moonlit/nn.lua
 * keeps it so), recorded by autograd as a conversion of t (registry op
 * cast_as, to_dtype's gradient).  Same shape and device, both floating,
 * different dtypes; the shadow must not require grad.  A write into the
 * shadow's storage between a forward that saved the result and its
 * backward makes that backward refuse, as for any saved tensor. */
ml_tensor *ml_cast_as(ml_tensor *t, ml_tensor *shadow);
int ml_adamw_multi_(int64_t n, ml_tensor *const *params, ml_tensor *const *grads, ml_tensor *const *exp_avgs,
                    ml_tensor *const *exp_avg_sqs, const int64_t *steps, const ml_adamw_args *a,
                    uint64_t *blocks_used);
/* The total norm_type-norm (2, INFINITY, or any p > 0) of n contiguous
 * floating tensors of one device, as a new 0-dim f32 tensor there in
 * *norm, and the clip coefficient min(1, max_norm / (norm + 1e-6)), in
 * f32, in *coef (a NaN norm gives 1: nothing is clipped).  Nothing is read
 * back to the host.  The reduction order is fixed (kernels/optim.h): norm
 * types 2 and INFINITY give the same bits on CPU and GPU. */
int ml_grad_norm_multi(int64_t n, ml_tensor *const *xs, double norm_type, double max_norm, ml_tensor **norm,
                       ml_tensor **coef);
/* xs[k] *= scale in place for every k, scale being a one-element f32
 * tensor on the tensors' device, read there (f16/bf16 tensors get the f32
 * product rounded to nearest).  Contiguous floating tensors, none sharing
 * memory with another. */
int ml_scale_multi_(int64_t n, ml_tensor *const *xs, const ml_tensor *scale);

/* ---- reductions (host/ops_reduce.c); dims: list of 0-based dims, n=0 means all */
ml_tensor *ml_sum(ml_tensor *x, int ndims, const int *dims, bool keepdim);
ml_tensor *ml_mean(ml_tensor *x, int ndims, const int *dims, bool keepdim);
ml_tensor *ml_var(ml_tensor *x, int ndims, const int *dims, int correction, bool keepdim);
ml_tensor *ml_max(ml_tensor *x, int dim, bool keepdim);          /* values */
ml_tensor *ml_argmax(ml_tensor *x, int dim, bool keepdim);       /* int64, no grad */
/* argmax with indices counted from index_base (1 for Lua, whose indices are
 * 1-based): the kernel writes them so, in the one launch ml_argmax makes. */
ml_tensor *ml_argmax_ex(ml_tensor *x, int dim, bool keepdim, int64_t index_base);
ml_tensor *ml_norm(ml_tensor *x, double p, int ndims, const int *dims, bool keepdim);

/* ---- matmul (host/ops_matmul.c) ----------------------------------------- */
/* [..,n,k] @ [..,k,m] with batch broadcasting; 1-D operands as in PyTorch. */
ml_tensor *ml_matmul(ml_tensor *a, ml_tensor *b);
/* x [.., in] , w [out, in] (PyTorch layout), b [out] or NULL -> [.., out] */
ml_tensor *ml_linear(ml_tensor *x, ml_tensor *w, ml_tensor *b);

/* ---- NHWC conv / norms / softmax / attention (host/ops_nn.c) ------------ */
/* x [N,H,W,C], w [O,kh,kw,C] (NHWC filter), b [O] or NULL -> [N,Ho,Wo,O] */
ml_tensor *ml_conv2d(ml_tensor *x, ml_tensor *w, ml_tensor *b,
                     int stride_h, int stride_w, int pad_h, int pad_w);
/* The same with zero padding given per side (the VAE encoder's downsampling
 * pads only bottom and right); ml_conv2d pads pad_h/pad_w on both sides. */
ml_tensor *ml_conv2d_ex(ml_tensor *x, ml_tensor *w, ml_tensor *b, int stride_h, int stride_w,
                        int pad_top, int pad_bottom, int pad_left, int pad_right);
/* x [N,...,C] (channels last), groups over C, weight/bias [C] or NULL */
ml_tensor *ml_group_norm(ml_tensor *x, int groups, ml_tensor *w, ml_tensor *b,
                         double eps, bool fuse_silu);
/* normalise over the last dim; weight/bias [C] or NULL */
ml_tensor *ml_layer_norm(ml_tensor *x, ml_tensor *w, ml_tensor *b, double eps);
ml_tensor *ml_softmax(ml_tensor *x, int dim);
ml_tensor *ml_log_softmax(ml_tensor *x, int dim);
/* q [B,Sq,H,D], k/v [B,Sk,H,D] (BSHD: projection outputs used in place)
 * -> [B,Sq,H,D].  scale <= 0 means 1/sqrt(D). */
ml_tensor *ml_sdpa(ml_tensor *q, ml_tensor *k, ml_tensor *v, bool causal, double scale);

/* ---- indexing / shape (host/ops_index.c) -------------------------------- */
ml_tensor *ml_embedding(ml_tensor *weight, ml_tensor *ids);     /* [V,D], int ids [...] -> [...,D] */
ml_tensor *ml_cat(int n, ml_tensor *const *ts, int dim);
ml_tensor *ml_stack(int n, ml_tensor *const *ts, int dim);
ml_tensor *ml_gather(ml_tensor *x, int dim, ml_tensor *index);
ml_tensor *ml_index_select(ml_tensor *x, int dim, ml_tensor *index);
/* The same with the index's values counted from index_base (1 for Lua):
 * ml_gather and ml_index_select are these with 0.  The kernels read the
 * base, so it costs no extra pass, the backward uses it too, and an
 * out-of-range error names positions and the valid range in that base. */
ml_tensor *ml_gather_ex(ml_tensor *x, int dim, ml_tensor *index, int64_t index_base);
ml_tensor *ml_index_select_ex(ml_tensor *x, int dim, ml_tensor *index, int64_t index_base);
ml_tensor *ml_upsample_nearest2d(ml_tensor *x, int scale);        /* NHWC */

/* ---- losses / regularisation (host/ops_loss.c) -------------------------- */
typedef enum { ML_REDUCE_NONE, ML_REDUCE_MEAN, ML_REDUCE_SUM } ml_reduction;
ml_tensor *ml_mse_loss(ml_tensor *a, ml_tensor *b, ml_reduction r);

/* ---- random (host/random.c): Philox4x32-10, counter based --------------- */
typedef struct { uint64_t seed; uint64_t offset; } ml_generator;
ml_generator *ml_default_generator(void);
void ml_manual_seed(uint64_t seed);
ml_tensor *ml_dropout(ml_tensor *x, double p, bool train, ml_generator *g);
ml_tensor *ml_randn(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev, ml_generator *g);
ml_tensor *ml_rand(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev, ml_generator *g);
ml_tensor *ml_randint(int64_t low, int64_t high, int ndim, const int64_t *shape, ml_dtype dt,
                      ml_device dev, ml_generator *g);
int ml_normal_(ml_tensor *t, double mean, double std, ml_generator *g);
int ml_uniform_(ml_tensor *t, double lo, double hi, ml_generator *g);

#endif
