/* index.h — CUDA embedding, gather and index_select: the twins of
 * kernels/cpu/index.h, same signatures and contract (contiguous tensors,
 * int32/int64 indices bounds-checked with the CPU's message, forwards of
 * any dtype, gradients written).
 *
 * The bounds check reads one word back from the GPU, so each call waits
 * for the work queued before it.  Backwards also take f16 and bf16
 * (summing in f32) and are deterministic without atomics on the values:
 * every gradient element sums its contributions in index order, as the
 * CPU does, so f32 results equal the CPU's bit for bit.
 * Implemented in kernels/cuda/index.cu. */
#ifndef ML_KERNELS_CUDA_INDEX_H
#define ML_KERNELS_CUDA_INDEX_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_embedding_forward_cuda(ml_tensor *out, const ml_tensor *weight, const ml_tensor *ids);
int ml_embedding_backward_cuda(ml_tensor *dweight, const ml_tensor *dout, const ml_tensor *ids);
int ml_gather_forward_cuda(ml_tensor *out, const ml_tensor *x, int dim, const ml_tensor *index);
int ml_gather_backward_cuda(ml_tensor *dx, const ml_tensor *dout, int dim, const ml_tensor *index);
int ml_index_select_forward_cuda(ml_tensor *out, const ml_tensor *x, int dim, const ml_tensor *index);
int ml_index_select_backward_cuda(ml_tensor *dx, const ml_tensor *dout, int dim, const ml_tensor *index);

#ifdef __cplusplus
}
#endif
#endif
