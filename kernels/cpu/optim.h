/* optim.h — fused optimizer updates on the CPU.  The CUDA twin in
 * kernels/cuda/optim.h has the same signature with _cuda. */
#ifndef ML_KERNELS_CPU_OPTIM_H
#define ML_KERNELS_CPU_OPTIM_H

#include "tensor.h"

/* One AdamW step in place on param p with gradient g and moments m, v, in
 * the arithmetic order of PyTorch's single-tensor AdamW (see optim.c).  On
 * the CPU all four are contiguous with one shape and one dtype (f32 or f64);
 * scalars are computed in double and rounded to the element type. */
int ml_adamw_cpu(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr,
                 double b1, double b2, double eps, double wd, int64_t step);

#endif
