/* norm.h — CPU group norm (channels last, optional fused SiLU) and layer
 * norm, forward and backward.
 *
 * Letters: N samples, L positions (all spatial dims flattened: H*W for
 * images, S for sequences), C channels, G groups (C % G == 0), M rows.
 *   group norm: x/out [N, L, C], stats over the L x C/G values of each
 *               (n, g);  mean/rstd [N, G]
 *   layer norm: x/out [M, C], stats over each row;  mean/rstd [M]
 * Biased variance, rstd = 1/sqrt(var + eps), sums in double.  w/b [C] or
 * NULL (1 and 0).  out = xhat*w + b, then SiLU when fuse_silu.  mean/rstd
 * have x's dtype and are written by the forward for the backward.
 * Tensors contiguous, float32 or float64; gradients are written (=), NULL
 * when not wanted.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_NORM_H
#define ML_KERNELS_CPU_NORM_H

#include <stdbool.h>
#include "tensor.h"

int ml_group_norm_forward_cpu(ml_tensor *out, ml_tensor *mean, ml_tensor *rstd, const ml_tensor *x,
                              const ml_tensor *w, const ml_tensor *b, int groups, double eps, bool fuse_silu);
/* b is read only when fuse_silu (the SiLU derivative needs the pre-activation). */
int ml_group_norm_backward_cpu(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                               const ml_tensor *x, const ml_tensor *w, const ml_tensor *b,
                               const ml_tensor *mean, const ml_tensor *rstd, int groups, bool fuse_silu);

int ml_layer_norm_forward_cpu(ml_tensor *out, ml_tensor *mean, ml_tensor *rstd, const ml_tensor *x,
                              const ml_tensor *w, const ml_tensor *b, double eps);
int ml_layer_norm_backward_cpu(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                               const ml_tensor *x, const ml_tensor *w,
                               const ml_tensor *mean, const ml_tensor *rstd);

#endif
