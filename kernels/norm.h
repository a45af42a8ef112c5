/* norm.h — group norm (channels last, optional fused SiLU) and layer norm,
 * forward and backward: kernels/cpu/norm.c and kernels/cuda/norm.cu.
 *
 * Letters: N samples, L positions (all spatial dims flattened: H*W for
 * images, S for sequences), C channels, G groups (C % G == 0), M rows.
 *   group norm: x/out [N, L, C], stats over the L x C/G values of each
 *               (n, g);  mean/rstd [N, G]
 *   layer norm: x/out [M, C], stats over each row;  mean/rstd [M]
 * Biased variance, rstd = 1/sqrt(var + eps), sums in double.  w/b [C] or
 * NULL (1 and 0).  out = xhat*w + b, then SiLU when fuse_silu.  mean/rstd
 * are written by the forward for the backward: float64 for a float64 input,
 * else float32.  Gradients are written (=), NULL when not wanted.
 *
 * The host op has checked: every tensor contiguous with the shapes above,
 * x, w, b, out and the gradients of one float dtype on one device, groups
 * dividing C.  The CPU computes float32 and float64.  The CUDA kernels also
 * take float16 and bfloat16, computing in float32; statistics and every sum
 * accumulate in double, and float32 follows the CPU's arithmetic (float32
 * affine in the forward, double in the backward) with IEEE rounding, so
 * results agree to a few units of the last place.  They are deterministic:
 * parameter gradients are two-stage reductions in an order fixed by the
 * shapes and the GPU model, with no atomics.  Return 0 / -1. */
#ifndef ML_KERNELS_NORM_H
#define ML_KERNELS_NORM_H

#include "kernel.h"

ML_KERNEL(ml_group_norm_forward, (ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                                  const ml_ktensor *w, const ml_ktensor *b, int groups, double eps,
                                  bool fuse_silu));
/* b is read only when fuse_silu (the SiLU derivative needs the pre-activation). */
ML_KERNEL(ml_group_norm_backward, (ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                   const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                                   const ml_ktensor *mean, const ml_ktensor *rstd, int groups, bool fuse_silu));

ML_KERNEL(ml_layer_norm_forward, (ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                                  const ml_ktensor *w, const ml_ktensor *b, double eps));
ML_KERNEL(ml_layer_norm_backward, (ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                   const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *mean,
                                   const ml_ktensor *rstd));

#endif
