/* upsample.h — CUDA nearest-neighbour 2-D upsampling by an integer factor,
 * NHWC: the twins of kernels/cpu/upsample.h, same signatures and contract
 * (x [N, H, W, C] -> out [N, H*s, W*s, C], contiguous; the backward sums
 * each s x s block into dx, written).
 *
 * The forward copies any dtype; the backward also takes f16 and bf16
 * (summing in f32).  Each dx element adds its block in the CPU's order, so
 * f32 results equal the CPU's bit for bit.
 * Implemented in kernels/cuda/upsample.cu. */
#ifndef ML_KERNELS_CUDA_UPSAMPLE_H
#define ML_KERNELS_CUDA_UPSAMPLE_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_upsample_nearest2d_forward_cuda(ml_tensor *out, const ml_tensor *x, int scale);
int ml_upsample_nearest2d_backward_cuda(ml_tensor *dx, const ml_tensor *dout, int scale);

#ifdef __cplusplus
}
#endif
#endif
