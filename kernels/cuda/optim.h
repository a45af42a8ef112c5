/* optim.h — the fused AdamW step on the GPU: the twin of
 * kernels/cpu/optim.h, same signature and the same arithmetic, operation
 * for operation with IEEE rounding and no fused multiply-adds, so an f32 or
 * f64 step gives the CPU's bits exactly.
 * Accepted here: p, m, v contiguous f32 with g f32, f16 or bf16 (the
 * bf16-mixed recipe's half-precision gradients), or all four f64.
 * Implemented in kernels/cuda/optim.cu. */
#ifndef ML_KERNELS_CUDA_OPTIM_H
#define ML_KERNELS_CUDA_OPTIM_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_adamw_cuda(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr, double b1,
                  double b2, double eps, double wd, int64_t step);

#ifdef __cplusplus
}
#endif
#endif
