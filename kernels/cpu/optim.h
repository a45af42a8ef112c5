/* optim.h — fused optimizer updates on the CPU.  The CUDA twin in
 * kernels/cuda/optim.h has the same signature with _cuda. */
#ifndef ML_KERNELS_CPU_OPTIM_H
#define ML_KERNELS_CPU_OPTIM_H

#include "tensor.h"

/* One AdamW step in place on param p with gradient g and moments m, v, in
 * the arithmetic order of PyTorch's single-tensor AdamW (see optim.c).  All
 * four are contiguous with one shape; scalars are computed in double and
 * rounded to the element type.  dtypes: all f32 or all f64 (round to
 * nearest, seed and offset unused), or the bf16-sr step: p f32 or bf16, g
 * of p's dtype or f32, m and v both f32 or both bf16 (not all f32), computed
 * in f32 with each bf16 result stochastically rounded using the Philox
 * stream (seed, offset) as kernels/bf16_sr.h lays out (numel blocks). */
int ml_adamw_cpu(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr,
                 double b1, double b2, double eps, double wd, int64_t step, uint64_t seed, uint64_t offset);

#endif
