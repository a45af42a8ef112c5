/* softmax.h — CUDA softmax and log_softmax over one dim: the twins of
 * kernels/cpu/softmax.h, same signatures and contract (tensors contiguous,
 * viewed as [outer, D, inner] around `dim`; dx written).
 *
 * Beyond the CPU: f16 and bf16 as well as f32/f64, computing in f32.  Sums
 * accumulate in double and the arithmetic follows the CPU's (exp in the
 * element type, the row sum in double), so f32 results agree to a few
 * units of the last place.  Implemented in kernels/cuda/softmax.cu. */
#ifndef ML_KERNELS_CUDA_SOFTMAX_H
#define ML_KERNELS_CUDA_SOFTMAX_H

#include <stdbool.h>
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_softmax_forward_cuda(ml_tensor *out, const ml_tensor *x, int dim, bool log);
int ml_softmax_backward_cuda(ml_tensor *dx, const ml_tensor *dout, const ml_tensor *out, int dim, bool log);

#ifdef __cplusplus
}
#endif
#endif
