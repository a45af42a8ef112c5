/* upsample.h — CPU nearest-neighbour 2-D upsampling by an integer factor,
 * NHWC: x [N, H, W, C] -> out [N, H*s, W*s, C], each pixel repeated into an
 * s x s block.  The backward sums each block (dx written, float32/float64).
 * Contiguous tensors.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_UPSAMPLE_H
#define ML_KERNELS_CPU_UPSAMPLE_H

#include "tensor.h"

int ml_upsample_nearest2d_forward_cpu(ml_tensor *out, const ml_tensor *x, int scale);
int ml_upsample_nearest2d_backward_cpu(ml_tensor *dx, const ml_tensor *dout, int scale);

#endif
