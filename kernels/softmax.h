/* softmax.h — softmax and log_softmax over one dim, forward and backward:
 * kernels/cpu/softmax.c and kernels/cuda/softmax.cu.
 *
 * Tensors are viewed as [outer, D, inner] around `dim` (0-based, in range:
 * the host wrapped it); the last dim (inner = 1) is the fast path.  The
 * host op has checked: every tensor contiguous, of one float dtype and one
 * shape, on one device.  The backward works from the forward's output:
 * softmax dx = y (dy - sum(dy y)), log_softmax dx = dy - exp(y) sum(dy);
 * dx is written (=).
 *
 * The CPU computes float32 and float64.  The CUDA kernels also take
 * float16 and bfloat16, computing in float32; sums accumulate in double
 * and the arithmetic follows the CPU's (exp in the element type, the row
 * sum in double), so float32 results agree to a few units of the last
 * place.  Return 0 / -1. */
#ifndef ML_KERNELS_SOFTMAX_H
#define ML_KERNELS_SOFTMAX_H

#include "kernel.h"

ML_KERNEL(ml_softmax_forward, (ml_ktensor *out, const ml_ktensor *x, int dim, bool log));
ML_KERNEL(ml_softmax_backward, (ml_ktensor *dx, const ml_ktensor *dout, const ml_ktensor *out, int dim, bool log));

#endif
