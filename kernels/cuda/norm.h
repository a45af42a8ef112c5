/* norm.h — CUDA group norm (channels last, optional fused SiLU) and layer
 * norm: the twins of kernels/cpu/norm.h, same signatures and contract
 * (x/out [N, L, C] or [M, C] contiguous, mean/rstd [N, G] or [M], w/b [C]
 * or NULL, gradients written (=) and NULL when not wanted).
 *
 * Beyond the CPU: x may also be f16 or bf16 (with w, b, out and the
 * gradients of that dtype; mean/rstd are then f32), computing in f32.
 * Statistics and every sum accumulate in double; f32 follows the CPU's
 * arithmetic (f32 affine in the forward, double in the backward) with IEEE
 * rounding, so results agree to a few units of the last place.
 * Deterministic: parameter gradients are two-stage reductions in an order
 * fixed by the shapes and the GPU model, with no atomics.
 * Implemented in kernels/cuda/norm.cu. */
#ifndef ML_KERNELS_CUDA_NORM_H
#define ML_KERNELS_CUDA_NORM_H

#include <stdbool.h>
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_group_norm_forward_cuda(ml_tensor *out, ml_tensor *mean, ml_tensor *rstd, const ml_tensor *x,
                               const ml_tensor *w, const ml_tensor *b, int groups, double eps, bool fuse_silu);
int ml_group_norm_backward_cuda(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                                const ml_tensor *x, const ml_tensor *w, const ml_tensor *b,
                                const ml_tensor *mean, const ml_tensor *rstd, int groups, bool fuse_silu);

int ml_layer_norm_forward_cuda(ml_tensor *out, ml_tensor *mean, ml_tensor *rstd, const ml_tensor *x,
                               const ml_tensor *w, const ml_tensor *b, double eps);
int ml_layer_norm_backward_cuda(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                                const ml_tensor *x, const ml_tensor *w,
                                const ml_tensor *mean, const ml_tensor *rstd);

#ifdef __cplusplus
}
#endif
#endif
