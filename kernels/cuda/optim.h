/* optim.h — the fused AdamW step on the GPU: the twin of
 * kernels/cpu/optim.h, same signature and the same arithmetic, operation
 * for operation with IEEE rounding and no fused multiply-adds, so an f32 or
 * f64 step gives the CPU's bits exactly.
 * Accepted here: p, m, v contiguous f32 with g f32, f16 or bf16 (the
 * bf16-mixed recipe's half-precision gradients), or all four f64; and the
 * bf16-sr step: p f32 or bf16, g f32, bf16 or f16, m and v both f32 or both
 * bf16 (not all f32), stochastically rounded with the Philox stream
 * (seed, offset) as kernels/bf16_sr.h lays out — the CPU's bits again.
 * Implemented in kernels/cuda/optim.cu. */
#ifndef ML_KERNELS_CUDA_OPTIM_H
#define ML_KERNELS_CUDA_OPTIM_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_adamw_cuda(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr, double b1,
                  double b2, double eps, double wd, int64_t step, uint64_t seed, uint64_t offset);

#ifdef __cplusplus
}
#endif
#endif
