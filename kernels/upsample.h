/* upsample.h — nearest-neighbour 2-D upsampling by an integer factor,
 * NHWC: kernels/cpu/upsample.c and kernels/cuda/upsample.cu.
 *
 * x [N, H, W, C] -> out [N, H*s, W*s, C], each pixel repeated into an s x s
 * block; the backward sums each block into dx (written, =).  The host op
 * has checked: contiguous tensors of one dtype on one device with these
 * shapes, s >= 1.  Forwards copy any dtype.  Backwards: float32/float64 on
 * the CPU; float32, float64, float16 and bfloat16 (summing in float32) on
 * the GPU, where each dx element adds its block in the CPU's order, so
 * float32 results equal the CPU's bit for bit.  Return 0 / -1. */
#ifndef ML_KERNELS_UPSAMPLE_H
#define ML_KERNELS_UPSAMPLE_H

#include "kernel.h"

ML_KERNEL(ml_upsample_nearest2d_forward, (ml_ktensor *out, const ml_ktensor *x, int scale));
ML_KERNEL(ml_upsample_nearest2d_backward, (ml_ktensor *dx, const ml_ktensor *dout, int scale));

#endif
