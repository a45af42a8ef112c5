/* attention.h — CPU scaled dot-product attention, forward and backward.
 *
 * Letters: B batch, Sq/Sk query/key positions, H heads, D query/key width,
 * Dv value width.  BSHD layout, so the q/k/v projections are used without
 * a transpose:
 *   q [B, Sq, H, D]   k [B, Sk, H, D]   v [B, Sk, H, Dv]   out [B, Sq, H, Dv]
 *   lse [B, H, Sq]: the log-sum-exp of each score row, written by the
 *   forward; the backward rebuilds the probabilities from it instead of
 *   keeping the [Sq, Sk] matrices alive (float64 for float64 inputs).
 * causal masks key j > query i (top-left aligned, as CLIP's text encoder
 * uses).  scale multiplies q k^T (the host turns <= 0 into 1/sqrt(D)).
 * Tensors contiguous, float32 or float64; gradients written (=), NULL when
 * not wanted.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_ATTENTION_H
#define ML_KERNELS_CPU_ATTENTION_H

#include <stdbool.h>
#include "tensor.h"

int ml_sdpa_forward_cpu(ml_tensor *out, ml_tensor *lse, const ml_tensor *q, const ml_tensor *k,
                        const ml_tensor *v, bool causal, double scale);
int ml_sdpa_backward_cpu(ml_tensor *dq, ml_tensor *dk, ml_tensor *dv, const ml_tensor *dout,
                         const ml_tensor *q, const ml_tensor *k, const ml_tensor *v,
                         const ml_tensor *out, const ml_tensor *lse, bool causal, double scale);

#endif
