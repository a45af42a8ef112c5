/* softmax.h — CPU softmax and log_softmax over one dim, forward and
 * backward.  Tensors are viewed as [outer, D, inner] around `dim` (0-based);
 * the last dim (inner = 1) is the fast path.  Contiguous, float32 or
 * float64; dx is written (=).  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_SOFTMAX_H
#define ML_KERNELS_CPU_SOFTMAX_H

#include <stdbool.h>
#include "tensor.h"

int ml_softmax_forward_cpu(ml_tensor *out, const ml_tensor *x, int dim, bool log);
/* From the forward's output: softmax dx = y (dy - sum(dy y)),
 * log_softmax dx = dy - exp(y) sum(dy). */
int ml_softmax_backward_cpu(ml_tensor *dx, const ml_tensor *dout, const ml_tensor *out, int dim, bool log);

#endif
