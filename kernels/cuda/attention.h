/* attention.h — CUDA scaled dot-product attention: the twins of
 * kernels/cpu/attention.h, same signatures and contract (BSHD layout,
 * contiguous tensors, lse [B, H, Sq] float32 written by the forward and read
 * by the backward, gradients written (=) and NULL when not wanted, causal
 * masks key j > query i, scale multiplies q k^T).
 *
 * Unlike the CPU kernels these take float32, float16 and bfloat16 (all
 * tensors of one call share the dtype; accumulation in float32), not float64.
 * float16 / bfloat16 calls whose float32 scores of one batch, H*Sq*Sk*4
 * bytes (Sk rounded up to 8), fit in 2 GiB run as tensor-core GEMMs around
 * explicit score matrices (probabilities and dS rounded to the half type,
 * transient buffers of at most 2 GiB + 1 GiB, freed before returning);
 * the rest, float32 always, run flash-style kernels that keep everything in
 * float32 and take head widths D and Dv up to 512.  Both are deterministic.
 * Implemented in kernels/cuda/attention.cu. */
#ifndef ML_KERNELS_CUDA_ATTENTION_H
#define ML_KERNELS_CUDA_ATTENTION_H

#include <stdbool.h>
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_sdpa_forward_cuda(ml_tensor *out, ml_tensor *lse, const ml_tensor *q, const ml_tensor *k,
                         const ml_tensor *v, bool causal, double scale);
int ml_sdpa_backward_cuda(ml_tensor *dq, ml_tensor *dk, ml_tensor *dv, const ml_tensor *dout,
                          const ml_tensor *q, const ml_tensor *k, const ml_tensor *v,
                          const ml_tensor *out, const ml_tensor *lse, bool causal, double scale);

#ifdef __cplusplus
}
#endif
#endif
